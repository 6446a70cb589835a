"""Bounded, thread-safe pool of rollout groups received from peers.

Gossip arrives on the trio thread (`add_batch`); the learner draws its J external groups from a worker thread (`take`).
Everything is bounded (groups, bytes, per-peer share, age) so that a flood from one peer, or from many, costs a fixed
amount of memory and cannot crowd out the rest of the swarm for long.

Sybils (identities are free) are bounded by *age*, not identity: a sender first seen less than `probation_s` ago is
"young" (senders seen during the pool's own first `probation_s` are founders, not young: at start nobody is older than
anybody). Young senders' groups are counted per forwarder `via` (the connection that handed them to us), are evicted
first when the pool is full, and take together at most a quarter of a round's external slots, after established
senders. So minting keys behind one connection, or many, buys at most that quarter, and a flood of fresh identities
evicts only other fresh identities' groups. Among established senders, eviction takes from whoever holds the most.
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from protocol.messages import Rollout, RolloutBatch

GROUP_OVERHEAD_BYTES = 512  # bookkeeping per group (task ref, record, dicts): a rough, fixed charge
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

# Eviction causes, as they appear in `stats()["evicted"]`.
EVICT_STALE = "stale"
EVICT_PEER_QUOTA = "peer_quota"
EVICT_COUNT = "count"
EVICT_BYTES = "bytes"
EVICT_TOO_LARGE = "too_large"  # a single group larger than the whole byte budget: never stored
EVICT_YOUNG_QUOTA = "young_quota"  # young senders behind one forwarder over their shared quota

DEFAULT_PROBATION_S = 60.0
YOUNG_SHARE = 0.25  # of a round's external slots, for all young senders together
RELAYED_SHARE = 0.5  # ... for all groups that reached us through someone other than their sender
STALE_SCAN_S = 1.0  # a full scan for stale groups at most this often (it was O(pool) on every batch under a flood)


@dataclass(frozen=True)
class PooledGroup:
    rollout: Rollout
    sender: str
    sender_round: int
    sender_model: str
    received_at: float
    size: int  # bytes charged against the pool's budget
    via: str = ""  # the connected peer that handed it to us ("" : the sender itself)
    young: bool = False  # the sender was on probation when this group arrived


def group_size(rollout: Rollout) -> int:
    """Completion text bytes (UTF-8) plus a fixed overhead."""
    return GROUP_OVERHEAD_BYTES + sum(len(c.encode("utf-8")) for c in rollout.completions)


def group_key(rollout: Rollout) -> bytes:
    """Content identity of a group: task ref + the multiset of completions.

    Completions are sorted so that re-sharing someone else's group in a different order is still a duplicate; the sender
    and its reward opinion are deliberately left out.
    """
    t = rollout.task
    canon = [t.generator, [[k, v] for k, v in t.config], t.seed, t.index, sorted(rollout.completions)]
    return hashlib.sha256(json.dumps(canon, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).digest()


class ExperiencePool:
    """Rollout groups from peers, deduplicated by content, bounded, each handed out at most once.

    All public methods take one `threading.Lock`; a `predicate` passed to `take` runs under it and must not call back
    into the pool.
    """

    def __init__(
        self,
        max_groups: int = 4096,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_per_peer: int = 256,
        max_age_s: float = 900.0,
        clock: Callable[[], float] = time.time,
        max_seen: int | None = None,
        probation_s: float = DEFAULT_PROBATION_S,
        max_senders: int = 4096,
    ) -> None:
        if max_groups < 1 or max_bytes < 1 or max_per_peer < 1 or max_age_s <= 0 or probation_s < 0:
            raise ValueError("pool bounds must be positive")
        self.max_groups = max_groups
        self.max_bytes = max_bytes
        self.max_per_peer = max_per_peer
        self.max_age_s = float(max_age_s)
        self._clock = clock
        self.probation_s = float(probation_s)
        self._max_senders = max_senders
        self._created = clock()
        self._first_seen: OrderedDict[str, float] = OrderedDict()  # sender -> first time we got a batch from it
        self._young_by_via: dict[str, OrderedDict[int, None]] = {}
        self._last_stale_scan = float("-inf")
        # Remembered keys outlive the groups (taken or evicted) so a re-share is not trained on twice.
        self._max_seen = max_seen if max_seen is not None else max(4 * max_groups, 16_384)
        self._lock = threading.Lock()
        self._next_id = 0
        self._groups: OrderedDict[int, PooledGroup] = OrderedDict()  # insertion order = age order
        self._keys: dict[int, bytes] = {}
        self._by_key: dict[bytes, int] = {}
        self._by_sender: dict[str, OrderedDict[int, None]] = {}
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._bytes = 0
        self._added = 0
        self._duplicates = 0
        self._taken = 0
        self._evicted: dict[str, int] = {
            EVICT_STALE: 0, EVICT_PEER_QUOTA: 0, EVICT_COUNT: 0, EVICT_BYTES: 0, EVICT_TOO_LARGE: 0,
            EVICT_YOUNG_QUOTA: 0,
        }

    # -- public API -------------------------------------------------------------------------------------------------

    def add_batch(self, batch: RolloutBatch, received_at: float, via: str | None = None) -> int:
        """Add a verified batch's groups; returns how many were new and stored.

        `via` is the connected peer that relayed the batch (None: the sender itself)."""
        with self._lock:
            now = self._clock()
            if now - self._last_stale_scan >= STALE_SCAN_S:
                self._evict_stale_locked(now)
            if received_at + self.max_age_s < now:
                self._evicted[EVICT_STALE] += len(batch.rollouts)
                return 0
            via = batch.sender if via is None else via
            young = self._is_young_locked(batch.sender, now)
            added = 0
            for rollout in batch.rollouts:
                key = group_key(rollout)
                if key in self._by_key or key in self._seen:
                    self._duplicates += 1
                    continue
                self._remember(key)
                size = group_size(rollout)
                if size > self.max_bytes:
                    self._evicted[EVICT_TOO_LARGE] += 1
                    continue
                group = PooledGroup(rollout, batch.sender, batch.round, batch.model, float(received_at), size,
                                    via, young)
                self._insert(key, group)
                added += 1
                self._enforce_bounds(group)
            self._added += added
            return added

    def take(
        self,
        n: int,
        *,
        rng: random.Random,
        max_per_sender: int | None = None,
        predicate: Callable[[PooledGroup], bool] | None = None,
        slots: int | None = None,
    ) -> list[PooledGroup]:
        """Remove and return up to `n` groups drawn uniformly without replacement (after dropping stale ones).

        Only groups passing `predicate` are eligible; at most `max_per_sender` come from any one sender in this call.
        Order of preference, each tier shuffled: established senders that handed us their groups themselves, then
        established senders' groups relayed by someone else, then young senders' groups (see the module doc). Relayed
        groups take at most max(1, slots * RELAYED_SHARE) places and young ones max(1, slots * YOUNG_SHARE), where
        `slots` (default n) is how many the caller will train on when it draws extra candidates; young ones at most
        `max_per_sender` per forwarder: identities minted behind connections we have cannot outnumber the peers we
        talk to. The result is in draw order and depends only on the pool's contents and `rng`.
        """
        if n <= 0:
            return []
        with self._lock:
            now = self._clock()
            self._evict_stale_locked(now)
            eligible = [gid for gid, g in self._groups.items() if predicate is None or predicate(g)]
            rng.shuffle(eligible)
            groups = self._groups
            eligible.sort(key=lambda gid: (groups[gid].young, groups[gid].via != groups[gid].sender))  # stable
            k = n if slots is None else max(1, min(n, slots))
            young_cap, relayed_cap = max(1, int(k * YOUNG_SHARE)), max(1, int(k * RELAYED_SHARE))
            chosen: list[int] = []
            per_sender: dict[str, int] = {}
            per_via: dict[str, int] = {}
            n_young = n_relayed = 0
            for gid in eligible:
                g = groups[gid]
                relayed = g.via != g.sender
                if max_per_sender is not None and per_sender.get(g.sender, 0) >= max_per_sender:
                    continue
                if relayed and n_relayed >= relayed_cap:
                    continue
                if g.young:
                    if n_young >= young_cap:
                        break  # young groups are last in line: nothing eligible follows
                    if max_per_sender is not None and per_via.get(g.via, 0) >= max_per_sender:
                        continue
                    per_via[g.via] = per_via.get(g.via, 0) + 1
                    n_young += 1
                n_relayed += relayed
                per_sender[g.sender] = per_sender.get(g.sender, 0) + 1
                chosen.append(gid)
                if len(chosen) >= n:
                    break
            out = [self._remove(gid) for gid in chosen]
            self._taken += len(out)
            return out

    def evict_stale(self) -> int:
        """Drop groups received more than `max_age_s` ago; returns how many."""
        with self._lock:
            return self._evict_stale_locked(self._clock())

    def __len__(self) -> int:
        with self._lock:
            return len(self._groups)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> dict:
        """JSON-able counters for logs and the status line."""
        with self._lock:
            return {
                "groups": len(self._groups),
                "bytes": self._bytes,
                "per_sender": {s: len(ids) for s, ids in sorted(self._by_sender.items())},
                "young_groups": sum(len(ids) for ids in self._young_by_via.values()),
                "evicted": dict(self._evicted),
                "added": self._added,
                "duplicates": self._duplicates,
                "taken": self._taken,
            }

    def is_young(self, sender: str) -> bool:
        """True while `sender` is on probation (see the module doc)."""
        with self._lock:
            return self._is_young_locked(sender, self._clock())

    # -- internals (lock held) --------------------------------------------------------------------------------------

    def _is_young_locked(self, sender: str, now: float) -> bool:
        first = self._first_seen.get(sender)
        if first is None:
            first = self._first_seen[sender] = now
            while len(self._first_seen) > self._max_senders:  # forgetting a sender makes it young again: safe side
                self._first_seen.popitem(last=False)
        if first - self._created < self.probation_s:
            return False  # a founder: seen while this pool was itself new
        return now - first < self.probation_s

    def _remember(self, key: bytes) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_seen:
            self._seen.popitem(last=False)

    def _insert(self, key: bytes, group: PooledGroup) -> None:
        gid = self._next_id
        self._next_id += 1
        self._groups[gid] = group
        self._keys[gid] = key
        self._by_key[key] = gid
        self._by_sender.setdefault(group.sender, OrderedDict())[gid] = None
        if group.young:
            self._young_by_via.setdefault(group.via, OrderedDict())[gid] = None
        self._bytes += group.size

    def _remove(self, gid: int) -> PooledGroup:
        group = self._groups.pop(gid)
        key = self._keys.pop(gid)
        del self._by_key[key]
        ids = self._by_sender[group.sender]
        del ids[gid]
        if not ids:
            del self._by_sender[group.sender]
        if group.young:
            yids = self._young_by_via[group.via]
            del yids[gid]
            if not yids:
                del self._young_by_via[group.via]
        self._bytes -= group.size
        return group

    def _enforce_bounds(self, group: PooledGroup) -> None:
        ids = self._by_sender.get(group.sender)
        while ids is not None and len(ids) > self.max_per_peer:
            self._remove(next(iter(ids)))
            self._evicted[EVICT_PEER_QUOTA] += 1
            ids = self._by_sender.get(group.sender)
        yids = self._young_by_via.get(group.via) if group.young else None
        while yids is not None and len(yids) > self.max_per_peer:  # one quota for all young senders behind a via
            self._remove(next(iter(yids)))
            self._evicted[EVICT_YOUNG_QUOTA] += 1
            yids = self._young_by_via.get(group.via)
        while len(self._groups) > self.max_groups:
            self._remove(self._eviction_victim())
            self._evicted[EVICT_COUNT] += 1
        while self._bytes > self.max_bytes:
            self._remove(self._eviction_victim())
            self._evicted[EVICT_BYTES] += 1

    def _eviction_victim(self) -> int:
        """Who pays when the pool is full: young senders first (the forwarder holding most of them), then the
        established sender holding the most groups, oldest group first. A flood can only evict itself or its peers
        in size, never a small established sender."""
        if self._young_by_via:
            ids = max(self._young_by_via.values(), key=len)
        else:
            ids = max(self._by_sender.values(), key=len)
        return next(iter(ids))

    def _evict_stale_locked(self, now: float) -> int:
        # received_at is caller-supplied and need not be monotonic, so scan everything (bounded by max_groups).
        self._last_stale_scan = now
        cutoff = now - self.max_age_s
        stale = [gid for gid, g in self._groups.items() if g.received_at < cutoff]
        for gid in stale:
            self._remove(gid)
        self._evicted[EVICT_STALE] += len(stale)
        return len(stale)
