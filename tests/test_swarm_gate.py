"""Issue 12, items 6-8, through real py-libp2p hosts on loopback: relayed soft rejections cost the relay, inbound
budgets sized to what a node absorbs, and discovery that cannot be aimed at an address."""
from __future__ import annotations

import functools
import random
import string
import time

import trio

from protocol.envelope import seal
from protocol.identity import Identity
from protocol.messages import Rollout, TaskRef
from libp2p.pubsub.pb import rpc_pb2

from tests.byzantine import _libp2p_message
from swarm.mesh import Mesh, MeshConfig, topic_for
from tests.doubles import RawPublisher, make_batch

SWARM = "gate"
LOOP = "/ip4/127.0.0.1/tcp/0"


async def start(nursery: trio.Nursery, *bootstrap: Mesh, **kw) -> Mesh:
    cfg = MeshConfig(swarm=SWARM, listen=LOOP, bootstrap=tuple(m.listen_addrs()[0] for m in bootstrap),
                     heartbeat_s=0.5, hello_interval_s=1.0, bootstrap_backoff_max_s=2.0, **kw)
    mesh = Mesh(Identity.generate(), cfg)
    await nursery.start(mesh.run)
    return mesh


async def wait_until(pred, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


def megabyte_rollouts(rng: random.Random, n_chars: int = 16_000, completions: int = 58) -> tuple[Rollout, ...]:
    """One group of ~0.93 MB sealed (random letters: incompressible, as an attacker would send)."""
    text = "".join(rng.choices(string.ascii_letters, k=n_chars))
    return (Rollout(TaskRef.make("arith", {"digits": 2}, rng.randrange(2**31), 0),
                    tuple(text[i:] + text[:i] for i in range(completions)), None),)


class Relayer(RawPublisher):
    """A stock gossipsub peer that hands a victim messages libp2p-signed by *other* identities, as a relay does: the
    victim sees each one's publisher as that identity and this peer as the forwarder."""

    def relay(self, peer, signer: Identity, data: bytes) -> None:
        assert self.pubsub is not None
        msg = _libp2p_message(signer, self.topic, data, time.time_ns())
        self.pubsub.router.send_rpc(peer, rpc_pb2.RPC(publish=[msg]))


async def test_a_relay_of_stale_megabyte_envelopes_is_banned_and_they_cost_no_signature_check() -> None:
    """Item 6: ~1 MB envelopes an hour old, each signed by a fresh identity and relayed by one peer as fast as it can
    write. Before: every one was decoded and signature-checked, then rejected as stale, and nobody was struck (the
    publisher is not the connection; relaying an honest node's old messages must not ban it). Now: rejected from the
    header before the signature check, charged to the relay, which is banned after its budget (~16 MB) + 11 strikes."""
    rng = random.Random(6)
    sybils = [Identity.generate() for _ in range(120)]
    stale = [seal(make_batch(s, SWARM, created_at=time.time() - 3600, rollouts=megabyte_rollouts(rng)), s)
             for s in sybils]
    assert all(900_000 < len(d) <= 1_000_000 for d in stale)
    async with trio.open_nursery() as n:
        b = await start(n)
        attacker = Relayer(Identity.generate(), topic_for(SWARM))
        async with attacker.running():
            bpid = await attacker.connect(b.listen_addrs()[0])
            await attacker.wait_subscribed(bpid)
            await wait_until(lambda: attacker.identity.peer_id in b.peers())
            t0 = time.monotonic()
            for s, data in zip(sybils, stale):
                if attacker.identity.peer_id in b.stats()["banned"]:
                    break
                attacker.relay(bpid, s, data)
                await trio.sleep(0.02)  # let the victim read; an unthrottled writer only fills its own queue
            await wait_until(lambda: attacker.identity.peer_id in b.stats()["banned"], 30)
            st = b.stats()
            elapsed = time.monotonic() - t0
        n.cancel_scope.cancel()
    rej = st["rejections_by_reason"]
    assert rej["stale"] >= 16 and rej["stale"] == st["rejected_before_signature"], st
    assert st["relay_strikes"] >= 11
    # Banned within its budget + 11 strikes, counted on the victim's side, whatever the machine's speed (not the count
    # the attacker sent: under load the victim reads behind the writer, so more are in flight when the ban lands).
    # Under budget at most PeerStanding's 16 MB burst + 1 MB/s refilled over at most `elapsed` (17 of 19 allowed in
    # ~2 s idle); a bigger byte budget fails here (64 MB, tried: the 30-message burst binds, 31 > 19 in 1.9 s).
    under_budget = st["relay_charged"] - st["relay_strikes"]
    allowed = int((16e6 + 1e6 * elapsed) // min(map(len, stale)))
    assert 0 < under_budget <= allowed, (under_budget, allowed, elapsed)
    # ... and then banned at its 11th over-budget strike (more than the threshold of 10), not later
    assert st["strikes_total"].get(attacker.identity.peer_id) == 11, st["strikes_total"]
    assert not any(s.peer_id in st["banned"] or s.peer_id in st["strikes_total"] for s in sybils)


async def test_one_sender_gets_at_most_its_byte_budget_then_a_ban() -> None:
    """Item 7: one peer publishing valid ~1 MB batches back to back (~8 MB/s and more). The per-sender budget was
    8 MB/s with a 24 MB burst (a new sender started with 8 MB): all of it was accepted, validated and forwarded. Now
    1 MB/s, 4 MB burst, a new sender starts with 1 MB: the rest is rejected as "rate" and the sender banned."""
    rng = random.Random(7)
    evil_id = Identity.generate()
    batches = [seal(make_batch(evil_id, SWARM, rollouts=megabyte_rollouts(rng)), evil_id) for _ in range(30)]
    async with trio.open_nursery() as n:
        b = await start(n)
        evil = RawPublisher(evil_id, topic_for(SWARM))
        async with evil.running():
            bpid = await evil.connect(b.listen_addrs()[0])
            await evil.wait_subscribed(bpid)
            await wait_until(lambda: evil_id.peer_id in b.peers())
            t0 = trio.current_time()
            for data in batches:
                if evil_id.peer_id in b.stats()["banned"]:
                    break
                await evil.publish(data)
                await trio.sleep(0.05)
            await wait_until(lambda: evil_id.peer_id in b.stats()["banned"], 30)
            elapsed = trio.current_time() - t0
            st = b.stats()
        n.cancel_scope.cancel()
    accepted_mb = st["accepted"] * len(batches[0]) / 1e6
    assert st["accepted"] >= 1
    assert accepted_mb <= 1.0 + 1.0 * elapsed + 1.0, (accepted_mb, elapsed)  # first second + 1 MB/s (+ one in flight)
    assert st["rejections_by_reason"]["rate"] >= 11


async def test_the_node_total_budget_sheds_load_and_strikes_nobody() -> None:
    """Item 7: many young senders, each within its own budget, together over what the node absorbs. Without a total
    budget all 14 MB were accepted at once; now young senders get at most half of the 16 MB total burst and the rest
    is shed as "load", charged to nobody (not the relay, not the publishers)."""
    rng = random.Random(8)
    sybils = [Identity.generate() for _ in range(14)]
    fresh = [seal(make_batch(s, SWARM, rollouts=megabyte_rollouts(rng)), s) for s in sybils]
    refill = 50_000.0  # total bytes/s: a slow refill, so the bound below does not depend on the machine's speed
    async with trio.open_nursery() as n:
        b = await start(n, total_bytes_per_s=refill)
        relay = Relayer(Identity.generate(), topic_for(SWARM))
        async with relay.running():
            bpid = await relay.connect(b.listen_addrs()[0])
            await relay.wait_subscribed(bpid)
            await wait_until(lambda: relay.identity.peer_id in b.peers())
            t0 = trio.current_time()
            for s, data in zip(sybils, fresh):
                relay.relay(bpid, s, data)
                await trio.sleep(0.02)
            await wait_until(lambda: b.stats()["accepted"] + sum(b.stats()["rejections_by_reason"].values()) >= 14, 30)
            elapsed = trio.current_time() - t0
            st = b.stats()
        n.cancel_scope.cancel()
    size = len(fresh[0])
    bound = int((8e6 + refill * elapsed) // size) + 1  # half of the 16 MB total burst, what refilled, one in flight
    assert 1 <= st["accepted"] <= bound, (st["accepted"], bound)
    assert st["rejections_by_reason"]["load"] == 14 - st["accepted"], st["rejections_by_reason"]
    assert not st["banned"] and not st["strikes_total"]


# ---------------------------------------------------------------- item 8: discovery cannot be aimed at an address

class CountingListener:
    """Local TCP listeners on loopback (the "victim" address an attacker names) that count accepted connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self.ports: list[int] = []

    async def serve(self, nursery: trio.Nursery, n: int) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            self.accepted += 1
            await stream.aclose()

        for _ in range(n):
            listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            self.ports.append(listeners[0].socket.getsockname()[1])


async def test_hellos_naming_an_address_get_a_bounded_number_of_connections_to_it() -> None:
    """61 Hellos once made two honest nodes open 1,068 TCP connections to an address only the attacker named. Here 60
    fresh identities' Hellos, relayed by one peer connected to A (A forwards them to B), each name 6 ports of a
    counting listener (16 spellings, with /p2p/ suffixes and repeats). Before: every Hello dialed every address, and
    py-libp2p retried each dial 3 times (hundreds of connections). Now: at most 4 addresses per peer, one attempt
    per target address and redial interval per node, and the relay's new-peer budget caps how many identities it can
    make us dial at all."""
    from protocol.messages import PROTOCOL_VERSION, Hello

    sybils = [Identity.generate() for _ in range(60)]
    async with trio.open_nursery() as n:
        target = CountingListener()
        await target.serve(n, 6)
        a = await start(n)
        b = await start(n, a)
        await wait_until(lambda: b.peer_id in a.peers() and a.peer_id in b.peers())
        attacker = Relayer(Identity.generate(), topic_for(SWARM))
        async with attacker.running():
            apid = await attacker.connect(a.listen_addrs()[0])
            await attacker.wait_subscribed(apid)
            await wait_until(lambda: attacker.identity.peer_id in a.peers())
            t0 = trio.current_time()
            for s in sybils:
                addrs = [f"/ip4/127.0.0.1/tcp/{p}" for p in target.ports]
                addrs += [f"{x}/p2p/{s.peer_id}" for x in addrs] + addrs[:2] * 4
                hello = Hello(s.peer_id, SWARM, PROTOCOL_VERSION, 0, time.time(), time.time_ns() // 1000, "m",
                              tuple(addrs[:16]))
                attacker.relay(apid, s, seal(hello, s))
                await trio.sleep(0.01)
            # every Hello reached A and B's discovery, and no dial is still in flight
            await wait_until(lambda: a.stats()["accepted_hellos"] >= 60 and b.stats()["accepted_hellos"] >= 60, 30)
            await wait_until(lambda: not a._discovery._dialing and not b._discovery._dialing, 60)
            elapsed = trio.current_time() - t0
            st_a, st_b = a.stats(), b.stats()
        n.cancel_scope.cancel()
    retry = a._discovery.addr_retry_s
    bound = 2 * 4 * (1 + int(elapsed // retry))  # per node, per address (4 of 6), per redial interval
    assert 1 <= target.accepted <= bound, (target.accepted, bound, st_a["dials"], st_b["dials"])
    assert st_a["dials"]["addrs_refused"] > 0 and st_a["dials"]["dials_throttled"] > 0
    assert b.peer_id in st_a["peers"]  # the honest link is intact


async def test_a_tarpit_address_frees_its_dial_slot_after_the_dial_timeout() -> None:
    """A listener that accepts and never answers (no Noise handshake): each dial there gives up after
    dial_timeout_s (5 s; before: 10 s per attempt x 4 attempts with py-libp2p's retries), once."""
    from protocol.messages import PROTOCOL_VERSION, Hello

    held: list[trio.SocketStream] = []

    async def tarpit(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, tarpit, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        a = await start(n)
        relay = Relayer(Identity.generate(), topic_for(SWARM))
        async with relay.running():
            apid = await relay.connect(a.listen_addrs()[0])
            await relay.wait_subscribed(apid)
            await wait_until(lambda: relay.identity.peer_id in a.peers())
            s = Identity.generate()
            hello = Hello(s.peer_id, SWARM, PROTOCOL_VERSION, 0, time.time(), 1, "m", (f"/ip4/127.0.0.1/tcp/{port}",))
            t0 = trio.current_time()
            relay.relay(apid, s, seal(hello, s))
            await wait_until(lambda: a.stats()["dials"]["dial_timeouts"] >= 1, 30)
            took = trio.current_time() - t0
            await wait_until(lambda: not a._discovery._dialing, 10)
        n.cancel_scope.cancel()
    assert len(held) == 1  # one connection, no retries
    timeout = a._discovery.dial_timeout_s
    assert timeout <= 5.0  # a slot held by a tarpit is back within seconds (it was 10 s)
    assert timeout <= took < timeout + 10, took  # + scheduling on a loaded machine, never another attempt


def test_address_filter_never_dials_link_local_multicast_broadcast_or_unspecified() -> None:
    """No real dials: what the policy lets through for each range, depending on where the node itself listens."""
    from swarm.discovery import MAX_ADDRS_PER_PEER, AddressPolicy, address_class

    cases = {
        "/ip4/127.0.0.1/tcp/4001": "loopback", "/ip4/127.9.9.9/tcp/4001": "loopback", "/ip6/::1/tcp/4001": "loopback",
        "/ip4/10.1.2.3/tcp/4001": "private", "/ip4/172.16.0.1/tcp/4001": "private",
        "/ip4/192.168.1.1/tcp/4001": "private", "/ip4/100.64.0.1/tcp/4001": "private",
        "/ip6/fd00::1/tcp/4001": "private",
        "/ip4/8.8.8.8/tcp/4001": "public", "/ip6/2001:4860:4860::8888/tcp/4001": "public",
        "/ip4/169.254.169.254/tcp/80": None, "/ip6/fe80::1/tcp/4001": None,  # link-local (cloud metadata, too)
        "/ip4/224.0.0.1/tcp/4001": None, "/ip4/239.255.255.250/tcp/1900": None, "/ip6/ff02::1/tcp/4001": None,
        "/ip4/255.255.255.255/tcp/4001": None, "/ip4/240.0.0.1/tcp/4001": None,  # broadcast, reserved
        "/ip4/0.0.0.0/tcp/4001": None, "/ip4/0.1.2.3/tcp/4001": None, "/ip6/::/tcp/4001": None,
        "/ip6/::ffff:169.254.1.1/tcp/4001": None, "/ip6/::ffff:127.0.0.1/tcp/4001": "loopback",
        "/ip4/8.8.8.8/tcp/0": None, "/ip4/8.8.8.8/udp/4001": None, "/dns4/example.com/tcp/4001": None, "junk": None,
    }
    for addr, cls in cases.items():
        assert address_class(addr) == cls, addr
    everything = list(cases)
    loop_only = AddressPolicy([f"/ip4/127.0.0.1/tcp/5000/p2p/{Identity.generate().peer_id}"])
    assert loop_only.allowed == {"loopback", "public"}
    lan = AddressPolicy(["/ip4/192.168.1.7/tcp/5000", "/ip4/127.0.0.1/tcp/5000"])  # a wildcard listen, expanded
    assert lan.allowed == {"loopback", "private", "public"}
    public = AddressPolicy(["/ip4/8.8.4.4/tcp/5000"])
    assert public.allowed == {"public"}
    for policy in (loop_only, lan, public):
        kept, refused = policy.filter(everything, limit=100)
        assert all(address_class(a) in policy.allowed for a in kept) and refused == len(everything) - len(kept)
        assert not any(address_class(a) is None for a in kept)
    kept, refused = public.filter(["/ip4/8.8.8.8/tcp/1"] * 3 + [f"/ip4/8.8.8.{i}/tcp/1" for i in range(1, 9)])
    assert len(kept) == MAX_ADDRS_PER_PEER and len(set(kept)) == len(kept)


async def test_an_unreachable_bootstrap_is_reported_once_in_the_nodes_words(caplog) -> None:
    """py-libp2p logged ERROR "Failed to open TCP stream" on every retry; now one warning of ours, with the reason and
    the retry schedule, however many retries follow."""
    import logging
    import socket

    caplog.set_level(logging.WARNING, logger="swarm.discovery")
    libp2p_records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            libp2p_records.append(record)

    tcp_log = logging.getLogger("libp2p.transport.tcp.tcp")
    keep = Keep(level=logging.DEBUG)
    tcp_log.addHandler(keep)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        async with trio.open_nursery() as n:
            boot = f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"
            b = Mesh(Identity.generate(), MeshConfig(swarm=SWARM, listen=LOOP, bootstrap=(boot,),
                                                     bootstrap_backoff_max_s=1.0))
            await n.start(b.run)
            await wait_until(lambda: b._discovery.dials_failed >= 4, 30)  # the first try and three retries
            n.cancel_scope.cancel()
    finally:
        tcp_log.removeHandler(keep)
    ours = [r.getMessage() for r in caplog.records if r.name == "swarm.discovery" and r.levelno >= logging.WARNING]
    assert len(ours) == 1, ours
    assert "no bootstrap peer answered" in ours[0] and "Connection refused" in ours[0]
    assert "retrying each one after 0.5 s, doubling up to every 1 s" in ours[0], ours[0]
    assert not [r for r in libp2p_records if "Failed to open TCP stream" in r.getMessage()]


async def test_a_bootstrap_dial_that_timed_out_gets_twice_the_time_next() -> None:
    """64 processes on 2 cores: a trainer whose first bootstrap dials took more than the 5 s dial timeout stayed alone
    for its whole run, every later attempt cut off at 5 s too. A bootstrap peer that does not answer in time now gets
    twice as long at each attempt, up to BOOTSTRAP_DIAL_MAX_S. Measured at a listener that accepts and never answers:
    how long each attempt held the connection before giving up."""
    import multiaddr

    from swarm.discovery import Discovery
    from swarm.host import build_host

    held: list[float] = []

    async def tarpit(stream: trio.SocketStream) -> None:
        t0 = trio.current_time()
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        held.append(trio.current_time() - t0)

    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, tarpit, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        host = build_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"])
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            boot = f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"
            disc = Discovery(host, bootstrap=(boot,), dial_timeout_s=0.25, backoff_initial_s=0.05, backoff_max_s=0.1)
            await n.start(disc.run)
            with trio.fail_after(30):
                while len(held) < 4:
                    await trio.sleep(0.05)
            n.cancel_scope.cancel()
    assert [round(h / 0.25) for h in held[:4]] == [1, 2, 4, 8], held  # 0.25, 0.5, 1, 2 s
