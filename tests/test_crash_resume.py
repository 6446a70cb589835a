"""Nothing lost: a node SIGKILLed at any moment restarts with the same identity from its newest complete checkpoint.

The round order is (node/round.py, node/run.py): generate -> train -> checkpoint(r) -> metrics line for r. So with
--checkpoint-every 1 a metrics line for round r means checkpoint r was already installed, and a kill can cost at most
the round in progress (its rollouts and training step), never a round that was reported as done.

Kills are drawn from a seeded RNG: most after a random delay (they land in generation, training, or checkpoint
writing, roughly in proportion to how long each takes), some right after a `.tmp-round-*` directory appears (they land
inside save_checkpoint: writing, renaming into place, pruning). Every outcome is printed (`pytest -s` shows it).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.checkpoint import CheckpointError, _read_verified_state
from node.simulate import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SEED = 20250607
# "random": SIGKILL a random fraction of a round after a round ended; "ckpt": SIGKILL 0-60 ms after a
# checkpoint's temporary directory appears.
KILLS = ["random", "ckpt", "random", "random", "ckpt", "random", "random"]


class Node:
    """One checkpoint dir, one identity, one metrics file; started again and again with the very same command."""

    def __init__(self, d: Path, *extra: str):
        self.dir = d
        self.ck = d / "ck"
        self.identity = d / "identity.key"
        self.metrics_path = d / "m.jsonl"
        self.cmd = [
            sys.executable, "-m", "node.cli", "join", "--model", "tiny", "--offline", "--checkpoint-every", "1",
            "--rounds", "0", "--resume", "--metrics", str(self.metrics_path), "--threads", "1",
            "--identity", str(self.identity), "--checkpoint-dir", str(self.ck), "--log-file", str(d / "node.log"),
            *extra,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "SWARM_NODE_HOME": str(d / "home")}
        self.lives = 0
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> subprocess.Popen:
        self.lives += 1
        out = open(self.out_path, "w")
        self.proc = subprocess.Popen([*self.cmd, *extra], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        out.close()
        return self.proc

    @property
    def out_path(self) -> Path:
        return self.dir / f"out-{self.lives}.log"

    def output(self) -> str:
        return self.out_path.read_text() if self.out_path.exists() else ""

    def metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def wait(self, pred, timeout: float, what: str, interval: float = 0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node exited (rc={self.proc.returncode}) while waiting for {what}:\n"
                                     f"{self.output()[-3000:]}")
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def disk(ck: Path) -> tuple[list[int], list[str]]:
    """(rounds of the round-* directories, names of leftover .tmp-*/.trash-* directories)."""
    if not ck.is_dir():
        return [], []
    rounds, leftovers = [], []
    for p in ck.iterdir():
        m = re.fullmatch(r"round-(\d+)", p.name)
        if m:
            rounds.append(int(m.group(1)))
        elif p.name.startswith("."):
            leftovers.append(p.name)
    return sorted(rounds), sorted(leftovers)


def assert_all_verify(ck: Path) -> None:
    for r in disk(ck)[0]:
        try:
            _read_verified_state(ck / f"round-{r:06d}")
        except CheckpointError as e:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"checkpoint on disk does not verify: {e}") from e


def life_facts(node: Node) -> tuple[str, int | None]:
    """(peer id printed at start, round resumed after or None for a fresh start) of the current life."""
    out = node.wait(lambda: (o := node.output()) and ("resumed after" in o or "starting fresh" in o) and o,
                    120, "the node to load its identity and checkpoint")
    assert "Traceback" not in out and "error:" not in out, out
    peer = re.search(r"identity (12D3Koo\w+)", out)
    assert peer, out
    resumed = re.search(r"resumed after round (\d+)", out)
    return peer.group(1), int(resumed.group(1)) - 1 if resumed else None  # printed from 1; checkpoints by index


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sigkill_at_random_moments_loses_at_most_the_round_in_progress(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    node = Node(tmp_path)
    outcomes = []
    peer_id = ident_hash = None
    expected_resume: int | None = None  # what the next life must resume after (None: fresh)
    leftovers_at_kill: list[str] = []
    try:
        node.start()
        for i, kind in enumerate(KILLS + ["final"]):
            # -- this life: same identity, resumed from the newest complete checkpoint, continues right after it
            peer, resumed = life_facts(node)
            if peer_id is None:
                assert "new identity" in node.output()
                peer_id, ident_hash = peer, sha(node.identity)
            else:
                assert "new identity" not in node.output(), node.output()
            assert peer == peer_id
            assert sha(node.identity) == ident_hash, "the identity file changed"
            assert resumed == expected_resume, (resumed, expected_resume, node.output())
            seen = len(node.metrics())
            rows = node.wait(lambda: (m := node.metrics()) and len(m) > seen and m, 120, "a round in this life")
            first_new = rows[seen]["round"]
            assert first_new == (0 if resumed is None else resumed + 1), (first_new, resumed)
            # the node has written a checkpoint since it started (before that metrics line): old leftovers are gone
            assert not set(leftovers_at_kill) & set(disk(node.ck)[1]), (leftovers_at_kill, disk(node.ck))
            if kind == "final":
                break

            # -- the kill
            if kind == "random":  # a random fraction of a round, whatever the machine's speed
                time.sleep(rng.random() * statistics.median(r["wall_s"] for r in node.metrics()[-5:]))
            else:
                before = set(disk(node.ck)[1])
                node.wait(lambda: set(p.name for p in node.ck.iterdir() if p.name.startswith(".tmp-")) - before,
                          60, "a checkpoint being written", interval=0.002)
                time.sleep(rng.uniform(0.0, 0.06))
            t_kill = time.time()
            node.kill()
            assert node.proc.returncode == -signal.SIGKILL

            # -- what the kill left
            rows = node.metrics()
            rounds, leftovers_at_kill = disk(node.ck)
            assert rounds, "no checkpoint on disk"
            assert_all_verify(node.ck)  # every round-* directory is complete: the newest is loadable
            done = rows[-1]["round"] + 1  # rounds reported finished before the kill
            covered = rounds[-1] + 1  # rounds the newest complete checkpoint holds
            assert done - covered <= 1, (done, covered)  # the claim; by the round order it is even <= 0
            lost = max(0, done - covered)
            tmp_rounds = [int(re.search(r"round-(\d+)", n).group(1)) for n in leftovers_at_kill if ".tmp-" in n]
            if tmp_rounds:
                phase = "checkpoint write (tmp dir left)"
            elif rounds[-1] > rows[-1]["round"]:
                phase = "after checkpoint install, before metrics line"
            else:  # in the next round: compare the time since the last metrics line with a typical generation time
                since = t_kill - rows[-1]["time"]
                gen = statistics.median(r["gen_s"] for r in rows[-5:])
                phase = "generation (est.)" if since < gen else "training (est.)"
            outcomes.append({"kill": i, "kind": kind, "phase": phase, "reported_done": done,
                             "resume_round": rounds[-1], "rounds_lost": lost, "leftovers": leftovers_at_kill})
            expected_resume = rounds[-1]
            node.start()

        # a clean stop still works after all that, and leaves only complete checkpoints and no leftovers
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=60) == 0, node.output()
        assert_all_verify(node.ck)
        assert disk(node.ck)[1] == []
        assert sha(node.identity) == ident_hash
    finally:
        node.kill()
        print("\ncrash/resume outcomes:")
        for o in outcomes:
            print("  " + json.dumps(o))


def test_damaged_newest_checkpoint_resumes_from_the_previous_one_with_a_warning(tmp_path: Path) -> None:
    node = Node(tmp_path)
    try:
        node.start("--rounds", "3")
        assert node.proc.wait(timeout=120) == 0, node.output()
        assert disk(node.ck)[0] == [0, 1, 2]
        # flip bytes in the middle of the newest checkpoint's model file, as disk damage would
        model = node.ck / "round-000002" / "model.safetensors"
        data = bytearray(model.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
        model.write_bytes(bytes(data))
        seen = len(node.metrics())

        node.start("--rounds", "5")
        assert node.proc.wait(timeout=120) == 0, node.output()
        out = node.output()
        assert re.search(r"skipping checkpoint round-000002: .*model\.safetensors does not match", out), out
        assert "resumed after round 2" in out, out  # the checkpoint of index 1: the second round
        assert [m["round"] for m in node.metrics()[seen:]] == [2, 3, 4]  # round 2 is run again, from round 1's state
        assert disk(node.ck) == ([2, 3, 4], [])  # the damaged round 2 was replaced, the trash swept
        assert_all_verify(node.ck)
    finally:
        node.kill()
