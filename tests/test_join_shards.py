"""Topic sharding with real `swarm-node join` processes over real libp2p on loopback: with --shards 2 --shard-fanin 1
a node takes in rollouts only from the peers on its own home shard, still finds every peer (the lobby carries Hellos,
even when its bootstrap peer lives on the other shard), and keeps training on its shard-mates' groups."""
from __future__ import annotations

import secrets

import pytest

from protocol.identity import Identity, save_identity
from swarm.shards import home_shard
from tests.join_procs import make_nodes, wait_for

pytestmark = pytest.mark.slow
SHARD_FLAGS = ["--shards", "2", "--shard-fanin", "1", "--questions-per-round", "8"]


def _identity_on(shard: int) -> Identity:
    while True:
        ident = Identity.generate()
        if home_shard(ident.peer_id, 2) == shard:
            return ident


def test_sharded_nodes_take_in_only_their_shard_and_keep_training(tmp_path):
    nodes = make_nodes(tmp_path, ["a0", "b0", "c1", "d1"])
    for nd, shard in zip(nodes, (0, 0, 1, 1)):
        nd.identity = _identity_on(shard)
        (nd.dir / "identity.key").unlink()
        save_identity(nd.identity, nd.dir / "identity.key")
    a, b, c, d = nodes
    swarm = "shard-" + secrets.token_hex(3)
    try:
        a.start(swarm, [], SHARD_FLAGS)
        for nd in (b, c, d):  # c and d bootstrap through a, which is not on their shard
            nd.start(swarm, [a.addr], SHARD_FLAGS)
        mate = {"a0": b, "b0": a, "c1": d, "d1": c}
        for nd in nodes:
            wait_for(lambda: len((nd.status() or {}).get("peers") or []) == 3, 60, f"{nd.name} to see 3 peers", nodes)
        for nd in nodes:
            wait_for(lambda: any(m["n_external"] > 0 for m in nd.metrics()), 45,
                     f"{nd.name} to train on its shard-mate's groups", nodes)
        for nd in nodes:
            s = nd.status()
            shard = int(nd.name[1])
            assert s["mesh"]["shards"] == {"count": 2, "home": shard, "epoch": s["mesh"]["shards"]["epoch"],
                                           "listening": [shard]}
            assert set(s["received_from"]) == {mate[nd.name].identity.peer_id}, (nd.name, s["received_from"])
            assert sum(s["mesh"]["rejections_by_reason"].values()) == 0
        for nd in nodes:  # and it keeps going: more rounds, more of its mate's groups, nobody else's
            before = len(nd.metrics())
            wait_for(lambda: len(nd.metrics()) >= before + 2, 30, f"{nd.name} to run 2 more rounds", nodes)
            rows = nd.metrics()
            assert all(m["net_wait_s"] < 0.05 for m in rows)
            assert set(nd.status()["received_from"]) == {mate[nd.name].identity.peer_id}
    finally:
        for nd in nodes:
            nd.stop()
