"""Real py-libp2p hosts on loopback, in one trio run: delivery, peer exchange, rejection, robustness, splitting."""
from __future__ import annotations

import json
import time
from typing import Callable

import pytest
import trio

from protocol.envelope import seal
from protocol.identity import Identity
from protocol.messages import Rollout, TaskRef
from libp2p.peer.id import ID

from swarm.mesh import Mesh, MeshConfig, Received, topic_for
from tests.doubles import (GarbageStreamPeer, PlaintextDialer, RawPublisher, bad_envelopes, bad_key_publish_frame,
                           dummy_rollouts, make_batch, stop_answering_pings)

SWARM = "t"
LOOP = "/ip4/127.0.0.1/tcp/0"


async def start(nursery: trio.Nursery, *bootstrap: Mesh, **kw) -> Mesh:
    cfg = MeshConfig(swarm=kw.pop("swarm", SWARM), listen=LOOP,
                     bootstrap=tuple(m.listen_addrs()[0] for m in bootstrap),
                     heartbeat_s=0.5, hello_interval_s=1.0, bootstrap_backoff_max_s=2.0, **kw)
    mesh = Mesh(Identity.generate(), cfg)
    await nursery.start(mesh.run)
    return mesh


async def wait_until(pred: Callable[[], bool], timeout: float = 15.0, what: str = "") -> float:
    t0 = trio.current_time()
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)
    return trio.current_time() - t0


async def collect(mesh: Mesh, n: int, timeout: float = 10.0) -> list[Received]:
    out: list[Received] = []
    with trio.move_on_after(timeout):
        while len(out) < n:
            out.append(await mesh.incoming.receive())
    return out


