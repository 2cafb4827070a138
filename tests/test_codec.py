"""The public codec API: encode, decode, Payload."""

import numpy as np
import pytest
import torch

import tritter_comm as tc
from tritter_comm import _native

BOUNDS = {"ternary": 0.46, "sign": 0.62, "int2": 0.36}


def rel_err(x, y):
    return ((x.double() - y.double()).norm() / x.double().norm()).item()


def heavy_tailed(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Student-t with 2 degrees of freedom: infinite variance, a few huge values
    z = torch.randn(n, generator=g)
    chi2 = torch.randn(n, generator=g) ** 2 + torch.randn(n, generator=g) ** 2
    return z / (chi2 / 2).sqrt()


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("mode", list(BOUNDS))
def test_error_within_mode_bound(mode, backend):
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    y = tc.decode(tc.encode(x, mode=mode, backend=backend), backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert rel_err(x, y) < BOUNDS[mode]
    h = heavy_tailed(200_000)
    yh = tc.decode(tc.encode(h, mode=mode, backend=backend), backend=backend)
    # the spread turns each block near-Gaussian, so heavy tails cost no more than Gaussians
    assert rel_err(h, yh) < BOUNDS[mode]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_round_trip(dtype):
    x = torch.randn(10_000).to(dtype)
    p = tc.encode(x, block_size=256)
    y = tc.decode(p)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(x.float(), y.float()) < BOUNDS["ternary"] + 0.01


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_error_feedback_loses_nothing(mode):
    n = 5000
    e = torch.zeros(n)
    total_in = torch.zeros(n, dtype=torch.float64)
    total_out = torch.zeros(n, dtype=torch.float64)
    for step in range(50):
        x = torch.randn(n, generator=torch.Generator().manual_seed(step))
        y = tc.decode(tc.encode(x, stream=step, mode=mode, residual=e, block_size=256))
        total_in += x
        total_out += y
    # what was sent plus what is still owed is what came in
    gap = (total_in - total_out - e.double()).abs().max().item()
    assert gap < 1e-4 * total_in.abs().max().item()
    # and the residual stays bounded: it does not accumulate the error of every step
    assert e.norm() < 2 * torch.randn(n).norm()


def test_payload_bytes_round_trip_and_size():
    x = torch.randn(4097)
    p = tc.encode(x, seed=7, stream=2**63 + 5, mode="int2", block_size=512)
    b = p.to_bytes()
    assert len(b) == p.nbytes == 32 + tc.body_nbytes(4097, mode="int2", block_size=512)
    q = tc.Payload.from_bytes(b)
    assert q == p and q.seed == 7 and q.stream == 2**63 + 5
    assert torch.equal(tc.decode(q), tc.decode(p))
    # ternary: 1.6 bits an element plus one f32 scale a block, about 20x smaller than fp32
    big = tc.encode(torch.randn(1 << 20))
    assert 19.5 < (4 << 20) / big.nbytes < 20.0


def test_thread_count_does_not_change_bytes():
    x = torch.randn(1_000_003)
    outs = []
    try:
        for threads in (1, 2, 3):
            tc.set_num_threads(threads)
            e = torch.full_like(x, 0.01)
            p = tc.encode(x, residual=e, block_size=256)
            outs.append((p.body.clone(), e, tc.decode(p)))
    finally:
        tc.set_num_threads(0)
    for body, e, y in outs[1:]:
        assert torch.equal(body, outs[0][0]) and torch.equal(e, outs[0][1])
        assert torch.equal(y, outs[0][2])


def test_numpy_input_is_accepted():
    x = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    p = tc.encode(x)
    assert torch.equal(p.body, tc.encode(torch.from_numpy(x)).body)


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (torch.empty(0), {}, "empty"),
        (torch.randn(10, 10)[:, 0], {}, "1-D|contiguous"),
        (torch.randn(100)[::2], {}, "contiguous"),
        (torch.randn(4, 4), {}, "1-D"),
        (torch.arange(10), {}, "float32, float16 or bfloat16"),
        (torch.tensor([1.0, float("nan")]), {}, "NaN"),
        (torch.tensor([1.0, float("inf")]), {}, "NaN or Inf"),
        (torch.randn(10), {"block_size": 100}, "power of two"),
        (torch.randn(10), {"block_size": 128}, "256 to 65536"),
        (torch.randn(10), {"block_size": 1 << 17}, "256 to 65536"),
        (torch.randn(10), {"mode": "binary"}, "mode"),
        (torch.randn(10), {"backend": "cuda"}, "backend"),
        (torch.randn(10), {"seed": -1}, "seed"),
        (torch.randn(10), {"stream": 2**64}, "stream"),
        (torch.randn(10), {"residual": torch.zeros(11)}, "residual must match"),
        (torch.randn(10), {"residual": torch.zeros(10, dtype=torch.float64)}, "residual"),
        ("not a tensor", {}, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_bad_input_is_a_clear_error(x, kwargs, match, backend):
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(ValueError, match=match):
        tc.encode(x, **kwargs)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_nan_leaves_residual_untouched(backend):
    x = torch.randn(3000)
    x[2999] = float("nan")
    e = torch.full((3000,), 0.25)
    with pytest.raises(ValueError, match="NaN"):
        tc.encode(x, residual=e, backend=backend)
    assert torch.equal(e, torch.full((3000,), 0.25))


# Aliasing (issue 14): the Rust core takes inputs as &[T] and outputs as &mut [T], so an output
# that shares any byte with an input must be refused before it gets there; disjoint views of one
# buffer are fine.
def _overlapping_residuals(dtype):
    """The buffer, and (x, residual) pairs over it: identical, overlapping x's start or its
    end, by one element at the edge, and shifted by one element."""
    buf = torch.randn(8192).to(dtype)
    x = buf[2048:4096]
    return buf, {
        "identical": (x, x),
        "same bytes, another view": (x, buf[2048:4096]),
        "over the start": (x, buf[1024:3072]),
        "over the end": (x, buf[3072:5120]),
        "one element at the start": (x, buf[1:2049]),
        "one element at the end": (x, buf[4095:6143]),
        "offset by one": (x, buf[2049:4097]),
    }


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(_overlapping_residuals(torch.float32)[1]))
def test_residual_overlapping_x_is_refused(case, dtype, backend):
    buf, cases = _overlapping_residuals(dtype)
    x, r = cases[case]
    before = buf.clone()
    with pytest.raises(ValueError, match="x and residual overlap in memory"):
        tc.encode(x, residual=r, block_size=256, backend=backend)
    assert torch.equal(buf, before)  # nothing was written


def test_residual_over_the_same_numpy_buffer_is_refused():
    # two storages over one buffer: only the address ranges tell that they overlap
    a = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    x, r = a[:2048], torch.from_numpy(a[1024:3072])
    assert torch.from_numpy(x).untyped_storage().data_ptr() != r.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="x and residual overlap in memory"):
        tc.encode(x, residual=r)
    with pytest.raises(ValueError, match="x and residual overlap in memory"):
        tc.encode(torch.from_numpy(a[1:2049]), residual=torch.from_numpy(a[:2048]))


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_disjoint_slices_of_one_buffer_are_allowed(backend):
    buf = torch.randn(6144)
    x, r = buf[2048:4096], buf[4096:]  # adjacent: x's last byte is just below r's first
    r.mul_(0.1)
    x2, r2 = x.clone(), r.clone()
    p = tc.encode(x, residual=r, block_size=256, backend=backend)
    q = tc.encode(x2, residual=r2, block_size=256, backend=backend)
    assert p == q and torch.equal(r, r2) and torch.equal(x, x2)
    tc.encode(buf[2048:4096], residual=buf[:2048], block_size=256, backend=backend)  # adjacent


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_outputs_over_an_input_are_refused(backend):
    """The preallocated forms: ``out`` in another dtype over the bytes of ``x``, ``residual``
    or ``body``."""
    from tritter_comm.codec import MODES, decode_body_into, encode_body_into

    n = 2048
    kw = dict(seed=1, stream=2, mode_id=MODES["ternary"], block_log2=8, backend=backend)
    size = tc.body_nbytes(n, block_size=256)
    buf = torch.randn(2 * n)
    x, e = buf[:n], buf[n:]
    before = buf.clone()
    with pytest.raises(ValueError, match="x and out overlap in memory"):
        encode_body_into(x, x.view(torch.uint8)[100 : 100 + size], **kw)
    with pytest.raises(ValueError, match="residual and out overlap in memory"):
        encode_body_into(x, e.view(torch.uint8)[8 : 8 + size], residual=e, **kw)
    with pytest.raises(ValueError, match="x and residual overlap in memory"):
        encode_body_into(x, torch.empty(size, dtype=torch.uint8), residual=buf[n - 1 : -1], **kw)
    assert torch.equal(buf, before)
    body = torch.empty(size, dtype=torch.uint8)
    encode_body_into(x, body, residual=e, **kw)  # disjoint: fine
    raw = torch.zeros(4 * n + size, dtype=torch.uint8)
    raw[:size] = body
    kept = raw.clone()
    with pytest.raises(ValueError, match="body and out overlap in memory"):
        decode_body_into(raw[:size], raw[size - 4 : size - 4 + 4 * n].view(torch.float32), **kw)
    with pytest.raises(ValueError, match="body and out overlap in memory"):
        decode_body_into(raw[:size], raw.view(torch.bfloat16)[:n], **kw)
    assert torch.equal(raw, kept)
    y = raw[size : size + 4 * n].view(torch.float32)  # just after the body: fine
    decode_body_into(raw[:size], y, **kw)
    assert torch.equal(y, tc.decode(tc.Payload(body, n=n, dtype=torch.float32, mode="ternary",
                                               block_size=256, seed=1, stream=2)))


def test_overlap_check_covers_strided_views():
    from tritter_comm.codec import _check_disjoint

    buf = torch.randn(256)
    every_tenth = buf[0:100:10]  # elements 0, 10, ..., 90
    _check_disjoint(("a", every_tenth), ("b", buf[91:]))
    with pytest.raises(ValueError, match="a and b overlap"):
        _check_disjoint(("a", every_tenth), ("b", buf[90:]))
    square = buf[:64].view(8, 8).t()  # its last element in memory is buf[63]
    _check_disjoint(("a", square), ("b", buf[64:]))
    with pytest.raises(ValueError, match="a and b overlap"):
        _check_disjoint(("a", square), ("b", buf[63:]))
    _check_disjoint(("a", buf[:0]), ("b", buf))  # nothing to overlap
    _check_disjoint(("a", buf[:10]), ("b", None))


# decode(payload, out=...): the same bits as the allocating form, into the caller's tensor.
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("mode", list(BOUNDS))
def test_decode_into_out_matches_the_allocating_form(mode, dtype, backend, device):
    if backend == "rust" and device != "cpu":
        pytest.skip("the rust backend takes CPU tensors")
    n = 3000  # two full blocks and a tail
    x = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    p = tc.encode(x, seed=11, stream=3, mode=mode, block_size=1024, backend=backend)
    want = tc.decode(p, backend=backend)
    out = torch.full((n,), float("nan"), dtype=dtype, device=device)
    got = tc.decode(p, out=out, backend=backend)
    assert got is out
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))  # bit for bit
    out.fill_(7.0)  # and again into a buffer holding other values
    tc.decode(p, out=out, backend=backend)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


