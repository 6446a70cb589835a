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

py-libp2p 0.8.1 dial quirks this module works around:
- `host.connect` -> `Swarm.dial_peer` tries only ONE address per transport class (first TCP address wins) and
  skips loopback addresses when any other exists; we dial each advertised address ourselves with `dial_addr`.
- After all addresses of a peer fail, `dial_peer` refuses that peer for 60 s (negative cache); `dial_addr` does not
  consult that cache, so our own backoff schedule is what applies.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from protocol.messages import Hello

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownPeer:
    peer_id: str
    addrs: tuple[str, ...]
    round: int
    model: str
    last_hello: float  # wall clock when we received its latest Hello


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
        dial_timeout_s: float = 10.0,
        redial_after_s: float = 30.0,
        forget_after_s: float = 3600.0,
        scan_peerstore: bool = False,
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
        self.known: dict[str, KnownPeer] = {}
        self.dials_ok = 0
        self.dials_failed = 0
        self.bootstrap_connected = 0  # bootstrap peers connected at least once
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

    async def dial(self, peer: str, addrs: Sequence[str]) -> bool:
        """Try each address in turn (loopback last); True once connected."""
        if peer == self.me or self.is_banned(peer):
            return False
        if self.connected(peer):
            return True
        pid = ID.from_base58(peer)
        ordered = sorted(addrs, key=lambda a: ("/ip4/127." in a or "/ip6/::1/" in a))
        network = self.host.get_network()
        for addr in ordered:
            try:
                with trio.fail_after(self.dial_timeout_s):
                    await network.dial_addr(multiaddr.Multiaddr(addr), pid)
                self.host.get_peerstore().add_addrs(pid, [multiaddr.Multiaddr(addr)], 3600)
                self.dials_ok += 1
                log.debug("connected to %s at %s", peer, addr)
                return True
            except (Exception, trio.TooSlowError) as e:
                log.debug("dial %s at %s failed: %s", peer, addr, e)
        self.dials_failed += 1
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial bootstrap peers (each in its own retrying task) and serve peer-exchange dials; runs until cancelled."""
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
                self._maybe_dial(peer, [str(a) for a in store.addrs(pid) if dialable(str(a))])

    async def _warn_if_alone(self, first_round: list[trio.Event], answered: list[bool]) -> None:
        for ev in first_round:
            await ev.wait()
        if not answered[0]:
            log.warning("no bootstrap peer answered (%s); running alone and retrying in the background",
                        ", ".join(self.bootstrap))

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
        while True:
            if self.connected(peer) or self.is_banned(peer):
                delay = self.backoff_initial_s
                first_done.set()
                await trio.sleep(self.backoff_max_s / 6)  # cheap liveness poll; reconnect if the link drops
                continue
            ok = await self.dial(peer, [base])
            if ok:
                answered[0] = True
                if not ever:
                    ever = True
                    self.bootstrap_connected += 1
                log.info("connected to bootstrap peer %s", addr)
                delay = self.backoff_initial_s
            else:
                log.debug("bootstrap %s did not answer; retrying in %.1f s", addr, delay)
            first_done.set()
            if not ok:
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.backoff_max_s)

    def on_hello(self, hello: Hello, received_at: float) -> None:
        """Record a verified Hello; dial its sender if we are not connected and have room."""
        addrs = []
        for a in hello.listen_addrs:
            try:
                base, pid = split_p2p_addr(a)
            except Exception:
                continue
            if pid not in (None, hello.sender) or not dialable(base):
                continue  # an address for somebody else is ignored, never dialed
            addrs.append(base)
        self.known[hello.sender] = KnownPeer(hello.sender, tuple(addrs), hello.round, hello.model, received_at)
        if len(self.known) > 4 * self.max_peers:  # forget the least recently heard
            oldest = min(self.known.values(), key=lambda k: k.last_hello)
            del self.known[oldest.peer_id]
        self._maybe_dial(hello.sender, addrs)

    def _maybe_dial(self, peer: str, addrs: Sequence[str]) -> None:
        """Start a peer-exchange dial unless we are connected, already dialing, full, or tried it recently."""
        if (self._nursery is None or not addrs or peer == self.me or peer in self._dialing or self.is_banned(peer)
                or self.connected(peer) or self.n_connected() >= self.max_peers):
            return
        now = trio.current_time()
        if now - self._last_try.get(peer, -math.inf) < self.redial_after_s:
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
            for kp in list(self.known.values()):
                if now - kp.last_hello > self.forget_after_s:
                    del self.known[kp.peer_id]
                    continue
                self._maybe_dial(kp.peer_id, kp.addrs)

    async def _px_dial(self, peer: str, addrs: list[str]) -> None:
        try:
            async with self._px_limit:
                if await self.dial(peer, addrs):
                    log.info("peer exchange: connected to %s", peer)
        finally:
            self._dialing.discard(peer)
