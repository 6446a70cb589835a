#!/usr/bin/env python3
"""Does sharing pay? The SAPO paper's local/external sweep, run on a real local swarm of embedded models.

    python scripts/sapo_experiment.py --regime easy --configs 8/0,6/2,4/4,2/6 --seeds 3 --first-seed 0 \
        --rounds 25 --out runs/sapo

For every seed and every config "a/b" this starts the same swarm — N real `swarm-node join` processes on loopback
(node.simulate's machinery: node 0 is the seed the others bootstrap to, --min-peers N-1 so they start together,
--threads 1 each, a fresh swarm name per run) — and reads each node's metrics JSONL. Only the I/J flags change
between configs: in "8/0" the nodes are still the same processes in the same mesh, sharing their rollouts, they just
train on none of their peers' (J = 0). Node i of seed s runs with --seed 1000*s + i in every config.

Regimes (--regime): "easy" is the embedded tiny model on 2-digit addition (today's demo); "sparse" is the
tiny-sparse model on four task families, whose own groups are mostly zero-advantage at the start (the regime of the
paper, see docs/sapo_experiment.md). Protocols (--protocol), with the paper's a/b scaled by K (--scale, default 4):
  paper (default): the paper's protocol. A node generates a*K questions (one group of 8 completions each), shares
         them all, trains on all its a*K own groups unfiltered plus b*K peers' groups sampled after dropping
         zero-advantage ones: --questions-per-round a*K --local a*K --external b*K. So 4/4 generates half of what
         8/0 generates and trains on as many groups.
  fixed: the mapping of the first experiment: every config generates (a+b)*K questions and trains on a*K own
         groups with signal + b*K peers' (own groups fill in when peers are short).

A config may carry a variant, "4/4@recv", whose node flags come from --variant recv='--flag value ...'.

Writes DIR/results.json (top-level "configs": per config cumulative_reward, final_heldout, rounds_to_target,
completions_generated, ... as mean and sd over seeds; plus per run and per node rounds), DIR/results.md (the
paper-style table) and DIR/curves.png. --report-only rebuilds the three files from the runs already in DIR.
Extra node flags go after `--`, e.g. `-- --max-staleness-s 60` (applied to every node of every config).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.simulate import read_metrics, run_simulation  # noqa: E402

KEEP = ("round", "reward_mean", "train_reward_mean", "generated", "n_local", "n_external", "external_candidates",
        "external_useful", "frac_zero_std", "rollouts_in", "peers", "wall_s", "heldout_acc")
BASELINE = "8/0"
PROTOCOLS = ("paper", "fixed")

# What each regime runs: the model every node loads and the node flags that make the regime (before any extra flags).
REGIMES: dict[str, dict[str, Any]] = {
    "easy": {"model": "tiny", "flags": (), "about": "the embedded tiny model on 2-digit addition (arith)"},
    "sparse": {"model": "tiny-sparse", "flags": (), "about": "the embedded tiny-sparse model on four task families "
               "(its MODEL_DEFAULTS: tasks, task configs, lengths)"},
    "cold": {"model": "tiny-cold", "flags": (), "about": "the embedded tiny-cold model on the same four families: "
             "tiny-sparse's build with 3% of its warm-start targets in the rewarded format, so a lone node's groups "
             "start almost all zero-advantage"},
}


Config = tuple[int, int, str]  # local a, external b, variant label ("" = none)


def parse_configs(spec: str) -> list[Config]:
    out = []
    for part in spec.split(","):
        ab, _, label = part.strip().partition("@")
        a, _, b = ab.partition("/")
        if not a.isdigit() or not b.isdigit() or int(a) + int(b) == 0:
            raise SystemExit(f"bad config {part!r}: expected local/external such as 4/4 (or 4/4@variant)")
        out.append((int(a), int(b), label))
    return out


def cname(c: Config) -> str:
    return f"{c[0]}/{c[1]}" + (f"@{c[2]}" if c[2] else "")


def protocol_flags(c: Config, scale: int, protocol: str) -> dict[str, int]:
    """The I/J node settings of config a/b under a protocol (module doc); the tests pin this mapping."""
    a, b, k = c[0], c[1], scale
    if protocol == "paper":
        return {"questions_per_round": a * k, "local": a * k, "external": b * k}
    if protocol == "fixed":
        return {"questions_per_round": (a + b) * k, "local": a * k, "external": b * k}
    raise SystemExit(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for v in specs:
        label, sep, flags = v.partition("=")
        if not sep or not label.strip():
            raise SystemExit(f"bad --variant {v!r}: expected LABEL='--flag value ...'")
        out[label.strip()] = shlex.split(flags)
    return out


def git_state() -> str:
    """The commit the nodes ran, and whether the tree had uncommitted changes (others edit it too)."""
    import subprocess

    snap = ROOT / "SNAPSHOT"  # a `git archive` copy that experiments run from, so edits in progress can't reach them
    if snap.exists():
        return snap.read_text().strip()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (uncommitted changes)" if dirty else "")


def load_line() -> str:
    """The machine's load, as `uptime` prints it (other work shares these cores)."""
    with contextlib.suppress(OSError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return "load average: unknown"


def node_models(args: argparse.Namespace) -> list[str]:
    models = [m.strip() for m in (args.models or REGIMES[args.regime]["model"]).split(",") if m.strip()]
    return [models[i % len(models)] for i in range(args.nodes)]


def run_dir(out: Path, c: Config, seed: int) -> Path:
    return out / "runs" / (f"{c[0]}-{c[1]}" + (f"@{c[2]}" if c[2] else "") + f"_seed{seed}")


def node_flags(args: argparse.Namespace, c: Config, node_args: list[str], variants: dict[str, list[str]]) -> list[str]:
    """Every flag a node of config c gets beyond simulate's own: regime, protocol, evaluation, variant, extras."""
    ij = protocol_flags(c, args.scale, args.protocol)
    if c[2] and c[2] not in variants:
        raise SystemExit(f"config {cname(c)} names variant {c[2]!r}, but no --variant {c[2]}=... was given")
    return [*REGIMES[args.regime]["flags"], "--questions-per-round", str(ij["questions_per_round"]),
            "--eval-size", str(args.eval_size), "--checkpoint-every", str(max(1, args.rounds)),
            "--keep-checkpoints", "1", *variants.get(c[2], []), *node_args]


def run_one(args: argparse.Namespace, c: Config, seed: int, node_args: list[str],
            variants: dict[str, list[str]]) -> dict[str, Any]:
    d = run_dir(Path(args.out), c, seed)
    if d.exists():
        shutil.rmtree(d)  # a fresh run: no old metrics, identities or checkpoints
    d.mkdir(parents=True)
    ij = protocol_flags(c, args.scale, args.protocol)
    swarm = f"sapo-{c[0]}-{c[1]}-s{seed}-{secrets.token_hex(3)}"
    extra = tuple(node_flags(args, c, node_args, variants))
    load_before = load_line()
    t0 = time.time()
    with open(d / "simulate.log", "w") as log, contextlib.redirect_stdout(log):
        rc = run_simulation(nodes=args.nodes, rounds=args.rounds, model=",".join(node_models(args)),
                            local_=ij["local"], external=ij["external"], out=str(d), swarm=swarm, seed=1000 * seed,
                            base_port=0, eval_every=args.eval_every, extra=extra)
    wall = time.time() - t0
    for i in range(args.nodes):  # checkpoints are not part of the result and cost ~12 MB per node
        shutil.rmtree(d / f"node-{i}" / "checkpoints", ignore_errors=True)
    meta = {"config": cname(c), "seed": seed, "swarm": swarm, "rc": rc, "wall_s": round(wall, 1),
            "protocol": args.protocol, "regime": args.regime, "node_models": node_models(args), **ij,
            "node_flags": list(extra), "node_seeds": [1000 * seed + i for i in range(args.nodes)],
            "load_before": load_before, "load_after": load_line(), "git": git_state()}
    (d / "run.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_run(out: Path, c: Config, seed: int, n_nodes: int) -> dict[str, Any] | None:
    d = run_dir(out, c, seed)
    if not (d / "run.json").exists():
        return None
    meta = json.loads((d / "run.json").read_text())
    nodes = []
    for i in range(n_nodes):
        rows = read_metrics(d / f"node-{i}" / "metrics.jsonl")
        nodes.append([{k: r[k] for k in KEEP if k in r} for r in rows])
    return {**meta, "nodes": nodes}


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _sd(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else None


def run_stats(run: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Per run: cumulative reward, per-round node-mean reward, node-mean held-out curve, final held-out accuracy."""
    nodes = run["nodes"]
    cum = sum(r["reward_mean"] for rows in nodes for r in rows)
    cum_batch = sum(r.get("train_reward_mean", 0.0) for rows in nodes for r in rows)
    per_round = [_mean([rows[t]["reward_mean"] for rows in nodes if len(rows) > t]) for t in range(rounds)]
    ho_rounds = sorted({r["round"] for rows in nodes for r in rows if "heldout_acc" in r})
    ho = [[t + 1, _mean([r["heldout_acc"] for rows in nodes for r in rows if r["round"] == t and "heldout_acc" in r])]
          for t in ho_rounds]
    finals = [next((r["heldout_acc"] for r in reversed(rows) if "heldout_acc" in r), None) for rows in nodes]
    n_ext = sum(r.get("n_external", 0) for rows in nodes for r in rows)
    n_loc = sum(r.get("n_local", 0) for rows in nodes for r in rows)
    # compute: completions sampled (metrics "generated"; older runs: questions per round x 8)
    fallback = 8 * run.get("questions_per_round", 0)
    generated = sum(r.get("generated", fallback) for rows in nodes for r in rows)
    # groups with signal trained per round: own ones (own groups with signal, all of them fit in the paper's
    # protocol) + peers' (always with signal); the learning signal a node actually got
    n_rows = max(1, sum(len(rows) for rows in nodes))
    signal = sum((1 - r.get("frac_zero_std", 0.0)) * (r.get("generated", fallback) / 8) if r.get("n_local", 0) >=
                 r.get("generated", fallback) / 8 else r.get("n_local", 0) for rows in nodes for r in rows)
    signal += n_ext
    ys = [y for y in per_round if y is not None]
    xbar, ybar = (len(ys) - 1) / 2, sum(ys) / max(1, len(ys))
    slope = (sum((i - xbar) * (y - ybar) for i, y in enumerate(ys)) / sum((i - xbar) ** 2 for i in range(len(ys)))
             if len(ys) > 1 else None)
    return {
        "rounds_done": [len(rows) for rows in nodes],
        "cumulative_reward": cum,
        "cumulative_batch_reward": cum_batch,
        "reward_per_round": per_round,
        "heldout_curve": ho,  # [rounds trained, mean over nodes]
        "final_heldout": _mean(finals),
        "final_heldout_per_node": finals,
        "external_share": n_ext / max(1, n_ext + n_loc),
        "groups_trained_per_round": (n_ext + n_loc) / max(1, sum(len(rows) for rows in nodes)),
        "completions_generated": generated,  # summed over nodes and rounds
        "signal_groups_per_round": signal / n_rows,
        "reward_slope": slope,  # least-squares slope of the node-mean own reward per round
        "completions_generated_per_node_round": generated / max(1, sum(len(rows) for rows in nodes)),
        "frac_zero_std": _mean([r.get("frac_zero_std") for rows in nodes for r in rows]),
        "wall_s": run.get("wall_s"),
        "rc": run.get("rc"),
    }


def first_reach(curve: list[list[float]], target: float | None) -> int | None:
    if target is None:
        return None
    return next((t for t, acc in curve if acc is not None and acc >= target - 1e-9), None)


def aggregate(args: argparse.Namespace, configs: list[Config], seeds: list[int],
              subset: list[int] | None = None) -> dict[str, Any]:
    """Per-config summary over all nodes, or over the nodes in `subset` (e.g. the ones running one model)."""
    out = Path(args.out)
    per: dict[str, dict[int, dict[str, Any]]] = {}
    raw: dict[str, dict[int, Any]] = {}
    for c in configs:
        for s in seeds:
            run = load_run(out, c, s, args.nodes)
            if run is None:
                continue
            if subset is not None:
                run = {**run, "nodes": [run["nodes"][i] for i in subset]}
            raw.setdefault(cname(c), {})[s] = run
            per.setdefault(cname(c), {})[s] = run_stats(run, args.rounds)
    base = per.get(args.baseline, {})
    summary: dict[str, Any] = {}
    # the target: the 8/0 config's final held-out accuracy (mean over nodes, then over seeds)
    target = _mean([st["final_heldout"] for st in base.values()])
    for name, runs in per.items():
        cums = [st["cumulative_reward"] for st in runs.values()]
        finals = [st["final_heldout"] for st in runs.values()]
        # the mean held-out curve over seeds (evaluations happen at the same rounds in every run)
        by_t: dict[int, list[float]] = {}
        for st in runs.values():
            for t, acc in st["heldout_curve"]:
                by_t.setdefault(t, []).append(acc)
        curve = [[t, _mean(v)] for t, v in sorted(by_t.items())]
        per_seed_reach = {s: first_reach(st["heldout_curve"], base[s]["final_heldout"] if s in base else None)
                          for s, st in runs.items()}
        gens = [st["completions_generated"] for st in runs.values()]
        summary[name] = {
            "seeds": sorted(runs),
            "cumulative_reward": _mean(cums), "cumulative_reward_sd": _sd(cums), "cumulative_reward_per_seed": cums,
            "final_heldout": _mean(finals), "final_heldout_sd": _sd(finals), "final_heldout_per_seed": finals,
            "heldout_curve": curve,
            "rounds_to_target": first_reach(curve, target),
            "completions_generated": _mean(gens), "completions_generated_sd": _sd(gens),
            "completions_generated_per_node_round": _mean([st["completions_generated_per_node_round"]
                                                           for st in runs.values()]),
            "rounds_to_target_per_seed": per_seed_reach,
            "reward_per_round": [_mean([st["reward_per_round"][t] for st in runs.values()]) for t in range(args.rounds)],
            "cumulative_batch_reward": _mean([st["cumulative_batch_reward"] for st in runs.values()]),
            "external_share": _mean([st["external_share"] for st in runs.values()]),
            "groups_trained_per_round": _mean([st["groups_trained_per_round"] for st in runs.values()]),
            "signal_groups_per_round": _mean([st.get("signal_groups_per_round") for st in runs.values()]),
            "reward_slope": _mean([st.get("reward_slope") for st in runs.values()]),
            "frac_zero_std": _mean([st["frac_zero_std"] for st in runs.values()]),
            "wall_s": [st["wall_s"] for st in runs.values()],
            "exit_codes": [st["rc"] for st in runs.values()],
        }
    b = summary.get(args.baseline)
    for name, s in summary.items():
        if b:
            s["cumulative_reward_vs_baseline"] = (s["cumulative_reward"] / b["cumulative_reward"]
                                                  if b["cumulative_reward"] else None)
            s["final_heldout_vs_baseline"] = (s["final_heldout"] / b["final_heldout"]
                                         if s["final_heldout"] is not None and b["final_heldout"] else None)
            s["rounds_to_target_vs_rounds"] = s["rounds_to_target"] / args.rounds if s["rounds_to_target"] else None
    return {"target_heldout": target, "configs": summary, "per_run": per, "raw": raw}


def f(x: Any, fmt: str = "{:.3f}") -> str:
    """A number for the report, or a dash when there is none."""
    return "—" if x is None else fmt.format(x)


def write_report(args: argparse.Namespace, res: dict[str, Any], command: str, machine: str) -> None:
    out = Path(args.out)
    summ = res["configs"]
    k = args.scale
    lines = [
        f"# SAPO local/external sweep: regime {args.regime}, protocol {args.protocol}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}",
        "",
        f"{args.nodes} real `swarm-node join` processes per run on loopback (one libp2p mesh, --threads 1 each), "
        f"{args.rounds} rounds, seeds {', '.join(map(str, res['seeds']))}; node i of seed s runs with --seed 1000*s+i "
        f"in every config. Regime {args.regime}: {REGIMES[args.regime]['about']}. Protocol {args.protocol}: config "
        f"a/b -> " + ("--questions-per-round {k}a --local {k}a --external {k}b (all own groups trained, peers' "
                      "filtered)" if args.protocol == "paper" else
                      "--questions-per-round {k}(a+b) --local {k}a --external {k}b").format(k=k)
        + f" (scale {k}), group size 8. In 8/0 the same processes share in the same mesh but train on none of their "
        f"peers' groups. Held-out: greedy accuracy on a fixed set of {args.eval_size} held-out questions (split over "
        f"the regime's task families), every {args.eval_every} rounds."
        + (" Variants: " + "; ".join(f"{k_}: `{' '.join(v)}`" for k_, v in res["variants"].items()) + "."
           if res["variants"] else "")
        + (" Extra node flags: `" + " ".join(res["node_args"]) + "`." if res["node_args"] else ""),
        "",
        "Reward = each node's metrics `reward_mean`: the mean reward of its own sampled rollouts (questions × 8 "
        "completions a round), not the training batch (`train_reward_mean`, own groups with signal + peers' groups).",
        "",
        f"| local / external (node flags) | cumulative reward | vs {args.baseline} | final held-out acc | "
        f"vs {args.baseline} | rounds to reach {args.baseline}'s final held-out ({res['target_heldout']:.3f}) "
        f"| / {args.rounds} rounds |"
        if res["target_heldout"] is not None else "| config | cumulative reward | vs baseline | final held-out | "
        "vs baseline | rounds to target | / rounds |",
        "|---|---|---|---|---|---|---|",
    ]

    for name, s in summ.items():
        a, b = map(int, name.split("@")[0].split("/"))
        ij = protocol_flags((a, b, ""), k, args.protocol)
        sd = f" ± {s['cumulative_reward_sd']:.1f}" if s["cumulative_reward_sd"] is not None else ""
        hsd = f" ± {s['final_heldout_sd']:.3f}" if s["final_heldout_sd"] is not None else ""
        reach = s["rounds_to_target"]
        lines.append(
            f"| {name} ({ij['questions_per_round']}q, {ij['local']}/{ij['external']}) | {s['cumulative_reward']:.1f}{sd} | {f(s.get('cumulative_reward_vs_baseline'), '{:.2f}x')} "
            f"| {f(s['final_heldout'])}{hsd} | {f(s.get('final_heldout_vs_baseline'), '{:.2f}x')} "
            f"| {reach if reach is not None else f'not reached in {args.rounds}'} "
            f"| {f(s.get('rounds_to_target_vs_rounds'), '{:.2f}')} |"
        )
    lines += [
        "",
        "Cumulative reward = sum over nodes and rounds of each node's mean reward on its own sampled rollouts "
        "(mean ± sd over seeds). Final held-out = mean over nodes of the last evaluation (mean ± sd over seeds). "
        "Rounds to reach = first evaluation at which the seed-mean, node-mean held-out curve is at or above the "
        f"{args.baseline} config's final held-out accuracy.",
        "",
        "Paper's goal (8 × Qwen2.5-0.5B, 2000 rounds): 4/4 has 1.94x the cumulative reward of 8/0 "
        "(1093.31 vs 561.79); here also: 4/4 reaching 8/0's final held-out accuracy in at most half the rounds.",
        "",
        "| config | completions generated (all nodes) | external share of trained groups | groups trained / round "
        "| groups with signal trained / round | reward slope / round | own groups with zero advantage "
        "| cumulative training-batch reward | run wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summ.items():
        lines.append(f"| {name} | {f(s['completions_generated'], '{:.0f}')} | {s['external_share']:.2f} | "
                     f"{s['groups_trained_per_round']:.1f} | {f(s.get('signal_groups_per_round'), '{:.1f}')} | "
                     f"{f(s.get('reward_slope'), '{:.4f}')} | "
                     f"{f(s['frac_zero_std'], '{:.2f}')} | {f(s['cumulative_batch_reward'], '{:.1f}')} | {', '.join(f(w, '{:.0f}') for w in s['wall_s'])} |")
    lines += ["", "Per seed (cumulative reward / final held-out):", ""]
    for name, s in summ.items():
        pairs = ", ".join(f"seed {sd}: {c:.1f} / {f(h)}" for sd, c, h in
                          zip(s["seeds"], s["cumulative_reward_per_seed"], s["final_heldout_per_seed"]))
        lines.append(f"- {name}: {pairs}")
    short = [f"{r['config']} seed {r['seed']}" for r in res["run_meta"]
             if r.get("rc") != 0 or any(n < args.rounds for n in r.get("rounds_done", [args.rounds]))]
    if short:
        lines += ["", f"**Incomplete runs (a node stopped before round {args.rounds}):** {', '.join(short)}."]
    lines += ["", "Machine load (`uptime`) before and after each run: "
              + "; ".join(f"{r['config']} seed {r['seed']}: {r.get('load_before', '?')} -> {r.get('load_after', '?')}"
                          for r in res["run_meta"]), "", "![curves](curves.png)", ""]
    (out / "results.md").write_text("\n".join(lines))


def plot(args: argparse.Namespace, res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, s in res["configs"].items():
        ys = s["reward_per_round"]
        xs = [t + 1 for t, y in enumerate(ys) if y is not None]
        ys = [y for y in ys if y is not None]
        w = 5
        sm = [sum(ys[max(0, j - w + 1): j + 1]) / len(ys[max(0, j - w + 1): j + 1]) for j in range(len(ys))]
        (line,) = ax1.plot(xs, sm, label=name)
        ax1.plot(xs, ys, color=line.get_color(), alpha=0.2, lw=0.8)
        cv = s["heldout_curve"]
        ax2.plot([t for t, _ in cv], [a for _, a in cv], marker="o", ms=3, label=name, color=line.get_color())
    if res["target_heldout"] is not None:
        ax2.axhline(res["target_heldout"], color="grey", ls="--", lw=0.8, label=f"{args.baseline} final")
    ax1.set(xlabel="round", ylabel="mean reward of own rollouts (nodes × seeds; 5-round avg)",
            title=f"training reward, {args.nodes} nodes")
    ax2.set(xlabel="rounds trained", ylabel="held-out greedy accuracy (mean over nodes × seeds)",
            title="held-out accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(title="local/external")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_line() -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    return (f"{os.cpu_count()} CPU cores ({cpu or platform.processor()}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}; CPU only")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    node_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, node_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=sorted(REGIMES), default="easy")
    p.add_argument("--protocol", choices=PROTOCOLS, default="paper")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--configs", default="8/0,6/2,4/4,2/6")
    p.add_argument("--baseline", default=BASELINE, help="the config the ratios are taken against (e.g. 4/4@iso)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds; each runs every config")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                   help="node flags for configs named a/b@LABEL, e.g. --variant recv='--external-baseline receiver'")
    p.add_argument("--scale", type=int, default=4, help="groups per paper group: a/b -> --local a*K --external b*K")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="",
                   help="model per node, comma-separated, given to the nodes in turn (a mixed swarm: "
                        "tiny,runs/models/small); default: the regime's model")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from runs already in --out")
    p.add_argument("--skip-done", action="store_true",
                   help="keep runs already in --out whose nodes all finished every round (resume a cut sweep)")
    args = p.parse_args(argv)
    configs = parse_configs(args.configs)
    if args.baseline not in [cname(c) for c in configs]:
        print(f"note: no {args.baseline} config, so no ratios", file=sys.stderr)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    variants = parse_variants(args.variant)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/sapo_experiment.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if not args.report_only:
        t0 = time.time()
        # seed-major order: every config of a seed runs back to back, so load from other work on the machine
        # spreads over configs instead of hitting one
        for s in seeds:
            for c in configs:
                done = load_run(out, c, s, args.nodes) if args.skip_done else None
                if done is not None and done.get("rc") == 0 and all(len(r) >= args.rounds for r in done["nodes"]):
                    print(f"seed {s} config {cname(c)}: already done, kept", flush=True)
                    continue
                t1 = time.time()
                print(f"[{time.time() - t0:7.0f}s] seed {s} config {cname(c)}: {args.nodes} nodes x {args.rounds} rounds",
                      flush=True)
                meta = run_one(args, c, s, node_args, variants)
                run = load_run(out, c, s, args.nodes)
                st = run_stats(run, args.rounds)
                print(f"    done in {time.time() - t1:.0f}s rc={meta['rc']} rounds={st['rounds_done']} "
                      f"cumulative reward {st['cumulative_reward']:.1f} final held-out {st['final_heldout']} "
                      f"external share {st['external_share']:.2f} ({meta['load_after']})", flush=True)
        (out / "command.txt").write_text(command + "\n")
    elif (out / "command.txt").exists():
        command = (out / "command.txt").read_text().strip()
    res = aggregate(args, configs, seeds)
    res["seeds"] = seeds
    res["node_args"] = node_args
    res["variants"] = variants
    res["run_meta"] = [{**json.loads((run_dir(out, c, sd) / "run.json").read_text()),
                        "rounds_done": res["per_run"][cname(c)][sd]["rounds_done"]}
                       for sd in seeds for c in configs if (run_dir(out, c, sd) / "run.json").exists()]
    machine = machine_line()
    write_report(args, res, command, machine)
    plot(args, res, out / "curves.png")
    by_model: dict[str, Any] = {}
    models = node_models(args)
    if len(set(models)) > 1:  # a mixed swarm: the same tables for each model's nodes
        extra = ["", "## Per model", ""]
        for m in sorted(set(models), key=models.index):
            subset = [i for i, x in enumerate(models) if x == m]
            sub = aggregate(args, configs, seeds, subset)
            by_model[m] = {"nodes": subset, "target_heldout": sub["target_heldout"], "configs": sub["configs"]}
            extra += [f"Nodes {subset} (`{m}`), against the same nodes in {args.baseline}:", "",
                      "| config | cumulative reward | vs baseline | final held-out acc | vs baseline "
                      "| rounds to reach the baseline's final |",
                      "|---|---|---|---|---|---|"]
            for name, st in sub["configs"].items():
                extra.append(f"| {name} | {st['cumulative_reward']:.1f} | {f(st.get('cumulative_reward_vs_baseline'), '{:.2f}x')} | "
                             f"{f(st['final_heldout'])} | {f(st.get('final_heldout_vs_baseline'), '{:.2f}x')} | "
                             f"{st['rounds_to_target'] if st['rounds_to_target'] is not None else 'not reached'} |")
            curves = ", ".join(f"{name}: " + " ".join(f(a) for _, a in st["heldout_curve"])
                               for name, st in sub["configs"].items())
            extra += ["", f"Held-out curves (every {args.eval_every} rounds): {curves}", ""]
            plot(args, sub, out / f"curves_{Path(m).name}.png")
        with open(out / "results.md", "a") as fh:
            fh.write("\n".join(extra) + "\n")
    doc = {"command": command, "machine": machine, "regime": args.regime, "protocol": args.protocol,
           "baseline": args.baseline,
           "variants": variants, "loads": [{k: r.get(k) for k in ("config", "seed", "load_before", "load_after", "wall_s")}
                                           for r in res["run_meta"]],
           "nodes": args.nodes, "rounds": args.rounds, "scale": args.scale,
           "eval_every": args.eval_every, "eval_size": args.eval_size, "node_args": node_args, "seeds": seeds,
           "models": models, "by_model": by_model,
           "target_heldout": res["target_heldout"], "configs": res["configs"], "per_run": res["per_run"],
           "raw": res["raw"]}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
