"""Benchmark the gossip layer: N real `swarm-node join` processes on loopback, measured from the outside.

    python scripts/bench_swarm.py --nodes 4 --rounds 10               # quick check (~1.5 min on 2 cores)
    python scripts/bench_swarm.py --nodes 2 4 8 --out runs/bench     # one markdown row per N
    python scripts/bench_swarm.py --nodes 4 --out runs/bench --reanalyze   # recompute from the saved raw.json

For each N this starts N `join` processes (tiny model, --threads 1, --seed i, a fresh swarm name, --rounds R, node 0 is
the bootstrap of the others, each with its own identity/checkpoints/metrics/log under DIR/nN/<run>/node-i; the run
directory is wiped first). All N are launched together (node 0 first) so that their rounds overlap; a node that dials
node 0 before it listens retries after 0.5 s. While they run, every --poll seconds one *sweep* reads, concurrently for
all nodes, /proc/<pid>/stat (process CPU), /proc/<pid>/task/<pid>/stat (main-thread CPU: the trio thread, see below)
and the JSON status (each sample keeps t0/t1, the times before and after the status request). Exits are reaped with
os.wait4 (exact lifetime CPU, kept in raw.json). After all exit (or --timeout: the rest get SIGTERM, and the run is
marked timed out) the per-round metrics files are read. Everything raw goes to DIR/nN/<run>/raw.json.

Unless --no-baseline, the same swarm runs a second time with `--share none --external 0 --local I+J` (I, J = the node
defaults): the same mesh (bootstrap, hellos, heartbeats, status polls) and the same training budget per round, but no
rollout gossip. CPU above that baseline is charged to the rollout messages.

--relays K also runs K `swarm-node relay` processes (no model: ~90 MB each, docs/scale.md) in the same swarm; relay 0
is then everyone's bootstrap, and each trainer also bootstraps through one more relay (spread over them);
--relay-extra flags go to the relays only (e.g. --relay-extra=--max-peers=8). They are sampled like the nodes (CPU, resident memory, status) and reported on their own
(bench.json "relays"); the columns below are the training nodes'.

Exact delivery: every process started here writes a receipts ledger (swarm.receipts, SWARM_NODE_RECEIPTS): each batch
it published and each it accepted, by (sender, seq), and its fan-in shards over time. Below the table one line per
run gives delivery counted batch by batch (analyze_receipts): a batch is expected at every trainer (and, apart, every
relay) that listened to its sender's home shard from its publish until --drain-s later and was still running then;
"accepted by no process at all" counts batches lost where they started. It is given twice: from the moment every trainer had its
first peer, and from --settle-s later (meshes form over the heartbeats after a first connection). It has no window
edges to estimate, so it is the figure to quote; the table's delivery column is the older estimate from counters.

Columns (DIR/bench.json has these and per-node / per-pair detail; warnings go to stderr and into "problems"):

delivery      Batch level, from mesh counters. A node has "joined" at the first sweep whose status lists >= 1 peer; the
              measurement starts at the first sweep by which every node had joined. For each receiver i a window
              [start, end] of its own status samples is chosen: the first and last *quiet* ones, i.e. samples with no
              batch shared by another node within [t0 - margin, t1] (margin = 1.5 x the largest per-node latency p90),
              so no batch can be in flight across the window edges (used when they span >= half of its samples). Delivered = i's mesh `accepted` (rollout batches,
              all senders) at end minus at start. Expected = the batches the others shared in the window, from their
              metrics: a round's share time is time - wall_s + gen_s (when the round handed its groups to the
              publisher), one batch per round with rollouts_out > 0 (ceil(groups/256); cross-checked against the
              sender's mesh `published`). delivery = sum delivered / sum expected over receivers.
              Sharded swarms (--extra=--shards=S): a share is expected only from a sender whose home shard the
              receiver listened to at that time (its status `mesh.shards.listening`), so 1.000 still means none lost.
              If a receiver has no two quiet samples (many nodes on few cores: latency of seconds) its window is its
              whole post-join span and a share counts as expected when share time + i's latency p50 falls inside it
              (an estimate); the table then also shows bounds (lo-hi): delivered / expected with every ambiguous
              edge batch counted / with none counted. More rounds narrow them.
pair min      Group level, per (receiver, sender) pair, same windows: increase of i's status received_from[j] (groups
              from j that entered i's pool) / groups j shared in the window (sum of rollouts_out). Minimum over pairs.
              The pool also drops content duplicates and stale groups, and a full incoming channel drops batches:
              see pool_duplicates / incoming_dropped per node in bench.json.
lat p50/p90   Publish->receive latency (receive wall clock - the batch's created_at, set when the batch is sealed, so it
              includes the sender's pacing and queueing). Each node's mesh reports p50/p90 over its last <= 1000
              batches; p50 = median over nodes of their p50, p90 = max over nodes of their p90 (worst node).
in KB/node/rnd  Increase of mesh bytes_in (accepted rollout + Hello envelopes: payload after de-duplication, without
              libp2p framing, encryption or gossip control traffic) between the node's join and its last sample, / the
              rounds it ran in that span; mean over nodes (bench.json also has the max). The line below the table
              splits off the Hellos' part (mesh bytes_in_hellos) and their count.
cpu ms/msg    Network CPU per message, whole process (all threads, utime+stime), over each node's span from its first to
              its last readable status. Expected CPU without gossip, from the baseline run: main-thread CPU per second
              x span + worker CPU per round x rounds + worker training CPU per trained group x groups trained (a node
              that gets peers' groups trains more groups per round than one alone - only groups with reward variance
              are trained - so the baseline is split into a per-round and a per-group part using the baseline's
              gen_s:train_s ratio). Charged = sum(actual - expected) / messages handled (rollout batches published +
              accepted). Includes sealing/signing, libp2p, validation (signature, decode), the pool, and rescoring peers'
              groups with the node's own verifier. Noisy: single-digit seconds of CPU per node; re-run at a quiet time.
              bench.json has cpu_ms_per_msg_unadjusted (plain per-round difference) too. n/a with --no-baseline.
trio ms/msg   The same for the main thread only. Torch work (generate, rescore, train, checkpoint) runs in worker threads
              (node.round uses trio.to_thread), so the main (trio) thread's CPU is the network stack plus a little round
              bookkeeping and status serving. Its baseline is charged per second (heartbeats, Hellos and status polls
              are time driven). bench.json also has trio_ms_per_msg_raw: the sharing run's trio CPU / messages with
              nothing subtracted (an upper bound that needs no baseline).
netwait %     sum(net_wait_s) / sum(wall_s) over every round of every node in the sharing run (target <= 2 %).
              net_wait_s is the time the round spent in node.share() + node.collect() (handing groups to the publisher
              task, taking peers' groups from the pool). bench.json also has round_wall_ratio: mean wall_s sharing /
              mean wall_s baseline (what gossip costs a round in wall time, CPU contention included).
msgs          Rollout batches published + accepted, summed over nodes, in the CPU spans.
s             Wall seconds of the sharing (+ baseline) run.
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.config import NodeConfig  # noqa: E402
from node.simulate import read_metrics  # noqa: E402
from protocol.messages import MAX_ROLLOUTS  # noqa: E402
from swarm.receipts import RECEIPTS_ENV  # noqa: E402
from swarm.shards import home_shard  # noqa: E402
from node.cli import RELAY_SETTINGS  # noqa: E402
from protocol.identity import Identity, save_identity  # noqa: E402
from tests.join_procs import JoinProc, make_nodes, make_relays  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
DEFAULTS = NodeConfig()


# ---- sampling ----------------------------------------------------------------------------------------------------


def _stat_cpu(path: str) -> float | None:
    """utime + stime in seconds from a /proc stat file (fields 14 and 15)."""
    try:
        with open(path) as f:
            rest = f.read().rpartition(")")[2].split()
        return (int(rest[11]) + int(rest[12])) / TICK
    except (OSError, ValueError, IndexError):
        return None


def _slim_status(s: dict | None) -> dict | None:
    if not s:
        return None
    m = s.get("mesh") or {}
    return {
        "round": s.get("round", 0),
        "n_peers": len(s.get("peers") or []),
        "received_from": dict(s.get("received_from") or {}),
        "published": m.get("published", 0),
        "accepted": m.get("accepted", 0),
        "bytes_in": m.get("bytes_in", 0),
        "bytes_in_hellos": m.get("bytes_in_hellos", 0),
        "accepted_hellos": m.get("accepted_hellos", 0),
        "published_hellos": m.get("published_hellos", 0),
        "bytes_out": m.get("bytes_out", 0),
        "lat_p50": m.get("latency_ms_p50"),
        "lat_p90": m.get("latency_ms_p90"),
        "incoming_dropped": m.get("incoming_dropped", 0),
        "outbound_dropped_msgs": (m.get("outbound_dropped") or {}).get("msgs", 0),
        "duplicates": m.get("duplicates", 0),
        "rejections": {k: v for k, v in (m.get("rejections_by_reason") or {}).items() if v},
        "bans": m.get("bans", 0),
        "pool_duplicates": (s.get("pool") or {}).get("duplicates", 0),
        "dropped_publishes": (s.get("throughput") or {}).get("dropped_publishes", 0),
        "shards": m.get("shards"),  # {"count", "home", "epoch", "listening"} (swarm.shards)
        # discovery's dial counters: what a node that stays alone was doing (docs/scale.md)
        "dials": {**(m.get("dials") or {}), "ok": m.get("dials_ok", 0), "failed": m.get("dials_failed", 0)},
    }


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _sample(node: JoinProc) -> dict | None:
    if node.proc is None or node.proc.returncode is not None:
        return None
    pid = node.proc.pid
    t0 = time.time()
    cpu, main = _stat_cpu(f"/proc/{pid}/stat"), _stat_cpu(f"/proc/{pid}/task/{pid}/stat")
    st = _slim_status(node.status())
    if cpu is None:
        return None
    # the status snapshot was taken somewhere in [t0, t1]
    return {"t": t0, "t1": time.time(), "cpu": cpu, "main_cpu": main, "rss_mb": _rss_mb(pid), "st": st}


def _reap(node: JoinProc, rusage: dict) -> bool:
    """Non-blocking: True once the process has exited (its exact lifetime CPU goes into `rusage`)."""
    p = node.proc
    if p is None or p.returncode is not None:
        return True
    pid, status, ru = os.wait4(p.pid, os.WNOHANG)
    if pid == 0:
        return False
    p.returncode = os.waitstatus_to_exitcode(status)  # Popen then never waits on it again
    rusage[node.name] = ru.ru_utime + ru.ru_stime
    return True


def _terminate(nodes: list[JoinProc], rusage: dict, grace: float = 60.0) -> None:
    for n in nodes:
        if not _reap(n, rusage):
            n.proc.send_signal(signal.SIGTERM)  # a node checkpoints, then exits 0
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(_reap(n, rusage) for n in nodes):
        time.sleep(0.2)
    for n in nodes:
        if not _reap(n, rusage):
            n.proc.kill()
            n.proc.wait()


# ---- one swarm run -----------------------------------------------------------------------------------------------


def _relay_flags(extra: list[str]) -> list[str]:
    """The --extra flags a relay takes too (--shards=4, ...): the swarm's settings, not the training ones."""
    names = {"--" + n.replace("_", "-") for n in RELAY_SETTINGS}
    return [x for x in extra if x.split("=", 1)[0] in names]


