#!/usr/bin/env python
"""What an idle swarm costs each node: K `swarm-node relay` processes on loopback, no trainers, no batches.

    python scripts/measure_idle_swarm.py --relays 12 --extra="--shards 4" --extra="--shards 4 --ping-interval-s 0"

Per setting (one --extra string each; default "--shards 4"): starts relay 0, then the other K-1 bootstrapping through
it, lets the swarm settle for --settle-s, and reads each process's CPU (user + system, /proc) over --window-s. What
they spend is the mesh's upkeep: gossipsub heartbeats, Hellos and their forwards, liveness pings. Prints one line per
setting and, with --json, writes the figures (docs/scale.md, "What an idle node spends").
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.join_procs import make_relays  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(k: int, extra: list[str], settle_s: float, window_s: float) -> dict:
    out = Path(tempfile.mkdtemp(prefix="idle-swarm-"))
    relays = make_relays(out, [f"relay-{i}" for i in range(k)])
    swarm = "idle-" + secrets.token_hex(3)
    try:
        relays[0].start(swarm, [], extra)
        time.sleep(3)
        for r in relays[1:]:
            r.start(swarm, [relays[0].addr], extra)
        time.sleep(settle_s)
        before = [(r.status() or {}).get("mesh") or {} for r in relays]
        c0, t0 = [cpu_s(r.proc.pid) for r in relays], time.time()
        time.sleep(window_s)
        c1, dt = [cpu_s(r.proc.pid) for r in relays], time.time() - t0
        after = [(r.status() or {}).get("mesh") or {} for r in relays]
    finally:
        for r in relays:
            r.stop()
        shutil.rmtree(out, ignore_errors=True)
    ms = [(b - a) / dt * 1000 for a, b in zip(c0, c1)]
    hellos = [(x.get("accepted_hellos", 0) - y.get("accepted_hellos", 0)) / dt for x, y in zip(after, before)]
    return {"relays": k, "extra": extra, "window_s": round(dt, 1), "load": os.getloadavg()[0],
            "cpu_ms_per_s": {"median": round(statistics.median(ms), 1), "min": round(min(ms), 1), "max": round(max(ms), 1)},
            "peers": sorted(len(x.get("peers") or []) for x in after),
            "hellos_accepted_per_s": round(statistics.mean(hellos), 2),
            "pings_sent_per_s": round(statistics.mean(
                ((x.get("pings") or {}).get("sent", 0) - (y.get("pings") or {}).get("sent", 0)) / dt
                for x, y in zip(after, before)), 2),
            "pings_skipped_per_s": round(statistics.mean(
                ((x.get("pings") or {}).get("skipped_heard", 0) - (y.get("pings") or {}).get("skipped_heard", 0)) / dt
                for x, y in zip(after, before)), 2),
            "hellos_published_per_s": round(statistics.mean(
                (x.get("published_hellos", 0) - y.get("published_hellos", 0)) / dt for x, y in zip(after, before)), 3),
            **{f"control_{k}_per_s": round(statistics.mean(
                ((x.get("control_sent") or {}).get(k, 0) - (y.get("control_sent") or {}).get(k, 0)) / dt
                for x, y in zip(after, before)), 2) for k in ("rpcs", "ihave", "idontwant")},
            "dials_ok_per_s": round(statistics.mean(
                (x.get("dials_ok", 0) - y.get("dials_ok", 0)) / dt for x, y in zip(after, before)), 3),
            "hello_every_s": sorted({x.get("hello_every_s") for x in after if x.get("hello_every_s") is not None})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--relays", type=int, default=12)
    ap.add_argument("--extra", action="append", default=[], help='one setting, e.g. --extra="--shards 4"')
    ap.add_argument("--settle-s", type=float, default=40.0)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    results = []
    for extra in [e.split() for e in args.extra] or [["--shards", "4"]]:
        r = measure(args.relays, extra, args.settle_s, args.window_s)
        c = r["cpu_ms_per_s"]
        print(f"{r['relays']} relays {' '.join(extra)}: CPU {c['median']} ms/s per relay (min {c['min']}, max {c['max']}), "
              f"peers {r['peers'][0]}-{r['peers'][-1]}, {r['hellos_accepted_per_s']} Hellos accepted/s each, "
              f"Hello every {r['hello_every_s']} s, pings {r['pings_sent_per_s']}/s sent, "
              f"{r['pings_skipped_per_s']}/s skipped (peer heard), control RPCs {r['control_rpcs_per_s']}/s sent "
              f"(IHAVE {r['control_ihave_per_s']}/s), load {r['load']:.1f}", flush=True)
        results.append(r)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
