"""Each launch/ recipe in a short mode, 2 CPU ranks: torchrun on one node and on two "nodes"
(two launchers on this machine meeting at a c10d rendezvous), FSDP, the accelerate recipe."""

import json
import subprocess
import sys

import pytest

from _procs import ROOT, env, free_port, run

TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SHORT = ["--log-every", "3", "--eval-every", "0"]


def _summary(path):
    return json.loads(path.read_text())


def test_torchrun_one_node_vsa_checkpoint_and_exact_resume(tmp_path):
    ck = tmp_path / "ck"
    common = ["--comm", "vsa", "--start-iter", "2", "--steps", "6", *SHORT]
    run(["bash", TORCHRUN_SH, *common, "--checkpoint-dir", ck, "--checkpoint-every", "3",
         "--summary-json", tmp_path / "a.json"], PYTHON=sys.executable)
    assert (ck / "latest").read_text().strip() == "step_6"
    assert {p.name for p in (ck / "step_3").glob("comm_rank*.pt")} == {"comm_rank0.pt",
                                                                        "comm_rank1.pt"}
    p = run(["bash", TORCHRUN_SH, *common, "--resume", ck / "step_3",
             "--summary-json", tmp_path / "b.json"], PYTHON=sys.executable)
    assert "resumed from" in p.stdout
    a, b = _summary(tmp_path / "a.json"), _summary(tmp_path / "b.json")
    assert a["hook_stats"]["buckets_compressed"] > 0 and a["world"] == 2
    assert b["start"] == 3 and b["params_sha256"] == a["params_sha256"]


def test_torchrun_max_restarts_recovers_a_killed_rank(tmp_path):
    """A rank is SIGKILLed mid-exchange in step 5; torchrun (MAX_RESTARTS=1) stops the other rank,
    restarts both, they resume from the step-3 checkpoint and end with the parameters of an
    uninterrupted run."""
    common = ["--comm", "vsa", "--start-iter", "2", "--steps", "7", *SHORT,
              "--checkpoint-every", "3", "--resume", "auto"]
    run(["bash", TORCHRUN_SH, *common, "--checkpoint-dir", tmp_path / "a",
         "--summary-json", tmp_path / "a.json"], PYTHON=sys.executable)
    p = run(["bash", TORCHRUN_SH, *common, "--checkpoint-dir", tmp_path / "b", "--fail-at-step",
             "5", "--summary-json", tmp_path / "b.json"], PYTHON=sys.executable, MAX_RESTARTS="1",
            timeout=400)
    log = p.stdout + p.stderr
    assert "--fail-at-step 5: SIGKILL" in log and "resumed from" in log, log[-4000:]
    a, b = _summary(tmp_path / "a.json"), _summary(tmp_path / "b.json")
    assert a["start"] == 0 and b["start"] == 3
    assert b["hook_stats"]["buckets_compressed"] > 0
    assert b["params_sha256"] == a["params_sha256"]


def test_torchrun_two_nodes_rendezvous(tmp_path):
    extra = dict(NNODES="2", NPROC="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                 JOB_ID=f"test{free_port()}", PYTHON=sys.executable)
    cmd = ["bash", str(TORCHRUN_SH), "--comm", "none", "--steps", "3", *SHORT,
           "--summary-json", str(tmp_path / "s.json")]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env(**extra), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [n.communicate(timeout=240)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert _summary(tmp_path / "s.json")["world"] == 2


@pytest.mark.parametrize("comm", ["fp16", "powersgd"])
def test_train_pytorch_hooks(comm, tmp_path):
    run(["bash", TORCHRUN_SH, "--comm", comm, "--steps", "3", *SHORT, "--checkpoint-dir",
         tmp_path / "ck", "--summary-json", tmp_path / "s.json"], PYTHON=sys.executable)
    assert _summary(tmp_path / "s.json")["comm"] == comm
    assert (tmp_path / "ck" / "step_3" / "comm_rank1.pt").is_file()


def _fsdp_available(kind):
    try:
        if kind == "fsdp1":
            from tritter_comm.hooks import vsa_fsdp_hook  # noqa: F401
        else:
            from tritter_comm import fsdp

            return fsdp.available()
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_train_fsdp_vsa(kind, tmp_path):
    if not _fsdp_available(kind):
        pytest.skip(f"this tritter-comm (or torch) has no {kind} support")
    run(["bash", TORCHRUN_SH, "--comm", "vsa", "--start-iter", "2", "--fsdp", kind,
         "--steps", "4", *SHORT, "--summary-json", tmp_path / "s.json"], PYTHON=sys.executable)
    s = _summary(tmp_path / "s.json")
    assert s["fsdp"] == kind and s["hook_stats"]["buckets_compressed"] > 0


def test_phase_training_skips_backward_passes_and_resumes_exactly(tmp_path):
    # without the gate: it would need 8 measured steps before its first predict phase
    common = ["--comm", "vsa", "--start-iter", "2", "--phase", "--phase-warmup", "3",
              "--phase-gate-window", "0", "--steps", "12", *SHORT]
    run(["bash", TORCHRUN_SH, *common, "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every",
         "6", "--summary-json", tmp_path / "a.json"], PYTHON=sys.executable)
    run(["bash", TORCHRUN_SH, *common, "--resume", tmp_path / "ck" / "step_6",
         "--summary-json", tmp_path / "b.json"], PYTHON=sys.executable)
    a, b = _summary(tmp_path / "a.json"), _summary(tmp_path / "b.json")
    st = a["phase_stats"]
    assert st["steps"] == 12 and st["backward_skipped"] > 0
    assert st["backward_passes"] + st["backward_skipped"] == 12
    # the hook ran only on real steps: its iteration count is the backward passes
    assert a["hook_stats"]["iter"] == st["backward_passes"]
    assert b["start"] == 6 and b["phase_stats"] == st
    assert b["params_sha256"] == a["params_sha256"]


def test_phase_gate_window_needs_phase():
    p = subprocess.run([sys.executable, ROOT / "launch" / "train.py", "--phase-gate-window", "0"],
                       env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--phase-gate-window applies to --phase" in p.stderr


def test_phase_needs_ddp():
    p = subprocess.run([sys.executable, ROOT / "launch" / "train.py", "--phase", "--fsdp",
                        "fsdp2"], env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--phase works with DDP" in p.stderr


def test_accelerate_recipe(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install '.[dev]')")
    pytest.importorskip("yaml")
    ck = tmp_path / "ck"
    p = run(["bash", ROOT / "launch" / "accelerate.sh", "--steps", "6", "--log-every", "3",
             "--checkpoint-dir", ck, "--checkpoint-every", "3"],
            PYTHON=sys.executable, TRITTER_COMM="vsa:start_iter=2")  # over launch/tritter_comm.yaml
    assert "(no hook)" not in p.stdout and "checkpoint" in p.stdout
    ratio = float(p.stdout.split("MB/rank")[-1].split("x")[0])
    assert ratio > 1.5  # cumulative, with 2 uncompressed steps of 6
    assert (ck / "step_3" / "tritter_comm_state_1.pt").is_file()
    p = run(["bash", ROOT / "launch" / "accelerate.sh", "--steps", "6", "--log-every", "3",
             "--resume", ck / "step_3"], PYTHON=sys.executable, TRITTER_COMM="vsa:start_iter=2")
    assert "resumed from" in p.stdout
