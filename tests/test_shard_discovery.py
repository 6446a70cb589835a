"""Shard-aware discovery: the peer book (swarm.peerbook, pure) and, through real py-libp2p hosts, a node that keeps
peers of every shard it will rotate into and reaches each one when it does."""
from __future__ import annotations

import random

import pytest
import trio

from protocol.identity import Identity
from swarm.peerbook import MAX_KNOWN, PER_SHARD, KnownPeer, PeerBook, capacity_for
from swarm.shards import home_shard


def peer_on(shard: int, shards: int, rng: random.Random) -> str:
    while True:
        pid = f"12D3KooW{rng.getrandbits(64):016x}"
        if home_shard(pid, shards) == shard:
            return pid


def kp(pid: str, t: float) -> KnownPeer:
    return KnownPeer(pid, ("/ip4/127.0.0.1/tcp/1",), 0, "m", t)


# ---- the book (pure) -------------------------------------------------------------------------------------------


def test_one_shard_is_a_least_recently_heard_list():
    book = PeerBook(3, shards=1)
    for i, p in enumerate("abcd"):
        book.add(kp(p, i))
    assert sorted(book) == ["b", "c", "d"]
    book.add(kp("b", 5))  # heard again: now the most recent
    book.add(kp("e", 6))
    assert sorted(book) == ["b", "d", "e"] and book.evicted == 2
    book.remove("d")
    assert len(book) == 2 and "d" not in book and book.get("b").last_hello == 5


