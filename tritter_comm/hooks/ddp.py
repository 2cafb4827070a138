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

import datetime
import logging
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import _native
from ..codec import DEFAULT_BLOCK_SIZE, MODES, block_log2, mode_id, u64
from ..exchange import MAX_BUCKETS, MAX_WORLD, Exchange, Plan, Timers
from . import _auto
from .. import _teardown

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


def _config_values(row: list[int]) -> dict[str, Any]:
    """A config row read back as the options a user passed (names and values)."""
    v = dict(zip(_CONFIG_FIELDS, row))
    names = {i: m for m, i in MODES.items()}
    return {
        "format_version": v["format_version"],
        "package_version": v["package_version"],
        "mode": names.get(v["mode"], v["mode"]),
        "phase2_mode": names.get(v["phase2_mode"], v["phase2_mode"]),
        "block_size": 1 << v["block_log2"],
        "seed": v["seed_lo"] | (v["seed_hi"] << 63),
        **{k: v[k] for k in ("start_iter", "min_compress_numel")},
        **{k: bool(v[k]) for k in ("error_feedback", "server_error_feedback", "fixed_keys",
                                   "auto")},
    }


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
        "_calls",
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
        "__weakref__",  # tritter_comm.shutdown() and the exit handler track states weakly
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
        mode_id(mode)
        if phase2_mode is not None:
            try:
                mode_id(phase2_mode)
            except ValueError as e:
                raise ValueError(f"phase2_mode: {e}") from None
        phase2_mode = mode if phase2_mode is None else phase2_mode
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        block_log2(block_size)
        u64("seed", seed)
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
        # the groups whose ranks were found to agree on the configuration (by id)
        self._config_checked: set[Optional[int]] = set()
        self.iter = 0
        self.residuals: dict[int, torch.Tensor] = {}
        self.server_residuals: dict[int, torch.Tensor] = {}
        # buckets whose exchange is in flight, oldest first, and hook calls in this iteration
        self._pending: list = []
        self._calls = 0
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
        _teardown.track(self)

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
               block_log2(self.block_size),
               self.seed & 0x7FFFFFFF_FFFFFFFF, self.seed >> 63, self.start_iter,
               self.min_compress_numel, int(self.error_feedback),
               int(self.server_error_feedback), int(self.fixed_keys), int(self.auto),
               MODES[self.phase2_mode]]
        # A fixed length, so that versions with more fields still gather rows of one size and
        # fail with the message below (package_version differs), not in the collective.
        return row + [0] * (_CONFIG_ROW_LEN - len(row))

    def _check_config(self, device: torch.device, group: Any = None) -> None:
        """All ranks of ``group`` compare their configuration, once per group, before the
        first exchange branches on it; a difference raises ``ValueError`` on every rank."""
        gid = None if group is None else id(group)
        if gid in self._config_checked:
            return
        world = dist.get_world_size(group)
        mine = torch.tensor(self._config_row(), dtype=torch.int64, device=device)
        rows = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(rows, mine, group=group)
        values = [_config_values(row) for row in rows.view(world, -1).cpu().tolist()]
        diffs = [
            f"{name}: " + ", ".join(f"rank {r}={v[name]!r}" for r, v in enumerate(values))
            for name in values[0]
            if len({v[name] for v in values}) > 1
        ]
        if diffs:
            raise ValueError(
                "tritter-comm: ranks were configured differently; every rank must create "
                "VSAState with the same settings and the same tritter-comm version. Differences: "
                + "; ".join(diffs)
            )
        self._config_checked.add(gid)

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Let go of every exchange in flight: wait a bounded time for its collectives, fail
        its future, drop its buffers. Idempotent; the state stays usable (a later step starts
        afresh). ``tritter_comm.shutdown()`` calls it for every state in the process."""
        self._release(None)

    def _release(self, error: Optional[BaseException]) -> None:
        pending, self._pending = self._pending, []
        for entry in pending:
            for op in entry.ops:
                op.release(RELEASE_TIMEOUT)
            if not entry.fut.done():
                entry.fut.set_exception(
                    error if isinstance(error, Exception)
                    else RuntimeError("tritter-comm: the hook state was closed with this "
                                      "bucket's exchange in flight"))
        self._calls = 0

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
        self._release(None)
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


# -- exchanges in flight -----------------------------------------------------------------------
#
# No Python of ours runs on a backend's thread (DESIGN.md, "Threads, streams and teardown"):
# gloo and NCCL complete their futures on their own worker threads, and a callback there that
# holds Python objects can outlive the interpreter, which aborts the process at exit. So every
# bucket's DDP future is completed by the hook's own calls. Hook(i) launches bucket i's first
# collective; runs phase 2 (wait for the all_to_all, re-encode, launch the all_gather) of the
# buckets launched in earlier calls; and completes (wait, decode, set the result) the buckets
# whose last collective was launched in an earlier call. The last bucket's hook drains the
# rest. Every collective is launched from a hook call, in the same order on every rank, and
# has at least one hook call's worth of backward pass to run behind.

#: Seconds ``close()`` (and a failing step) waits for a collective in flight before it lets go.
RELEASE_TIMEOUT = 10.0


class _Op:
    """One collective exchange of a flat vector ``x``, reduced in place: compressed (``ex``)
    or a plain all-reduce (``work``, then divided by ``world``)."""

    __slots__ = ("x", "ex", "work", "world", "launched")

    def __init__(self, x: torch.Tensor, launched: int, *, ex: Optional[Exchange] = None,
                 work: Any = None, world: int = 1):
        self.x = x
        self.ex = ex
        self.work = work
        self.world = world
        self.launched = launched  # the hook call that launched its latest collective

    def finish(self) -> None:
        """Wait for the last collective and write the average into ``x``."""
        if self.ex is None:
            work, self.work = self.work, None
            work.wait()
            self.x.div_(self.world)
        else:
            ex, self.ex = self.ex, None
            ex.finish(self.x)

    def release(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the collective in flight, then let it go."""
        ex, work, self.ex, self.work = self.ex, self.work, None, None
        try:
            if ex is not None:
                ex.release(timeout)
            elif work is not None:
                work.wait(datetime.timedelta(seconds=timeout))
        except Exception as e:  # the job is failing already; the first error is what counts
            logger.debug("tritter-comm: letting go of a collective in flight: %s", e)


