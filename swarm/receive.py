"""Receiving: the libp2p topic validator (MessageValidator.check, rejections charged to the peers responsible) and the
hand-off of each accepted message: a RolloutBatch onto the bounded `incoming` channel, a Hello to discovery.

A mixin of swarm.mesh.Mesh (its state is set up by `_init_receiving`); it uses the facade's validator, standing,
`incoming` channel, discovery and counters, and bans through swarm.bans.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2

from protocol.identity import Identity
from protocol.messages import Hello, Message, RolloutBatch

from .discovery import Discovery
from .host import peer_id_str
from .mesh_records import MeshConfig, MeshCounters, Received
from .receipts import Receipts
from .validator import MessageValidator, PeerStanding, Rejected

log = logging.getLogger("swarm.mesh")  # one log name for the whole mesh, as before it was split into modules


class ReceivingMixin:
    # from the facade (swarm.mesh.Mesh); _ban from swarm.bans.BansMixin
    config: MeshConfig
    validator: MessageValidator
    standing: PeerStanding
    _send: trio.MemorySendChannel[Received]
    _discovery: Discovery | None
    _lock: threading.Lock
    _c: MeshCounters
    _receipts: Receipts

    def _init_receiving(self, identity: Identity) -> None:
        self._stash: OrderedDict[bytes, tuple[Message, int, str]] = OrderedDict()  # libp2p msg id -> validated message
        self._delivered: OrderedDict[bytes, None] = OrderedDict()  # recent delivered msg ids (bounded), see _validate
        self._my_id_bytes = ID.from_base58(identity.peer_id).to_bytes()

    async def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        """libp2p topic validator. Never raises: returns False for any rejection (notes item 7)."""
        try:
            if msg.from_id == self._my_id_bytes:
                return True  # our own publish (a forwarded copy claiming to be us is dropped by pubsub itself)
            msg_id = msg.from_id + msg.seqno
            # The same libp2p message arriving twice: py-libp2p marks a message seen only after validating it, so a
            # second copy can reach us while (or just after) the first is handled. Not a replay by its publisher.
            if msg_id in self._stash or msg_id in self._delivered:
                with self._lock:
                    self._c.duplicates += 1
                return False
            publisher = peer_id_str(msg.from_id)
            fwd = forwarder.to_base58()
            topic = "|".join(msg.topicIDs)  # signed by the publisher with the message: the validator checks it fits
            with self._lock:
                try:
                    decoded = self.validator.check(msg.data, publisher, fwd, lagging=self._lagging(), topic=topic)
                except Rejected as r:
                    banned = self.standing.on_rejection(r.reason, publisher, fwd, len(msg.data))
                    log.debug("rejected %s from %s via %s", r.reason, publisher, fwd)
                else:
                    banned = []
                    self._stash[msg_id] = (decoded, len(msg.data), fwd)
                    while len(self._stash) > 1024:  # accepted but never delivered (e.g. pubsub dropped it later)
                        self._stash.popitem(last=False)
                    return True
            for p in banned:
                self._ban(p, "too many rejections", already_marked=True)
            return False
        except Exception:
            log.exception("topic validator failed; rejecting")
            return False

    def _lagging(self) -> bool:
        """The node is not draining `incoming`: shed rollouts at validation (cheaper than validating, forwarding and
        then dropping them at a full channel)."""
        return self._send.statistics().current_buffer_used >= 0.75 * self.config.incoming_capacity

    def _on_message(self, msg: rpc_pb2.Message) -> None:
        """Called synchronously by GuardedPubsub for each new validated message: never blocks."""
        if msg.from_id == self._my_id_bytes:
            return
        msg_id = msg.from_id + msg.seqno
        entry = self._stash.pop(msg_id, None)
        self._delivered[msg_id] = None
        while len(self._delivered) > 4096:
            self._delivered.popitem(last=False)
        if entry is None:
            log.debug("validated message without a stash entry; dropped")
            return
        decoded, size, via = entry
        now = time.time()
        if isinstance(decoded, Hello):
            with self._lock:
                self._c.accepted_hellos += 1
                self._c.bytes_in += size
                self._c.bytes_in_hellos += size
            if self._discovery is not None:
                self._discovery.on_hello(decoded, now, via=via)
            return
        assert isinstance(decoded, RolloutBatch)
        with self._lock:
            self._c.accepted += 1
            self._c.bytes_in += size
            self._c.latency_ms.append((now - decoded.created_at) * 1000.0)
            del self._c.latency_ms[:-1000]
        self._receipts.write("acc", sender=decoded.sender, seq=decoded.seq, created_at=decoded.created_at, via=via)
        try:
            self._send.send_nowait(Received(decoded, decoded.sender, now, size, via))
        except trio.WouldBlock:
            with self._lock:
                self._c.incoming_dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