def test_every_shard_keeps_its_share_however_many_hellos_the_others_send():
    """1,000 nodes on 62 shards, heard in random order, then one shard floods (identities minted on it): each shard
    keeps min(heard, capacity // S) peers. A plain list of the 128 most recently heard (the old Discovery.known)
    missed some shards even before the flood, and after it held nothing but the flooded shard."""
    rng = random.Random(1)
    shards = 62
    cap = capacity_for(32, shards)
    assert cap == PER_SHARD * shards == 496
    peers = [peer_on(rng.randrange(shards), shards, rng) for _ in range(1000)]
    order = rng.sample(peers, len(peers))
    book = PeerBook(cap, shards)
    t = 0.0
    for p in order:
        t += 1
        book.add(kp(p, t))
    # what the old list (the 128 most recently heard) kept: some shards not at all
    assert len({home_shard(p, shards) for p in order[-128:]}) < shards
    flood = [peer_on(7, shards, rng) for _ in range(2000)]
    for p in flood:
        t += 1
        book.add(kp(p, t))
    heard = {s: sum(1 for p in peers if home_shard(p, shards) == s) for s in range(shards)}
    counts = book.counts()
    assert len(book) == cap
    for s in range(shards):
        assert counts.get(s, 0) >= min(heard[s], cap // shards), (s, counts.get(s), heard[s])
    assert all(home_shard(k.peer_id, shards) == s for s in range(shards) for k in book.on_shard(s))
    assert len(book.on_shard(7)) < 2 * cap // shards  # the flood gained its shard nothing beyond its share


def test_capacity_grows_with_the_shard_count_and_is_bounded():
    assert capacity_for(32, 1) == 128  # unsharded: as before
    assert capacity_for(32, 625) == 5000  # 10,000 nodes at 16 a shard: 8 per shard
    assert capacity_for(32, 1024) == MAX_KNOWN


# ---- real hosts --------------------------------------------------------------------------------------------------


def identity_on(shard: int, shards: int) -> Identity:
    while True:
        ident = Identity.generate()
        if home_shard(ident.peer_id, shards) == shard:
            return ident


async def test_a_node_keeps_peers_of_every_shard_and_reaches_each_one_it_rotates_into() -> None:
    """Node A (max_peers 1) in a 4-shard swarm of 7 other hosts: 4 of them on its home shard 0 and one alone on
    each of shards 1-3. Before, A remembered 4 x max_peers = 4 Hello senders, the most recently heard, which the
    4 shard-0 peers (heard more often: on their home shard every second, and on the lobby) mostly filled, so a lone shard's member was often not among them. Now A keeps
    8 per shard: all three loners, all the time, and as its fan-in rotates through shards 1-3 it connects to each
    loner and receives its batches."""
    from swarm.mesh import Mesh, MeshConfig
    from tests.doubles import dummy_rollouts

    S = 4
    base = dict(swarm="disc-t", listen="/ip4/127.0.0.1/tcp/0", heartbeat_s=0.5, hello_interval_s=1.0,
                bootstrap_backoff_max_s=2.0, shards=S, shard_fanin=2, shard_rotate_rounds=1, ping_interval_s=0)

    async def start(nursery, ident: Identity, *bootstrap: Mesh, **kw) -> Mesh:
        mesh = Mesh(ident, MeshConfig(bootstrap=tuple(m.listen_addrs()[0] for m in bootstrap), **{**base, **kw}))
        await nursery.start(mesh.run)
        return mesh

    async def publish_every_second(mesh: Mesh) -> None:
        r = 0
        while True:
            r += 1
            await mesh.publish_rollouts(r, "m", dummy_rollouts(1))
            await trio.sleep(1.0)

    async with trio.open_nursery() as n:
        hub = await start(n, identity_on(0, S))
        mates = [await start(n, identity_on(0, S), hub, max_peers=1) for _ in range(3)]
        loners = {s: await start(n, identity_on(s, S), hub, max_peers=1) for s in (1, 2, 3)}
        a = await start(n, identity_on(0, S), hub, max_peers=1)
        for m in loners.values():
            n.start_soon(publish_every_second, m)

        def shards_known() -> set[int]:
            return {int(s) for s, c in a.stats()["known_per_shard"].items() if c > 0}

        def all_loners_known() -> bool:
            return {0, 1, 2, 3} <= shards_known() and all(m.peer_id in a.stats()["known_peers"] for m in loners.values())

        with trio.move_on_after(60):  # every loner's lobby Hello (every S x 1 s) has reached A
            while not all_loners_known():
                await trio.sleep(0.2)
        assert all_loners_known(), (a.stats()["known_per_shard"], [m.stats()["n_peers"] for m in loners.values()])
        for _ in range(25):  # and stays there: 5 s, more than one lobby interval, while shard-0 peers keep talking
            assert all(m.peer_id in a.stats()["known_peers"] for m in loners.values()), a.stats()["known_per_shard"]
            await trio.sleep(0.2)

        reached = set()
        for r in range(3):  # fan-in 2: home + one rotating shard; 3 epochs cover shards 1-3
            a.set_status(r, "m")
            with trio.fail_after(10):
                while a.stats()["shards"]["epoch"] != r:
                    await trio.sleep(0.05)
            fanin = a.stats()["shards"]["listening"][1]
            loner = loners[fanin]
            with trio.move_on_after(30) as wait:  # _reach_shards dials it (A's max_peers does not stop it), then a batch
                while True:
                    got = await a.incoming.receive()
                    if got.from_peer == loner.peer_id:
                        break
            st = a.stats()
            assert not wait.cancelled_caught, (r, fanin, loner.peer_id in a.connected(), st["shards"], st["dials"],
                                               st["topics"], st["known_per_shard"])
            # the batch may come first through a connected peer that also listens to that shard (a hub or a mate),
            # while the dial to the loner is still under way: give it the time of a dial
            with trio.move_on_after(15):
                while loner.peer_id not in a.connected():
                    await trio.sleep(0.2)
            assert loner.peer_id in a.connected(), (r, fanin, a.stats()["dials"])
            reached.add(fanin)
        assert reached == {1, 2, 3}
        assert sum(v for k, v in a.stats()["rejections_by_reason"].items()) == 0
        n.cancel_scope.cancel()
