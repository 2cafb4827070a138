"""``VSAState(auto=True)``: compress only the buckets where compression beats this link (issue 4).

Compression pays only when the bytes it saves take longer to send than encoding and decoding
take. That depends on the link, the bucket sizes, the hardware and what else runs on it, so
the hook measures it, from iteration ``start_iter`` on and again every :data:`RECHECK_EVERY`
steps. A check has two stages:

1. **Probe** (``2 * PROBE_ROUNDS`` steps, plain and compressed alternating so that drift in
   the machine's load hits both alike). In a probe step every eligible bucket is exchanged
   synchronously inside its hook call: the ranks meet (a one-element all-reduce, so that no
   rank times its wait for a slower one's backward pass), then the exchange is timed from launch
   to result. Buckets whose compressed exchange took less than :data:`MARGIN` times the plain
   one become candidates. If there are none, every bucket goes plain and the check ends.
2. **Trial**, in blocks of two steps: candidates compressed, then all plain. A round is two
   blocks; :data:`TRIAL_ROUNDS` rounds, more for short steps (noisier, and cheap): up to
   :data:`MAX_TRIAL_ROUNDS` while the trial lasts less than about :data:`TRIAL_SECONDS`. The
   probe times exchanges alone; in a real step a plain all-reduce runs behind the backward
   pass, while encoding and decoding compete with it for the processor (on CPU the same
   cores). So the trial times whole steps, in the normal pipelined mode, as the interval
   between two last-bucket hook calls (the second step of each block, so both ends of the
   interval ran the same way). The candidates are kept if their fastest step took less than
   :data:`STEP_MARGIN` times the fastest all-plain one; otherwise every bucket goes plain.

Each stage ends in the hook call of the last bucket of its last step: every rank hands its
fastest times to one ``all_gather`` (issued from the hook call, never from a future callback),
and all ranks compute the decision from the same gathered numbers, summed in rank order. Timing
differs from rank to rank; the decision cannot, so replicas stay bit-identical. Ties go to
plain, which is exact.

Until the next check, buckets decided ``plain`` take the plain all-reduce path (their
error-feedback residuals are kept and sent once compression resumes); ``compressed`` ones take
the pipelined two-phase exchange. Only buckets the hook would compress anyway (floating point,
``min_compress_numel`` elements or more) are probed and reported.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: Probe steps per variant; a bucket's fastest counts (noise, e.g. other work on the machine or
#: the first allocation of residuals, only makes a variant slower).
PROBE_ROUNDS = 2
#: Trial rounds (a round: two steps of each configuration); the fastest step counts. Short
#: steps are noisier and cheap, so they get more rounds, up to MAX_TRIAL_ROUNDS, while the trial
#: lasts less than about TRIAL_SECONDS.
TRIAL_ROUNDS = 2
MAX_TRIAL_ROUNDS = 8
TRIAL_SECONDS = 2.0
#: Steps from the start of one check to the start of the next.
RECHECK_EVERY = 1000
#: A bucket is a candidate where its compressed exchange takes less than this fraction of the
#: plain all-reduce's time.
MARGIN = 0.9
#: The candidates stay compressed where the trial's steps take less than this fraction of the
#: all-plain steps' time.
STEP_MARGIN = 0.97

PLAIN, COMPRESSED = "plain", "compressed"


class Launcher(Protocol):
    """How the DDP hook launches a bucket's exchange (``tritter_comm.hooks.ddp._Launcher``)."""

    def plain(self, bucket: dist.GradBucket) -> torch.futures.Future: ...

    def compressed(self, bucket: dist.GradBucket) -> torch.futures.Future: ...

    def drain(self) -> None: ...


