"""The node's view of the swarm: one gossipsub topic carrying signed RolloutBatch and Hello messages.

Flow of an incoming message: py-libp2p checks its own signature (so msg.from_id, the original publisher, is
authenticated) -> our async topic validator runs MessageValidator.check (rejections are counted by reason, charged to
the peers responsible, and neither delivered nor forwarded) and stashes the decoded message -> GuardedPubsub hands the
accepted message to `_on_message` synchronously, which puts a `Received` on the bounded `incoming` channel (never
blocking the pubsub reader; overflow is counted) or feeds a Hello to discovery.
"""
from __future__ import annotations

import errno
import logging
import math
import random
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address

from protocol.envelope import seal
from protocol.errors import ProtocolError
from protocol.identity import Identity
from protocol.messages import (
    MAX_ADDR_CHARS,
    MAX_ADDRS,
    MAX_MESSAGE_BYTES,
    MAX_ROLLOUTS,
    PROTOCOL_VERSION,
    Hello,
    Message,
    Rollout,
    RolloutBatch,
)

from .discovery import Discovery
from .liveness import Liveness
from .host import (PUBSUB_STALL_S, StalledLinks, build_host, build_pubsub, build_router, disconnect_quietly,
                   drop_dead_peer, peer_id_str)
from .shards import base_topic, epoch_of, home_shard, lobby_topic, shard_topic, subscribed_shards
from .validator import REASONS, MessageValidator, PeerStanding, RateLimit, Rejected, TokenBucket

log = logging.getLogger(__name__)


SHARD_MIN_PEERS = 4  # connected peers we want on each shard we listen to (gossipsub's D_low, swarm/host.py)


def topic_for(swarm: str, version: int = PROTOCOL_VERSION) -> str:
    """The single topic of an unsharded swarm (= shard 0 of 1); see swarm.shards for S > 1."""
    return base_topic(swarm, version)


@dataclass(frozen=True)
class MeshConfig:
    swarm: str
    listen: str = "/ip4/0.0.0.0/tcp/0"
    bootstrap: tuple[str, ...] = ()
    max_age_s: float = 900.0
    max_clock_skew_s: float = 60.0
    # What we accept from one sender (token buckets), sized to what a node absorbs (swarm.validator.RateLimit: ~22 ms
    # of CPU per MB received; 8 MB/s from one sender slowed rounds 3x). A node publishes one or a few batches a round.
    rate_msgs_per_s: float = 10.0
    rate_msgs_burst: float = 30.0
    rate_bytes_per_s: float = 1_000_000.0
    rate_bytes_burst: float = 4_000_000.0
    # What we accept from all senders together; beyond it, and while `incoming` is 3/4 full, messages are shed ("load")
    total_msgs_per_s: float = 100.0
    total_msgs_burst: float = 300.0
    total_bytes_per_s: float = 4_000_000.0
    total_bytes_burst: float = 16_000_000.0
    # What we send: half of what receivers accept, and a burst within a new sender's first second of budget there,
    # so pacing alone never trips their limit.
    publish_msgs_per_s: float = 5.0
    publish_bytes_per_s: float = 500_000.0
    publish_bytes_burst: float = 1_000_000.0
    heartbeat_s: float = 1.0
    hello_interval_s: float = 10.0
    mdns: bool = False
    max_peers: int = 32  # peer exchange stops dialing at this many connections
    incoming_capacity: int = 256  # Received batches buffered for the node; beyond that new ones are dropped
    replay_per_sender: int = 4096  # replay memory: a window in time (max_age_s), capped per sender (swarm.validator)
    strike_threshold: int = 10  # more rejections than this within strike_window_s -> disconnect + ban
    strike_window_s: float = 60.0
    ban_s: float = 600.0
    bootstrap_backoff_max_s: float = 30.0
    # Topic sharding (swarm.shards). shards is swarm-wide; 1 = one topic for everything, as before.
    shards: int = 1
    shard_fanin: int = 2  # shards listened to: home + (fanin - 1) rotating others (at most `shards`)
    shard_rotate_rounds: int = 10  # the rotating shards change every this many rounds
    # liveness: ping each connected peer every ping_interval_s (0: off); close it after ping_max_misses failures
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 15.0
    ping_max_misses: int = 3
    redial_after_s: float = 30.0  # discovery redials a lost peer it has heard from at most this often
    pubsub_stall_s: float = PUBSUB_STALL_S  # connected this long without a working pubsub link -> disconnect (0: off)

    def rate(self) -> RateLimit:
        return RateLimit(self.rate_msgs_per_s, self.rate_msgs_burst, self.rate_bytes_per_s, self.rate_bytes_burst,
                         total_msgs_per_s=self.total_msgs_per_s, total_msgs_burst=self.total_msgs_burst,
                         total_bytes_per_s=self.total_bytes_per_s, total_bytes_burst=self.total_bytes_burst)


@dataclass(frozen=True)
class Received:
    batch: RolloutBatch
    from_peer: str  # the signer and libp2p publisher (not the forwarder)
    received_at: float  # wall clock
    size: int  # sealed envelope bytes
    via: str = ""  # the connected peer that handed it to us (the pool bounds young senders per connection)


@dataclass
class _Counters:
    accepted: int = 0
    accepted_hellos: int = 0
    published: int = 0
    published_hellos: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    incoming_dropped: int = 0  # Received dropped because the node did not drain `incoming`
    oversize_dropped: int = 0  # our own rollouts too big for one message even alone
    bad_frames: int = 0  # peers that sent input that broke py-libp2p itself (banned at once)
    stalled_links: int = 0  # connections closed because their pubsub link was dead (swarm.host.StalledLinks)
    duplicates: int = 0
    bans: int = 0
    latency_ms: list[float] = field(default_factory=list)  # created_at -> received_at of recent batches


