"""node.mix: the receiver's choices (advantages against its own baseline, what it lacks, adaptive J). Fast, no learning."""
import random

import pytest
import torch
import trio

from node.config import NodeConfig
from node.learner import ScoredGroup
from node.mix import Mixer, max_group_advantage
from node.policy import load_policy
from node.run import NodeRuntime
from protocol.identity import Identity
from protocol.messages import TaskRef


def group(rewards, fam="arith", source="local", index=0):
    n = len(rewards)
    ref = TaskRef.make(fam, {}, 0, index)
    return ScoredGroup(ref, (1,), ("x",) * n, ((2,),) * n, (False,) * n, tuple(float(r) for r in rewards), source)


PLAIN = {"external_baseline": "sender", "external_positive_only": False, "adaptive_j": False}  # plain SAPO


def mixer(**kw):
    return Mixer(NodeConfig(offline=True, **{**PLAIN, **kw}), random.Random(0))


def test_receiver_baseline_rewards_what_the_receiver_lacks_and_skips_what_it_already_does():
    m = mixer(external_baseline="receiver", local=8, external=8)
    m.stats.update([group([0] * 8, index=i) for i in range(9)] + [group([1] + [0] * 7, index=9)])  # ~1% success
    base = m.stats.baseline["arith"]
    assert 0.01 < base < 0.02
    one_right = group([1] + [0] * 7, source="peer")
    all_right = group([1] * 8, source="peer")  # zero advantage within the sender's group, yet we lack it
    all_wrong = group([0] * 8, source="peer")
    picked = m.pick_external([one_right, all_right, all_wrong])
    assert len(picked) == 2 and all(g.external for g in picked)
    by_rewards = {g.rewards: g.advantages for g in picked}
    cap = max_group_advantage(8)
    adv = by_rewards[one_right.rewards]
    assert adv[0] == pytest.approx(cap) and all(-0.1 < a < 0 for a in adv[1:])  # a success is worth the most
    assert all(a == pytest.approx(cap) for a in by_rewards[all_right.rewards])
    # the sender's baseline (plain SAPO) keeps only the group with mixed rewards, with GRPO's advantages
    plain = mixer(local=8, external=8)
    plain.stats.update([group([0] * 8)])
    assert [g.rewards for g in plain.pick_external([one_right, all_right, all_wrong])] == [one_right.rewards]
    assert plain.pick_external([one_right])[0].advantages is None


def test_receiver_baseline_gives_a_strong_node_little_for_a_peer_success():
    m = mixer(external_baseline="receiver", local=8, external=8)
    m.stats.update([group([1] * 7 + [0], index=i) for i in range(4)])  # we get 7 of 8 right
    (g,) = m.pick_external([group([1] * 6 + [0] * 2, source="peer")])
    assert all(0 < a < 0.5 for a in g.advantages[:6]) and all(a < -1 for a in g.advantages[6:])
    # a strong peer's "7 of 8 right" teaches a weak receiver (1 of 8) far more than the sender's own mean says
    weak = mixer(external_baseline="receiver", local=8, external=8)
    weak.stats.update([group([1] + [0] * 7, index=i) for i in range(4)])
    strong_group = group([1] * 7 + [0], source="peer")
    (g,) = weak.pick_external([strong_group])
    assert g.advantages[0] == pytest.approx(max_group_advantage(8))  # the sender's baseline would give +0.35
    assert mixer(local=8, external=8).pick_external([strong_group])[0].advantages is None


def test_positive_only_drops_peers_wrong_answers():
    m = mixer(external_positive_only=True, local=8, external=8)
    (g,) = m.pick_external([group([1, 1, 0, 0, 0, 0, 0, 0], source="peer")])
    assert all(a > 0 for a in g.advantages[:2]) and all(a == 0 for a in g.advantages[2:])


def test_lacking_selection_sends_the_slots_where_own_groups_had_no_signal():
    m = mixer(external_select="lacking", local=8, external=10)
    own = [group([1, 0] * 4, "arith", index=i) for i in range(8)] + [
        group([0] * 8, "basic_arithmetic", index=10 + i) for i in range(8)]
    m.stats.update(own)
    assert m.stats.lack == {"arith": 0.0, "basic_arithmetic": 1.0}
    peers = [group([1, 0] * 4, "arith", "p", i) for i in range(20)] + [
        group([1, 0] * 4, "basic_arithmetic", "p", 30 + i) for i in range(10)]
    picked = m.pick_external(peers)
    assert len(picked) == 10 and sum(g.ref.generator == "basic_arithmetic" for g in picked) >= 9
    uniform = mixer(local=8, external=10)
    uniform.stats.update(own)
    assert sum(g.ref.generator == "basic_arithmetic" for g in uniform.pick_external(peers)) <= 6