class AutoChoice:
    """Per-bucket choice between plain and compressed exchange, with its measurements."""

    __slots__ = (
        # decisions (identical on every rank)
        "choice",  # bucket index -> PLAIN / COMPRESSED
        "seconds",  # bucket index -> (plain, compressed): probe seconds, mean over ranks
        "step_seconds",  # (all plain, candidates compressed): trial step seconds, or None
        "candidates",  # buckets the running check's trial compresses (None outside a trial)
        "trial_rounds",  # rounds of the running check's trial
        "next_check",  # iteration the next check starts at (None: the first compressed one)
        "checks",  # checks completed
        # this rank's measurements during a check
        "_times",  # bucket index -> ([plain seconds], [compressed seconds])
        "_steps",  # ([all-plain step seconds], [candidates-compressed step seconds])
        "_last",  # perf_counter() at the previous last-bucket hook call
    )

    def __init__(self) -> None:
        self.choice: dict[int, str] = {}
        self.seconds: dict[int, tuple[float, float]] = {}
        self.step_seconds: Optional[tuple[float, float]] = None
        self.candidates: Optional[frozenset[int]] = None
        self.trial_rounds = TRIAL_ROUNDS
        self.next_check: Optional[int] = None
        self.checks = 0
        self._times: dict[int, tuple[list[float], list[float]]] = {}
        self._steps: tuple[list[float], list[float]] = ([], [])
        self._last: Optional[float] = None

    def phase(self, it: int) -> Optional[tuple[str, bool, int]]:
        """``(stage, compressed, k)`` of iteration ``it`` in a check, or None outside one.

        ``stage`` is ``"probe"`` (``compressed``: this step times compressed exchanges) or
        ``"trial"`` (``compressed``: the candidates are compressed); ``k`` is the step number
        within the stage.
        """
        if self.next_check is None:
            return None
        k = it - self.next_check
        if 0 <= k < 2 * PROBE_ROUNDS:
            return "probe", k % 2 == 1, k
        k -= 2 * PROBE_ROUNDS
        if self.candidates is not None and 0 <= k < 4 * self.trial_rounds:
            return "trial", (k // 2) % 2 == 0, k
        return None

    def state_dict(self) -> dict:
        return {
            "choice": {int(k): v for k, v in self.choice.items()},
            "seconds": {int(k): list(v) for k, v in self.seconds.items()},
            "step_seconds": None if self.step_seconds is None else list(self.step_seconds),
            "next_check": -1 if self.next_check is None else self.next_check,
            "checks": self.checks,
        }

    def load_state_dict(self, d: Optional[dict]) -> None:
        """Restore the decisions; a check that was running when the state was saved starts
        over at the next iteration (its measurements are not saved)."""
        self.__init__()
        if not d:
            return
        self.choice = {int(k): str(v) for k, v in d["choice"].items()}
        self.seconds = {int(k): (float(v[0]), float(v[1])) for k, v in d["seconds"].items()}
        if d.get("step_seconds") is not None:
            self.step_seconds = (float(d["step_seconds"][0]), float(d["step_seconds"][1]))
        self.next_check = None if int(d["next_check"]) < 0 else int(d["next_check"])
        self.checks = int(d["checks"])


def _measured(state: Any, bucket: int, variant: str, seconds: float) -> float:
    """The time a probe records for one bucket (tests replace it to force an outcome)."""
    return seconds


def _measured_step(state: Any, variant: str, seconds: float) -> float:
    """The time a trial records for one step (tests replace it to force an outcome)."""
    return seconds


def exchange(state: Any, bucket: dist.GradBucket,
             hook: Launcher) -> Optional[torch.futures.Future]:
    """The exchange of an eligible bucket under ``auto``, or None for the usual compressed one.
    ``hook`` launches exchanges the hook's way (``plain``, ``compressed``, ``drain``)."""

    auto: AutoChoice = state._auto
    if state._saved_layout is not None:
        # A resumed job's first iteration sees DDP's initial buckets, not the rebuilt ones the
        # choices were made for; it compresses as without auto (the same on every rank).
        return None
    if auto.next_check is None or (auto.phase(state.iter) is None
                                   and state.iter >= auto.next_check):
        # The first compressed iteration, or a check cut short by a checkpoint (its
        # measurements are not saved): check from here. The same iteration on every rank.
        auto.next_check, auto.candidates = state.iter, None
        auto._times.clear()
    idx = bucket.index()
    ph = auto.phase(state.iter)
    if ph is None:
        compressed = auto.choice.get(idx, COMPRESSED) == COMPRESSED
    elif ph[0] == "trial":
        compressed = ph[1] and idx in auto.candidates
    else:
        return _probe(state, bucket, hook, COMPRESSED if ph[1] else PLAIN)
    if compressed:
        return None
    return hook.plain(bucket)


def _probe(state: Any, bucket: dist.GradBucket, hook: Launcher, variant: str):
    hook.drain()  # nothing may overlap what is being timed
    dist.all_reduce(torch.zeros(1, device=bucket.buffer().device), group=state.process_group)
    t0 = time.perf_counter()
    fut = hook.plain(bucket) if variant == PLAIN else hook.compressed(bucket)
    hook.drain()
    idx = bucket.index()
    dt = _measured(state, idx, variant, time.perf_counter() - t0)
    state._auto._times.setdefault(idx, ([], []))[variant == COMPRESSED].append(float(dt))
    return fut


def _gather(state: Any, values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (same length everywhere), identical on every rank."""
    world = dist.get_world_size(state.process_group)
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    rows = torch.empty(world * len(values), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(rows, mine, group=state.process_group)
    return rows.view(world, len(values)).cpu().tolist()


def _total(rows: list[list[float]], i: int) -> float:
    # plain Python sums in rank order: the same bits on every rank, whatever the hardware
    return sum(row[i] for row in rows)


def end_step(state: Any, num_buckets: int, device: torch.device) -> None:
    """Called from the last bucket's hook every step: records trial steps, ends stages."""
    auto: AutoChoice = state._auto
    now = time.perf_counter()
    last, auto._last = auto._last, now
    ph = auto.phase(state.iter)
    if ph is None:
        return
    stage, compressed, k = ph
    if stage == "probe" and k == 2 * PROBE_ROUNDS - 1:
        _end_probe(state, num_buckets, device, math.nan if last is None else now - last)
    elif stage == "trial":
        if k % 2 == 1 and last is not None:
            variant = COMPRESSED if compressed else PLAIN
            auto._steps[compressed].append(float(_measured_step(state, variant, now - last)))
        if k == 4 * auto.trial_rounds - 1:
            _end_trial(state, device)


def _trial_rounds(step_seconds: float) -> int:
    if not step_seconds > 0:  # also NaN: not measured
        return TRIAL_ROUNDS
    return int(min(MAX_TRIAL_ROUNDS, max(TRIAL_ROUNDS, TRIAL_SECONDS // (4 * step_seconds))))


def _end_probe(state: Any, num_buckets: int, device: torch.device, step_seconds: float) -> None:
    auto: AutoChoice = state._auto
    world = dist.get_world_size(state.process_group)
    mine = [math.nan] * (2 * num_buckets) + [step_seconds]
    for idx, (plain, comp) in auto._times.items():
        if idx < num_buckets and plain and comp:
            mine[2 * idx], mine[2 * idx + 1] = min(plain), min(comp)
    rows = _gather(state, mine, device)
    # the trial's length, from the slowest rank's last probe step (a synchronous one: slower
    # than a normal step, so this errs towards fewer rounds)
    auto.trial_rounds = _trial_rounds(max(row[-1] for row in rows))
    auto._times.clear()
    auto.seconds, candidates = {}, set()
    for idx in range(num_buckets):
        plain, comp = _total(rows, 2 * idx), _total(rows, 2 * idx + 1)
        if math.isnan(plain) or math.isnan(comp):
            continue  # not probed (too small, not floating point, or a resumed iteration)
        auto.seconds[idx] = (plain / world, comp / world)
        if comp < MARGIN * plain:
            candidates.add(idx)
    if candidates:
        auto.candidates = frozenset(candidates)
        auto._steps = ([], [])
        return
    _decide(state, frozenset())


def _end_trial(state: Any, device: torch.device) -> None:
    auto: AutoChoice = state._auto
    world = dist.get_world_size(state.process_group)
    plain, comp = auto._steps
    rows = _gather(state, [min(plain, default=math.nan), min(comp, default=math.nan)], device)
    t_plain, t_comp = _total(rows, 0), _total(rows, 1)
    auto.step_seconds = (t_plain / world, t_comp / world)
    keep = not math.isnan(t_plain) and not math.isnan(t_comp) and t_comp < STEP_MARGIN * t_plain
    _decide(state, auto.candidates if keep else frozenset())


def _decide(state: Any, compressed: frozenset) -> None:
    auto: AutoChoice = state._auto
    auto.choice = {i: COMPRESSED if i in compressed else PLAIN for i in auto.seconds}
    start = auto.next_check
    auto.candidates = None
    auto._steps = ([], [])
    auto.checks += 1
    auto.next_check = start + RECHECK_EVERY
    logger.info(
        "auto (iteration %d): %s%s; next check at iteration %d", state.iter,
        ", ".join(f"bucket {i} {c} (plain {1e3 * auto.seconds[i][0]:.1f} ms, compressed "
                  f"{1e3 * auto.seconds[i][1]:.1f} ms)" for i, c in sorted(auto.choice.items()))
        or "no bucket probed",
        "" if auto.step_seconds is None else
        "; trial steps: all plain {:.1f} ms, candidates compressed {:.1f} ms".format(
            *(1e3 * s for s in auto.step_seconds)),
        auto.next_check,
    )


def stats(state: Any) -> dict:
    """The ``stats()`` entries of ``auto``: the choice per bucket and what it was based on."""
    auto: AutoChoice = state._auto
    return {
        "auto": dict(sorted(auto.choice.items())),
        "auto_seconds": {i: {PLAIN: p, COMPRESSED: c}
                         for i, (p, c) in sorted(auto.seconds.items())},
        "auto_step_seconds": (None if auto.step_seconds is None else
                              {PLAIN: auto.step_seconds[0], COMPRESSED: auto.step_seconds[1]}),
        "auto_checks": auto.checks,
        "auto_next_check": auto.next_check,
    }
