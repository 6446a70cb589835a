"""py-libp2p 0.8.1 host and gossipsub construction with the settings and guards this project needs.

Every non-default here fixes a measured problem (see shared/notes/libp2p-0.8.md, items in brackets):
- security is Noise only: the default also accepts /plaintext/2.0.0 from a dialer that offers only that [1];
- heartbeat ~1 s and adaptive gossip off: the default 120 s (or adaptive 30-60 s) heartbeat starves gossip repair [2];
- spam protection off: it drops >10 msg/s per *forwarder* before caching, so gossip never recovers them [3];
  our own per-sender token buckets (swarm.validator) do rate limiting instead, after authentication;
- eclipse protection off: it reasons about IP diversity, meaningless on one host/LAN and unmeasured in 0.8.1;
- per-peer outbound queue raised from 32 RPCs, and the subscription is drained synchronously (no 32-slot buffer) [4];
- message size: both inbound RPC limit and outbound queue split limit stay at libp2p's 1 MiB, identical on every
  node (mismatched limits reset streams in a loop [5]); our envelopes are <= 1,000,000 bytes;
- a malformed frame on /meshsub/* raises protobuf DecodeError out of Pubsub.continuously_read_stream, through the
  connection's nursery, and takes the whole host down [6]: GuardedPubsub.stream_handler catches it, resets the stream
  and reports the peer (the mesh bans and disconnects it). Same for Pubsub.push_msg: a message whose from_id does not
  inline its key and whose `key` field is malformed makes libp2p's signature_validator raise (nacl ValueError) in a
  pubsub service task, which also took the host down (measured): forwarded messages are guarded and the forwarder
  reported;
- equivocation detection keeps up to ~1000 whole messages (~1 GB at 1 MB each) [9]: we keep a 32-byte digest instead;
- writes to a peer's pubsub stream are serialized. py-libp2p writes to it from the per-peer send loop *and* directly
  (gossipsub's flush of pending messages and its recent-messages replay to a new peer), and yamux releases its write
  lock between window-sized chunks while it waits for a window update, so two RPCs of more than the 256 KB window
  could interleave on the wire: the receiver parsed garbage and banned an honest ~1 MB sender as a malformed-frame
  peer (docs/byzantine.md, weakness 4). GuardedPubsub.write_msg holds one lock per stream for a whole RPC;
- gossip amplification (issue 12, item 9): 0.8.1 answers every IWANT entry in full, duplicates included (4.4 MB of
  IWANT brought back 311 MB), and replays the whole message cache to a peer on each unsubscribe/subscribe cycle (80
  tiny RPCs made a node send 237 MB). BoundedGossipSub.handle_iwant dedupes, caps the IDs read per IWANT and sends
  one message to one peer at most GOSSIP_RETRANSMISSION times (go-libp2p's rule); GuardedPubsub replays the cache to
  a peer at most once per (connection, topic);
- forwarded replays (item 10): py-libp2p consults its cache of validation verdicts (300 s by default) *before* our
  topic validator, and only the seen-cache (ours: SEEN_TTL_S) stops a re-sent message before that. A raw re-send
  after the seen-cache forgot it but while the verdict was cached was forwarded without our validator. The verdict
  cache now expires first (validation_cache_ttl_for), so such a re-send always meets our validator;
- one oversized frame cut a link for good (item 11): the receiver resets the pubsub stream, both ends forget the
  other's subscriptions on noticing a dead stream, and when the writer notices later than the receiver re-announced,
  it never learns them again while the connection, and liveness pings, stay up. StalledLinks finds connected peers
  without a pubsub stream or subscriptions for a while; the mesh closes those connections and discovery redials.
- IDONTWANT for every message (docs/scale.md, "What an idle node spends"): 0.8.1 sends one IDONTWANT RPC to every
  mesh peer for each message it forwards, however small, so a ~400-byte Hello cost each forwarder as many extra RPCs
  (each a yamux frame, its window update and a Noise record) as the forwards themselves; in an idle swarm of 12 relays
  that was half of all RPCs. go-libp2p sends IDONTWANT only for messages of at least 1 KiB
  (IDontWantMessageThreshold); BoundedGossipSub does the same (IDONTWANT_MIN_BYTES), so batches still get them.
- IHAVE gossip for every message: each heartbeat (1 s), for every topic with a message in its gossip window, 0.8.1
  sends an IHAVE to max(6, 25%) of the topic's peers outside the mesh. Hellos keep every topic's window non-empty, so
  an idle node sent ~6 IHAVE RPCs per topic per second and received as many: the bulk of what 32 idle relays spent
  (docs/scale.md). A lost Hello is replaced by the sender's next one, and repair by gossip is for what a node would
  otherwise miss for good (a batch); BoundedGossipSub gossips only messages of at least IHAVE_MIN_BYTES.
- the sender's signed peer record in every RPC is verified twice per RPC (Pubsub's reader, then GossipSub.handle_rpc),
  an Ed25519 check and a peerstore update each time, though a peer sends the same record bytes until its addresses
  change. install_record_cache() makes both calls skip bytes already verified for that peer on that host (re-checked
  every RECORD_RECHECK_S, so the peerstore's 2-hour TTL stays fresh); new or changed bytes are verified as before.
- a yamux WINDOW_UPDATE for every read: 0.8.1's YamuxStream credits the sender back after each read however small
  (its "partial slack" and release-on-read paths), and pubsub reads an RPC's varint prefix and body in several reads,
  so each RPC received cost several extra frames written back (each its own Noise message and socket send): in a
  profile of an idle relay they were the most frequent write. go-yamux sends an update only once the consumed bytes
  reach half the window; install_yamux_window_batching() restores that, so small RPCs cost no frame back and a large
  message still gets its credit every half window.
- own messages only to the mesh: 0.8.1 has no flood publishing, so a batch we publish goes to the peers of the
  topic's mesh at that moment and to nobody else; published while the mesh is being torn or rebuilt (links closed and
  redialed on a loaded machine, docs/scale.md), it reaches the few left, or no one, and the gossip window (3 s) may
  pass before anyone asks for it. go-libp2p floods a node's own messages to every peer on the topic (FloodPublish, on
  by default); BoundedGossipSub does so for its own messages of at least FLOOD_PUBLISH_MIN_BYTES (batches; Hellos,
  which repeat, keep to the mesh). Forwarded messages still go to the mesh only.
- a stream for every liveness ping: install_yamux_pings() lets swarm.liveness ping with yamux ping frames (one frame
  each way, no stream; swarm/yamux_ping.py).
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.pubsub.utils import safe_bytes_from_hex
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from protocol.identity import Identity

from .yamux_ping import install_yamux_pings

log = logging.getLogger(__name__)

MESHSUB_PROTOCOLS = [PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID]
OUTBOUND_QUEUE_RPCS = 128  # default 32 dropped bursts silently; 128 x <=1 MiB bounds memory per peer
SEEN_TTL_S = 120  # seen-cache of message IDs only (small); duplicates inside this window are dropped for free
LIBP2P_VALIDATION_CACHE_TTL_S = 300  # Pubsub(validation_cache_ttl=300) in 0.8.1: the default we must not keep
GOSSIP_RETRANSMISSION = 3  # go-libp2p's GossipRetransmission: replies to one peer's IWANTs for one message
IWANT_MAX_IDS = 5000  # IDs read from one IWANT entry: go-libp2p's MaxIHaveLength, so an honest one is never cut
IDONTWANT_MIN_BYTES = 1024  # go-libp2p's IDontWantMessageThreshold: a smaller message costs less than the notice
IHAVE_MIN_BYTES = 1024  # smaller messages (Hellos) are not offered by gossip: repeated by their sender, not repaired
FLOOD_PUBLISH_MIN_BYTES = 1024  # our own messages this big go to every peer on the topic, not only the mesh
RECORD_RECHECK_S = 600.0  # a peer's unchanged signed record is verified again after this long (peerstore TTL 7200 s)
RECORD_CACHE_PEERS = 4096  # per host: peers whose last verified record is remembered (oldest forgotten first)
PUBSUB_STALL_S = 10.0  # a connected peer this long without a pubsub stream or subscriptions is a broken link
STALL_MIN_CHECKS = 10  # ... and seen so in this many maintenance checks (one per heartbeat): see StalledLinks
NEW_LINK_STALL_FACTOR = 4.0  # a link that has not yet worked gets this many times the grace: its negotiations take 30 s
STREAM_NEGOTIATION_S = 30.0  # py-libp2p's stream protocol negotiation timeouts (0.8.1: 10 s each way)


def validation_cache_ttl_for(seen_ttl_s: int) -> int:
    """TTL of py-libp2p's verdict cache that keeps a re-sent message from skipping our validator (item 10).

    Pubsub.push_msg drops a message whose ID is in the seen-cache, else asks the verdict cache, and runs the topic
    validator only on a miss. A seen entry expires at int(t_seen) + seen_ttl >= t_seen + seen_ttl - 1 (LastSeenCache
    truncates; it also refreshes on every hit and lives until a sweep, both only lengthen it), and the verdict was
    stored just before t_seen; so a verdict TTL <= seen_ttl - 1 is always gone by the time the ID is. Half of it is
    used: rejected messages are not marked seen, and a shorter verdict cache re-runs (and re-charges) them sooner.
    """
    if seen_ttl_s < 2:
        raise ValueError(f"seen_ttl_s must be >= 2 s, not {seen_ttl_s}")
    return max(1, seen_ttl_s // 2)


def key_pair_for(identity: Identity) -> KeyPair:
    """libp2p key pair from the node identity, so the libp2p peer ID *is* identity.peer_id."""
    priv = Ed25519PrivateKey.from_bytes(identity.private_seed)
    kp = KeyPair(priv, priv.get_public_key())
    pid = ID.from_pubkey(kp.public_key).to_base58()
    if pid != identity.peer_id:
        raise RuntimeError(f"libp2p peer ID {pid} != identity peer ID {identity.peer_id}")
    return kp


def noise_only(kp: KeyPair) -> dict[Any, Any]:
    return {NOISE_PROTOCOL_ID: NoiseTransport(kp, noise_privkey=create_new_x25519_key_pair().private_key)}


def install_yamux_window_batching() -> None:
    """YamuxStream sends a WINDOW_UPDATE only once half its receive window is consumed (go-yamux), not per read
    (module doc). Idempotent; PY_YAMUX_DISABLE_HYSTERESIS still makes every read send one."""
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    if getattr(YamuxStream._auto_tune_and_send_window_update, "_swarm_batched", False):
        return

    async def batched(self: Any, *, bytes_read: int = 0) -> None:
        increment = 0
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            consumed = self.target_recv_window - (self.recv_window + buffered)  # read since the last update
            if consumed > 0 and consumed >= self._grow_threshold():
                increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
        if increment > 0:
            await self.send_window_update(increment, skip_lock=True)

    batched._swarm_batched = True  # type: ignore[attr-defined]
    YamuxStream._auto_tune_and_send_window_update = batched  # type: ignore[method-assign]


def build_host(identity: Identity, listen: Sequence[str], *, mdns: bool = False) -> IHost:
    """A TCP host speaking Noise only. No `bootstrap=` here: dialing before pubsub runs crashed 0.8.1 [8].
    mdns=True starts py-libp2p's zeroconf mDNS, which only fills the peerstore (Discovery dials from there)."""
    install_yamux_window_batching()
    install_yamux_pings()
    kp = key_pair_for(identity)
    # 10 s negotiations timed out on a loaded machine and the links never came up (docs/scale.md, runs D and F)
    cc = ConnectionConfig(outbound_stream_protocol_negotiation_timeout=STREAM_NEGOTIATION_S,
                          inbound_stream_protocol_negotiation_timeout=STREAM_NEGOTIATION_S)
    return new_host(key_pair=kp, sec_opt=noise_only(kp), listen_addrs=[multiaddr.Multiaddr(a) for a in listen],
                    enable_mDNS=mdns, connection_config=cc)