def _bad_outs(n):
    """(name, out, what the error says) for a float32 payload of ``n`` elements on the CPU."""
    return [
        ("short", torch.zeros(n - 1), "1-D contiguous torch.float32 tensor of 3000 elements"),
        ("long", torch.zeros(n + 1), r"got shape \(3001,\)"),
        ("2-D", torch.zeros(2, n // 2), r"got shape \(2, 1500\)"),
        ("float64", torch.zeros(n, dtype=torch.float64), "got dtype torch.float64"),
        ("bfloat16", torch.zeros(n, dtype=torch.bfloat16), "the payload's dtype"),
        ("int32", torch.zeros(n, dtype=torch.int32), "got dtype torch.int32"),
        ("meta device", torch.zeros(n, device="meta"), "the payload's device.*got one on meta"),
        ("non-contiguous", torch.zeros(2 * n)[::2], "non-contiguous"),
        ("requires grad", torch.zeros(n, requires_grad=True), "must not require grad"),
        ("numpy", np.zeros(n, dtype=np.float32), "torch.from_numpy"),
    ]


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("case", [c[0] for c in _bad_outs(3000)])
def test_decode_into_a_bad_out_is_a_clear_error(case, backend):
    n = 3000
    p = tc.encode(torch.randn(n), block_size=1024, backend=backend)
    _, out, match = next(c for c in _bad_outs(n) if c[0] == case)
    before = out.copy() if isinstance(out, np.ndarray) else out.detach().clone()
    with pytest.raises(ValueError, match=match):
        tc.decode(p, out=out, backend=backend)
    if case == "meta device":
        return  # no data to compare
    if isinstance(out, np.ndarray):
        assert np.array_equal(out, before)
    else:
        assert torch.equal(out.detach(), before)  # nothing was written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_into_out_on_another_device_is_refused():
    p = tc.encode(torch.randn(3000))
    out = torch.zeros(3000, device="cuda")
    with pytest.raises(ValueError, match="the payload's device.*got one on cuda"):
        tc.decode(p, out=out)
    assert not out.any()


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_decode_into_out_over_the_body_is_refused(backend):
    n = 2048
    x = torch.randn(n)
    size = tc.body_nbytes(n, block_size=256)
    raw = torch.zeros(size + 4 * n, dtype=torch.uint8)
    raw[:size] = tc.encode(x, block_size=256, backend=backend).body
    p = tc.Payload(raw[:size], n=n, dtype=torch.float32, mode="ternary", block_size=256,
                   seed=0, stream=0)
    kept = raw.clone()
    for out in (raw[4 : 4 + 4 * n].view(torch.float32),  # over the scales
                raw[size - 4 : size - 4 + 4 * n].view(torch.float32)):  # one element on the end
        with pytest.raises(ValueError, match="body and out overlap in memory"):
            tc.decode(p, out=out, backend=backend)
    assert torch.equal(raw, kept)
    y = raw[size:].view(torch.float32)  # just after the body: fine
    assert tc.decode(p, out=y, backend=backend) is y
    assert torch.equal(y, tc.decode(p, backend=backend))


def test_corrupted_payloads_raise_value_error():
    good = tc.encode(torch.randn(1000), block_size=256).to_bytes()
    cases = {
        "short": good[:10],
        "magic": b"XXXX" + good[4:],
        "version": good[:4] + bytes([9]) + good[5:],
        "mode": good[:5] + bytes([7]) + good[6:],
        "dtype": good[:6] + bytes([9]) + good[7:],
        "block": good[:7] + bytes([30]) + good[8:],
        "truncated": good[:-1],
        "extended": good + b"\0",
        "length": good[:8] + (10**15).to_bytes(8, "little") + good[16:],
        "trit": good[:-1] + bytes([255]),
    }
    for name, b in cases.items():
        with pytest.raises(ValueError):
            tc.Payload.from_bytes(b)
        # the Rust decoder checks bodies too, for payloads built by hand
    p = tc.Payload.from_bytes(good)
    p.body[-1] = 250
    with pytest.raises(ValueError, match="corrupted"):
        tc.decode(p, backend="rust")
    p.body = p.body[:-1]
    with pytest.raises(ValueError, match="truncated|bytes"):
        tc.decode(p)


def test_random_bytes_never_crash():
    rng = np.random.default_rng(0)
    header = tc.encode(torch.randn(300), block_size=256).to_bytes()[:32]
    tried = 0
    for _ in range(2000):
        n = int(rng.integers(0, 200))
        body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        for blob in (body, header + body):
            tried += 1
            try:
                p = tc.Payload.from_bytes(blob)
                tc.decode(p)
            except ValueError:
                pass
    assert tried == 4000


def test_info_cli(capsys):
    from tritter_comm.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tritter-comm" in out and "rust kernels" in out and _native.simd_level() in out
    assert tc.__version__ in out