def _shards_in(extra: list[str]) -> int:
    for x in extra:
        if x.startswith("--shards="):
            return int(x.split("=", 1)[1])
    return 1


def _balance(procs: list[JoinProc], shards: int) -> None:
    """Give process i an identity whose home shard is i mod S, so every shard has the same number of trainers (and of
    relays): runs of different sizes are then comparable (with 8 random identities on 4 shards, a node's shards held
    1 to 5 trainers and its inbound bytes varied 5x between nodes)."""
    for i, p in enumerate(procs):
        while home_shard(p.identity.peer_id, shards) != i % shards:
            p.identity = Identity.generate()
        (p.dir / "identity.key").unlink(missing_ok=True)  # make_nodes saved a random one; save_identity never overwrites
        save_identity(p.identity, p.dir / "identity.key")


def run_swarm(n: int, rounds: int, out: Path, *, share: bool, timeout: float, poll: float,
              extra: list[str], relays: int = 0, balanced: bool = False,
              relay_extra: list[str] = ()) -> dict[str, Any]:
    if out.exists():  # a previous bench in the same --out: identities and checkpoints must be fresh
        shutil.rmtree(out)
    out.mkdir(parents=True)
    swarm = f"bench-{secrets.token_hex(4)}"
    nodes = make_nodes(out, [f"node-{i}" for i in range(n)])
    relay_procs = make_relays(out, [f"relay-{i}" for i in range(relays)])
    if balanced and _shards_in(extra) > 1:
        _balance(nodes, _shards_in(extra))
        _balance(relay_procs, _shards_in(extra))
    for nd in nodes:
        nd.metrics_path.unlink(missing_ok=True)
    mode = [] if share else ["--share", "none", "--external", "0", "--local", str(DEFAULTS.local + DEFAULTS.external)]
    samples: dict[str, list[dict]] = {nd.name: [] for nd in nodes + relay_procs}
    sweeps: list[float] = []
    rusage: dict[str, float] = {}
    timed_out = False
    t_start = time.time()
    try:
        # with relays, relay 0 is everyone's bootstrap (seed duty); without, node 0 is
        seed = relay_procs[0].addr if relay_procs else nodes[0].addr
        for i, rp in enumerate(relay_procs):
            rp.start(swarm, [] if i == 0 else [seed], [*_relay_flags(extra), *relay_extra], env=_receipts_env(rp))
        for i, nd in enumerate(nodes):
            # a second seed per trainer, spread over the relays: one seed dialed by everyone at once is what a
            # starved machine fails to answer first (64 processes: no trainer's bootstrap dial answered in 5 s)
            seeds = [seed, relay_procs[1 + i % (relays - 1)].addr] if relays >= 2 else [seed]
            nd.start(swarm, [] if nd.addr == seed else seeds,
                     ["--rounds", str(rounds), "--seed", str(i), *mode, *extra], env=_receipts_env(nd))
        deadline = time.monotonic() + timeout
        with ThreadPoolExecutor(max_workers=n + relays) as pool:
            while True:
                done = [_reap(nd, rusage) for nd in nodes]
                if all(done):
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                k = len(sweeps)
                sweeps.append(time.time())
                for nd, s in zip(nodes + relay_procs, pool.map(_sample, nodes + relay_procs)):
                    if s is not None:
                        s["k"] = k
                        samples[nd.name].append(s)
                alive = sum(not d for d in done)
                st = [s[-1]["st"] for s in (samples[nd.name] for nd in nodes) if s and s[-1]["st"] and s[-1]["k"] == k]
                print(f"\r  {'share' if share else 'base '} N={n} t={time.time() - t_start:5.0f}s alive={alive} "
                      f"rounds={[x['round'] for x in st]}   ", end="", file=sys.stderr, flush=True)
                time.sleep(poll)
    finally:
        _terminate(nodes + relay_procs, rusage)
        print(file=sys.stderr)
    run = {
        "swarm": swarm, "share": share, "rounds": rounds, "timed_out": timed_out, "sweeps": sweeps, "elapsed_s": round(time.time() - t_start, 1),
        "nodes": [{"name": nd.name, "peer_id": nd.identity.peer_id, "rc": nd.proc.returncode,
                   "lifetime_cpu_s": rusage.get(nd.name), "samples": samples[nd.name], "metrics": nd.metrics(),
                   "receipts": _read_receipts(nd),
                   "log_tail": nd.output()[-1500:] if nd.proc.returncode not in (0,) else ""}
                  for nd in nodes],
        "relays": [{"name": rp.name, "peer_id": rp.identity.peer_id, "rc": rp.proc.returncode,
                    "lifetime_cpu_s": rusage.get(rp.name), "samples": samples[rp.name], "receipts": _read_receipts(rp),
                    "log_tail": rp.output()[-1500:] if rp.proc.returncode not in (0,) else ""}
                   for rp in relay_procs],
    }
    (out / "raw.json").write_text(json.dumps(run))  # re-analyze later with --reanalyze
    return run