def probe(own, ext):
    return {"own": torch.tensor(own, dtype=torch.float32), "ext": torch.tensor(ext, dtype=torch.float32)}


def test_adaptive_j_generates_what_peers_did_not_supply_and_follows_the_value_estimate():
    m = mixer(adaptive_j=True, local=16, external=16, questions_per_round=16)
    assert m.questions(0) == 32 and m.questions(16) == 16 and m.questions(5) == 27
    assert m.j_eff == 8  # starts halfway
    local = [group([1, 0] * 4, index=i) for i in range(16)]
    # peers' part of the step points where our next own gradient points, our own part does not: J goes up
    m.observe(local, 16, probe([0.0, 1.0], [4.0, 0.0]))
    for _ in range(5):
        m.observe(local, 16, probe([1.0, 0.0], [4.0, 0.0]))
    assert m.j_eff == 16 and m.value_ema > 0
    # now the peers' part points away: J comes down to its floor, never 0 (the estimate needs a few peers' groups)
    for _ in range(30):
        m.observe(local, 16, probe([1.0, 0.0], [-4.0, 0.0]))
    assert m.j_eff == m.j_min == 2 and m.value_ema < 0
    # no own signal this round: nothing to learn about the peers, J stays
    m.observe(local, 16, probe([0.0, 0.0], [4.0, 0.0]))
    assert m.j_eff == 2


def _run(cfg):
    node = NodeRuntime(cfg, Identity.generate(), load_policy("tiny"))
    trio.run(node.run)
    return node


def test_a_lone_node_with_adaptive_j_trains_exactly_as_a_lone_node_with_I_plus_J_questions(tmp_path):
    """Joining can't cost a node that finds no peers anything: adaptive J without peers is the plain lone node."""
    torch.set_num_threads(1)
    base = dict(offline=True, rounds=3, group_size=4, local=4, external=4, seed=5, checkpoint_every=10)
    alone = _run(NodeConfig(questions_per_round=8, checkpoint_dir=str(tmp_path / "a"), **base))
    adaptive = _run(NodeConfig(questions_per_round=4, adaptive_j=True, checkpoint_dir=str(tmp_path / "b"), **base))
    assert [h["generated"] for h in adaptive.history] == [32, 32, 32]  # (I + J) questions x 4 completions
    a = dict(alone.policy.model.named_parameters())
    for name, p in adaptive.policy.model.named_parameters():
        assert torch.equal(p, a[name]), name


def test_self_feedback_ablation_offers_our_own_groups_from_k_rounds_ago_as_external():
    m = mixer(ablation_self_feedback=2, local=4, external=4)
    rounds = [[group([1, 0, 0, 0], index=10 * r + i) for i in range(4)] for r in range(3)]
    peers = [group([1, 0, 0, 0], source="peer", index=99)]
    assert m.pick_external(peers) == []  # nothing old enough yet; peers' groups are never used
    m.observe(rounds[0], 0, None)
    assert m.pick_external(peers) == []
    m.observe(rounds[1], 0, None)
    got = m.pick_external(peers)
    assert sorted(g.ref.index for g in got) == [0, 1, 2, 3] and all(g.source == "self-stale" and g.external for g in got)
    m.observe(rounds[2], 4, None)
    assert sorted(g.ref.index for g in m.pick_external(peers)) == [10, 11, 12, 13]


class _Pooled:
    def __init__(self, rewards, fam="arith"):
        from protocol.messages import Rollout

        self.rollout = Rollout(TaskRef.make(fam, {}, 0, 0), ("x",) * 3, tuple(rewards) if rewards else None)


def test_the_pool_prefilter_reads_the_senders_claim_only_to_pick_candidates():
    m = mixer(local=8, external=8)
    assert m.candidate_filter() is not None
    assert m.wants(_Pooled([1, 0, 0])) and not m.wants(_Pooled([0, 0, 0])) and not m.wants(_Pooled([1, 1, 1]))
    assert m.wants(_Pooled(None))  # no claim: rescoring decides
    recv = mixer(local=8, external=8, external_baseline="receiver")
    assert not recv.wants(_Pooled([1, 1, 1]))  # no own data on the family yet: the sender's rule (as pick_external)
    recv.stats.update([group([1] * 7 + [0])])  # we already score ~0.9 on arith
    assert not recv.wants(_Pooled([0, 0, 0])) and recv.wants(_Pooled([1, 1, 1]))
    assert mixer(local=8, external=8, external_prefilter=False).candidate_filter() is None
