"""Checks every gossiped message before it is delivered or forwarded. Pure logic: no network, injectable clock.

Order of checks (the first failure is the reason): size, decode, signature, sender, swarm, version, stale, newcomer
admission, replay, rate, newcomer budget (see RateLimit for the sybil bounds). `MessageValidator.check` raises only
`Rejected`, whatever the input; the libp2p topic validator in `swarm.mesh` relies on that (a validator that raises
anything else can take a py-libp2p host down).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Final

from protocol.envelope import read_envelope, verify_envelope
from protocol.errors import ProtocolError
from protocol.identity import peer_id_from_public_key
from protocol.messages import MAX_MESSAGE_BYTES, Message

log = logging.getLogger(__name__)

REASONS: Final = ("size", "decode", "signature", "sender", "swarm", "version", "stale", "replay", "rate", "newcomer")
# Reasons that prove the message is bad no matter who judges it: an honest forwarder (which runs the same checks)
# never relays these, so they count against the forwarder as well as the publisher.
HARD_REASONS: Final = frozenset({"size", "decode", "signature", "sender", "swarm", "version"})


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RateLimit:
    """Per-sender token buckets. Defaults fit a node that publishes a few ~1 MB batches per ~1 s round."""

    msgs_per_s: float = 20.0
    msgs_burst: float = 60.0
    bytes_per_s: float = 8_000_000.0
    bytes_burst: float = 24_000_000.0
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
    __slots__ = ("seen", "floor", "msgs", "bytes", "first_seen")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.seen: set[int] = set()  # recent accepted seqs (at most replay_window)
        self.floor = -1  # every seq <= floor counts as seen
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
    """Stateful checker: per-sender replay window and rate buckets live in a bounded LRU of senders.

    Replay: gossip does not preserve order (a message can arrive later through IWANT), so instead of a strict
    "seq > last" we accept a seq once if it is newer than the sender's `replay_window`-th newest accepted seq (the
    IPsec anti-replay scheme). replay_window=1 is the strict high-water mark. A sender evicted from the LRU loses its
    window; the stale check (max_age_s) and libp2p's seen-cache still bound what can be replayed then.
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
        replay_window: int = 64,
        max_senders: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.swarm, self.version = swarm, version
        self.max_age_s, self.max_clock_skew_s = max_age_s, max_clock_skew_s
        self.rate = rate
        self.max_message_bytes = max_message_bytes
        self.replay_window = max(1, replay_window)
        self.max_senders = max_senders
        self.clock = clock
        self.counts: dict[str, int] = {r: 0 for r in REASONS}
        self.accepted = 0
        self._senders: OrderedDict[str, _SenderState] = OrderedDict()
        self._admit = TokenBucket(rate.new_senders_per_s, rate.new_senders_burst, clock())
        self._forwarders: OrderedDict[str, _ForwarderBudget] = OrderedDict()

    def check(self, data: bytes, from_peer: str, forwarder: str | None = None) -> Message:
        """The verified message, or Rejected(reason).

        `from_peer` is the libp2p original publisher (msg.from_id); `forwarder` the connected peer that relayed it
        (None: the publisher itself).
        """
        try:
            msg = self._check(data, from_peer, from_peer if forwarder is None else forwarder)
        except Rejected as r:
            self.counts[r.reason] = self.counts.get(r.reason, 0) + 1
            log.debug("rejected message from %s: %s", from_peer, r)
            raise
        except Exception as e:  # a bug or an input we did not foresee: still only ever a rejection
            self.counts["decode"] += 1
            log.debug("rejected message from %s: unexpected %r", from_peer, e)
            raise Rejected("decode", f"unexpected {type(e).__name__}") from None
        self.accepted += 1
        return msg

    def _check(self, data: bytes, from_peer: str, forwarder: str) -> Message:
        if not isinstance(data, (bytes, bytearray)):
            raise Rejected("decode", "not bytes")
        if len(data) > self.max_message_bytes:
            raise Rejected("size", f"{len(data)} bytes")
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

        now = self.clock()
        if not (now - self.max_age_s <= msg.created_at <= now + self.max_clock_skew_s):
            raise Rejected("stale", f"created_at {msg.created_at:.3f}, now {now:.3f}")

        st = self._senders.get(msg.sender)
        if st is None:
            if not self._admit.can_take(1, now):
                raise Rejected("newcomer", "too many new senders")
            self._admit.take(1, now)
            st = _SenderState(self.rate, now)
            self._senders[msg.sender] = st
            while len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
        else:
            self._senders.move_to_end(msg.sender)
        if (msg.seq <= st.floor or msg.seq in st.seen
                or (len(st.seen) >= self.replay_window and msg.seq < min(st.seen))):
            raise Rejected("replay", f"seq {msg.seq}")

        size = len(data)
        if not (st.msgs.can_take(1, now) and st.bytes.can_take(size, now)):
            raise Rejected("rate", f"{size} bytes")
        if now - st.first_seen < self.rate.probation_s:
            fb = self._forwarder_budget(forwarder, now)
            if not (fb.msgs.can_take(1, now) and fb.bytes.can_take(size, now)):
                raise Rejected("newcomer", f"{forwarder} is over its budget for new senders")
            fb.msgs.take(1, now)
            fb.bytes.take(size, now)
        st.msgs.take(1, now)
        st.bytes.take(size, now)

        st.seen.add(msg.seq)
        if len(st.seen) > self.replay_window:
            oldest = min(st.seen)
            st.seen.discard(oldest)
            st.floor = max(st.floor, oldest)
        return msg

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
    matter of clocks, timing and load) only the publisher. (A malformed pubsub frame gets its sender banned at once: see
    host.py.)"""

    def __init__(self, threshold: int = 10, window_s: float = 60.0, ban_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, max_peers: int = 4096) -> None:
        self.threshold, self.window_s, self.ban_s, self.clock = threshold, window_s, ban_s, clock
        self.max_peers = max_peers
        self._strikes: OrderedDict[str, deque[float]] = OrderedDict()
        self.total: dict[str, int] = {}
        self._banned: dict[str, float] = {}  # peer -> unban time

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

    def on_rejection(self, reason: str, publisher: str, forwarder: str) -> list[str]:
        """Newly banned peers after a rejection of `reason`.

        Hard reasons (a message no honest node would sign or relay) strike the publisher and the forwarder. Soft ones
        (stale, replay, rate) strike the publisher only when it sent the message itself: anyone can keep an honest
        node's old messages and relay them later, and that must not get the honest node banned.
        """
        if reason in HARD_REASONS:
            peers = [publisher] + ([forwarder] if forwarder != publisher else [])
        else:
            peers = [publisher] if forwarder == publisher else []
        return [p for p in peers if self.strike(p)]

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