def _receipts_env(p: JoinProc) -> dict[str, str]:
    return {RECEIPTS_ENV: str(p.dir / "receipts.jsonl")}


def _read_receipts(p: JoinProc) -> list[dict]:
    """The process's ledger (swarm.receipts): one dict per batch published / accepted and per fan-in change (a line
    cut by the process's end is skipped)."""
    return read_metrics(p.dir / "receipts.jsonl")


# ---- analysis ----------------------------------------------------------------------------------------------------


def analyze_receipts(run: dict, drain_s: float, settle_s: float = 0.0) -> dict[str, Any] | None:
    """Exact delivery, batch by batch, from every process's receipts (swarm.receipts).

    A trainer's batch (sender j, seq) is expected at receiver i when it was published settle_s or more after every
    trainer had joined (its first status with a peer: meshes form over the next heartbeats) and after i had, i listened to j's home shard from the publish time until drain_s after it (its `listen`
    lines), and i was still running drain_s after it (its last readable status); delivered when i's ledger has
    (j, seq) at any time. A batch published closer than drain_s to i's end is left out ("edge") and counted. Relays
    are receivers too (reported apart: they forward to trainers). Also: batches that reached none of the receivers
    that expected them (lost at the sender), and exact publish -> accept latencies."""
    nodes, relays = run["nodes"], run.get("relays", [])
    if not any(nd.get("receipts") for nd in nodes):
        return None
    joined_t = {}
    end_t = {}
    for p in nodes + relays:
        ss = _with_status(p)
        j = next((s["t"] for s in ss if s["st"]["n_peers"] >= 1), None)
        if j is not None:
            joined_t[p["name"]] = j
        if ss:
            end_t[p["name"]] = ss[-1]["t"]
    if any(nd["name"] not in joined_t for nd in nodes):
        return None
    start = max(joined_t[nd["name"]] for nd in nodes) + settle_s
    pubs = [(nd["peer_id"], nd["name"], x) for nd in nodes for x in nd.get("receipts", []) if x["ev"] == "pub"]

    def receiver(p: dict) -> dict[str, Any]:
        rc = p.get("receipts", [])
        listens = [(x["t"], set(x["shards"])) for x in rc if x["ev"] == "listen"]
        acc = {}
        for x in rc:
            if x["ev"] == "acc":
                acc.setdefault((x["sender"], x["seq"]), x["t"])
        out: dict[str, Any] = {"expected": 0, "delivered": 0, "edge": 0, "missing": [], "lat_ms": []}
        if p["name"] not in joined_t or not listens:
            return out
        t_end = end_t[p["name"]]
        for pid, name, x in pubs:
            if pid == p["peer_id"] or x["t"] < max(start, joined_t[p["name"]]):
                continue
            before = [s for t, s in listens if t <= x["t"]]
            during = [s for t, s in listens if x["t"] < t <= x["t"] + drain_s]
            if not before or not all(x["shard"] in s for s in before[-1:] + during):
                continue
            if x["t"] + drain_s > t_end:
                out["edge"] += 1
                continue
            out["expected"] += 1
            got = acc.get((pid, x["seq"]))
            if got is None:
                out["missing"].append({"sender": name, "seq": x["seq"], "published_s": round(x["t"] - start, 1)})
            else:
                out["delivered"] += 1
                out["lat_ms"].append((got - x["created_at"]) * 1000.0)
        return out

    def total(rows: dict[str, dict]) -> dict[str, Any]:
        exp = sum(r["expected"] for r in rows.values())
        dl = sum(r["delivered"] for r in rows.values())
        lat = sorted(v for r in rows.values() for v in r["lat_ms"])
        q = lambda f: round(lat[min(len(lat) - 1, int(f * len(lat)))], 1) if lat else None  # noqa: E731
        return {"delivery": round(dl / exp, 4) if exp else None, "expected": exp, "delivered": dl,
                "edge": sum(r["edge"] for r in rows.values()), "lat_p50_ms": q(0.5), "lat_p90_ms": q(0.9),
                "lat_max_ms": round(lat[-1], 1) if lat else None,
                "per_receiver": {k: {"expected": r["expected"], "delivered": r["delivered"], "edge": r["edge"],
                                     "missing": r["missing"]} for k, r in rows.items()}}

    tr = {p["name"]: receiver(p) for p in nodes}
    out = {"drain_s": drain_s, "settle_s": settle_s, "trainers": total(tr)}
    if relays:
        out["relays"] = total({p["name"]: receiver(p) for p in relays})
        out["relays"].pop("per_receiver")
        out["relays"]["missing_by_relay"] = {p["name"]: len(r["missing"]) for p, r in
                                             ((p, receiver(p)) for p in relays) if r["missing"]}
    # a batch a trainer missed that no process at all accepted (trainer or relay) was lost where it started
    missed = {(m["sender"], m["seq"]) for r in tr.values() for m in r["missing"]}
    by_name = {nd["name"]: nd["peer_id"] for nd in nodes}
    anywhere = {(x["sender"], x["seq"]) for p in nodes + relays for x in p.get("receipts", []) if x["ev"] == "acc"}
    out["trainers"]["batches_missed"] = len(missed)
    out["trainers"]["batches_missed_by_all"] = sum((by_name[name], seq) not in anywhere for name, seq in missed)
    return out