class _Entry:
    """A bucket's DDP future, the exchanges that produce its result, and what writes the
    bucket once they are done (``done() -> bucket tensor``)."""

    __slots__ = ("fut", "ops", "done")

    def __init__(self, fut: torch.futures.Future, ops: list, done: Callable[[], torch.Tensor]):
        self.fut = fut
        self.ops = ops
        self.done = done


def _allreduce_op(state: VSAState, t: torch.Tensor, world: int) -> _Op:
    """Launch the plain all-reduce of ``t`` (averaged once it is finished)."""
    state._bytes_sent += 2 * (world - 1) * t.numel() * t.element_size() // world
    state._buckets_plain += 1
    work = dist.all_reduce(t, group=state.process_group, async_op=True)
    return _Op(t, state._calls, work=work, world=world)


def _plain(state: VSAState, bucket: dist.GradBucket, world: int) -> _Entry:
    t = bucket.buffer()
    return _Entry(_future(t.device), [_allreduce_op(state, t, world)], lambda: t)


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


def _exchange_op(state: VSAState, x: torch.Tensor, key: int, world: int) -> _Op:
    """Encode ``x`` (flat float32) and launch phase 1 of its compressed exchange."""
    if key >= MAX_BUCKETS or world > MAX_WORLD:
        raise ValueError(f"tritter-comm supports {MAX_BUCKETS} buckets and {MAX_WORLD} ranks")
    rank = dist.get_rank(state.process_group)
    plan = Plan.make(x.numel(), world, block_log2(state.block_size), MODES[state.mode],
                     MODES[state.phase2_mode])
    ex = Exchange(plan, rank=rank, group=state.process_group, seed=state.seed,
                  step=state.iter, key=key, timers=state._timers, fixed_keys=state.fixed_keys)
    res = (state._residual(state.residuals, key, x.numel(), x.device)
           if state.error_feedback else None)
    ex.start(x, res)
    state._bytes_sent += plan.wire_bytes
    state._buckets_compressed += 1
    return _Op(x, state._calls, ex=ex)


