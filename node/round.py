"""One SAPO round, as one short function.

sample tasks -> generate -> score -> share -> collect peers' rollouts -> sample I local + J external -> train -> checkpoint
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from node.learner import choose_training_groups

if TYPE_CHECKING:
    from node.run import NodeRuntime


async def run_round(node: "NodeRuntime", r: int) -> dict[str, Any]:
    cfg, learner = node.cfg, node.learner
    t0 = time.monotonic()

    local = await trio.to_thread.run_sync(learner.rollout, r)  # sample tasks, generate, score (own verifier)
    t_gen = time.monotonic()

    t_net = time.monotonic()
    shared = node.share(r, local)  # hands the groups to the publisher task; never waits on the network
    pooled = node.collect(cfg.external * 3)  # peers' groups, already signature-checked by the swarm layer
    net_wait = time.monotonic() - t_net

    external = await trio.to_thread.run_sync(learner.rescore, [(p.rollout, p.sender) for p in pooled])
    own, ext = choose_training_groups(local, external, cfg.local, cfg.external, node.rng)
    node.trained_from.update(g.source for g in ext)
    t_train = time.monotonic()
    stats = await trio.to_thread.run_sync(learner.train, own + ext)
    t_done = time.monotonic()

    # the trainer's reward figures describe the training batch, which leaves out zero-advantage groups
    trained = {k: v for k, v in stats.items() if k not in ("n_local", "n_external", "frac_zero_std", "reward_mean")}
    trained["train_reward_std"] = trained.pop("reward_std", 0.0)
    rewards = [x for g in local for x in g.rewards]
    metrics: dict[str, Any] = {
        "round": r,
        "reward_mean": sum(rewards) / len(rewards),  # what this node's own policy scored this round
        "train_reward_mean": _mean([x for g in own + ext for x in g.rewards]),
        "generated": sum(len(g.completions) for g in local),  # this round's compute: completions sampled
        "n_local": len(own),
        "n_external": len(ext),
        "peers": node.peer_count(),
        "rollouts_out": shared,
        "rollouts_in": node.take_inbound_count(),
        "frac_zero_std": sum(not g.has_signal for g in local) / len(local),  # own groups with nothing to learn
        "external_candidates": len(pooled),
        "external_useful": sum(g.has_signal for g in external),
        "gen_s": round(t_gen - t0, 4),
        "train_s": round(t_done - t_train, 4),
        "net_wait_s": round(net_wait, 6),
        **trained,
    }
    if cfg.eval_every and (r + 1) % cfg.eval_every == 0:
        metrics["heldout_acc"] = await trio.to_thread.run_sync(learner.evaluate, cfg.eval_size)
    metrics["wall_s"] = round(time.monotonic() - t0, 4)
    if node.checkpoint_due(r):
        await node.checkpoint(r, metrics, background=True)  # written while the next round runs
    return metrics


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
