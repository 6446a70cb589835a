"""Simulate the gossip + sampling layer of N nodes in one process: how per-node load grows with the swarm.

    python scripts/scale_sim.py                                  # N = 4 8 16 64 256 1000, one topic vs sharded (~20 s)
    python scripts/scale_sim.py --nodes 16 1000 --shards 4       # a fixed shard count instead of N / --shard-size
    python scripts/scale_sim.py --json runs/scale.json           # also write every row as JSON

No libp2p, no torch: the mesh is rebuilt here the way py-libp2p 0.8.1's gossipsub builds it with swarm/host.py's
settings, and the sampling side uses the project's own ExperiencePool and MessageValidator. Per N and mode:

connections  Each node dials min(max_peers = 32, N - 1) peers found through Hellos (swarm/discovery.py) and accepts every
             inbound dial, so it has ~64 connections, made once and kept while the fan-in shards rotate. Sharded: half
             the dials go to home-shard mates (the Hellos a node hears: its home shard's every 10 s, the lobby's from
             everyone every 10 x S s), half to uniform peers; then, each epoch, Mesh._reach_shards: a node with fewer
             than 4 connected members on a shard it listens to dials members (computed from peer ID and round) among
             the peers it knows from Hellos (swarm.peerbook: 8 per home shard; --known lru: the old 128 most recently
             heard). Without that step rotated-in fan-in shards are often unreachable (delivery 0.42 at N = 1,000).
topics       One topic (today), or S shard topics + a lobby (swarm/shards.py): a node publishes its batch and its Hello
             to its home shard, listens to its home shard + fanin - 1 rotating ones, and everyone listens to the lobby.
mesh         Per topic, among connected subscribers: each node GRAFTs random topic peers up to D = 6; a peer accepts
             while its mesh is below D_high = 12 (build_router).
delivery     A message floods its topic's mesh: the publisher sends to its mesh peers, every node forwards the first
             copy to its mesh peers except the one it came from and the publisher. Every copy a node receives counts
             (bytes); the first is validated (CPU), later ones are duplicates. IDONTWANT (gossipsub 1.2) can stop some
             duplicates of large messages in flight, so duplicate counts are an upper bound.
gossip       Every heartbeat a node sends IHAVE with the IDs of its topic's messages from the last 3 heartbeats to
             max(6, 25 %) of its non-mesh topic peers: each message ID is announced 3 times to each of them (48 bytes).
hellos       Every node sends a Hello every 10 s (S = 1: on the one topic; sharded: on its home shard, and on the lobby
             every 10 x S s).
sampling     One observer node (node 0) puts what it accepted in a round into a real ExperiencePool and takes 3 x J
             candidates (at most max_external_per_peer per sender), as node/round.py does; it trains on J of them.
cpu          accepted messages x --msg-ms (whole-process CPU per gossip message measured by scripts/bench_swarm.py,
             docs/benchmarks.md: 8.4 ms at 4 nodes, 10.9 at 8; libp2p, signature checks, validation, pool) +
             duplicate copies x --dup-ms (assumed: Noise decrypt + protobuf parse + seen-cache lookup, no signature
             check or validation) + IHAVE IDs x --id-us (assumed). In-process, this script also times the pure part
             (MessageValidator.check of a sealed tiny batch: signature + strict decode) and prints it.

Rows give the mean over nodes (and the worst node for inbound KB); "senders" is how many other nodes' groups the
observer can ever receive: all N - 1 with one topic; with shards, those whose home shard it listens to over one full
rotation cycle (epochs_to_cover epochs).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocol.envelope import seal  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.messages import PROTOCOL_VERSION, Rollout, RolloutBatch, TaskRef  # noqa: E402
from swarm.peerbook import capacity_for  # noqa: E402
from swarm.pool import ExperiencePool  # noqa: E402
from swarm.shards import epochs_to_cover, home_shard, subscribed_shards  # noqa: E402
from swarm.validator import MessageValidator, RateLimit  # noqa: E402

D, D_HIGH = 6, 12  # swarm/host.py build_router
GOSSIP_WINDOW = 3  # heartbeats of message IDs in each IHAVE (build_router gossip_window)
MSG_ID_BYTES = 48  # 38-byte Ed25519 peer ID + 8-byte seqno + protobuf framing
MAX_PEERS = 32  # MeshConfig.max_peers: Discovery stops dialing here (inbound dials are still accepted)
HELLO_INTERVAL_S = 10.0  # MeshConfig.hello_interval_s


@dataclass
class Row:
    n: int
    mode: str  # "1 topic" or "S=..,k=.."
    shards: int
    fanin: int
    kb_in: float  # inbound KB per node per round: rollouts + hellos (every copy) + IHAVE
    kb_in_max: float
    kb_accepted: float  # of which accepted (first copies): what scripts/bench_swarm.py's "in KB/node/rnd" measures
    msgs: float  # accepted (new) messages per node per round: batches + hellos
    batches: float  # of which rollout batches
    dups: float  # duplicate copies per node per round
    ihave_kb: float
    cpu_ms: float  # per node per round
    cpu_share: float  # cpu_ms / round length: share of one core
    pool_in: int  # groups the observer's pool took in this round
    taken: int  # candidates drawn (3 x J)
    trained: int  # J
    delivery: float  # (message, subscriber) pairs reached / all
    senders: int  # other nodes the observer ever hears (over a full rotation cycle)


# ---- the mesh --------------------------------------------------------------------------------------------------


def connect(n: int, rng: random.Random, shard_mates: list[list[int]] | None, fanin: int) -> list[set[int]]:
    adj: list[set[int]] = [set() for _ in range(n)]
    want = min(MAX_PEERS, n - 1)
    p_mate = fanin / (fanin + 1)
    for u in rng.sample(range(n), n):
        tries = 0
        while len(adj[u]) < want and tries < 20 * want:
            tries += 1
            pool = shard_mates[u] if shard_mates and rng.random() < p_mate else None
            v = rng.choice(pool) if pool else rng.randrange(n)
            if v != u:
                adj[u].add(v)
                adj[v].add(u)
    return adj


def known_peers(n: int, home: list[int], shards: int, rng: random.Random, shard_aware: bool = True) -> list[int]:
    """Discovery.known after a node has heard every peer's lobby Hello (one rotation of S x 10 s) in random order:
    swarm.peerbook keeps capacity_for(max_peers, S) of them, min(heard, capacity // S) from each home shard (a sample
    of that here); `shard_aware=False` is the old book, the 128 most recently heard (a uniform sample)."""
    if not shard_aware or shards == 1:
        return rng.sample(range(n), min(4 * MAX_PEERS, n))
    cap = capacity_for(MAX_PEERS, shards)
    by_home: list[list[int]] = [[] for _ in range(shards)]
    for v in range(n):
        by_home[home[v]].append(v)
    out = [v for vs in by_home for v in rng.sample(vs, min(len(vs), cap // shards))]
    rest = [v for v in range(n) if v not in set(out)] if len(out) < min(cap, n) else []
    return out + rng.sample(rest, min(len(rest), cap - len(out)))


def reach_shards(adj: list[set[int]], subs: list[tuple[int, ...]], home: list[int], members: list[list[int]],
                 rng: random.Random, shards: int, want: int = 4, shard_aware: bool = True) -> None:
    """Mesh._reach_shards: for each shard a node listens to with fewer than `want` connected members, dial peers that
    listen to it (home or fan-in, computed from their peer ID and round) among those it heard Hellos from
    (Discovery.known: `known_peers`)."""
    n = len(adj)
    for u in range(n):
        book = None
        for s in subs[u]:
            mem = set(members[s])
            have = sum(1 for v in adj[u] if v in mem)
            if have >= want:
                continue
            if book is None:
                book = known_peers(n, home, shards, rng, shard_aware)
            cands = [v for v in book if s in subs[v] and v != u and v not in adj[u]]
            rng.shuffle(cands)
            for v in cands[:want - have]:
                adj[u].add(v)
                adj[v].add(u)


def build_mesh(members: list[int], adj: list[set[int]], rng: random.Random) -> dict[int, set[int]]:
    subs = set(members)
    topic_peers = {u: [v for v in adj[u] if v in subs] for u in members}
    mesh: dict[int, set[int]] = {u: set() for u in members}
    for u in rng.sample(members, len(members)):
        cands = [v for v in topic_peers[u] if v not in mesh[u]]
        rng.shuffle(cands)
        for v in cands:
            if len(mesh[u]) >= D:
                break
            if len(mesh[v]) < D_HIGH:
                mesh[u].add(v)
                mesh[v].add(u)
    return mesh


def flood(mesh: dict[int, set[int]], origin: int) -> tuple[set[int], dict[int, int]]:
    """Who got the message, and how many copies each received (first + duplicates)."""
    copies: dict[int, int] = {}
    first_from = {origin: origin}
    frontier = [origin]
    while frontier:
        nxt = []
        for u in frontier:
            for v in mesh[u]:
                if v == first_from[u] or v == origin:
                    continue
                copies[v] = copies.get(v, 0) + 1
                if v not in first_from:
                    first_from[v] = u
                    nxt.append(v)
        frontier = nxt
    return set(first_from) - {origin}, copies


@dataclass
class TopicLoad:
    first: list[float]  # per node: new messages per publication of every publisher (once each)
    copies: list[float]  # per node: copies received
    ihave_ids: list[float]  # per node: message IDs announced to it, per message per publisher
    reach: float


def topic_load(n: int, members: list[int], publishers: list[int], adj: list[set[int]], rng: random.Random,
               max_sources: int) -> TopicLoad:
    """Per-node load when every publisher publishes one message on this topic (sampled publishers, scaled)."""
    first, copies, ihave = [0.0] * n, [0.0] * n, [0.0] * n
    if not members or not publishers:
        return TopicLoad(first, copies, ihave, 1.0)
    mesh = build_mesh(members, adj, rng)
    subs = set(members)
    src = publishers if len(publishers) <= max_sources else rng.sample(publishers, max_sources)
    scale = len(publishers) / len(src)
    reached = expected = 0
    for p in src:
        got, c = flood(mesh, p) if p in mesh else (set(), {})
        for v in got:
            first[v] += scale
        for v, k in c.items():
            copies[v] += k * scale
        reached += len(got & subs)
        expected += len(subs - {p})
    # IHAVE: each node announces every message it has (all reached members, ~all) 3 times to its gossip targets
    for u in members:
        non_mesh = [v for v in adj[u] if v in subs and v not in mesh[u]]
        if not non_mesh:
            continue
        g = min(len(non_mesh), max(6, int(0.25 * len(non_mesh))))  # _get_adaptive_gossip_peers_count, adaptive off
        for v in non_mesh:
            ihave[v] += GOSSIP_WINDOW * g / len(non_mesh) * len(publishers)
    return TopicLoad(first, copies, ihave, reached / expected if expected else 1.0)


# ---- sampling (real pool) ----------------------------------------------------------------------------------------


def tiny_batch(sender: Identity | str, round: int, groups: int, salt: int) -> RolloutBatch:
    pid = sender.peer_id if isinstance(sender, Identity) else sender
    rolls = tuple(Rollout(TaskRef.make("arith", {"digits": 2}, salt, round * 1000 + i),
                          tuple(f"{(salt + i + j) % 199}</s>" for j in range(8)), (0.0,) * 7 + (1.0,))
                  for i in range(groups))
    return RolloutBatch(pid, "sim", PROTOCOL_VERSION, round, time.time(), time.time_ns() // 1000 + salt, "tiny", rolls)


def observe(senders: list[int], groups: int, j: int, per_peer: int, rng: random.Random) -> tuple[int, int]:
    """Node 0's pool after one round of batches from `senders`: (groups that entered, candidates taken)."""
    pool = ExperiencePool(max_age_s=900.0)
    now = time.time()
    pool_in = sum(pool.add_batch(tiny_batch(f"peer-{s}", 1, groups, s), now) for s in senders)
    taken = pool.take(3 * j, rng=rng, max_per_sender=per_peer)
    return pool_in, len(taken)


