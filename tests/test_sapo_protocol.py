"""The SAPO experiment's protocol mapping: what each config generates, filters and trains on (no learning, fast)."""
import argparse
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from node.cli import main as cli
from node.config import NodeConfig
from node.learner import Learner, ScoredGroup, choose_training_groups
from node.policy import load_policy
from node.simulate import node_command
from protocol.messages import TaskRef

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import sapo_experiment as sx  # noqa: E402


def group(rewards, source="local", index=0):
    n = len(rewards)
    ref = TaskRef.make("arith", {}, 0, index)
    return ScoredGroup(ref, (1,), ("x",) * n, ((2,),) * n, (False,) * n, tuple(float(r) for r in rewards), source)


def test_paper_protocol_generates_I_questions_and_fixed_generates_I_plus_J():
    k = 4
    assert sx.protocol_flags((8, 0, ""), k, "paper") == {"questions_per_round": 32, "local": 32, "external": 0}
    assert sx.protocol_flags((4, 4, ""), k, "paper") == {"questions_per_round": 16, "local": 16, "external": 16}
    assert sx.protocol_flags((2, 6, ""), k, "paper") == {"questions_per_round": 8, "local": 8, "external": 24}
    # today's mapping, kept as an option: every config generates (a + b) * K
    for a, b in ((8, 0), (6, 2), (4, 4), (2, 6)):
        assert sx.protocol_flags((a, b, ""), k, "fixed") == {"questions_per_round": 32, "local": 4 * a, "external": 4 * b}


def test_configs_parse_with_variants_and_seeds_follow_first_seed(tmp_path):
    assert sx.parse_configs("8/0,4/4@recv") == [(8, 0, ""), (4, 4, "recv")]
    assert sx.cname((4, 4, "recv")) == "4/4@recv"
    with pytest.raises(SystemExit):
        sx.parse_configs("4-4")
    variants = sx.parse_variants(["recv=--external-baseline receiver"])
    args = argparse.Namespace(regime="easy", scale=4, protocol="paper", eval_size=200, rounds=25)
    flags = sx.node_flags(args, (4, 4, "recv"), ["--offpolicy-threshold", "0.3"], variants)
    i = flags.index("--questions-per-round")
    assert flags[i + 1] == "16" and flags[-4:] == ["--external-baseline", "receiver", "--offpolicy-threshold", "0.3"]
    with pytest.raises(SystemExit):  # a variant that was never defined
        sx.node_flags(args, (4, 4, "nope"), [], variants)


def _resolved(args: list[str]) -> dict:
    res = CliRunner().invoke(cli, ["join", *args, "--print-config"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


@pytest.mark.parametrize("config,protocol", [((8, 0, ""), "paper"), ((4, 4, ""), "paper"), ((2, 6, ""), "fixed")])
def test_a_node_of_each_config_is_started_with_the_mapped_settings(tmp_path, config, protocol):
    """The flags the experiment hands simulate reach the node: the resolved join settings are the mapping."""
    args = argparse.Namespace(regime="easy", scale=4, protocol=protocol, eval_size=200, rounds=25)
    ij = sx.protocol_flags(config, 4, protocol)
    cmd = node_command(1, out=tmp_path, swarm="s", model="tiny", rounds=25, local=ij["local"], external=ij["external"],
                       seed=0, p2p_port=1, status_port=2, bootstrap=None, eval_every=5,
                       extra=tuple(sx.node_flags(args, config, [], {})), n_nodes=4)
    cfg = _resolved(cmd[cmd.index("join") + 1:])
    assert (cfg["questions_per_round"], cfg["local"], cfg["external"]) == (
        ij["questions_per_round"], ij["local"], ij["external"])


def test_paper_mix_trains_every_own_group_unfiltered_and_only_peers_groups_with_signal():
    rng = random.Random(0)
    local = [group([1, 0], index=i) for i in range(10)] + [group([0, 0], index=10 + i) for i in range(6)]  # I = 16
    external = [group([0, 1], "peer", i) for i in range(12)] + [group([1, 1], "peer", 20 + i) for i in range(30)]
    own, ext = choose_training_groups(local, external, 16, 16, rng)
    assert own == local  # all 16 own groups, the 6 zero-advantage ones included
    assert len(ext) == 12 and all(g.has_signal and g.external for g in ext)  # J short-filled only by useful groups
    # 8/0: the 32 own groups, nothing else
    local32 = local + [group([0, 0], index=40 + i) for i in range(16)]
    own, ext = choose_training_groups(local32, external, 32, 0, rng)
    assert own == local32 and ext == []


def test_fixed_mix_drops_own_groups_to_make_room_for_peers():
    rng = random.Random(0)
    local = [group([1, 0], index=i) for i in range(24)] + [group([0, 0], index=30 + i) for i in range(8)]  # 32 q
    external = [group([0, 1], "peer", i) for i in range(16)]
    own, ext = choose_training_groups(local, external, 16, 16, rng)
    assert len(own) == 16 and len(ext) == 16 and all(g.has_signal for g in own)
    # peers short: own groups with signal fill the J slots
    own, ext = choose_training_groups(local, external[:4], 16, 16, rng)
    assert (len(own), len(ext)) == (24, 4)


def test_a_learner_generates_as_many_groups_as_questions_per_round():
    torch.set_num_threads(1)
    policy = load_policy("tiny")
    for config in ((8, 0, ""), (4, 4, "")):
        ij = sx.protocol_flags(config, 1, "paper")  # scale 1 keeps it fast: 8 or 4 questions
        learner = Learner(policy, NodeConfig(offline=True, **ij), random.Random(0))
        groups = learner.rollout(0)
        assert len(groups) == ij["questions_per_round"] and all(len(g.completions) == 8 for g in groups)


@pytest.mark.parametrize("model", ["tiny-sparse", "tiny-cold"])
def test_the_sparse_regime_samples_its_four_families_and_accepts_its_peers_refs(model):
    """tiny-sparse (and tiny-cold) nodes draw from four families with their configs; a peer's group of the same regime
    is rescored, not refused as foreign (the receiver's foreign-ref check uses the same per-family configs)."""
    torch.set_num_threads(1)
    cfg = NodeConfig(model=model, offline=True, questions_per_round=24, group_size=2)
    assert cfg.tasks == "arith,basic_arithmetic,decimal_arithmetic,fraction_simplification" and cfg.max_new_tokens == 10
    policy = load_policy(model)
    sender = Learner(policy, cfg, random.Random(1))
    groups = sender.rollout(0)
    assert {g.ref.generator for g in groups} == set(cfg.tasks.split(","))
    assert all(len(policy.tokenizer.decode(g.prompt_ids)) < 32 for g in groups)  # the short prompt template
    receiver = Learner(policy, cfg.replace(seed=2), random.Random(2))
    rescored = receiver.rescore([(g.to_rollout(), "peer") for g in groups])
    assert len(rescored) == len(groups) and not receiver.rejected
    assert [g.rewards for g in rescored] == [g.rewards for g in groups]
    # a node of the easy regime (arith with its default config) refuses them: not its training distribution
    easy = Learner(load_policy("tiny"), NodeConfig(offline=True), random.Random(3))
    easy.rescore([(g.to_rollout(), "peer") for g in groups if g.ref.generator == "arith"])
    assert easy.rejected["foreign_config"] > 0
