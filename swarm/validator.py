"""Checks every gossiped message before it is delivered or forwarded. Pure logic: no network, injectable clock.

Order of checks (the first failure is the reason): size, decode, signature, sender, swarm, version, topic, stale,
newcomer admission, replay, rate, newcomer budget (see RateLimit for the sybil bounds), load (the node's total budget,
and rollouts while the node lags).

Topic (when the caller passes the gossip topic the message came on): in a sharded swarm (swarm.shards) a message on
shard i must come from a sender whose home shard is i, and the lobby carries only Hellos. py-libp2p's message
signature covers the topic, so a relay cannot move a message to another topic: a message on the wrong topic was
published there by its sender, which an honest node never does, and an honest relay (same topics, same check) never
forwards it. So "topic" is a hard reason. A message published to several topics at once is rejected too (an honest
node publishes each message to one topic).

Replay (`MessageValidator` doc): a window in time, not a count: every seq accepted from a sender is remembered for as
long as the message could still pass the stale check, so a delayed honest batch is accepted however many newer ones
its sender published meanwhile, and an exact copy is refused for as long as it is fresh.

Cheap checks first: a message whose envelope header (`peek_header`: created_at, sender, seq, swarm, version, read
without decoding the payload or checking the signature) already shows it stale, replayed, over its sender's budget or
over the node's total is rejected in ~0.05 ms instead of after the ~2.7 ms decode and signature check of a 1 MB
envelope. Such a rejection is unauthenticated (`Rejected.verified` is False); the precheck only runs when the header
names the libp2p publisher as sender, our swarm and version, and a topic that fits its sender and kind, so it never
turns what would be a hard rejection into a soft one, and it reads the validator's state without changing it, so a forged header cannot spend anybody's budget.

`MessageValidator.check` raises only `Rejected`, whatever the input; the libp2p topic validator in `swarm.mesh` relies
on that (a validator that raises anything else can take a py-libp2p host down).
"""
from __future__ import annotations

import heapq
import logging
import math
import time
from typing import Any

import msgpack
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Final

from protocol.envelope import read_envelope, verify_envelope
from protocol.errors import ProtocolError
from protocol.identity import peer_id_from_public_key
from protocol.messages import (
    MAX_ADDRS,
    MAX_COMPLETION_CHARS,
    MAX_COMPLETIONS,
    MAX_CONFIG_ITEMS,
    MAX_MESSAGE_BYTES,
    MAX_ROLLOUTS,
    Hello,
    Message,
    RolloutBatch,
)

from .shards import home_shard, lobby_topic, shard_topic

log = logging.getLogger(__name__)

REASONS: Final = ("size", "decode", "signature", "sender", "swarm", "version", "topic", "stale", "replay", "rate",
                  "newcomer", "load")
# Reasons that prove the message is bad no matter who judges it: an honest forwarder (which runs the same checks)
# never relays these, so they count against the forwarder as well as the publisher.
HARD_REASONS: Final = frozenset({"size", "decode", "signature", "sender", "swarm", "version", "topic"})
# Soft reasons a relay is charged for (PeerStanding's relay budget): it handed us messages that were old, replayed or
# over their sender's budget, which an honest relay (running these checks itself) only does now and then. Not
# "newcomer" or "load": those follow from our own admission policy and load, which a relay cannot know.
RELAY_CHARGED: Final = frozenset({"stale", "replay", "rate"})


class Rejected(Exception):
    """`verified`: False when the message was rejected before its signature was checked (see the module doc)."""

    def __init__(self, reason: str, detail: str = "", *, verified: bool = True) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.verified = verified


@dataclass(frozen=True)
class Header:
    """A message's header fields as its envelope claims them: unauthenticated until the signature is checked."""

    kind: str
    sender: str
    swarm: str
    version: int
    created_at: float
    seq: int


_ENVELOPE_PREFIX = b"\x83\xa4body"  # canonical envelope: map of 3, "body" first (keys sorted)
_BIN_LEN_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin8/16/32 headers
_HEADER_FIELDS = {"created_at": float, "sender": str, "seq": int, "swarm": str, "type": str, "version": int,
                  "model": str, "round": int}