def drain(mesh: Mesh) -> list[Received]:
    out = []
    while True:
        try:
            out.append(mesh.incoming.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_three_nodes_then_a_fourth_via_peer_exchange() -> None:
    async with trio.open_nursery() as n:
        a = await start(n)
        b = await start(n, a)
        c = await start(n, a)
        meshes = [a, b, c]
        # B and C only know A; signed Hellos make them find each other
        t_mesh = await wait_until(lambda: all(len(m.peers()) == 2 for m in meshes))
        for m in meshes:
            assert sorted(m.peers()) == sorted(x.peer_id for x in meshes if x is not m)
        await trio.sleep(1.0)  # one or two heartbeats: GRAFTs settle
        for i, m in enumerate(meshes):
            assert await m.publish_rollouts(i, "m", dummy_rollouts(2)) == 1
        for m in meshes:
            got = await collect(m, 2)
            assert sorted(r.from_peer for r in got) == sorted(x.peer_id for x in meshes if x is not m)
            assert all(len(r.batch.rollouts) == 2 and r.batch.swarm == SWARM for r in got)
        assert all(m.stats()["accepted"] == 2 for m in meshes)

        # D bootstraps to C only: it still gets A's rollouts (relayed), then connects to A and B itself
        t_d = trio.current_time()
        d = await start(n, c)
        await wait_until(lambda: c.peer_id in d.peers())
        await trio.sleep(1.0)
        t0 = time.time()
        await a.publish_rollouts(7, "m", dummy_rollouts(1))
        # (D may first get the round-0..2 batches: pubsub replays its recent-message cache to a new subscriber)
        got = [r for r in await collect(d, 4, timeout=5) if r.batch.round == 7]
        assert len(got) == 1 and got[0].from_peer == a.peer_id
        relay_ms = (got[0].received_at - t0) * 1000
        await wait_until(lambda: len(d.peers()) == 3 and all(d.peer_id in m.peers() for m in meshes))
        t_px = trio.current_time() - t_d
        s = await trio.to_thread.run_sync(d.stats)  # stats() is safe from another thread, and JSON-able
        json.dumps(s)
        assert sorted(s["peers"]) == sorted(m.peer_id for m in meshes)
        assert set(s["known_peers"]) >= {a.peer_id, b.peer_id, c.peer_id}
        assert all(sum(m.stats()["rejections_by_reason"].values()) == 0 for m in meshes + [d])
        print(f"\nmesh formed in {t_mesh:.2f}s; relay A->C->D {relay_ms:.1f} ms; D fully connected after {t_px:.2f}s")
        n.cancel_scope.cancel()


async def test_bad_messages_rejected_counted_and_not_forwarded() -> None:
    async with trio.open_nursery() as n:
        b = await start(n)
        c = await start(n, b)
        await wait_until(lambda: b.peers() and c.peers())
        evil = RawPublisher(Identity.generate(), topic_for(SWARM))
        async with evil.running():
            bpid = await evil.connect(b.listen_addrs()[0])
            await evil.wait_subscribed(bpid)
            await wait_until(lambda: evil.identity.peer_id in b.peers())
            await trio.sleep(1.0)

            good = seal(make_batch(evil.identity, SWARM, round=1), evil.identity)
            await evil.publish(good)
            first = await collect(c, 1)
            assert [r.batch.round for r in first] == [1] and first[0].from_peer == evil.identity.peer_id

            await evil.publish(good)  # same envelope, new libp2p message: a replay
            bad = bad_envelopes(evil.identity, SWARM)
            for data in bad.values():
                await evil.publish(data)
            await evil.publish(seal(make_batch(evil.identity, SWARM, round=2), evil.identity))
            second = await collect(c, 1)
            assert [r.batch.round for r in second] == [2]
            await trio.sleep(1.0)
            assert drain(c) == []  # nothing else reached C: nothing bad was forwarded
            assert drain(b) and True  # B itself got round 1 and 2

            sb = b.stats()
            assert sb["rejections_by_reason"] == {"size": 1, "decode": 1, "signature": 2, "sender": 1, "swarm": 1,
                                                  "version": 1, "topic": 0, "stale": 1, "replay": 1, "rate": 0, "newcomer": 0,
                                                  "load": 0}
            assert sb["accepted"] == 2
            assert sum(c.stats()["rejections_by_reason"].values()) == 0
            assert sb["strikes"][evil.identity.peer_id] == 9 and not sb["banned"]

            # two more bad ones: 11 strikes > 10 -> banned and disconnected; its later messages go nowhere
            await evil.publish(bad["signature"])
            await evil.publish(bad["decode"])
            await wait_until(lambda: evil.identity.peer_id in b.stats()["banned"])
            await wait_until(lambda: evil.identity.peer_id not in b.connected())
            assert b.stats()["bans"] == 1
        n.cancel_scope.cancel()


async def test_garbage_frame_costs_the_peer_not_the_host() -> None:
    async with trio.open_nursery() as n:
        b = await start(n)
        c = await start(n, b)
        await wait_until(lambda: b.peers() and c.peers())
        junk_ids = []
        for frame in GarbageStreamPeer.FRAMES:  # a fresh peer per frame: the first one is banned after one frame
            junk = GarbageStreamPeer()
            junk_ids.append(junk.identity.peer_id)
            async with junk.running():
                await junk.send_garbage(b.listen_addrs()[0], frame)
                await wait_until(lambda: junk.identity.peer_id not in b.connected())
        # a well-formed frame with a malformed signing key made py-libp2p's own signature check raise
        junk = GarbageStreamPeer()
        junk_ids.append(junk.identity.peer_id)
        async with junk.running():
            await junk.send_garbage(b.listen_addrs()[0], bad_key_publish_frame(topic_for(SWARM)))
            await wait_until(lambda: junk.identity.peer_id not in b.connected())
        s = b.stats()
        assert s["bad_frames"] == 4 and set(junk_ids) <= set(s["banned"])
        # B is alive and still exchanging in both directions
        await trio.sleep(0.5)
        await c.publish_rollouts(3, "m", dummy_rollouts(1))
        assert [r.batch.round for r in await collect(b, 1)] == [3]
        await b.publish_rollouts(4, "m", dummy_rollouts(1))
        assert [r.batch.round for r in await collect(c, 1)] == [4]
        n.cancel_scope.cancel()


async def test_plaintext_dialer_is_refused() -> None:
    async with trio.open_nursery() as n:
        b = await start(n)
        async with PlaintextDialer().running() as p:
            assert not await p.try_connect(b.listen_addrs()[0], timeout=10)
        assert b.connected() == []
        n.cancel_scope.cancel()


async def test_large_publish_is_split_and_arrives_whole() -> None:
    async with trio.open_nursery() as n:
        a = await start(n)
        b = await start(n, a)
        await wait_until(lambda: a.peers() and b.peers())
        await trio.sleep(1.0)
        # 48 groups x 2 completions x 16,000 chars = ~1.5 MB of text (a completion is at most 16,384 chars)
        rollouts = tuple(Rollout(TaskRef.make("arith", {"digits": 2}, 7, i), (f"{i:02d}" + "y" * 16_000,) * 2, (0.5, 1.0))
                         for i in range(48))
        t0 = time.time()
        nb = await a.publish_rollouts(5, "m", rollouts)
        assert nb >= 2
        got = await collect(b, nb)
        dt = time.time() - t0
        assert len(got) == nb and all(r.size <= 1_000_000 for r in got)
        assert len({r.batch.seq for r in got}) == nb
        received = sorted((r for g in got for r in g.batch.rollouts), key=lambda r: r.task.index)
        assert tuple(received) == rollouts
        total = sum(r.size for r in got)
        assert total > 1_500_000
        print(f"\n{total / 1e6:.2f} MB in {nb} batches delivered in {dt * 1000:.0f} ms")
        n.cancel_scope.cancel()


async def test_bootstrap_retries_until_the_peer_appears(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import socket

    caplog.set_level(logging.WARNING, logger="swarm.discovery")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a_id = Identity.generate()
    a_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{a_id.peer_id}"
    async with trio.open_nursery() as n:
        b = Mesh(Identity.generate(), MeshConfig(swarm=SWARM, listen=LOOP, bootstrap=(a_addr,), heartbeat_s=0.5,
                                                 hello_interval_s=1.0, bootstrap_backoff_max_s=1.0))
        await n.start(b.run)  # starts although its only bootstrap peer is not there
        await wait_until(lambda: any("no bootstrap peer answered" in r.message for r in caplog.records), 10)
        await trio.sleep(1.0)
        a = Mesh(a_id, MeshConfig(swarm=SWARM, listen=f"/ip4/127.0.0.1/tcp/{port}", heartbeat_s=0.5))
        await n.start(a.run)
        dt = await wait_until(lambda: a.peer_id in b.peers(), 10)
        await trio.sleep(1.0)
        await b.publish_rollouts(1, "m", dummy_rollouts(1))
        assert [r.from_peer for r in await collect(a, 1)] == [b.peer_id]
        print(f"\nbootstrap peer came up; connected {dt:.2f}s later")
        n.cancel_scope.cancel()


async def test_wildcard_listen_and_incoming_overflow() -> None:
    async with trio.open_nursery() as n:
        a = Mesh(Identity.generate(), MeshConfig(swarm=SWARM, heartbeat_s=0.5))  # default: /ip4/0.0.0.0/tcp/0
        await n.start(a.run)
        addrs = a.listen_addrs()
        assert any(x.startswith("/ip4/127.0.0.1/tcp/") for x in addrs)
        assert all(x.endswith(f"/p2p/{a.peer_id}") and "/0.0.0.0/" not in x for x in addrs)
        b = await start(n, a, incoming_capacity=2)
        await wait_until(lambda: a.peers() and b.peers())
        await trio.sleep(1.0)
        for r in range(5):
            await a.publish_rollouts(r, "m", dummy_rollouts(1))
        # a node that does not drain `incoming` sheds rollouts at validation ("load", charged to nobody) once it is
        # 3/4 full, instead of validating and forwarding them only to drop them at the full channel
        await wait_until(lambda: b.stats()["accepted"] + b.stats()["rejections_by_reason"]["load"] == 5)
        st = b.stats()
        assert len(drain(b)) == 2 and st["rejections_by_reason"]["load"] + st["incoming_dropped"] == 3
        assert st["rejections_by_reason"]["load"] >= 1 and not st["strikes"]
        n.cancel_scope.cancel()


async def test_a_stopped_mesh_stops_listening() -> None:
    """Cancelling Mesh.run closes its listener and connections (py-libp2p's own teardown runs inside the cancelled
    scope and left the listener open, so peers kept dialing a dead service)."""
    async with trio.open_nursery() as n:
        a = await start(n)
        with trio.CancelScope() as scope:
            inner_started = trio.Event()

            async def run_b() -> None:
                nonlocal b
                b = await start(inner)
                inner_started.set()

            b: Mesh | None = None
            async with trio.open_nursery() as inner:
                inner.start_soon(run_b)
                await inner_started.wait()
                assert b is not None
                port = int(b.listen_addrs()[0].split("/tcp/")[1].split("/")[0])
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()  # listening
                scope.cancel()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
        assert a.listen_addrs()
        n.cancel_scope.cancel()


async def test_liveness_drops_a_peer_that_stops_answering_pings() -> None:
    async with trio.open_nursery() as n:
        a = await start(n, ping_interval_s=0.3, ping_timeout_s=0.3, ping_max_misses=2)
        b = await start(n, a, ping_interval_s=0)
        await wait_until(lambda: a.peers() and b.peers())
        await trio.sleep(1.0)
        assert a._liveness is not None and a._liveness.dropped == 0  # answers (or pinged us, or sent Hellos): kept
        assert b.peer_id in a._liveness.rtt_ms or a._liveness.pings_skipped > 0

        async def silent() -> None:  # a hung peer: nothing is sent, no Hellos (which would show it alive) ...
            pass

        b._publish_hello = silent
        stop_answering_pings(b._host)  # ... and nothing answers, though the connection is up
        await wait_until(lambda: a._liveness.dropped >= 1, timeout=10)
        n.cancel_scope.cancel()


async def test_liveness_does_not_ping_a_peer_that_keeps_talking() -> None:
    """A peer that sent us something during a ping cycle is alive and is not pinged (each ping costs a stream and a
    protocol negotiation); it is pinged, and dropped, only once it falls silent too."""
    async with trio.open_nursery() as n:
        a = await start(n, ping_interval_s=2.5, ping_timeout_s=0.5, ping_max_misses=2)
        b = await start(n, a, ping_interval_s=0)
        await wait_until(lambda: a.peers() and b.peers())
        stop_answering_pings(b._host)  # pings would now fail; b's Hellos (every 1 s) still arrive
        hellos = a.stats()["accepted_hellos"]
        await wait_until(lambda: a._liveness.pings_skipped >= 3, timeout=30)
        assert a.stats()["accepted_hellos"] >= hellos + 3
        assert a._liveness.dropped == 0 and b.peer_id in a.peers()
        assert a.stats()["pings"]["skipped_heard"] >= 3

        async def silent() -> None:
            pass

        b._publish_hello = silent
        await wait_until(lambda: a._liveness.dropped >= 1, timeout=30)
        n.cancel_scope.cancel()


async def test_liveness_pings_are_yamux_frames_not_streams() -> None:
    """A liveness ping is a yamux ping frame each way: the far end opens no ping stream (a stream and two protocol
    negotiations per ping were a third of an idle relay's CPU), and the connection's RTT estimate, which yamux's
    window auto-tuning reads, stays the link's round trip."""
    from libp2p.host.ping import ID as PING_ID

    async with trio.open_nursery() as n:
        a = await start(n, ping_interval_s=0.3, ping_timeout_s=1.0)
        b = await start(n, a, ping_interval_s=0)
        streams = []
        answer = b._host.get_mux().handlers[PING_ID]

        async def counting(stream) -> None:
            streams.append(stream)
            await answer(stream)

        b._host.set_stream_handler(PING_ID, counting)
        await wait_until(lambda: a.peers() and b.peers())

        async def silent() -> None:  # no Hellos: a pings b every cycle
            pass

        b._publish_hello = silent
        sent = a._liveness.pings_sent
        await trio.sleep(3.0)
        assert a._liveness.pings_sent >= sent + 5 and b.peer_id in a._liveness.rtt_ms
        assert streams == []
        (conn,) = a._host.get_network().get_connections(ID.from_base58(b.peer_id))
        assert 0 < conn.muxed_conn.rtt() < 0.5  # without the send time set, the time since yamux's own last ping
        n.cancel_scope.cancel()


async def test_on_a_quiet_link_only_one_side_pings() -> None:
    """A peer that pings us is alive: we do not ping it back in that cycle. Without that, both ends of a quiet link
    (no messages, no gossip) pinged each other every cycle, each ping a stream and a protocol negotiation on both
    ends; now one side pings and the other answers."""
    async with trio.open_nursery() as n:
        a = await start(n, ping_interval_s=0.5, ping_timeout_s=2.0)
        b = await start(n, a, ping_interval_s=0.5, ping_timeout_s=2.0)
        await wait_until(lambda: a.peers() and b.peers())

        async def silent() -> None:  # no Hellos (which would show each side alive to the other)
            pass

        a._publish_hello = b._publish_hello = silent
        await trio.sleep(2.0)  # past the last Hellos and subscription RPCs: the link is quiet from here
        sent = (a._liveness.pings_sent, b._liveness.pings_sent)
        t0 = trio.current_time()
        await trio.sleep(5.0)
        cycles = (trio.current_time() - t0) / 0.5
        pings = a._liveness.pings_sent - sent[0] + b._liveness.pings_sent - sent[1]
        assert 0.7 * cycles <= pings <= 1.2 * cycles, (pings, cycles)  # both sides every cycle would be ~2 x cycles
        assert a._liveness.dropped == 0 and b._liveness.dropped == 0 and b.peer_id in a.peers()
        n.cancel_scope.cancel()


async def test_lost_peers_are_redialed_without_hellos_or_bootstrap() -> None:
    """B and C met through A (peer exchange). A dies and the B-C link is cut: no Hello can reach either side and
    their only bootstrap is dead, so only discovery's redial of known peers can bring them back together."""
    async with trio.open_nursery() as n:
        a_scope = trio.CancelScope()
        a_box: list[Mesh] = []

        async def run_a(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with a_scope:
                async with trio.open_nursery() as inner:
                    a_box.append(await start(inner))
                    task_status.started()

        await n.start(run_a)
        a = a_box[0]
        b = await start(n, a, redial_after_s=1.0)
        c = await start(n, a, redial_after_s=1.0)
        await wait_until(lambda: c.peer_id in b.connected() and b.peer_id in c.connected(), timeout=20)
        a_scope.cancel()
        await wait_until(lambda: a.peer_id not in b.connected() and a.peer_id not in c.connected())
        await b._host.disconnect(ID.from_base58(c.peer_id))
        await wait_until(lambda: c.peer_id in b.connected() and b.peer_id in c.connected(), timeout=15)
        n.cancel_scope.cancel()


async def test_sybil_identities_are_admitted_at_a_bounded_rate() -> None:
    """A peer publishing every batch from a fresh identity (nothing invalid, so no per-sender limit or strike ever
    applied before): the victim now admits new identities at new_senders_per_s after a burst."""
    from tests.byzantine import ByzantinePeer

    async with trio.open_nursery() as n:
        b = await start(n)
        evil = ByzantinePeer("sybil", SWARM, [b.listen_addrs()[0]], rate=10.0)
        t0 = trio.current_time()
        await evil.run(duration=6.0)
        elapsed = trio.current_time() - t0
        st = b.stats()
        tried = evil.sent["sybil"]
        assert tried >= 300, evil.report()
        # burst (64) + 0.5/s, plus the attacker's own Hello identity
        assert st["accepted"] <= 64 + 0.5 * elapsed + 1, (st["accepted"], tried)
        assert st["rejections_by_reason"]["newcomer"] > 0, st["rejections_by_reason"]
        n.cancel_scope.cancel()


async def test_pubsub_writes_one_whole_rpc_at_a_time_per_stream() -> None:
    """yamux releases its write lock between window-sized chunks; py-libp2p writes to a peer's pubsub stream from two
    tasks (the send loop and gossipsub's direct flushes), so big RPCs could interleave and corrupt the frame."""
    from libp2p.pubsub.pb import rpc_pb2

    from swarm.host import build_host, build_pubsub, build_router

    host = build_host(Identity.generate(), [LOOP])
    pubsub = build_pubsub(host, build_router(), on_message=lambda m: None, on_bad_peer=lambda p, w: None)

    class ChunkedStream:  # writes in two halves with a wait in between, as yamux does when its window runs out
        def __init__(self) -> None:
            self.wire = bytearray()

        async def write(self, data: bytes) -> None:
            half = len(data) // 2
            self.wire += data[:half]
            await trio.sleep(0.01)
            self.wire += data[half:]

    stream = ChunkedStream()
    rpcs = [rpc_pb2.RPC(publish=[rpc_pb2.Message(data=bytes([i]) * 50_000)]) for i in range(4)]
    async with trio.open_nursery() as n:
        for r in rpcs:
            n.start_soon(pubsub.write_msg, stream, r)
    frames = [b"".join(p.data for p in rpc_pb2.RPC.FromString(f).publish) for f in _split_frames(bytes(stream.wire))]
    assert sorted(f[0] for f in frames) == [0, 1, 2, 3] and all(len(set(f)) == 1 for f in frames)


def _split_frames(wire: bytes) -> list[bytes]:
    from libp2p.utils.varint import decode_uvarint

    out, i = [], 0
    while i < len(wire):
        j = i
        while wire[j] & 0x80:
            j += 1
        n = decode_uvarint(wire[i:j + 1])
        out.append(wire[j + 1:j + 1 + n])
        i = j + 1 + n
    return out


async def test_aborting_a_connection_drops_the_peer() -> None:
    """What liveness does when a graceful close cannot complete (a dead link with a full send buffer): closing the TCP
    socket under the muxer makes py-libp2p drop the connection and the pubsub peer by its own error paths."""
    from swarm.host import abort_connection

    async with trio.open_nursery() as n:
        a = await start(n, ping_interval_s=0)
        b = await start(n, a, ping_interval_s=0)
        await wait_until(lambda: b.peer_id in a.peers() and a.peer_id in b.peers())
        conns = list(a._host.get_network().get_connections(ID.from_base58(b.peer_id)))
        assert conns and all(abort_connection(c) for c in conns)
        # b may redial a at once (a is its bootstrap), so check that the aborted connections are gone, not the peer
        await wait_until(lambda: not any(c in conns for c in a._host.get_network().get_connections(
            ID.from_base58(b.peer_id))), timeout=10)
        n.cancel_scope.cancel()


async def test_a_delayed_honest_batch_gets_through_and_every_replay_does_not() -> None:
    """A publisher's batch delayed behind 100 newer ones (a slow relay, a late IWANT) is delivered; each exact copy
    is refused. The old replay window (the 64 newest seqs per sender) refused the delayed batch."""
    async with trio.open_nursery() as n:
        fast = dict(rate_msgs_per_s=1000.0, rate_msgs_burst=1000.0, rate_bytes_per_s=1e9, rate_bytes_burst=1e9,
                    total_msgs_per_s=1000.0, total_msgs_burst=1000.0)
        b = await start(n, **fast)
        c = await start(n, b, **fast)
        await wait_until(lambda: b.peers() and c.peers())
        pub = RawPublisher(Identity.generate(), topic_for(SWARM))
        async with pub.running():
            bpid = await pub.connect(b.listen_addrs()[0])
            await pub.wait_subscribed(bpid)
            await wait_until(lambda: pub.identity.peer_id in b.peers())
            await trio.sleep(1.0)
            t0 = time.time()
            delayed = seal(make_batch(pub.identity, SWARM, round=0, seq=1_000, created_at=t0 - 30), pub.identity)
            newer = [seal(make_batch(pub.identity, SWARM, round=r, seq=1_000 + r, created_at=t0 - 30 + r / 10),
                          pub.identity) for r in range(1, 101)]
            for i in range(0, 100, 10):  # in steps: a stock publisher's per-peer queue holds 32 RPCs
                for data in newer[i:i + 10]:
                    await pub.publish(data)
                await wait_until(lambda: b.stats()["accepted"] >= i + 10)
            got = await collect(c, 100, timeout=30)
            assert len(got) == 100, (b.stats()["rejections_by_reason"], b.stats()["accepted"], c.stats()["accepted"])
            await pub.publish(delayed)
            late = await collect(c, 1)
            assert [r.batch.round for r in late] == [0]  # through B (validated, forwarded) to C
            for data in (delayed, newer[0], newer[50], newer[-1]):  # same envelopes, new libp2p messages
                await pub.publish(data)
            await pub.publish(seal(make_batch(pub.identity, SWARM, round=101), pub.identity))
            assert [r.batch.round for r in await collect(c, 1)] == [101]
            await trio.sleep(0.5)
            assert drain(c) == []
            assert b.stats()["rejections_by_reason"]["replay"] == 4
            assert sum(c.stats()["rejections_by_reason"].values()) == 0  # B forwarded none of them
            assert b.stats()["accepted"] == 102
        n.cancel_scope.cancel()


async def test_a_batch_off_its_senders_home_shard_or_on_the_lobby_is_rejected_and_struck() -> None:
    """A peer publishes valid, signed batches to a shard that is not its home and to the lobby (so every node in the
    swarm would take them in): rejected as "topic" (hard: publisher and relay are struck), never delivered nor
    forwarded; its batches on its home shard still arrive."""
    from swarm.shards import home_shard, lobby_topic, shard_topic

    def on_shard(shard: int) -> Identity:
        while True:
            ident = Identity.generate()
            if home_shard(ident.peer_id, 2) == shard:
                return ident

    async with trio.open_nursery() as n:
        sharded = dict(shards=2, shard_fanin=2)  # B and C listen to both shards and the lobby
        b = await start(n, **sharded)
        c = await start(n, b, **sharded)
        await wait_until(lambda: b.peers() and c.peers())
        topics = [shard_topic(SWARM, 1, 2, i) for i in range(2)]
        lobby = lobby_topic(SWARM, 1, 2)
        pub = RawPublisher(on_shard(0), topics[0])
        async with pub.running():
            bpid = await pub.connect(b.listen_addrs()[0])
            await pub.wait_subscribed(bpid)
            await wait_until(lambda: pub.identity.peer_id in b.peers())
            await trio.sleep(1.0)
            ident = pub.identity
            await pub.pubsub.publish(topics[1], seal(make_batch(ident, SWARM, round=1), ident))  # not its home
            await pub.pubsub.publish(lobby, seal(make_batch(ident, SWARM, round=2), ident))  # lobby: Hellos only
            await pub.pubsub.publish(topics[0], seal(make_batch(ident, SWARM, round=3), ident))  # its home: fine
            got = await collect(c, 1)
            assert [r.batch.round for r in got] == [3]
            await trio.sleep(1.0)
            assert drain(c) == [] and [r.batch.round for r in drain(b)] == [3]
            sb = b.stats()
            assert sb["rejections_by_reason"]["topic"] == 2 and sb["strikes"][ident.peer_id] == 2
            assert sum(c.stats()["rejections_by_reason"].values()) == 0
            for r in range(10):  # more of the same: banned like any peer sending what no honest node sends
                await pub.pubsub.publish(topics[1], seal(make_batch(ident, SWARM, round=10 + r), ident))
            await wait_until(lambda: ident.peer_id in b.stats()["banned"])
        n.cancel_scope.cancel()


async def test_a_first_batch_waits_for_a_peer_on_its_home_shard() -> None:
    """A node connected to the swarm but to nobody on its home shard (it just joined: discovery is still dialing the
    shard's members) published its batch into nothing: in the 32-process bench every lost batch was such a first
    batch, reaching no trainer and no relay (docs/scale.md). Now the batch waits (MeshConfig.publish_wait_s) until a
    peer on its home shard is connected, which then gets it; a node with no connection at all does not wait."""
    from swarm.shards import home_shard

    def on_shard(shard: int) -> Identity:
        while True:
            ident = Identity.generate()
            if home_shard(ident.peer_id, 2) == shard:
                return ident

    async def start_as(nursery: trio.Nursery, ident: Identity, *bootstrap: Mesh) -> Mesh:
        cfg = MeshConfig(swarm=SWARM, listen=LOOP, bootstrap=tuple(m.listen_addrs()[0] for m in bootstrap),
                         heartbeat_s=0.5, hello_interval_s=1.0, bootstrap_backoff_max_s=2.0,
                         shards=2, shard_fanin=1)  # each listens to its home shard and the lobby only
        mesh = Mesh(ident, cfg)
        await nursery.start(mesh.run)
        return mesh

    async with trio.open_nursery() as n:
        a = await start_as(n, on_shard(0))
        with trio.fail_after(2):  # alone: nobody to wait for
            assert await a.publish_rollouts(1, "m", dummy_rollouts(1)) == 1
        b = await start_as(n, on_shard(1), a)
        await wait_until(lambda: b.peer_id in a.peers())  # a lobby peer; nobody on shard 0
        done: list[int] = []

        async def publish() -> None:
            done.append(await a.publish_rollouts(2, "m", dummy_rollouts(1)))
        n.start_soon(publish)
        await trio.sleep(4.0)  # past the gossip window (3 heartbeats): published now, the batch would be gone
        assert done == []
        c = await start_as(n, on_shard(0), b)  # through b; finds a by a's lobby Hellos and dials it
        got = await collect(c, 1, timeout=20)
        assert [(r.from_peer, r.batch.round) for r in got] == [(a.peer_id, 2)]
        assert done == [1]
        n.cancel_scope.cancel()
