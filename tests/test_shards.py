"""swarm.shards: topic names, home shards and the rotating fan-in schedule (pure)."""
from __future__ import annotations

from collections import Counter

import pytest

from protocol.identity import Identity
from protocol.messages import PROTOCOL_VERSION
from swarm.shards import (
    MAX_SHARDS,
    base_topic,
    epoch_of,
    epochs_to_cover,
    home_shard,
    lobby_topic,
    shard_topic,
    subscribed_shards,
)

PEERS = [f"12D3KooWpeer{i:04d}" for i in range(400)]


def test_one_shard_keeps_the_historic_topic_name():
    # existing swarms (and tests that publish raw frames) rely on this exact name
    assert shard_topic("demo", 1, 1, 0) == "swarm-node/demo/v1" == base_topic("demo", 1)
    assert lobby_topic("demo", 1, 1) is None
    assert home_shard("anything", 1) == 0
    assert subscribed_shards("anything", 1, 3, 17) == (0,)
    from swarm.mesh import topic_for  # the mesh's public helper agrees
    assert topic_for("demo") == shard_topic("demo", PROTOCOL_VERSION, 1, 0)


def test_sharded_topics_are_distinct_and_carry_the_shard_count():
    names = {shard_topic("demo", 1, 4, i) for i in range(4)} | {lobby_topic("demo", 1, 4)}
    assert len(names) == 5
    assert all(n.startswith("swarm-node/demo/v1/s4/") for n in names)
    # a node configured with another S never shares a topic with these
    assert not names & ({shard_topic("demo", 1, 2, i) for i in range(2)} | {lobby_topic("demo", 1, 2)})


def test_home_shard_is_stable_and_spread():
    ident = Identity.generate()
    assert home_shard(ident.peer_id, 8) == home_shard(ident.peer_id, 8)
    counts = Counter(home_shard(p, 4) for p in PEERS)
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 60  # 100 expected each


def test_known_values_do_not_drift():
    # sha256-based: the same on every machine and Python version (nodes must agree without talking)
    assert [home_shard(p, 8) for p in PEERS[:6]] == [home_shard(p, 8) for p in PEERS[:6]]
    assert home_shard("12D3KooWpeer0000", 1000) == int.from_bytes(
        __import__("hashlib").sha256(b"home\x0012D3KooWpeer0000").digest()[:8], "big") % 1000


def test_fanin_one_is_home_only():
    for p in PEERS[:20]:
        assert subscribed_shards(p, 4, 1, 0) == (home_shard(p, 4),)
        assert subscribed_shards(p, 4, 1, 9) == (home_shard(p, 4),)
    assert epochs_to_cover(4, 1) is None


@pytest.mark.parametrize("shards,fanin", [(2, 2), (4, 2), (5, 3), (8, 3), (16, 4), (7, 7), (3, 9)])
def test_every_shard_comes_up_once_per_cycle(shards, fanin):
    cover = epochs_to_cover(shards, fanin)
    k = min(fanin, shards)
    for p in PEERS[:30]:
        home = home_shard(p, shards)
        for cycle in range(3):
            seen: set[int] = set()
            for e in range(cycle * cover, (cycle + 1) * cover):
                subs = subscribed_shards(p, shards, fanin, e)
                assert subs[0] == home and len(subs) == len(set(subs)) == k
                assert all(0 <= s < shards for s in subs)
                seen.update(subs)
            assert seen == set(range(shards)), (p, cycle)


def test_fanin_rotates_and_differs_between_peers():
    p = PEERS[0]
    epochs = [subscribed_shards(p, 16, 2, e) for e in range(15)]
    assert len(set(epochs)) == 15  # every epoch a new other shard
    assert subscribed_shards(p, 16, 2, 3) == subscribed_shards(p, 16, 2, 3)  # deterministic
    # two peers on the same home shard do not walk the other shards in the same order
    same_home = [q for q in PEERS if home_shard(q, 16) == home_shard(p, 16)][:5]
    orders = {tuple(subscribed_shards(q, 16, 2, e)[1] for e in range(15)) for q in same_home}
    assert len(orders) > 1


def test_the_fanin_of_a_peer_costs_two_hashes_at_any_shard_count(monkeypatch):
    # _reach_shards computes this for every peer in the book (up to 8,192) every Hello interval; the old
    # Fisher-Yates took S - 1 sha256s a call (624 at S = 625: 3.2 s of CPU per 10 s at 10,000 nodes, docs/scale.md)
    import swarm.shards as shards_mod
    calls = []
    real = shards_mod._h64
    monkeypatch.setattr(shards_mod, "_h64", lambda *a: calls.append(a) or real(*a))
    for shards in (4, 64, 625, MAX_SHARDS):
        for e in (0, 1, 7, 1000):
            calls.clear()
            subs = subscribed_shards(PEERS[1], shards, 2, e)
            assert len(calls) == 2 and len(set(subs)) == 2  # home + the order's (a, b)
    # and the 1,023 other shards of the largest swarm still each come up once per cycle
    cover = epochs_to_cover(MAX_SHARDS, 2)
    assert {subscribed_shards(PEERS[1], MAX_SHARDS, 2, e)[1] for e in range(cover)} == \
        set(range(MAX_SHARDS)) - {home_shard(PEERS[1], MAX_SHARDS)}


