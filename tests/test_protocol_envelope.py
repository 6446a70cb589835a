"""Signed envelopes: sealing, the rejection reasons in order, and every single-byte mutation."""
from __future__ import annotations

import dataclasses

import msgpack
import pytest

from protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Envelope,
    Hello,
    Identity,
    ProtocolError,
    Rollout,
    RolloutBatch,
    TaskRef,
    encode,
    encode_envelope,
    open_envelope,
    read_envelope,
    seal,
    signing_bytes,
    verify_envelope,
)
from protocol import messages as M

ALICE = Identity(bytes(range(32)))
MALLORY = Identity(bytes(range(1, 33)))
SWARM = "test-swarm"


def batch(sender: str = ALICE.peer_id, **kw) -> RolloutBatch:
    base = dict(sender=sender, swarm=SWARM, version=PROTOCOL_VERSION, round=1, created_at=1.7e9, seq=9, model="m",
                rollouts=(Rollout(TaskRef.make("arith", {"d": 2}, 1, 0), ("4", "five"), (1.0, 0.0)),))
    base.update(kw)
    return RolloutBatch(**base)


def hello(**kw) -> Hello:
    base = dict(sender=ALICE.peer_id, swarm=SWARM, version=PROTOCOL_VERSION, round=0, created_at=1.7e9, seq=1,
                model="m", listen_addrs=("/ip4/127.0.0.1/tcp/4001",))
    base.update(kw)
    return Hello(**base)


def reason_of(data: bytes, swarm: str = SWARM, version: int = PROTOCOL_VERSION) -> str:
    with pytest.raises(ProtocolError) as ei:
        open_envelope(data, swarm=swarm, version=version)
    return ei.value.reason


def test_seal_open_round_trip_both_types():
    for msg in (batch(), hello()):
        data = seal(msg, ALICE)
        assert open_envelope(data, swarm=SWARM) == msg
        env = read_envelope(data)
        assert env.public_key == ALICE.public_key and len(env.signature) == 64
        assert env.body == encode(msg)
        assert encode_envelope(env) == data
        assert seal(msg, ALICE) == data  # Ed25519 is deterministic: same record, same bytes
        assert list(msgpack.unpackb(data)) == ["body", "public_key", "signature"]


def test_signing_bytes_layout_binds_swarm_and_version():
    sb = signing_bytes("ab", 1, b"xyz")
    assert sb == b"swarm-node/v1/sig\x00" + b"\x00\x00\x00\x02ab" + (1).to_bytes(8, "big") + b"\x00\x00\x00\x03xyz"
    assert signing_bytes("a", 1, b"x") != signing_bytes("b", 1, b"x")
    assert signing_bytes("a", 1, b"x") != signing_bytes("a", 2, b"x")
    assert signing_bytes("a", 1, b"bx") != signing_bytes("ab", 1, b"x")  # length prefix: no ambiguity


