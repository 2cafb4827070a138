"""tritter_comm.register: the right hook for each wrapper, and clear errors otherwise."""

import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

import tritter_comm
import tritter_comm.hooks.fsdp2
from tritter_comm import VSAConfig, VSAState


@pytest.fixture(scope="module")
def group():
    """A one-rank gloo group in this process (wrappers need one to be built)."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'store')}",
                                rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            gc.collect()
            dist.destroy_process_group()


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_ddp_gets_the_ddp_hook(group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_net())
    state = tritter_comm.register(ddp, VSAConfig(mode="ternary", start_iter=5))
    assert isinstance(state, VSAState) and state.mode == "ternary" and state.start_iter == 5
    assert [h for h, _ in ddp._comm_hooks] == [tritter_comm.vsa_hook]
    assert ddp._comm_hooks[0][1] is state
    ddp(torch.randn(2, 8)).sum().backward()  # the hook runs (one rank: nothing to exchange)
    assert state.stats()["steps"] == 1
    tritter_comm.shutdown(ddp, destroy_process_group=False)


def test_compiled_ddp_gets_the_hook_of_the_model_it_wraps(group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_net())
    state = tritter_comm.register(torch.compile(ddp))
    assert ddp._comm_hooks[0] == (tritter_comm.vsa_hook, state)
    tritter_comm.shutdown(ddp, destroy_process_group=False)


def test_fsdp1_gets_the_fsdp_hook(group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(_net(), device_id=torch.device("cpu"))
    state = tritter_comm.register(model)
    assert model._comm_hook is tritter_comm.vsa_fsdp_hook and model._comm_hook_state is state


@pytest.mark.skipif(not tritter_comm.fsdp.available(), reason="needs FSDP2 custom comms")
def test_fsdp2_gets_the_compressed_reduce_scatter(group, monkeypatch):
    from torch.distributed.fsdp import fully_shard

    model = _net()
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    seen = []
    real = tritter_comm.hooks.fsdp2.enable
    monkeypatch.setattr(tritter_comm.hooks.fsdp2, "enable",
                        lambda m, s: seen.append((m, s)) or real(m, s))
    state = tritter_comm.register(model, VSAConfig(seed=3))
    assert seen == [(model, state)] and state.seed == 3


@pytest.mark.parametrize("thing", [nn.Linear(2, 2), "a model", None])
def test_anything_else_is_a_clear_type_error(thing):
    with pytest.raises(TypeError, match="DistributedDataParallel, FSDP1 or FSDP2"):
        tritter_comm.register(thing)


def test_config_must_be_a_vsaconfig(group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_net())
    with pytest.raises(TypeError, match="VSAConfig"):
        tritter_comm.register(ddp, {"mode": "int2"})
    assert ddp._comm_hooks == []  # nothing was registered
