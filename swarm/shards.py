"""Topic sharding: which gossip topics a node publishes to and listens on. Pure: no network, no clock.

Why: with one topic per swarm every node receives (and validates) every node's rollouts, so per-node inbound bytes and
CPU grow linearly with the swarm, while a node only trains on J peers' groups a round (docs/scale.md). With S shards a
node publishes its rollouts to its *home* shard only and listens to its home shard plus `fanin - 1` other shards,
so it takes in about fanin/S of the swarm's traffic. The other shards rotate every `rotate_rounds` rounds
(deterministically from the peer ID and the epoch, so anyone can recompute them), and every other shard comes up once
per cycle of ceil((S - 1) / (fanin - 1)) epochs: over time a node still hears from the whole swarm.

Everything is a function of (peer ID, S, fanin, epoch): no coordination, no extra wire fields. S is swarm-wide: it is
part of every topic name when S > 1, so nodes that disagree on S simply do not share rollouts (instead of half-sharing).
S = 1 keeps the single topic name the swarm has always used, so existing swarms are unaffected.

Also here: how often a node sends its Hello on a topic (`hello_every`), so that a topic's Hello rate is flat at any
size; swarm.hellos sends them, scripts/scale_sim.py models them with the same function.
"""
from __future__ import annotations

import hashlib
import math

MAX_SHARDS = 1024  # one topic validator per shard is registered up front; far beyond any swarm we can run

# A topic carries about this many Hellos per hello_interval_s, however many nodes are on it. Every Hello is forwarded
# over every mesh link of its topic, so with a fixed interval each node's Hello traffic grew with the nodes on its
# shards; it was most of an idle node's CPU (12 relays: ~25 RPCs/s each, docs/scale.md "What an idle node spends").
# 2, not 5 (session 9): at 5 a node on 3 topics (home, one fan-in shard, lobby) took 1.5 Hellos/s once its shards had
# 5 members, 29 a round at 32 processes (10.9 of 49 KB inbound), against 0.6/s with 2 members a shard at 8 processes;
# with 2 the rate is that of 8 processes at any size, and a shard still hears a Hello every 5 s.
HELLOS_PER_INTERVAL = 2


def hello_every(base_s: float, members: int) -> float:
    """Seconds between one node's Hellos on a topic of `members` nodes (itself included): `base_s` up to
    HELLOS_PER_INTERVAL members, then proportionally longer, so the topic's Hello rate stays flat."""
    return base_s * max(1.0, members / HELLOS_PER_INTERVAL)


def base_topic(swarm: str, version: int) -> str:
    """The single topic of an unsharded swarm (S = 1): the name every node has used since v1."""
    return f"swarm-node/{swarm}/v{version}"


def shard_topic(swarm: str, version: int, shards: int, shard: int) -> str:
    """Rollouts of the nodes whose home is `shard` (and their Hellos). S = 1 -> the base topic, unchanged."""
    _check(shards, 1)
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in [0, {shards})")
    if shards == 1:
        return base_topic(swarm, version)
    return f"{base_topic(swarm, version)}/s{shards}/{shard}"


def lobby_topic(swarm: str, version: int, shards: int) -> str | None:
    """The swarm-wide Hello topic of a sharded swarm (None when S = 1: the single topic already reaches everyone).

    Every node listens here so that a newcomer whose bootstrap peer lives on another shard still discovers the swarm.
    """
    _check(shards, 1)
    return None if shards == 1 else f"{base_topic(swarm, version)}/s{shards}/lobby"


def _h64(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).digest()[:8], "big")


def home_shard(peer_id: str, shards: int) -> int:
    """A node's home shard: a stable hash of its peer ID (same answer on every node, in every Python)."""
    _check(shards, 1)
    return 0 if shards == 1 else _h64("home", peer_id) % shards


def epoch_of(round: int, rotate_rounds: int) -> int:
    """Fan-in epoch for a round: the other shards a node listens to change every `rotate_rounds` rounds."""
    if rotate_rounds < 1:
        raise ValueError("rotate_rounds must be >= 1")
    return max(0, int(round)) // rotate_rounds


def subscribed_shards(peer_id: str, shards: int, fanin: int, epoch: int) -> tuple[int, ...]:
    """Home shard first, then min(fanin, S) - 1 other shards for this epoch (sorted).

    The non-home shards are visited in a peer-specific order, re-drawn each cycle, fanin - 1 at a time, so every shard
    comes up once per cycle and different peers spread over different shards. The order is an affine permutation of
    the S - 1 other shards, position p -> others[(a * p + b) mod (S - 1)] with a coprime to S - 1 and (a, b) from one
    sha256 of (peer, cycle): O(fanin) per call. Why: `_reach_shards` (swarm/subscriptions.py) computes this for every peer in the book
    (up to 8,192) every Hello interval; the sha256-driven Fisher-Yates it replaces cost S - 1 hashes a call
    (0.6 ms at S = 625: 3.2 s of CPU per 10 s interval over the 5,000-peer book of a 10,000-node swarm;
    scripts/scale_sim.py, docs/scale.md).
    """
    _check(shards, fanin)
    home = home_shard(peer_id, shards)
    extra = min(fanin, shards) - 1
    if extra == 0:
        return (home,)
    m = shards - 1  # the other shards: index i < home -> shard i, else shard i + 1
    if extra >= m:
        return (home, *[s for s in range(shards) if s != home])
    per_cycle = math.ceil(m / extra)
    cycle, slot = divmod(max(0, int(epoch)), per_cycle)
    h = _h64("order", peer_id, cycle)
    a, b = (h >> 32) % m, (h & 0xFFFFFFFF) % m
    while math.gcd(a, m) != 1:  # a unit mod m makes p -> a * p + b a bijection; units are dense, so few steps
        a = (a + 1) % m
    # the last slot of a cycle wraps to the start of the order: positions mod m, distinct within a slot (extra < m)
    picked = [(a * ((slot * extra + t) % m) + b) % m for t in range(extra)]
    return (home, *sorted(i if i < home else i + 1 for i in picked))


def epochs_to_cover(shards: int, fanin: int) -> int | None:
    """Epochs after which a node has listened to every shard at least once; None if it never does (fanin 1, S > 1)."""
    _check(shards, fanin)
    extra = min(fanin, shards) - 1
    if shards == 1 or extra >= shards - 1:
        return 1
    return None if extra == 0 else math.ceil((shards - 1) / extra)


def _check(shards: int, fanin: int) -> None:
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be in [1, {MAX_SHARDS}]")
    if fanin < 1:
        raise ValueError("fanin must be >= 1")
