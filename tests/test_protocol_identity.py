"""Identity: peer IDs identical to libp2p's, signatures interoperable, safe key files."""
from __future__ import annotations

import os
import re
import stat

import pytest

from protocol import (
    Identity,
    IdentityError,
    ProtocolError,
    load_identity,
    load_or_create_identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    save_identity,
    verify_signature,
)
from protocol.identity import b58decode, b58encode

SEED0 = bytes(32)
PID0 = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"  # libp2p's ID for the all-zero seed


def test_known_peer_id_and_round_trip():
    ident = Identity(SEED0)
    assert ident.peer_id == PID0
    assert len(ident.public_key) == 32
    assert peer_id_from_public_key(ident.public_key) == PID0
    assert public_key_from_peer_id(PID0) == ident.public_key
    for _ in range(20):
        i = Identity.generate()
        assert i.peer_id.startswith("12D3KooW") and len(i.peer_id) == 52
        assert public_key_from_peer_id(i.peer_id) == i.public_key


def test_identity_is_frozen_hashable_and_hides_the_seed():
    a, b = Identity(SEED0), Identity(SEED0)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert Identity.generate() != a
    assert SEED0.hex() not in repr(a) and PID0 in repr(a)
    with pytest.raises(Exception):
        a.private_seed = b"x" * 32  # type: ignore[misc]
    with pytest.raises(ValueError):
        Identity(b"short")


def test_sign_and_verify():
    ident = Identity.generate()
    sig = ident.sign(b"data")
    assert len(sig) == 64
    assert verify_signature(ident.public_key, b"data", sig)
    assert not verify_signature(ident.public_key, b"datb", sig)
    assert not verify_signature(Identity.generate().public_key, b"data", sig)
    assert not verify_signature(ident.public_key[:31], b"data", sig)
    assert not verify_signature(b"\xff" * 32, b"data", sig)  # not a curve point: False, no exception
    assert not verify_signature(ident.public_key, b"data", sig[:63])


def test_peer_id_matches_libp2p_and_signatures_interoperate():
    from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from libp2p.crypto.keys import KeyPair
    from libp2p.peer.id import ID

    for seed in (SEED0, bytes(range(32)), os.urandom(32), os.urandom(32)):
        ours = Identity(seed)
        priv = Ed25519PrivateKey.from_bytes(seed)
        pair = KeyPair(priv, priv.get_public_key())
        theirs = ID.from_pubkey(pair.public_key)
        assert theirs.to_base58() == ours.peer_id
        assert pair.public_key.to_bytes() == ours.public_key
        assert ID.from_base58(ours.peer_id).to_bytes() == b"\x00\x24\x08\x01\x12\x20" + ours.public_key
        msg = b"swarm-node interop " + seed
        assert pair.public_key.verify(msg, ours.sign(msg))  # cryptography -> libp2p
        assert verify_signature(ours.public_key, msg, priv.sign(msg))  # libp2p -> cryptography
        assert not pair.public_key.verify(msg + b"x", ours.sign(msg))
        assert Ed25519PublicKey.from_bytes(ours.public_key).to_bytes() == ours.public_key


@pytest.mark.parametrize("bad", [
    "", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha256 (RSA-style) peer ID
    "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXT",  # truncated
    "1" + PID0,  # extra leading zero byte
    "12D3KooW0pJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",  # '0' is not base58
    "x" * 10_000, 5, None, b"12D3KooW",
])
def test_public_key_from_peer_id_rejects_other_ids(bad):
    with pytest.raises(ProtocolError) as ei:
        public_key_from_peer_id(bad)  # type: ignore[arg-type]
    assert ei.value.reason == "sender"


def test_peer_ids_have_no_checksum_so_a_typo_is_another_key():
    other = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTn"  # last char changed
    assert public_key_from_peer_id(other) != public_key_from_peer_id(PID0)  # the sender check catches it


def test_base58_round_trip_and_leading_zeros():
    for data in (b"", b"\x00", b"\x00\x00\x01", b"\xff" * 40, bytes(range(50))):
        assert b58decode(b58encode(data)) == data
    assert b58encode(b"\x00\x00") == "11"
    assert b58encode(b"hello world") == "StV1DL6CwTryKyV"