def _compressed(state: VSAState, bucket: dist.GradBucket, world: int) -> _Entry:
    t = bucket.buffer()
    segs = _segments(state, bucket)
    x = t if t.dtype == torch.float32 else t.float()

    def write() -> torch.Tensor:
        return t if x is t else t.copy_(x)

    if segs[0][1] is None:
        return _Entry(_future(t.device), [_exchange_op(state, x, segs[0][0], world)], write)
    # resuming: exchange each saved bucket gathered from this one, then scatter back
    parts = [(i.to(x.device), x[i.to(x.device)]) for _, i in segs]
    ops = [
        _allreduce_op(state, xs, world) if xs.numel() < state.min_compress_numel
        else _exchange_op(state, xs, key, world)
        for (key, _), (_, xs) in zip(segs, parts)
    ]

    def scatter() -> torch.Tensor:
        for i, xs in parts:
            x[i] = xs
        return write()

    return _Entry(_future(t.device), ops, scatter)


def _launch(state: VSAState, entry: _Entry) -> torch.futures.Future:
    state._pending.append(entry)
    return entry.fut


def _advance(state: VSAState, *, drain: bool) -> None:
    """Phase 2 of the exchanges whose all_to_all was launched in an earlier hook call, then
    complete the buckets whose every collective was launched in an earlier call, in order;
    everything if ``drain``. On an error every bucket in flight fails and is let go."""
    now = state._calls
    try:
        for entry in state._pending:
            for op in entry.ops:
                if op.ex is not None and op.ex.reducing and (drain or op.launched < now):
                    lo, hi = op.ex.plan.bounds(op.ex.rank)
                    sres = (state._residual(state.server_residuals, op.ex.key, hi - lo,
                                            op.x.device)
                            if state.server_error_feedback and hi > lo else None)
                    op.ex.reduce(sres)
                    op.launched = now
        while state._pending and (drain or all(op.launched < now
                                               for op in state._pending[0].ops)):
            entry = state._pending[0]
            for op in entry.ops:
                op.finish()
            state._pending.pop(0)
            entry.fut.set_result(entry.done())
    except BaseException as e:
        state._release(e)
        raise


def vsa_hook(state: VSAState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: compressed two-phase all-reduce of ``bucket``, averaged like DDP's."""
    t = bucket.buffer()
    world = _world(state)
    last = bucket.is_last()
    state._calls += 1
    try:
        if world > 1 and not state._config_checked:
            # before anything branches on the configuration: a rank that would all-reduce
            # while another exchanges compressed would hang both
            state._check_config(t.device, state.process_group)
        state._bytes_uncompressed += 2 * (world - 1) * t.numel() * 4 // world
        if not state._layout or state._saved_layout is not None:
            _param_ids(state, bucket)  # number the parameters in the first iteration
        if world == 1:
            fut = _done(t)
        elif (state.iter < state.start_iter or not t.is_floating_point()
              or t.numel() < state.min_compress_numel):
            fut = _launch(state, _plain(state, bucket, world))
        else:
            t0 = time.perf_counter()
            fut = _auto.exchange(state, bucket, world) if state.auto else None
            if fut is None:  # compressed (auto: a probe step or a plain bucket returns its own)
                fut = _launch(state, _compressed(state, bucket, world))
            logger.debug("bucket %d: hook %.1f ms", bucket.index(),
                         1e3 * (time.perf_counter() - t0))
        _advance(state, drain=last)
        if last and state.auto and world > 1:
            _auto.end_step(state, bucket.index() + 1, t.device)  # collective: hook call only
    except BaseException as e:
        state._release(e)
        raise
    finally:
        if last:
            state.iter += 1
            state._steps += 1
            state._calls = 0
            state._saved_layout = None  # DDP has rebuilt its buckets by the next iteration
    return fut