_PAYLOAD_FIELDS = frozenset({"rollouts", "listen_addrs"})


def peek_header(data: bytes) -> Header | None:
    """Read created_at, sender, seq, swarm, version and type from a canonical envelope without building the payload
    (msgpack skips it in C) and without checking anything else; None when the bytes do not look like one (the full
    decode then gives the reason). Costs ~0.1 ms for a 1 MB message, against ~2.5 ms for decode + signature."""
    try:
        if not data.startswith(_ENVELOPE_PREFIX):
            return None
        nlen = _BIN_LEN_BYTES.get(data[6])
        if nlen is None:
            return None
        length = int.from_bytes(data[7:7 + nlen], "big")
        start = 7 + nlen
        if start + length > len(data):
            return None
        up = msgpack.Unpacker(raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0,
                              max_str_len=4 * MAX_COMPLETION_CHARS,
                              max_array_len=max(MAX_ROLLOUTS, MAX_COMPLETIONS, MAX_ADDRS),
                              max_map_len=max(MAX_CONFIG_ITEMS, 9))
        up.feed(memoryview(data)[start:start + length])
        n = up.read_map_header()
        if n != 9:
            return None
        fields: dict[str, Any] = {}
        for _ in range(n):
            key = up.unpack()
            if key in _PAYLOAD_FIELDS:
                up.skip()
            elif key in _HEADER_FIELDS and key not in fields:
                value = up.unpack()
                if type(value) is not _HEADER_FIELDS[key]:
                    return None
                fields[key] = value
            else:
                return None
        return Header(fields["type"], fields["sender"], fields["swarm"], fields["version"], fields["created_at"],
                      fields["seq"])
    except Exception:  # any malformed input: no header, the full checks decide
        return None


