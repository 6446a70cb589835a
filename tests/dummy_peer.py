"""A runnable test peer: runs a Mesh, prints its multiaddr, publishes small dummy rollout batches, logs what arrives.

    python -m tests.dummy_peer --swarm s [--listen MA] [--bootstrap MA ...] [--publish-every 1] [--out file.jsonl]

stdout gets one line `LISTEN <multiaddr>` per listen address once the mesh is up (then nothing else), so a parent
process can read it. --out gets JSON lines: {"event": "received" | "published" | "stats", ...}.
SIGINT/SIGTERM stop it cleanly (trio signal receiver: no KeyboardInterrupt traceback, notes item 10).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import IO, Any

import trio

from protocol.identity import Identity, load_or_create_identity

from swarm.mesh import Mesh, MeshConfig
from tests.doubles import dummy_rollouts


def _write(out: IO[str] | None, obj: dict[str, Any]) -> None:
    if out is not None:
        out.write(json.dumps(obj, sort_keys=True) + "\n")
        out.flush()


async def _publisher(mesh: Mesh, every: float, out: IO[str] | None, size: int) -> None:
    rnd = 0
    while True:
        rnd += 1
        n = await mesh.publish_rollouts(rnd, "dummy", dummy_rollouts(2, text="x" * size))
        _write(out, {"event": "published", "round": rnd, "batches": n, "t": time.time()})
        await trio.sleep(every)


async def _receiver(mesh: Mesh, out: IO[str] | None) -> None:
    async for r in mesh.incoming:
        _write(out, {"event": "received", "from": r.from_peer, "round": r.batch.round, "seq": r.batch.seq,
                     "size": r.size, "latency_ms": round((r.received_at - r.batch.created_at) * 1000, 2),
                     "t": r.received_at})


async def _stats(mesh: Mesh, out: IO[str] | None, every: float) -> None:
    while True:
        await trio.sleep(every)
        _write(out, {"event": "stats", "t": time.time(), **mesh.stats()})


async def main_async(args: argparse.Namespace) -> None:
    if args.identity:
        identity, _ = load_or_create_identity(args.identity)
    else:
        identity = Identity.generate()
    cfg = MeshConfig(swarm=args.swarm, listen=args.listen, bootstrap=tuple(args.bootstrap),
                     heartbeat_s=args.heartbeat, hello_interval_s=args.hello_interval,
                     bootstrap_backoff_max_s=args.backoff_max)
    mesh = Mesh(identity, cfg)
    out = open(args.out, "a", encoding="utf-8") if args.out else None
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(mesh.run)
                _write(out, {"event": "started", "peer_id": mesh.peer_id, "addrs": mesh.listen_addrs(),
                           "t": time.time()})
                for a in mesh.listen_addrs():
                    print(f"LISTEN {a}", flush=True)
                nursery.start_soon(_receiver, mesh, out)
                nursery.start_soon(_stats, mesh, out, args.stats_every)
                if args.publish_every > 0:
                    nursery.start_soon(_publisher, mesh, args.publish_every, out, args.size)
                if args.duration > 0:
                    nursery.start_soon(_stop_after, nursery, args.duration)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        _write(out, {"event": "stopped", "t": time.time(), **mesh.stats()})
    finally:
        if out is not None:
            out.close()


async def _stop_after(nursery: trio.Nursery, seconds: float) -> None:
    await trio.sleep(seconds)
    nursery.cancel_scope.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.dummy_peer", description=__doc__.splitlines()[0])
    p.add_argument("--swarm", required=True)
    p.add_argument("--listen", default="/ip4/0.0.0.0/tcp/0")
    p.add_argument("--bootstrap", nargs="*", default=[], metavar="MULTIADDR")
    p.add_argument("--publish-every", type=float, default=1.0, help="seconds between batches; 0 = never publish")
    p.add_argument("--size", type=int, default=100, help="characters per dummy completion")
    p.add_argument("--out", help="JSON-lines log of published/received batches and stats")
    p.add_argument("--identity", help="identity file (created if missing); default: a fresh identity")
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--hello-interval", type=float, default=10.0)
    p.add_argument("--backoff-max", type=float, default=30.0, help="cap of the bootstrap retry backoff (s)")
    p.add_argument("--stats-every", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds; 0 = run until killed")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
