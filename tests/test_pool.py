"""Experience pool: bounds, quotas, dedup, staleness, sampling and thread safety."""
from __future__ import annotations

import json
import random
import threading

import pytest

from protocol.messages import Rollout, RolloutBatch, TaskRef
from swarm.pool import GROUP_OVERHEAD_BYTES, ExperiencePool, PooledGroup, group_size


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rollout(i: int, completions: tuple[str, ...] | None = None, gen: str = "basic_arithmetic") -> Rollout:
    task = TaskRef.make(gen, {"size": 10}, seed=7, index=i)
    return Rollout(task, completions if completions is not None else (f"a{i}", f"b{i}"), None)


def batch(sender: str, rollouts: list[Rollout], rnd: int = 3, model: str = "m") -> RolloutBatch:
    return RolloutBatch(sender, "swarm", 1, rnd, 0.0, 1, model, tuple(rollouts))


def test_group_size_is_text_bytes_plus_overhead() -> None:
    r = rollout(0, ("héllo", "ab"))
    assert group_size(r) == GROUP_OVERHEAD_BYTES + 6 + 2


def test_add_records_metadata() -> None:
    clock = FakeClock()
    pool = ExperiencePool(clock=clock)
    assert pool.add_batch(batch("peerA", [rollout(0), rollout(1)], rnd=9, model="qwen"), received_at=1000.0) == 2
    assert len(pool) == 2
    assert pool.nbytes == 2 * (GROUP_OVERHEAD_BYTES + 4)
    got = pool.take(5, rng=random.Random(0))
    assert len(got) == 2 and len(pool) == 0 and pool.nbytes == 0
    g = got[0]
    assert isinstance(g, PooledGroup)
    assert (g.sender, g.sender_round, g.sender_model, g.received_at) == ("peerA", 9, "qwen", 1000.0)


def test_count_bound_evicts_oldest_of_the_largest_holder() -> None:
    clock = FakeClock()
    pool = ExperiencePool(max_groups=5, max_per_peer=100, clock=clock)
    assert pool.add_batch(batch("A", [rollout(i) for i in range(4)]), clock.t) == 4
    assert pool.add_batch(batch("B", [rollout(i) for i in range(10, 14)]), clock.t) == 4
    assert len(pool) == 5
    left = sorted(g.rollout.task.index for g in pool.take(10, rng=random.Random(1)))
    # the newcomer B does not push A out wholesale: each loses its oldest groups until they hold a fair share
    assert left == [2, 3, 11, 12, 13]
    assert pool.stats()["evicted"]["count"] == 3


def test_byte_bound_evicts_oldest() -> None:
    clock = FakeClock()
    each = GROUP_OVERHEAD_BYTES + 200
    pool = ExperiencePool(max_bytes=3 * each + 10, clock=clock)
    for i in range(5):
        pool.add_batch(batch("A", [rollout(i, ("x" * 100, f"{i:0100d}"))]), clock.t)
    assert len(pool) == 3 and pool.nbytes == 3 * each
    assert sorted(g.rollout.task.index for g in pool.take(10, rng=random.Random(0))) == [2, 3, 4]
    assert pool.stats()["evicted"]["bytes"] == 2


def test_group_larger_than_budget_is_rejected() -> None:
    pool = ExperiencePool(max_bytes=GROUP_OVERHEAD_BYTES + 10, clock=FakeClock())
    assert pool.add_batch(batch("A", [rollout(0, ("y" * 50,))]), 1000.0) == 0
    assert len(pool) == 0 and pool.stats()["evicted"]["too_large"] == 1


def test_per_peer_quota_evicts_that_peers_oldest() -> None:
    clock = FakeClock()
    pool = ExperiencePool(max_per_peer=3, clock=clock)
    pool.add_batch(batch("B", [rollout(100)]), clock.t)
    assert pool.add_batch(batch("A", [rollout(i) for i in range(5)]), clock.t) == 5
    st = pool.stats()
    assert st["per_sender"] == {"A": 3, "B": 1}
    assert st["evicted"]["peer_quota"] == 2
    a = sorted(g.rollout.task.index for g in pool.take(10, rng=random.Random(0)) if g.sender == "A")
    assert a == [2, 3, 4]