def test_seal_refuses_foreign_sender_and_oversize():
    with pytest.raises(ProtocolError) as ei:
        seal(batch(sender=MALLORY.peer_id), ALICE)
    assert ei.value.reason == "sender"
    # a body just under the limit, so the envelope (+~110 bytes) is over it
    filler = "x" * M.MAX_COMPLETION_CHARS
    one = len(encode(batch(rollouts=(Rollout(TaskRef.make("g", None, 0, 0), (filler,), None),))))
    per_rollout = one - len(encode(batch(rollouts=())))
    n = (MAX_MESSAGE_BYTES - 10_000) // per_rollout
    full = [Rollout(TaskRef.make("g", None, 0, i), (filler,), None) for i in range(n)]
    last = lambda a, b: Rollout(TaskRef.make("g", None, 0, n), (a, b), None)  # noqa: E731
    empty_last = len(encode(batch(rollouts=tuple(full) + (last("", ""),))))
    k = MAX_MESSAGE_BYTES - 50 - empty_last - 4  # two str16 headers: 2 bytes more each than fixstr
    msg = batch(rollouts=tuple(full) + (last("y" * (k // 2), "z" * (k - k // 2)),))
    assert len(encode(msg)) == MAX_MESSAGE_BYTES - 50
    with pytest.raises(ProtocolError) as ei:
        seal(msg, ALICE)
    assert ei.value.reason == "size"


def test_wrong_key_tampered_body_and_resigned_claims():
    data = seal(batch(), ALICE)
    env = read_envelope(data)
    # tampered body (still a valid message, different seq), signature unchanged
    body2 = encode(batch(seq=10))
    assert reason_of(encode_envelope(dataclasses.replace(env, body=body2))) == "signature"
    # another public key, signature unchanged
    assert reason_of(encode_envelope(dataclasses.replace(env, public_key=MALLORY.public_key))) == "signature"
    # Mallory re-signs Alice's body with her own key: valid signature, but not the claimed sender's key
    sig = MALLORY.sign(signing_bytes(SWARM, PROTOCOL_VERSION, env.body))
    forged = encode_envelope(Envelope(env.body, MALLORY.public_key, sig))
    assert reason_of(forged) == "sender"
    # Mallory's own honest message verifies fine
    assert open_envelope(seal(batch(sender=MALLORY.peer_id), MALLORY), swarm=SWARM).sender == MALLORY.peer_id


def test_signature_for_other_context_is_rejected():
    env = read_envelope(seal(batch(), ALICE))
    for swarm, version in (("other", PROTOCOL_VERSION), (SWARM, PROTOCOL_VERSION + 1)):
        sig = ALICE.sign(signing_bytes(swarm, version, env.body))
        assert reason_of(encode_envelope(dataclasses.replace(env, signature=sig))) == "signature"
    raw = ALICE.sign(env.body)  # a bare signature of the body (no domain tag) is not ours either
    assert reason_of(encode_envelope(dataclasses.replace(env, signature=raw))) == "signature"


def test_cross_swarm_and_cross_version_replay():
    data = seal(batch(), ALICE)
    assert reason_of(data, swarm="other-swarm") == "swarm"
    assert reason_of(data, version=PROTOCOL_VERSION + 1) == "version"
    v2 = seal(batch(version=PROTOCOL_VERSION + 1), ALICE)
    assert reason_of(v2) == "version"
    assert open_envelope(v2, swarm=SWARM, version=PROTOCOL_VERSION + 1).version == PROTOCOL_VERSION + 1


def test_reason_order_decode_signature_sender_swarm_version():
    env = read_envelope(seal(batch(swarm="elsewhere", version=7), ALICE))
    bad_body = dataclasses.replace(env, body=env.body + b"\x00")
    assert reason_of(encode_envelope(bad_body)) == "decode"
    bad_sig = dataclasses.replace(env, signature=bytes(64))
    assert reason_of(encode_envelope(bad_sig)) == "signature"  # before swarm/version mismatch
    with pytest.raises(ProtocolError) as ei:
        verify_envelope(env, swarm=SWARM, version=PROTOCOL_VERSION)
    assert ei.value.reason == "swarm"  # swarm is checked before version


def test_read_envelope_rejections():
    data = seal(hello(), ALICE)
    env = read_envelope(data)
    d = {"body": env.body, "public_key": env.public_key, "signature": env.signature}
    pack = lambda o: msgpack.packb(o, use_bin_type=True)  # noqa: E731
    cases = [
        pack({**d, "x": b""}), pack({k: v for k, v in d.items() if k != "body"}),
        pack({**d, "public_key": env.public_key[:31]}), pack({**d, "signature": env.signature + b"\x00"}),
        pack({**d, "body": "text"}), pack(dict(reversed(list(d.items())))), pack(list(d.values())),
        data + b"\x00", data[:-1], b"", b"\xc1", msgpack.packb(d, use_bin_type=False),
        data.replace(b"\xc4\x20", b"\xc5\x00\x20", 1),  # bin16 header for the 32-byte key
    ]
    for bad in cases:
        with pytest.raises(ProtocolError) as ei:
            read_envelope(bad)
        assert ei.value.reason == "decode"
    with pytest.raises(ProtocolError) as ei:
        read_envelope(bytes(MAX_MESSAGE_BYTES + 1))
    assert ei.value.reason == "size"
    with pytest.raises(ProtocolError):
        verify_envelope(Envelope("x", b"", b""), swarm=SWARM)  # type: ignore[arg-type]


def _single_byte_mutants(data: bytes):
    for i in range(len(data)):
        old = data[i]
        for new in {(old + 1) & 0xFF, (old - 1) & 0xFF, 0x00, 0xFF, old ^ 0x80}:
            if new != old:
                yield data[:i] + bytes([new]) + data[i + 1:]
    for n in range(len(data)):
        yield data[:n]


@pytest.mark.parametrize("which", ["hello", "batch"])
def test_every_single_byte_mutation_is_rejected_or_identical(which):
    msg = hello() if which == "hello" else batch()
    data = seal(msg, ALICE)
    count = accepted = 0
    reasons: dict[str, int] = {}
    for bad in _single_byte_mutants(data):
        count += 1
        try:
            got = open_envelope(bad, swarm=SWARM)
        except ProtocolError as e:
            reasons[e.reason] = reasons.get(e.reason, 0) + 1
            continue
        assert got == msg  # anything accepted must be the very same message
        accepted += 1
    assert count > 5 * len(data)
    assert accepted == 0  # canonical decoding + signature: in fact nothing else is accepted
    assert reasons.get("decode", 0) > 0 and reasons.get("signature", 0) > 0
