"""The learner in-process on the embedded tiny model: the SAPO mix, local rescoring of peers' text, resume."""
import json
import random

import pytest
import torch
import trio

from node.config import NodeConfig
from node.learner import Learner, ScoredGroup, choose_training_groups
from node.policy import load_policy
from node.run import NodeRuntime
from protocol.identity import Identity
from protocol.messages import Rollout, TaskRef
from verifiers.tasks import build_task, make_ref


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    return load_policy("tiny")


def group(rewards, source="local"):
    n = len(rewards)
    return ScoredGroup(TaskRef.make("arith", {}, 0, 0), (1,), ("x",) * n, ((2,),) * n, (False,) * n, tuple(rewards), source)


def test_mix_takes_I_local_and_J_external_and_drops_zero_advantage():
    rng = random.Random(0)
    local = [group([1, 0]) for _ in range(6)] + [group([0, 0]), group([1, 1])]
    external = [group([0, 1], "peer") for _ in range(5)] + [group([1, 1], "peer")]
    own, ext = choose_training_groups(local, external, 4, 4, rng)
    assert len(own) == 4 and len(ext) == 4
    assert all(g.has_signal for g in own + ext) and all(g.external for g in ext)


def test_mix_falls_back_to_local_when_peers_are_short():
    rng = random.Random(0)
    local = [group([1, 0]) for _ in range(8)]
    own, ext = choose_training_groups(local, [group([0, 1], "p")], 4, 4, rng)
    assert (len(own), len(ext)) == (7, 1)
    own, ext = choose_training_groups(local, [], 4, 4, rng)
    assert (len(own), len(ext)) == (8, 0)
    own, ext = choose_training_groups(local, [], 8, 0, rng)  # J = 0: plain single-node RL
    assert (len(own), len(ext)) == (8, 0)


def test_rescore_uses_only_the_task_ref_and_the_text(policy):
    learner = Learner(policy, NodeConfig(offline=True), random.Random(0))
    ref = make_ref("arith", 7, 3)
    gold = build_task(ref).answer
    wrong = str(int(gold) + 1)
    # the peer claims every completion is right: its rewards must not matter
    shared = Rollout(ref, (f"<answer>{gold}</answer>", f"<answer>{wrong}</answer>", "garbage"), (1.0, 1.0, 1.0))
    bogus = Rollout(TaskRef.make("no_such_task", {}, 1, 1), ("<answer>1</answer>", "<answer>2</answer>"), (1.0, 0.0))
    groups = learner.rescore([(shared, "peerA"), (bogus, "peerB")])
    assert len(groups) == 1 and groups[0].rewards == (1.0, 0.0, 0.0)
    assert groups[0].external and groups[0].source == "peerA"
    assert learner.rejected["foreign_task"] == 1
    eos = policy.tokenizer.eos_token_id
    assert all(ids[-1] == eos for ids in groups[0].completion_ids)  # re-tokenized as finished answers
    assert policy.tokenizer.decode(groups[0].completion_ids[0][:-1]) == f"<answer>{gold}</answer>"


def test_rollout_scores_its_own_completions(policy):
    cfg = NodeConfig(offline=True, questions_per_round=4, group_size=4)
    learner = Learner(policy, cfg, random.Random(1))
    groups = learner.rollout(0)
    assert len(groups) == 4 and all(len(g.completions) == 4 for g in groups)
    for g in groups:
        task = build_task(g.ref)
        for text, r in zip(g.completions, g.rewards):
            assert r == (1.0 if text.strip() == f"<answer>{task.answer}</answer>" else 0.0)


def run_node(cfg, identity, policy_factory):
    node = NodeRuntime(cfg, identity, policy_factory())
    if cfg.resume:
        node.resume()
    trio.run(node.run)
    return node


def test_resume_gives_the_same_parameters_as_a_straight_run(tmp_path):
    torch.set_num_threads(1)
    ident = Identity.generate()
    base = dict(offline=True, questions_per_round=4, group_size=4, checkpoint_every=1, seed=3)
    straight = run_node(NodeConfig(rounds=6, checkpoint_dir=str(tmp_path / "a"), **base), ident, lambda: load_policy("tiny"))
    run_node(NodeConfig(rounds=3, checkpoint_dir=str(tmp_path / "b"), **base), ident, lambda: load_policy("tiny"))
    resumed = run_node(
        NodeConfig(rounds=6, checkpoint_dir=str(tmp_path / "b"), resume=True, **base), ident, lambda: load_policy("tiny")
    )
    assert resumed.round == 6 and resumed.last_saved == 5
    # the dashboard's curves span the whole run after a resume, round for round as the straight run drew them
    assert [r["round"] for r in resumed.history_since(0)["rows"]] == list(range(6))
    assert [r["reward_mean"] for r in resumed.history_since(0)["rows"]] == \
           [r["reward_mean"] for r in straight.history_since(0)["rows"]]
    a = dict(straight.policy.model.named_parameters())
    for name, p in resumed.policy.model.named_parameters():
        assert torch.equal(p, a[name]), name
    # and the run really trained: parameters moved away from the shipped weights
    fresh = dict(load_policy("tiny").model.named_parameters())
    assert any(not torch.equal(p, fresh[n]) for n, p in a.items())


