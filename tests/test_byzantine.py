"""Byzantine peers (tests.byzantine) against two real `swarm-node join` processes over the real py-libp2p mesh.

One attack phase (all modes at once, each from its own identity, in this process) feeds every test below: honest
nodes accept no forged / replayed / cross-swarm / wrong-version message, count each rejection by reason, drop unknown
tasks at rescoring, rescore false rewards to 0, ban the peers that send invalid messages, and keep training.
"""
from __future__ import annotations

import json
import secrets
import time

import pytest
import trio

from protocol.messages import Rollout
from tests.byzantine import ByzantinePeer
from swarm.validator import RateLimit
from tests.join_procs import make_nodes, wait_for
from verifiers.rewards import reward
from verifiers.tasks import TaskError, build_task

pytestmark = pytest.mark.slow
SWARM = "byz-" + secrets.token_hex(3)
# Modes whose messages are invalid on the wire: each must end in a ban by the node it reaches.
BANNED_MODES = ("flood", "oversized", "forged", "replay", "bad_version", "malformed_frames")
# Modes that speak the protocol correctly: judged at rescoring, never banned (garbage is left out of the "never
# banned" check: its ~1 MB messages were once reported as a malformed frame under load, see docs/byzantine.md).
PAYLOAD_MODES = ("false_rewards", "wrong_answers", "garbage", "unknown_tasks")
# Waves of at most 4 peers: more libp2p hosts at once in this process (plus two training nodes on 2 cores) starved
# the attackers' send queues, so their messages never reached the nodes at all (measured).
WAVES = ((("flood", "oversized"), 8.0), (("forged", "replay"), 8.0), (("bad_version", "malformed_frames"), 8.0),
         (PAYLOAD_MODES, 14.0))
