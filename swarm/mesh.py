"""The node's view of the swarm: gossipsub topics carrying signed RolloutBatch and Hello messages.

Flow of an incoming message: py-libp2p checks its own signature (so msg.from_id, the original publisher, is
authenticated) -> our async topic validator runs MessageValidator.check (rejections are counted by reason, charged to
the peers responsible, and neither delivered nor forwarded) and stashes the decoded message -> GuardedPubsub hands the
accepted message to `_on_message` synchronously, which puts a `Received` on the bounded `incoming` channel (never
blocking the pubsub reader; overflow is counted) or feeds a Hello to discovery.

This module is the facade: `Mesh` wires the pieces together, runs the host (lifecycle) and holds the public API and
stats(). The pieces, each one concern, are mixins of `Mesh` in their own modules:
  swarm.mesh_records   MeshConfig, Received, the counters     swarm.publish        sequence numbers, sealing, pacing
  swarm.hellos         our Hellos (home shard and lobby)       swarm.subscriptions  shard topics, rotation, reaching
  swarm.receive        topic validator and hand-off            swarm.bans           banning a peer
  swarm.maintenance    ban expiry, banned re-dials, dead pubsub links
"""
from __future__ import annotations

import errno
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

import multiaddr
import trio
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address

from protocol.identity import Identity
from protocol.messages import MAX_ROLLOUTS, PROTOCOL_VERSION, Rollout

from .bans import BansMixin
from .discovery import Discovery
from .hellos import HelloMixin
from .host import StalledLinks, build_host, build_pubsub, build_router, drop_dead_peer
from .liveness import Liveness, hear_inbound_pings
from .maintenance import MaintenanceMixin
from .mesh_records import MeshConfig, MeshCounters, Received, topic_for
from .publish import PublishingMixin
from .receipts import Receipts
from .receive import ReceivingMixin
from .shards import epoch_of, home_shard, lobby_topic, shard_topic, subscribed_shards
from .subscriptions import SHARD_MIN_PEERS, ShardSubscriptionsMixin
from .validator import REASONS, MessageValidator, PeerStanding

__all__ = ["Mesh", "MeshConfig", "Received", "topic_for", "SHARD_MIN_PEERS"]

log = logging.getLogger(__name__)


