"""Hellos: a topic's Hello rate stays flat as the swarm grows (swarm.hellos.hello_every)."""
from types import SimpleNamespace

from protocol.identity import Identity
from swarm.shards import HELLOS_PER_INTERVAL, hello_every
from swarm.mesh import Mesh, MeshConfig
from swarm.peerbook import KnownPeer, PeerBook, capacity_for
from swarm.shards import home_shard


def test_interval_is_the_base_in_a_small_swarm_and_grows_with_members_beyond():
    assert [hello_every(10.0, m) for m in (1, 2, HELLOS_PER_INTERVAL)] == [10.0] * 3
    assert hello_every(10.0, 4 * HELLOS_PER_INTERVAL) == 40.0
    for members in (1, 5, 16, 64, 1000):  # Hellos per base interval on the topic: never more than the bound
        assert members * 10.0 / hello_every(10.0, members) <= HELLOS_PER_INTERVAL


def _known_on(shard: int, shards: int, n: int) -> PeerBook:
    book = PeerBook(capacity=1024, shards=shards)
    while sum(book.counts().values()) < n:
        pid = Identity.generate().peer_id
        if home_shard(pid, shards) == shard:
            book.add(KnownPeer(pid, (), 0, "m", 0.0))
    for _ in range(20):  # peers on other shards do not count: their Hellos go to other topics
        pid = Identity.generate().peer_id
        if home_shard(pid, shards) != shard:
            book.add(KnownPeer(pid, (), 0, "m", 0.0))
    return book


def test_a_mesh_spaces_its_hellos_by_the_peers_it_knows_on_its_home_shard():
    mesh = Mesh(Identity.generate(), MeshConfig(swarm="hr", listen=("/ip4/127.0.0.1/tcp/0",), shards=4,
                                                hello_interval_s=10.0))
    assert mesh.hello_every_s() == 10.0 and mesh.stats()["hello_every_s"] == 10.0  # no discovery yet: the base
    mesh._discovery = SimpleNamespace(known=_known_on(mesh.home_shard, 4, 15))
    assert mesh.hello_every_s() == 10.0 * 16 / HELLOS_PER_INTERVAL  # 15 known + itself


def test_a_node_with_few_peers_still_counts_all_its_shard_mates():
    """The book that counts home-shard members has room for a 64-node swarm's whole shard even at --max-peers 8: with a
    book of 4 x max_peers = 32 entries a relay knew 8 of its 15 mates (the per-shard share of a full book) and sent
    Hellos every 45 s instead of 80 (swarm-wide 1.96 Hellos/s instead of ~1 at 64 processes, docs/scale.md)."""
    shards = 4
    mesh = Mesh(Identity.generate(), MeshConfig(swarm="hr", listen=("/ip4/127.0.0.1/tcp/0",), shards=shards,
                                                hello_interval_s=10.0, max_peers=8))
    book = PeerBook(capacity_for(8, shards), shards)
    per_shard = {i: 16 - (i == mesh.home_shard) for i in range(shards)}  # every other node of the swarm, 16 a shard
    while any(per_shard.values()):
        pid = Identity.generate().peer_id
        if per_shard[home_shard(pid, shards)]:
            per_shard[home_shard(pid, shards)] -= 1
            book.add(KnownPeer(pid, (), 0, "m", 0.0))
    mesh._discovery = SimpleNamespace(known=book)
    assert mesh.hello_every_s() == 10.0 * 16 / HELLOS_PER_INTERVAL  # 15 mates + itself: 2 Hellos a topic per 10 s
