"""A node's Ed25519 identity: the key that is both its libp2p peer ID and its message-signing key.

The peer ID is computed here (no libp2p import) exactly as libp2p does for Ed25519 keys: base58btc of the identity
multihash of the protobuf-encoded PublicKey{Type=Ed25519, Data=<32 raw bytes>}.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ProtocolError

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

# identity multihash (code 0x00, length 0x24) of protobuf PublicKey: field 1 Type=1 (Ed25519), field 2 Data (32 bytes)
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_PEER_ID_BYTES = len(_PEER_ID_PREFIX) + PUBLIC_KEY_BYTES
_MAX_PEER_ID_CHARS = 64  # an Ed25519 peer ID is 52 chars; bounds the base58 big-int work on hostile input

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}

_FILE_HEADER = "swarm-node identity v1"
_FILE_HEADER_PREFIX = "swarm-node identity "
_MAX_FILE_BYTES = 4096  # ours is ~180 bytes; anything big is not ours and is not read whole


class IdentityError(Exception):
    """An identity file is missing, unreadable, damaged, or not ours. The message says which, in one sentence."""


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        i = _B58_INDEX.get(c)
        if i is None:
            raise ValueError(f"invalid base58 character {c!r}")
        n = n * 58 + i
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * zeros + body


def peer_id_from_public_key(pub: bytes) -> str:
    """libp2p peer ID ("12D3KooW...") of a raw 32-byte Ed25519 public key."""
    if not isinstance(pub, bytes) or len(pub) != PUBLIC_KEY_BYTES:
        raise ProtocolError("sender", "an Ed25519 public key is exactly 32 bytes")
    return b58encode(_PEER_ID_PREFIX + pub)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Raw Ed25519 public key inlined in a peer ID; ProtocolError(reason="sender") for any other kind of ID."""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= _MAX_PEER_ID_CHARS:
        raise ProtocolError("sender", "not an Ed25519 libp2p peer ID")
    try:
        raw = b58decode(peer_id)
    except ValueError:
        raise ProtocolError("sender", "peer ID is not valid base58") from None
    if len(raw) != _PEER_ID_BYTES or not raw.startswith(_PEER_ID_PREFIX):
        raise ProtocolError("sender", "not an Ed25519 identity-multihash peer ID")
    pub = raw[len(_PEER_ID_PREFIX):]
    if b58encode(raw) != peer_id:  # e.g. extra leading '1's: one key must have one spelling
        raise ProtocolError("sender", "peer ID is not in canonical base58 form")
    return pub


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True iff `signature` is a valid Ed25519 signature of `data` by `public_key`; never raises for bad input."""
    if (not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES
            or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair held as its 32-byte private seed. repr() never shows the seed."""

    private_seed: bytes = field(repr=False)
    # Derived once: key object and peer ID are used on every message. Not part of equality/hash.
    _key: Ed25519PrivateKey = field(init=False, repr=False, compare=False, hash=False)
    _public_key: bytes = field(init=False, repr=False, compare=False, hash=False)
    _peer_id: str = field(init=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private_seed, bytes) or len(self.private_seed) != SEED_BYTES:
            raise ValueError("an Ed25519 private seed is exactly 32 bytes")
        key = Ed25519PrivateKey.from_private_bytes(self.private_seed)
        pub = key.public_key().public_bytes_raw()
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_public_key", pub)
        object.__setattr__(self, "_peer_id", peer_id_from_public_key(pub))

    @classmethod
    def generate(cls) -> "Identity":
        return cls(os.urandom(SEED_BYTES))

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def peer_id(self) -> str:
        return self._peer_id

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id!r})"


def _format_identity(identity: Identity) -> str:
    return (f"{_FILE_HEADER}\n"
            "key-type: ed25519\n"
            f"private-key: {identity.private_seed.hex()}\n"
            f"peer-id: {identity.peer_id}\n")


def save_identity(identity: Identity, path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Write the identity atomically (temp file + rename) with mode 0600; refuse to replace a file unless told to."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IdentityError(f"cannot create the directory for identity file {path}: {e.strerror or e}.") from e
    if not overwrite and os.path.lexists(path):
        raise IdentityError(f"identity file {path} already exists; refusing to overwrite it.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(_format_identity(identity))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target exists, so a concurrent writer can never be clobbered
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise IdentityError(f"identity file {path} already exists; refusing to overwrite it.") from None
            except OSError:  # filesystem without hard links: best effort
                if os.path.lexists(path):
                    raise IdentityError(f"identity file {path} already exists; refusing to overwrite it.") from None
                os.replace(tmp, path)
    except OSError as e:
        raise IdentityError(f"cannot write identity file {path}: {e.strerror or e}.") from e
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Read an identity file written by save_identity; IdentityError (one clear sentence) for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise IdentityError(f"identity file {path} does not exist.") from None
    except OSError as e:
        raise IdentityError(f"cannot read identity file {path}: {e.strerror or e}.") from None
    foreign = f"{path} is not a swarm-node identity file; move it away or pass another path."
    if len(raw) > _MAX_FILE_BYTES:
        raise IdentityError(foreign)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise IdentityError(foreign) from None
    lines = text.split("\n")
    if not lines[0].startswith(_FILE_HEADER_PREFIX):
        raise IdentityError(foreign)
    if lines[0] != _FILE_HEADER:
        raise IdentityError(f"identity file {path} has unsupported format {lines[0]!r}; this node reads "
                            f"{_FILE_HEADER!r}.")

    def damaged(why: str) -> IdentityError:
        return IdentityError(f"identity file {path} is damaged ({why}); restore it from a backup, or move it away "
                             "to create a new identity (a new peer ID).")

    fields: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        key, sep, value = line.partition(": ")
        if not sep or key in fields:
            raise damaged(f"unexpected line {line[:40]!r}")
        fields[key] = value
    if set(fields) != {"key-type", "private-key", "peer-id"}:
        raise damaged("wrong set of fields")
    if fields["key-type"] != "ed25519":
        raise damaged(f"unsupported key type {fields['key-type'][:40]!r}")
    hexkey = fields["private-key"]
    if len(hexkey) != 2 * SEED_BYTES or any(c not in "0123456789abcdef" for c in hexkey):
        raise damaged("private key is not 64 lowercase hex digits")
    identity = Identity(bytes.fromhex(hexkey))
    if identity.peer_id != fields["peer-id"]:
        raise damaged("stored peer ID does not match the private key")
    return identity


def load_or_create_identity(path: str | os.PathLike[str]) -> tuple[Identity, bool]:
    """Load the identity at `path`, or create one if nothing is there. Returns (identity, created).

    A file that exists but cannot be loaded is never replaced: losing a key silently changes the node's peer ID.
    """
    if os.path.lexists(path):
        return load_identity(path), False
    identity = Identity.generate()
    try:
        save_identity(identity, path, overwrite=False)
    except IdentityError:
        if os.path.lexists(path):  # another process created it first: use theirs
            return load_identity(path), False
        raise
    return identity, True
