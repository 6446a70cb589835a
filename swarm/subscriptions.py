"""Shard subscriptions (swarm.shards): which topics we listen to this epoch, rotating them as the round advances,
and dialing peers so every shard we listen to has members among our connections.

A mixin of swarm.mesh.Mesh (its state is set up by `_init_subscriptions`); it uses the facade's config, pubsub,
discovery, nursery and round.
"""
from __future__ import annotations

import logging
import math
import random
from typing import Any

import trio

from protocol.messages import PROTOCOL_VERSION

from .discovery import Discovery
from .mesh_records import MeshConfig
from .receipts import Receipts
from .shards import epoch_of, shard_topic, subscribed_shards

log = logging.getLogger("swarm.mesh")  # one log name for the whole mesh, as before it was split into modules


SHARD_MIN_PEERS = 4  # connected peers we want on each shard we listen to (gossipsub's D_low, swarm/host.py)


class ShardSubscriptionsMixin:
    # from the facade (swarm.mesh.Mesh)
    config: MeshConfig
    lobby: str | None
    peer_id: str
    _pubsub: Any
    _discovery: Discovery | None
    _nursery: trio.Nursery | None
    _round: int
    _receipts: Receipts

    def _init_subscriptions(self) -> None:
        self._subscribed: tuple[str, ...] = ()  # topics we listen to now (run / _shard_loop)
        self._shard_epoch = 0

    def _all_topics(self) -> list[str]:
        cfg = self.config
        topics = [shard_topic(cfg.swarm, PROTOCOL_VERSION, cfg.shards, s) for s in range(cfg.shards)]
        return topics + ([self.lobby] if self.lobby else [])

    def _listening_shards(self) -> tuple[int, ...]:
        cfg = self.config
        return subscribed_shards(self.peer_id, cfg.shards, cfg.shard_fanin, self._shard_epoch)

    async def _update_subscriptions(self) -> None:
        """Subscribe to this epoch's topics, then leave the old ones (new first: the home shard never has a gap)."""
        cfg = self.config
        self._shard_epoch = epoch_of(self._round, cfg.shard_rotate_rounds)
        wanted = tuple(shard_topic(cfg.swarm, PROTOCOL_VERSION, cfg.shards, s) for s in self._listening_shards())
        wanted += (self.lobby,) if self.lobby else ()
        for topic in wanted:
            if topic not in self._subscribed:
                await self._pubsub.subscribe(topic)
        old, self._subscribed = self._subscribed, wanted
        for topic in old:
            if topic not in wanted:
                await self._pubsub.unsubscribe(topic)
        if old != wanted:
            self._receipts.write("listen", shards=list(self._listening_shards()))
        if old and old != wanted:
            log.info("epoch %d: listening to shards %s of %d", self._shard_epoch, self._listening_shards(), cfg.shards)

    async def _shard_loop(self) -> None:
        """Rotate the fan-in shards when the node's round (set_status) enters a new epoch, and keep every shard we
        listen to reachable (_reach_shards) at the new epoch and every Hello interval."""
        last_reach = -math.inf
        while True:
            await trio.sleep(self.config.heartbeat_s)
            rotate = epoch_of(self._round, self.config.shard_rotate_rounds) != self._shard_epoch
            if rotate:
                try:
                    await self._update_subscriptions()
                except Exception:  # a failed rotation keeps the old shards (retried next heartbeat), never the node
                    log.warning("rotating shards failed", exc_info=True)
            now = trio.current_time()
            if rotate or now - last_reach >= self.config.hello_interval_s:
                last_reach = now
                self._reach_shards()

    def _reach_shards(self, want: int = SHARD_MIN_PEERS) -> None:
        """Our connections were made for whichever Hellos came first; a shard we listen to (a fan-in shard we just
        rotated into, above all) may have no member among them, and then its messages never reach us. Dial a few
        peers we heard Hellos from (Discovery.known) that listen to that shard: anyone's home shard follows from its
        peer ID, and its fan-in shards from its peer ID and the round in its Hello (assuming our --shard-fanin and
        --shard-rotate-rounds; a wrong guess costs one useless connection). Bounded: only while fewer than `want`
        connected peers are on that shard's topic."""
        if self._discovery is None or self._nursery is None:
            return
        ps, disc, cfg = self._pubsub, self._discovery, self.config
        known = [(k, subscribed_shards(k.peer_id, cfg.shards, cfg.shard_fanin, epoch_of(k.round, cfg.shard_rotate_rounds)))
                 for k in list(disc.known.values()) if k.addrs]
        for shard in self._listening_shards():
            topic = shard_topic(cfg.swarm, PROTOCOL_VERSION, cfg.shards, shard)
            have = sum(1 for p in ps.peer_topics.get(topic, set()) if p in ps.peers)
            cands = [k for k, theirs in known if shard in theirs and not disc.connected(k.peer_id)]
            random.shuffle(cands)
            for k in cands[:max(0, want - have)]:
                self._nursery.start_soon(disc.dial, k.peer_id, list(k.addrs))
