"""Signed envelopes: body bytes + the signer's raw Ed25519 public key + a signature.

The signature covers signing_bytes(swarm, version, body): a domain tag keeps it from being valid for any other use of
the key (libp2p also signs with it), and binding swarm name and protocol version stops cross-swarm/-version replay.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from .codec import decode, encode
from .errors import ProtocolError
from .identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, peer_id_from_public_key, verify_signature
from .messages import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Message

SIGNATURE_DOMAIN = b"swarm-node/v1/sig\x00"
_KEYS = frozenset({"body", "public_key", "signature"})


@dataclass(frozen=True)
class Envelope:
    body: bytes
    public_key: bytes
    signature: bytes


def signing_bytes(swarm: str, version: int, body: bytes) -> bytes:
    """The exact bytes that are signed: domain tag, u32 length + UTF-8 swarm name, u64 version, u32 length + body."""
    name = swarm.encode("utf-8")
    return b"".join((SIGNATURE_DOMAIN, struct.pack(">I", len(name)), name, struct.pack(">Q", version),
                     struct.pack(">I", len(body)), body))


def _pack_envelope(body: bytes, public_key: bytes, signature: bytes) -> bytes:
    return msgpack.packb({"body": body, "public_key": public_key, "signature": signature}, use_bin_type=True)


def encode_envelope(env: Envelope) -> bytes:
    """Canonical bytes of an envelope as is (no checks of the body or signature: for tools and tests)."""
    return _pack_envelope(bytes(env.body), bytes(env.public_key), bytes(env.signature))


def seal(msg: Message, identity: Identity) -> bytes:
    """Encode, sign and wrap a message; the bytes to publish. msg.sender must be identity.peer_id."""
    if msg.sender != identity.peer_id:
        raise ProtocolError("sender", "msg.sender is not the peer ID of the signing identity")
    body = encode(msg)
    sig = identity.sign(signing_bytes(msg.swarm, msg.version, body))
    data = _pack_envelope(body, identity.public_key, sig)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("size", f"sealed message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    return data


def read_envelope(data: bytes) -> Envelope:
    """Size check, then strict canonical decode of the envelope (the body is not looked at here)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("decode", "envelope must be bytes")
    data = bytes(data)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("size", f"envelope is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    try:
        obj: Any = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=16,
                                   max_bin_len=MAX_MESSAGE_BYTES, max_array_len=0, max_map_len=len(_KEYS),
                                   max_ext_len=0)
    except Exception as e:  # any msgpack failure (ExtraData, StackError, ValueError...) is a decode rejection
        raise ProtocolError("decode", f"envelope is not valid msgpack: {type(e).__name__}") from None
    if type(obj) is not dict or obj.keys() != _KEYS:
        raise ProtocolError("decode", "envelope must be a map with exactly body, public_key, signature")
    body, pub, sig = obj["body"], obj["public_key"], obj["signature"]
    if type(body) is not bytes or type(pub) is not bytes or type(sig) is not bytes:
        raise ProtocolError("decode", "envelope fields must be binary")
    if len(pub) != PUBLIC_KEY_BYTES or len(sig) != SIGNATURE_BYTES:
        raise ProtocolError("decode", "envelope public key must be 32 bytes and signature 64 bytes")
    if _pack_envelope(body, pub, sig) != data:  # duplicate keys, key order, wide length headers...
        raise ProtocolError("decode", "envelope is not canonically encoded")
    return Envelope(body, pub, sig)


def verify_envelope(env: Envelope, *, swarm: str, version: int = PROTOCOL_VERSION) -> Message:
    """Decode the body and check, in this order: body ("decode"), signature, sender, swarm, version."""
    if not all(isinstance(x, bytes) for x in (env.body, env.public_key, env.signature)):
        raise ProtocolError("decode", "envelope fields must be bytes")
    msg = decode(env.body)
    if not verify_signature(env.public_key, signing_bytes(msg.swarm, msg.version, env.body), env.signature):
        raise ProtocolError("signature", "bad signature")
    if peer_id_from_public_key(env.public_key) != msg.sender:
        raise ProtocolError("sender", "signing key does not belong to the claimed sender")
    if msg.swarm != swarm:
        raise ProtocolError("swarm", f"message is for swarm {msg.swarm!r}, not {swarm!r}")
    if msg.version != version:
        raise ProtocolError("version", f"message is protocol version {msg.version}, not {version}")
    return msg


def open_envelope(data: bytes, *, swarm: str, version: int = PROTOCOL_VERSION) -> Message:
    """read_envelope + verify_envelope: bytes from the wire to a verified message, or ProtocolError."""
    return verify_envelope(read_envelope(data), swarm=swarm, version=version)