# ---- one configuration -----------------------------------------------------------------------------------------


def simulate(n: int, shards: int, fanin: int, args: argparse.Namespace, seed: int) -> Row:
    rng = random.Random(seed)
    peers = [f"12D3KooWsim{seed}-{i}" for i in range(n)]
    home = [home_shard(p, shards) for p in peers]
    epochs = 1 if shards == 1 else args.epochs
    per_round = args.round_s / HELLO_INTERVAL_S  # Hellos per node per round on a node's Hello topic(s)
    acc: dict[str, list[float]] = {k: [0.0] * n for k in ("kb", "kb_new", "msgs", "batches", "dups", "ihave", "cpu")}
    reach: list[float] = []
    pool_in = taken = 0
    adj: list[set[int]] = []
    for e in range(epochs):
        subs = [subscribed_shards(p, shards, fanin, e) for p in peers]
        members = [[u for u in range(n) if s in subs[u]] for s in range(shards)]
        if e == 0:  # connections are made once, from the Hellos heard first (home-shard ones and the lobby's), and kept
            mates = [[v for v in range(n) if home[v] == home[u] and v != u] for u in range(n)] if shards > 1 else None
            adj = connect(n, rng, mates, 1)
        if shards > 1:
            reach_shards(adj, subs, home, members, rng, shards, shard_aware=args.known == "shard")
        topics = []  # (load, messages per publisher per round: batches, hellos)
        for s in range(shards):
            pubs = [u for u in range(n) if home[u] == s]
            topics.append((topic_load(n, members[s], pubs, adj, rng, args.max_sources), 1.0, per_round))
        if shards > 1:  # the lobby: everyone listens, everyone sends a Hello every 10 x S s
            topics.append((topic_load(n, list(range(n)), list(range(n)), adj, rng, args.max_sources), 0.0,
                           per_round / shards))
        for load, batches, hellos in topics:
            reach.append(load.reach)
            for v in range(n):
                dup = load.copies[v] - load.first[v]
                kb = (load.copies[v] * (batches * args.batch_kb * 1024 + hellos * args.hello_bytes)
                      + load.ihave_ids[v] * (batches + hellos) * MSG_ID_BYTES) / 1024
                acc["kb"][v] += kb / epochs
                acc["kb_new"][v] += load.first[v] * (batches * args.batch_kb * 1024 + hellos * args.hello_bytes) / 1024 / epochs
                acc["msgs"][v] += load.first[v] * (batches + hellos) / epochs
                acc["batches"][v] += load.first[v] * batches / epochs
                acc["dups"][v] += dup * (batches + hellos) / epochs
                acc["ihave"][v] += load.ihave_ids[v] * (batches + hellos) * MSG_ID_BYTES / 1024 / epochs
        # the observer's pool: batches from the publishers of the shards it listens to this epoch
        heard = [u for u in range(1, n) if home[u] in subs[0]]
        got_in, got_taken = observe(heard, args.groups, args.external, args.per_peer, rng)
        pool_in += got_in // epochs
        taken += got_taken // epochs
    for v in range(n):
        acc["cpu"][v] = acc["msgs"][v] * args.msg_ms + acc["dups"][v] * args.dup_ms + \
            acc["ihave"][v] * 1024 / MSG_ID_BYTES * args.id_us / 1000
    if shards == 1:
        senders = n - 1
    else:
        cover = epochs_to_cover(shards, fanin) or 1
        seen = {s for e in range(cover) for s in subscribed_shards(peers[0], shards, fanin, e)}
        senders = sum(1 for u in range(1, n) if home[u] in seen)
    cpu = statistics.mean(acc["cpu"])
    return Row(n=n, mode="1 topic" if shards == 1 else f"S={shards} k={min(fanin, shards)}", shards=shards,
               fanin=min(fanin, shards), kb_in=statistics.mean(acc["kb"]), kb_in_max=max(acc["kb"]),
               kb_accepted=statistics.mean(acc["kb_new"]),
               msgs=statistics.mean(acc["msgs"]), batches=statistics.mean(acc["batches"]),
               dups=statistics.mean(acc["dups"]), ihave_kb=statistics.mean(acc["ihave"]), cpu_ms=cpu,
               cpu_share=cpu / (args.round_s * 1000), pool_in=pool_in, taken=taken, trained=min(args.external, taken),
               delivery=min(reach), senders=senders)


