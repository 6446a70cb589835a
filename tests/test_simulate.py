"""`swarm-node simulate`, the README's main job: real node processes, a summary and a plot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_simulate_three_nodes_exchange_rollouts_and_write_summary_and_plot(tmp_path):
    out = tmp_path / "sim"
    # a mixed swarm: node 1 loads the model from a directory, so it also runs with other defaults (8 questions, 4/4)
    tiny_dir = str(ROOT / "node" / "assets" / "tiny")
    res = subprocess.run([sys.executable, "-m", "node.cli", "simulate", "--nodes", "3", "--rounds", "12", "--out", str(out),
                          "--model", f"tiny,{tiny_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_codes"] == [0, 0, 0]
    dashboards = [line.split(": ", 1)[1] for line in res.stdout.splitlines() if " dashboard: " in line]
    assert len(dashboards) == 3 and all(d.startswith("http://127.0.0.1:") and d.endswith("/") for d in dashboards)
    assert len(set(dashboards)) == 3
    assert summary["node_models"] == ["tiny", tiny_dir, "tiny"]
    nodes = summary["nodes"]
    assert [n["rounds"] for n in nodes] == [12, 12, 12]
    for n in nodes:
        assert n["peers_seen"] == 2 and n["groups_received"] > 0 and n["external_groups_used"] > 0
        assert 0.0 <= n["mean_reward"] <= 1.0 and n["peer_id"].startswith("12D3KooW")
    png = (out / "rewards.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the tiny nodes ran with the tiny model's defaults (16 own + 16 external groups a round), not a fixed 4/4;
    # the directory-loaded node with the general defaults (I + J <= 8)
    def rows(i: int) -> list[dict]:
        return [json.loads(x) for x in (out / f"node-{i}" / "metrics.jsonl").read_text().splitlines()]

    assert max(r["n_local"] + r["n_external"] for r in rows(0)) > 8
    assert max(r["n_local"] + r["n_external"] for r in rows(1)) <= 8


def test_compare_isolated_runs_the_same_nodes_alone_then_together_and_writes_the_ratios(tmp_path):
    out = tmp_path / "cmp"
    res = subprocess.run([sys.executable, "-m", "node.cli", "simulate", "--nodes", "2", "--rounds", "4", "--out", str(out),
                          "--compare-isolated", "--eval-every", "2", "--extra=--eval-size=20"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "compare.json").read_text())

    def rows(run: str, i: int) -> list[dict]:
        return [json.loads(x) for x in (out / run / f"node-{i}" / "metrics.jsonl").read_text().splitlines()]

    iso = [rows("isolated", i) for i in range(2)]
    sw = [rows("swarm", i) for i in range(2)]
    assert all(len(r) == 4 for r in iso + sw)
    # isolated: no mesh, no peers' groups; together: the same seeds, and peers' groups were trained on
    assert all(x["peers"] == 0 and x["n_external"] == 0 for r in iso for x in r)
    assert sum(x["n_external"] for r in sw for x in r) > 0
    cum = lambda runs: sum(x["reward_mean"] for r in runs for x in r)  # noqa: E731
    assert doc["reward_ratio"] == pytest.approx(cum(sw) / cum(iso))
    final = lambda runs: sum(r[-1]["heldout_acc"] for r in runs) / len(runs)  # noqa: E731
    assert doc["heldout_ratio"] == pytest.approx(final(sw) / final(iso))
    assert "reward" in res.stdout and f"{doc['reward_ratio']:.2f}x" in res.stdout
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
