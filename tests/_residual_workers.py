"""Trainings run inside the spawned ranks of tests/test_residual_memory.py: FSDP1, FSDP2 and DDP
with narrow residuals (``residual_dtype`` int8/int4/int2), reduced to what the tests compare."""

from __future__ import annotations

import _ddp_workers as D
import _fsdp_workers as W


def fsdp_suite(rank, world, runs):
    """``runs``: name -> ``_fsdp_workers.train`` kwargs; returns name -> the state's memory,
    the number of parameters, the hook's stats and the gathered model's bytes."""
    out = {}
    for name, kw in runs.items():
        r = W.train(rank, world, **kw)
        out[name] = {"stats": r["stats"], "n_params": r["n_params"], "full": r["full"],
                     "losses": r["losses"]}
    return out


def ddp_suite(rank, world, runs):
    out = {}
    for name, kw in runs.items():
        r = D.train(rank, world, **kw)
        out[name] = {"stats": r["stats"], "params": r["params"], "losses": r["losses"]}
    return out