def measure_validation_ms(reps: int = 200) -> tuple[float, int]:
    """In-process cost of the pure part of accepting one tiny batch: signature check + strict decode + checks."""
    ident = Identity.generate()
    big = RateLimit(1e9, 1e9, 1e12, 1e12, new_senders_per_s=1e9, new_senders_burst=1e9, total_msgs_per_s=0,
                    total_bytes_per_s=0)  # no limits: the cost of accepting, never a cheap "load" rejection
    val = MessageValidator("sim", PROTOCOL_VERSION, rate=big)
    datas = [seal(tiny_batch(ident, 1, 32, i), ident) for i in range(reps)]
    t0 = time.perf_counter()
    for d in datas:
        val.check(d, ident.peer_id)
    return (time.perf_counter() - t0) * 1000 / reps, len(datas[0])


# ---- report ------------------------------------------------------------------------------------------------------

HEADER = ("| N | topics | in KB/node/rnd (max) | accepted KB | new msgs/node/rnd (batches) | dup copies/node/rnd | IHAVE KB | "
          "CPU ms/node/rnd | % of a core | pool in/rnd | taken (3J) | trained J | delivery | senders heard |")


def fmt(r: Row) -> str:
    return (f"| {r.n} | {r.mode} | {r.kb_in:,.0f} ({r.kb_in_max:,.0f}) | {r.kb_accepted:,.0f} | {r.msgs:,.1f} ({r.batches:,.1f}) | "
            f"{r.dups:,.0f} | {r.ihave_kb:,.0f} | {r.cpu_ms:,.0f} | {100 * r.cpu_share:,.0f} % | {r.pool_in:,} | "
            f"{r.taken} | {r.trained} | {r.delivery:.3f} | {r.senders} |")


