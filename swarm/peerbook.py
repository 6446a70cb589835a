"""The peers a node remembers from their Hellos (`Discovery.known`): bounded, and shard-aware. Pure: no network.

Why shard-aware: a sharded node needs peers on every shard it will listen to (its home shard and the fan-in shards
it rotates through, which over a cycle are all of them: swarm.shards), and `Mesh._reach_shards` dials them from this
book. A plain least-recently-heard list of 128 peers kept, at 1,000 nodes and 62 shards, ~2 peers per shard on average
and none on some, so a node that rotated into such a shard heard nobody there for an epoch (simulated delivery 0.96,
docs/scale.md). Here every home shard keeps its share: when the book is full, the peer forgotten is the least recently
heard one of the shard holding the most peers. So a shard that the node has heard `k` peers of keeps
min(k, capacity // shards) of them, however many Hellos the other shards send (one shard's Hello flood, e.g. from
identities minted on it, cannot push the other shards out of the book), and with S = 1 this is the least-recently-
heard list it always was.

Capacity: `capacity_for(max_peers, shards)` = max(MIN_KNOWN, 4 x max_peers, PER_SHARD x shards), at most MAX_KNOWN;
PER_SHARD = 8 is twice the 4 connected members per shard that `_reach_shards` aims for, so a few dead entries leave
enough. MIN_KNOWN = 128 because the book also counts the node's home-shard members, which space its Hellos
(swarm.shards.hello_every): a relay with `--max-peers 8` in a 4-shard swarm of 64 had a book of 32, knew 8 of its 15
shard-mates, and sent its Hellos twice as often as the topic's budget (docs/scale.md, session 10).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

from .shards import home_shard

PER_SHARD = 8
MIN_KNOWN = 128  # entries are small (~400 bytes); what a node with 32 peers always had
MAX_KNOWN = 8192  # ~1 MB of entries; 8 per shard up to 1,024 shards (swarm.shards.MAX_SHARDS)


@dataclass(frozen=True)
class KnownPeer:
    peer_id: str
    addrs: tuple[str, ...]
    round: int
    model: str
    last_hello: float  # wall clock when we received its latest Hello


def capacity_for(max_peers: int, shards: int) -> int:
    """How many peers a node with `max_peers` connections in an S-shard swarm remembers."""
    return min(MAX_KNOWN, max(MIN_KNOWN, 4 * max_peers, PER_SHARD * shards))


class PeerBook:
    """peer ID -> KnownPeer, at most `capacity`, each home shard's peers in the order they were last heard."""

    def __init__(self, capacity: int, shards: int = 1) -> None:
        self.capacity = max(1, capacity)
        self.shards = shards
        self._by_shard: dict[int, OrderedDict[str, KnownPeer]] = {}
        self._shard_of: dict[str, int] = {}
        # shards by how many peers they hold (count -> shards), so the largest is found in O(1)
        self._with_count: dict[int, set[int]] = {}
        self._max = 0
        self.evicted = 0

    # ---- mapping ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._shard_of)

    def __contains__(self, peer: object) -> bool:
        return peer in self._shard_of

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._shard_of))

    def get(self, peer: str) -> KnownPeer | None:
        s = self._shard_of.get(peer)
        return None if s is None else self._by_shard[s][peer]

    def __getitem__(self, peer: str) -> KnownPeer:
        kp = self.get(peer)
        if kp is None:
            raise KeyError(peer)
        return kp

    def values(self) -> list[KnownPeer]:
        return [kp for d in list(self._by_shard.values()) for kp in list(d.values())]

    def items(self) -> list[tuple[str, KnownPeer]]:
        return [(kp.peer_id, kp) for kp in self.values()]

    def on_shard(self, shard: int) -> list[KnownPeer]:
        """The peers whose home is `shard`, least recently heard first."""
        return list(self._by_shard.get(shard, {}).values())

    def counts(self) -> dict[int, int]:
        """home shard -> peers known there."""
        return {s: len(d) for s, d in self._by_shard.items() if d}

    # ---- updates ---------------------------------------------------------------------------------------------

    def add(self, kp: KnownPeer) -> None:
        """Record (or refresh) a peer heard just now; forget one peer if the book is over capacity (module doc)."""
        s = self._shard_of.get(kp.peer_id)
        if s is not None:
            d = self._by_shard[s]
            d[kp.peer_id] = kp
            d.move_to_end(kp.peer_id)
            return
        s = home_shard(kp.peer_id, self.shards)
        self._by_shard.setdefault(s, OrderedDict())[kp.peer_id] = kp
        self._shard_of[kp.peer_id] = s
        self._moved(s, +1)
        if len(self._shard_of) > self.capacity:
            largest = self._with_count[self._max]
            victim_shard = s if s in largest else next(iter(largest))
            victim = next(iter(self._by_shard[victim_shard]))
            self.remove(victim)
            self.evicted += 1

    def remove(self, peer: str) -> None:
        s = self._shard_of.pop(peer, None)
        if s is None:
            return
        del self._by_shard[s][peer]
        self._moved(s, -1)

    def __delitem__(self, peer: str) -> None:
        if peer not in self._shard_of:
            raise KeyError(peer)
        self.remove(peer)

    def _moved(self, shard: int, delta: int) -> None:
        new = len(self._by_shard[shard])
        old = new - delta
        if old > 0:
            bucket = self._with_count[old]
            bucket.discard(shard)
            if not bucket:
                del self._with_count[old]
        if new > 0:
            self._with_count.setdefault(new, set()).add(shard)
        else:
            del self._by_shard[shard]
        if new > self._max:
            self._max = new
        elif old == self._max and old not in self._with_count:  # delta is +-1: the largest now holds one fewer
            self._max = new
