"""The accelerate integration: the hook installed by configuration, and checkpoints that carry it.

The multi-process cases run 2 CPU ranks under torchrun with ACCELERATE_USE_CPU=true (gloo).
"""

import json

import pytest

pytest.importorskip("accelerate", reason="accelerate is not installed (pip install '.[dev]')")

from _procs import TESTS, torchrun  # noqa: E402

SPEC = "vsa:start_iter=2:min_compress_numel=1000"


def _load(d, name, world=2):
    return [json.loads((d / f"{name}_rank{r}.json").read_text()) for r in range(world)]


def test_hook_active_and_state_saved_and_restored(tmp_path):
    worker = TESTS / "_accelerate_worker.py"
    torchrun(worker, tmp_path, "full", ACCELERATE_USE_CPU="true", TRITTER_COMM=SPEC)
    torchrun(worker, tmp_path, "resume", ACCELERATE_USE_CPU="true", TRITTER_COMM=SPEC)
    full, resumed = _load(tmp_path, "full"), _load(tmp_path, "resume")
    for r in full + resumed:
        assert r["model_type"] == "DistributedDataParallel" and r["states"] == 1
        assert r["stats"]["buckets_compressed"] > 0  # the hook ran, compressed
        assert r["iter"] == 10
    # one file per process: residuals are per rank, and differ
    assert {p.name for p in (tmp_path / "ckpt").glob("tritter_comm_state_*.pt")} == {
        "tritter_comm_state_0.pt", "tritter_comm_state_1.pt"}
    assert full[0]["residual_sum"] != full[1]["residual_sum"]
    # the resumed job continues exactly as the uninterrupted one
    for f, r in zip(full, resumed):
        assert r["losses"] == f["losses"][6:]
        assert r["digest"] == f["digest"]
        assert r["residual_sum"] == f["residual_sum"]
    assert resumed[0]["stats"]["compression_ratio"] > 14  # the default, int2: 15.7x


def test_trainer_callback_saves_and_restores(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (optional)")
    worker = TESTS / "_trainer_worker.py"
    torchrun(worker, tmp_path, "full", TRITTER_COMM=SPEC, timeout=300)
    torchrun(worker, tmp_path, "resume", TRITTER_COMM=SPEC, timeout=300)
    full, resumed = _load(tmp_path, "trainer_full"), _load(tmp_path, "trainer_resume")
    assert (tmp_path / "run" / "checkpoint-4" / "tritter_comm_state_1.pt").is_file()
    for f, r in zip(full, resumed):
        assert f["model_type"] == "DistributedDataParallel"
        assert f["stats"]["buckets_compressed"] > 0
        assert r["iter_at_begin"] == 4  # the callback loaded checkpoint-4's hook state
        assert r["digest"] == f["digest"]


def test_without_configuration_nothing_is_hooked(monkeypatch):
    from accelerate import Accelerator
    from torch import nn

    import tritter_comm
    import tritter_comm.integrations.accelerate as tc_accelerate

    monkeypatch.delenv("TRITTER_COMM", raising=False)
    monkeypatch.delenv("TRITTER_COMM_CONFIG", raising=False)
    acc = Accelerator(cpu=True)
    with pytest.warns(tritter_comm.TritterCommWarning, match="TRITTER_COMM=vsa"):
        att = tc_accelerate.attach(acc)
    assert not att.enabled
    model = acc.prepare(nn.Linear(4, 4))
    assert att.states == [] and isinstance(model, nn.Linear)
    assert tc_accelerate.attach(acc) is att  # attaching twice gives the same attachment


def test_accelerates_own_comm_hook_is_refused():
    from accelerate import Accelerator
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    import tritter_comm
    import tritter_comm.integrations.accelerate as tc_accelerate

    acc = Accelerator(cpu=True, kwargs_handlers=[
        DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.FP16)])
    with pytest.raises(ValueError, match="its own DDP comm hook"):
        tc_accelerate.attach(acc, "vsa")