def auto_shards(n: int, shard_size: int) -> int:
    return max(1, round(n / shard_size))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16, 64, 256, 1000])
    ap.add_argument("--shard-size", type=int, default=16, help="sharded rows use S = round(N / this) (default 16)")
    ap.add_argument("--shards", type=int, default=0, help="a fixed S for the sharded rows instead (0 = auto)")
    ap.add_argument("--fanin", type=int, default=2, help="shards a node listens to (default 2, as --shard-fanin)")
    ap.add_argument("--epochs", type=int, default=3, help="rotation epochs simulated per sharded row (default 3)")
    ap.add_argument("--batch-kb", type=float, default=11.0, help="one node's rollout batch per round (docs/benchmarks.md)")
    ap.add_argument("--hello-bytes", type=int, default=372, help="a sealed Hello with one address")
    ap.add_argument("--round-s", type=float, default=1.7, help="round length (tiny model, 2 cores; sets the Hello rate)")
    ap.add_argument("--groups", type=int, default=32, help="groups per batch (tiny: 32 questions a round)")
    ap.add_argument("--external", type=int, default=16, help="J (tiny default 16)")
    ap.add_argument("--per-peer", type=int, default=8, help="max_external_per_peer (tiny default 8)")
    ap.add_argument("--msg-ms", type=float, default=9.7, help="CPU ms per accepted message (bench: 8.4-10.9)")
    ap.add_argument("--dup-ms", type=float, default=1.0, help="CPU ms per duplicate copy (assumed)")
    ap.add_argument("--id-us", type=float, default=2.0, help="CPU us per IHAVE message ID (assumed)")
    ap.add_argument("--max-sources", type=int, default=150, help="publishers flooded per topic (the rest scaled)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--known", choices=["shard", "lru"], default="shard",
                    help="Discovery.known: shard-aware (swarm.peerbook) or the old 128 most recently heard")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args()
    t0 = time.time()
    val_ms, size = measure_validation_ms()
    rows: list[Row] = []
    for n in args.nodes:
        rows.append(simulate(n, 1, 1, args, args.seed))
        s = args.shards or auto_shards(n, args.shard_size)
        if s > 1:
            rows.append(simulate(n, s, args.fanin, args, args.seed))
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for r in rows:
        print(fmt(r))
    print(f"\nper accepted message: {args.msg_ms} ms CPU (bench); of which MessageValidator.check of a {size}-byte "
          f"tiny batch in-process: {val_ms:.2f} ms. {time.time() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "validator_ms": val_ms,
                                               "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