@dataclass(frozen=True)
class RateLimit:
    """Per-sender token buckets, and the node's total. Sized to what a node absorbs, not to what the wire allows:
    receiving and validating costs ~22 ms of CPU per MB through py-libp2p (measured, 1 MB batches, one core) and
    ~6.6 ms per small message, on the same cores (and GIL) as generation and training; 8 MB/s from one sender slowed
    rounds 3x. An honest node sends one or a few batches a round (tiny model: ~11 KB per ~1.7 s round; a real model
    at most ~1 MB per round of several seconds), so 1 MB/s with a 4 MB burst is ample and 4 MB/s in total leaves
    ~90 % of a core to the node."""

    msgs_per_s: float = 10.0
    msgs_burst: float = 30.0
    bytes_per_s: float = 1_000_000.0
    bytes_burst: float = 4_000_000.0
    # Sybil bounds. Identities are free, so every per-sender limit above can be multiplied by minting keys. Three
    # limits make that cost bounded: (1) new senders are admitted at most at new_senders_per_s (burst: a whole small
    # swarm starting at once); (2) a new sender's buckets start with one second of its rate, not the full burst;
    # (3) while a sender is younger than probation_s, its messages also draw on one bucket per *forwarder* (the
    # directly connected peer that handed it to us), shared by all young senders it relays, so one connection can
    # inject at most `newcomer_share` senders' worth of fresh-identity traffic however many keys it mints.
    new_senders_per_s: float = 0.5
    new_senders_burst: float = 64.0
    probation_s: float = 120.0
    newcomer_share: float = 4.0
    # What the node accepts from all senders together (<= 0: no limit); beyond it messages are shed as "load", charged
    # to nobody. Young senders (on probation) are shed first: they may only draw while the total buckets are above
    # `young_total_floor` of their burst, so established senders keep the rest.
    total_msgs_per_s: float = 100.0
    total_msgs_burst: float = 300.0
    total_bytes_per_s: float = 4_000_000.0
    total_bytes_burst: float = 16_000_000.0
    young_total_floor: float = 0.5


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = max(self.last, now)

    def can_take(self, amount: float, now: float) -> bool:
        self._refill(now)
        return self.tokens >= amount

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.tokens -= amount

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until `amount` tokens are available (amount is clipped to the burst so it always ends)."""
        self._refill(now)
        need = min(amount, self.burst) - self.tokens
        return 0.0 if need <= 0 else need / self.rate


class _SenderState:
    __slots__ = ("seqs", "heap", "forgotten", "msgs", "bytes", "first_seen")

    def __init__(self, limit: RateLimit, now: float, forgotten: float) -> None:
        self.seqs: set[int] = set()  # seqs accepted within the replay horizon (MessageValidator doc)
        self.heap: list[tuple[float, int]] = []  # (created_at, seq) of those, oldest message first
        self.forgotten = forgotten  # a message created at or before this counts as seen: its entry may be gone
        self.first_seen = now
        self.msgs = TokenBucket(limit.msgs_per_s, limit.msgs_burst, now)
        self.bytes = TokenBucket(limit.bytes_per_s, limit.bytes_burst, now)
        if limit.probation_s > 0:  # probation: one second of rate to start with (the burst refills); see RateLimit
            self.msgs.tokens = min(limit.msgs_burst, max(1.0, limit.msgs_per_s))
            self.bytes.tokens = min(limit.bytes_burst, max(float(MAX_MESSAGE_BYTES), limit.bytes_per_s))


class _ForwarderBudget:
    """What one forwarder may relay on behalf of senders still on probation (shared by all of them)."""

    __slots__ = ("msgs", "bytes")

    def __init__(self, limit: RateLimit, now: float) -> None:
        k = limit.newcomer_share
        self.msgs = TokenBucket(k * limit.msgs_per_s, k * limit.msgs_burst, now)
        self.bytes = TokenBucket(k * limit.bytes_per_s, k * limit.bytes_burst, now)


class MessageValidator:
    """Stateful checker: per-sender replay memory and rate buckets live in a bounded LRU of senders.

    Replay: gossip does not preserve order, and under load a batch can arrive minutes late (IWANT, a slow relay), so
    a count-based window (the 64 newest seqs, as before) refused delayed honest batches whose sender had published 64
    newer messages meanwhile (8 of them in a loaded 16-node run). Instead the window is in time: a sender's accepted
    (seq, created_at) are kept until created_at falls below `high-water clock - max_age_s`, i.e. until any copy would
    be refused as stale; then the entry is dropped and the sender's `forgotten` line rises to its created_at. A
    message is a replay if its seq is remembered or it was created at or before the forgotten line (which only
    matters if our clock stepped back, or an entry was dropped early: below). So any exact copy of an accepted
    message is refused for as long as it is fresh, and any message never seen is accepted whatever its order.

    Memory: bounded by what the rate limits let in over max_age_s, and by caps: at most `replay_per_sender` entries
    per sender and `replay_total` in all (~160 bytes each). Beyond a cap the oldest entries are dropped early (the
    forgotten line rises, so copies of them are still refused; a still older honest batch arriving later would be
    refused too, which is the price of the bound); a sender evicted from the LRU (max_senders, or the total cap)
    leaves its line behind, at the newest message it had (one float per peer, for the last 4 x max_senders evicted;
    older ones fold into a line every newly seen sender starts from), so replays stay refused across evictions.
    """

    def __init__(
        self,
        swarm: str,
        version: int,
        *,
        max_age_s: float = 900.0,
        max_clock_skew_s: float = 60.0,
        rate: RateLimit = RateLimit(),
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        replay_per_sender: int = 4096,
        replay_total: int = 131_072,
        max_senders: int = 4096,
        shards: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.swarm, self.version = swarm, version
        self.max_age_s, self.max_clock_skew_s = max_age_s, max_clock_skew_s
        self.rate = rate
        self.max_message_bytes = max_message_bytes
        self.replay_per_sender = max(1, replay_per_sender)
        self.replay_total = max(self.replay_per_sender, replay_total)
        self._remembered = 0  # entries over all senders
        self._evicted: OrderedDict[str, float] = OrderedDict()  # evicted sender -> its forgotten line (class doc)
        self._forgotten_all = -math.inf  # ... and where any other newly seen sender's line starts
        self._high_water = -math.inf  # the latest our clock has read: the horizon never moves back with it
        self.max_senders = max_senders
        self.shards = shards
        # topic -> the home shard its messages must come from (None: the lobby, Hellos only); swarm.shards names
        self._topics: dict[str, int | None] = {shard_topic(swarm, version, shards, i): i for i in range(shards)}
        lobby = lobby_topic(swarm, version, shards)
        if lobby is not None:
            self._topics[lobby] = None
        self.clock = clock
        self.counts: dict[str, int] = {r: 0 for r in REASONS}
        self.accepted = 0
        self._senders: OrderedDict[str, _SenderState] = OrderedDict()
        self._admit = TokenBucket(rate.new_senders_per_s, rate.new_senders_burst, clock())
        self._forwarders: OrderedDict[str, _ForwarderBudget] = OrderedDict()
        t0 = clock()
        self._total_msgs = TokenBucket(rate.total_msgs_per_s, rate.total_msgs_burst, t0)
        self._total_bytes = TokenBucket(rate.total_bytes_per_s, rate.total_bytes_burst, t0)
        self.prechecked = 0  # rejections decided from the header, before the signature check

    def check(self, data: bytes, from_peer: str, forwarder: str | None = None, *, lagging: bool = False,
              topic: str | None = None) -> Message:
        """The verified message, or Rejected(reason).

        `from_peer` is the libp2p original publisher (msg.from_id); `forwarder` the connected peer that relayed it
        (None: the publisher itself). `lagging`: the node cannot keep up, so rollout batches are shed ("load").
        `topic`: the gossip topic it arrived on (None: not checked; several topics: pass them joined, e.g. by "|").
        """
        try:
            msg = self._check(data, from_peer, from_peer if forwarder is None else forwarder, lagging, topic)
        except Rejected as r:
            self.counts[r.reason] = self.counts.get(r.reason, 0) + 1
            self.prechecked += not r.verified
            log.debug("rejected message from %s: %s", from_peer, r)
            raise
        except Exception as e:  # a bug or an input we did not foresee: still only ever a rejection
            self.counts["decode"] += 1
            log.debug("rejected message from %s: unexpected %r", from_peer, e)
            raise Rejected("decode", f"unexpected {type(e).__name__}") from None
        self.accepted += 1
        return msg

    def _check(self, data: bytes, from_peer: str, forwarder: str, lagging: bool, topic: str | None) -> Message:
        now = self._now()  # one clock reading per input, whatever it turns out to be
        if not isinstance(data, (bytes, bytearray)):
            raise Rejected("decode", "not bytes")
        if len(data) > self.max_message_bytes:
            raise Rejected("size", f"{len(data)} bytes")
        hdr = peek_header(data)
        # the header precheck (soft reasons only) runs only where no hard reason up to "topic" shows in the header
        if (hdr is not None and hdr.sender == from_peer and hdr.swarm == self.swarm and hdr.version == self.version
                and self._topic_problem(hdr.kind, hdr.sender, topic) is None):
            self._precheck(hdr, len(data), forwarder, lagging, now)
        try:
            env = read_envelope(bytes(data))
        except ProtocolError as e:
            raise Rejected(e.reason, str(e)) from None
        try:
            msg = verify_envelope(env, swarm=self.swarm, version=self.version)
        except ProtocolError as e:
            if e.reason in ("swarm", "version"):  # signature was good: the sender check comes first
                if peer_id_from_public_key(env.public_key) != from_peer:
                    raise Rejected("sender", "signer is not the libp2p publisher") from None
            raise Rejected(e.reason, str(e)) from None
        if msg.sender != from_peer:
            raise Rejected("sender", "signer is not the libp2p publisher")
        problem = self._topic_problem("hello" if isinstance(msg, Hello) else "rollouts", msg.sender, topic)
        if problem is not None:
            raise Rejected("topic", problem)

        if not self._fresh(msg.created_at, now):
            raise Rejected("stale", f"created_at {msg.created_at:.3f}, now {now:.3f}")

        st = self._senders.get(msg.sender)
        if st is None:
            if not self._admit.can_take(1, now):
                raise Rejected("newcomer", "too many new senders")
            self._admit.take(1, now)
            st = _SenderState(self.rate, now, max(self._forgotten_all,
                                                  self._evicted.pop(msg.sender, -math.inf)))
            self._senders[msg.sender] = st
            while len(self._senders) > self.max_senders:
                self._evict_sender()
        else:
            self._senders.move_to_end(msg.sender)
        if self._replayed(st, msg.seq, msg.created_at):
            raise Rejected("replay", f"seq {msg.seq}")

        size = len(data)
        if not (st.msgs.can_take(1, now) and st.bytes.can_take(size, now)):
            raise Rejected("rate", f"{size} bytes")
        young = now - st.first_seen < self.rate.probation_s
        fb = self._forwarder_budget(forwarder, now) if young else None
        if fb is not None and not (fb.msgs.can_take(1, now) and fb.bytes.can_take(size, now)):
            raise Rejected("newcomer", f"{forwarder} is over its budget for new senders")
        if not self._total_ok(size, young, now):
            raise Rejected("load", "over the node's total inbound budget")
        if lagging and isinstance(msg, RolloutBatch):
            raise Rejected("load", "the node is lagging")
        if fb is not None:
            fb.msgs.take(1, now)
            fb.bytes.take(size, now)
        st.msgs.take(1, now)
        st.bytes.take(size, now)
        self._total_msgs.take(1, now)
        self._total_bytes.take(size, now)

        self._remember(msg.sender, st, msg.seq, msg.created_at)
        return msg

    def _now(self) -> float:
        now = self.clock()
        self._high_water = max(self._high_water, now)
        return now

    def _fresh(self, created_at: float, now: float) -> bool:
        return now - self.max_age_s <= created_at <= now + self.max_clock_skew_s

    # ---- replay memory (class doc) ---------------------------------------------------------------------------

    def _expire(self, st: _SenderState) -> None:
        """Drop the entries any copy of which is stale by the high-water clock (their created_at lifts the line)."""
        horizon = self._high_water - self.max_age_s
        while st.heap and st.heap[0][0] < horizon:
            self._drop_oldest(st)

    def _drop_oldest(self, st: _SenderState) -> None:
        created, seq = heapq.heappop(st.heap)
        st.seqs.discard(seq)
        st.forgotten = max(st.forgotten, created)
        self._remembered -= 1

    def _replayed(self, st: _SenderState, seq: int, created_at: float) -> bool:
        self._expire(st)  # a function of our clock only: the header precheck may run it too
        return seq in st.seqs or created_at <= st.forgotten

    def _remember(self, sender: str, st: _SenderState, seq: int, created_at: float) -> None:
        st.seqs.add(seq)
        heapq.heappush(st.heap, (created_at, seq))
        self._remembered += 1
        while len(st.heap) > self.replay_per_sender:
            self._drop_oldest(st)
        while self._remembered > self.replay_total and len(self._senders) > 1:
            self._evict_sender()  # least recently active first; `sender` is the most recent, so it stays

    def _evict_sender(self) -> None:
        sender, st = self._senders.popitem(last=False)
        line = max([st.forgotten] + [c for c, _ in st.heap])
        if line > -math.inf:
            self._evicted[sender] = line
            while len(self._evicted) > 4 * self.max_senders:
                self._forgotten_all = max(self._forgotten_all, self._evicted.popitem(last=False)[1])
        self._remembered -= len(st.heap)

    def _topic_problem(self, kind: str, sender: str, topic: str | None) -> str | None:
        """Why a message of `kind` from `sender` may not be on `topic` (None: it may; module doc)."""
        if topic is None:
            return None
        if topic not in self._topics:
            return f"topic {topic[:200]!r} is not one of this swarm's ({len(self._topics)} topics)"
        shard = self._topics[topic]
        if shard is None:
            return None if kind == "hello" else "only Hellos go to the lobby"
        home = home_shard(sender, self.shards)
        return None if home == shard else f"sent to shard {shard}, but its sender's home shard is {home}"

    def _total_ok(self, size: int, young: bool, now: float) -> bool:
        r = self.rate
        floor = r.young_total_floor if young else 0.0
        return ((r.total_msgs_per_s <= 0 or self._total_msgs.can_take(1 + floor * r.total_msgs_burst, now))
                and (r.total_bytes_per_s <= 0 or self._total_bytes.can_take(size + floor * r.total_bytes_burst, now)))

    def _precheck(self, hdr: Header, size: int, forwarder: str, lagging: bool, now: float) -> None:
        """The stateful checks of `_check`, in the same order, on the unauthenticated header, reading state only
        (besides ageing out replay entries by our own clock, which does not depend on the message)."""

        def reject(reason: str, detail: str) -> Rejected:
            return Rejected(reason, detail + " (header, before the signature check)", verified=False)

        if not self._fresh(hdr.created_at, now):
            raise reject("stale", f"created_at {hdr.created_at:.3f}, now {now:.3f}")
        st = self._senders.get(hdr.sender)
        if st is None:
            if not self._admit.can_take(1, now):
                raise reject("newcomer", "too many new senders")
            young = self.rate.probation_s > 0  # a new sender starts with at least one message of budget
        else:
            if self._replayed(st, hdr.seq, hdr.created_at):
                raise reject("replay", f"seq {hdr.seq}")
            if not (st.msgs.can_take(1, now) and st.bytes.can_take(size, now)):
                raise reject("rate", f"{size} bytes")
            young = now - st.first_seen < self.rate.probation_s
        fb = self._forwarders.get(forwarder) if young else None
        if fb is not None and not (fb.msgs.can_take(1, now) and fb.bytes.can_take(size, now)):
            raise reject("newcomer", f"{forwarder} is over its budget for new senders")
        if not self._total_ok(size, young, now):
            raise reject("load", "over the node's total inbound budget")
        if lagging and hdr.kind == "rollouts":
            raise reject("load", "the node is lagging")

    def _forwarder_budget(self, forwarder: str, now: float) -> _ForwarderBudget:
        fb = self._forwarders.get(forwarder)
        if fb is None:
            fb = self._forwarders[forwarder] = _ForwarderBudget(self.rate, now)
            while len(self._forwarders) > self.max_senders:
                self._forwarders.popitem(last=False)
        else:
            self._forwarders.move_to_end(forwarder)
        return fb


class PeerStanding:
    """Gossipsub-v1.1-spirited standing: a peer with more than `threshold` strikes within `window_s` is banned for
    `ban_s`. Hard rejections strike both the forwarder and the publisher; soft ones (stale, replay, rate, newcomer: a
    matter of clocks, timing and load) the publisher when it sent the message itself, and the relay (forwarder) of
    somebody else's message once it is over its relay budget (see on_rejection). "load" strikes nobody. (A malformed
    pubsub frame gets its sender banned at once: see host.py.)

    Relay budget: soft rejections of relayed messages cost the relay tokens from two buckets (messages, bytes); each
    rejection that finds a bucket empty is one strike. An honest relay runs the same checks, so it only hands us a
    few such messages (a publisher with a skewed clock, gossip reordering at a rate limit's edge); one that relays
    old or replayed ~1 MB envelopes as fast as it can is over budget within a second and banned a few strikes later.
    """

    def __init__(self, threshold: int = 10, window_s: float = 60.0, ban_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, max_peers: int = 4096, *,
                 relay_msgs_per_s: float = 1.0, relay_msgs_burst: float = 30.0,
                 relay_bytes_per_s: float = 1_000_000.0, relay_bytes_burst: float = 16_000_000.0) -> None:
        self.threshold, self.window_s, self.ban_s, self.clock = threshold, window_s, ban_s, clock
        self.max_peers = max_peers
        self._strikes: OrderedDict[str, deque[float]] = OrderedDict()
        self.total: dict[str, int] = {}
        self._banned: dict[str, float] = {}  # peer -> unban time
        self._relay_limits = (relay_msgs_per_s, relay_msgs_burst, relay_bytes_per_s, relay_bytes_burst)
        self._relay: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()
        self.relay_charged = 0  # soft rejections charged to a relay
        self.relay_strikes = 0  # of which over its budget (each one strike)

    def strike(self, peer: str, weight: int = 1) -> bool:
        """Record strikes; True if this made the peer newly banned."""
        now = self.clock()
        if self.is_banned(peer):
            return False
        q = self._strikes.setdefault(peer, deque())
        self._strikes.move_to_end(peer)
        while len(self._strikes) > self.max_peers:
            self._strikes.popitem(last=False)
        for _ in range(weight):
            q.append(now)
        while q and q[0] < now - self.window_s:
            q.popleft()
        self.total[peer] = self.total.get(peer, 0) + weight
        if len(self.total) > self.max_peers:
            self.total.pop(next(iter(self.total)))
        if len(q) > self.threshold:
            self._banned[peer] = now + self.ban_s
            self._strikes.pop(peer, None)
            return True
        return False

    def on_rejection(self, reason: str, publisher: str, forwarder: str, size: int = 0) -> list[str]:
        """Newly banned peers after a rejection of `reason` of a `size`-byte message.

        Hard reasons (a message no honest node would sign or relay) strike the publisher and the forwarder. Soft ones
        strike the publisher only when it sent the message itself (the connection is that peer, authenticated by
        Noise, and py-libp2p checked its signature on the bytes): anyone can keep an honest node's old messages and
        relay them later, and that must not get the honest node banned. Instead the relay pays for stale, replayed
        and over-rate messages from its budget (class doc). "load" is our own state: nobody is struck.
        """
        if reason == "load":
            return []
        if reason in HARD_REASONS:
            peers = [publisher] + ([forwarder] if forwarder != publisher else [])
        elif forwarder == publisher:
            peers = [publisher]
        elif reason in RELAY_CHARGED and self._charge_relay(forwarder, size):
            peers = [forwarder]
        else:
            peers = []
        return [p for p in peers if self.strike(p)]

    def _charge_relay(self, forwarder: str, size: int) -> bool:
        """Take one soft rejection of `size` bytes from the relay's budget; True if it was over budget."""
        now = self.clock()
        buckets = self._relay.get(forwarder)
        if buckets is None:
            mr, mb, br, bb = self._relay_limits
            buckets = self._relay[forwarder] = (TokenBucket(mr, mb, now), TokenBucket(br, bb, now))
            while len(self._relay) > self.max_peers:
                self._relay.popitem(last=False)
        else:
            self._relay.move_to_end(forwarder)
        msgs, nbytes = buckets
        self.relay_charged += 1
        over = not (msgs.can_take(1, now) and nbytes.can_take(size, now))
        msgs.take(1, now)  # over budget it goes (and stays) negative: a relay that keeps at it keeps being struck
        nbytes.take(min(size, nbytes.burst), now)
        msgs.tokens, nbytes.tokens = max(msgs.tokens, -msgs.burst), max(nbytes.tokens, -nbytes.burst)
        self.relay_strikes += over
        return over

    def ban(self, peer: str) -> None:
        self._banned[peer] = self.clock() + self.ban_s

    def is_banned(self, peer: str) -> bool:
        until = self._banned.get(peer)
        if until is None:
            return False
        if until <= self.clock():
            del self._banned[peer]
            return False
        return True

    def expired(self) -> list[str]:
        """Peers whose ban has run out (and forget them)."""
        now = self.clock()
        out = [p for p, t in self._banned.items() if t <= now]
        for p in out:
            del self._banned[p]
        return out

    def banned(self) -> dict[str, float]:
        """peer -> seconds of ban left."""
        now = self.clock()
        return {p: round(t - now, 1) for p, t in list(self._banned.items()) if t > now}

    def recent(self) -> dict[str, int]:
        now = self.clock()
        return {p: sum(1 for t in list(q) if t >= now - self.window_s) for p, q in list(self._strikes.items())}
