"""`swarm-node simulate`: a local swarm of real node processes on loopback, one combined live table, and a summary.

Each node is a separate `swarm-node join` process with its own identity, ports, checkpoints and metrics file. Node 0
is the seed the others bootstrap to — a peer like the others, not a coordinator: once they have met, peer exchange
connects the rest directly.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from node.status import fetch_status


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def node_command(i: int, *, out: Path, swarm: str, model: str, rounds: int, local: int | None, external: int | None,
                 seed: int, p2p_port: int, status_port: int, bootstrap: str | None, eval_every: int,
                 extra: tuple[str, ...], n_nodes: int, isolated: bool = False) -> list[str]:
    d = out / f"node-{i}"
    cmd = [
        sys.executable, "-m", "node.cli", "join",
        "--model", model, "--swarm", swarm, "--rounds", str(rounds), "--seed", str(seed + i),
        "--listen", f"/ip4/127.0.0.1/tcp/{p2p_port}", "--status-port", str(status_port),
        "--identity", str(d / "identity.key"), "--checkpoint-dir", str(d / "checkpoints"),
        "--metrics", str(d / "metrics.jsonl"), "--log-file", str(d / "node.log"),
        "--threads", "1", "--eval-every", str(eval_every),
    ]
    if isolated:  # the same node with no mesh at all: what it would do alone
        cmd += ["--offline"]
    else:  # start together: a node that began alone would run ahead before the others had loaded
        cmd += ["--min-peers", str(n_nodes - 1), "--peer-wait-s", "120"]
    if local is not None:
        cmd += ["--local", str(local)]
    if external is not None:
        cmd += ["--external", str(external)]
    if bootstrap and not isolated:
        cmd += ["--bootstrap", bootstrap]
    return cmd + list(extra)


def wait_until_listening(proc: subprocess.Popen, port: int, stopping: Any, timeout_s: float = 60.0) -> bool:
    """Waits until the node's p2p port accepts TCP connections (its status server starts only after --min-peers
    are met, so it cannot tell us the seed is up). A bare connect-and-close costs the node one failed handshake."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and not stopping():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line cut by a kill
    return rows


def summarize(out: Path, n: int, statuses: dict[int, dict]) -> dict[str, Any]:
    nodes = []
    for i in range(n):
        rows = read_metrics(out / f"node-{i}" / "metrics.jsonl")
        rewards = [r["reward_mean"] for r in rows]
        st = statuses.get(i, {})
        nodes.append({
            "node": i,
            "peer_id": st.get("peer_id"),
            "rounds": len(rows),
            "final_reward": rewards[-1] if rewards else None,
            "mean_reward": sum(rewards) / len(rewards) if rewards else None,
            "mean_reward_first10": sum(rewards[:10]) / len(rewards[:10]) if rewards else None,
            "mean_reward_last10": sum(rewards[-10:]) / len(rewards[-10:]) if rewards else None,
            "external_groups_used": sum(r.get("n_external", 0) for r in rows),
            "groups_received": sum(r.get("rollouts_in", 0) for r in rows),
            "groups_shared": sum(r.get("rollouts_out", 0) for r in rows),
            "peers_seen": max((r.get("peers", 0) for r in rows), default=0),
            "rejections": st.get("rejections", {}),
            "heldout_acc": [[r["round"], r["heldout_acc"]] for r in rows if "heldout_acc" in r],
        })
    return {"nodes": nodes}


