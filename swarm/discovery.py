"""Finding peers: bootstrap dialing with capped exponential backoff, then signed peer exchange over the topic.

Pick: every node periodically publishes a signed `Hello` (its listen multiaddrs, round, model) on the swarm topic; a
receiver dials senders it is not connected to, up to `max_peers` connections, and keeps redialing the ones it has heard
from (every ~redial_after_s, for up to forget_after_s) when their connection is lost. Why this and not the
alternatives that ran on loopback in 0.8.1:
- It rides on what we must run anyway (gossipsub + our validator), so a Hello is authenticated like any message
  (signature, sender == libp2p publisher, swarm, version, freshness, replay, rate): a peer cannot advertise addresses
  for someone else, and a dial verifies the peer ID in the Noise handshake, so a false address cannot impersonate.
- It needs no special nodes. Rendezvous needs a rendezvous server every node agrees on (a single point of failure
  that we would also have to run); Kademlia (KadDHT) needs its own protocol handlers, a routing table, and a
  bootstrapped DHT, and then a provider-record scheme per swarm; both are extra attack surface in a fast-moving
  library for a swarm of tens of nodes that already share one gossip topic.
- Hellos double as a status board (round, model) for `Mesh.stats()`.
Gossipsub's own PX (do_px) only rides on PRUNE when a mesh is over D_high, so small swarms would never learn peers.

mDNS is optional (off by default): py-libp2p's zeroconf implementation only fills the peerstore, so with mdns on we
scan the peerstore every 5 s and dial what is new. Multicast: not testable on loopback, so untested here.

Discovery must not be a weapon (issue 12, item 8: 61 Hellos once made two honest nodes open 1,068 TCP connections to
an address only the attacker named). A Hello's addresses are the sender's claim, so before anything is dialed:
- address ranges are filtered (`AddressPolicy`): never link-local, multicast, broadcast, unspecified or reserved;
  loopback only when this node listens on loopback itself, private (RFC 1918, CGNAT, ULA) only when it listens on a
  private address; at most `MAX_ADDRS_PER_PEER` distinct addresses per peer;
- only Hellos delivered by a peer we are connected to lead to dials, and each such relay can make us dial new peers
  only at a bounded rate (`via_dials_per_s`, burst `via_dials_burst`), however many identities it relays Hellos for;
- every dial attempt takes a token from a global bucket (`dials_per_s`, burst `dials_burst`), and one target address
  (ip, port) is tried at most once per `addr_retry_s` (default: the redial interval), whichever peer ID claims it,
  unless the last attempt there reached the peer it was meant for;
- a dial gives up after `dial_timeout_s` per address (tarpits that accept and never answer free the slot quickly).
Bootstrap addresses are the user's own choice: dialed as given, retried with backoff. py-libp2p's own auto-connector
(it dials whatever the peerstore holds, and identify lets any connected peer put up to 1,000 addresses there) is
stopped, and its dial_addr retries (3 more TCP connections per address, 0.1-0.4 s apart) are turned off: each
attempt counted here is one TCP connection, and this module's own schedules do the retrying.

py-libp2p 0.8.1 dial quirks this module works around:
- `host.connect` -> `Swarm.dial_peer` tries only ONE address per transport class (first TCP address wins) and
  skips loopback addresses when any other exists; we dial each advertised address ourselves with `dial_addr`.
- After all addresses of a peer fail, `dial_peer` refuses that peer for 60 s (negative cache); `dial_addr` does not
  consult that cache, so our own backoff schedule is what applies.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import random
import time
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from protocol.messages import Hello

from .peerbook import KnownPeer, PeerBook, capacity_for
from .validator import TokenBucket

__all__ = ["AddressPolicy", "Discovery", "KnownPeer", "address_class", "dialable", "split_p2p_addr"]

log = logging.getLogger(__name__)

MAX_ADDRS_PER_PEER = 4  # a node on 0.0.0.0 advertises its interfaces + 127.0.0.1: a few, after filtering
BOOTSTRAP_DIAL_MAX_S = 30.0  # a bootstrap dial's timeout doubles from dial_timeout_s after each failure, up to this
BOOTSTRAP_WARN_EVERY = 10  # a node still alone says why after this many failed dials to one bootstrap peer
_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # shared address space: private use, not in 3.11's is_private
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def split_p2p_addr(addr: str) -> tuple[str, str | None]:
    """('/ip4/x/tcp/p', peer_id or None) for a multiaddr string, or ValueError."""
    ma = multiaddr.Multiaddr(addr)
    try:
        pid = ma.value_for_protocol("p2p")
    except Exception:
        pid = None
    if pid:
        ma = ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{pid}"))
    return str(ma), (str(pid) if pid else None)


def address_class(addr: str) -> str | None:
    """'loopback', 'private' or 'public' for a TCP-over-IP multiaddr; None for one never to dial (link-local, multicast,
    broadcast, unspecified, reserved, "this network", anything that is not /ip4|ip6/.../tcp/...)."""
    try:
        ma = multiaddr.Multiaddr(addr)
        names = [p.name for p in ma.protocols()]
        if "tcp" not in names:
            return None
        kind = "ip4" if "ip4" in names else "ip6" if "ip6" in names else None
        if kind is None:
            return None
        ip = ipaddress.ip_address(ma.value_for_protocol(kind))
        port = int(ma.value_for_protocol("tcp"))
    except Exception:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if port == 0:
        return None
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return None
    if ip.is_loopback:
        return "loopback"  # before is_reserved: ::1 lies in the reserved ::/8
    if ip.is_reserved:
        return None  # 255.255.255.255 (broadcast) is in 240.0.0.0/4, reserved
    if isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return None  # deprecated (RFC 3879)
    if ip.is_private or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT):
        return "private"
    return "public" if ip.is_global else None


class AddressPolicy:
    """Which advertised address classes this node may dial, from its own listen addresses: public always, loopback
    only if it listens on loopback, private only if it listens on a private address (a wildcard listen counts as
    what it expands to: its interfaces and 127.0.0.1)."""

    def __init__(self, own_addrs: Iterable[str]) -> None:
        own = {address_class(a) for a in own_addrs}
        self.allowed = frozenset({"public"} | ({"loopback"} & own) | ({"private"} & own))

    def filter(self, addrs: Iterable[str], limit: int = MAX_ADDRS_PER_PEER) -> tuple[list[str], int]:
        """(the addresses to dial, deduplicated and at most `limit`, in the given order; how many were refused)."""
        out: list[str] = []
        refused = 0
        for a in addrs:
            if a in out:
                continue
            if address_class(a) not in self.allowed or len(out) >= limit:
                refused += 1
                continue
            out.append(a)
        return out, refused


def dialable(addr: str) -> bool:
    """TCP over ip4/ip6, not a wildcard: the only thing our hosts listen on."""
    try:
        names = [p.name for p in multiaddr.Multiaddr(addr).protocols()]
    except Exception:
        return False
    if "tcp" not in names or not ({"ip4", "ip6"} & set(names)):
        return False
    return "/ip4/0.0.0.0/" not in addr and "/ip6/::/" not in addr


class Discovery:
    def __init__(
        self,
        host: IHost,
        *,
        bootstrap: Sequence[str] = (),
        max_peers: int = 32,
        is_banned: Callable[[str], bool] = lambda p: False,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        dial_timeout_s: float = 5.0,
        redial_after_s: float = 30.0,
        forget_after_s: float = 3600.0,
        scan_peerstore: bool = False,
        own_addrs: Sequence[str] | None = None,
        dials_per_s: float = 2.0,
        dials_burst: float = 16.0,
        addr_retry_s: float | None = None,
        via_dials_per_s: float = 0.5,
        via_dials_burst: float = 16.0,
        shards: int = 1,
    ) -> None:
        self.host = host
        self.me = host.get_id().to_base58()
        self.bootstrap = tuple(bootstrap)
        self.max_peers = max_peers
        self.is_banned = is_banned
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.dial_timeout_s = dial_timeout_s
        self.redial_after_s = redial_after_s
        self.forget_after_s = forget_after_s  # a known peer not heard from for this long is no longer redialed
        self.scan_peerstore = scan_peerstore
        # Hello senders, kept per home shard (swarm.peerbook): every shard we may rotate into keeps its share
        self.known = PeerBook(capacity_for(max_peers, shards), shards)
        self.dials_ok = 0
        self.dials_failed = 0
        self.dial_attempts = 0  # addresses dialed (peer exchange, redials, shard top-ups; bootstrap too)
        self.dial_timeouts = 0
        self.addrs_refused = 0  # advertised addresses never dialed (range, per-peer cap)
        self.dials_throttled = 0  # dials skipped for the global, per-address or per-relay limits
        self.bootstrap_connected = 0  # bootstrap peers connected at least once
        single_attempt_dials(host)
        quiet_libp2p_dial_errors()
        self._last_error: dict[str, str] = {}  # peer -> why its last dial failed (for the one bootstrap warning)
        if own_addrs is None:
            own_addrs = [str(a) for a in host.get_addrs()]
        self.policy = AddressPolicy(own_addrs)
        self.addr_retry_s = redial_after_s if addr_retry_s is None else addr_retry_s
        now = trio.current_time()
        self._dial_tokens = TokenBucket(dials_per_s, dials_burst, now)
        self._addr_tried: OrderedDict[str, float] = OrderedDict()  # target address -> trio time of the last attempt
        self._via_limits = (via_dials_per_s, via_dials_burst)
        self._via_tokens: OrderedDict[str, TokenBucket] = OrderedDict()
        self._dialing: set[str] = set()
        self._last_try: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        self._px_limit = trio.Semaphore(4)  # concurrent peer-exchange dials

    def connected(self, peer: str) -> bool:
        try:
            return bool(self.host.get_network().get_connections(ID.from_base58(peer)))
        except Exception:
            return False

    def n_connected(self) -> int:
        return len(self.host.get_connected_peers())

    async def dial(self, peer: str, addrs: Sequence[str], *, trusted: bool = False,
                   timeout_s: float | None = None) -> bool:
        """Try each address in turn (loopback last); True once connected.

        Untrusted addresses (anything a peer advertised) go through the address policy and the dial limits (module
        doc); `trusted` ones (the user's --bootstrap) are dialed as given. `timeout_s` per address: dial_timeout_s
        unless given."""
        timeout_s = self.dial_timeout_s if timeout_s is None else timeout_s
        if peer == self.me or self.is_banned(peer):
            return False
        if self.connected(peer):
            return True
        if not trusted:
            addrs, refused = self.policy.filter(addrs)
            self.addrs_refused += refused
        pid = ID.from_base58(peer)
        ordered = sorted(addrs, key=lambda a: address_class(a) == "loopback")
        network = self.host.get_network()
        tried = False
        for addr in ordered:
            if not trusted and not self._may_dial(addr):
                continue
            tried = True
            self.dial_attempts += 1
            try:
                with trio.fail_after(timeout_s):
                    await network.dial_addr(multiaddr.Multiaddr(addr), pid)
                self.host.get_peerstore().add_addrs(pid, [multiaddr.Multiaddr(addr)], 3600)
                self._addr_tried.pop(addr, None)  # the right peer answered there: a later redial need not wait
                self.dials_ok += 1
                log.debug("connected to %s at %s", peer, addr)
                return True
            except trio.TooSlowError:
                self.dial_timeouts += 1
                self._last_error[peer] = f"no answer within {timeout_s:.0f} s"
                log.debug("dial %s at %s timed out after %.1f s", peer, addr, timeout_s)
            except Exception as e:
                self._last_error[peer] = _reason(e)
                if len(self._last_error) > 4 * self.max_peers:
                    self._last_error.pop(next(iter(self._last_error)))
                log.debug("dial %s at %s failed: %s", peer, addr, e)
        if tried:
            self.dials_failed += 1
        return False

    def _may_dial(self, addr: str) -> bool:
        """Take the global dial token and the target address's slot, or count a throttled dial."""
        now = trio.current_time()
        last = self._addr_tried.get(addr)
        if (last is not None and now - last < self.addr_retry_s) or not self._dial_tokens.can_take(1, now):
            self.dials_throttled += 1
            return False
        self._dial_tokens.take(1, now)
        self._addr_tried[addr] = now
        self._addr_tried.move_to_end(addr)
        while len(self._addr_tried) > 4096:
            self._addr_tried.popitem(last=False)
        return True

    def _via_may_dial(self, via: str) -> bool:
        """One new-peer dial on behalf of relay `via` (the connected peer that delivered the Hello)."""
        now = trio.current_time()
        bucket = self._via_tokens.get(via)
        if bucket is None:
            bucket = self._via_tokens[via] = TokenBucket(*self._via_limits, now)
            while len(self._via_tokens) > 4 * self.max_peers:
                self._via_tokens.popitem(last=False)
        else:
            self._via_tokens.move_to_end(via)
        if not bucket.can_take(1, now):
            self.dials_throttled += 1
            return False
        bucket.take(1, now)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial bootstrap peers (each in its own retrying task) and serve peer-exchange dials; runs until cancelled."""
        stop_auto_connector(self.host)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.bootstrap:
                first_round = [trio.Event() for _ in self.bootstrap]
                answered = [False]
                for addr, ev in zip(self.bootstrap, first_round):
                    nursery.start_soon(self._keep_bootstrap, addr, ev, answered)
                nursery.start_soon(self._warn_if_alone, first_round, answered)
            if self.scan_peerstore:
                nursery.start_soon(self._scan_peerstore_loop)
            nursery.start_soon(self._redial_loop)
            task_status.started()
            await trio.sleep_forever()

    async def _scan_peerstore_loop(self, every_s: float = 5.0) -> None:
        """mDNS only fills the peerstore: dial what it found (same limits as peer exchange)."""
        while True:
            await trio.sleep(every_s)
            store = self.host.get_peerstore()
            for pid in list(store.peers_with_addrs()):
                peer = pid.to_base58()
                if peer in self.known:
                    continue  # redialed from its Hellos
                self._maybe_dial(peer, self.policy.filter(str(a) for a in store.addrs(pid) if dialable(str(a)))[0])

    async def _warn_if_alone(self, first_round: list[trio.Event], answered: list[bool]) -> None:
        for ev in first_round:
            await ev.wait()
        if not answered[0]:
            # said once, in our words (py-libp2p's own "Failed to open TCP stream" per attempt is filtered out)
            why = []
            for addr in self.bootstrap:
                try:
                    peer = split_p2p_addr(addr)[1]
                except Exception:
                    peer = None
                why.append(f"{addr}: {self._last_error.get(peer or '', 'not dialable')}")
            log.warning("no bootstrap peer answered (%s); running alone and retrying each one after %.1f s, doubling "
                        "up to every %.0f s (+-20 %%), for as long as the node runs", "; ".join(why),
                        self.backoff_initial_s, self.backoff_max_s)

    async def _keep_bootstrap(self, addr: str, first_done: trio.Event, answered: list[bool]) -> None:
        """Stay connected to one bootstrap peer: retry with capped exponential backoff (and jitter), forever."""
        try:
            base, peer = split_p2p_addr(addr)
        except Exception as e:
            log.warning("ignoring bootstrap address %r: %s", addr, e)
            first_done.set()
            return
        if peer is None:
            log.warning("ignoring bootstrap address %r: it needs a /p2p/<peer id> suffix", addr)
            first_done.set()
            return
        delay = self.backoff_initial_s
        ever = False
        failures = 0
        while True:
            if self.connected(peer) or self.is_banned(peer):
                delay = self.backoff_initial_s
                failures = 0
                first_done.set()
                await trio.sleep(self.backoff_max_s / 6)  # cheap liveness poll; reconnect if the link drops
                continue
            # each failed attempt gives the next one twice the time, up to BOOTSTRAP_DIAL_MAX_S: on a loaded machine
            # (64 processes on 2 cores) a whole dial took more than 5 s, and a trainer whose first bootstrap dials
            # timed out stayed alone for its whole run (docs/scale.md, session 9)
            timeout_s = min(self.dial_timeout_s * 2 ** failures, max(self.dial_timeout_s, BOOTSTRAP_DIAL_MAX_S))
            ok = await self.dial(peer, [base], trusted=True, timeout_s=timeout_s)
            if ok:
                answered[0] = True
                if not ever:
                    ever = True
                    self.bootstrap_connected += 1
                log.info("connected to bootstrap peer %s", addr)
                delay = self.backoff_initial_s
                failures = 0
            else:
                failures += 1
                if failures % BOOTSTRAP_WARN_EVERY == 0 and self.n_connected() == 0:  # alone: say why, now and then
                    log.warning("still alone: bootstrap %s failed %d times in a row (last: %s); retrying",
                                addr, failures, self._last_error.get(peer, "?"))
                log.debug("bootstrap %s did not answer; retrying in %.1f s", addr, delay)
            first_done.set()
            if not ok:
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.backoff_max_s)

    def on_hello(self, hello: Hello, received_at: float, via: str | None = None) -> None:
        """Record a verified Hello delivered by `via` (the connected peer that handed it to us; None: its sender) and
        dial its sender if we are not connected and have room. Only policy-allowed addresses are kept."""
        addrs = []
        for a in hello.listen_addrs:
            try:
                base, pid = split_p2p_addr(a)
            except Exception:
                continue
            if pid not in (None, hello.sender) or not dialable(base):
                continue  # an address for somebody else is ignored, never dialed
            addrs.append(base)
        addrs, refused = self.policy.filter(addrs)
        self.addrs_refused += refused
        if via is not None and via != hello.sender and not self.connected(via):
            return  # only Hellos from peers we are connected to lead anywhere
        self.known.add(KnownPeer(hello.sender, tuple(addrs), hello.round, hello.model, received_at))
        self._maybe_dial(hello.sender, addrs, via=via)

    def _maybe_dial(self, peer: str, addrs: Sequence[str], via: str | None = None) -> None:
        """Start a peer-exchange dial unless we are connected, already dialing, full, tried it recently, or the relay
        that told us about it is over its budget of new-peer dials."""
        if (self._nursery is None or not addrs or peer == self.me or peer in self._dialing or self.is_banned(peer)
                or self.connected(peer) or self.n_connected() >= self.max_peers):
            return
        now = trio.current_time()
        if now - self._last_try.get(peer, -math.inf) < self.redial_after_s:
            return
        if via is not None and via != peer and not self._via_may_dial(via):
            return
        self._last_try[peer] = now
        if len(self._last_try) > 8 * self.max_peers:
            self._last_try = {p: t for p, t in self._last_try.items() if now - t < self.redial_after_s}
        self._dialing.add(peer)
        self._nursery.start_soon(self._px_dial, peer, list(addrs))

    async def _redial_loop(self) -> None:
        """Redial known peers we lost. Hellos cannot cross a cut link, so after a partition heals two halves that
        bootstrap to different peers would otherwise never find each other again."""
        while True:
            await trio.sleep(self.redial_after_s / 3)
            now = time.time()
            room = self.n_connected() < self.max_peers  # else _maybe_dial refuses them all: skip the per-peer checks
            for kp in self.known.values():
                if now - kp.last_hello > self.forget_after_s:
                    self.known.remove(kp.peer_id)
                    continue
                if room:
                    self._maybe_dial(kp.peer_id, kp.addrs)

    async def _px_dial(self, peer: str, addrs: list[str]) -> None:
        try:
            async with self._px_limit:
                if await self.dial(peer, addrs):
                    log.info("peer exchange: connected to %s", peer)
        finally:
            self._dialing.discard(peer)


def stop_auto_connector(host: IHost) -> bool:
    """Stop py-libp2p 0.8.1's AutoConnector (it dials peerstore entries, which identify fills with whatever addresses
    a connected peer claims, toward a target of 150 connections); True if one was running."""
    ac = getattr(host.get_network(), "auto_connector", None)
    if ac is None or not getattr(ac, "_started", False):
        return False
    ac._started = False  # its loop and the on-disconnect trigger both return at once when not started
    ac._shutdown_event.set()
    return True


def single_attempt_dials(host: IHost) -> None:
    """Make `Swarm.dial_addr` one TCP connection per call (py-libp2p 0.8.1 retries 3 times by default)."""
    network = host.get_network()
    rc = getattr(network, "retry_config", None)
    if rc is not None and getattr(rc, "max_retries", 0) != 0:
        network.retry_config = dataclasses.replace(rc, max_retries=0)


def _reason(exc: BaseException) -> str:
    """A short why for a failed dial: the innermost OS error's text ("Connection refused"), else the innermost
    message (py-libp2p wraps trio's OSError, which wraps one error per attempt)."""
    best: str | None = None
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            best = e.strerror
        if isinstance(e, BaseExceptionGroup) and e.exceptions:
            e = e.exceptions[0]
            continue
        e = e.__cause__ or e.__context__
    return best or (str(exc).split(": ")[-1][:120] or type(exc).__name__)


class _DropDialFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to open TCP stream")


_DIAL_FAILURE_FILTER = _DropDialFailures()


def quiet_libp2p_dial_errors() -> None:
    """py-libp2p 0.8.1 logs ERROR "Failed to open TCP stream" (to stderr, its own handler) for every failed dial, so an
    unreachable bootstrap repeated it on every retry; Discovery reports failures itself (once, with the schedule)."""
    lg = logging.getLogger("libp2p.transport.tcp.tcp")
    if _DIAL_FAILURE_FILTER not in lg.filters:
        lg.addFilter(_DIAL_FAILURE_FILTER)
