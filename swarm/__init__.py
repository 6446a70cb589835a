"""libp2p gossip mesh for signed rollout batches (py-libp2p 0.8.1). Imports only `protocol` from this project.

Names are imported lazily: `import libp2p` costs ~1 s, and `swarm.validator` / `swarm.pool` do not need it.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Mesh": "mesh", "MeshConfig": "mesh", "Received": "mesh", "topic_for": "mesh",
    "MessageValidator": "validator", "PeerStanding": "validator", "RateLimit": "validator", "Rejected": "validator",
    "REASONS": "validator",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'swarm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
