"""Run by tests/test_triton_codec.py under TRITON_INTERPRET=1 (set before triton is imported):
the Triton kernels against the Rust codec, bit for bit, on CPU tensors. Prints one JSON line,
the cases of each job.

    python tests/_triton_check.py [--cuda] SECTION:BLOCK_LOG2S[:OPTIONS] ...
    python tests/_triton_check.py --compile ARCH

SECTION is ``encode`` (bodies and residuals), ``decode`` (outputs in every dtype),
``decode_sum`` (phase 2's sum of N bodies in rank order), ``nonfinite`` (NaN and Inf, against
the torch ops where the Rust encoder refuses them), ``poison`` (the exchange's CUDA encode on
NaN and Inf: the poisoned body, the residual untouched, decided on the device) or ``fallback``
(kernels that fail to build).
OPTIONS, comma-separated: ``plain`` runs the kernels' plain build (codes one byte each, packed
by the torch ops; butterflies for the levels) instead of the fast one; ``quick`` checks one
length; ``sparse`` one dtype for each block size and mode, in turn; ``words`` the fast build's
variants that hash the keys once a word and unpack the int2/sign codes from bytes loaded once
(``_triton_codec.tuning``), ``dot`` the fast build with the levels' transform as matrix
products (the default: butterflies). One process runs them all:
the imports cost seconds. ``--cuda`` runs the kernels on a GPU instead (without
TRITON_INTERPRET), against the same CPU references. ``--compile 90`` builds the kernels for
sm_90 with ``triton.compile`` (no GPU needed, nor the interpreter).
"""

import json
import os
import sys

import torch
import triton

from tritter_comm import _torch_codec as tc
from tritter_comm import _triton_codec as tt
from tritter_comm.codec import decode_body_into, decode_sum_into, encode_body_into

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bits of a float tensor as int64, every NaN as one value (the bits of a NaN are not
    specified: a GPU makes its canonical NaN where a CPU propagates an operand's)."""
    i = t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]).to(torch.int64)
    return torch.where(torch.isnan(t.float()), -1, i) if t.is_floating_point() else i


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _lengths(b: int) -> list[int]:
    # full blocks only; full blocks and a tail (T = next_pow2(77) = 128, 51 of it padding); a
    # tail of one element; a vector shorter than a block (the tail alone). QUICK: the second
    # (the interpreter is slow; the tests run every length at one block size).
    if QUICK:
        return [2 * b + 77]
    return [2 * b, 2 * b + 77, b + 1, 100]


QUICK = False
SPARSE = False
UNBIASED = False  # encode: int2 with the unbiased scale (the other modes refuse it)


def _dtypes(blog: int, mode: int) -> tuple:
    """Every dtype; SPARSE (on a GPU, where each case is a compilation): one, turn about (and
    the encoder with a residual only, the sum into float32 averaged and into that dtype)."""
    return (DTYPES[(blog + mode) % 3],) if SPARSE else DTYPES


