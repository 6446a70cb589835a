"""Simulate the gossip + sampling layer of N nodes in one process: how per-node load grows with the swarm.

    python scripts/scale_sim.py                                  # N = 4 ... 10,000, one topic vs sharded (~70 s of CPU)
    python scripts/scale_sim.py --nodes 16 1000 --shards 4       # a fixed shard count instead of N / --shard-size
    python scripts/scale_sim.py --json runs/scale.json --plot docs/img/scale_sim.png   # also the rows as JSON, a plot

No libp2p, no torch: the mesh is rebuilt here the way py-libp2p 0.8.1's gossipsub builds it with swarm/host.py's
settings; the discovery and shard choices are the project's own code (swarm.shards: home shard and fan-in schedule;
swarm.peerbook: each node's Discovery.known, a real PeerBook), and so is the sampling side (ExperiencePool,
MessageValidator). Per N and mode:

connections  Each node dials min(max_peers = 32, N - 1) peers found through Hellos (swarm/discovery.py) and accepts every
             inbound dial, so it has ~64 connections, made once and kept while the fan-in shards rotate. Sharded: half
             the dials go to home-shard mates (the Hellos a node hears most often), half to uniform peers; then, each
             epoch, Mesh._reach_shards: a node with fewer than 4 connected members on a shard it listens to dials
             members (swarm.shards of their peer ID and round) among the peers in its book. The book is a real
             swarm.peerbook.PeerBook of capacity_for(32, S) fed the Hellos the node hears: every node's lobby Hello
             (one shared random order: gossip brings them to everyone at about the same time), then its listened
             shards' Hellos, epoch by epoch (--known lru: the old shard-blind 128-entry list, as a one-shard PeerBook).
             Without _reach_shards rotated-in fan-in shards are often unreachable (delivery 0.42 at N = 1,000). The
             CPU of one _reach_shards pass over the observer's book (its line that computes every known peer's shards)
             is timed in-process, with today's swarm.shards and with the old order ("reach ms (old order)"), and
             charged every Hello interval.
topics       One topic (today), or S shard topics + a lobby (swarm/shards.py): a node publishes its batch and its Hello
             to its home shard, listens to its home shard + fanin - 1 rotating ones, and everyone listens to the lobby.
mesh         Per topic, among connected subscribers: each node GRAFTs random topic peers up to D = 6; a peer accepts
             while its mesh is below D_high = 12 (build_router).
delivery     A message floods its topic's mesh: the publisher sends a batch to every connected peer on the topic (flood
             publish, swarm.host FLOOD_PUBLISH_MIN_BYTES) and a Hello to its mesh peers, every node forwards the first
             copy to its mesh peers except the one it came from and the publisher. Every copy a node receives counts
             (bytes); the first is validated (CPU), later ones are duplicates. IDONTWANT (gossipsub 1.2) can stop some
             duplicates of large messages in flight, so duplicate counts are an upper bound.
gossip       Every heartbeat a node sends IHAVE with the IDs of its topic's batches from the last 3 heartbeats to
             max(6, 25 %) of its non-mesh topic peers: each batch ID is announced 3 times to each of them (48 bytes).
             Hellos (under swarm.host.IHAVE_MIN_BYTES) are not gossiped.
hellos       Every node sends a Hello every swarm.shards.hello_every(10 s, members of its home shard) (S = 1: on the
             one topic; sharded: on its home shard, and S times less often on the lobby): a topic carries
             HELLOS_PER_INTERVAL Hellos every 10 s at any size.
sampling     One observer node (node 0) puts what it accepted in a round into a real ExperiencePool and takes 3 x J
             candidates (at most max_external_per_peer per sender), as node/round.py does; it trains on J of them.
cpu          accepted messages x --msg-ms (whole-process CPU per gossip message measured by scripts/bench_swarm.py,
             docs/benchmarks.md: 8.4 ms at 4 nodes, 10.9 at 8; libp2p, signature checks, validation, pool) +
             duplicate copies x --dup-ms (assumed: Noise decrypt + protobuf parse + seen-cache lookup, no signature
             check or validation) + IHAVE IDs x --id-us (assumed) + the _reach_shards pass above. In-process, this script also times the pure part
             (MessageValidator.check of a sealed tiny batch: signature + strict decode) and prints it.

Rows give the mean over nodes (and the worst node for inbound KB); "senders" is how many other nodes' groups the
observer can ever receive: all N - 1 with one topic; with shards, those whose home shard it listens to over one full
rotation cycle (epochs_to_cover epochs). "delivery" is the worst topic and epoch (mean over all of them, weighted by
subscribers, in brackets). CPU time and peak memory of each N go to stderr. Cost: linear in N (the one-topic row's
lobby-sized floods dominate; --max-sources publishers are flooded per topic).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import resource
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
from swarm.peerbook import KnownPeer, PeerBook, capacity_for  # noqa: E402
from swarm.pool import ExperiencePool  # noqa: E402
from swarm.shards import _h64, epoch_of, epochs_to_cover, hello_every, home_shard, subscribed_shards  # noqa: E402
from swarm.validator import MessageValidator, RateLimit  # noqa: E402

D, D_HIGH = 6, 12  # swarm/host.py build_router
GOSSIP_WINDOW = 3  # heartbeats of message IDs in each IHAVE (build_router gossip_window)
MSG_ID_BYTES = 48  # 38-byte Ed25519 peer ID + 8-byte seqno + protobuf framing
MAX_PEERS = 32  # MeshConfig.max_peers: Discovery stops dialing here (inbound dials are still accepted)
HELLO_INTERVAL_S = 10.0  # MeshConfig.hello_interval_s
ROTATE_ROUNDS = 10  # MeshConfig.shard_rotate_rounds default


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
    delivery: float  # (message, subscriber) pairs reached / all, worst topic and epoch
    delivery_mean: float  # the same over all topics and epochs, weighted by subscribers
    senders: int  # other nodes the observer ever hears (over a full rotation cycle)
    book: int = 0  # peers in the observer's Discovery.known (swarm.peerbook.PeerBook)
    reach_ms: float = 0.0  # CPU ms of one _reach_shards pass over that book (every Hello interval)
    reach_ms_old: float = 0.0  # the same with the pre-aca2781 fan-in order
    sim_s: float = 0.0  # CPU seconds this row took to simulate


# ---- the mesh --------------------------------------------------------------------------------------------------


def connect(n: int, rng: random.Random, home: list[int] | None, by_home: list[list[int]] | None) -> list[set[int]]:
    """Discovery's first dials: min(max_peers, N - 1) per node, half to home-shard mates (the Hellos it hears most
    often) when sharded, half uniform; every inbound dial is accepted."""
    adj: list[set[int]] = [set() for _ in range(n)]
    want = min(MAX_PEERS, n - 1)
    for u in rng.sample(range(n), n):
        mates = by_home[home[u]] if by_home is not None and home is not None else None
        tries = 0
        while len(adj[u]) < want and tries < 20 * want:
            tries += 1
            v = rng.choice(mates) if mates and rng.random() < 0.5 else rng.randrange(n)
            if v != u:
                adj[u].add(v)
                adj[v].add(u)
    return adj


def clone_book(base: PeerBook) -> PeerBook:
    """A copy of a real PeerBook (its internals copied: the same state as re-adding the whole Hello stream that built
    `base`, at ~1 ms instead of ~70 ms per node at N = 10,000)."""
    b = PeerBook(base.capacity, base.shards)
    b._by_shard = {s: d.copy() for s, d in base._by_shard.items()}
    b._shard_of = dict(base._shard_of)
    b._with_count = {c: set(v) for c, v in base._with_count.items()}
    b._max = base._max
    return b


class Books:
    """Each node's Discovery.known, a real swarm.peerbook.PeerBook of capacity_for(max_peers, S), fed the Hellos it
    hears: the lobby's (every node's, once per S x 10 s; gossip delivers them to every node in about the same order, so
    one shared lobby stream in a random order), then, more recently, the Hellos on the shards it listens to (their
    home members', every 10 s), epoch after epoch. `--known lru`: the old book (the 128 most recently heard lobby
    heard, shard-blind), as a PeerBook with one shard, which is exactly that LRU list, fed the same Hellos."""

    def __init__(self, kps: list[KnownPeer], shards: int, rng: random.Random, shard_aware: bool) -> None:
        self.kps, self.shard_aware = kps, shard_aware
        cap = capacity_for(MAX_PEERS, shards) if shard_aware else 4 * MAX_PEERS
        self.lobby = PeerBook(cap, shards if shard_aware else 1)
        for i in rng.sample(range(len(kps)), len(kps)):
            self.lobby.add(kps[i])

    def of(self, u: int, heard_shards: list[tuple[int, ...]], by_home: list[list[int]], rng: random.Random) -> PeerBook:
        book = clone_book(self.lobby)
        book.remove(self.kps[u].peer_id)  # a node ignores its own Hello
        for shards_e in heard_shards:
            hellos = [v for s in shards_e for v in by_home[s] if v != u]
            rng.shuffle(hellos)
            for v in hellos:
                book.add(self.kps[v])
        return book


def reach_shards(adj: list[set[int]], subs: list[tuple[int, ...]], members: list[list[int]], books: Books,
                 subs_hist: list[list[tuple[int, ...]]], by_home: list[list[int]], peers: list[str],
                 rng: random.Random, want: int = 4) -> None:
    """Mesh._reach_shards: for each shard a node listens to with fewer than `want` connected members, dial peers of
    its book that listen to it (home or fan-in: swarm.shards.subscribed_shards of their peer ID and round), not yet
    connected. The candidates are members[s] that are in the book: the same set as the real loop over the book."""
    for u in range(len(adj)):
        book = None
        for s in subs[u]:
            mem = members[s]
            have = sum(1 for v in mem if v in adj[u])
            if have >= want:
                continue
            if book is None:
                book = books.of(u, [h[u] for h in subs_hist], by_home, rng)
            cands = [v for v in mem if v != u and v not in adj[u] and peers[v] in book]
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


def flood(mesh: dict[int, set[int]], origin: int, first_hop: set[int] | None = None) -> tuple[set[int], dict[int, int]]:
    """Who got the message, and how many copies each received (first + duplicates). first_hop: whom the origin
    sends to (its own batches go to every topic peer, swarm.host FLOOD_PUBLISH_MIN_BYTES; default its mesh)."""
    copies: dict[int, int] = {}
    first_from = {origin: origin}
    frontier = [origin]
    while frontier:
        nxt = []
        for u in frontier:
            for v in (first_hop if u == origin and first_hop is not None else mesh[u]):
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
    first: dict[int, float]  # per member: new messages per publication of every publisher (once each)
    copies: dict[int, float]  # per member: copies received of a batch (its publisher sends it to every topic peer)
    hello_copies: dict[int, float]  # per member: copies received of a Hello (mesh only)
    ihave_ids: dict[int, float]  # per member: message IDs announced to it, per message per publisher
    reach: float


def topic_load(members: list[int], publishers: list[int], adj: list[set[int]], rng: random.Random,
               max_sources: int) -> TopicLoad:
    """Per-member load when every publisher publishes one message on this topic (sampled publishers, scaled)."""
    first = {u: 0.0 for u in members}
    copies = dict(first)
    hello_copies = dict(first)
    ihave = dict(first)
    if not members or not publishers:
        return TopicLoad(first, copies, hello_copies, ihave, 1.0)
    mesh = build_mesh(members, adj, rng)
    subs = set(members)
    src = publishers if len(publishers) <= max_sources else rng.sample(publishers, max_sources)
    scale = len(publishers) / len(src)
    reached = expected = 0
    for p in src:
        got, c = flood(mesh, p, {v for v in adj[p] if v in subs}) if p in mesh else (set(), {})
        for v in got:
            first[v] += scale
        for v, k in c.items():
            copies[v] += k * scale
        for v, k in (flood(mesh, p)[1] if p in mesh else {}).items():
            hello_copies[v] += k * scale
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
    return TopicLoad(first, copies, hello_copies, ihave, reached / expected if expected else 1.0)


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
    t_start = time.process_time()
    rng = random.Random(seed)
    peers = [f"12D3KooWsim{seed}-{i}" for i in range(n)]
    home = [home_shard(p, shards) for p in peers]
    by_home: list[list[int]] = [[] for _ in range(shards)]
    for u, h in enumerate(home):
        by_home[h].append(u)
    epochs = 1 if shards == 1 else args.epochs
    # Hellos per node per round on its home topic: swarm.shards.hello_every of its home shard's size (a node spaces them
    # by the peers it knows there; here, all of them)
    per_round = [args.round_s / hello_every(HELLO_INTERVAL_S, len(by_home[s])) for s in range(shards)]
    acc: dict[str, list[float]] = {k: [0.0] * n for k in ("kb", "kb_new", "msgs", "batches", "dups", "ihave", "cpu")}
    reach: list[tuple[float, int]] = []  # (delivery, subscribers) per topic and epoch
    pool_in = taken = 0
    adj: list[set[int]] = []
    books: Books | None = None
    subs_hist: list[list[tuple[int, ...]]] = []
    reach_ms = reach_ms_old = 0.0
    book_len = 0
    for e in range(epochs):
        subs = [subscribed_shards(p, shards, fanin, e) for p in peers]
        subs_hist.append(subs)
        members: list[list[int]] = [[] for _ in range(shards)]
        for u, su in enumerate(subs):
            for s in su:
                members[s].append(u)
        if e == 0:  # connections are made once, from the Hellos heard first (home-shard ones and the lobby's), and kept
            adj = connect(n, rng, home if shards > 1 else None, by_home if shards > 1 else None)
            if shards > 1:
                rnd = e * ROTATE_ROUNDS
                books = Books([KnownPeer(p, (f"/ip4/10.0.0.1/tcp/{i}",), rnd, "tiny", 0.0) for i, p in enumerate(peers)],
                              shards, rng, shard_aware=args.known == "shard")
        if books is not None:
            reach_shards(adj, subs, members, books, subs_hist, by_home, peers, rng)
            if e == 0:
                reach_ms, reach_ms_old, book_len = time_reach(books.of(0, [h[0] for h in subs_hist], by_home, rng), shards, fanin)
        topics = []  # (load, messages per publisher per round: batches, hellos)
        for s in range(shards):
            topics.append((topic_load(members[s], by_home[s], adj, rng, args.max_sources), 1.0, per_round[s]))
        if shards > 1:  # the lobby: everyone listens, and sends its lobby Hello S times less often than its shard Hello
            topics.append((topic_load(list(range(n)), list(range(n)), adj, rng, args.max_sources), 0.0,
                           sum(per_round[home[u]] for u in range(n)) / n / shards))
        msg_b = args.batch_kb * 1024
        for load, batches, hellos in topics:
            reach.append((load.reach, len(load.first)))
            bytes_per = batches * msg_b + hellos * args.hello_bytes
            for v, first in load.first.items():
                copies, hcopies, ids = load.copies[v], load.hello_copies[v], load.ihave_ids[v]
                acc["kb"][v] += (copies * batches * msg_b + hcopies * hellos * args.hello_bytes
                                 + ids * batches * MSG_ID_BYTES) / 1024 / epochs
                acc["kb_new"][v] += first * bytes_per / 1024 / epochs
                acc["msgs"][v] += first * (batches + hellos) / epochs
                acc["batches"][v] += first * batches / epochs
                acc["dups"][v] += ((copies - first) * batches + (hcopies - first) * hellos) / epochs
                acc["ihave"][v] += ids * batches * MSG_ID_BYTES / 1024 / epochs
        # the observer's pool: batches from the publishers of the shards it listens to this epoch
        heard = [u for s in subs[0] for u in by_home[s] if u != 0]
        got_in, got_taken = observe(heard, args.groups, args.external, args.per_peer, rng)
        pool_in += got_in // epochs
        taken += got_taken // epochs
    reach_per_round = reach_ms * args.round_s / HELLO_INTERVAL_S  # _reach_shards runs every Hello interval
    for v in range(n):
        acc["cpu"][v] = acc["msgs"][v] * args.msg_ms + acc["dups"][v] * args.dup_ms + \
            acc["ihave"][v] * 1024 / MSG_ID_BYTES * args.id_us / 1000 + reach_per_round
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
               delivery=min(d for d, _ in reach),
               delivery_mean=sum(d * k for d, k in reach) / max(1, sum(k for _, k in reach)), senders=senders,
               book=book_len, reach_ms=reach_ms, reach_ms_old=reach_ms_old,
               sim_s=time.process_time() - t_start)


def fisher_yates_fanin(peer_id: str, shards: int, fanin: int, epoch: int) -> tuple[int, ...]:
    """swarm.shards.subscribed_shards before aca2781 (S - 1 sha256s a call), kept here only to time it."""
    home = home_shard(peer_id, shards)
    extra = min(fanin, shards) - 1
    if extra == 0:
        return (home,)
    others = [s for s in range(shards) if s != home]
    per_cycle = math.ceil(len(others) / extra)
    cycle, slot = divmod(max(0, int(epoch)), per_cycle)
    order = others[:]
    for i in range(len(order) - 1, 0, -1):
        j = _h64("order", peer_id, cycle, i) % (i + 1)
        order[i], order[j] = order[j], order[i]
    picked = order[slot * extra:(slot + 1) * extra]
    if len(picked) < extra:
        picked += [s for s in order if s not in picked][:extra - len(picked)]
    return (home, *sorted(picked))


def time_reach(book: PeerBook, shards: int, fanin: int) -> tuple[float, float, int]:
    """CPU ms of one Mesh._reach_shards pass over a node's book: its line that computes every known peer's shards
    (swarm/subscriptions.py), timed in-process with today's swarm.shards and with the old Fisher-Yates order (a sample)."""
    def one(fn, kps: list[KnownPeer]) -> float:  # CPU time (the machine is shared), best of 3
        best = math.inf
        for _ in range(3):
            t0 = time.thread_time()
            _ = [(k, fn(k.peer_id, shards, fanin, epoch_of(k.round, ROTATE_ROUNDS))) for k in kps if k.addrs]
            best = min(best, time.thread_time() - t0)
        return best * 1000
    kps = book.values()
    sample = kps[:200]
    old = one(fisher_yates_fanin, sample) * len(kps) / max(1, len(sample))
    return one(subscribed_shards, kps), old, len(kps)


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
          "CPU ms/node/rnd | % of a core | pool in/rnd | taken (3J) | trained J | delivery (mean) | senders heard | "
          "known peers | reach ms (old order) |")