class Mesh:
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
        self._subscribed: tuple[str, ...] = ()  # topics we listen to now (run / _shard_loop)
        self._shard_epoch = 0
        self._lobby_hello_at = -math.inf  # trio time of our last Hello on the lobby
        self._lobby_peers_seen: set[str] = set()  # lobby peers at that Hello: a new one gets a Hello at once
        self.validator = MessageValidator(
            config.swarm, PROTOCOL_VERSION, max_age_s=config.max_age_s, max_clock_skew_s=config.max_clock_skew_s,
            rate=config.rate(), replay_per_sender=config.replay_per_sender, shards=config.shards)
        self.standing = PeerStanding(config.strike_threshold, config.strike_window_s, config.ban_s)
        send, recv = trio.open_memory_channel[Received](config.incoming_capacity)
        self._send = send
        self.incoming: trio.MemoryReceiveChannel[Received] = recv
        self._lock = threading.Lock()  # guards counters/snapshots read by stats() from other threads
        self._c = _Counters()
        self._stash: OrderedDict[bytes, tuple[Message, int, str]] = OrderedDict()  # libp2p msg id -> validated message
        self._delivered: OrderedDict[bytes, None] = OrderedDict()  # recent delivered msg ids (bounded), see _validate
        self._my_id_bytes = ID.from_base58(identity.peer_id).to_bytes()
        self._round = 0
        self._model = "unknown"  # protocol requires a non-empty model name; set_status() replaces it
        self._seq = 0
        self._out_msgs = TokenBucket(config.publish_msgs_per_s, max(1.0, config.publish_msgs_per_s / 2), 0.0)
        self._out_bytes = TokenBucket(config.publish_bytes_per_s, max(float(MAX_MESSAGE_BYTES),
                                                                        config.publish_bytes_burst), 0.0)
        self._publish_lock = trio.Lock()
        self._host: Any = None
        self._pubsub: Any = None
        self._discovery: Discovery | None = None
        self._liveness: Liveness | None = None
        self._nursery: trio.Nursery | None = None
        self._listen_addrs: list[str] = []
        self._peers_cache: list[str] = []
        self._trio_thread: int | None = None
        self._stalls = StalledLinks(config.pubsub_stall_s)

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
                                                      on_dead=lambda pid: drop_dead_peer(host, pid))
                            nursery.start_soon(self._liveness.run)
                        log.info("mesh %s listening on %s", self.topic, " ".join(self._listen_addrs))
                        task_status.started()
                        await trio.sleep_forever()
        finally:
            self._nursery = None
            self._send.close()  # consumers see EndOfChannel once drained

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
            n = 0
            items = list(rollouts)
            for i in range(0, len(items), MAX_ROLLOUTS):
                for data in self._seal_split(round, model, items[i:i + MAX_ROLLOUTS]):
                    await self._publish(data)
                    with self._lock:
                        self._c.published += 1
                    n += 1
            return n

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
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out,
                "incoming_dropped": c.incoming_dropped,
                "oversize_dropped": c.oversize_dropped,
                "duplicates": c.duplicates,
                "bad_frames": c.bad_frames,
                "stalled_links": c.stalled_links,
                "gossip_refused": self._gossip_refused(),
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
            }

    # ---- publishing -----------------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        # Time-based so it keeps rising across restarts (peers' replay windows remember our last seq).
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    def _seal_split(self, round: int, model: str, items: list[Rollout]) -> list[bytes]:
        if not items:
            return []
        batch = RolloutBatch(sender=self.peer_id, swarm=self.config.swarm, version=PROTOCOL_VERSION, round=round,
                             created_at=time.time(), seq=self._next_seq(), model=model, rollouts=tuple(items))
        try:
            return [seal(batch, self.identity)]
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
        due = (now - self._lobby_hello_at >= self.config.hello_interval_s * self.config.shards
               or bool(now_peers - self._lobby_peers_seen))
        if due:
            self._lobby_hello_at, self._lobby_peers_seen = now, now_peers
        return due

    # ---- shards (swarm.shards) ------------------------------------------------------------------------------

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

    async def _hello_loop(self) -> None:
        """Announce ourselves every hello_interval_s, and soon after a new peer joins (so it learns the others)."""
        last = -math.inf
        before: set[str] = set()
        step = min(1.0, self.config.hello_interval_s)
        while True:
            await trio.sleep(step)
            now_peers = set(self.peers())
            now = trio.current_time()
            fresh = bool(now_peers - before)
            before = now_peers
            if now_peers and (now - last >= self.config.hello_interval_s or (fresh and now - last >= step)):
                try:
                    await self._publish_hello()
                except Exception:
                    log.warning("publishing Hello failed", exc_info=True)
                last = now

    # ---- receiving ------------------------------------------------------------------------------------------

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
            if self._discovery is not None:
                self._discovery.on_hello(decoded, now, via=via)
            return
        assert isinstance(decoded, RolloutBatch)
        with self._lock:
            self._c.accepted += 1
            self._c.bytes_in += size
            self._c.latency_ms.append((now - decoded.created_at) * 1000.0)
            del self._c.latency_ms[:-1000]
        try:
            self._send.send_nowait(Received(decoded, decoded.sender, now, size, via))
        except trio.WouldBlock:
            with self._lock:
                self._c.incoming_dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # ---- standing -------------------------------------------------------------------------------------------

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
            log.warning("pubsub link to %s is dead (no stream or subscriptions for %.0f s): reconnecting", pid,
                        self.config.pubsub_stall_s)
            with self._lock:
                self._c.stalled_links += 1
            self._nursery.start_soon(drop_dead_peer, self._host, pid)

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