class _SizedQueues(dict):  # type: ignore[type-arg]
    """Pubsub builds each peer's RpcQueue with the 32-slot default and no knob; resize as it is registered.

    A full queue rejects the push and py-libp2p only logs it at DEBUG, so a message lost to a slow link is counted
    nowhere; we count the rejected RPCs and the published messages inside them (`dropped_rpcs`, `dropped_msgs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped_rpcs = 0
        self.dropped_msgs = 0

    def __setitem__(self, key: ID, queue: RpcQueue) -> None:
        queue._queue.max_size = OUTBOUND_QUEUE_RPCS
        push = queue.push

        def counted_push(rpc: rpc_pb2.RPC, priority: bool = False) -> bool:
            ok = push(rpc, priority)
            if not ok and not queue.closed:  # a closed queue is a peer going away, not a drop on a live link
                self.dropped_rpcs += 1
                self.dropped_msgs += len(rpc.publish)
            return ok

        queue.push = counted_push  # type: ignore[method-assign]
        super().__setitem__(key, queue)


class GuardedPubsub(Pubsub):
    """Pubsub that a peer cannot crash with malformed input, and that hands validated messages straight to us.

    on_message(msg) is called synchronously for each new validated message on a subscribed topic (instead of the
    32-slot subscription channel that drops on overflow); on_bad_peer(peer, why) when a peer sent something that broke
    py-libp2p itself (the caller should ban and disconnect it).
    """

    def __init__(self, host: IHost, router: GossipSub, *, on_message: Callable[[rpc_pb2.Message], None],
                 on_bad_peer: Callable[[ID, str], None], **kwargs: Any) -> None:
        super().__init__(host, router, **kwargs)
        self.peer_queues = _SizedQueues()
        self._on_message = on_message
        self._on_bad_peer = on_bad_peer
        self._write_locks: dict[int, tuple[INetStream, trio.Lock]] = {}  # id(stream) -> (stream, lock)
        # peer -> (the muxed connection it was replayed on, topics replayed there): see _replay_recent_messages
        self._replays: dict[ID, tuple[Any, set[str]]] = {}
        self.replays_refused = 0
        self.heard: dict[ID, float] = {}  # peer -> trio time of the last message or control RPC it sent us

    def _handle_dead_peer(self, peer_id: ID) -> None:
        self.heard.pop(peer_id, None)
        stream = self.peers.get(peer_id)
        if stream is not None:
            self._write_locks.pop(id(stream), None)
        super()._handle_dead_peer(peer_id)
        if not self._peer_is_connected(peer_id):
            self._replays.pop(peer_id, None)

    async def _replay_recent_messages(self, peer_id: ID, topic: str) -> None:
        """The message-cache replay to a newly subscribed peer, at most once per (connection, topic).

        py-libp2p's own gate is dropped when the peer unsubscribes, so every unsubscribe/subscribe pair (two tiny
        RPCs) made us write the whole cache window again (item 9). The replay only covers messages published while
        the connection was being set up, so once per connection is all it is for.
        """
        stream = self.peers.get(peer_id)
        if stream is None:  # not writable yet: the base is a no-op and _handle_new_peer calls us again later
            return
        conn = getattr(stream, "muxed_conn", None)
        entry = self._replays.get(peer_id)
        if entry is None or entry[0] is not conn:
            if len(self._replays) > 1024:  # normally pruned in _handle_dead_peer; a safety net
                self._replays = {p: e for p, e in self._replays.items() if p in self.peers}
            entry = self._replays[peer_id] = (conn, set())
        if topic in entry[1]:
            self.replays_refused += 1
            return
        entry[1].add(topic)
        await super()._replay_recent_messages(peer_id, topic)

    async def write_msg(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        """One whole RPC at a time per stream (see the module docstring: interleaved chunks corrupt the frame)."""
        entry = self._write_locks.get(id(stream))
        if entry is None or entry[0] is not stream:
            if len(self._write_locks) > 1024:  # normally pruned in _handle_dead_peer; a safety net
                live = {id(s) for s in self.peers.values()}
                self._write_locks = {k: v for k, v in self._write_locks.items() if k in live}
            entry = self._write_locks[id(stream)] = (stream, trio.Lock())
        async with entry[1]:
            return await super().write_msg(stream, rpc_msg)

    def _report(self, peer_id: ID, why: str) -> None:
        try:
            self._on_bad_peer(peer_id, why)
        except Exception:  # the reporter must not become a crash path of its own
            log.exception("on_bad_peer failed")

    async def stream_handler(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        try:
            await super().stream_handler(stream)
        except Exception as e:  # DecodeError & co escape the base handler and would kill the host [6]
            log.warning("malformed pubsub input from %s (%s: %s): resetting its stream", peer_id,
                        type(e).__name__, str(e)[:200])
            try:
                await stream.reset()
            except Exception:
                pass
            try:
                self._handle_dead_peer(peer_id)
            except Exception:
                log.debug("cleanup after bad frame failed", exc_info=True)
            self._report(peer_id, f"frame:{type(e).__name__}")

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        if msg_forwarder == self.my_id:  # our own publish: let errors surface to the caller
            await super().push_msg(msg_forwarder, msg)
            return
        self.heard[msg_forwarder] = trio.current_time()
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as e:  # e.g. an undecodable msg.key raises in signature_validator; runs as a service task
            log.warning("bad message forwarded by %s (%s): dropping", msg_forwarder, type(e).__name__)
            self._report(msg_forwarder, f"message:{type(e).__name__}")

    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        if not any(t in self.topic_ids for t in publish_message.topicIDs):
            return
        try:
            self._on_message(publish_message)
        except Exception:
            log.exception("message sink failed")


class BoundedGossipSub(GossipSub):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._iwant_served: dict[bytes, dict[ID, int]] = {}  # msg id -> peer -> IWANT replies sent (while cached)
        self.iwant_refused = 0  # requested IDs not served: repeats, over the cap, or retransmitted enough
        self._small: set[bytes] = set()  # IDs of the messages being forwarded that get no IDONTWANT
        self.idontwant_skipped = 0  # forwarded messages under IDONTWANT_MIN_BYTES (no IDONTWANT sent for them)
        self.ihave_ids_skipped = 0  # message IDs under IHAVE_MIN_BYTES left out of IHAVE gossip
        self.control_sent: dict[str, int] = {"rpcs": 0, "ihave": 0, "idontwant": 0}  # what upkeep costs (status)
        self._flood: set[bytes] = set()  # IDs of our own messages being published to every peer on the topic
        self.flood_extra = 0  # sends of our own messages to topic peers outside the mesh (status: flood_extra)

    async def publish(self, msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        size = len(pubsub_msg.data)
        small = size < IDONTWANT_MIN_BYTES and self.pubsub is not None
        flood = (size >= FLOOD_PUBLISH_MIN_BYTES and self.pubsub is not None and msg_forwarder == self.pubsub.my_id
                 and pubsub_msg.from_id == self.pubsub.my_id.to_bytes())
        mid = self.pubsub.get_message_id(pubsub_msg) if (small or flood) else b""
        if small:
            self._small.add(mid)
        if flood:
            self._flood.add(mid)
        try:
            await super().publish(msg_forwarder, pubsub_msg)
        finally:
            self._small.discard(mid)
            self._flood.discard(mid)

    def _get_peers_to_send(self, topic_ids: Any, msg_forwarder: ID, origin: ID,
                           msg_id: bytes | None = None) -> Any:
        """The base's choice (the topic's mesh, or fanout), plus, for our own batches, every other gossipsub peer on
        the topic (see FLOOD_PUBLISH_MIN_BYTES)."""
        peers = set(super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
        if msg_id is None or msg_id not in self._flood or self.pubsub is None:
            return peers
        extra = {p for topic in topic_ids for p in self.pubsub.peer_topics.get(topic, ())
                 if p in self.peer_protocol and self.peer_protocol[p] in MESHSUB_PROTOCOLS} - peers - {origin}
        self.flood_extra += len(extra)
        return peers | extra

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Any) -> None:
        if msg_id in self._small:  # see IDONTWANT_MIN_BYTES
            self.idontwant_skipped += 1
            return
        await super()._emit_idontwant_for_message(msg_id, topic_ids)

    def gossip_heartbeat(self) -> Any:
        """The base's IHAVE plan for this heartbeat (peer -> topic -> IDs), less the messages under IHAVE_MIN_BYTES;
        a peer left with nothing to be told gets no IHAVE (see the module doc)."""
        plan = super().gossip_heartbeat()
        msgs = self.mcache.msgs
        kept: dict[str, list[bytes]] = {}  # topic -> its IDs worth offering: the base gives every peer the same window
        for peer in list(plan):
            topics = plan[peer]
            for topic in list(topics):
                ids = topics[topic]
                keep = kept.get(topic)
                if keep is None:
                    keep = kept[topic] = [m for m in ids if m in msgs and len(msgs[m].data) >= IHAVE_MIN_BYTES]
                self.ihave_ids_skipped += len(ids) - len(keep)
                if keep:
                    topics[topic] = keep
                else:
                    del topics[topic]
            if not topics:
                del plan[peer]
        return plan

    async def emit_control_message(self, control_msg: rpc_pb2.ControlMessage, to_peer: ID) -> None:
        sent = self.control_sent
        sent["rpcs"] += 1
        sent["ihave"] += len(control_msg.ihave)
        sent["idontwant"] += len(control_msg.idontwant)
        await super().emit_control_message(control_msg, to_peer)

    async def handle_rpc(self, rpc: rpc_pb2.RPC, sender_peer_id: ID) -> None:
        if isinstance(self.pubsub, GuardedPubsub):  # control from a peer: it is alive (swarm.liveness)
            self.pubsub.heard[sender_peer_id] = trio.current_time()
        await super().handle_rpc(rpc, sender_peer_id)

    async def handle_iwant(self, iwant_msg: rpc_pb2.ControlIWant, sender_peer_id: ID) -> None:
        """The base serves every listed ID, repeats included, with no memory of what it already sent (item 9).

        Here: the first IWANT_MAX_IDS IDs of an entry, each once, and one message to one peer at most
        GOSSIP_RETRANSMISSION times while it is in the message cache. A peer can then pull at most that many copies
        of the cache, whatever it sends. The per-peer entry rate limit of the base (10/s) still applies first.
        """
        if not self._check_iwant_rate_limit(sender_peer_id):
            log.debug("IWANT rate limit exceeded for %s", sender_peer_id)
            return
        ids = iwant_msg.messageIDs
        self.iwant_refused += max(0, len(ids) - IWANT_MAX_IDS)
        wanted: set[bytes] = set()
        msgs: list[rpc_pb2.Message] = []
        for wire in ids[:IWANT_MAX_IDS]:
            mid = safe_bytes_from_hex(wire)
            if mid is None:
                continue
            if mid in wanted:
                self.iwant_refused += 1
                continue
            wanted.add(mid)
            msg = self.mcache.get(mid)
            if msg is None:
                continue
            served = self._iwant_served.setdefault(mid, {})
            n = served.get(sender_peer_id, 0)
            if n >= GOSSIP_RETRANSMISSION:
                self.iwant_refused += 1
                continue
            served[sender_peer_id] = n + 1
            msgs.append(msg)
        if len(self._iwant_served) > 2 * len(self.mcache.msgs) + 64:  # forget messages that left the cache
            self._iwant_served = {m: v for m, v in self._iwant_served.items() if m in self.mcache.msgs}
        if not msgs or self.pubsub is None:
            return
        packet = rpc_pb2.RPC()
        if isinstance(self.pubsub, Pubsub):
            packet.senderRecord, _ = env_to_send_in_RPC(self.pubsub.host)
        packet.publish.extend(msgs)
        self.send_rpc(sender_peer_id, packet)  # split into <= 1 MiB RPCs by the peer's queue, as in the base

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        # Same semantics as the base (same from+seqno with other content is refused) but stores a digest, not the
        # message: the base keeps up to ~1000 whole messages [9].
        key = msg.from_id + msg.seqno
        digest = hashlib.sha256(msg.data + b"\x00" + "\x00".join(msg.topicIDs).encode()).digest()
        prev = self.equivocation_detection.get(key)
        if prev is None:
            self.equivocation_detection[key] = digest  # type: ignore[assignment]
            return True
        if prev != digest:
            log.warning("equivocation from %s", ID(msg.from_id))
            return False
        return True


def build_router(heartbeat_s: float = 1.0) -> BoundedGossipSub:
    return BoundedGossipSub(
        protocols=MESHSUB_PROTOCOLS,
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=heartbeat_s,  # type: ignore[arg-type]  # float works: it is only passed to trio.sleep
        heartbeat_initial_delay=0.1,
        gossip_window=3,
        gossip_history=5,  # mcache holds ~5 heartbeats of messages: bounded by the per-sender rate limit
        time_to_live=60,
        do_px=False,  # PX only rides on PRUNE (mesh over D_high); our signed Hello exchange does discovery
        adaptive_gossip_enabled=False,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,
    )


def _cached_record_check(verify: Callable[[Any, IHost, ID], bool]) -> Callable[[Any, IHost, ID], bool]:
    """verify (0.8.1's maybe_consume_signed_record), skipped when the RPC carries the very bytes that already passed
    for this peer on this host within RECORD_RECHECK_S (see the module doc). A failed check is never remembered."""

    def check(msg: Any, host: IHost, peer_id: ID) -> bool:
        if not msg.HasField("senderRecord"):
            return verify(msg, host, peer_id)
        cache: dict[ID, tuple[bytes, float]] | None = getattr(host, "_swarm_verified_records", None)
        if cache is None:
            cache = {}
            setattr(host, "_swarm_verified_records", cache)
        record, now = msg.senderRecord, trio.current_time()
        hit = cache.get(peer_id)
        if hit is not None and hit[0] == record and now - hit[1] < RECORD_RECHECK_S:
            return True
        ok = verify(msg, host, peer_id)
        cache.pop(peer_id, None)
        if ok:
            cache[peer_id] = (record, now)
            while len(cache) > RECORD_CACHE_PEERS:
                cache.pop(next(iter(cache)))
        return ok

    check.__wrapped__ = verify  # type: ignore[attr-defined]
    return check


def install_record_cache() -> None:
    """Route py-libp2p's per-RPC record checks in pubsub and gossipsub through _cached_record_check (idempotent)."""
    import libp2p.pubsub.gossipsub as gossipsub_mod
    import libp2p.pubsub.pubsub as pubsub_mod

    for mod in (pubsub_mod, gossipsub_mod):
        if not hasattr(mod.maybe_consume_signed_record, "__wrapped__"):
            mod.maybe_consume_signed_record = _cached_record_check(mod.maybe_consume_signed_record)


def build_pubsub(host: IHost, router: GossipSub, *, on_message: Callable[[rpc_pb2.Message], None],
                 on_bad_peer: Callable[[ID, str], None], seen_ttl_s: int = SEEN_TTL_S) -> GuardedPubsub:
    install_record_cache()
    return GuardedPubsub(host, router, on_message=on_message, on_bad_peer=on_bad_peer,
                         strict_signing=True,  # libp2p signs each message: msg.from_id is authenticated
                         seen_ttl=seen_ttl_s,
                         # the seen-cache is only swept, never checked for expiry: sweep often enough that its
                         # lifetime stays near seen_ttl_s (0.8.1 sweeps every 60 s)
                         sweep_interval=max(1, min(60, seen_ttl_s // 4)),
                         validation_cache_ttl=validation_cache_ttl_for(seen_ttl_s),  # item 10: expires first
                         validation_timeout=10.0)


class StalledLinks:
    """Connected peers whose pubsub link is broken: no pubsub stream to them, or none of their subscriptions known,
    for `grace_s` in a row and over at least `min_checks` checks (a new connection has both within a second). Seen
    after one oversized frame (item 11): libp2p re-opens the stream but one end has forgotten the other's
    subscriptions for good, while the connection and the liveness pings stay up. `check` returns the peers to
    disconnect (discovery redials them, and a fresh connection exchanges subscriptions again); it is called from the
    mesh's maintenance loop, every heartbeat.

    min_checks is for starved machines (docs/scale.md): with 32 processes on 2 cores a trainer's event loop fell
    seconds behind while it trained, and when its late checks ran back to back it closed new links over time it had
    not seen (178 closes by trainers in the first minute of one run). A loop that runs late now makes fewer checks
    and so waits longer; a link broken for good still goes after ~grace_s (30 s was tried: longer-lived broken links
    lost more batches).

    A link that has never worked yet gets new_grace_s (4 x grace_s) instead: item 11's break happens to a working link,
    while a new one on a loaded machine is often just slow. With 32 processes on 2 cores a trainer that had just
    started closed 23 of its new links at 10 s and got them back by redialing 5-20 s later (docs/scale.md). With
    py-libp2p's 10 s negotiations a longer grace alone did not help (run D); with STREAM_NEGOTIATION_S on both ends
    the links came up and dead-link closes fell from 370 to 7 a run (run F2).
    """

    def __init__(self, grace_s: float = PUBSUB_STALL_S, min_checks: int = STALL_MIN_CHECKS,
                 new_grace_s: float | None = None) -> None:
        self.grace_s = grace_s
        self.min_checks = min_checks
        self.new_grace_s = NEW_LINK_STALL_FACTOR * grace_s if new_grace_s is None else new_grace_s
        self._since: dict[ID, tuple[float, int]] = {}  # peer -> (first seen stalled, trio time; checks it was since)
        self._worked: set[ID] = set()  # connected peers whose link has been seen working

    def check(self, host: IHost, pubsub: Pubsub, now: float, skip: Callable[[ID], bool] = lambda _: False) -> list[ID]:
        connected = set(host.get_connected_peers())
        for pid in [p for p in self._since if p not in connected]:
            del self._since[pid]
        self._worked &= connected
        out: list[ID] = []
        for pid in connected:
            ok = link_state(pubsub, pid) == "ok"
            if ok:
                self._worked.add(pid)
            if ok or skip(pid):
                self._since.pop(pid, None)
                continue
            since, checks = self._since.get(pid, (now, 0))
            checks += 1
            grace = self.grace_s if pid in self._worked else self.new_grace_s
            if now - since >= grace and checks >= self.min_checks:
                del self._since[pid]
                out.append(pid)
            else:
                self._since[pid] = (since, checks)
        return out


def link_state(pubsub: Pubsub, pid: ID) -> str:
    """A connected peer's pubsub link: "ok", or which half is missing ("no_stream", "no_subscriptions", "neither")."""
    stream = pid in pubsub.peers
    subs = any(pid in peers for peers in pubsub.peer_topics.values())
    if stream and subs:
        return "ok"
    return "no_subscriptions" if stream else ("no_stream" if subs else "neither")


def peer_id_str(pid: ID | bytes) -> str:
    return (pid if isinstance(pid, ID) else ID(pid)).to_base58()


def abort_connection(conn: Any) -> bool:
    """Close a libp2p connection's TCP socket at once, without the muxer's goodbye.

    A graceful close writes a GO_AWAY frame; on a dead link whose send buffer is already full (gossip kept writing into
    it) that write never completes, so `host.disconnect` hangs and the connection stays registered. Closing the socket
    makes every pending read and write on it fail, and py-libp2p's own error paths then drop the connection and the
    peer. Walks swarm conn -> muxer -> secure session -> transport -> raw connection -> trio.SocketStream.
    """
    seen: set[int] = set()
    obj = conn
    for _ in range(10):
        if isinstance(obj, trio.SocketStream):
            trio.lowlevel.notify_closing(obj.socket)
            obj.socket.close()
            return True
        seen.add(id(obj))
        nxt = None
        for name in ("muxed_conn", "secured_conn", "conn", "read_writer", "stream"):
            v = getattr(obj, name, None)
            if v is not None and id(v) not in seen:
                nxt = v
                break
        if nxt is None:
            return False
        obj = nxt
    return False


async def drop_dead_peer(host: IHost, peer: ID) -> None:
    """Disconnect a peer that stopped answering: gracefully if that completes quickly, else abort its sockets."""
    await disconnect_quietly(host, peer, timeout_s=2.0)
    try:
        conns = list(host.get_network().get_connections(peer))
    except Exception:
        return
    for conn in conns:
        try:
            if not abort_connection(conn):
                log.debug("could not find the socket of a connection to %s", peer)
        except Exception:
            log.debug("aborting a connection to %s failed", peer, exc_info=True)


async def disconnect_quietly(host: IHost, peer: ID, timeout_s: float = 5.0) -> None:
    try:
        with trio.move_on_after(timeout_s):
            await host.disconnect(peer)
    except Exception:
        log.debug("disconnect %s failed", peer, exc_info=True)