def _share_time(m: dict) -> float:
    return m["time"] - m["wall_s"] + m["gen_s"]


def _with_status(node: dict) -> list[dict]:
    return [s for s in node["samples"] if s["st"] is not None]


def _window(node: dict) -> dict | None:
    """The node's first and last readable status, and its first joined (>= 1 peer) one."""
    ss = _with_status(node)
    if not ss:
        return None
    joined = next((s for s in ss if s["st"]["n_peers"] >= 1), None)
    return {"first": ss[0], "joined": joined, "last": ss[-1]}


def _at_or_after(node: dict, k: int) -> dict | None:
    return next((s for s in _with_status(node) if s["k"] >= k), None)


def _batches(groups: int) -> int:
    return math.ceil(groups / MAX_ROLLOUTS) if groups > 0 else 0


def _shares(node: dict) -> list[tuple[float, int]]:
    """(share time, groups) of each round that handed groups to the publisher."""
    return sorted((_share_time(m), m["rollouts_out"]) for m in node["metrics"] if m["rollouts_out"] > 0)


def _hears(receiver: dict, n_shards: int) -> Callable[[str, float], bool]:
    """Sharded swarms (--shards S): a receiver only expects the batches of senders whose home shard it listened to
    when the batch arrived (its status samples' `shards.listening`; the sample at or before that time)."""
    samples = [s for s in _with_status(receiver) if s["st"].get("shards")]
    times = [s["t"] for s in samples]

    def hears(sender: str, t: float) -> bool:
        if n_shards <= 1 or not samples:
            return True
        s = samples[max(0, bisect.bisect_right(times, t) - 1)]
        return home_shard(sender, n_shards) in s["st"]["shards"]["listening"]
    return hears


