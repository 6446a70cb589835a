#!/usr/bin/env python
"""Memory and CPU of one `swarm-node relay` process: idle, then relaying a swarm of tiny training nodes on loopback.

    python scripts/measure_relay.py --trainers 4 --idle-s 20 --window-s 60

Starts a relay, samples its resident memory and CPU over --idle-s with nobody connected, then starts --trainers tiny
`swarm-node join` processes (--threads 1) that bootstrap through it, waits until each one has trained on a peer's
groups, and samples again over --window-s. CPU is (user + system time) / wall time of each process, from /proc
(Linux); the trainers' figures are printed alongside for scale. Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.simulate import free_ports  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def usage(pid: int) -> tuple[float, float]:
    """(resident MB, CPU seconds so far) of a process, from /proc."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def status(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def sample(pids: list[int], seconds: float) -> list[dict]:
    before = [usage(p) for p in pids]
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    after = [usage(p) for p in pids]
    return [{"rss_mb": round(a[0], 1), "cpu_pct": round(100 * (a[1] - b[1]) / wall, 2)} for b, a in zip(before, after)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trainers", type=int, default=4)
    ap.add_argument("--idle-s", type=float, default=20.0)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    swarm = "relay-" + secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix="measure_relay_"))
    ports = free_ports(2 + 2 * args.trainers)
    procs: list[subprocess.Popen] = []

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        (tmp / name).mkdir()
        out = open(tmp / name / "out.log", "w")
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                     "SWARM_NODE_HOME": str(tmp / name)})
        procs.append(p)
        return p

    try:
        relay = spawn("relay", [sys.executable, "-m", "node.cli", "relay", "--swarm", swarm, "--listen",
                                f"/ip4/127.0.0.1/tcp/{ports[0]}", "--status-port", str(ports[1])])
        wait(lambda: status(ports[1]) is not None, 60, "the relay")
        relay_addr = status(ports[1])["listen_addrs"][0]
        idle = sample([relay.pid], args.idle_s)[0]
        trainers = []
        for i in range(args.trainers):
            p2p, st = ports[2 + 2 * i], ports[3 + 2 * i]
            trainers.append((st, spawn(f"t{i}", [
                sys.executable, "-m", "node.cli", "join", "--model", "tiny", "--threads", "1", "--swarm", swarm,
                "--listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--status-port", str(st), "--bootstrap", relay_addr])))
        wait(lambda: all((status(st) or {}).get("trained_from") for st, _ in trainers), args.timeout,
             "every trainer to train on a peer's groups")
        s0 = status(ports[1])
        loaded = sample([relay.pid] + [p.pid for _, p in trainers], args.window_s)
        s1 = status(ports[1])
        rate = (s1["batches_seen"] - s0["batches_seen"]) / args.window_s
        result = {
            "trainers": args.trainers,
            "relay_idle": idle,
            "relay_relaying": {**loaded[0], "batches_per_s": round(rate, 2),
                               "bytes_in_per_s": round((s1["mesh"]["bytes_in"] - s0["mesh"]["bytes_in"])
                                                       / args.window_s),
                               "peers": len(s1["peers"]), "torch_loaded": s1["process"]["torch_loaded"]},
            "trainers_each": loaded[1:],
            "load_avg": os.getloadavg(),
        }
        print(json.dumps(result, indent=1))
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
