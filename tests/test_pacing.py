"""--min-round-s: rounds start at most that often, the idle time ends at a stop, and 0 changes nothing."""
import pytest
import trio

import node.run as node_run
from node.config import ConfigError, NodeConfig
from node.policy import load_policy
from node.run import NodeRuntime
from protocol.identity import Identity


def _node(tmp_path, **kw) -> NodeRuntime:
    cfg = NodeConfig(offline=True, questions_per_round=2, group_size=2, checkpoint_dir=str(tmp_path / "ck"), **kw)
    return NodeRuntime(cfg, Identity.generate(), load_policy("tiny", device="cpu"))


@pytest.fixture
def starts(monkeypatch):
    """Records when each round starts (trio clock)."""
    seen: list[float] = []
    real = node_run.run_round

    async def recording(node, r):
        seen.append(trio.current_time())
        return await real(node, r)

    monkeypatch.setattr(node_run, "run_round", recording)
    return seen


def test_rounds_start_no_more_often_than_min_round_s(tmp_path, monkeypatch):
    seen: list[float] = []

    async def instant_round(node, r):  # a round far shorter than the pace, whatever the machine's load
        seen.append(trio.current_time())
        return {"round": r}

    monkeypatch.setattr(node_run, "run_round", instant_round)
    node = _node(tmp_path, rounds=4, min_round_s=0.5)
    trio.run(node.run)
    assert node.round == 4 and len(seen) == 4
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert min(gaps) >= 0.5, gaps
    monkeypatch.setattr(node_run, "run_round", instant_round)
    seen.clear()
    trio.run(_node(tmp_path / "b", rounds=4).run)  # 0: back to back
    assert max(b - a for a, b in zip(seen, seen[1:])) < 0.5


def test_a_stop_ends_the_idle_wait(tmp_path, starts):
    node = _node(tmp_path, rounds=0, min_round_s=600)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(node.run)
            while node.round < 1:
                await trio.sleep(0.05)
            node.stop_requested = True  # what SIGINT/SIGTERM set
    # were the wait not ended by the stop, it would last 600 s: the deadline makes that a failure
    trio.run(lambda: _with_deadline(main, 60))
    assert node.round == 1 and len(starts) == 1
    assert (tmp_path / "ck").exists() and any((tmp_path / "ck").iterdir())  # it checkpointed on the way out


async def _with_deadline(fn, seconds: float) -> None:
    with trio.fail_after(seconds):
        await fn()


def test_min_round_s_is_checked():
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--min-round-s must be a number of seconds >= 0"):
            NodeConfig(min_round_s=bad)
    assert NodeConfig().min_round_s == 0