def _vector(n: int, b: int, dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    x[5 % n] = 0.0  # a zero
    if n >= 2 * b:
        x[b: 2 * b] = 0.0  # a block of zeros: cnt = 0, scale 0 in ternary
    return x.to(dtype)


DEV = torch.device("cpu")  # where the kernels run: the interpreter's CPU, or "cuda" (--cuda)


def _on(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` on the kernels' device (the CPU references keep theirs)."""
    return t.clone().to(DEV)


def _kernel(fn):
    """Run ``fn`` with the kernels; True if it ran on them (one served call, nothing broken)."""
    os.environ["TRITTER_COMM_TRITON"] = "1"
    before = tt.launches
    fn()
    return tt.launches == before + 1


def check_encode(blogs):
    cases = []
    for blog in blogs:
        b = 1 << blog
        for mode in (2,) if UNBIASED else (0, 1, 2):
            for dtype in _dtypes(blog, mode):
                for res in (True,) if SPARSE else (False, True):
                    for n in _lengths(b):
                        seed = blog * 1000 + mode * 100 + n % 97
                        x = _vector(n, b, dtype, seed)
                        e = 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
                        if n >= 2 * b:
                            e[b: 2 * b] = 0.0  # so that u's block is all zeros too
                        e = e.to(dtype)
                        kw = dict(seed=11, stream=2**40 + n, mode_id=mode, block_log2=blog,
                                  **({"unbiased": True} if UNBIASED else {}))
                        size = tc.body_nbytes(n, mode, blog)
                        b1 = torch.empty(size, dtype=torch.uint8)
                        b2 = _on(torch.full((size,), 0xAB, dtype=torch.uint8))
                        e1, e2 = e.clone(), _on(e)
                        encode_body_into(x, b1, residual=e1 if res else None, backend="rust", **kw)
                        ran = _kernel(lambda: encode_body_into(
                            _on(x), b2, residual=e2 if res else None, backend="torch", **kw))
                        cases.append({"case": [blog, mode, str(dtype), res, n],
                                      "ok": ran and torch.equal(b1, b2.cpu())
                                      and _same(e1, e2.cpu())})
    return cases


def check_decode(blogs):
    cases = []
    for blog in blogs:
        b = 1 << blog
        for mode in (0, 1, 2):
            for n in _lengths(b):
                x = _vector(n, b, torch.float32, blog * 100 + mode * 10 + n % 89)
                kw = dict(seed=5, stream=3 + n, mode_id=mode, block_log2=blog)
                body = torch.empty(tc.body_nbytes(n, mode, blog), dtype=torch.uint8)
                encode_body_into(x, body, backend="rust", **kw)
                # at an odd offset in a larger buffer: the scales need not be 4-aligned
                buf = torch.zeros(body.numel() + 1, dtype=torch.uint8)
                buf[1:] = body
                buf = _on(buf)
                for dtype in _dtypes(blog, mode):
                    y1 = torch.empty(n, dtype=dtype)
                    y2 = _on(torch.full((n,), 7.0, dtype=dtype))
                    decode_body_into(body, y1, backend="rust", **kw)
                    ran = _kernel(lambda: decode_body_into(buf[1:], y2, backend="torch", **kw))
                    cases.append({"case": [blog, mode, str(dtype), n],
                                  "ok": ran and _same(y1, y2.cpu())})
                if n != 2 * b + 77:
                    continue
                # scales that put w * scale, for w = +-2^k, half-way between two bf16 (or
                # fp16) values, the lower one odd: rounding to nearest even (up here), not
                # half down or half up, is what matches
                nb = tc.block_sizes(n, blog)[1] + 1
                for dtype, scale in ((torch.bfloat16, 1 + 2**-7 + 2**-8),
                                     (torch.float16, 1 + 2**-10 + 2**-11)):
                    if dtype not in _dtypes(blog, mode):
                        continue
                    tie = body.clone()
                    tie[: 4 * nb].view(torch.float32).fill_(scale * 2**-6)
                    y1 = torch.empty(n, dtype=dtype)
                    y2 = _on(torch.empty(n, dtype=dtype))
                    decode_body_into(tie, y1, backend="rust", **kw)
                    ran = _kernel(lambda: decode_body_into(_on(tie), y2, backend="torch", **kw))
                    cases.append({"case": [blog, mode, str(dtype), n, "ties"],
                                  "ok": ran and _same(y1, y2.cpu())})
    return cases


def _bodies(nbodies: int, n: int, mode: int, blog: int, kw: dict, seed: int):
    """``nbodies`` Rust bodies of different vectors (one stream) in slots of the exchange's
    size (rounded up to 4 bytes), the bytes past each body garbage."""
    size = tc.body_nbytes(n, mode, blog)
    slot = -(-size // 4) * 4 + 4
    buf = torch.full((nbodies * slot,), 0xFF, dtype=torch.uint8)
    for j in range(nbodies):
        x = _vector(n, 1 << blog, torch.float32, seed + j, scale=1.0 + j)
        encode_body_into(x, buf[j * slot: j * slot + size], backend="rust", **kw)
    return buf, slot, size


def check_decode_sum(blogs):
    cases = []
    for blog in blogs:
        b = 1 << blog
        for mode in (0, 1, 2):
            for n in (2 * b + 77,) if QUICK else (2 * b + 77, 100):
                for nbodies in (3,) if QUICK else (1, 3):  # a plain decode, and a sum
                    kw = dict(seed=9, stream=2 * n + 1, mode_id=mode, block_log2=blog)
                    buf, slot, size = _bodies(nbodies, n, mode, blog, kw, blog + 10 * mode + n)
                    outs = ((torch.float32, False), (torch.float32, True),
                            (torch.bfloat16, False), (torch.float16, False))
                    if SPARSE:
                        outs = outs[1:2] + ((_dtypes(blog, mode)[0], False),)
                    for dtype, average in dict.fromkeys(outs):
                        # today's decode-then-sum, on the Rust decoder
                        ref = torch.empty(n, dtype=dtype)
                        tmp = torch.empty(n, dtype=dtype)
                        for j in range(nbodies):
                            decode_body_into(buf[j * slot: j * slot + size], ref if j == 0 else tmp,
                                             backend="rust", **kw)
                            if j:
                                ref += tmp
                        if average:
                            ref /= nbodies
                        got = _on(torch.full((n,), 7.0, dtype=dtype))
                        ran = _kernel(lambda: decode_sum_into(_on(buf), got, slot=slot,
                                                              average=average,
                                                              backend="torch", **kw))
                        # and the CPU form of the same function
                        cpu = torch.full((n,), 7.0, dtype=dtype)
                        decode_sum_into(buf, cpu, slot=slot, average=average, backend="rust",
                                        **kw)
                        cases.append({"case": [blog, mode, n, nbodies, str(dtype), average],
                                      "ok": ran and _same(ref, got.cpu()) and _same(ref, cpu)})
    return cases


def check_nonfinite(blogs):
    """NaN and Inf: the Rust encoder refuses them (``encode_body_into`` checks them first,
    on any backend); with the check off (``check_finite=False``, as the exchange runs a widened
    residual) the kernels give the torch ops' bytes and residual. Bodies with NaN or huge
    scales (the exchange's poisoned bodies) decode, and sum, as the Rust decoder does."""
    cases = []
    for blog in blogs:
        b = 1 << blog
        n = 2 * b + 77
        for mode in (0, 1, 2):
            for dtype in _dtypes(blog, mode):
                for bad in ("nan", "-inf", "huge"):
                    if bad == "huge" and dtype == torch.float16:
                        continue  # no f16 overflows f32 when spread
                    x = _vector(n, b, dtype, blog + mode + len(bad))
                    e = (0.3 * torch.randn(n, generator=torch.Generator().manual_seed(3))).to(
                        dtype)
                    # in a full block and in the tail; "huge" is finite, but two of it
                    # overflow f32 once spread
                    at = (7, 8, 2 * b + 50, 2 * b + 51) if bad == "huge" else (7, 2 * b + 50)
                    x[list(at)] = {"nan": float("nan"), "-inf": float("-inf"), "huge": 3e38}[bad]
                    kw = dict(seed=2, stream=5, mode=mode, block_log2=blog)
                    e1, e2 = e.clone(), _on(e)
                    os.environ["TRITTER_COMM_TRITON"] = "0"
                    b1 = tc.encode_body(x, residual=e1, **kw)
                    got = {}
                    ran = _kernel(lambda: got.update(body=tc.encode_body(_on(x), residual=e2,
                                                                         **kw)))
                    cases.append({"case": ["encode", blog, mode, str(dtype), bad],
                                  "ok": ran and _same(b1, got["body"].cpu())
                                  and _same(e1, e2.cpu())})
        for mode in (0, 1, 2):
            kw = dict(seed=9, stream=4, mode_id=mode, block_log2=blog)
            buf, slot, size = _bodies(3, n, mode, blog, kw, blog)
            nb = 3
            scales = buf[slot: slot + 4 * nb].view(torch.float32)
            scales[0] = float("nan")  # body 1: its first block NaN (a poisoned body is all NaN)
            scales[2] = float("inf")  # and its tail Inf
            big = buf[2 * slot: 2 * slot + 4 * nb].view(torch.float32)
            big[1] = 3e38  # body 2: a scale that overflows when the levels are summed
            for dtype in _dtypes(blog, mode):
                ref = torch.empty(n, dtype=dtype)
                tmp = torch.empty(n, dtype=dtype)
                ys = []
                for j in range(3):
                    y1 = torch.empty(n, dtype=dtype)
                    decode_body_into(buf[j * slot: j * slot + size], y1, backend="rust", **kw)
                    y2 = _on(torch.empty(n, dtype=dtype))
                    ran = _kernel(lambda: decode_body_into(_on(buf[j * slot: j * slot + size]),
                                                           y2, backend="torch", **kw))
                    ys.append(ran and _same(y1, y2.cpu()))
                    decode_body_into(buf[j * slot: j * slot + size], ref if j == 0 else tmp,
                                     backend="rust", **kw)
                    if j:
                        ref += tmp
                got = _on(torch.empty(n, dtype=dtype))
                ran = _kernel(lambda: decode_sum_into(_on(buf), got, slot=slot, backend="torch",
                                                      **kw))
                cases.append({"case": ["decode", blog, mode, str(dtype)],
                              "ok": all(ys) and ran and _same(ref, got.cpu()),
                              "nan": int(torch.isnan(got.float()).sum().cpu())})
    return cases


def check_poison(blogs):
    """The exchange's CUDA encode (``encode_body_or_poison_into``, issue 16): the kernel reads
    the device's non-finite flag and, on it, writes the poisoned body (NaN scales, zero codes:
    ``exchange._poison``'s bytes) and leaves the residual as it was; without NaN or Inf it gives
    the Rust bytes and residual. NaN in a full block, Inf in the tail, NaN in the residual."""
    from tritter_comm.codec import encode_body_or_poison_into
    from tritter_comm.exchange import _nblocks, _poison

    cases = []
    for blog in blogs:
        b = 1 << blog
        n = 2 * b + 77
        for mode in (0, 1, 2):
            for dtype in _dtypes(blog, mode):
                for bad in ("none", "x-nan", "x-inf-tail", "residual-nan"):
                    x = _vector(n, b, dtype, blog + mode)
                    e = (0.3 * torch.randn(n, generator=torch.Generator().manual_seed(4))).to(
                        dtype)
                    if bad == "x-nan":
                        x[b + 3] = float("nan")
                    elif bad == "x-inf-tail":
                        x[2 * b + 50] = float("inf")
                    elif bad == "residual-nan":
                        e[5] = float("nan")
                    kw = dict(seed=2, stream=5, mode_id=mode, block_log2=blog)
                    size = tc.body_nbytes(n, mode, blog)
                    e1 = e.clone()
                    if bad == "none":
                        b1 = torch.empty(size, dtype=torch.uint8)
                        encode_body_into(x, b1, residual=e1, backend="rust", **kw)
                    else:
                        b1 = torch.zeros(size, dtype=torch.uint8)
                        _poison(b1, _nblocks(n, blog))
                    b2 = _on(torch.full((size,), 0xAB, dtype=torch.uint8))
                    e2 = _on(e)
                    got = {}
                    ran = _kernel(lambda: got.update(flag=encode_body_or_poison_into(
                        _on(x), b2, residual=e2, **kw)))
                    cases.append({"case": [blog, mode, str(dtype), bad],
                                  "ok": ran and torch.equal(b1, b2.cpu()) and _same(e1, e2.cpu())
                                  and int(got["flag"].cpu()) == (bad != "none")})
    return cases


class _Failing:
    """A kernel whose launches fail to build where ``when(constexprs)`` says so."""

    def __init__(self, real, when):
        self.real, self.when = real, when

    def __getitem__(self, grid):
        def launch(*args, **kw):
            if self.when(kw):
                raise RuntimeError("injected: the compiler cannot build this")
            return self.real[grid](*args, **kw)
        return launch


def check_fallback(blogs):
    """A kernel that fails to build: logged once, then the plain build or the torch ops, with
    the same bytes, residual and sums; where the full blocks ran but the tail cannot, the torch
    ops encode the tail alone (the full blocks' residual is not updated twice). And
    ``TRITTER_COMM_TRITON=0``: the torch ops alone."""
    import logging

    warnings = []

    class _H(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("tritter_comm._triton_codec").addHandler(_H())
    enc, dec = tt._encode_kernel, tt._decode_kernel
    # the decoder's fast build with the products, so that it differs from its plain build (by
    # default both run the butterflies)
    dot = tt.tuning["decode"]["dot"]
    tt.tuning["decode"]["dot"] = True
    failures = {
        "fast": lambda kw: kw.get("PACK") or kw["DOT"],  # the plain build runs
        "tail": lambda kw: kw["TAIL"],  # full blocks on the kernels, the tail on the torch ops
        "all": lambda kw: True,  # the torch ops alone
        "off": None,  # TRITTER_COMM_TRITON=0
    }
    cases = []
    for what, when in failures.items():
        tt._broken.clear()
        warnings.clear()
        if when is not None:
            tt._encode_kernel, tt._decode_kernel = _Failing(enc, when), _Failing(dec, when)
        for blog in blogs:
            b = 1 << blog
            n = 2 * b + 77
            for mode in (0, 2):
                for rep in range(2):  # the second time: no new warning
                    kw = dict(seed=4, stream=6, mode_id=mode, block_log2=blog)
                    x = _vector(n, b, torch.bfloat16, mode)
                    e = (0.3 * torch.randn(n, generator=torch.Generator().manual_seed(1))).to(
                        torch.bfloat16)
                    size = tc.body_nbytes(n, mode, blog)
                    b1, b2 = torch.empty(size, dtype=torch.uint8), _on(torch.empty(
                        size, dtype=torch.uint8))
                    e1, e2 = e.clone(), _on(e)
                    encode_body_into(x, b1, residual=e1, backend="rust", **kw)
                    os.environ["TRITTER_COMM_TRITON"] = "0" if what == "off" else "1"
                    before = tt.launches
                    encode_body_into(_on(x), b2, residual=e2, backend="torch", **kw)
                    buf, slot, bsize = _bodies(3, n, mode, blog, kw, mode)
                    ref, tmp = torch.empty(n), torch.empty(n)
                    for j in range(3):
                        decode_body_into(buf[j * slot: j * slot + bsize], ref if j == 0 else tmp,
                                         backend="rust", **kw)
                        if j:
                            ref += tmp
                    got = _on(torch.empty(n))
                    decode_sum_into(_on(buf), got, slot=slot, backend="torch", **kw)
                    served = tt.launches - before
                    cases.append({
                        "case": [what, blog, mode, rep],
                        "ok": torch.equal(b1, b2.cpu()) and _same(e1, e2.cpu())
                        and _same(ref, got.cpu())
                        and served == (2 if what == "fast" else 0),
                        "warnings": len(warnings),
                    })
        tt._encode_kernel, tt._decode_kernel = enc, dec
        cases.append({"case": [what, "broken"], "ok": True,
                      "broken": sorted(f"{k[0]} {k[1]} {'tail' if k[5] else 'full'}"
                                       for k in tt._broken)})
    tt._broken.clear()
    tt.tuning["decode"]["dot"] = dot
    return cases


def compile_for(arch: int) -> list:
    """Build each kernel's fast build (``tl.gather``, ``tl.dot``) for a GPU of compute
    capability ``arch`` (90: H100, H200) with ``triton.compile``, which needs no GPU: what the
    interpreter cannot check (shapes and layouts, registers; the plain build is the structure
    that ran on an H200), with the launcher's constexprs and warps, at the largest block and
    in a tail. Run without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def source(fn, pointers: dict, consts: dict):
        names = fn.arg_names
        sig = {a: pointers.get(a, "i32") for a in names}
        sig.update({a: "constexpr" for a in consts})
        return ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})

    cases = []
    for blog, mode, dt, tail, dot, words in ((12, 0, "bf16", False, False, False),
                                             (8, 2, "fp16", True, False, False),
                                             (10, 2, "fp32", False, True, True)):
        shape = tt._shape(blog, mode)
        p = tt._next_pow2(-(-shape["L"] // tt._PER_BYTE[mode]))
        for kind, fn, pointers, consts in (
            ("encode", tt._encode_kernel,
             {"x_ptr": f"*{dt}", "e_ptr": f"*{dt}", "out_ptr": "*u8", "codes_ptr": "*u8",
              "flag_ptr": "*u8"},
             # with the device's non-finite flag, as the exchange runs it (issue 16)
             dict(HAS_RES=True, HAS_FLAG=True, TAIL=tail, PACK=True, DOT=dot, P=p, KEYW=words,
                  **shape)),
            ("decode", tt._decode_kernel, {"body_ptr": "*u8", "out_ptr": f"*{dt}"},
             dict(TAIL=tail, DOT=dot, AVERAGE=dt == "fp32", KEYW=words, UNPK=words, **shape)),
        ):
            try:
                src = source(fn, pointers, consts)
            except (TypeError, AttributeError) as err:  # another triton's internal API
                return [{"case": [kind], "ok": False, "unsupported": repr(err)}]
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"enable_fp_fusion": False,
                                        "num_warps": tt._num_warps(kind, shape["L"])})
            cases.append({"case": [kind, shape["L"], mode, dt, tail, dot, words],
                          "ok": bool(k.asm.get("cubin"))})
    return cases


def main() -> None:
    global QUICK, SPARSE, UNBIASED, DEV
    jobs = sys.argv[1:]
    if jobs and jobs[0] == "--compile":  # for a GPU, without one: python ... --compile 90
        print(json.dumps({"cases": compile_for(int(jobs[1]))}))
        return
    if jobs and jobs[0] == "--cuda":  # on a GPU, without the interpreter
        DEV, jobs = torch.device("cuda"), jobs[1:]
    out = {}
    for job in jobs:
        section, blogs, *opts = job.split(":")
        opts = opts[0].split(",") if opts else []
        tt._BUILDS = ("plain",) if "plain" in opts else ("fast", "plain")
        for kernel in ("encode", "decode"):
            tt.tuning[kernel].update(key_words="words" in opts, dot="dot" in opts)
        tt.tuning["decode"]["unpack_bytes"] = "words" in opts
        QUICK = "quick" in opts
        SPARSE = "sparse" in opts
        UNBIASED = "unbiased" in opts
        tt._broken.clear()
        cases = globals()[f"check_{section}"]([int(v) for v in blogs.split(",")])
        out[job] = {"cases": cases, "broken": {str(k): v for k, v in tt._broken.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