def analyze_share(run: dict) -> dict[str, Any]:
    nodes = run["nodes"]
    win = {nd["name"]: _window(nd) for nd in nodes}
    shares = {nd["name"]: _shares(nd) for nd in nodes}
    p90s_all = [s["st"]["lat_p90"] for nd in nodes for s in _with_status(nd)[-1:] if s["st"]["lat_p90"] is not None]
    margin = max(0.1, 1.5 * max(p90s_all, default=0) / 1000)  # a batch shared this long before a snapshot may be in flight
    joined_k = [w["joined"]["k"] for w in win.values() if w and w["joined"]]
    k_all = max(joined_k) if len(joined_k) == len(nodes) else None  # the first sweep by which every node had joined
    pairs, per_node = [], []
    sum_deliv = sum_exp = sum_lo = sum_hi = n_exact = 0
    n_shards = max(((s["st"].get("shards") or {}).get("count", 1) for nd in nodes for s in _with_status(nd)), default=1)
    for i in nodes:
        wi = win[i["name"]]
        if not wi or not wi["joined"] or k_all is None:
            per_node.append({"node": i["name"], "joined": bool(wi and wi["joined"])})
            continue
        others = [j for j in nodes if j is not i]
        other_shares = sorted(t for j in others for t, _ in shares[j["name"]])
        hears = _hears(i, n_shards)

        def ambiguous(s: dict) -> int:  # shares by others that may or may not be counted in this snapshot
            return sum(s["t"] - margin <= t <= s["t1"] for t in other_shares)

        cands = [s for s in _with_status(i) if s["k"] >= k_all]
        if len(cands) < 2:
            per_node.append({"node": i["name"], "joined": True, "window": None})
            continue
        quiet = [s for s in cands if ambiguous(s) == 0]
        # quiet edges make the count exact; use them unless they would throw away more than half the span
        exact = len(quiet) >= 2 and quiet[-1]["t"] - quiet[0]["t"] >= 0.5 * (cands[-1]["t"] - cands[0]["t"])
        start, end = (quiet[0], quiet[-1]) if exact else (cands[0], cands[-1])
        shift = (end["st"]["lat_p50"] or 0) / 1000  # a share arrives about this long after it was made
        mid_lo, mid_hi = (start["t"] + start["t1"]) / 2, (end["t"] + end["t1"]) / 2
        exp_batches = exp_lo = exp_hi = 0
        for j in others:
            heard = [(t, g) for t, g in shares[j["name"]] if hears(j["peer_id"], t + shift)]
            rows = [(t, g) for t, g in heard if mid_lo < t + shift <= mid_hi]
            groups = sum(g for _, g in rows)
            batches = sum(_batches(g) for _, g in rows)
            exp_lo += sum(_batches(g) for t, g in heard if start["t1"] < t <= end["t"] - margin)
            exp_hi += sum(_batches(g) for t, g in heard if start["t"] - margin < t <= end["t1"])
            got = end["st"]["received_from"].get(j["peer_id"], 0) - start["st"]["received_from"].get(j["peer_id"], 0)
            exp_batches += batches
            pairs.append({"receiver": i["name"], "sender": j["name"], "groups_expected": groups, "groups_received": got,
                          "batches_expected": batches, "ratio_groups": round(got / groups, 4) if groups else None})
        delivered = end["st"]["accepted"] - start["st"]["accepted"]
        sum_deliv += delivered
        sum_exp += exp_batches
        sum_lo += exp_lo
        sum_hi += exp_hi
        n_exact += exact
        t_lo, t_hi = mid_lo, mid_hi
        j0, last = wi["joined"], wi["last"]
        rounds = last["st"]["round"] - j0["st"]["round"]
        mrows = i["metrics"]
        per_node.append({
            "node": i["name"], "joined": True, "joined_after_s": round(j0["t"] - run["sweeps"][0], 1),
            "rounds": len(mrows), "rounds_joined": rounds,
            "window_s": round(t_hi - t_lo, 1), "window_rounds": end["st"]["round"] - start["st"]["round"],
            "exact_window": exact, "edge_ambiguous": ambiguous(start) + ambiguous(end),
            "batches_accepted": delivered, "batches_expected": exp_batches,
            "batches_expected_bounds": [exp_lo, exp_hi],
            "delivery": round(delivered / exp_batches, 4) if exp_batches else None,
            "published": last["st"]["published"],
            "published_rows": sum(_batches(m["rollouts_out"]) for m in mrows),
            "published_rows_before_last": sum(_batches(m["rollouts_out"]) for m in mrows
                                              if _share_time(m) <= last["t"] - margin),
            "lat_p50": last["st"]["lat_p50"], "lat_p90": last["st"]["lat_p90"],
            "in_kb_per_round": round((last["st"]["bytes_in"] - j0["st"]["bytes_in"]) / 1024 / rounds, 2) if rounds else None,
            # the Hellos' part of it (discovery's cost, which must stay flat as the swarm grows) and their count
            "in_kb_hellos_per_round": round((last["st"]["bytes_in_hellos"] - j0["st"]["bytes_in_hellos"])
                                            / 1024 / rounds, 2) if rounds and "bytes_in_hellos" in j0["st"] else None,
            "hellos_in_per_round": round((last["st"]["accepted_hellos"] - j0["st"]["accepted_hellos"])
                                         / rounds, 1) if rounds and "accepted_hellos" in j0["st"] else None,
            "max_peers": max(s["st"]["n_peers"] for s in _with_status(i)),
            "incoming_dropped": last["st"]["incoming_dropped"], "pool_duplicates": last["st"]["pool_duplicates"],
            "mesh_duplicates": last["st"]["duplicates"], "rejections": last["st"]["rejections"], "bans": last["st"].get("bans", 0),
            "dropped_publishes": last["st"]["dropped_publishes"],
            "outbound_dropped_msgs": last["st"]["outbound_dropped_msgs"],  # refused by full per-peer send queues
            "net_wait_s": round(sum(m["net_wait_s"] for m in mrows), 6),
            "wall_s": round(sum(m["wall_s"] for m in mrows), 3),
            "max_round_net_wait_s": max((m["net_wait_s"] for m in mrows), default=None),
        })
    ratios = [p["ratio_groups"] for p in pairs if p["ratio_groups"] is not None]
    joined = [p for p in per_node if p.get("joined") and "lat_p50" in p]
    p50s = [p["lat_p50"] for p in joined if p["lat_p50"] is not None]
    p90s = [p["lat_p90"] for p in joined if p["lat_p90"] is not None]
    kbs = [p["in_kb_per_round"] for p in joined if p["in_kb_per_round"] is not None]
    all_rows = [m for nd in nodes for m in nd["metrics"]]
    return {
        "delivery": round(sum_deliv / sum_exp, 4) if sum_exp else None,
        "delivery_bounds": [round(sum_deliv / sum_hi, 4) if sum_hi else None, round(sum_deliv / sum_lo, 4) if sum_lo else None],
        "receivers_with_exact_window": n_exact,
        "batches_delivered": sum_deliv, "batches_expected": sum_exp, "edge_margin_s": round(margin, 3),
        "all_joined_after_s": round(run["sweeps"][k_all] - run["sweeps"][0], 1) if k_all is not None else None,
        "pair_ratio_min": min(ratios) if ratios else None,
        "pair_ratio_mean": round(statistics.mean(ratios), 4) if ratios else None,
        "lat_p50_ms": statistics.median(p50s) if p50s else None,
        "lat_p90_ms": max(p90s) if p90s else None,
        "in_kb_per_node_round": round(statistics.mean(kbs), 2) if kbs else None,
        "in_kb_per_node_round_max": max(kbs) if kbs else None,
        "in_kb_hellos_per_node_round": _mean_of(joined, "in_kb_hellos_per_round"),
        "hellos_in_per_node_round": _mean_of(joined, "hellos_in_per_round"),
        "net_wait_share": (sum(m["net_wait_s"] for m in all_rows) / sum(m["wall_s"] for m in all_rows)) if all_rows else None,
        "mean_round_wall_s": statistics.mean(m["wall_s"] for m in all_rows) if all_rows else None,
        "nodes": per_node, "pairs": pairs,
    }


