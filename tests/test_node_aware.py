"""The node-aware exchange (issue 20): plain inside a node, compressed across nodes.

4 gloo ranks stand for 2 nodes of 2 (``intra_node_size=2``); a group is "inter-node" when it
holds ranks of two nodes.
"""

import pytest
import torch

import _node_workers as W
import tritter_comm
from _dist import run
from tritter_comm import node_exchange
from tritter_comm.codec import MODES, block_log2
from tritter_comm.exchange import Plan

HOOK = dict(start_iter=2, min_compress_numel=1000)


def assert_replicas_identical(res):
    for r in res[1:]:
        assert r["params"] == res[0]["params"], "replicas drifted apart"


def test_two_nodes_of_two_identical_replicas_and_bytes():
    steps, count_from = 8, 4
    res = run(W.train, 4, steps=steps, hook={**HOOK, "intra_node_size": 2},
              count_from=count_from, timeout=170)
    assert_replicas_identical(res)
    for r in res:
        st, at = r["stats"], r["at_count"]
        assert st["bytes_sent"] == st["bytes_sent_inter_node"] + st["bytes_sent_intra_node"]
        nb = r["buckets"]
        assert nb >= 3
        assert st["buckets_compressed"] == (steps - 2) * nb
        # what the hook counted over the last steps is what it handed to collectives,
        # link by link (compressed steps: a reduce-scatter and an all-gather of fp32 shards
        # inside the node, the two-phase exchange of a shard across)
        inter = st["bytes_sent_inter_node"] - at["bytes_sent_inter_node"]
        intra = st["bytes_sent_intra_node"] - at["bytes_sent_intra_node"]
        assert (inter, intra) == r["counted"]
        assert inter > 0 and intra > 0
    losses = res[0]["losses"]
    assert losses[-1] < losses[0]


def test_inter_node_bytes_against_the_flat_exchange():
    # per step, a node sends about 2 (M-1)/M of the compressed bucket across: the flat
    # exchange sends L times that (each of its L ranks sends 2 (N-L) slots of D/N off-node)
    numel, L, M = 1 << 20, 2, 2
    args = (block_log2(4096), MODES["int2"])
    flat = Plan.make(numel, L * M, *args)
    node = Plan.make(-(-numel // L), M, *args)
    flat_cross = L * (L * M - L) * (flat.slot + flat.slot2)
    node_cross = L * node.wire_bytes
    assert node_cross <= 0.51 * flat_cross
    compressed = numel * 2 / 8
    assert node_cross == pytest.approx(2 * (M - 1) / M * compressed, rel=0.02)


def test_one_rank_a_node_is_the_flat_exchange():
    flat = run(W.grads, 2, hook=HOOK, timeout=120)
    ones = run(W.grads, 2, hook={**HOOK, "intra_node_size": 1}, timeout=120)
    assert ones == flat  # bit for bit


def test_one_node_reduces_plainly():
    exact = run(W.grads, 2, hook=None, timeout=120)
    whole = run(W.grads, 2, hook={**HOOK, "intra_node_size": 2}, timeout=120)
    assert whole[0] == whole[1]
    for a, b in zip(whole[0], exact[0]):  # nothing crosses a slow link: nothing compressed
        torch.testing.assert_close(torch.frombuffer(bytearray(a), dtype=torch.float32),
                                   torch.frombuffer(bytearray(b), dtype=torch.float32),
                                   rtol=1e-5, atol=1e-7)


def test_one_node_counts_no_inter_node_bytes():
    res = run(W.train, 2, steps=4, hook={**HOOK, "intra_node_size": 2}, timeout=120)
    assert_replicas_identical(res)
    st = res[0]["stats"]
    assert st["bytes_sent_inter_node"] == 0 and st["bytes_sent_intra_node"] > 0
    assert st["buckets_compressed"] == 0


def test_mismatched_intra_node_size_raises_on_every_rank():
    with pytest.raises(RuntimeError) as e:
        run(W.train, 2, steps=3, hook_per_rank=[{**HOOK, "intra_node_size": 1},
                                                {**HOOK, "intra_node_size": 2}], timeout=120)
    msg = str(e.value)
    for rank in (0, 1):
        section = msg.split(f"--- rank {rank} ---")[1].split("--- rank")[0]
        assert "ValueError" in section and "intra_node_size: rank 0=1, rank 1=2" in section


def test_intra_node_size_not_dividing_the_world_is_a_clear_error():
    with pytest.raises(RuntimeError) as e:
        run(W.train, 2, steps=3, hook={**HOOK, "intra_node_size": 3}, timeout=120)
    msg = str(e.value)
    for rank in (0, 1):
        section = msg.split(f"--- rank {rank} ---")[1].split("--- rank")[0]
        assert "ValueError" in section and "intra_node_size=3 does not divide" in section


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "two"])
def test_bad_intra_node_size_values(bad):
    with pytest.raises(ValueError, match="intra_node_size"):
        tritter_comm.VSAConfig(intra_node_size=bad)


def test_node_size_from_local_world_size(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert node_exchange.node_size(None, 8) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert node_exchange.node_size(None, 8) == 4
    assert node_exchange.node_size(None, 4) == 1  # one node: the flat exchange, as before
    assert node_exchange.node_size(None, 6) == 1  # does not tile the world: flat
    assert node_exchange.node_size(2, 8) == 2  # the option wins
    assert node_exchange.node_size(None, 8, group=object()) == 1  # a subgroup: not described
    assert tritter_comm.VSAConfig.from_spec("vsa:intra_node_size=2").intra_node_size == 2


def test_config_row_round_trip():
    c = tritter_comm.VSAConfig(intra_node_size=4)
    assert tritter_comm.VSAConfig.read_row(c.row())["intra_node_size"] == 4
    assert tritter_comm.VSAConfig.read_row(tritter_comm.VSAConfig().row())["intra_node_size"] \
        is None
