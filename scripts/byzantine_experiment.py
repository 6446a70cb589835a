"""Does a 25% byzantine swarm hurt the honest nodes? The same local swarm (tiny model, same seeds) with and without
byzantine peers, compared on the honest nodes' held-out greedy accuracy.

    python scripts/byzantine_experiment.py --nodes 4 --byzantine 1 --rounds 150 --out runs/byz \
        [--mode false_rewards wrong_answers] [--eval-every 25] [--eval-size 200]

For each variant it starts a fresh swarm on loopback (fresh swarm name, fresh run directory under DIR/<variant>):
- "clean": N honest `swarm-node join` processes (--seed i, --threads 1, node 0 is everybody's bootstrap);
- "<mode>": the same first N-B honest processes (same seeds, same flags) + B `python -m tests.byzantine --mode <mode>`
  processes in place of the last B honest ones, each publishing `--byz-groups` groups every `1/--byz-rate` seconds
  (an honest tiny node shares 32 groups per ~1 s round).
Every honest node waits for N-1 peers before its first round (byzantine peers count: they are ordinary mesh peers),
runs --rounds rounds and evaluates held-out greedy accuracy every --eval-every rounds on --eval-size questions.

Compared: the honest nodes 0..N-B-1 (present in every variant, same seeds). Per node the mean of its last two held-out
evaluations; per variant the mean over those nodes. Pass: every byzantine variant within --tolerance (relative, 10%) of
the clean swarm. Writes DIR/results.json (everything) and DIR/results.md (the table).
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


def honest_cmd(i: int, d: Path, args: argparse.Namespace, swarm: str, p2p: int, status: int, boot: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "node.cli", "join", "--model", "tiny", "--swarm", swarm, "--rounds", str(args.rounds),
           "--seed", str(args.seed + i), "--threads", "1", "--listen", f"/ip4/127.0.0.1/tcp/{p2p}",
           "--status-port", str(status), "--identity", str(d / "identity.key"), "--checkpoint-dir", str(d / "ck"),
           "--metrics", str(d / "metrics.jsonl"), "--log-file", str(d / "node.log"),
           "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size),
           "--min-peers", str(args.nodes - 1), "--peer-wait-s", "120", "--checkpoint-every", str(args.rounds)]
    return cmd + (["--bootstrap", boot] if boot else [])


def run_variant(name: str, mode: str | None, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    d = out / name
    if d.exists():
        subprocess.run(["rm", "-rf", str(d)], check=True)
    d.mkdir(parents=True)
    swarm = f"byzx-{secrets.token_hex(3)}"
    n_honest = args.nodes - (args.byzantine if mode else 0)
    ports = free_ports(2 * args.nodes)
    procs: dict[str, subprocess.Popen] = {}
    logs = []
    idents = []
    for i in range(n_honest):
        (d / f"node-{i}").mkdir()
        idents.append(load_or_create_identity(d / f"node-{i}" / "identity.key")[0])
    boot = f"/ip4/127.0.0.1/tcp/{ports[0]}/p2p/{idents[0].peer_id}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    for i in range(n_honest):
        nd = d / f"node-{i}"
        f = open(nd / "stdout.log", "w")
        logs.append(f)
        procs[f"node-{i}"] = subprocess.Popen(honest_cmd(i, nd, args, swarm, ports[2 * i], ports[2 * i + 1],
                                                         None if i == 0 else boot),
                                              cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    byz_reports = []
    if mode:
        for j in range(args.byzantine):
            bd = d / f"byz-{j}"
            bd.mkdir()
            f = open(bd / "stdout.log", "w")
            logs.append(f)
            cmd = [sys.executable, "-m", "tests.byzantine", "--mode", mode, "--swarm", swarm, "--bootstrap", boot,
                   "--rate", str(args.byz_rate), "--groups", str(args.byz_groups), "--seed", str(args.seed + 100 + j),
                   "--json", str(bd / "report.json")]
            procs[f"byz-{j}"] = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    statuses: dict[str, dict] = {}
    deadline = time.time() + args.timeout
    try:
        while time.time() < deadline:
            honest_alive = [k for k, p in procs.items() if k.startswith("node-") and p.poll() is None]
            for i in range(n_honest):
                try:
                    statuses[f"node-{i}"] = fetch_status(ports[2 * i + 1], timeout=2)
                except ConnectionError:
                    pass
            if not honest_alive:
                break
            rounds = {k: s.get("round") for k, s in statuses.items()}
            print(f"[{name}] {time.time() - t0:6.0f}s rounds {rounds}", flush=True)
            time.sleep(10)
    finally:
        for k, p in procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for k, p in procs.items():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
    wall = time.time() - t0
    nodes = []
    for i in range(n_honest):
        rows = read_metrics(d / f"node-{i}" / "metrics.jsonl")
        evals = [[r["round"], r["heldout_acc"]] for r in rows if "heldout_acc" in r]
        last2 = [a for _, a in evals[-2:]]
        st = statuses.get(f"node-{i}", {})
        nodes.append({
            "node": i, "peer_id": idents[i].peer_id, "rounds": len(rows), "exit_code": procs[f"node-{i}"].returncode,
            "heldout_acc": evals, "final_acc": evals[-1][1] if evals else None,
            "acc_last2": sum(last2) / len(last2) if last2 else None,
            "reward_last20": (sum(r["reward_mean"] for r in rows[-20:]) / len(rows[-20:])) if rows else None,
            "external_groups_used": sum(r.get("n_external", 0) for r in rows),
            "external_candidates": sum(r.get("external_candidates", 0) for r in rows),
            "external_useful": sum(r.get("external_useful", 0) for r in rows),
            "received_from": st.get("received_from", {}), "rejections": st.get("rejections", {}),
            "banned": list(st.get("mesh", {}).get("banned", {})),
        })
    for j in range(args.byzantine if mode else 0):
        p = d / f"byz-{j}" / "report.json"
        byz_reports.append(json.loads(p.read_text()) if p.exists() else {"error": "no report"})
    for n in nodes:  # groups the honest node took into its pool from byzantine peers
        n["groups_from_byzantine"] = sum(n["received_from"].get(b.get("peer_id", ""), 0) for b in byz_reports)
    compared = args.nodes - args.byzantine  # the honest nodes present in every variant (same seeds)
    accs = [n["acc_last2"] for n in nodes[:compared] if n["acc_last2"] is not None]
    return {"name": name, "mode": mode, "swarm": swarm, "wall_s": round(wall, 1), "n_honest": n_honest,
            "nodes": nodes, "byzantine": byz_reports, "mean_acc": sum(accs) / len(accs) if accs else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--byzantine", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", nargs="+", default=["false_rewards", "wrong_answers"])
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--byz-rate", type=float, default=1.0, help="byzantine batches per second")
    ap.add_argument("--byz-groups", type=int, default=32, help="groups per byzantine batch")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    if not 0 < args.byzantine < args.nodes:
        ap.error("--byzantine must be between 1 and --nodes - 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    variants = [run_variant("clean", None, args, out)]
    for m in args.mode:
        variants.append(run_variant(m, m, args, out))
    clean = variants[0]["mean_acc"]
    for v in variants:
        v["rel_diff_vs_clean"] = None if (clean in (None, 0) or v["mean_acc"] is None) else (v["mean_acc"] - clean) / clean
        v["within_tolerance"] = v["rel_diff_vs_clean"] is not None and abs(v["rel_diff_vs_clean"]) <= args.tolerance \
            if v["mode"] else None
    ok = all(v["within_tolerance"] for v in variants[1:])
    result = {"args": vars(args), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "total_wall_s": round(time.time() - t0, 1), "pass": ok, "variants": variants}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(render(result))
    print(render(result))
    return 0 if ok else 1


def render(r: dict[str, Any]) -> str:
    a = r["args"]
    lines = [f"# Byzantine experiment: {a['nodes']} peers, {a['byzantine']} byzantine, {a['rounds']} rounds", "",
             f"`python {r['command']}` ({r['total_wall_s'] / 60:.1f} min wall)", "",
             "Held-out greedy accuracy of the honest nodes 0..N-B-1 (mean of each node's last two evaluations, "
             f"{a['eval_size']} questions every {a['eval_every']} rounds):", "",
             "| swarm | honest nodes | acc per compared node | mean acc | vs clean | groups from byzantine peer (per node) "
             "| external groups trained (per node) | byz msgs sent | honest rejections |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in r["variants"]:
        k = a["nodes"] - a["byzantine"]
        per = " / ".join("-" if n["acc_last2"] is None else f"{n['acc_last2']:.3f}" for n in v["nodes"][:k])
        if len(v["nodes"]) > k:
            per += " (node " + ", ".join(f"{n['node']}: {n['acc_last2']:.3f}" for n in v["nodes"][k:]
                                        if n["acc_last2"] is not None) + " not compared)"
        mean = "-" if v["mean_acc"] is None else f"{v['mean_acc']:.3f}"
        rel = "" if not v["mode"] or v["rel_diff_vs_clean"] is None else f"{100 * v['rel_diff_vs_clean']:+.1f}%"
        gb = " / ".join(str(n["groups_from_byzantine"]) for n in v["nodes"]) if v["mode"] else "-"
        ext = " / ".join(str(n["external_groups_used"]) for n in v["nodes"])
        sent = sum(b.get("messages", 0) for b in v["byzantine"]) if v["mode"] else "-"
        rej = {}
        for n in v["nodes"]:
            for k, c in n["rejections"].items():
                if c:
                    rej[k] = rej.get(k, 0) + c
        name = "clean (all honest)" if not v["mode"] else f"{v['n_honest']} honest + {a['byzantine']} `{v['mode']}`"
        lines.append(f"| {name} | {v['n_honest']} | {per} | {mean} | {rel} | {gb} | {ext} | {sent} | "
                     f"{', '.join(f'{k}={c}' for k, c in sorted(rej.items())) or 'none'} |")
    lines += ["", f"Pass (every byzantine variant within {100 * a['tolerance']:.0f}% of clean): **{r['pass']}**", ""]
    for v in r["variants"]:
        lines.append(f"- {v['name']}: held-out accuracy by round " + "; ".join(
            f"node {n['node']}: " + ", ".join(f"{rd + 1}:{acc:.2f}" for rd, acc in n["heldout_acc"]) for n in v["nodes"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
