"""Test doubles (test tools, not product code): hand-built messages (dummy rollouts, forged or malformed envelopes)
and adversarial test peers that speak real libp2p but skip our validation.

- `RawPublisher`: a stock py-libp2p gossipsub peer (Noise, proper libp2p signing) that publishes arbitrary bytes on a
  topic: forged envelopes, replays, oversized or cross-swarm messages reach the victim's validator.
- `GarbageStreamPeer`: opens a raw /meshsub stream and writes malformed protobuf frames (notes item 6), or any
  frame, e.g. `bad_key_publish_frame` (a message with a malformed signing key).
- `PlaintextDialer`: a host that offers only /plaintext/2.0.0, to prove our hosts refuse it.
- `GossipProbe`: a RawPublisher that counts every copy of every message it is sent (before its own dedupe) and
  writes any RPC on its pubsub stream: IWANT floods, subscribe/unsubscribe cycles, raw re-sends.
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils import encode_varint_prefixed

from protocol.envelope import Envelope, encode_envelope, read_envelope, seal
from protocol.identity import Identity
from protocol.messages import PROTOCOL_VERSION, Rollout, RolloutBatch, TaskRef

from swarm.host import build_host, build_router, key_pair_for

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
TAMPER_ME = "tamper-me"


def dummy_rollouts(n: int = 1, text: str = "42", completions: int = 2) -> tuple[Rollout, ...]:
    return tuple(Rollout(TaskRef.make("arith", {"digits": 2}, 7, i), (text,) * completions, (1.0,) * completions)
                 for i in range(n))


def make_batch(identity: Identity, swarm: str, *, seq: int | None = None, created_at: float | None = None,
               version: int = PROTOCOL_VERSION, round: int = 1, model: str = "m",
               rollouts: Sequence[Rollout] | None = None) -> RolloutBatch:
    return RolloutBatch(sender=identity.peer_id, swarm=swarm, version=version, round=round,
                        created_at=time.time() if created_at is None else created_at,
                        seq=time.time_ns() // 1000 if seq is None else seq, model=model,
                        rollouts=tuple(rollouts) if rollouts is not None else dummy_rollouts())


def forge_signature(data: bytes) -> bytes:
    env = read_envelope(data)
    sig = bytes([env.signature[0] ^ 0xFF]) + env.signature[1:]
    return encode_envelope(Envelope(env.body, env.public_key, sig))


def tamper_body(data: bytes) -> bytes:
    """Change a completion string (made with text=TAMPER_ME): still decodes, no longer matches the signature."""
    env = read_envelope(data)
    assert TAMPER_ME.encode() in env.body
    body = env.body.replace(TAMPER_ME.encode(), TAMPER_ME.upper().encode())
    return encode_envelope(Envelope(body, env.public_key, env.signature))


def bad_envelopes(identity: Identity, swarm: str) -> dict[str, bytes]:
    """One message per rejection reason that a single malicious publisher can produce (replay: see tests)."""
    good = seal(make_batch(identity, swarm), identity)
    other = Identity.generate()
    return {
        "signature": forge_signature(good),
        "tampered": tamper_body(seal(make_batch(identity, swarm, rollouts=dummy_rollouts(text=TAMPER_ME)), identity)),  # rejected as "signature"
        "sender": seal(make_batch(other, swarm), other),  # validly signed by someone else, published by us
        "size": b"\x00" * 1_000_500,
        "decode": b"\xc1not msgpack",
        "swarm": seal(make_batch(identity, swarm + "-other"), identity),
        "version": seal(make_batch(identity, swarm, version=PROTOCOL_VERSION + 1), identity),
        "stale": seal(make_batch(identity, swarm, created_at=time.time() - 3600), identity),
    }


class RawPublisher:
    """A stock gossipsub peer, subscribed to `topic`, publishing whatever bytes it is given."""

    pubsub_cls: type[Pubsub] = Pubsub

    def __init__(self, identity: Identity, topic: str) -> None:
        self.identity = identity
        self.topic = topic
        self.host: IHost | None = None
        self.pubsub: Pubsub | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator["RawPublisher"]:
        host = build_host(self.identity, [LOOPBACK])
        router = build_router(0.5)
        pubsub = self.pubsub_cls(host, router)  # no topic validator: nothing we publish is checked locally
        self.host, self.pubsub = host, pubsub
        async with host.run(listen_addrs=[multiaddr.Multiaddr(LOOPBACK)]):
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                await pubsub.subscribe(self.topic)
                yield self

    async def connect(self, addr: str) -> ID:
        assert self.host is not None
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await self.host.connect(info)
        return info.peer_id

    async def wait_subscribed(self, peer: ID, timeout: float = 10.0) -> None:
        assert self.pubsub is not None
        await self.pubsub.wait_for_subscription(peer, self.topic, timeout=timeout)

    async def publish(self, data: bytes) -> None:
        assert self.pubsub is not None
        await self.pubsub.publish(self.topic, data)


class GarbageStreamPeer:
    """Opens /meshsub/1.2.0 streams to a victim and writes frames that are not protobuf."""

    FRAMES = (
        b"\xff\xff\xff\xff",  # invalid wire type
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # length-delimited field with an absurd length
        b"\x0a\x05ab",  # truncated field
    )

    def __init__(self, identity: Identity | None = None) -> None:
        self.identity = identity or Identity.generate()
        self.host: IHost | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator["GarbageStreamPeer"]:
        self.host = build_host(self.identity, [LOOPBACK])
        async with self.host.run(listen_addrs=[multiaddr.Multiaddr(LOOPBACK)]):
            yield self

    async def send_garbage(self, addr: str, frame: bytes = FRAMES[0]) -> None:
        assert self.host is not None
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await self.host.connect(info)
        stream = await self.host.new_stream(info.peer_id, [PROTOCOL_ID_V12])
        await stream.write(encode_varint_prefixed(frame))
        with trio.move_on_after(2):
            try:
                await stream.read(1)  # wait for the victim to react (reset/EOF)
            except Exception:
                pass


def bad_key_publish_frame(topic: str) -> bytes:
    """A well-formed RPC whose message claims a non-inline-key peer ID and carries a malformed `key`: py-libp2p's
    signature_validator raises on it (ValueError from nacl) inside Pubsub.push_msg, which took the host down."""
    fake_from = b"\x12\x20" + hashlib.sha256(b"no inline key").digest()  # sha2-256 multihash peer ID
    msg = rpc_pb2.Message(from_id=fake_from, seqno=b"\x00" * 8, topicIDs=[topic], data=b"x", signature=b"s" * 64,
                          key=b"\x08\x01\x12\x03abc")  # "Ed25519" public key of 3 bytes
    return rpc_pb2.RPC(publish=[msg]).SerializeToString()


class PlaintextDialer:
    """A host that only offers /plaintext/2.0.0 (what the stock default host would accept)."""

    def __init__(self, identity: Identity | None = None) -> None:
        self.identity = identity or Identity.generate()
        self.host: IHost | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator["PlaintextDialer"]:
        kp = key_pair_for(self.identity)
        self.host = new_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)},
                             listen_addrs=[multiaddr.Multiaddr(LOOPBACK)])
        async with self.host.run(listen_addrs=[multiaddr.Multiaddr(LOOPBACK)]):
            yield self

    async def try_connect(self, addr: str, timeout: float = 10.0) -> bool:
        assert self.host is not None
        try:
            with trio.fail_after(timeout):
                await self.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
            return True
        except Exception:
            return False


class CountingPubsub(Pubsub):
    """Stock Pubsub that counts each message copy a peer sends it, before the seen-cache drops repeats."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.copies: Counter[bytes] = Counter()  # libp2p msg id (from + seqno) -> copies received
        self.bytes_in = 0  # data bytes of all copies received

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        if msg_forwarder != self.my_id:
            self.copies[msg.from_id + msg.seqno] += 1
            self.bytes_in += len(msg.data)
        await super().push_msg(msg_forwarder, msg)