class Mesh(PublishingMixin, HelloMixin, ShardSubscriptionsMixin, ReceivingMixin, BansMixin, MaintenanceMixin):
    def __init__(self, identity: Identity, config: MeshConfig) -> None:
        self.identity = identity
        self.config = config
        # Topics (swarm.shards): our rollouts and Hellos go to our home shard's topic (`self.topic`); we listen to it,
        # to min(fanin, S) - 1 rotating other shards and, when sharded, to the lobby (swarm-wide Hellos, so discovery
        # works whichever shard a bootstrap peer is on). S = 1: one topic, named exactly as before.
        epoch_of(0, config.shard_rotate_rounds)  # ValueError on a bad value, before anything starts
        subscribed_shards(identity.peer_id, config.shards, config.shard_fanin, 0)
        self.home_shard = home_shard(identity.peer_id, config.shards)
        self.topic = shard_topic(config.swarm, PROTOCOL_VERSION, config.shards, self.home_shard)
        self.lobby = lobby_topic(config.swarm, PROTOCOL_VERSION, config.shards)
        self._init_subscriptions()
        self._init_hellos()
        self.validator = MessageValidator(
            config.swarm, PROTOCOL_VERSION, max_age_s=config.max_age_s, max_clock_skew_s=config.max_clock_skew_s,
            rate=config.rate(), replay_per_sender=config.replay_per_sender, shards=config.shards)
        self.standing = PeerStanding(config.strike_threshold, config.strike_window_s, config.ban_s)
        send, recv = trio.open_memory_channel[Received](config.incoming_capacity)
        self._send = send
        self.incoming: trio.MemoryReceiveChannel[Received] = recv
        self._lock = threading.Lock()  # guards counters/snapshots read by stats() from other threads
        self._c = MeshCounters()
        self._init_receiving(identity)
        self._round = 0
        self._model = "unknown"  # protocol requires a non-empty model name; set_status() replaces it
        self._init_publishing(config)
        self._host: Any = None
        self._pubsub: Any = None
        self._discovery: Discovery | None = None
        self._liveness: Liveness | None = None
        self._nursery: trio.Nursery | None = None
        self._listen_addrs: list[str] = []
        self._peers_cache: list[str] = []
        self._trio_thread: int | None = None
        self._stalls = StalledLinks(config.pubsub_stall_s)
        self._receipts = Receipts(config.receipts)

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run host, pubsub, router, discovery and background tasks until cancelled."""
        self._trio_thread = threading.get_ident()
        cfg = self.config
        host = build_host(self.identity, [cfg.listen], mdns=cfg.mdns)
        router = build_router(cfg.heartbeat_s)
        pubsub = build_pubsub(host, router, on_message=self._on_message, on_bad_peer=self._on_bad_peer)
        for topic in self._all_topics():  # the same validator on every topic we may ever listen to
            pubsub.set_topic_validator(topic, self._validate, True)  # async: a raising sync one kills the host [7]
        self._host, self._pubsub = host, pubsub
        try:
            async with host.run(listen_addrs=[multiaddr.Multiaddr(cfg.listen)]), _closing(host):
                # pubsub and router services start before any dial [8]
                async with background_trio_service(pubsub), background_trio_service(router):
                    await pubsub.wait_until_ready()
                    await self._update_subscriptions()
                    self._listen_addrs = self._compute_listen_addrs()
                    if not self._listen_addrs:
                        # py-libp2p only logs a failed listen and carries on deaf; a node nobody can dial is a
                        # configuration mistake the user must hear about
                        raise OSError(errno.EADDRINUSE, f"could not listen on {cfg.listen} (address in use or not local)")
                    self._discovery = Discovery(host, bootstrap=cfg.bootstrap, max_peers=cfg.max_peers,
                                                is_banned=self.standing.is_banned,
                                                backoff_max_s=cfg.bootstrap_backoff_max_s, scan_peerstore=cfg.mdns,
                                                redial_after_s=cfg.redial_after_s, own_addrs=self._listen_addrs,
                                                shards=cfg.shards,
                                                # a peer on a shard we do not listen to is heard only on the lobby,
                                                # every S Hello intervals: keep it for a few of those
                                                forget_after_s=max(3600.0, 3 * cfg.hello_interval_s * cfg.shards))
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        await nursery.start(self._discovery.run)
                        nursery.start_soon(self._hello_loop)
                        nursery.start_soon(self._maintenance_loop)
                        if cfg.shards > 1:
                            nursery.start_soon(self._shard_loop)
                        if cfg.ping_interval_s > 0:
                            self._liveness = Liveness(host, interval_s=cfg.ping_interval_s, timeout_s=cfg.ping_timeout_s,
                                                      max_misses=cfg.ping_max_misses,
                                                      on_dead=lambda pid: drop_dead_peer(host, pid),
                                                      heard_at=pubsub.heard.get)
                            hear_inbound_pings(host, pubsub.heard)
                            nursery.start_soon(self._liveness.run)
                        log.info("mesh %s listening on %s", self.topic, " ".join(self._listen_addrs))
                        task_status.started()
                        await trio.sleep_forever()
        finally:
            self._nursery = None
            self._send.close()  # consumers see EndOfChannel once drained
            self._receipts.close()

    # ---- public API -----------------------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def listen_addrs(self) -> list[str]:
        """Full multiaddrs with /p2p/<peer id>; a wildcard listen is expanded to interface addresses + 127.0.0.1."""
        return list(self._listen_addrs)

    def peers(self) -> list[str]:
        """Connected peers that subscribe to one of our topics (when sharded: the lobby, i.e. the whole swarm)."""
        if self._pubsub is None or threading.get_ident() != self._trio_thread:
            with self._lock:
                return list(self._peers_cache)
        ps = self._pubsub
        on_topics = set().union(*(ps.peer_topics.get(t, set()) for t in self._subscribed or (self.topic,)))
        out = sorted(p.to_base58() for p in on_topics if p in ps.peers)
        with self._lock:
            self._peers_cache = out
        return out

    def connected(self) -> list[str]:
        """All peers with a live connection (on our topic or not)."""
        if self._host is None:
            return []
        return sorted(p.to_base58() for p in self._host.get_connected_peers())

    def set_status(self, round: int, model: str) -> None:
        self._round, self._model = int(round), str(model)

    async def publish_rollouts(self, round: int, model: str, rollouts: Sequence[Rollout]) -> int:
        """Sign and publish rollouts as as many batches as needed (each envelope <= 1,000,000 bytes), paced.

        Returns the number of batches published. A single rollout too big for one message is dropped with a warning.
        """
        if self._pubsub is None:
            raise RuntimeError("Mesh.run() is not running")
        self.set_status(round, model)
        async with self._publish_lock:  # keeps seq order == publish order
            await self._until_topic_has_peers()
            n = 0
            items = list(rollouts)
            for i in range(0, len(items), MAX_ROLLOUTS):
                for batch, data in self._seal_split(round, model, items[i:i + MAX_ROLLOUTS]):
                    await self._publish(data)
                    with self._lock:
                        self._c.published += 1
                    self._receipts.write("pub", seq=batch.seq, created_at=batch.created_at, shard=self.home_shard)
                    n += 1
            return n

    async def _until_topic_has_peers(self) -> None:
        """Waits (up to publish_wait_s) while we are connected but nobody connected listens to our home topic. In the
        seconds after joining, discovery is still dialing the home shard's members; a batch published then reached
        nobody at all (32 processes: every batch lost was one such first batch, docs/scale.md). A node with no
        connection at all does not wait: there is no one to wait for."""
        ps = self._pubsub
        deadline = trio.current_time() + self.config.publish_wait_s
        while (trio.current_time() < deadline and self._host.get_connected_peers()
               and not any(p in ps.peers for p in ps.peer_topics.get(self.topic, ()))):
            await trio.sleep(0.1)

    def _outbound_dropped(self) -> dict[str, int]:
        queues = getattr(self._pubsub, "peer_queues", None)
        return {"rpcs": getattr(queues, "dropped_rpcs", 0), "msgs": getattr(queues, "dropped_msgs", 0)}

    def stats(self) -> dict[str, Any]:
        """Plain JSON-able counters; safe to call from any thread."""
        peers = self.peers()
        with self._lock:
            c = self._c
            lat = sorted(c.latency_ms)
            known: dict[str, Any] = {}
            known_per_shard: dict[int, int] = {}
            if self._discovery is not None:
                book = self._discovery.known
                recent = sorted(book.values(), key=lambda k: k.last_hello)[-256:]  # a big swarm's book: its newest
                known = {k.peer_id: {"round": k.round, "model": k.model, "age_s": round(time.time() - k.last_hello, 1)}
                         for k in recent}
                known_per_shard = dict(sorted(book.counts().items()))
            return {
                "peer_id": self.peer_id,
                "topic": self.topic,
                "topics": list(self._subscribed),
                "shards": {"count": self.config.shards, "home": self.home_shard, "epoch": self._shard_epoch,
                           "listening": list(self._listening_shards())},
                "listen_addrs": list(self._listen_addrs),
                "peers": peers,
                "n_peers": len(peers),
                "accepted": c.accepted,
                "accepted_hellos": c.accepted_hellos,
                "published": c.published,
                "published_hellos": c.published_hellos,
                "hello_every_s": round(self.hello_every_s(), 1),
                "bytes_in": c.bytes_in,
                "bytes_in_hellos": c.bytes_in_hellos,
                "bytes_out": c.bytes_out,
                "incoming_dropped": c.incoming_dropped,
                "oversize_dropped": c.oversize_dropped,
                "duplicates": c.duplicates,
                "bad_frames": c.bad_frames,
                "stalled_links": c.stalled_links,
                "stalled_why": dict(c.stalled_why),
                # outbound RPCs a full per-peer queue refused (a link slower than what we send it), and the messages in them
                "outbound_dropped": self._outbound_dropped(),
                "gossip_refused": self._gossip_refused(),
                # control RPCs our router sent (GRAFT/PRUNE/IHAVE/IWANT/IDONTWANT), and IHAVE/IDONTWANT entries in them
                "control_sent": dict(getattr(getattr(self._pubsub, "router", None), "control_sent", {})),
                # sends of our own batches to topic peers outside the mesh (swarm.host FLOOD_PUBLISH_MIN_BYTES)
                "flood_extra": getattr(getattr(self._pubsub, "router", None), "flood_extra", 0),
                "rejections_by_reason": {r: self.validator.counts.get(r, 0) for r in REASONS},
                "rejected_before_signature": self.validator.prechecked,
                "relay_charged": self.standing.relay_charged,
                "relay_strikes": self.standing.relay_strikes,
                "strikes": self.standing.recent(),
                "strikes_total": dict(self.standing.total),
                "banned": self.standing.banned(),
                "bans": c.bans,
                "latency_ms_p50": _pct(lat, 0.5),
                "latency_ms_p90": _pct(lat, 0.9),
                "known_peers": known,
                "known_count": len(self._discovery.known) if self._discovery else 0,
                "known_per_shard": known_per_shard,  # home shard -> peers known there (swarm.peerbook)
                "dials_ok": self._discovery.dials_ok if self._discovery else 0,
                "dials_failed": self._discovery.dials_failed if self._discovery else 0,
                "dials": {k: getattr(self._discovery, k, 0) for k in
                          ("dial_attempts", "dial_timeouts", "addrs_refused", "dials_throttled")},
                "unresponsive_dropped": self._liveness.dropped if self._liveness else 0,
                "ping_ms": dict(self._liveness.rtt_ms) if self._liveness else {},
                "ping_lagged_cycles": self._liveness.lagged_cycles if self._liveness else 0,
                "pings": {"sent": self._liveness.pings_sent if self._liveness else 0,
                          "skipped_heard": self._liveness.pings_skipped if self._liveness else 0},
            }

    def _gossip_refused(self) -> dict[str, int]:
        """Gossip requests not served (swarm.host, item 9): IWANT repeats/over the caps, repeated cache replays."""
        ps = self._pubsub
        return {"iwant": int(getattr(getattr(ps, "router", None), "iwant_refused", 0)),
                "replays": int(getattr(ps, "replays_refused", 0))}

    def _compute_listen_addrs(self) -> list[str]:
        out: list[str] = []
        for ma in self._host.get_transport_addrs():
            s = str(ma)
            if "/ip4/0.0.0.0/" in s or "/ip6/::/" in s:
                cands = [str(x) for x in expand_wildcard_address(ma)]
                if "/ip4/0.0.0.0/" in s:
                    port = ma.value_for_protocol("tcp")
                    cands.append(f"/ip4/127.0.0.1/tcp/{port}")
            else:
                cands = [s]
            for c in cands:
                full = f"{c}/p2p/{self.peer_id}"
                if full not in out:
                    out.append(full)
        return out


@asynccontextmanager
async def _closing(host: Any) -> AsyncIterator[None]:
    """Close the host's listeners and connections when the mesh stops, even when it stops by cancellation.

    py-libp2p closes them in its service teardown, but that runs inside the cancelled scope: the first await there
    raises Cancelled and the listener stays open, so peers could still dial a stopped mesh (and then log
    "add_conn failed ... Cannot schedule task after service has stopped" in a loop).
    """
    try:
        yield
    finally:
        with trio.move_on_after(5) as scope:
            scope.shield = True
            try:
                await host.get_network().close()
            except Exception:
                log.debug("closing the network failed", exc_info=True)


def _pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    return round(sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))], 2)