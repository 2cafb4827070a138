"""Error feedback that keeps FSDP's memory promise (issue 19): residuals stored as int8/int4/int2
codes with one f32 scale per 64 elements (``residual_dtype``), their memory in
``stats()["state_bytes"]``, their round trip through the state dict, on real gloo ranks."""

import math

import pytest
import torch

import _residual_workers as R
import tritter_comm
import tritter_comm.fsdp
from _dist import run
from tritter_comm import residual as res

HOOK = dict(start_iter=2, min_compress_numel=1000)
APIS = ["fsdp1"] + (["fsdp2"] if tritter_comm.fsdp.available() else [])


# -- the stored form on its own ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
@pytest.mark.parametrize("n,segment", [(1000, None), (1000, 250), (999, 333), (5, None)])
def test_quantized_residual_round_trip(fmt, n, segment):
    r = res.make(n, fmt, "cpu", segment)
    x = torch.randn(n)
    seg = segment or n
    for lo in range(0, n, seg):  # as the exchange writes it: chunk by chunk
        r[lo:lo + seg].copy_(x[lo:lo + seg])
    y = r.dequantize()
    # each element's block: blocks of 64 restart at every segment
    blk = torch.tensor([r._pos(i) // res.BLOCK for i in range(n)])
    if fmt == "int2":
        # levels (c - 1.5) x step, step = 0.9957 x the rms of the block's own elements
        for b in blk.unique():
            xb = x[blk == b]
            assert float(r.scales[b]) == pytest.approx(0.9957 * float(xb.square().mean().sqrt()),
                                                       rel=1e-5)
        step = r.scales[blk]
        inside = x.abs() < 2 * step
        assert ((y - x).abs()[inside] <= step[inside] / 2 * (1 + 1e-5)).all()  # the nearest level
        torch.testing.assert_close(y[~inside], x[~inside].sign() * 1.5 * step[~inside])
    else:
        # rounding to nearest: at most half a step (absmax / qmax / 2) off, block by block
        amax = torch.zeros(int(blk.max()) + 1).scatter_reduce(0, blk, x.abs(), "amax")
        assert ((y - x).abs() <= amax[blk] / res.FORMATS[fmt] / 2 + 1e-6).all()
    assert torch.equal(r[0:min(seg, n)].to(torch.float32), y[:min(seg, n)])
    # a checkpoint restores the same codes: the same values, exactly
    assert torch.equal(res.from_state(res.to_state(r)).dequantize(), y)
    codes = r.codes.numel() * r.codes.element_size()
    assert r.nbytes == res.nbytes(r) == codes + 4 * r.scales.numel()


def test_int2_residual_keeps_most_of_a_gaussian():
    # the Gaussian's optimal uniform 4-level quantizer drops 11.9% of the energy; int4 about 1%
    x = torch.randn(64 * 500, generator=torch.Generator().manual_seed(0))
    for fmt, lo, hi in (("int2", 0.10, 0.14), ("int4", 0.005, 0.02)):
        r = res.make(x.numel(), fmt, "cpu")
        r.copy_(x)
        dropped = float((r.dequantize() - x).square().sum() / x.square().sum())
        assert lo < dropped < hi, (fmt, dropped)
    r = res.make(200, "int2", "cpu")
    r.copy_(torch.zeros(200))
    assert torch.equal(r.dequantize(), torch.zeros(200))  # a zero block: step 0, no offset


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_a_set_keep_flag_leaves_the_stored_bits_as_they_are(fmt):
    # the CUDA exchange's non-finite flag (exchange._encode): on it, codes and scales keep
    # their bits, however the values would round again; off, the store is copy_'s
    g = torch.Generator().manual_seed(3)
    r = res.make(1000, fmt, "cpu", segment=None)
    r.copy_(torch.randn(1000, generator=g))
    codes, scales = r.codes.clone(), r.scales.clone()
    new = torch.randn(1000, generator=g) * 5
    r[128:640].copy_(new[128:640], keep=torch.tensor(True))
    assert torch.equal(r.codes, codes) and torch.equal(r.scales, scales)
    plain = res.make(1000, fmt, "cpu", segment=None)  # the window stored alone
    plain[128:640].copy_(new[128:640])
    r[128:640].copy_(new[128:640], keep=torch.tensor(False))
    b = slice(2, 10)  # the window's blocks of 64
    per = res.BLOCK * res.BITS[fmt] // 8  # code bytes a block
    c = slice(2 * per, 10 * per)
    assert torch.equal(r.scales[b], plain.scales[b]) and torch.equal(r.codes[c], plain.codes[c])
    assert not torch.equal(r.codes[c], codes[c])
    out = torch.ones_like(r.scales, dtype=torch.bool)
    out[b] = False  # the blocks outside the window kept their bits
    assert torch.equal(r.scales[out], scales[out])


def test_quantized_residual_bytes():
    n = 64 * 1000
    assert res.nbytes(res.make(n, "int8", "cpu")) == n + 4 * n // 64
    assert res.nbytes(res.make(n, "int4", "cpu")) == n // 2 + 4 * n // 64
    assert res.nbytes(res.make(n, "int2", "cpu")) == n // 4 + 4 * n // 64
    for fmt in ("int8", "int4", "int2"):
        assert res.nbytes(res.make(0, fmt, "cpu")) == 0
        assert res.make(0, fmt, "cpu").dequantize().numel() == 0
    assert res.nbytes(res.make(n, "bfloat16", "cpu")) == 2 * n


def test_quantized_residual_rejects_unaligned_slices():
    r = res.make(1000, "int4", "cpu", 250)
    with pytest.raises(ValueError, match="block boundary"):
        r[10:250].to(torch.float32)
    # a window across segments is read and written segment by segment
    x = torch.randn(300)
    r[0:300].copy_(x)
    torch.testing.assert_close(r[0:300].to(torch.float32), x, atol=x.abs().max() / 7, rtol=0)


@pytest.mark.parametrize("bad", ["int3", "fp8", "float16", 8, None])
def test_bad_residual_dtype_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        tritter_comm.VSAConfig(residual_dtype=bad)
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        tritter_comm.VSAState(residual_dtype=bad)


def test_saved_residual_of_the_wrong_shape_is_a_clear_value_error():
    s = res.to_state(res.make(1000, "int4", "cpu"))
    s["codes"] = s["codes"][:-1]
    with pytest.raises(ValueError, match="expected"):
        res.from_state(s)


# -- int2-topk: the blocks of most energy, within a byte budget --------------------------------------


def _stored(r, x, seg):
    for lo in range(0, r.numel(), seg):  # as the exchange writes it: a segment at a time
        r[lo:lo + seg].copy_(x[lo:lo + seg])
    return r.dequantize()


@pytest.mark.parametrize("n,segment", [(6400, 1600), (6000, 1999), (100, None)])
def test_topk_residual_keeps_the_blocks_of_most_energy(n, segment):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 10
    seg = segment or n
    budget = 4 * seg * 0.3  # 0.3x one segment in float32
    r = res.make(n, res.TOPK, "cpu", segment, budget=budget)
    assert r.nbytes == res.nbytes(r) <= budget and r.kept > 0
    y = _stored(r, x, seg)
    dense = _stored(res.make(n, "int2", "cpu", segment), x, seg)
    for lo in range(0, n, seg):
        xs, ys = x[lo:lo + seg], y[lo:lo + seg]
        nb = -(-xs.numel() // res.BLOCK)
        energy = torch.zeros(nb * res.BLOCK)
        energy[:xs.numel()] = xs.square()
        energy = energy.view(nb, -1).sum(dim=1)
        k = min(r.kept, nb)
        top = set(torch.topk(energy, k).indices.tolist())
        for b in range(nb):
            blk = slice(b * res.BLOCK, (b + 1) * res.BLOCK)
            if b in top:  # int2 as the dense form stores it
                assert torch.equal(ys[blk], dense[lo:lo + seg][blk]), b
            else:
                assert not ys[blk].any(), b
        if k < nb:  # what it keeps: more than its share of the energy
            kept = float(sum(energy[b] for b in top) / energy.sum())
            assert kept > k / nb
    assert r.partial == (r.kept < -(-min(seg, n) // res.BLOCK))
    assert torch.equal(res.from_state(res.to_state(r)).dequantize(), y)
    assert res.fmt_of(res.from_state(res.to_state(r))) == res.TOPK


def test_topk_residual_layout_and_errors():
    # every block fits: the dense int2 values, and not partial (least squares' scale)
    x = torch.randn(1000)
    full = res.make(1000, res.TOPK, "cpu", 250, budget=4 * 250)
    assert not full.partial and full.kept >= 4
    assert torch.equal(_stored(full, x, 250), _stored(res.make(1000, "int2", "cpu", 250), x, 250))
    # 13 segments (FSDP at 13 ranks) in one segment's float32 bytes: about 82% of the blocks
    seg = 64 * 1000
    r = res.make(13 * seg, res.TOPK, "cpu", seg, budget=4 * seg)
    assert r.partial and r.nbytes <= 4 * seg and 0.8 < r.kept / 1000 < 0.83
    with pytest.raises(ValueError, match="whole segment"):
        r[0:64].to(torch.float32)
    with pytest.raises(ValueError, match="whole segment"):
        r[0:seg + 64].copy_(torch.zeros(seg + 64))
    # a budget below one block a segment keeps nothing, and reads zero
    none = res.make(1000, res.TOPK, "cpu", 250, budget=10)
    assert none.kept == 0 and none.nbytes == 0 and not _stored(none, x, 250).any()
    empty = res.make(0, res.TOPK, "cpu", budget=100)
    assert empty.nbytes == 0 and empty.dequantize().numel() == 0 and not empty.partial
    s = res.to_state(r)
    s["index"] = s["index"] + 5000
    with pytest.raises(ValueError, match="outside its segments"):
        res.from_state(s)
    s = res.to_state(r)
    s["index"] = s["index"][:-1]
    with pytest.raises(ValueError, match="expected"):
        res.from_state(s)


def test_topk_keep_flag_leaves_the_stored_bits_as_they_are():
    g = torch.Generator().manual_seed(5)
    r = res.make(2000, res.TOPK, "cpu", 1000, budget=4 * 1000 * 0.4)
    _stored(r, torch.randn(2000, generator=g), 1000)
    before = [t.clone() for t in (r.codes, r.scales, r.index)]
    new = torch.randn(2000, generator=g) * torch.linspace(0, 9, 2000)
    r[1000:2000].copy_(new[1000:2000], keep=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, (r.codes, r.scales, r.index)))
    r[1000:2000].copy_(new[1000:2000], keep=torch.tensor(False))
    plain = res.make(2000, res.TOPK, "cpu", 1000, budget=4 * 1000 * 0.4)
    plain[1000:2000].copy_(new[1000:2000])
    torch.testing.assert_close(r[1000:2000].to(torch.float32),
                               plain[1000:2000].to(torch.float32), rtol=0, atol=0)
    k = r.kept
    assert torch.equal(r.index[:k], before[2][:k])  # the other segment kept its bits


def test_state_makes_topk_within_the_budget_and_converts_on_a_new_budget():
    n, world = 13 * 6400, 13
    s = tritter_comm.VSAState()
    r = s._residual(s.residuals, 0, n, "cpu", segment=n // world, fsdp=True, world=world)
    assert res.fmt_of(r) == res.TOPK and r.partial and r.nbytes <= 4 * n // world
    x = torch.randn(n)
    _stored(r, x, n // world)
    half = tritter_comm.VSAState(residual_budget=0.5)
    half.load_state_dict(s.state_dict())  # the budget may differ: converted at next use
    h = half._residual(half.residuals, 0, n, "cpu", segment=n // world, fsdp=True, world=world)
    assert h.nbytes <= 2 * n // world and h.kept == r.kept // 2
    # h keeps the blocks of most energy of r's values
    dense = r.dequantize()
    assert float(h.dequantize().square().sum()) >= 0.45 * float(dense.square().sum())
    assert half.residuals[0] is h
    # asked for where nothing is sharded (DDP, NO_SHARD): int2
    t = tritter_comm.VSAState(residual_dtype="int2-topk")
    assert t.residual_format() == t.residual_format(fsdp=True) == "int2"
    assert t.residual_format(fsdp=True, world=4) == res.TOPK


# -- FSDP on real ranks ----------------------------------------------------------------------------


def _shard_bytes(r, world):
    return 4 * r["n_params"] / world


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_residual_memory_against_the_shard(world, tmp_path):
    """At 2 and 4 ranks: fp32 residuals take ``world`` times the rank's fp32 gradient shard;
    int4 (the FSDP default, "auto") at most 0.6x of it (int8 at 2 ranks too, int2 at 4 ranks
    0.45x); replicas stay identical across ranks."""
    runs = {}
    for api in APIS:
        runs[f"{api}-fp32"] = dict(api=api, steps=6, hook=dict(HOOK, residual_dtype="float32"))
        runs[f"{api}-int4"] = dict(api=api, steps=6, hook=dict(HOOK, residual_dtype="int4"))
        runs[f"{api}-default"] = dict(api=api, steps=6, hook=HOOK)
        if world == 2:
            runs[f"{api}-int8"] = dict(api=api, steps=6, hook=dict(HOOK, residual_dtype="int8"))
        else:
            runs[f"{api}-int2"] = dict(api=api, steps=6, hook=dict(HOOK, residual_dtype="int2"))
    out = run(R.fsdp_suite, world, runs, timeout=240)
    for name in runs:
        ranks = [o[name] for o in out]
        assert len({r["full"] for r in ranks}) == 1, f"{name}: replicas differ"
        for r in ranks:
            frac = r["stats"]["state_bytes"] / _shard_bytes(r, world)
            if name.endswith("fp32"):
                # every unit's full flat gradient (the root's small one stays uncompressed)
                assert world * 0.9 <= frac <= world * 1.05, (name, frac)
            elif name.endswith(("int4", "default")):
                # codes and scales, each shard padded to whole blocks of 64
                assert 0 < frac <= min(0.75 * world / 4, 1.0), (name, frac)
            elif name.endswith("int2"):
                assert 0 < frac <= 0.45 * world / 4, (name, frac)
            else:
                assert 0 < frac <= min(1.25 * world / 4, 1.0), (name, frac)
    for api in APIS:  # the default is int4: the same memory and the same training, bit for bit
        for o in out:
            assert o[f"{api}-default"]["stats"]["state_bytes"] == o[f"{api}-int4"]["stats"][
                "state_bytes"]
            assert o[f"{api}-default"]["full"] == o[f"{api}-int4"]["full"]


def test_fsdp_auto_is_int2_at_8_ranks():
    """From 8 ranks int4 would take more than the rank's fp32 gradient shard (1.13x), so the
    default ("auto") is int2 (0.63x) and trains bit for bit as ``residual_dtype="int2"``; int4,
    asked for, is kept there."""
    from tritter_comm.hooks.state import INT2_FSDP_MAX_WORLD, INT4_FSDP_MAX_WORLD

    world = 8
    assert (INT4_FSDP_MAX_WORLD, INT2_FSDP_MAX_WORLD) == (7, 12)
    runs = {}
    for api in APIS:
        for name, hook in (("default", HOOK), ("int2", dict(HOOK, residual_dtype="int2")),
                           ("int4", dict(HOOK, residual_dtype="int4"))):
            runs[f"{api}-{name}"] = dict(api=api, steps=4, hook=hook, width=64)
    out = run(R.fsdp_suite, world, runs, timeout=400)
    for api in APIS:
        for o in out:
            frac = {k: o[f"{api}-{k}"]["stats"]["state_bytes"] / _shard_bytes(o[f"{api}-{k}"],
                                                                               world)
                    for k in ("default", "int2", "int4")}
            # 0.625x, plus each small shard's padding to whole blocks of 64 at this width
            assert 0.6 <= frac["default"] == frac["int2"] <= 0.75, frac
            assert o[f"{api}-default"]["full"] == o[f"{api}-int2"]["full"]
            # int4, asked for, is kept: above the shard at this rank count, and trained otherwise
            assert frac["int4"] > 1.0, frac
            assert o[f"{api}-int4"]["full"] != o[f"{api}-default"]["full"]
        assert len({o[f"{api}-default"]["full"] for o in out}) == 1, api


def test_fsdp_auto_past_int2_keeps_the_top_blocks_within_the_budget():
    """Where int2 would pass the budget (from 13 ranks at ``residual_budget=1``; here 4 ranks at
    0.25, where int2 takes 0.31x), "auto" is int2-topk: at most the budget, some state kept, the
    same training bit for bit as ``residual_dtype="int2-topk"``, and not that of no residual.
    int2-topk whose blocks all fit (a budget of 1 at 4 ranks) trains bit for bit as int2."""
    world, quarter = 4, dict(HOOK, residual_budget=0.25)
    runs = {}
    for api in APIS:
        for name, hook in (("default", quarter),
                           ("topk", dict(quarter, residual_dtype="int2-topk")),
                           ("no-ef", dict(HOOK, error_feedback=False)),
                           ("topk-all", dict(HOOK, residual_dtype="int2-topk")),
                           ("int2", dict(HOOK, residual_dtype="int2"))):
            runs[f"{api}-{name}"] = dict(api=api, steps=6, hook=hook, width=256)
    out = run(R.fsdp_suite, world, runs, timeout=300)
    for api in APIS:
        for o in out:
            d = o[f"{api}-default"]
            frac = d["stats"]["state_bytes"] / _shard_bytes(d, world)
            assert 0.1 < frac <= 0.25, frac
            assert d["full"] == o[f"{api}-topk"]["full"]
            assert d["full"] != o[f"{api}-no-ef"]["full"]
            assert o[f"{api}-topk-all"]["full"] == o[f"{api}-int2"]["full"]
            assert all(map(math.isfinite, d["losses"]))
        for k in ("default", "topk-all"):
            assert len({o[f"{api}-{k}"]["full"] for o in out}) == 1, (api, k)


def test_exchange_encodes_without_a_residual_take_the_unbiased_scale():
    from tritter_comm import codec
    from tritter_comm.exchange import Plan, Timers, _encode

    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    for mode, mid in (("int2", 2), ("ternary", 0)):
        plan = Plan.make(x.numel(), 1, 8, mid, mid)
        slot = torch.empty(plan.slot, dtype=torch.uint8)
        _encode(x, slot, seed=3, stream=9, plan=plan, residual=None, timers=Timers())
        want = codec.encode(x, seed=3, stream=9, mode=mode, block_size=256,
                            unbiased=mode == "int2")
        assert torch.equal(slot[:want.body.numel()], want.body), mode
        # with a residual: least squares; with one that drops blocks (int2-topk): unbiased
        e = torch.zeros_like(x)
        _encode(x, slot, seed=3, stream=9, plan=plan, residual=e, timers=Timers())
        want = codec.encode(x, seed=3, stream=9, mode=mode, block_size=256,
                            residual=torch.zeros_like(x))
        assert torch.equal(slot[:want.body.numel()], want.body), mode
        for budget, unbiased in ((4 * x.numel(), False), (x.numel() // 10, True)):
            top = res.make(x.numel(), res.TOPK, "cpu", budget=budget)
            assert top.partial == unbiased
            _encode(x, slot, seed=3, stream=9, plan=plan, residual=top[0:x.numel()],
                    timers=Timers())
            want = codec.encode(x, seed=3, stream=9, mode=mode, block_size=256,
                                residual=torch.zeros_like(x), unbiased=unbiased and mode == "int2")
            assert torch.equal(slot[:want.body.numel()], want.body), (mode, budget)


@pytest.mark.parametrize("fmt", ["int4", "int2-topk"])  # int8: the same path, other codes
def test_fsdp_narrow_residual_resumes_exactly(fmt, tmp_path):
    """Save at step 8 (parameters, optimizer, hook state with int codes and scales; int2-topk's
    block indices too, at a budget that keeps about half the blocks), resume in fresh processes:
    the same parameters as the uninterrupted run, bit for bit."""
    path = str(tmp_path / "ck")
    hook = dict(HOOK, start_iter=4, residual_dtype=fmt,
                **({"residual_budget": 0.1} if fmt == res.TOPK else {}))
    runs = {f"{api}-{k}": dict(api=api, steps=14, hook=hook, **kw)
            for api in APIS for k, kw in (("full", dict(save_at=8, save_path=f"{path}-{api}")),)}
    full = run(R.fsdp_suite, 2, runs, timeout=240)
    resumed = run(R.fsdp_suite, 2, {f"{api}-resumed": dict(api=api, steps=14, hook=hook,
                                                            load_path=f"{path}-{api}")
                                    for api in APIS}, timeout=240)
    for api in APIS:
        for rank in range(2):
            assert resumed[rank][f"{api}-resumed"]["full"] == full[rank][f"{api}-full"]["full"]
            ck = torch.load(f"{path}-{api}.hook{rank}", weights_only=True)
            saved = next(iter(ck["residuals"].values()))
            assert saved["format"] == fmt and saved["codes"].dtype in (torch.int8, torch.uint8)
            if fmt == res.TOPK:  # blocks dropped: fewer kept than the segment has
                assert 0 < saved["kept"] < -(-saved["segment"] // res.BLOCK)


def test_a_residual_of_another_format_is_converted_not_reset():
    """A checkpoint's fp32 residuals loaded into an int4 (or "auto" FSDP) state keep their
    values to int4's precision; the configurations differ only in residual_dtype, which may."""
    torch.manual_seed(0)
    r = torch.randn(1000)
    a = tritter_comm.VSAState(residual_dtype="float32")
    a.residuals[3] = r.clone()
    for fmt, fsdp in (("int4", False), ("auto", True), ("bfloat16", False)):
        b = tritter_comm.VSAState(residual_dtype=fmt)
        b.load_state_dict(a.state_dict())
        got = b._residual(b.residuals, 3, 1000, "cpu", segment=250, fsdp=fsdp)
        assert res.fmt_of(got) == b.residual_format(fsdp) != "float32"
        dense = got.dequantize() if isinstance(got, res.QuantizedResidual) else got.float()
        tol = {"int4": 1 / 7, "bfloat16": 1 / 128}[res.fmt_of(got)]
        assert (dense - r).abs().max() <= tol * r.abs().max()
        assert b.residuals[3] is got
    # and back: an int4 checkpoint into a float32 state, exactly its dequantized values
    c = tritter_comm.VSAState(residual_dtype="float32")
    q = tritter_comm.VSAState(residual_dtype="int4")
    q.load_state_dict(a.state_dict())
    qr = q._residual(q.residuals, 3, 1000, "cpu")
    c.load_state_dict(q.state_dict())
    back = c._residual(c.residuals, 3, 1000, "cpu")
    assert back.dtype == torch.float32 and torch.equal(back, qr.dequantize())


def test_auto_resolves_by_hook():
    s = tritter_comm.VSAState()
    assert s.residual_dtype == "auto"
    assert s.residual_format() == "float32" and s.residual_format(fsdp=True) == "int4"
    assert [s.residual_format(fsdp=True, world=w) for w in (2, 7, 8, 12, 13, 64)] == [
        "int4", "int4", "int2", "int2", res.TOPK, res.TOPK]
    assert s.residual_format(world=64) == "float32"
    # each form's bytes an element of the full gradient, against the shard's 4 / world
    per = {"int4": 0.5 + 4 / 64, "int2": 0.25 + 4 / 64}
    seg = 64 * 10_000  # a unit's shard
    for budget in (1.0, 0.5, 2.0):
        b = tritter_comm.VSAState(residual_budget=budget)
        for w in range(2, 129):
            f = b.residual_format(fsdp=True, world=w)
            wider = {res.TOPK: "int2", "int2": "int4"}.get(f)
            assert wider is None or per[wider] > 4 * budget / w, (w, f)  # the widest that fits
            if f == res.TOPK:
                r = res.TopkResidual(w * seg, "meta", seg, res.TopkResidual.blocks_within(
                    w * seg, seg, 4 * budget * seg))
                assert r.partial and 0 < r.nbytes <= 4 * budget * seg, (w, budget)
            else:
                assert per[f] <= 4 * budget / w, (w, f)
    for fmt in ("float32", "bfloat16", "int8", "int4", "int2"):
        t = tritter_comm.VSAState(residual_dtype=fmt)
        assert t.residual_format() == t.residual_format(fsdp=True) == fmt


# -- DDP ------------------------------------------------------------------------------------------


def test_ddp_int4_residual_is_under_a_quarter_of_the_gradient():
    """DDP with int4 residuals: client + server residuals at most 0.25x the fp32 gradient;
    replicas identical; the default (fp32 under DDP) state takes 1x plus the server's 1/N."""
    runs = {"fp32": dict(steps=6, hook=HOOK, width=256),
            "int4": dict(steps=6, hook=dict(HOOK, residual_dtype="int4"), width=256)}
    out = run(R.ddp_suite, 2, runs, timeout=240)
    n = len(out[0]["int4"]["params"]) // 4  # float32 parameters
    for name in runs:
        assert out[0][name]["params"] == out[1][name]["params"], name
    for o in out:
        assert 1.0 <= o["fp32"]["stats"]["state_bytes"] / (4 * n) <= 1.55
        assert 0 < o["int4"]["stats"]["state_bytes"] / (4 * n) <= 0.25
