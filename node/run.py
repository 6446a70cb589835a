"""The node's runtime: one trio nursery holding the mesh, the pool feeder, the publisher, the status server, the signal
watcher and the round loop. Torch work runs in worker threads (see node.round), so gossip never waits on training and
a round never waits on the network.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import signal
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

import torch
import trio

from node.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, snapshot, sweep_leftovers
from node.config import NodeConfig, data_dir
from node.learner import Learner, ScoredGroup
from node.policy import Policy
from node.round import run_round
from node.status import serve_status
from protocol.identity import Identity
from protocol.messages import RolloutBatch
from swarm.pool import ExperiencePool, PooledGroup
from swarm.receipts import RECEIPTS_ENV

log = logging.getLogger("swarm_node")

HISTORY = 500  # rounds of reward history kept for status and checkpoints
CURVE_ROUNDS = 2000  # rounds the dashboard's curves keep (a few numbers each: ~0.5 MB at most)
CURVE_KEYS = ("round", "time", "reward_mean", "heldout_acc", "wall_s", "gen_s", "train_s", "net_wait_s", "n_local",
              "n_external", "peers", "rollouts_in", "rollouts_out")


class NodeRuntime:
    def __init__(self, cfg: NodeConfig, identity: Identity, policy: Policy, *, on_round: Callable[[dict], None] | None = None):
        cfg = cfg.with_seed_for(identity.peer_id)  # no --seed: this node's own (checkpoints record the resolved one)
        self.cfg = cfg
        self.identity = identity
        self.policy = policy
        self.rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.learner = Learner(policy, cfg, self.rng)
        self.pool = ExperiencePool(max_age_s=cfg.max_staleness_s, probation_s=cfg.newcomer_probation_s)
        self.mesh: Any = None  # swarm.mesh.Mesh when online
        self.on_round = on_round
        self.round = 0  # next round to run
        self.last_saved: int | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.started_at = time.time()
        self.stop_requested = False
        self.inbound_groups = 0  # groups added to the pool since the last round
        self.received_from: Counter[str] = Counter()  # groups accepted into the pool, by the peer that made them
        self.refused_refs: Counter[str] = Counter()  # peers' groups refused before the pool, by reason
        self.trained_from: Counter[str] = Counter()  # peers' groups trained on, by the peer that made them
        self.useful_from: Counter[str] = Counter()  # peers' groups that rescored with a signal for us, by maker
        self.last_heard: dict[str, float] = {}  # peer -> when a batch from it last reached the pool (time.time())
        self.curves: deque[dict[str, Any]] = deque(maxlen=CURVE_ROUNDS)  # the dashboard's per-round rows
        self.totals = {"rollouts_in": 0, "rollouts_out": 0, "rounds": 0}
        self._publish_send, self._publish_recv = trio.open_memory_channel[tuple[int, list]](4)
        self.dropped_publishes = 0
        self.checkpoint_dir = Path(cfg.checkpoint_dir or data_dir() / "checkpoints" / cfg.swarm)
        self._saved_at = time.monotonic()
        self._writing = trio.Event()  # set when no background checkpoint write is in flight
        self._writing.set()
        self._nursery: trio.Nursery | None = None

    # -- resume / checkpoint ------------------------------------------------------------------------------------
    def resume(self) -> int | None:
        """Loads the newest complete checkpoint; returns its round or None when there is none."""
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return None
        state = load_checkpoint(
            path, model=self.policy.model, optimizer=self.learner.trainer.optimizer, rng=self.rng,
            expected_model_name=self.cfg.model,
        )
        self.round = int(state["round"]) + 1
        self.last_saved = int(state["round"])
        extra = state.get("extra", {})
        self.history.extend(extra.get("history", []))
        # the dashboard's curves carry on from the whole saved run (older checkpoints: their last 100 rounds)
        self.curves.extend(extra.get("curves") or [curve_row(h) for h in self.history])
        log.info("resumed from %s (after round %d)", path, self.round)  # logs count rounds from 1
        return self.last_saved

    def checkpoint_due(self, r: int) -> bool:
        """After round r: every --checkpoint-every rounds, or sooner once --checkpoint-interval-s of work is unsaved
        (long rounds on a real model would otherwise risk several rounds of work between checkpoints)."""
        if (r + 1) % self.cfg.checkpoint_every == 0:
            return True
        interval = self.cfg.checkpoint_interval_s
        return interval > 0 and time.monotonic() - self._saved_at >= interval

    async def checkpoint(self, r: int, latest: dict[str, Any] | None = None, *, background: bool = False) -> None:
        """Saves round r; `latest` is round r's metrics when they are not in the history yet.

        background=True copies the state (a memcpy) and writes it while the next round runs; one write at a time, so
        a due checkpoint waits for the one before it. A kill during a write leaves the previous checkpoint intact.
        """
        if self.last_saved == r:
            return
        await self._writing.wait()
        if self.last_saved == r:  # the write we waited for was this round's
            return
        history = list(self.history) + ([latest] if latest is not None else [])
        curves = list(self.curves) + ([curve_row(latest)] if latest is not None else [])
        extra = {"history": _jsonable_rows(history[-100:]), "curves": curves[-CURVE_ROUNDS:]}
        snap = await trio.to_thread.run_sync(
            lambda: snapshot(self.policy.model, self.learner.trainer.optimizer, self.rng))
        self._saved_at = time.monotonic()  # the work up to here is in the snapshot

        def write() -> None:
            save_checkpoint(
                self.checkpoint_dir, round=r, model=snap.model, optimizer=snap.optimizer, config=self.cfg.to_json(),
                model_name=self.cfg.model, rng=None, rng_state=snap.rng_state, extra=extra,
                keep=self.cfg.keep_checkpoints,
            )

        if not background or self._nursery is None:
            await trio.to_thread.run_sync(write)
            self.last_saved = r
            return
        done = self._writing = trio.Event()

        async def write_in_background() -> None:
            try:
                await trio.to_thread.run_sync(write)
                self.last_saved = r
            except Exception as e:  # a full disk costs this checkpoint, never the node; the next one tries again
                log.error("checkpoint of round %d failed: %s", r + 1, e)
            finally:
                done.set()

        self._nursery.start_soon(write_in_background)

    # -- what the round loop asks of the network -----------------------------------------------------------------
    def share(self, r: int, groups: list[ScoredGroup]) -> int:
        if self.mesh is None or self.cfg.share == "none":
            return 0
        chosen = [g for g in groups if self.cfg.share == "all" or g.has_signal]
        try:  # the publisher paces sends; if it is still busy with old rounds, newer rollouts win
            self._publish_send.send_nowait((r, [g.to_rollout() for g in chosen]))
        except trio.WouldBlock:
            self.dropped_publishes += 1
            return 0
        return len(chosen)

    def collect(self, n: int, predicate: Callable[[PooledGroup], bool] | None = None) -> list[PooledGroup]:
        """Up to n peers' groups; `predicate` (node.mix: the sender's claimed rewards say there is something to learn)
        only narrows which pooled groups are candidates; everything taken is still rescored before it counts."""
        if n <= 0 or self.mesh is None:
            return []
        # candidates beyond J are drawn for rescoring, but the young/relayed caps are shares of the J slots themselves
        return self.pool.take(n, rng=self.rng, max_per_sender=self.cfg.max_external_per_peer, slots=self.cfg.external,
                              predicate=predicate)

    def peer_count(self) -> int:
        return len(self.mesh.peers()) if self.mesh is not None else 0

    def take_inbound_count(self) -> int:
        n, self.inbound_groups = self.inbound_groups, 0
        return n

    # -- background tasks -----------------------------------------------------------------------------------------
    async def _feed_pool(self) -> None:
        async for rec in self.mesh.incoming:
            batch = self._admissible(rec.batch)
            added = self.pool.add_batch(batch, rec.received_at, via=rec.via or None)
            self.inbound_groups += added
            self.received_from[rec.from_peer] += added
            self.last_heard[rec.from_peer] = time.time()
            self.totals["rollouts_in"] += added

    def _admissible(self, batch: RolloutBatch) -> RolloutBatch:
        """The batch without groups on refs we would never train on (held-out, other families or configs): they must
        not take pool space from groups we can use."""
        kept = []
        for rollout in batch.rollouts:
            why = self.learner.foreign_reason(rollout.task)
            if why is None:
                kept.append(rollout)
            else:
                self.refused_refs[why] += 1
        return batch if len(kept) == len(batch.rollouts) else dataclasses.replace(batch, rollouts=tuple(kept))

    async def _publish(self) -> None:
        async for r, rollouts in self._publish_recv:
            try:
                await self.mesh.publish_rollouts(r, self.cfg.model, rollouts)
                self.totals["rollouts_out"] += len(rollouts)
            except Exception as e:  # a failed publish costs one round's sharing, never the node
                log.warning("publishing round %d failed: %s", r + 1, e)

    async def _watch_signals(self, cancel: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.stop_requested:
                    log.warning("second %s: stopping now without a checkpoint", signal.Signals(signum).name)
                    os._exit(130)
                log.warning("%s received: finishing this step, checkpointing, stopping", signal.Signals(signum).name)
                self.stop_requested = True

    # -- status ---------------------------------------------------------------------------------------------------
    def rejections(self, mesh_stats: dict[str, Any] | None = None) -> dict[str, int]:
        """Rejections by reason: the swarm layer's, then rescoring's (as "rescore:<reason>")."""
        if mesh_stats is None:
            mesh_stats = self.mesh.stats() if self.mesh is not None else {}
        out = dict(mesh_stats.get("rejections_by_reason", {}))
        rescored = self.learner.rejected + self.refused_refs
        out.update({f"rescore:{k}": v for k, v in rescored.items()})
        return out

    def status(self) -> dict[str, Any]:
        mesh_stats = self.mesh.stats() if self.mesh is not None else {}
        rejections = self.rejections(mesh_stats)
        uptime = time.time() - self.started_at
        return {
            "peer_id": self.identity.peer_id,
            "public_key": self.identity.public_key.hex(),
            "swarm": self.cfg.swarm,
            "model": self.cfg.model,
            "listen_addrs": self.mesh.listen_addrs() if self.mesh is not None else [],
            "peers": self.mesh.peers() if self.mesh is not None else [],
            "round": self.round,
            "rounds_target": self.cfg.rounds,
            "reward_history": [[h["round"], round(h["reward_mean"], 4)] for h in self.history],
            "last_round": self.history[-1] if self.history else None,
            "pool": self.pool.stats(),
            "received_from": dict(self.received_from),
            "trained_from": dict(self.trained_from),
            "useful_from": dict(self.useful_from),
            "last_heard_s": {p: round(time.time() - t, 1) for p, t in self.last_heard.items()},
            "rejections": rejections,
            "mesh": mesh_stats,
            "throughput": {
                "uptime_s": round(uptime, 1),
                "rounds": self.totals["rounds"],
                "rollouts_in": self.totals["rollouts_in"],
                "rollouts_out": self.totals["rollouts_out"],
                "rounds_per_min": round(60 * self.totals["rounds"] / max(uptime, 1e-9), 2),
                "dropped_publishes": self.dropped_publishes,
            },
            "checkpoint": {"dir": str(self.checkpoint_dir), "last_round": self.last_saved},
        }

    def history_since(self, since: int) -> dict[str, Any]:
        """The dashboard's rows from round `since` (0-based) on; `next` is the round to ask from next time, so a page
        polling every few seconds gets only the rounds it has not drawn yet."""
        rows = []
        for row in reversed(self.curves):  # newest first: a poll usually wants the last row or two
            if row["round"] < since:
                break
            rows.append(row)
        rows.reverse()
        return {"rows": rows, "next": self.round, "max_rows": CURVE_ROUNDS}

    # -- the run --------------------------------------------------------------------------------------------------
    async def run(self, *, on_ready: Callable[["NodeRuntime"], None] | None = None,
                  on_listening: Callable[["NodeRuntime"], None] | None = None) -> None:
        """Run until the rounds are done or a signal stops it. `on_listening`: the mesh listens (called before the
        --min-peers wait, so a peer waiting for our address can read it); `on_ready`: the first round is next."""
        # checkpoints are written in the background, after the round's metrics line: sweep a crashed write's
        # leftovers now, while nothing is being written
        await trio.to_thread.run_sync(sweep_leftovers, self.checkpoint_dir)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            if not self.cfg.offline:
                from swarm.mesh import Mesh, MeshConfig

                self.mesh = Mesh(
                    self.identity,
                    MeshConfig(
                        swarm=self.cfg.swarm, listen=self.cfg.listen, bootstrap=tuple(self.cfg.bootstrap),
                        max_age_s=self.cfg.max_staleness_s, mdns=self.cfg.mdns, max_peers=self.cfg.max_peers,
                        shards=self.cfg.shards,
                        shard_fanin=self.cfg.shard_fanin, shard_rotate_rounds=self.cfg.shard_rotate_rounds,
                        ping_interval_s=self.cfg.ping_interval_s, ping_timeout_s=self.cfg.ping_timeout_s,
                        receipts=os.environ.get(RECEIPTS_ENV, ""),
                    ),
                )
                await nursery.start(self.mesh.run)
                self.mesh.set_status(self.round, self.cfg.model)
                if on_listening is not None:
                    on_listening(self)
                nursery.start_soon(self._feed_pool)
                nursery.start_soon(self._publish)
                await self._wait_for_peers()
            if self.cfg.status_port:
                await nursery.start(serve_status, self.cfg.status_port, self.status, self.history_since)
            if on_ready is not None:
                on_ready(self)
            await self._round_loop()
            nursery.cancel_scope.cancel()

    async def _wait_for_peers(self) -> None:
        if self.cfg.min_peers <= 0:
            return
        with trio.move_on_after(self.cfg.peer_wait_s):
            while len(self.mesh.peers()) < self.cfg.min_peers and not self.stop_requested:
                await trio.sleep(0.2)
        if len(self.mesh.peers()) < self.cfg.min_peers:
            log.warning("only %d of %d peers after %.0fs: starting anyway", len(self.mesh.peers()), self.cfg.min_peers,
                        self.cfg.peer_wait_s)

    async def _pace(self, until: float) -> None:
        """Idles until a round may start (--min-round-s; the mesh keeps serving meanwhile); a stop ends the wait."""
        while not self.stop_requested and trio.current_time() < until:
            await trio.sleep(min(0.2, until - trio.current_time()))

    async def _round_loop(self) -> None:
        from node.tracking import Trackers

        trackers = Trackers(self.cfg, self.identity.peer_id)  # before the first round: a missing extra stops us now
        metrics_file = open(self.cfg.metrics, "a", buffering=1) if self.cfg.metrics else None
        try:
            next_start = trio.current_time()
            while not self.stop_requested and (self.cfg.rounds == 0 or self.round < self.cfg.rounds):
                await self._pace(next_start)
                if self.stop_requested:
                    break
                next_start = trio.current_time() + self.cfg.min_round_s
                r = self.round
                m = await run_round(self, r)
                m["time"] = round(time.time(), 3)
                self.history.append(m)
                self.curves.append(curve_row(m))
                self.totals["rounds"] += 1
                self.round = r + 1
                if self.mesh is not None:
                    self.mesh.set_status(self.round, self.cfg.model)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(_jsonable(m)) + "\n")
                trackers.log(m, self)
                if self.on_round is not None:
                    self.on_round(m)
            if self.round > 0:
                await self.checkpoint(self.round - 1)  # the last finished round, before anything else stops
        finally:
            trackers.close()
            if metrics_file is not None:
                metrics_file.close()


def curve_row(m: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of one round's metrics that the dashboard draws (JSON-safe)."""
    return _jsonable({k: m[k] for k in CURVE_KEYS if k in m})


def _jsonable_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [_jsonable(m) for m in rows]


def _jsonable(m: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in m.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        elif isinstance(v, torch.Tensor):
            v = v.item()
        out[k] = v
    return out
