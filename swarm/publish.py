"""Publishing: our sequence numbers, splitting rollouts into envelopes that fit, and pacing what we send.

A mixin of swarm.mesh.Mesh (its state is set up by `_init_publishing`); it uses the facade's identity, config, home
topic, pubsub and counters.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import trio

from protocol.envelope import seal
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.messages import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Rollout, RolloutBatch

from .mesh_records import MeshConfig, MeshCounters
from .validator import TokenBucket

log = logging.getLogger("swarm.mesh")


class PublishingMixin:
    # from the facade (swarm.mesh.Mesh)
    identity: Identity
    config: MeshConfig
    topic: str
    peer_id: str
    _pubsub: Any
    _lock: threading.Lock
    _c: MeshCounters

    def _init_publishing(self, config: MeshConfig) -> None:
        self._seq = 0
        self._out_msgs = TokenBucket(config.publish_msgs_per_s, max(1.0, config.publish_msgs_per_s / 2), 0.0)
        self._out_bytes = TokenBucket(config.publish_bytes_per_s, max(float(MAX_MESSAGE_BYTES),
                                                                        config.publish_bytes_burst), 0.0)
        self._publish_lock = trio.Lock()

    def _next_seq(self) -> int:
        # Time-based so it keeps rising across restarts (peers' replay windows remember our last seq).
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    def _seal_split(self, round: int, model: str, items: list[Rollout]) -> list[tuple[RolloutBatch, bytes]]:
        if not items:
            return []
        batch = RolloutBatch(sender=self.peer_id, swarm=self.config.swarm, version=PROTOCOL_VERSION, round=round,
                             created_at=time.time(), seq=self._next_seq(), model=model, rollouts=tuple(items))
        try:
            return [(batch, seal(batch, self.identity))]
        except ProtocolError as e:
            if e.reason != "size":
                raise
        if len(items) == 1:
            log.warning("dropping one rollout group: too big for a single %d-byte message", MAX_MESSAGE_BYTES)
            with self._lock:
                self._c.oversize_dropped += 1
            return []
        mid = len(items) // 2
        return self._seal_split(round, model, items[:mid]) + self._seal_split(round, model, items[mid:])

    async def _publish(self, data: bytes, topic: str | None = None) -> None:
        # Pace (no bursts beyond ~1 message): keeps us far from every receiver's per-sender token bucket.
        while True:
            now = trio.current_time()
            wait = max(self._out_msgs.wait_time(1, now), self._out_bytes.wait_time(len(data), now))
            if wait <= 0:
                break
            await trio.sleep(wait)
        now = trio.current_time()
        self._out_msgs.take(1, now)
        self._out_bytes.take(len(data), now)
        await self._pubsub.publish(topic or self.topic, data)
        with self._lock:
            self._c.bytes_out += len(data)