def cpu_spans(run: dict) -> list[dict]:
    """Per node, between its first and last readable status: CPU (process, main thread), seconds, rounds, the
    groups it trained on and the gen/train seconds of those rounds, and the messages it handled."""
    out = []
    for nd in run["nodes"]:
        w = _window(nd)
        if not w or w["last"] is w["first"] or w["first"]["main_cpu"] is None or w["last"]["main_cpu"] is None:
            continue
        a, b = w["first"], w["last"]
        rows = [m for m in nd["metrics"] if a["st"]["round"] <= m["round"] < b["st"]["round"]]
        out.append({
            "node": nd["name"], "dt": round(b["t"] - a["t"], 3), "rounds": b["st"]["round"] - a["st"]["round"],
            "cpu": round(b["cpu"] - a["cpu"], 3), "main_cpu": round(b["main_cpu"] - a["main_cpu"], 3),
            "groups_trained": sum(m["n_local"] + m["n_external"] for m in rows),
            "gen_s": round(sum(m["gen_s"] for m in rows), 3), "train_s": round(sum(m["train_s"] for m in rows), 3),
            "msgs": (b["st"]["published"] - a["st"]["published"]) + (b["st"]["accepted"] - a["st"]["accepted"]),
        })
    return out


def analyze_cpu(share: dict, base: dict | None) -> dict[str, Any]:
    """See the module docstring (cpu ms/msg, trio ms/msg)."""
    s = cpu_spans(share)
    msgs = sum(x["msgs"] for x in s)
    res: dict[str, Any] = {"messages": msgs, "share_spans": s}
    if msgs and s:
        res["trio_ms_per_msg_raw"] = round(1000 * sum(x["main_cpu"] for x in s) / msgs, 3)
    if base is None:
        return res
    b = cpu_spans(base)
    res["base_spans"] = b
    b_rounds, b_dt, b_groups = (sum(x[k] for x in b) for k in ("rounds", "dt", "groups_trained"))
    b_gen, b_train = sum(x["gen_s"] for x in b), sum(x["train_s"] for x in b)
    if not (b_rounds and b_dt and b_groups and msgs and b_gen + b_train > 0):
        return res
    main_per_s = sum(x["main_cpu"] for x in b) / b_dt  # the trio thread's idle upkeep is time driven
    worker = sum(x["cpu"] - x["main_cpu"] for x in b)  # generate + train (+ checkpoint): per round / per group
    train_frac = b_train / (b_gen + b_train)  # wall-time split as a proxy for the CPU split (both single-threaded)
    per_round = worker * (1 - train_frac) / b_rounds
    per_group = worker * train_frac / b_groups
    net_trio = sum(x["main_cpu"] - main_per_s * x["dt"] for x in s)
    net = sum(x["cpu"] - main_per_s * x["dt"] - per_round * x["rounds"] - per_group * x["groups_trained"] for x in s)
    cpu_per_round_b = sum(x["cpu"] for x in b) / b_rounds
    net_unadjusted = sum(x["cpu"] - cpu_per_round_b * x["rounds"] for x in s)
    res.update({
        "base_cpu_s_per_round": round(cpu_per_round_b, 4),
        "share_cpu_s_per_round": round(sum(x["cpu"] for x in s) / max(1, sum(x["rounds"] for x in s)), 4),
        "base_groups_trained_per_round": round(b_groups / b_rounds, 2),
        "share_groups_trained_per_round": round(sum(x["groups_trained"] for x in s) / max(1, sum(x["rounds"] for x in s)), 2),
        "base_train_cpu_s_per_group": round(per_group, 4), "base_gen_cpu_s_per_round": round(per_round, 4),
        "base_trio_cpu_per_s": round(main_per_s, 4),
        "share_trio_cpu_per_s": round(sum(x["main_cpu"] for x in s) / max(1e-9, sum(x["dt"] for x in s)), 4),
        "net_cpu_s": round(net, 3), "net_trio_cpu_s": round(net_trio, 3),
        "cpu_ms_per_msg": round(1000 * net / msgs, 3),
        "cpu_ms_per_msg_unadjusted": round(1000 * net_unadjusted / msgs, 3),
        "trio_ms_per_msg": round(1000 * net_trio / msgs, 3),
    })
    return res


