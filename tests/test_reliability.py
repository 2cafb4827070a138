"""Reliability: dead ranks, config drift. (Non-finite gradients: tests/test_ddp_hook.py.)"""

import re
import time

import pytest

import _ddp_workers as W
from _dist import run


@pytest.mark.parametrize("world", [2, 3])
def test_killed_rank_stops_the_others_with_an_error(world):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        run(W.die_mid_training, world, timeout=150)
    msg = str(e.value)
    assert "exited with code -9" in msg  # the killed rank
    survivors = re.findall(r"survivor stopped after ([\d.]+) s", msg)
    assert len(survivors) == world - 1, msg
    # gloo notices the closed connection long before the 60 s process-group timeout
    assert all(float(s) < 60 for s in survivors), survivors
    assert time.monotonic() - t0 < 150


def test_version_skew_fails_on_every_rank_naming_it():
    with pytest.raises(RuntimeError) as e:  # the harness's error, holding each rank's
        run(W.train_with_version, 2, versions=[1000, 2000], steps=5,
            hook=dict(start_iter=2, min_compress_numel=1000))
    msg = str(e.value)
    assert msg.count("configured differently") == 2, msg
    assert "package_version: rank 0=1000, rank 1=2000" in msg


def test_every_option_that_steers_the_collectives_is_agreed_first():
    """Ranks that differ in one option fail with a ValueError naming it, on every rank, at
    the first hook call: before the hook branches on it (start_iter 2 against 4 used to hang,
    one rank all-gathering while the other all-reduced)."""
    import _reliability_workers as RW

    fields = list(RW.MISMATCHES)
    t0 = time.monotonic()
    out = run(RW.config_mismatches, 2, fields=fields, timeout=240)
    assert time.monotonic() - t0 < 240
    for field in fields:
        for rank in (0, 1):
            msg = out[rank][field]
            assert msg is not None, f"{field}: rank {rank} trained with a mismatch"
            assert msg.startswith("ValueError") and "configured differently" in msg, msg
            a, b = RW.MISMATCHES[field]
            assert f"{field}: rank 0={a!r}, rank 1={b!r}" in msg, msg
            assert msg.count(": rank 0=") == 1, msg  # that field alone


def test_a_failure_mid_step_raises_on_every_rank_and_leaves_nothing_pending():
    import _reliability_workers as RW

    out = run(RW.fail_mid_step, 2, timeout=150)
    assert "injected failure" in out[1]["error"], out[1]
    assert out[0]["error"] is not None, "the other rank trained on"
    for r in out:
        assert r["seconds"] < 60, r  # gloo reports the broken step, well before the timeout
        assert r["pending_after_shutdown"] == 0, r


def test_shutdown_closes_and_frees_the_hook_state():
    import _reliability_workers as RW

    for r in run(RW.shutdown_releases, 2):
        assert r["compressed"] > 0, r
        assert r["alive_before"] and r["freed"], r
        assert r["initialized"], r  # destroy_process_group=False kept the group


@pytest.mark.skipif(not __import__("tritter_comm").fsdp.available(), reason="needs FSDP2 comms")
def test_fsdp2_checks_the_configuration_on_its_reduce_scatter_group():
    import _reliability_workers as RW

    # each shard group agrees within itself: both train (a check on the 4-rank default group
    # would have failed them)
    assert run(RW.fsdp2_subgroup, 4, seeds=[0, 0, 1, 1], timeout=240) == [None] * 4
    # rank 3 differs from rank 2: that group fails on both its ranks, the other trains
    out = run(RW.fsdp2_subgroup, 4, seeds=[0, 0, 1, 2], timeout=240)
    assert out[:2] == [None, None], out
    for msg in out[2:]:
        assert msg and msg.startswith("ValueError") and "seed: rank 0=1, rank 1=2" in msg, out