def test_dedup_within_across_senders_and_after_take() -> None:
    clock = FakeClock()
    pool = ExperiencePool(clock=clock)
    r = rollout(1, ("x", "y"))
    assert pool.add_batch(batch("A", [r, r]), clock.t) == 1
    # Another peer re-sharing the same content, even reordered and with other reward opinions, adds nothing.
    reshared = Rollout(r.task, ("y", "x"), (1.0, 0.0))
    assert pool.add_batch(batch("B", [reshared]), clock.t) == 0
    assert len(pool) == 1
    assert pool.take(1, rng=random.Random(0))[0].sender == "A"
    assert pool.add_batch(batch("C", [r]), clock.t) == 0  # already taken: not trained on twice
    # Same completions for a different task, or different completions, are distinct.
    assert pool.add_batch(batch("C", [rollout(2, ("x", "y")), rollout(1, ("x", "z"))]), clock.t) == 2
    st = pool.stats()
    assert st["duplicates"] == 3 and st["added"] == 3 and st["taken"] == 1


def test_seen_set_is_bounded() -> None:
    clock = FakeClock()
    pool = ExperiencePool(max_seen=4, clock=clock)
    pool.add_batch(batch("A", [rollout(i) for i in range(6)]), clock.t)
    pool.take(6, rng=random.Random(0))
    assert pool.add_batch(batch("A", [rollout(0)]), clock.t) == 1  # forgotten after 4 newer keys
    assert pool.add_batch(batch("A", [rollout(5)]), clock.t) == 0  # still remembered


def test_stale_eviction_with_fake_clock() -> None:
    clock = FakeClock(1000.0)
    pool = ExperiencePool(max_age_s=60.0, clock=clock)
    pool.add_batch(batch("A", [rollout(0)]), received_at=1000.0)
    clock.t = 1030.0
    pool.add_batch(batch("A", [rollout(1)]), received_at=1030.0)
    assert pool.evict_stale() == 0
    clock.t = 1060.5
    assert pool.evict_stale() == 1 and len(pool) == 1
    clock.t = 1100.0
    assert [g.rollout.task.index for g in pool.take(5, rng=random.Random(0))] == []  # take() evicts stale first
    assert pool.stats()["evicted"]["stale"] == 2
    assert pool.add_batch(batch("A", [rollout(9)]), received_at=1000.0) == 0  # arrived already stale


def test_take_caps_per_sender_and_removes() -> None:
    clock = FakeClock()
    pool = ExperiencePool(clock=clock)
    pool.add_batch(batch("A", [rollout(i) for i in range(10)]), clock.t)
    pool.add_batch(batch("B", [rollout(i) for i in range(100, 102)]), clock.t)
    got = pool.take(6, rng=random.Random(3), max_per_sender=2)
    assert len(got) == 4
    assert sum(g.sender == "A" for g in got) == 2 and sum(g.sender == "B" for g in got) == 2
    assert len(pool) == 8
    rest = pool.take(100, rng=random.Random(3))
    assert len(rest) == 8 and len(pool) == 0
    assert {g.rollout.task.index for g in got}.isdisjoint({g.rollout.task.index for g in rest})


def test_take_predicate_and_zero() -> None:
    clock = FakeClock()
    pool = ExperiencePool(clock=clock)
    pool.add_batch(batch("A", [rollout(i) for i in range(10)]), clock.t)
    assert pool.take(0, rng=random.Random(0)) == []
    got = pool.take(100, rng=random.Random(0), predicate=lambda g: g.rollout.task.index % 2 == 0)
    assert sorted(g.rollout.task.index for g in got) == [0, 2, 4, 6, 8]
    assert sorted(g.rollout.task.index for g in pool.take(100, rng=random.Random(0))) == [1, 3, 5, 7, 9]


