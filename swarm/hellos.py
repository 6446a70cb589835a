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
from .shards import hello_every

log = logging.getLogger("swarm.mesh")

FRESH_GAP = 0.5  # an early Hello for a new peer comes at least this fraction of an interval after the previous one


class HelloMixin:
    # from the facade (swarm.mesh.Mesh: also peers(), connected()) and swarm.publish.PublishingMixin (also _next_seq, _publish)
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
        self._lobby_peers_seen: set[str] = set()  # connected lobby peers we sent a lobby Hello since they connected

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
        then carries N / S Hellos per interval, the size of one shard. A newly connected lobby peer gets one with our
        next Hello (at least FRESH_GAP of an interval after the last), so a newcomer learns who is out there without
        waiting S intervals."""
        ps = self._pubsub
        now_peers = {p.to_base58() for p in ps.peer_topics.get(self.lobby, set()) if p in ps.peers}
        self._lobby_peers_seen &= set(self.connected())  # a peer is new again only after it disconnected
        now = trio.current_time()
        every = self.hello_every_s()
        due = (now - self._lobby_hello_at >= every * self.config.shards
               or (self._any_newcomer(now_peers - self._lobby_peers_seen)
                   and now - self._lobby_hello_at >= every * FRESH_GAP))
        if due:
            self._lobby_hello_at = now
            self._lobby_peers_seen |= now_peers
        return due

    def _book(self) -> Any:
        """Discovery's peer book (swarm.peerbook.PeerBook), or None before the mesh runs."""
        return self._discovery.known if self._discovery is not None else None

    def _any_newcomer(self, peers: set[str]) -> bool:
        """Whether one of these newly connected peers is new to the swarm for us: not in our book (we never had its
        Hello). A known peer that reconnected or re-subscribed has had our Hellos before; in a large swarm on a busy
        machine that happens all the time, and re-announcing to the whole topic for each made the lobby carry
        every node's every Hello."""
        book = self._book()
        return bool(peers) and (book is None or any(p not in book for p in peers))

    def hello_every_s(self) -> float:
        """Our Hello interval now: hello_every() of the peers we know on our home shard (its Hellos' topic)."""
        book = self._book()
        members = 1 + (len(book.on_shard(self.home_shard)) if book is not None else 0)
        return hello_every(self.config.hello_interval_s, members)

    async def _hello_loop(self) -> None:
        """Announce ourselves every hello_every_s(), and sooner when a new peer connects (so it learns of us), but
        not within FRESH_GAP of an interval after the last: each such Hello goes to the whole topic, and on a busy
        machine a peer's subscriptions come and go while its connection stays (32 idle relays on 2 cores: every
        Hello also went to the lobby, and each relay accepted every Hello of the swarm, 3.5/s). A peer counts when we
        have not announced ourselves since it connected and we never had its Hello (`_any_newcomer`)."""
        last = -math.inf
        announced: set[str] = set()  # peers connected at (or since) one of our Hellos
        step = min(1.0, self.config.hello_interval_s)
        while True:
            await trio.sleep(step)
            now_peers = set(self.peers())
            announced &= set(self.connected())
            now = trio.current_time()
            fresh = self._any_newcomer(now_peers - announced)
            every = self.hello_every_s()
            if now_peers and (now - last >= every or (fresh and now - last >= max(step, every * FRESH_GAP))):
                try:
                    await self._publish_hello()
                except Exception:
                    log.warning("publishing Hello failed", exc_info=True)
                last = now
                announced |= now_peers
