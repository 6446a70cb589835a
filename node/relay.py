"""`swarm-node relay`: a swarm member with no model. It joins the mesh, validates and forwards what it hears, answers
discovery (Hellos, bootstrap dials: a seed for the swarm) and serves a status page, with the identity, limits, bans
and clean stop of a training node, and without torch: it is what a small always-on machine runs, and what makes a
large local swarm fit on one machine (docs/scale.md has its memory and CPU per process).

It imports only the protocol and swarm layers (and node.config / node.status, which import neither torch nor the
model code); tests/test_relay.py runs the process and checks that torch never got imported.

A relay has no rounds, so in a sharded swarm it listens to its home shard and --shard-fanin - 1 others, fixed
(the epoch of round 0); --shard-fanin S makes it listen to, and bridge, every shard.
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import trio

from node.config import ConfigError, NodeConfig, data_dir
from node.memory_plan import proc_kib
from node.status import StatusPortError, serve_status
from protocol.identity import Identity, IdentityError, load_or_create_identity
from swarm.receipts import RECEIPTS_ENV

log = logging.getLogger("swarm_node.relay")

MODEL_NAME = "relay"  # what its Hellos carry in place of a model name (the protocol requires a non-empty one)


def process_usage() -> dict[str, Any]:
    """This process's resident memory (MB; Linux: /proc, elsewhere the peak), CPU seconds and whether torch is in."""
    rss = proc_kib("/proc/self/status", "VmRSS")
    rss_mb = None if rss is None else round(rss / 2**20, 1)
    if rss_mb is None:  # macOS reports bytes, Linux kB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_mb = round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
    return {"rss_mb": rss_mb, "cpu_s": round(time.process_time(), 3), "torch_loaded": "torch" in sys.modules}


class Relay:
    def __init__(self, cfg: NodeConfig, identity: Identity) -> None:
        from swarm.mesh import Mesh, MeshConfig

        self.cfg, self.identity = cfg, identity
        self.mesh = Mesh(identity, MeshConfig(
            swarm=cfg.swarm, listen=cfg.listen, bootstrap=tuple(cfg.bootstrap), max_age_s=cfg.max_staleness_s,
            mdns=cfg.mdns, max_peers=cfg.max_peers, shards=cfg.shards, shard_fanin=cfg.shard_fanin,
            shard_rotate_rounds=cfg.shard_rotate_rounds, ping_interval_s=cfg.ping_interval_s,
            ping_timeout_s=cfg.ping_timeout_s, receipts=os.environ.get(RECEIPTS_ENV, "")))
        self.started_at = time.time()
        self.batches_seen = 0  # validated batches that reached us (gossipsub forwarded them on already)
        self.senders: dict[str, int] = {}  # sender -> batches, for the status page (bounded below)
        self.last_heard: dict[str, float] = {}  # sender -> time.time() of its latest batch (same bound)

    async def _drain(self) -> None:
        """Take what the mesh delivers: a relay keeps nothing, but an undrained `incoming` would make the mesh shed
        batches as "load" (Mesh._lagging) and so stop forwarding them."""
        async for r in self.mesh.incoming:
            self.batches_seen += 1
            self.senders[r.from_peer] = self.senders.get(r.from_peer, 0) + 1
            self.last_heard[r.from_peer] = time.time()
            if len(self.senders) > 1024:
                oldest = next(iter(self.senders))
                del self.senders[oldest]
                self.last_heard.pop(oldest, None)

    def status(self) -> dict[str, Any]:
        stats = self.mesh.stats()
        return {
            "role": "relay",
            "peer_id": self.identity.peer_id,
            "public_key": self.identity.public_key.hex(),
            "swarm": self.cfg.swarm,
            "listen_addrs": self.mesh.listen_addrs(),
            "peers": self.mesh.peers(),
            "connected": self.mesh.connected(),
            "batches_seen": self.batches_seen,
            "received_from": dict(self.senders),
            "last_heard_s": {p: round(time.time() - t, 1) for p, t in self.last_heard.items()},
            "rejections": stats.get("rejections_by_reason", {}),
            "mesh": stats,
            "uptime_s": round(time.time() - self.started_at, 1),
            "process": process_usage(),
        }

    async def run(self, *, on_listening: Callable[["Relay"], None] | None = None) -> None:
        """Run until SIGINT/SIGTERM (trio's signal receiver: a clean stop, no KeyboardInterrupt traceback)."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.mesh.run)
                self.mesh.set_status(0, MODEL_NAME)
                nursery.start_soon(self._drain)
                if self.cfg.status_port:
                    await nursery.start(serve_status, self.cfg.status_port, self.status)
                if on_listening is not None:
                    on_listening(self)
                async for signum in signals:
                    log.warning("%s received: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break


def run_relay(cfg: NodeConfig) -> int:
    """`swarm-node relay`: 0 after a signal, 2 (one sentence on stderr) for a mistake the user can fix."""
    from node.app import setup_logging

    try:
        ident_path = Path(cfg.identity) if cfg.identity else data_dir() / "identity.key"
        identity, created = load_or_create_identity(ident_path)
        log_path = setup_logging(cfg, peer_hint=f"relay-{identity.peer_id[-8:]}")
        print(f"{'new identity' if created else 'identity'} {identity.peer_id} ({ident_path})", flush=True)
        relay = Relay(cfg, identity)

        def on_listening(r: Relay) -> None:
            for addr in r.mesh.listen_addrs():
                print(f"listening {addr}", flush=True)
            if cfg.status_port:
                print(f"dashboard on http://127.0.0.1:{cfg.status_port}/ (JSON: /status)", flush=True)
            print(f"relay for swarm {cfg.swarm!r}; log: {log_path}", flush=True)

        trio.run(lambda: relay.run(on_listening=on_listening))
        s = relay.status()
        print(f"stopped after {s['uptime_s']:.0f}s; {s['batches_seen']} batches validated and relayed", flush=True)
        return 0
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - sorted into user mistakes and bugs right here
        msg = _user_error(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2


def _user_error(exc: BaseException) -> str | None:
    """The one sentence for a mistake the user can fix (node.app.user_error would import the model code)."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            msg = _user_error(sub)
            if msg:
                return msg
        return None
    if isinstance(exc, (ConfigError, IdentityError, StatusPortError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
        return f"the listen address is already in use ({exc}); pick another --listen port"
    return None


__all__ = ["Relay", "run_relay", "process_usage"]