# ---- report ------------------------------------------------------------------------------------------------------

HEADER = ("| N | rounds | delivery | pair min | lat p50 ms | lat p90 ms | in KB/node/rnd | cpu ms/msg | trio ms/msg "
          "| netwait % | msgs | s (share+base) |")
RULE = "|" + "---|" * (HEADER.count("|") - 1)


def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def analyze_relays(run: dict) -> dict[str, Any] | None:
    """Per relay: resident memory (max over samples) and CPU share of one core over its sampled span."""
    out = []
    for rp in run.get("relays", []):
        ss = [x for x in rp["samples"] if x.get("cpu") is not None]
        if len(ss) < 2:
            continue
        span = ss[-1]["t"] - ss[0]["t"]
        last = next((x["st"] for x in reversed(ss) if x.get("st")), None) or {}
        sts = [x for x in ss if x.get("st")]
        kb_s = ((sts[-1]["st"]["bytes_in"] - sts[0]["st"]["bytes_in"]) / 1024 / (sts[-1]["t"] - sts[0]["t"])
                if len(sts) >= 2 and sts[-1]["t"] > sts[0]["t"] else None)
        out.append({"name": rp["name"], "rc": rp["rc"], "rss_mb": max(x["rss_mb"] or 0 for x in ss),
                    "in_kb_per_s": None if kb_s is None else round(kb_s, 2),
                    "cpu_pct": round(100 * (ss[-1]["cpu"] - ss[0]["cpu"]) / span, 2) if span > 0 else None,
                    "peers": last.get("n_peers"), "rejections": last.get("rejections")})
    if not out:
        return None
    cpus = [x["cpu_pct"] for x in out if x["cpu_pct"] is not None]
    return {"count": len(out), "rss_mb_mean": round(statistics.mean(x["rss_mb"] for x in out), 1),
            "rss_mb_max": round(max(x["rss_mb"] for x in out), 1),
            "cpu_pct_mean": round(statistics.mean(cpus), 2) if cpus else None,
            "cpu_pct_max": max(cpus) if cpus else None,
            "in_kb_per_s_mean": round(statistics.mean(k), 2) if (k := [x["in_kb_per_s"] for x in out
                                                                        if x["in_kb_per_s"] is not None]) else None,
            "relays": out}


def _mean_of(rows: list[dict], key: str) -> float | None:
    xs = [p[key] for p in rows if p.get(key) is not None]
    return round(statistics.mean(xs), 2) if xs else None


def row(r: dict) -> str:
    a, c = r["share"], r["cpu"]
    secs = f"{r['elapsed_s']['share']:.0f}" + (f"+{r['elapsed_s']['base']:.0f}" if "base" in r["elapsed_s"] else "")
    delivery = _f(a["delivery"], 3)
    exact = a.get("receivers_with_exact_window")
    if a["delivery"] is not None and exact is not None and exact < len(a["nodes"]):
        lo, hi = a["delivery_bounds"]
        delivery += f" ({_f(lo, 2)}-{_f(hi, 2)})"
    return (f"| {r['n']} | {r['rounds']} | {delivery} | {_f(a['pair_ratio_min'], 3)} | {_f(a['lat_p50_ms'], 1)} "
            f"| {_f(a['lat_p90_ms'], 1)} | {_f(a['in_kb_per_node_round'], 1)} | {_f(c.get('cpu_ms_per_msg'), 2)} "
            f"| {_f(c.get('trio_ms_per_msg'), 2)} | {_f(None if a['net_wait_share'] is None else 100 * a['net_wait_share'], 3)} "
            f"| {c['messages']} | {secs} |")