def test_metrics_lines_have_the_documented_fields(tmp_path):
    torch.set_num_threads(1)
    m = tmp_path / "m.jsonl"
    cfg = NodeConfig(offline=True, rounds=2, questions_per_round=4, group_size=4, metrics=str(m),
                     checkpoint_dir=str(tmp_path / "ck"))
    run_node(cfg, Identity.generate(), lambda: load_policy("tiny"))
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for key in ("round", "reward_mean", "n_local", "n_external", "peers", "wall_s", "loss", "entropy", "tokens"):
        assert key in rows[0], key


# -- what a peer's group may and may not earn at rescoring (security issue, items 1 and 2) ---------------------------

def _attack_learner(policy):
    return Learner(policy, NodeConfig(offline=True), random.Random(0))


def test_an_answer_hidden_past_the_budget_earns_nothing(policy):
    learner = _attack_learner(policy)  # tiny: max_new_tokens 8
    ref = make_ref("arith", 7, 3)
    gold, wrong = build_task(ref).answer, "0"
    comps = (
        f"<answer>{wrong}</answer>" + " " * 10 + f"<answer>{gold}</answer>",  # right answer after the budget
        "x" * 8000 + f"<answer>{gold}</answer>",  # right answer after 8,000 chars of filler
        f"<answer>{wrong}</answer></s><answer>{gold}</answer>",  # right answer after an EOS
        f"<answer>{gold}</answer>",  # honest and short: still worth 1
    )
    (g,) = learner.rescore([(Rollout(ref, comps, (1.0,) * 4), "peer")])
    assert g.rewards == (0.0, 0.0, 0.0, 1.0)
    assert g.truncated == (True, True, False, False)
    assert all(len(ids) <= learner.sampling.max_new_tokens for ids in g.completion_ids)
    # what is scored is what is trained: the text decoded from the trained tokens
    for text, ids, cut in zip(g.completions, g.completion_ids, g.truncated):
        body = ids if cut else ids[:-1]
        assert policy.tokenizer.decode(body, skip_special_tokens=False) == text
    assert g.completions[2] == f"<answer>{wrong}</answer>"


@pytest.mark.parametrize("ref, reason", [
    (TaskRef.make("arith", {"digits": 2, "ops": "+", "split": "test"}, 2**31 + 5, 1), "heldout_ref"),
    (TaskRef.make("arith", {"digits": 3, "ops": "+", "split": "train"}, 5, 1), "foreign_config"),
    (TaskRef.make("arith", {"digits": 2, "ops": "+*", "split": "train"}, 5, 1), "foreign_config"),
    (TaskRef.make("bf", {"difficulty": 2}, 5, 1), "foreign_task"),
    (TaskRef.make("basic_arithmetic", {}, 5, 1), "foreign_task"),
])
def test_refs_outside_the_training_distribution_are_refused(policy, ref, reason):
    learner = _attack_learner(policy)
    assert learner.rescore([(Rollout(ref, ("<answer>1</answer>", "<answer>2</answer>"), None), "peer")]) == []
    assert learner.rejected == {reason: 1}


def test_the_heldout_split_used_by_evaluate_is_refused(policy):
    from verifiers.tasks import heldout_refs
    learner = _attack_learner(policy)
    refs = heldout_refs("arith", 5)
    groups = learner.rescore([(Rollout(r, ("<answer>1</answer>", "<answer>2</answer>"), None), "p") for r in refs])
    assert groups == [] and learner.rejected["heldout_ref"] == 5
    # a partial config that means the node's own is fine (defaults fill in)
    ok = TaskRef.make("arith", {"digits": 2}, 5, 1)
    assert len(learner.rescore([(Rollout(ok, ("a", "b"), None), "p")])) == 1


@pytest.mark.parametrize("interval, saved", [(1e-9, [0, 1, 2, 3]), (0.0, [3])])
def test_unsaved_work_time_triggers_a_checkpoint(tmp_path, interval, saved):
    """--checkpoint-interval-s bounds lost work when rounds are long, whatever --checkpoint-every says."""
    from node.checkpoint import _round_dirs
    torch.set_num_threads(1)
    ck = tmp_path / "ck"
    cfg = NodeConfig(offline=True, rounds=4, questions_per_round=4, group_size=4, checkpoint_every=1000,
                     checkpoint_interval_s=interval, keep_checkpoints=10, checkpoint_dir=str(ck))
    node = run_node(cfg, Identity.generate(), lambda: load_policy("tiny"))
    assert node.last_saved == 3
    assert sorted(r for r, _ in _round_dirs(ck)) == saved


def test_foreign_refs_are_refused_before_anything_is_built(policy, monkeypatch):
    """Attack 5 (expensive rebuilds): bf at difficulty 2 took 0.3-1.9 s to build; a node that never chose it must not
    pay for it, however many peers send it."""
    import verifiers.tasks as tasks
    learner = Learner(policy, NodeConfig(offline=True, tasks="arith,bf"), random.Random(0))
    calls = []
    monkeypatch.setattr(tasks, "_rg_dataset", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    ref = TaskRef.make("bf", {"difficulty": 2}, 5, 1)
    assert learner.rescore([(Rollout(ref, ("<answer>a</answer>", "b"), None), "p")] * 50) == []
    assert learner.rejected == {"foreign_config": 50} and calls == []
