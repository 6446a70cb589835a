"""Bans: cutting off a peer that broke py-libp2p itself or collected too many rejections (PeerStanding).

A mixin of swarm.mesh.Mesh; it uses the facade's standing, pubsub, host, nursery and counters. Bans expire in
swarm.maintenance.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import trio
from libp2p.peer.id import ID

from .host import disconnect_quietly
from .mesh_records import MeshConfig, MeshCounters
from .validator import PeerStanding

log = logging.getLogger("swarm.mesh")  # one log name for the whole mesh, as before it was split into modules


class BansMixin:
    # from the facade (swarm.mesh.Mesh)
    config: MeshConfig
    standing: PeerStanding
    peer_id: str
    _host: Any
    _pubsub: Any
    _nursery: trio.Nursery | None
    _lock: threading.Lock
    _c: MeshCounters

    def _on_bad_peer(self, peer: ID, why: str) -> None:
        with self._lock:
            self._c.bad_frames += 1
            self.standing.ban(peer.to_base58())
        self._ban(peer.to_base58(), why, already_marked=True)

    def _ban(self, peer: str, why: str, already_marked: bool = False) -> None:
        if peer == self.peer_id:
            return
        with self._lock:
            if not already_marked:
                self.standing.ban(peer)
            self._c.bans += 1
        log.warning("banning peer %s for %.0f s (%s)", peer, self.config.ban_s, why)
        pid = ID.from_base58(peer)
        try:
            # Drops its messages and refuses its new pubsub streams. Not add_to_blacklist(): its teardown task resets
            # the stream and then does `del self.peers[pid]`, which raises KeyError when the stream's reader removed the
            # peer first (_handle_dead_peer) and that error in a pubsub service task took the whole node down (seen
            # with tests/test_byzantine.py). The disconnect below ends the stream; _handle_dead_peer cleans up fully.
            self._pubsub.blacklisted_peers.add(pid)
        except Exception:
            log.debug("blacklist failed", exc_info=True)
        if self._nursery is not None and self._host is not None:
            self._nursery.start_soon(disconnect_quietly, self._host, pid)
