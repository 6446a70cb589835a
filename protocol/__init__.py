"""Wire protocol: typed records, canonical strict codec, Ed25519 identities and signed envelopes.

Pure: no network, no torch, no libp2p. Everything a peer sends is checked here before the rest of the node sees it.
"""
from .codec import decode, encode
from .envelope import Envelope, encode_envelope, open_envelope, read_envelope, seal, signing_bytes, verify_envelope
from .errors import REASONS, ProtocolError
from .identity import (
    Identity,
    IdentityError,
    load_identity,
    load_or_create_identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    save_identity,
    verify_signature,
)
from .messages import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ConfigValue,
    Hello,
    Message,
    Rollout,
    RolloutBatch,
    TaskRef,
)

__all__ = [
    "ConfigValue", "Envelope", "Hello", "Identity", "IdentityError", "MAX_MESSAGE_BYTES", "Message",
    "PROTOCOL_VERSION", "ProtocolError", "REASONS", "Rollout", "RolloutBatch", "TaskRef", "decode", "encode",
    "encode_envelope", "load_identity", "load_or_create_identity", "open_envelope", "peer_id_from_public_key",
    "public_key_from_peer_id", "read_envelope", "save_identity", "seal", "signing_bytes", "verify_envelope",
    "verify_signature",
]
