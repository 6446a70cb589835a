"""Does the dashboard slow a node down? One tiny node (--threads 1) and one headless Chromium, in phases of --rounds
rounds that cycle through three modes, so drift in the machine's load falls on all of them:

  closed   the browser on about:blank
  page     the browser on the node's dashboard (it polls /history?since=N, then /status, every 2 s)
  polled   the browser on about:blank, and this script making the page's requests at the page's rate

"polled" is the node's own cost of serving the page; "page" adds the browser's rendering, which competes with the node
for the machine's cores. Per phase: the rounds' median wall time, the node's CPU seconds a round (all its threads) and
the browser's (chromedriver, chromium and its helpers). Then the cost of one poll, served.

Usage: .venv/bin/python scripts/bench_dashboard.py [--rounds 20] [--phases 12] [--out runs/bench_dashboard]
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
import threading
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


def tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and all its descendants now alive (the browser: chromedriver, chromium and its helpers)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    total = 0.0
    for pid in tree:
        try:
            total += cpu_s(pid)
        except (OSError, ValueError, IndexError):
            pass
    return total


def poll_like_the_page(port: int, stop: threading.Event) -> None:
    """The page's requests without the page: /history since the last round seen, then /status, every 2 s."""
    since = 0
    while not stop.wait(2.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/history?since={since}", timeout=5) as r:
            since = json.loads(r.read())["next"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
            r.read()


MODES = ("closed", "page", "polled")  # browser on about:blank / on the dashboard / about:blank + a script polling


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20, help="rounds per phase")
    ap.add_argument("--phases", type=int, default=12, help="phases in all (closed, page, polled, closed, ...)")
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
        while len(read_metrics(metrics)) < 3:  # warm-up rounds (first allocations) count in no phase
            if node.poll() is not None:
                raise SystemExit(f"node exited: {(out / 'stdout.log').read_text()[-2000:]}")
            time.sleep(0.5)
        for i in range(a.phases):
            mode = MODES[i % len(MODES)]
            driver.get(f"http://127.0.0.1:{port}/" if mode == "page" else "about:blank")
            stop = threading.Event()
            poller = threading.Thread(target=poll_like_the_page, args=(port, stop), daemon=True)
            if mode == "polled":
                poller.start()
            start = len(read_metrics(metrics))
            while len(read_metrics(metrics)) == start:  # a phase starts at a round boundary (for the CPU counts)
                time.sleep(0.05)
            start, cpu0, bcpu0 = start + 1, cpu_s(node.pid), tree_cpu_s(driver.service.process.pid)
            while len(read_metrics(metrics)) < start + a.rounds:
                time.sleep(0.05)
            cpu, bcpu = cpu_s(node.pid) - cpu0, tree_cpu_s(driver.service.process.pid) - bcpu0
            stop.set()
            rows = read_metrics(metrics)[start:start + a.rounds]
            updates = driver.execute_script("return document.body && document.body.dataset.updates") \
                if mode == "page" else None
            phases.append({"mode": mode, "wall_s": [r["wall_s"] for r in rows], "page_updates": updates,
                           "cpu_s_per_round": cpu / a.rounds, "browser_cpu_s_per_round": bcpu / a.rounds})
            print(f"phase {i + 1}: {mode:7s} median round {statistics.median(phases[-1]['wall_s']):.3f}s, node CPU "
                  f"{cpu / a.rounds:.3f}s a round, browser CPU {bcpu / a.rounds:.3f}s a round "
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
    res: dict = {}
    for mode in MODES:
        walls = [x for p in phases if p["mode"] == mode for x in p["wall_s"]]
        res[mode] = {"rounds": len(walls), "median_round_s": round(statistics.median(walls), 4),
                     "mean_round_s": round(statistics.mean(walls), 4),
                     "node_cpu_s_per_round": round(statistics.mean(p["cpu_s_per_round"] for p in phases
                                                                   if p["mode"] == mode), 4),
                     "browser_cpu_s_per_round": round(statistics.mean(p["browser_cpu_s_per_round"] for p in phases
                                                                      if p["mode"] == mode), 4)}
    res.update({
        "phases": [{"mode": p["mode"], "median_round_s": round(statistics.median(p["wall_s"]), 4),
                    "cpu_s_per_round": round(p["cpu_s_per_round"], 4),
                    "browser_cpu_s_per_round": round(p["browser_cpu_s_per_round"], 4), "page_updates": p["page_updates"]}
                   for p in phases],
        "poll_ms_median": round(statistics.median(serve_ms), 2), "poll_ms_p90": round(sorted(serve_ms)[44], 2),
        "full_history_ms_median": round(statistics.median(full_ms), 2), "full_history_bytes": size,
        "history_rounds": len(read_metrics(metrics)),
        "load": os.getloadavg(), "cpus": os.cpu_count(),
    })
    (out / "result.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
