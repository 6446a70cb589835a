"""Soak test: N tiny nodes (real `swarm-node join` processes on loopback) for M minutes; do they leak or die?

    python scripts/soak.py --nodes 8 --minutes 30 [--out DIR] [--interval 10]
    python scripts/soak.py --nodes 1 --model runs/models/qwen05-random --signal --rounds 40 --fit-last 0.667 \
        --extra=--questions-per-round=2 --extra=--group-size=4 ...      # the real-model path (docs/soak.md)

Node 0 is the bootstrap the others dial; every node runs unlimited rounds with --threads 1 and a status port. Every
~10 s the script samples each node's resident memory (VmRSS in /proc/<pid>/status) and open file descriptors (entries
of /proc/<pid>/fd), and its round from the status port. At the end it stops them with SIGTERM (each must checkpoint and
exit 0), prints one row per node (start/end/max RSS and fds, their slopes per 10 min fitted over the second half,
rounds done, how it ended) and writes DIR/soak.json (summary and every sample).

Exit 1 when a node died, a node did not exit 0 on SIGTERM, or a node's RSS grew more than --max-growth (10%) over the
second half (by the fitted line; the first half is warm-up: allocator pools, torch caches, peers arriving).
--fit-last sets that window's share of the run (0.5: the second half). --rounds N gives each node --rounds N: the soak
ends when all have finished (exit 0 there is not a death) or at --minutes. Per round, the summary also keeps the
largest and smallest RSS sampled while the node was in that round (its peak and the floor it returns to), their
fitted slopes per round over the window and max - min there.
--signal runs each node through scripts/soak_node.py (`join` with every group's rewards alternating 1/0), so a model
with random weights trains every round. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.simulate import free_ports, read_metrics  # noqa: E402
from node.status import fetch_status  # noqa: E402
from protocol.identity import load_or_create_identity  # noqa: E402


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares line through (t, y): (slope per second, value at the first t); None for fewer than 2 points."""
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    slope = sum((t - mt) * (y - my) for t, y in points) / var
    return slope, my + slope * (points[0][0] - mt)


def node_summary(i: int, samples: list[dict], duration: float, rounds: int, died: bool, rc: int | None,
                 fit_last: float = 0.5) -> dict[str, Any]:
    mine = [s for s in samples if s["node"] == i and s["rss_kb"] is not None]
    second = [s for s in mine if s["t"] >= duration * (1 - fit_last)]
    out: dict[str, Any] = {"node": i, "rounds": rounds, "died": died, "exit_code": rc, "samples": len(mine)}
    for key, unit in (("rss_kb", 1024.0), ("fds", 1.0)):
        vals = [s[key] for s in mine if s[key] is not None]
        name = "rss_mb" if key == "rss_kb" else "fds"
        out[f"{name}_start"] = round(vals[0] / unit, 1) if vals else None
        out[f"{name}_end"] = round(vals[-1] / unit, 1) if vals else None
        out[f"{name}_max"] = round(max(vals) / unit, 1) if vals else None
        line = fit([(s["t"], s[key] / unit) for s in second if s[key] is not None])
        out[f"{name}_slope_per_10min"] = round(line[0] * 600, 2) if line else None
        if key == "rss_kb":
            # growth over the second half by the fitted line, relative to its value where the half begins
            if line and line[1] > 0:
                span = second[-1]["t"] - second[0]["t"]
                out["rss_growth_second_half"] = round(line[0] * span / line[1], 4)
            else:
                out["rss_growth_second_half"] = None
            out["rss_mb_window_min"] = round(min(s[key] for s in second) / unit, 1) if second else None
            out["rss_mb_window_max"] = round(max(s[key] for s in second) / unit, 1) if second else None
    out.update(per_round(mine, fit_last))
    return out


