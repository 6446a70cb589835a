"""An optional ledger of the batches this node published and accepted, one JSON line each.

Off unless `MeshConfig.receipts` names a file (the CLI takes it from the SWARM_NODE_RECEIPTS environment variable):
`scripts/bench_swarm.py` turns it on in every process it starts, so delivery is counted batch by batch (which
sender's seq reached which receiver, and when) instead of estimated from counters sampled at window edges. Lines:
  {"ev": "pub", "t": wall clock, "seq", "created_at", "shard"}            one per envelope we published
  {"ev": "acc", "t", "sender", "seq", "created_at", "via"}                 one per batch we accepted
  {"ev": "listen", "t", "shards": [...]}                                   at start and at every fan-in rotation
A file that cannot be written turns the ledger off with one warning; the node runs on.
"""
from __future__ import annotations

import json
import logging
import time
from typing import IO, Any

log = logging.getLogger(__name__)

RECEIPTS_ENV = "SWARM_NODE_RECEIPTS"  # the file `swarm-node join` / `relay` write receipts to (unset: none)


class Receipts:
    def __init__(self, path: str) -> None:
        self._f: IO[str] | None = None
        if not path:
            return
        try:
            self._f = open(path, "a", buffering=1)
        except OSError as e:
            log.warning("receipts off: cannot open %s: %s", path, e)

    def write(self, ev: str, **fields: Any) -> None:
        if self._f is None:
            return
        try:
            self._f.write(json.dumps({"ev": ev, "t": round(time.time(), 4), **fields}) + "\n")
        except (OSError, ValueError) as e:  # a full disk or a closed file: stop recording, keep the node
            log.warning("receipts off: %s", e)
            self._f = None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