def fmt(r: Row) -> str:
    return (f"| {r.n} | {r.mode} | {r.kb_in:,.0f} ({r.kb_in_max:,.0f}) | {r.kb_accepted:,.0f} | {r.msgs:,.1f} ({r.batches:,.1f}) | "
            f"{r.dups:,.0f} | {r.ihave_kb:,.0f} | {r.cpu_ms:,.0f} | {100 * r.cpu_share:,.0f} % | {r.pool_in:,} | "
            f"{r.taken} | {r.trained} | {r.delivery:.3f} ({r.delivery_mean:.4f}) | {r.senders} | "
            + (f"{r.book:,} | {r.reach_ms:,.1f} ({r.reach_ms_old:,.0f}) |" if r.shards > 1 else "- | - |"))


def plot(rows: list[Row], path: str) -> None:
    """Per-node inbound KB and CPU per round against N, one topic vs sharded, and the sharded rows' delivery."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    one = [r for r in rows if r.shards == 1]
    sh = [r for r in rows if r.shards > 1]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for rs, label, mk in ((one, "1 topic", "o-"), (sh, "sharded, S = N/16, k = 2", "s-")):
        ax[0].plot([r.n for r in rs], [r.kb_in for r in rs], mk, label=label)
        ax[1].plot([r.n for r in rs], [100 * r.cpu_share for r in rs], mk, label=label)
    ax[0].set(xscale="log", yscale="log", xlabel="nodes N", ylabel="inbound KB / node / round (every copy)",
              title="what one node receives")
    ax[1].set(xscale="log", yscale="log", xlabel="nodes N", ylabel="% of one core / node (1.7 s rounds)",
              title="what one node spends")
    ax[2].plot([r.n for r in sh], [r.delivery for r in sh], "s-", label="worst topic and epoch")
    ax[2].plot([r.n for r in sh], [r.delivery_mean for r in sh], "^--", label="mean")
    ax[2].axhline(0.99, color="grey", lw=0.8, ls=":")
    ax[2].set(xscale="log", ylim=(0.9, 1.005), xlabel="nodes N", ylabel="delivery", title="sharded: delivery")
    ns = sorted({r.n for r in rows})
    for a in ax:
        a.set_xticks(ns)
        a.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("scripts/scale_sim.py: gossip load per node as the swarm grows (tiny model inputs)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def auto_shards(n: int, shard_size: int) -> int:
    return max(1, round(n / shard_size))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16, 64, 256, 1000, 3000, 10000])
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
    ap.add_argument("--sharded-only", action="store_true", help="skip the one-topic rows")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    ap.add_argument("--plot", default="", help="also draw the rows to this PNG (matplotlib)")
    args = ap.parse_args()
    t0 = time.time()
    val_ms, size = measure_validation_ms()
    rows: list[Row] = []
    for n in args.nodes:
        if not args.sharded_only:
            rows.append(simulate(n, 1, 1, args, args.seed))
        s = args.shards or auto_shards(n, args.shard_size)
        if s > 1:
            rows.append(simulate(n, s, args.fanin, args, args.seed))
        print(f"N={n}: {', '.join(f'{r.mode} {r.sim_s:.0f} s' for r in rows if r.n == n)} of CPU, peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB", file=sys.stderr, flush=True)
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for r in rows:
        print(fmt(r))
    print(f"\nper accepted message: {args.msg_ms} ms CPU (bench); of which MessageValidator.check of a {size}-byte "
          f"tiny batch in-process: {val_ms:.2f} ms. {time.time() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "validator_ms": val_ms,
                                               "rows": [asdict(r) for r in rows]}, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