def test_take_is_deterministic_and_uniform() -> None:
    def fill() -> ExperiencePool:
        p = ExperiencePool(clock=FakeClock())
        p.add_batch(batch("A", [rollout(i) for i in range(20)]), 1000.0)
        return p

    a = [g.rollout.task.index for g in fill().take(5, rng=random.Random(42))]
    b = [g.rollout.task.index for g in fill().take(5, rng=random.Random(42))]
    c = [g.rollout.task.index for g in fill().take(5, rng=random.Random(43))]
    assert a == b and a != c
    # Uniformity: over many draws each of the 20 groups is picked ~ 1/4 of the time.
    counts = [0] * 20
    rng = random.Random(0)
    for _ in range(800):
        for g in fill().take(5, rng=rng):
            counts[g.rollout.task.index] += 1
    assert all(140 < c < 260 for c in counts), counts


def test_stats_json_able() -> None:
    pool = ExperiencePool(clock=FakeClock())
    pool.add_batch(batch("A", [rollout(0)]), 1000.0)
    st = json.loads(json.dumps(pool.stats()))
    assert st["groups"] == 1 and st["per_sender"] == {"A": 1} and st["bytes"] == pool.nbytes


def test_thread_safety_smoke() -> None:
    pool = ExperiencePool(max_groups=300, max_per_peer=1000, clock=FakeClock())
    taken: list[PooledGroup] = []
    errors: list[BaseException] = []

    def producer(name: str) -> None:
        try:
            for b in range(60):
                pool.add_batch(batch(name, [rollout(b * 10 + k, (name, str(k))) for k in range(10)]), 1000.0)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    def consumer() -> None:
        rng = random.Random(5)
        try:
            for _ in range(300):
                taken.extend(pool.take(3, rng=rng, max_per_sender=2))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(n,)) for n in ("A", "B")] + [threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    st = pool.stats()
    assert st["added"] == 1200
    assert st["added"] == st["groups"] + st["taken"] + sum(st["evicted"].values())
    assert len(taken) == st["taken"]
    keys = [(g.rollout.task.index, g.rollout.completions) for g in taken]
    assert len(keys) == len(set(keys))  # nothing handed out twice
    rest = pool.take(10_000, rng=random.Random(0))
    assert pool.nbytes == 0 and len(rest) == st["groups"]


@pytest.mark.parametrize("bad", [dict(max_groups=0), dict(max_bytes=0), dict(max_per_peer=0), dict(max_age_s=0)])
def test_bad_bounds(bad: dict) -> None:
    with pytest.raises(ValueError):
        ExperiencePool(**bad)


# -- sybils: young senders are bounded per forwarder and last in line (security issue, items 3 and 4) ----------------

def _aged_pool(clock: FakeClock, **kw) -> ExperiencePool:
    """A pool past its own founding window, with established senders A and B already seen."""
    pool = ExperiencePool(probation_s=10.0, max_per_peer=100, clock=clock, **kw)
    pool.add_batch(batch("A", []), clock.t)
    pool.add_batch(batch("B", []), clock.t)
    clock.t += 11.0  # A and B are founders; anyone seen from now on is young for 10 s
    return pool


def test_founders_are_not_young_and_newcomers_are_until_probation_ends() -> None:
    clock = FakeClock()
    pool = _aged_pool(clock)
    assert not pool.is_young("A")
    assert pool.is_young("S1")
    clock.t += 10.0
    assert not pool.is_young("S1")


def test_young_senders_are_last_in_line_and_share_a_quarter_of_the_slots() -> None:
    clock = FakeClock()
    pool = _aged_pool(clock)
    for k in range(40):  # 40 fresh identities, each with 4 groups, all behind one connection
        pool.add_batch(batch(f"S{k}", [rollout(1000 + 4 * k + j) for j in range(4)]), clock.t, via="evil")
    pool.add_batch(batch("A", [rollout(i) for i in range(6)]), clock.t)
    pool.add_batch(batch("B", [rollout(i) for i in range(10, 16)]), clock.t)
    got = pool.take(16, rng=random.Random(0), max_per_sender=8)
    honest = [g for g in got if g.sender in ("A", "B")]
    assert len(honest) == 12  # every honest group first
    assert len(got) - len(honest) == 4  # young: max(1, 16 // 4) in all, whatever the number of identities


def test_young_senders_behind_one_forwarder_share_one_per_sender_cap() -> None:
    clock = FakeClock()
    pool = _aged_pool(clock)
    for k in range(40):
        pool.add_batch(batch(f"S{k}", [rollout(1000 + k)]), clock.t, via="evil")
    for k in range(3):
        pool.add_batch(batch(f"T{k}", [rollout(2000 + k)]), clock.t, via=f"T{k}")
    got = pool.take(40, rng=random.Random(0), max_per_sender=2)
    by_via = {}
    for g in got:
        by_via[g.via] = by_via.get(g.via, 0) + 1
    assert by_via.get("evil", 0) <= 2
    assert len(got) == 5  # 2 through "evil" + one from each directly connected newcomer


def test_a_flood_of_fresh_identities_evicts_only_young_groups() -> None:
    clock = FakeClock()
    pool = _aged_pool(clock, max_groups=64)
    pool.add_batch(batch("A", [rollout(i) for i in range(10)]), clock.t)
    pool.add_batch(batch("B", [rollout(i) for i in range(10, 20)]), clock.t)
    for k in range(2000):
        pool.add_batch(batch(f"S{k}", [rollout(10_000 + 4 * k + j) for j in range(4)]), clock.t, via=f"c{k % 7}")
    per_sender = pool.stats()["per_sender"]
    assert per_sender["A"] == 10 and per_sender["B"] == 10
    assert len(pool) == 64


def test_young_groups_behind_one_forwarder_are_bounded_in_the_pool() -> None:
    clock = FakeClock()
    pool = ExperiencePool(probation_s=10.0, max_per_peer=8, clock=clock)
    clock.t += 11.0
    for k in range(50):
        pool.add_batch(batch(f"S{k}", [rollout(100 + 2 * k), rollout(101 + 2 * k)]), clock.t, via="evil")
    assert len(pool) == 8
    assert pool.stats()["evicted"]["young_quota"] == 92


def test_patient_sybils_behind_a_connection_stay_bounded_after_probation() -> None:
    clock = FakeClock()
    pool = _aged_pool(clock)
    for k in range(40):  # identities first seen now, used again once their probation is over
        pool.add_batch(batch(f"S{k}", []), clock.t, via="evil")
    clock.t += 11.0
    assert not pool.is_young("S0")
    for k in range(40):
        pool.add_batch(batch(f"S{k}", [rollout(1000 + 8 * k + j) for j in range(8)]), clock.t, via="evil")
    pool.add_batch(batch("A", [rollout(i) for i in range(6)]), clock.t)
    got = pool.take(16, rng=random.Random(0), max_per_sender=8)
    assert sum(g.sender == "A" for g in got) == 6  # the directly connected peer first, in full
    assert sum(g.sender.startswith("S") for g in got) == 8  # relayed identities: half the slots, however many


def test_caps_are_shares_of_the_slots_not_of_the_candidates() -> None:
    clock = FakeClock()
    pool = _aged_pool(clock)
    for k in range(40):
        pool.add_batch(batch(f"S{k}", [rollout(1000 + 8 * k + j) for j in range(8)]), clock.t, via="evil")
    got = pool.take(48, rng=random.Random(0), max_per_sender=8, slots=16)  # 3 candidates per slot, as a round does
    assert len(got) == 4  # young: a quarter of the 16 slots, not of the 48 candidates