class GossipProbe(RawPublisher):
    """A hostile gossipsub peer that measures what a victim sends it (see the module docstring)."""

    pubsub_cls = CountingPubsub

    @property
    def counting(self) -> CountingPubsub:
        assert isinstance(self.pubsub, CountingPubsub)
        return self.pubsub

    async def wait_stream(self, peer: ID, timeout: float = 10.0) -> None:
        """Until our pubsub stream to `peer` is open and it knows we subscribe (its hello reached us)."""
        await self.counting.wait_for_peer(peer, timeout=timeout)
        await self.wait_subscribed(peer, timeout=timeout)

    async def send(self, peer: ID, rpc: rpc_pb2.RPC) -> None:
        """Write one RPC on our pubsub stream to `peer`, as is."""
        ok = await self.counting.write_msg(self.counting.peers[peer], rpc)
        assert ok, "pubsub stream closed"

    async def wait_copies(self, mid: bytes, n: int, timeout: float = 20.0) -> None:
        with trio.fail_after(timeout):
            while self.counting.copies[mid] < n:
                await trio.sleep(0.02)


def iwant_rpc(msg_ids: Sequence[bytes], entries: int = 1) -> rpc_pb2.RPC:
    """An RPC with `entries` IWANT entries, each listing msg_ids (repeats included, as a hostile peer may)."""
    iwants = [rpc_pb2.ControlIWant(messageIDs=list(msg_ids)) for _ in range(entries)]
    return rpc_pb2.RPC(control=rpc_pb2.ControlMessage(iwant=iwants))


def resubscribe_rpc(topic: str) -> rpc_pb2.RPC:
    """Unsubscribe then subscribe again, in one tiny RPC."""
    return rpc_pb2.RPC(subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=False, topicid=topic),
                                      rpc_pb2.RPC.SubOpts(subscribe=True, topicid=topic)])


def stop_answering_pings(host: IHost) -> None:
    """Make `host` a hung peer to the other end's liveness check: its connections stay up, but it answers no ping,
    neither a ping stream (the handler never replies) nor a yamux ping frame (no pong is written), and sends none
    (py-libp2p's RTT loop pings every 30 s, which would show it alive)."""
    from libp2p.host.ping import ID as PING_ID

    from swarm.yamux_ping import is_yamux, ping_flags

    async def hang(stream: Any) -> None:
        await trio.sleep_forever()

    host.set_stream_handler(PING_ID, hang)
    for conn in host.get_network().get_connections():
        muxed = conn.muxed_conn
        if not is_yamux(muxed):
            continue
        write = muxed._write_frame

        async def no_pings(data: bytes, write: Any = write) -> None:
            if ping_flags(data) is not None:
                return
            await write(data)

        muxed._write_frame = no_pings
