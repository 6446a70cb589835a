"""Does the dashboard slow a node down? One tiny node (--threads 1), its round time with the page open in headless
Chromium (polling /history and /status every 2 s) against the same browser on about:blank, in alternating phases of
--rounds rounds (ABAB..., so drift in the machine's load falls on both); then the cost of one poll, served.

Usage: .venv/bin/python scripts/bench_dashboard.py [--rounds 15] [--phases 6] [--out runs/bench_dashboard]
Writes OUT/result.json; docs/benchmarks.md has the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.simulate import free_ports, read_metrics  # noqa: E402
from tests.browser import chromium_driver  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15, help="rounds per phase")
    ap.add_argument("--phases", type=int, default=6, help="phases in all (closed, open, closed, ...)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_dashboard"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    p2p, port = free_ports(2)
    cmd = [sys.executable, "-m", "node.cli", "join", "--model", "tiny", "--swarm", f"bench-dash-{os.getpid()}",
           "--threads", "1", "--listen", f"/ip4/127.0.0.1/tcp/{p2p}", "--status-port", str(port),
           "--identity", str(out / "identity.key"), "--checkpoint-dir", str(out / f"ck-{os.getpid()}"),
           "--metrics", str(metrics), "--log-file", str(out / "node.log"), "--eval-every", "5", "--eval-size", "20"]
    node = subprocess.Popen(cmd, cwd=ROOT, stdout=open(out / "stdout.log", "w"), stderr=subprocess.STDOUT)
    driver = chromium_driver(out)
    phases: list[dict] = []
    try:
        while len(read_metrics(metrics)) < 3:  # warm-up rounds (first allocations) count in neither
            if node.poll() is not None:
                raise SystemExit(f"node exited: {(out / 'stdout.log').read_text()[-2000:]}")
            time.sleep(0.5)
        for i in range(a.phases):
            page_open = i % 2 == 1
            driver.get(f"http://127.0.0.1:{port}/" if page_open else "about:blank")
            start = len(read_metrics(metrics))
            while len(read_metrics(metrics)) == start:  # phase starts at a round boundary (for the CPU count)
                time.sleep(0.05)
            start, cpu0 = start + 1, cpu_s(node.pid)
            while len(read_metrics(metrics)) < start + a.rounds:
                time.sleep(0.05)
            cpu = cpu_s(node.pid) - cpu0
            rows = read_metrics(metrics)[start:start + a.rounds]
            updates = driver.execute_script("return document.body && document.body.dataset.updates") if page_open else None
            phases.append({"open": page_open, "wall_s": [r["wall_s"] for r in rows], "page_updates": updates,
                           "cpu_s_per_round": cpu / a.rounds})
            print(f"phase {i + 1}: page {'open  ' if page_open else 'closed'} median round "
                  f"{statistics.median(phases[-1]['wall_s']):.3f}s, node CPU {cpu / a.rounds:.3f}s a round "
                  f"({len(rows)} rounds, page updates {updates})", flush=True)
        driver.get("about:blank")
        serve_ms = []  # one poll as the page does it: /history since the last round, then /status
        for _ in range(50):
            t0 = time.perf_counter()
            for path in (f"/history?since={len(read_metrics(metrics))}", "/status"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    r.read()
            serve_ms.append((time.perf_counter() - t0) * 1000)
        full_ms = []  # the first poll of a freshly opened page: the whole history
        for _ in range(20):
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/history?since=0", timeout=5) as r:
                size = len(r.read())
            full_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        driver.quit()
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
    closed = [x for p in phases if not p["open"] for x in p["wall_s"]]
    opened = [x for p in phases if p["open"] for x in p["wall_s"]]
    res = {
        "rounds_closed": len(closed), "rounds_open": len(opened),
        "median_round_s_closed": round(statistics.median(closed), 4),
        "median_round_s_open": round(statistics.median(opened), 4),
        "mean_round_s_closed": round(statistics.mean(closed), 4), "mean_round_s_open": round(statistics.mean(opened), 4),
        "cpu_s_per_round_closed": round(statistics.mean(p["cpu_s_per_round"] for p in phases if not p["open"]), 4),
        "cpu_s_per_round_open": round(statistics.mean(p["cpu_s_per_round"] for p in phases if p["open"]), 4),
        "phases": [{"open": p["open"], "median_round_s": round(statistics.median(p["wall_s"]), 4),
                    "cpu_s_per_round": round(p["cpu_s_per_round"], 4), "page_updates": p["page_updates"]}
                   for p in phases],
        "poll_ms_median": round(statistics.median(serve_ms), 2), "poll_ms_p90": round(sorted(serve_ms)[44], 2),
        "full_history_ms_median": round(statistics.median(full_ms), 2), "full_history_bytes": size,
        "history_rounds": len(read_metrics(metrics)),
        "load": os.getloadavg(), "cpus": os.cpu_count(),
    }
    (out / "result.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