def plot_rewards(out: Path, n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i in range(n):
        rows = read_metrics(out / f"node-{i}" / "metrics.jsonl")
        if rows:
            xs = [r["round"] for r in rows]
            ys = [r["reward_mean"] for r in rows]
            k = 5  # a short moving average: single rounds are noisy
            smooth = [sum(ys[max(0, j - k + 1): j + 1]) / len(ys[max(0, j - k + 1): j + 1]) for j in range(len(ys))]
            ax.plot(xs, smooth, label=f"node {i}")
    ax.set_xlabel("round")
    ax.set_ylabel("mean reward of own rollouts (5-round average)")
    ax.set_title(f"swarm-node simulate: {n} nodes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(statuses: dict[int, dict], n: int, rounds: int) -> list[str]:
    lines = [f"{'node':>4} {'peer':>10} {'round':>9} {'reward':>7} {'last10':>7} {'peers':>5} {'in':>6} {'out':>6} {'rejected':>8}"]
    for i in range(n):
        s = statuses.get(i)
        if not s:
            lines.append(f"{i:>4} {'(starting)':>10}")
            continue
        hist = [r for _, r in s.get("reward_history", [])]
        last = (s.get("last_round") or {}).get("reward_mean", float("nan"))
        l10 = sum(hist[-10:]) / len(hist[-10:]) if hist else float("nan")
        tp = s.get("throughput", {})
        lines.append(
            f"{i:>4} {s['peer_id'][-10:]:>10} {s['round']:>4}/{rounds:<4} {last:>7.3f} {l10:>7.3f} {len(s.get('peers', [])):>5} "
            f"{tp.get('rollouts_in', 0):>6} {tp.get('rollouts_out', 0):>6} {sum(s.get('rejections', {}).values()):>8}"
        )
    return lines


def run_simulation(*, nodes: int, rounds: int, model: str, local_: int | None, external: int | None, out: str,
                   swarm: str, seed: int, base_port: int, eval_every: int, extra: tuple[str, ...],
                   compare_isolated: bool = False, isolated: bool = False) -> int:
    """Starts the nodes, shows them live, writes summary.json and rewards.png; with compare_isolated, runs the same
    nodes (same seeds and flags) first isolated, then together, and writes compare.json / compare.png."""
    if compare_isolated:
        return run_compare(nodes=nodes, rounds=rounds, model=model, local_=local_, external=external, out=out,
                           swarm=swarm, seed=seed, base_port=base_port, eval_every=eval_every, extra=extra)
    from protocol.identity import load_or_create_identity

    models = [m.strip() for m in model.split(",") if m.strip()] or ["tiny"]  # node i runs models[i % len(models)]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    swarm = swarm or f"sim-{secrets.token_hex(3)}"
    ports = list(range(base_port, base_port + 2 * nodes)) if base_port else free_ports(2 * nodes)
    p2p, status_ports = ports[:nodes], ports[nodes:]
    idents = []
    for i in range(nodes):
        d = out_dir / f"node-{i}"
        d.mkdir(exist_ok=True)
        for f in ("metrics.jsonl",):  # a fresh run: old metrics would mix into the summary
            (d / f).unlink(missing_ok=True)
        idents.append(load_or_create_identity(d / "identity.key")[0])
    seed_addr = f"/ip4/127.0.0.1/tcp/{p2p[0]}/p2p/{idents[0].peer_id}"
    tty = sys.stdout.isatty()
    ij = f"{local_ if local_ is not None else 'default'}/{external if external is not None else 'default'}"
    print(f"simulate: {nodes} {'isolated ' if isolated else ''}nodes, swarm '{swarm}', {rounds} rounds, I/J = {ij}, "
          f"out {out_dir}")
    if not isolated:
        print(f"seed node: {seed_addr}")
    for i in range(nodes):  # each node's live page (node/status.py): curves, peers, rejections
        print(f"node {i} dashboard: http://127.0.0.1:{status_ports[i]}/")

    procs: list[subprocess.Popen] = []
    logs = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    old_int, old_term = signal.signal(signal.SIGINT, stop), signal.signal(signal.SIGTERM, stop)
    statuses: dict[int, dict] = {}
    try:
        for i in range(nodes):
            cmd = node_command(i, out=out_dir, swarm=swarm, model=models[i % len(models)], rounds=rounds, local=local_,
                               external=external,
                               seed=seed, p2p_port=p2p[i], status_port=status_ports[i],
                               bootstrap=None if i == 0 else seed_addr, eval_every=eval_every, extra=extra,
                               n_nodes=nodes, isolated=isolated)
            log = open(out_dir / f"node-{i}" / "stdout.log", "w")
            logs.append(log)
            # Each node gets its own process group so a Ctrl-C in this terminal reaches only us; we stop them in order.
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            if i == 0 and not isolated:  # let the seed listen before the others dial it (they would retry anyway)
                wait_until_listening(procs[0], p2p[0], lambda: stopping)
        drawn, last_print = 0, 0.0
        while not stopping and any(p.poll() is None for p in procs):
            for i in range(nodes):
                if procs[i].poll() is None:
                    try:
                        statuses[i] = fetch_status(status_ports[i], timeout=0.5)
                    except ConnectionError:
                        pass
            lines = table(statuses, nodes, rounds)
            if tty:
                sys.stdout.write((f"\x1b[{drawn}F" if drawn else "") + "".join(f"\x1b[2K{l}\n" for l in lines))
                sys.stdout.flush()
                drawn = len(lines)
            elif time.monotonic() - last_print > 10:
                print("\n".join(lines), flush=True)
                last_print = time.monotonic()
            time.sleep(1.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # nodes checkpoint, then exit 0
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)

    summary = summarize(out_dir, nodes, statuses)
    summary.update({"swarm": swarm, "rounds": rounds, "local": local_, "external": external, "model": model,
                    "node_models": [models[i % len(models)] for i in range(nodes)],
                    "exit_codes": [p.returncode for p in procs], "stopped_early": stopping})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_rewards(out_dir, nodes, out_dir / "rewards.png")
    print("\n".join(table(statuses, nodes, rounds)))
    for nd in summary["nodes"]:
        mr = nd["mean_reward"]
        print(f"node {nd['node']}: {nd['rounds']} rounds, mean reward {mr if mr is None else round(mr, 3)}, "
              f"external groups used {nd['external_groups_used']}, peers seen {nd['peers_seen']}")
    print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'rewards.png'}")
    bad = [i for i, p in enumerate(procs) if p.returncode not in (0, -signal.SIGTERM)]
    if bad:
        print(f"nodes {bad} exited with errors: see {out_dir}/node-N/stdout.log", file=sys.stderr)
    return 1 if bad else 0


def compare_stats(out: Path, n: int) -> dict[str, Any]:
    """Per run: cumulative own reward (sum over nodes and rounds), mean final held-out, per-round node means."""
    rows = [read_metrics(out / f"node-{i}" / "metrics.jsonl") for i in range(n)]
    rounds = max((len(r) for r in rows), default=0)
    finals = [next((x["heldout_acc"] for x in reversed(r) if "heldout_acc" in x), None) for r in rows]
    finals = [f for f in finals if f is not None]
    ho_rounds = sorted({x["round"] for r in rows for x in r if "heldout_acc" in x})
    return {
        "cumulative_reward": sum(x["reward_mean"] for r in rows for x in r),
        "final_heldout": sum(finals) / len(finals) if finals else None,
        "completions_generated": sum(x.get("generated", 0) for r in rows for x in r),
        "rounds_done": [len(r) for r in rows],
        "reward_per_round": [sum(r[t]["reward_mean"] for r in rows if len(r) > t) / max(1, sum(len(r) > t for r in rows))
                             for t in range(rounds)],
        "heldout_curve": [[t + 1, sum(x["heldout_acc"] for r in rows for x in r if x["round"] == t and "heldout_acc" in x)
                           / max(1, sum(1 for r in rows for x in r if x["round"] == t and "heldout_acc" in x))]
                          for t in ho_rounds],
    }


def run_compare(*, nodes: int, rounds: int, model: str, local_: int | None, external: int | None, out: str, swarm: str,
                seed: int, base_port: int, eval_every: int, extra: tuple[str, ...]) -> int:
    """The same nodes isolated, then together; the ratios say whether joining paid (swarm over isolated)."""
    out_dir = Path(out)
    eval_every = eval_every or max(1, rounds // 5)  # the held-out ratio needs evaluations
    common = dict(nodes=nodes, rounds=rounds, model=model, local_=local_, external=external, seed=seed,
                  base_port=base_port, eval_every=eval_every, extra=extra)
    rc_iso = run_simulation(out=str(out_dir / "isolated"), swarm=swarm, isolated=True, **common)
    rc_sw = run_simulation(out=str(out_dir / "swarm"), swarm=swarm, **common)
    iso, sw = compare_stats(out_dir / "isolated", nodes), compare_stats(out_dir / "swarm", nodes)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    doc = {"nodes": nodes, "rounds": rounds, "model": model, "local": local_, "external": external, "seed": seed,
           "extra": list(extra), "eval_every": eval_every,
           "reward_ratio": ratio(sw["cumulative_reward"], iso["cumulative_reward"]),
           "heldout_ratio": ratio(sw["final_heldout"], iso["final_heldout"]),
           "compute_ratio": ratio(sw["completions_generated"], iso["completions_generated"]),
           "isolated": iso, "swarm": sw, "exit_codes": {"isolated": rc_iso, "swarm": rc_sw}}
    (out_dir / "compare.json").write_text(json.dumps(doc, indent=2))
    plot_compare(doc, out_dir / "compare.png")

    def show(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    print(f"swarm vs the same {nodes} nodes isolated, {rounds} rounds: cumulative reward {show(doc['reward_ratio'])}, "
          f"final held-out {show(doc['heldout_ratio'])}, completions generated {show(doc['compute_ratio'])}")
    print(f"wrote {out_dir / 'compare.json'} and {out_dir / 'compare.png'}")
    return rc_iso or rc_sw


def plot_compare(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, color in (("isolated", "tab:grey"), ("swarm", "tab:blue")):
        st = doc[name]
        ys = st["reward_per_round"]
        k = 5
        smooth = [sum(ys[max(0, j - k + 1): j + 1]) / len(ys[max(0, j - k + 1): j + 1]) for j in range(len(ys))]
        ax1.plot(range(1, len(ys) + 1), smooth, color=color, label=name)
        ax1.plot(range(1, len(ys) + 1), ys, color=color, alpha=0.2, lw=0.8)
        cv = st["heldout_curve"]
        ax2.plot([t for t, _ in cv], [a for _, a in cv], marker="o", ms=3, color=color, label=name)

    def show(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    ax1.set(xlabel="round", ylabel="mean reward of own rollouts (nodes; 5-round avg)",
            title=f"cumulative reward: swarm {show(doc['reward_ratio'])} of isolated")
    ax2.set(xlabel="rounds trained", ylabel="held-out greedy accuracy (mean over nodes)",
            title=f"final held-out: swarm {show(doc['heldout_ratio'])} of isolated")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{doc['nodes']} nodes ({doc['model']}), the same seeds and flags, isolated vs together")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