def per_round(mine: list[dict], fit_last: float) -> dict[str, Any]:
    """RSS by round: the largest sample while the node's status said that round (the peak of its phases) and the
    smallest (the floor it returns to), lines fitted through both over the last fit_last of the rounds seen (MB per
    round) and max - min of each there."""
    peak: dict[int, float] = {}
    floor: dict[int, float] = {}
    for s in mine:
        if s.get("round") is not None:
            mb = s["rss_kb"] / 1024
            peak[s["round"]] = max(peak.get(s["round"], 0.0), mb)
            floor[s["round"]] = min(floor.get(s["round"], mb), mb)
    rounds = sorted(peak)
    window = rounds[int(len(rounds) * (1 - fit_last)):]
    out: dict[str, Any] = {"round_window": [window[0], window[-1]] if window else None}
    for name, by_round in (("", peak), ("_floor", floor)):
        line = fit([(r, by_round[r]) for r in window])
        vals = [by_round[r] for r in window]
        out[f"rss_mb{name}_by_round"] = {str(r): round(by_round[r], 1) for r in rounds}
        out[f"rss_mb{name}_slope_per_round"] = round(line[0], 3) if line else None
        out[f"rss_mb{name}_round_window_spread"] = round(max(vals) - min(vals), 1) if vals else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--max-growth", type=float, default=0.10, help="largest RSS growth over the second half")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--extra", action="append", default=[], help="extra flag for every node, e.g. --extra=--seed=3")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per node (0: until --minutes are up)")
    ap.add_argument("--fit-last", type=float, default=0.5, help="share of the run the growth is fitted over")
    ap.add_argument("--signal", action="store_true",
                    help="rewards alternate 1/0 after scoring (scripts/soak_node.py): random weights train too")
    args = ap.parse_args()

    out = Path(args.out or f"runs/soak-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    n = args.nodes
    swarm = f"soak-{secrets.token_hex(3)}"
    ports = free_ports(2 * n)
    p2p, status_ports = ports[:n], ports[n:]
    idents = []
    for i in range(n):
        d = out / f"node-{i}"
        d.mkdir(exist_ok=True)
        (d / "metrics.jsonl").unlink(missing_ok=True)
        idents.append(load_or_create_identity(d / "identity.key")[0])
    seed_addr = f"/ip4/127.0.0.1/tcp/{p2p[0]}/p2p/{idents[0].peer_id}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SWARM_NODE_HOME": str(out / "home")}

    def command(i: int) -> list[str]:
        d = out / f"node-{i}"
        entry = [str(ROOT / "scripts" / "soak_node.py")] if args.signal else ["-m", "node.cli"]
        cmd = [sys.executable, *entry, "join", "--model", args.model, "--swarm", swarm, "--rounds", str(args.rounds),
               "--seed", str(i), "--threads", "1", "--listen", f"/ip4/127.0.0.1/tcp/{p2p[i]}",
               "--status-port", str(status_ports[i]), "--identity", str(d / "identity.key"),
               "--checkpoint-dir", str(d / "checkpoints"), "--metrics", str(d / "metrics.jsonl"),
               "--log-file", str(d / "node.log")]
        if i > 0:
            cmd += ["--bootstrap", seed_addr]
        return cmd + list(args.extra)

    print(f"soak: {n} nodes, {args.minutes} min, swarm '{swarm}', out {out}", flush=True)
    stopping = False

    def on_signal(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    procs: list[subprocess.Popen] = []
    logs = []
    samples: list[dict[str, Any]] = []
    died_at: dict[int, float] = {}
    finished: set[int] = set()  # exited 0 after their --rounds
    t0 = time.monotonic()
    duration = args.minutes * 60
    try:
        for i in range(n):
            log = open(out / f"node-{i}" / "stdout.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(command(i), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            if i == 0:  # let the bootstrap node listen first (the others would retry anyway)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and procs[0].poll() is None:
                    try:
                        fetch_status(status_ports[0], timeout=0.5)
                        break
                    except ConnectionError:
                        time.sleep(0.5)
        t0 = time.monotonic()  # the clock starts once every node is launched
        next_sample = t0
        while not stopping and time.monotonic() - t0 < duration:
            now = time.monotonic()
            if now < next_sample:
                time.sleep(min(1.0, next_sample - now))
                continue
            next_sample += args.interval
            t = round(now - t0, 1)
            row = []
            for i, p in enumerate(procs):
                alive = p.poll() is None
                if not alive and args.rounds and p.returncode == 0 and i not in finished:
                    finished.add(i)
                    print(f"node {i} finished its {args.rounds} rounds at {t:.0f}s", flush=True)
                if not alive and i not in died_at and i not in finished:
                    died_at[i] = t
                    print(f"node {i} DIED at {t:.0f}s (rc={p.returncode}); see {out}/node-{i}/stdout.log", flush=True)
                rnd = None
                if alive:
                    try:
                        rnd = fetch_status(status_ports[i], timeout=2.0).get("round")
                    except ConnectionError:
                        pass
                s = {"t": t, "node": i, "alive": alive, "rss_kb": rss_kb(p.pid) if alive else None,
                     "fds": fd_count(p.pid) if alive else None, "round": rnd}
                samples.append(s)
                row.append(s)
            rss = [s["rss_kb"] / 1024 for s in row if s["rss_kb"]]
            fds = [s["fds"] for s in row if s["fds"] is not None]
            rounds = [s["round"] if s["round"] is not None else "-" for s in row]
            print(f"[{t:6.0f}s] alive {sum(s['alive'] for s in row)}/{n}  rss MB {min(rss, default=0):.0f}-"
                  f"{max(rss, default=0):.0f}  fds {min(fds, default=0)}-{max(fds, default=0)}  rounds {rounds}",
                  flush=True)
            if len(finished) == n:
                break
    finally:
        elapsed = time.monotonic() - t0
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # finish the step, checkpoint, exit 0
            elif i not in died_at and i not in finished:
                died_at[i] = round(time.monotonic() - t0, 1)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()

    nodes = [node_summary(i, samples, elapsed, len(read_metrics(out / f"node-{i}" / "metrics.jsonl")),
                          i in died_at, procs[i].returncode, args.fit_last) for i in range(n)]
    grew = [nd["node"] for nd in nodes if (nd["rss_growth_second_half"] or 0) > args.max_growth]
    bad_exit = [nd["node"] for nd in nodes if nd["exit_code"] != 0]
    died = sorted(died_at)
    ok = not (grew or bad_exit or died)

    hdr = (f"{'node':>4} {'rss start':>9} {'end':>6} {'max':>6} {'MB/10min':>8} {'growth':>7} {'MB/round':>8} "
           f"{'spread':>6} {'floor/round':>11} {'spread':>6} "
           f"{'fds start':>9} {'end':>4} {'max':>4} {'fd/10min':>8} {'rounds':>6}  ended")
    print(hdr)
    for nd in nodes:
        g = nd["rss_growth_second_half"]
        ended = f"died at {died_at[nd['node']]:.0f}s" if nd["died"] else f"rc={nd['exit_code']}"
        print(f"{nd['node']:>4} {nd['rss_mb_start'] or 0:>9.1f} {nd['rss_mb_end'] or 0:>6.1f} {nd['rss_mb_max'] or 0:>6.1f} "
              f"{_num(nd['rss_mb_slope_per_10min']):>8} {_pct(g):>7} {_num(nd['rss_mb_slope_per_round']):>8} "
              f"{_num(nd['rss_mb_round_window_spread']):>6} {_num(nd['rss_mb_floor_slope_per_round']):>11} "
              f"{_num(nd['rss_mb_floor_round_window_spread']):>6} {_num(nd['fds_start']):>9} {_num(nd['fds_end']):>4} "
              f"{_num(nd['fds_max']):>4} {_num(nd['fds_slope_per_10min']):>8} {nd['rounds']:>6}  {ended}")
    verdict = "OK" if ok else (f"FAIL: died {died} " if died else "FAIL: ") + \
        (f"non-zero exit {bad_exit} " if bad_exit else "") + (f"RSS grew >{args.max_growth:.0%} {grew}" if grew else "")
    print(verdict)
    report = {"nodes_n": n, "minutes": args.minutes, "elapsed_s": round(elapsed, 1), "swarm": swarm,
              "interval_s": args.interval, "max_growth": args.max_growth, "fit_last": args.fit_last,
              "model": args.model, "rounds": args.rounds, "signal": args.signal, "extra": args.extra, "ok": ok, "died": died,
              "non_zero_exit": bad_exit, "rss_grew": grew, "nodes": nodes, "samples": samples}
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'soak.json'}")
    return 0 if ok else 1


def _num(x: float | None) -> str:
    return "-" if x is None else (f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


if __name__ == "__main__":
    sys.exit(main())
