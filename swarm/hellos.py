"""Hellos: announcing ourselves (round, model, listen addresses) on our home shard and, less often, on the lobby.

A mixin of swarm.mesh.Mesh (its state is set up by `_init_hellos`); it publishes through swarm.publish and reads the
facade's peers, round and model.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import trio

from protocol.envelope import seal
from protocol.identity import Identity
from protocol.messages import MAX_ADDR_CHARS, MAX_ADDRS, PROTOCOL_VERSION, Hello

from .mesh_records import MeshConfig, MeshCounters

log = logging.getLogger("swarm.mesh")

# A topic carries about this many Hellos per hello_interval_s, however many nodes are on it. Every Hello is forwarded
# over every mesh link of its topic, so with a fixed interval each node's Hello traffic grew with the nodes on its
# shards; it was most of an idle node's CPU (12 relays: ~25 RPCs/s each, docs/scale.md "What an idle node spends").
HELLOS_PER_INTERVAL = 5


def hello_every(base_s: float, members: int) -> float:
    """Seconds between one node's Hellos on a topic of `members` nodes (itself included): `base_s` up to
    HELLOS_PER_INTERVAL members, then proportionally longer, so the topic's Hello rate stays flat."""
    return base_s * max(1.0, members / HELLOS_PER_INTERVAL)


class HelloMixin:
    # from the facade (swarm.mesh.Mesh: also peers()) and swarm.publish.PublishingMixin (also _next_seq, _publish)
    identity: Identity
    config: MeshConfig
    topic: str
    lobby: str | None
    peer_id: str
    _pubsub: Any
    _lock: threading.Lock
    _c: MeshCounters
    _listen_addrs: list[str]
    _round: int
    _model: str
    _publish_lock: trio.Lock
    _discovery: Any
    home_shard: int

    def _init_hellos(self) -> None:
        self._lobby_hello_at = -math.inf  # trio time of our last Hello on the lobby
        self._lobby_peers_seen: set[str] = set()  # lobby peers at that Hello: a new one gets a Hello at once

    async def _publish_hello(self) -> None:
        addrs = tuple(a for a in self._listen_addrs if len(a) <= MAX_ADDR_CHARS)[:MAX_ADDRS]
        targets = [self.topic]
        if self.lobby is not None and self._lobby_hello_due():
            targets.append(self.lobby)
        for topic in targets:  # one sealed Hello per topic: a node on both must not see the same seq twice (replay)
            hello = Hello(sender=self.peer_id, swarm=self.config.swarm, version=PROTOCOL_VERSION, round=self._round,
                          created_at=time.time(), seq=self._next_seq(), model=self._model, listen_addrs=addrs)
            async with self._publish_lock:
                await self._publish(seal(hello, self.identity), topic)
            with self._lock:
                self._c.published_hellos += 1

    def _lobby_hello_due(self) -> bool:
        """Lobby Hellos reach every node, so each node sends them S times less often than shard Hellos: the lobby
        then carries N / S Hellos per interval, the size of one shard. A newly connected lobby peer gets one at once
        (as with S = 1), so a newcomer learns who is out there without waiting S intervals."""
        ps = self._pubsub
        now_peers = {p.to_base58() for p in ps.peer_topics.get(self.lobby, set()) if p in ps.peers}
        now = trio.current_time()
        due = (now - self._lobby_hello_at >= self.hello_every_s() * self.config.shards
               or bool(now_peers - self._lobby_peers_seen))
        if due:
            self._lobby_hello_at, self._lobby_peers_seen = now, now_peers
        return due


    def hello_every_s(self) -> float:
        """Our Hello interval now: hello_every() of the peers we know on our home shard (its Hellos' topic)."""
        book = self._discovery.known if self._discovery is not None else None
        members = 1 + (len(book.on_shard(self.home_shard)) if book is not None else 0)
        return hello_every(self.config.hello_interval_s, members)

    async def _hello_loop(self) -> None:
        """Announce ourselves every hello_every_s(), and soon after a new peer joins (so it learns the others): at
        most once a second in a small swarm, as much less often as the interval grew in a large one (a node
        joining a large swarm otherwise made every node it connected to re-announce to the whole topic)."""
        last = -math.inf
        before: set[str] = set()
        step = min(1.0, self.config.hello_interval_s)
        while True:
            await trio.sleep(step)
            now_peers = set(self.peers())
            now = trio.current_time()
            fresh = bool(now_peers - before)
            before = now_peers
            every = self.hello_every_s()
            fresh_gap = step * every / self.config.hello_interval_s
            if now_peers and (now - last >= every or (fresh and now - last >= fresh_gap)):
                try:
                    await self._publish_hello()
                except Exception:
                    log.warning("publishing Hello failed", exc_info=True)
                last = now
