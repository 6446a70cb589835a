"""Maintenance, every heartbeat: expire bans, close connections from banned peers that dialed us again, and close
connections whose pubsub link died (swarm.host.StalledLinks) so discovery redials them.

A mixin of swarm.mesh.Mesh; it uses the facade's standing, pubsub, host, nursery, stall tracker and counters.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import trio
from libp2p.peer.id import ID

from .host import StalledLinks, disconnect_quietly, drop_dead_peer, link_state
from .mesh_records import MeshConfig, MeshCounters
from .validator import PeerStanding

log = logging.getLogger("swarm.mesh")  # one log name for the whole mesh, as before it was split into modules


class MaintenanceMixin:
    # from the facade (swarm.mesh.Mesh), whose peers() this refreshes
    config: MeshConfig
    standing: PeerStanding
    _host: Any
    _pubsub: Any
    _nursery: trio.Nursery | None
    _stalls: StalledLinks
    _lock: threading.Lock
    _c: MeshCounters

    async def _maintenance_loop(self) -> None:
        while True:
            await trio.sleep(self.config.heartbeat_s)
            with self._lock:
                expired = self.standing.expired()
            for peer in expired:
                log.info("ban of %s expired", peer)
                self._pubsub.remove_from_blacklist(ID.from_base58(peer))
            # a banned peer may dial us again: the host accepts the connection, so close it here
            for pid in list(self._host.get_connected_peers()):
                with self._lock:
                    banned = self.standing.is_banned(pid.to_base58())
                if banned:
                    await disconnect_quietly(self._host, pid)
            self._drop_stalled_links()
            self.peers()  # refresh the cache read by other threads

    def _drop_stalled_links(self) -> None:
        """Close connections whose pubsub link died while they stayed up (issue 12, item 11); discovery redials."""
        if self._nursery is None or self.config.pubsub_stall_s <= 0:
            return

        def banned(pid: ID) -> bool:  # closed by the ban logic anyway: not a dead link
            with self._lock:
                return self.standing.is_banned(pid.to_base58())

        for pid in self._stalls.check(self._host, self._pubsub, trio.current_time(), banned):
            # which half was missing, and over how many connections: the cause of links that never come up on a loaded
            # machine is not known yet (docs/scale.md); these say where to look
            why = link_state(self._pubsub, pid)
            try:
                conns = len(self._host.get_network().get_connections(pid))
            except Exception:
                conns = -1
            log.warning("pubsub link to %s is dead (%s for %.0f s, %d connection(s)): reconnecting", pid,
                        why.replace("_", " "), self.config.pubsub_stall_s, conns)
            with self._lock:
                self._c.stalled_links += 1
                self._c.stalled_why[why] = self._c.stalled_why.get(why, 0) + 1
            self._nursery.start_soon(drop_dead_peer, self._host, pid)