# A wave of invalid-message peers lasts its window and then until node a has banned all of them (at most this much
# longer): on a loaded machine the flood and then the oversized peer once had 7 strikes, not yet 11, when a fixed
# 8 s window closed.
WAVE_BAN_WAIT_S = 90.0


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("byz")
    a, b = make_nodes(tmp, ["a", "b"])
    a.start(SWARM)
    wait_for(a.status, 60, "node a's status server", [a])
    b.start(SWARM, [a.addr])
    nodes = [a, b]
    try:
        for n in nodes:
            wait_for(lambda: (n.status() or {}).get("peers") and n.status()["round"] >= 2, 60,
                     f"{n.name} to find its peer and train", nodes)
        before = {n.name: n.status() for n in nodes}
        t0 = time.monotonic()
        peers = {m: ByzantinePeer(m, SWARM, [a.addr], seed=i, rate=2.0)
                 for i, m in enumerate(BANNED_MODES + PAYLOAD_MODES)}

        def not_banned_yet(modes) -> list[str]:
            banned = (a.status() or {}).get("mesh", {}).get("banned", {})
            return [m for m in modes if m in BANNED_MODES and peers[m].peer_id not in banned]

        wave_s: dict[str, float] = {}

        async def attack() -> None:
            for modes, seconds in WAVES:
                w0 = time.monotonic()
                async with trio.open_nursery() as nursery:
                    for m in modes:
                        nursery.start_soon(peers[m].run, None)  # until cancelled below
                    await trio.sleep(seconds)
                    with trio.move_on_after(WAVE_BAN_WAIT_S):  # wait on the event (bounded), not a fixed window
                        while await trio.to_thread.run_sync(not_banned_yet, modes):
                            await trio.sleep(0.5)
                    nursery.cancel_scope.cancel()
                for m in modes:
                    wave_s[m] = time.monotonic() - w0

        trio.run(attack)
        attack_s = time.monotonic() - t0
        # a few more rounds so the pool's last byzantine groups get drawn and rescored
        for n in nodes:
            r = n.status()["round"]
            wait_for(lambda: n.status()["round"] >= r + 3, 30, f"{n.name} to keep training", nodes)
        after = {n.name: n.status() for n in nodes}
        summary = {
            "attack_s": round(attack_s, 1),
            "sent": {m: dict(p.sent) for m, p in peers.items()},
            "rejections": {k: s["rejections"] for k, s in after.items()},
            "banned": {k: sorted(m for m, p in peers.items() if p.peer_id in s["mesh"]["banned"]) for k, s in after.items()},
            "bad_frames": {k: s["mesh"]["bad_frames"] for k, s in after.items()},
            "received_from_byzantine": {k: {m: s["received_from"].get(p.peer_id, 0) for m, p in peers.items()}
                                        for k, s in after.items()},
            "rounds": {k: [before[k]["round"], after[k]["round"]] for k in after},
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        print("byzantine summary:", json.dumps(summary))
        yield {"nodes": nodes, "before": before, "after": after, "peers": peers, "attack_s": attack_s, "wave_s": wave_s}
    finally:
        for n in nodes:
            n.stop()


def test_every_mode_sent_messages(attacked):
    for mode, p in attacked["peers"].items():
        assert sum(p.sent.values()) > 0, (mode, p.report())
    assert attacked["attack_s"] < sum(w[1] for w in WAVES) + len(WAVES) * WAVE_BAN_WAIT_S + 60


def test_invalid_messages_are_rejected_by_reason_and_never_accepted(attacked):
    a = attacked["after"]["a"]
    rej = a["mesh"]["rejections_by_reason"]
    for reason in ("size", "decode", "signature", "sender", "swarm", "version", "stale", "replay", "rate"):
        assert rej[reason] >= 1, (reason, rej)
    peers = attacked["peers"]
    forged = set(peers["forged"].forged_senders)
    assert forged
    for name, s in attacked["after"].items():
        received = s["received_from"]
        # nothing signed by a forged sender, and nothing at all from peers that only ever sent invalid messages
        assert not forged & set(received), name
        for mode in ("forged", "oversized", "bad_version", "malformed_frames"):
            assert received.get(peers[mode].peer_id, 0) == 0, (name, mode, received)
        # the replay peer's one original batch (1 group) may count once; none of its replays
        assert received.get(peers["replay"].peer_id, 0) <= 1, (name, received)
    assert a["mesh"]["bad_frames"] >= 1


def test_invalid_peers_are_banned(attacked):
    a = attacked["after"]["a"]
    banned = a["mesh"]["banned"]
    for mode in BANNED_MODES:
        assert attacked["peers"][mode].peer_id in banned, (mode, a["mesh"]["strikes_total"], banned)
    # the peers that speak the protocol correctly are not banned (their payloads are judged at rescoring)
    for mode in ("false_rewards", "wrong_answers", "unknown_tasks"):
        assert attacked["peers"][mode].peer_id not in banned, mode
    # the rate limit holds and a ban stops the cost: of the flood peer's one-group messages at most the burst plus the
    # per-sender rate over its wave got through, whatever the machine's speed (a starved attacker sends slower, and
    # is banned later: its wave lasts until the ban)
    flood = attacked["peers"]["flood"]
    sent = sum(flood.sent.values())
    assert sent > 100
    limit = RateLimit()
    allowed = limit.msgs_burst + limit.msgs_per_s * attacked["wave_s"]["flood"]
    assert a["received_from"].get(flood.peer_id, 0) <= allowed, (allowed, sent)


def test_unknown_tasks_are_dropped_at_rescoring(attacked):
    reasons = ("unknown_task", "foreign_task", "foreign_config", "heldout_ref")
    total = sum(s["rejections"].get(f"rescore:{r}", 0) for s in attacked["after"].values() for r in reasons)
    assert total > 0, {n: s["rejections"] for n, s in attacked["after"].items()}


def test_false_rewards_are_rescored_to_zero(attacked):
    for mode in ("false_rewards", "wrong_answers"):
        p = attacked["peers"][mode]
        # the groups reached the honest nodes' pools...
        assert any(s["received_from"].get(p.peer_id, 0) > 0 for s in attacked["after"].values()), mode
        # ... and the receiver's verifier (what node.learner.Learner.rescore calls) gives every completion 0
        assert p.rollouts
        claimed = [x for g in p.rollouts for x in (g.rewards or ())]
        assert mode != "false_rewards" or (claimed and min(claimed) == 1.0)
        assert all(reward(build_task(g.task), c) == 0.0 for g in p.rollouts for c in g.completions), mode


def test_garbage_rescoring_never_raises(attacked):
    groups: list[Rollout] = attacked["peers"]["garbage"].rollouts
    assert groups
    for g in groups:
        try:
            task = build_task(g.task)
        except TaskError:
            continue
        assert all(reward(task, c) == 0.0 for c in g.completions)


def test_honest_nodes_keep_training_and_stay_connected(attacked):
    a, b = attacked["nodes"]
    for n in (a, b):
        assert n.alive(), n.output()
        before, after = attacked["before"][n.name], attacked["after"][n.name]
        assert after["round"] >= before["round"] + 5, (n.name, before["round"], after["round"])
        assert after["received_from"].get((b if n is a else a).identity.peer_id, 0) > 0
    assert b.identity.peer_id in attacked["after"]["a"]["peers"]
    assert b.identity.peer_id not in attacked["after"]["a"]["mesh"]["banned"]
    assert a.identity.peer_id not in attacked["after"]["b"]["mesh"]["banned"]
