"""DDP communication hook: the two-phase compressed all-reduce with error feedback.

    ddp_model.register_comm_hook(VSAState(), vsa_hook)

DDP calls the hook once per bucket, in bucket order, on every rank. The hook issues every
collective from that call, never from a future callback (PyTorch's PowerSGD hook does, and hangs
on gloo with two or more buckets): bucket i's ``all_to_all`` is launched in hook(i), and its
averaging and ``all_gather`` run in hook(i+1), after bucket i+1's ``all_to_all`` is launched, so
the exchange of one bucket overlaps the backward pass of the next. The last bucket's hook
drains what is left. Decoding the gathered bytes happens in the ``all_gather``'s callback.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at run time.

import logging
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import _native
from ..codec import DEFAULT_BLOCK_SIZE, MODES, _block_log2, _mode_id, _u64
from ..exchange import MAX_BUCKETS, MAX_WORLD, Exchange, Plan, Timers
from . import _auto

logger = logging.getLogger(__name__)

__all__ = ["VSAState", "vsa_hook"]

_STATE_VERSION = 1
# Config fields every rank must agree on, in the order they are compared.
_CONFIG_FIELDS = ("format_version", "package_version", "mode", "block_log2", "seed_lo", "seed_hi",
                  "start_iter", "min_compress_numel", "error_feedback", "server_error_feedback",
                  "fixed_keys", "auto", "phase2_mode")
_CONFIG_ROW_LEN = 32


_RESIDUAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _version_number() -> int:
    """tritter-comm's version as one integer (1.2.3 -> 1002003), compared across ranks."""
    parts = (_native.__version__.split("+")[0].split(".") + ["0", "0"])[:3]
    return sum(int("".join(c for c in p if c.isdigit()) or 0) * 1000**i
               for i, p in enumerate(reversed(parts)))


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _flag(name: str, value: Any) -> bool:
    """A boolean option: a bool, 0 or 1, or (from a config file or spec) true/false, yes/no,
    on/off. Anything else is an error, not truthiness: the string "false" must not mean True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be True or False, got {value!r}")


class VSAState:
    """State of :func:`vsa_hook`: configuration, error-feedback residuals and statistics.

    Args:
        process_group: the group to reduce over (default: the default group).
        mode: the quantization of every rank's chunks in phase 1, and of the owners' averages
            in phase 2 unless ``phase2_mode`` says otherwise: ``"int2"`` (2 bits an element,
            the default: 15.7x fewer bytes than fp32), ``"ternary"`` (1.6 bits, 19.6x) or
            ``"sign"`` (1 bit, 31x). The default is the mode that kept the eval-loss gap under
            2% on both workloads of benchmarks/convergence.py (300 steps, 3 seeds, gap to
            uncompressed DDP, server error feedback on): int2 transformer +1.47%, digits
            -0.25%; ternary +2.89% / -0.26%; ternary then int2 +2.23% / -0.25% (17.4x).
        phase2_mode: the quantization of phase 2, where each chunk's owner re-encodes the
            average it computed and every rank decodes it (default: ``mode``). Each phase's
            quantization adds its own error, so each phase's precision is a knob:
            ``mode="ternary", phase2_mode="int2"`` sends 1.83 bits an element (17.4x).
        block_size: Hadamard block size, a power of two from 256 to 65536 (default 1024).
        seed: shared seed of the keys; every rank must pass the same.
        start_iter: iterations of plain all-reduce before compression starts. DDP rebuilds its
            buckets after the first iteration, so residuals keyed by bucket index can start no
            earlier than iteration 2. The default, 100, comes from benchmarks/convergence.py
            (transformer, AdamW, 300 steps, 3 seeds, eval-loss gap to uncompressed): ternary
            +16.9% from iteration 10, +5.7% from 50, +2.9% from 100; int2 +9.0% / +3.3% /
            +1.6%. Early gradients change fast and error feedback returns what it holds a step
            late; once Adam's moments settle, compression costs little.
        min_compress_numel: buckets smaller than this are all-reduced uncompressed: their
            exchange costs latency, not bandwidth, and the per-chunk block padding would eat
            the saving. Default 65536 elements (256 KiB of fp32).
        error_feedback: keep a per-bucket residual of what quantization dropped and send it in
            later steps (on by default; without it ternary training lags).
        server_error_feedback: keep the owner's residual of its re-encoding (phase 2) and add
            it to the next step's average (on by default). It pulls the two workloads apart
            (300 steps, 3 seeds, gap on / off): transformer int2 +1.47% / +1.25%, ternary
            +2.89% / +2.06%, ternary then int2 +2.23% / +1.66%; digits int2 -0.25% / +1.51%,
            ternary -0.26% / +2.35%, ternary then int2 -0.25% / +1.77%. Fed back, phase 2's
            error arrives a step late (early in training that costs); dropped, it is never
            made good (near convergence that costs). On bounds the error over long runs.
        fixed_keys: use the same keys every step (stream = bucket and chunk only) instead of
            fresh keys each step. Measured the same (ternary +2.83% fixed, +2.85% fresh).
        auto: measure, in the first compressed steps and every 1000 steps after, what a plain
            all-reduce and the compressed exchange of each bucket cost on this link, and
            compress only the buckets where it is faster; every rank makes the same choice.
            ``stats()["auto"]`` reports it. See ``tritter_comm/hooks/_auto.py``.
        residual_dtype: ``"float32"`` or ``"bfloat16"``. The client residuals take as much
            memory as the fp32 gradients they shadow (plus 1/N of that for the server's);
            bfloat16 halves it, at the cost of rounding what is carried to the next step.
            Ranks may differ here.
    """

    __slots__ = (
        # hyperparameters
        "process_group",
        "mode",
        "phase2_mode",
        "block_size",
        "seed",
        "start_iter",
        "min_compress_numel",
        "error_feedback",
        "server_error_feedback",
        "fixed_keys",
        "auto",
        "residual_dtype",
        # flags
        "_config_checked",
        # internal state
        "iter",
        "residuals",
        "server_residuals",
        "_pending",
        "_timers",
        "_bytes_sent",
        "_bytes_uncompressed",
        "_steps",
        "_buckets_compressed",
        "_buckets_plain",
        "_layout",
        "_saved_layout",
        "_param_ids",
        "_auto",
        "_fsdp",
    )

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        mode: str = "int2",
        block_size: Optional[int] = None,
        seed: int = 0,
        start_iter: int = 100,
        min_compress_numel: int = 65536,
        error_feedback: bool = True,
        server_error_feedback: bool = True,
        fixed_keys: bool = False,
        auto: bool = False,
        residual_dtype: str = "float32",
        phase2_mode: Optional[str] = None,
    ):
        _mode_id(mode)
        if phase2_mode is not None:
            try:
                _mode_id(phase2_mode)
            except ValueError as e:
                raise ValueError(f"phase2_mode: {e}") from None
        phase2_mode = mode if phase2_mode is None else phase2_mode
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        _block_log2(block_size)
        _u64("seed", seed)
        if not isinstance(start_iter, int) or start_iter < 2:
            raise ValueError(
                f"start_iter must be an int >= 2 (DDP rebuilds its buckets after the first "
                f"iteration, and residuals are keyed by bucket), got {start_iter!r}"
            )
        if not isinstance(min_compress_numel, int) or min_compress_numel < 1:
            raise ValueError(f"min_compress_numel must be a positive int, got {min_compress_numel!r}")
        self.process_group = process_group
        self.mode = mode
        self.phase2_mode = phase2_mode
        self.block_size = block_size
        self.seed = seed
        self.start_iter = start_iter
        self.min_compress_numel = min_compress_numel
        self.error_feedback = _flag("error_feedback", error_feedback)
        self.server_error_feedback = _flag("server_error_feedback", server_error_feedback)
        self.fixed_keys = _flag("fixed_keys", fixed_keys)
        if residual_dtype not in _RESIDUAL_DTYPES:
            raise ValueError(
                f"residual_dtype must be one of {sorted(_RESIDUAL_DTYPES)}, got {residual_dtype!r}"
            )
        self.residual_dtype = residual_dtype
        self.auto = _flag("auto", auto)
        self._auto = _auto.AutoChoice() if self.auto else None
        self._config_checked = False
        self.iter = 0
        self.residuals: dict[int, torch.Tensor] = {}
        self.server_residuals: dict[int, torch.Tensor] = {}
        self._pending: list[tuple[Exchange, Any]] = []
        self._timers = Timers()
        self._bytes_sent = 0
        self._bytes_uncompressed = 0
        self._steps = 0
        self._buckets_compressed = 0
        self._buckets_plain = 0
        # Bucket index -> ids of its parameters, to map residuals onto DDP's initial buckets
        # when a job resumes. A parameter's id is its position in the order DDP's buckets
        # first list the parameters in a process: the same in every process of the same job.
        self._layout: dict[int, tuple[int, ...]] = {}
        self._saved_layout: Optional[dict[int, tuple[int, ...]]] = None
        self._param_ids: dict[int, int] = {}
        # The FSDP hooks' per-backward bookkeeping (tritter_comm/hooks/fsdp.py): None until used.
        self._fsdp = None

    # -- configuration -----------------------------------------------------------------------

    def config(self) -> dict:
        return {
            "mode": self.mode,
            "block_size": self.block_size,
            "seed": self.seed,
            "start_iter": self.start_iter,
            "min_compress_numel": self.min_compress_numel,
            "error_feedback": self.error_feedback,
            "server_error_feedback": self.server_error_feedback,
            "fixed_keys": self.fixed_keys,
            "auto": self.auto,
            "residual_dtype": self.residual_dtype,
            "phase2_mode": self.phase2_mode,
        }

    def _config_row(self) -> list[int]:
        row = [_native.FORMAT_VERSION, _version_number(), MODES[self.mode],
               _block_log2(self.block_size),
               self.seed & 0x7FFFFFFF_FFFFFFFF, self.seed >> 63, self.start_iter,
               self.min_compress_numel, int(self.error_feedback),
               int(self.server_error_feedback), int(self.fixed_keys), int(self.auto),
               MODES[self.phase2_mode]]
        # A fixed length, so that versions with more fields still gather rows of one size and
        # fail with the message below (package_version differs), not in the collective.
        return row + [0] * (_CONFIG_ROW_LEN - len(row))

    def _check_config(self, device: torch.device) -> None:
        """All ranks compare their configuration; a difference fails on every rank."""
        world = dist.get_world_size(self.process_group)
        mine = torch.tensor(self._config_row(), dtype=torch.int64, device=device)
        rows = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(rows, mine, group=self.process_group)
        rows = rows.view(world, -1).cpu().tolist()
        diffs = [
            f"{name}: " + ", ".join(f"rank {r}={row[i]}" for r, row in enumerate(rows))
            for i, name in enumerate(_CONFIG_FIELDS)
            if len({row[i] for row in rows}) > 1
        ]
        if diffs:
            raise RuntimeError(
                "tritter-comm: ranks were configured differently; every rank must create "
                "VSAState with the same settings and the same tritter-comm version. Differences: "
                + "; ".join(diffs)
            )
        self._config_checked = True

    # -- statistics and checkpoints ----------------------------------------------------------

    def stats(self) -> dict:
        """Counters since creation (or the last ``load_state_dict``), per rank.

        ``bytes_sent``: bytes this rank handed to collectives for other ranks (ring formula
        for all-reduce); ``bytes_uncompressed``: what fp32 ring all-reduce of the same buckets
        would send.
        """
        return {
            "steps": self._steps,
            "iter": self.iter,
            "bytes_sent": self._bytes_sent,
            "bytes_uncompressed": self._bytes_uncompressed,
            "compression_ratio": (self._bytes_uncompressed / self._bytes_sent
                                  if self._bytes_sent else 1.0),
            "buckets_compressed": self._buckets_compressed,
            "buckets_uncompressed": self._buckets_plain,
            "encode_seconds": self._timers.encode_seconds,
            "decode_seconds": self._timers.decode_seconds,
            **(_auto.stats(self) if self.auto else {}),
        }

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return -1, -1

    def state_dict(self) -> dict:
        """Everything needed to resume exactly; loadable with ``torch.load(weights_only=True)``.

        Residuals differ from rank to rank: every rank saves its own state dict (e.g. to
        ``hook_state_rank{rank}.pt``) and loads it back on the same rank.
        """
        rank, world = self._rank_world()
        return {
            "version": _STATE_VERSION,
            "rank": rank,
            "world_size": world,
            "config": self.config(),
            "iter": self.iter,
            "residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()},
            "server_residuals": {k: v.detach().cpu().clone()
                                 for k, v in self.server_residuals.items()},
            "layout": {k: list(v) for k, v in self._layout.items()},
            "auto": self._auto.state_dict() if self.auto else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a VSAState state dict of version {_STATE_VERSION}: "
                f"got version {state.get('version') if isinstance(state, dict) else state!r}"
            )
        # checkpoints from before `auto` and `residual_dtype` existed
        saved = {"auto": False, "residual_dtype": "float32", **state["config"]}
        saved.setdefault("phase2_mode", saved.get("mode"))  # one mode for both phases then
        diff = {k: (v, saved.get(k)) for k, v in self.config().items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                "checkpoint was saved with a different configuration "
                + ", ".join(f"{k}: this state {a!r}, checkpoint {b!r}" for k, (a, b) in diff.items())
            )
        rank, world = self._rank_world()
        if rank >= 0 and state.get("rank", -1) >= 0 and (state["rank"], state["world_size"]) != (
            rank, world
        ):
            raise ValueError(
                f"this hook state was saved by rank {state['rank']} of {state['world_size']}, "
                f"and is being loaded on rank {rank} of {world}: residuals are per rank, so "
                "every rank must save and load its own state dict"
            )
        self.iter = int(state["iter"])
        self.residuals = {int(k): v.clone() for k, v in state["residuals"].items()}
        self.server_residuals = {int(k): v.clone() for k, v in state["server_residuals"].items()}
        self._layout = {int(k): tuple(int(n) for n in v) for k, v in state["layout"].items()}
        # DDP starts a new process with its initial buckets and rebuilds them after the first
        # iteration; until then, buckets are split along the saved layout (see _segments).
        self._saved_layout = dict(self._layout)
        self._pending = []
        if self.auto:
            self._auto.load_state_dict(state.get("auto"))
        self._fsdp = None

    def __getstate__(self):
        # The process group cannot be pickled; the unpickled state uses the default group.
        return {"config": self.config(), "state": self.state_dict()}

    def __setstate__(self, d):
        self.__init__(None, **d["config"])
        self.load_state_dict(d["state"])

    # -- residuals ---------------------------------------------------------------------------

    def _residual(self, store: dict, key: int, n: int, device) -> Optional[torch.Tensor]:
        r = store.get(key)
        if r is None or r.numel() != n:
            if r is not None:
                # The bucket layout changed (e.g. a resumed job before DDP's rebuild).
                logger.info("bucket %d changed size (%d -> %d): residual reset", key,
                            r.numel(), n)
            r = torch.zeros(n, dtype=_RESIDUAL_DTYPES[self.residual_dtype], device=device)
            store[key] = r
        elif r.device != device:
            r = r.to(device)
            store[key] = r
        return r


def _world(state: VSAState) -> int:
    return dist.get_world_size(state.process_group)


def _future(device: torch.device) -> torch.futures.Future:
    """A future for a result computed on ``device``. On CUDA it is CUDA-aware: ``set_result``
    records an event on the stream that computed the value (a callback's pool stream), and
    whoever waits (DDP's reducer) waits for it; a plain future would let DDP read the bucket
    before the decode wrote it (seen as replicas drifting apart on a GPU)."""
    if device.type == "cuda":
        return torch.futures.Future(devices=[device])
    return torch.futures.Future()


def _done(value: torch.Tensor) -> torch.futures.Future:
    fut = _future(value.device)
    fut.set_result(value)
    return fut


def _allreduce(state: VSAState, t: torch.Tensor, world: int) -> torch.futures.Future:
    state._bytes_sent += 2 * (world - 1) * t.numel() * t.element_size() // world
    state._buckets_plain += 1
    fut = dist.all_reduce(t, group=state.process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(world))


def _param_ids(state: VSAState, bucket: dist.GradBucket) -> tuple[int, ...]:
    ids = state._param_ids
    for p in bucket.parameters():
        ids.setdefault(id(p), len(ids))
    return tuple(ids[id(p)] for p in bucket.parameters())


def _segments(state: VSAState, bucket: dist.GradBucket):
    """The exchanges of a bucket: ``[(key, index)]``, ``index`` None for the whole bucket.

    A resumed process sees DDP's initial buckets in its first iteration, not the rebuilt ones
    the residuals were saved for. Each saved bucket whose parameters all lie in this bucket is
    gathered (``index``, element positions in this bucket) and exchanged with its own key and
    residuals, exactly as the uninterrupted job would.
    """
    idx = bucket.index()
    pids = _param_ids(state, bucket)
    saved = state._saved_layout
    if saved is not None and saved.get(idx) != pids:
        where, off = {}, 0
        for pid, p in zip(pids, bucket.parameters()):
            where[pid] = (off, off + p.numel())
            off += p.numel()
        segs = [
            (k, torch.cat([torch.arange(*where[pid]) for pid in saved[k]]))
            for k in sorted(saved)
            if saved[k] and all(pid in where for pid in saved[k])
        ]
        if sum(i.numel() for _, i in segs) == off:
            return segs
        logger.info("bucket %d does not match the saved layout; its residuals restart", idx)
    state._layout[idx] = pids
    return [(idx, None)]


def _start_exchange(state: VSAState, x: torch.Tensor, key: int, world: int):
    if key >= MAX_BUCKETS or world > MAX_WORLD:
        raise ValueError(f"tritter-comm supports {MAX_BUCKETS} buckets and {MAX_WORLD} ranks")
    rank = dist.get_rank(state.process_group)
    plan = Plan.make(x.numel(), world, _block_log2(state.block_size), MODES[state.mode],
                     MODES[state.phase2_mode])
    ex = Exchange(plan, rank=rank, group=state.process_group, seed=state.seed,
                  step=state.iter, key=key, timers=state._timers, fixed_keys=state.fixed_keys)
    res = (state._residual(state.residuals, key, x.numel(), x.device)
           if state.error_feedback else None)
    ex.start(x, res)
    state._bytes_sent += plan.wire_bytes
    state._buckets_compressed += 1
    fut = _future(x.device)
    state._pending.append((ex, fut, x, key))
    return fut


def _start_compressed(state: VSAState, bucket: dist.GradBucket, world: int):
    t = bucket.buffer()
    segs = _segments(state, bucket)
    x = t if t.dtype == torch.float32 else t.float()
    if segs[0][1] is None:
        fut = _start_exchange(state, x, segs[0][0], world)
        return fut if x is t else fut.then(lambda _: t.copy_(x))
    # resuming: exchange each saved bucket gathered from this one, then scatter back
    parts = [(i.to(x.device), x[i.to(x.device)]) for _, i in segs]
    futs = [
        _allreduce(state, xs, world) if xs.numel() < state.min_compress_numel
        else _start_exchange(state, xs, key, world)
        for (key, _), (_, xs) in zip(segs, parts)
    ]

    def scatter(_):
        for i, xs in parts:
            x[i] = xs
        return t.copy_(x) if x is not t else t

    return torch.futures.collect_all(futs).then(scatter)


def _reduce_pending(state: VSAState, keep_last: bool) -> None:
    """Run phase 2 of the pending exchanges in order (all but the newest if ``keep_last``)."""
    while len(state._pending) > (1 if keep_last else 0):
        ex, fut, x, key = state._pending.pop(0)
        lo, hi = ex.plan.bounds(ex.rank)
        sres = (state._residual(state.server_residuals, key, hi - lo, x.device)
                if state.server_error_feedback and hi > lo else None)
        ex.reduce(sres)

        def finish(f, ex=ex, fut=fut, x=x):
            try:
                f.wait()
                fut.set_result(ex.finish(x))
            except Exception as e:  # surface it to DDP's wait instead of hanging
                fut.set_exception(e)

        ex.gather_future().then(finish)


def vsa_hook(state: VSAState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: compressed two-phase all-reduce of ``bucket``, averaged like DDP's."""
    t = bucket.buffer()
    world = _world(state)
    state._bytes_uncompressed += 2 * (world - 1) * t.numel() * 4 // world
    last = bucket.is_last()
    if not state._layout or state._saved_layout is not None:
        _param_ids(state, bucket)  # number the parameters in the first iteration
    try:
        if world == 1:
            fut = _done(t)
        elif (state.iter < state.start_iter or not t.is_floating_point()
              or t.numel() < state.min_compress_numel):
            fut = _allreduce(state, t, world)
        else:
            if not state._config_checked:
                state._check_config(t.device)
            t0 = time.perf_counter()
            fut = _auto.exchange(state, bucket, world) if state.auto else None
            if fut is None:  # compressed (auto: a probe step or a plain bucket returns its own)
                fut = _start_compressed(state, bucket, world)
                _reduce_pending(state, keep_last=not last)
            logger.debug("bucket %d: hook %.1f ms", bucket.index(),
                         1e3 * (time.perf_counter() - t0))
        if last:
            _reduce_pending(state, keep_last=False)
            if state.auto and world > 1:
                _auto.end_step(state, bucket.index() + 1, t.device)  # collective: hook call only
    finally:
        if last:
            state.iter += 1
            state._steps += 1
            state._saved_layout = None  # DDP has rebuilt its buckets by the next iteration
    return fut
