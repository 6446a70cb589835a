"""One SAPO round, as one short function.

collect peers' rollouts -> rescore -> pick what we lack (node.mix) -> sample tasks -> generate -> score -> share
-> own + external -> train -> observe (adaptive J) -> checkpoint
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from node.mix import Mixer

if TYPE_CHECKING:
    from node.run import NodeRuntime


async def run_round(node: "NodeRuntime", r: int) -> dict[str, Any]:
    cfg, learner, mixer = node.cfg, node.learner, _mixer(node)
    t0 = time.monotonic()

    pooled = node.collect(cfg.external * 3, mixer.candidate_filter())  # signature-checked by the swarm layer
    net_wait = time.monotonic() - t0
    external = await trio.to_thread.run_sync(learner.rescore, [(p.rollout, p.sender) for p in pooled])
    ext = mixer.pick_external(external)  # first, so a node generates what its peers did not supply (adaptive J)

    t_gen0 = time.monotonic()
    local = await trio.to_thread.run_sync(learner.rollout, r, mixer.questions(len(ext)))  # generate, own verifier
    t_gen = time.monotonic()
    shared = node.share(r, local)  # hands the groups to the publisher task; never waits on the network
    own = mixer.own(local, len(ext))
    node.trained_from.update(g.source for g in ext)
    node.useful_from.update(g.source for g in external if g.has_signal)  # what each peer's groups were worth to us
    t_train = time.monotonic()
    stats = await trio.to_thread.run_sync(learner.train, own + ext)
    t_done = time.monotonic()
    mixed = mixer.observe(local, len(ext), learner.trainer.last_probe)  # family baselines; J_eff

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
        "gen_s": round(t_gen - t_gen0, 4),
        "train_s": round(t_done - t_train, 4),
        "net_wait_s": round(net_wait, 6),
        **trained,
        **mixed,
    }
    if cfg.eval_every and (r + 1) % cfg.eval_every == 0:
        metrics["heldout_acc"] = await trio.to_thread.run_sync(learner.evaluate, cfg.eval_size)
    metrics["wall_s"] = round(time.monotonic() - t0, 4)
    if node.checkpoint_due(r):
        await node.checkpoint(r, metrics, background=True)  # written while the next round runs
    return metrics


def _mixer(node: "NodeRuntime") -> Mixer:
    """The node's Mixer, made on first use (its state lives for the process; a resumed node starts it afresh)."""
    if getattr(node, "mixer", None) is None:
        node.mixer = Mixer(node.cfg, node.rng)
        node.learner.trainer.probe = node.cfg.adaptive_j  # the value estimate needs the gradient probe
    return node.mixer


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
