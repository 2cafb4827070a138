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
    with pytest.raises(RuntimeError) as e:
        run(W.train_with_version, 2, versions=[1000, 2000], steps=5,
            hook=dict(start_iter=2, min_compress_numel=1000))
    msg = str(e.value)
    assert msg.count("configured differently") == 2, msg
    assert "package_version: rank 0=1000, rank 1=2000" in msg