def test_epoch_of():
    assert [epoch_of(r, 5) for r in (0, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]
    assert epoch_of(-3, 5) == 0
    with pytest.raises(ValueError):
        epoch_of(1, 0)


@pytest.mark.parametrize("shards,fanin", [(0, 1), (MAX_SHARDS + 1, 1), (2, 0)])
def test_bad_values_raise(shards, fanin):
    with pytest.raises(ValueError):
        subscribed_shards("p", shards, fanin, 0)
    with pytest.raises(ValueError):
        shard_topic("demo", 1, 2, 2)


# ---- real py-libp2p meshes in one trio run (loopback) ----------------------------------------------------------------


def identity_on(shard: int, shards: int) -> Identity:
    while True:
        ident = Identity.generate()
        if home_shard(ident.peer_id, shards) == shard:
            return ident


async def test_sharded_meshes_hear_only_their_shard_and_still_discover_everyone() -> None:
    import trio

    from swarm.mesh import Mesh, MeshConfig
    from tests.doubles import dummy_rollouts

    async def start(nursery, ident: Identity, *bootstrap: Mesh, **kw) -> Mesh:
        cfg = MeshConfig(swarm="shard-t", listen="/ip4/127.0.0.1/tcp/0", heartbeat_s=0.5, hello_interval_s=1.0,
                         bootstrap_backoff_max_s=2.0, bootstrap=tuple(m.listen_addrs()[0] for m in bootstrap), **kw)
        mesh = Mesh(ident, cfg)
        await nursery.start(mesh.run)
        return mesh

    async with trio.open_nursery() as n:
        kw = {"shards": 2, "shard_fanin": 1}
        a = await start(n, identity_on(0, 2), **kw)
        # c and d only know a, which is not on their shard: the lobby's Hellos still connect them to everyone
        b, c, d = [await start(n, identity_on(s, 2), a, **kw) for s in (0, 1, 1)]
        meshes = [a, b, c, d]
        with trio.fail_after(30):
            while not all(len(m.peers()) == 3 for m in meshes):
                await trio.sleep(0.1)
        assert [m.stats()["shards"]["listening"] for m in meshes] == [[0], [0], [1], [1]]
        assert c.stats()["topics"] == ["swarm-node/shard-t/v1/s2/1", "swarm-node/shard-t/v1/s2/lobby"]
        await trio.sleep(1.5)  # GRAFTs settle on the shard topics
        for i, m in enumerate(meshes):
            assert await m.publish_rollouts(i, "m", dummy_rollouts(1)) == 1
        await trio.sleep(3.0)
        mate = {a: b, b: a, c: d, d: c}
        for m in meshes:
            got = []
            while True:
                try:
                    got.append(m.incoming.receive_nowait().from_peer)
                except trio.WouldBlock:
                    break
            assert got == [mate[m].peer_id], (m.stats()["shards"], got)
            assert sum(m.stats()["rejections_by_reason"].values()) == 0
        n.cancel_scope.cancel()


async def test_fanin_rotates_with_the_round() -> None:
    import trio

    from swarm.mesh import Mesh, MeshConfig
    from tests.doubles import dummy_rollouts

    async with trio.open_nursery() as n:
        cfg = dict(swarm="shard-r", listen="/ip4/127.0.0.1/tcp/0", heartbeat_s=0.2, hello_interval_s=1.0,
                   shards=3, shard_fanin=2, shard_rotate_rounds=2)
        a = Mesh(identity_on(0, 3), MeshConfig(**cfg))
        await n.start(a.run)
        first = a.stats()["shards"]["listening"]
        seen = set(first)
        for r in (2, 4):
            a.set_status(r, "m")
            with trio.fail_after(5):
                while a.stats()["shards"]["epoch"] != r // 2:
                    await trio.sleep(0.05)
            subs = a.stats()["shards"]["listening"]
            assert subs[0] == 0 and len(subs) == 2
            assert a.stats()["topics"] == [f"swarm-node/shard-r/v1/s3/{s}" for s in subs] + ["swarm-node/shard-r/v1/s3/lobby"]
            assert sorted(a._pubsub.topic_ids) == sorted(a.stats()["topics"])  # old fan-in topic left
            seen.update(subs)
        assert seen == {0, 1, 2}  # one cycle (2 epochs) covered every shard
        assert await a.publish_rollouts(4, "m", dummy_rollouts(1)) == 1  # alone: publishing still works
        n.cancel_scope.cancel()


# ---- configuration: flags -> NodeConfig (-> MeshConfig in node/run.py) ------------------------------------------------


@pytest.mark.parametrize("args,words", [
    (["--shards", "0"], ["--shards", "between 1 and"]),
    (["--shards", str(MAX_SHARDS + 1)], ["--shards"]),
    (["--shard-fanin", "0"], ["--shard-fanin", ">= 1"]),
    (["--shards", "4", "--shard-rotate-rounds", "0"], ["--shard-rotate-rounds", ">= 1"]),
    (["--shards", "two"], ["--shards", "not a valid integer"]),
])
def test_bad_shard_flags_are_one_clear_error(args, words):
    from click.testing import CliRunner

    from node.cli import main

    res = CliRunner().invoke(main, ["join", *args, "--print-config"])
    assert res.exit_code == 2, (args, res.output)
    assert all(w in res.output for w in words) and "Traceback" not in res.output


def test_shard_settings_reach_the_config(tmp_path):
    import json

    from click.testing import CliRunner

    from node.cli import main
    from node.config import NodeConfig, read_config_file

    assert (NodeConfig().shards, NodeConfig().shard_fanin) == (1, 2)  # default: today's single topic
    cfg = tmp_path / "node.toml"
    cfg.write_text("shards = 8\nshard-fanin = 3\n")
    assert read_config_file(cfg) == {"shards": 8, "shard_fanin": 3}
    res = CliRunner().invoke(main, ["join", "--config", str(cfg), "--shard-rotate-rounds", "5", "--print-config"],
                             env={"SWARM_NODE_SHARD_FANIN": "4"})
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert (out["shards"], out["shard_fanin"], out["shard_rotate_rounds"]) == (8, 4, 5)  # env beats the file