def bench(n: int, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) / f"n{n}"
    runs = {}
    for name in ("share",) if args.no_baseline else ("share", "base"):
        if args.reanalyze:
            if (out / name / "raw.json").exists():
                runs[name] = json.loads((out / name / "raw.json").read_text())
        else:
            runs[name] = run_swarm(n, args.rounds, out / name, share=name == "share", timeout=args.timeout,
                                   poll=args.poll, extra=args.extra, relays=args.relays, relay_extra=args.relay_extra,
                                   balanced=args.balanced_shards)
    if "share" not in runs:
        raise SystemExit(f"--reanalyze: no {out / 'share' / 'raw.json'}")
    rounds = runs["share"].get("rounds", args.rounds)
    problems = []
    for name, run in runs.items():
        for nd in run["nodes"]:
            if nd["rc"] != 0:
                problems.append(f"{name}/{nd['name']} exited rc={nd['rc']}: {nd['log_tail'][-400:]}")
            if len(nd["metrics"]) < rounds:
                problems.append(f"{name}/{nd['name']} ran {len(nd['metrics'])}/{rounds} rounds")
        if run["timed_out"]:
            problems.append(f"{name} run timed out after {args.timeout}s")
    share = analyze_share(runs["share"])
    exact = analyze_receipts(runs["share"], args.drain_s)
    settled = analyze_receipts(runs["share"], args.drain_s, args.settle_s) if args.settle_s > 0 else None
    cpu = analyze_cpu(runs["share"], runs.get("base"))
    if "base" in runs:
        base_walls = [m["wall_s"] for nd in runs["base"]["nodes"] for m in nd["metrics"]]
        if base_walls and share["mean_round_wall_s"]:
            share["round_wall_ratio"] = round(share["mean_round_wall_s"] / statistics.mean(base_walls), 3)
    for p in share["nodes"]:
        if p.get("joined") and "published" in p and not (p["published_rows_before_last"] <= p["published"] <= p["published_rows"]):
            problems.append(f"{p['node']}: mesh published {p['published']} batches by its last status; metrics imply "
                            f"{p['published_rows_before_last']}..{p['published_rows']}")
        if p.get("joined") and "bans" in p and (p["bans"] or p["rejections"]):
            problems.append(f"{p['node']}: rejected honest peers' messages {p['rejections']}, bans {p['bans']}")
        if p.get("joined") and p.get("max_peers", 0) < n - 1:
            problems.append(f"{p['node']}: saw at most {p.get('max_peers', 0)} of {n - 1} peers")
    relays = analyze_relays(runs["share"])
    for rp in runs["share"].get("relays", []):
        if rp["rc"] != 0:
            problems.append(f"share/{rp['name']} exited rc={rp['rc']}: {rp['log_tail'][-400:]}")
    return {"n": n, "rounds": rounds, "share": share, "exact": exact, "exact_settled": settled, "cpu": cpu, "problems": problems, "relays": relays,
            "elapsed_s": {k: v["elapsed_s"] for k, v in runs.items()},
            "swarms": {k: v["swarm"] for k, v in runs.items()}, "out": str(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", required=True, help="swarm sizes to run, e.g. --nodes 2 4 8")
    ap.add_argument("--rounds", type=int, default=30, help="rounds per node (default 30)")
    ap.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per swarm run before SIGTERM (default 600)")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between sweeps (default 0.5)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the --share none run (no CPU attribution)")
    ap.add_argument("--reanalyze", action="store_true", help="recompute the table from DIR/nN/*/raw.json, run nothing")
    ap.add_argument("--extra", action="append", default=[], help="extra flag for every node, e.g. --extra=--group-size=4")
    ap.add_argument("--balanced-shards", action="store_true",
                    help="with --extra=--shards=S: process i gets an identity on home shard i mod S (same number of "
                         "trainers, and of relays, on every shard)")
    ap.add_argument("--relay-extra", action="append", default=[],
                    help="extra flag for the relays only, e.g. --relay-extra=--max-peers=8")
    ap.add_argument("--drain-s", type=float, default=30.0,
                    help="exact delivery (receipts): a batch counts as expected at a receiver still running this long "
                         "after it was published (default 30)")
    ap.add_argument("--settle-s", type=float, default=10.0,
                    help="exact delivery is also given for batches published this long after every trainer joined "
                         "(its first peer; meshes form over the following heartbeats), 0 = no second figure (default 10)")
    ap.add_argument("--relays", type=int, default=0,
                    help="also run this many `swarm-node relay` processes (relay 0 is everyone's bootstrap); "
                         "--nodes counts the training nodes; --extra flags a relay takes (--shards=...) reach them too")
    args = ap.parse_args()
    if min(args.nodes) < 2:
        ap.error("--nodes must be >= 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.nodes:
        r = bench(n, args)
        results.append(r)
        (out / "bench.json").write_text(json.dumps({"results": results, "argv": sys.argv[1:]}, indent=1))
        for p in r["problems"]:
            print(f"  warning: {p}", file=sys.stderr)
    print(HEADER)
    print(RULE)
    for r in results:
        print(row(r))
    for r in results:
        if r.get("relays"):
            x = r["relays"]
            print(f"N={r['n']} + {x['count']} relays: {x['rss_mb_mean']} MB resident each (max {x['rss_mb_max']}), "
                  f"{x['cpu_pct_mean']} % of a core each (max {x['cpu_pct_max']}), {x['in_kb_per_s_mean']} KB/s in each")
    for r in results:
        a = r["share"]
        if a.get("in_kb_hellos_per_node_round") is not None:
            print(f"N={r['n']} inbound per trainer a round: {_f(a['in_kb_per_node_round'], 1)} KB, of it Hellos "
                  f"{_f(a['in_kb_hellos_per_node_round'], 1)} KB ({_f(a['hellos_in_per_node_round'], 1)} Hellos)")
    for r, key in ((r, key) for r in results for key in ("exact", "exact_settled")):
        x = r.get(key) or {}
        for who, e in (("trainers", x.get("trainers")), ("relays", x.get("relays"))):
            if e:
                print(f"N={r['n']} exact delivery to {who} (receipts, drain {x['drain_s']:.0f} s, from "
                      f"{x['settle_s']:.0f} s after all joined): "
                      f"{_f(e['delivery'], 4)} ({e['delivered']} of {e['expected']}; {e['edge']} left out at the edges), "
                      f"latency p50 {_f(e['lat_p50_ms'], 0)} / p90 {_f(e['lat_p90_ms'], 0)} / max {_f(e['lat_max_ms'], 0)} ms"
                      + (f"; batches missed: {e['batches_missed']}, accepted by no process at all: {e['batches_missed_by_all']}"
                         if who == "trainers" else ""))
    print(f"\nwrote {out / 'bench.json'}")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