# ---------------------------------------------------------------- files

def test_save_load_round_trip_mode_and_format(tmp_path):
    path = tmp_path / "deep" / "dir" / "node.key"
    ident = Identity.generate()
    save_identity(ident, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.splitlines() == ["swarm-node identity v1", "key-type: ed25519",
                                 f"private-key: {ident.private_seed.hex()}", f"peer-id: {ident.peer_id}"]
    assert load_identity(path) == ident
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temp file left behind


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "node.key"
    first, second = Identity.generate(), Identity.generate()
    save_identity(first, path)
    with pytest.raises(IdentityError, match="already exists"):
        save_identity(second, path)
    assert load_identity(path) == first
    save_identity(second, path, overwrite=True)
    assert load_identity(path) == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_load_missing_and_unreadable(tmp_path):
    with pytest.raises(IdentityError, match="does not exist"):
        load_identity(tmp_path / "nope.key")
    with pytest.raises(IdentityError, match="cannot read"):
        load_identity(tmp_path)  # a directory


def _damage(path, fn):
    path.write_text(fn(path.read_text()))


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("peer-id: 12D3KooW", "peer-id: 12D3KooX"),
    lambda t: t.replace("private-key: ", "private-key: 00", 1)[:-1],
    lambda t: re.sub("private-key: ..", "private-key: zz", t),  # non-hex digits
    lambda t: t.replace("key-type: ed25519", "key-type: rsa"),
    lambda t: t.replace("peer-id", "peer_id"),
    lambda t: t + "extra: 1\n",
    lambda t: "\n".join(t.splitlines()[:2]) + "\n",  # truncated
    lambda t: re.sub("private-key: (.*)", lambda m: "private-key: " + m.group(1).upper(), t),  # hex case
])
def test_damaged_file_is_reported(tmp_path, edit):
    path = tmp_path / "node.key"
    save_identity(Identity.generate(), path)
    _damage(path, edit)
    with pytest.raises(IdentityError, match="damaged"):
        load_identity(path)


def test_flipped_key_digit_is_detected_as_damage(tmp_path):
    path = tmp_path / "node.key"
    ident = Identity.generate()
    save_identity(ident, path)
    h = ident.private_seed.hex()
    flipped = ("1" if h[0] != "1" else "2") + h[1:]
    _damage(path, lambda t: t.replace(h, flipped))
    with pytest.raises(IdentityError, match="peer ID does not match"):
        load_identity(path)


@pytest.mark.parametrize("content", [
    b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
    b"-----END PRIVATE KEY-----\n",
    bytes(range(256)), b"", b"\x08\x01\x12@" + bytes(64), b"{\"key\": 1}", b"x" * 10_000,
])
def test_foreign_file_is_reported(tmp_path, content):
    path = tmp_path / "node.key"
    path.write_bytes(content)
    with pytest.raises(IdentityError, match="not a swarm-node identity file"):
        load_identity(path)


def test_other_format_version_is_reported(tmp_path):
    path = tmp_path / "node.key"
    save_identity(Identity.generate(), path)
    _damage(path, lambda t: t.replace("identity v1", "identity v2"))
    with pytest.raises(IdentityError, match="unsupported format"):
        load_identity(path)


def test_load_or_create(tmp_path):
    path = tmp_path / "sub" / "node.key"
    ident, created = load_or_create_identity(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created2 = load_or_create_identity(path)
    assert again == ident and not created2


@pytest.mark.parametrize("content", [b"", b"garbage", b"swarm-node identity v1\nkey-type: ed25519\n"])
def test_load_or_create_never_replaces_a_bad_file(tmp_path, content):
    path = tmp_path / "node.key"
    path.write_bytes(content)
    with pytest.raises(IdentityError):
        load_or_create_identity(path)
    assert path.read_bytes() == content
    dangling = tmp_path / "link.key"
    dangling.symlink_to(tmp_path / "missing-target")
    with pytest.raises(IdentityError):
        load_or_create_identity(dangling)
    assert not (tmp_path / "missing-target").exists()
