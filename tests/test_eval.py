"""`swarm-node eval`: the node's held-out split and numbers (Learner.evaluate's), pass@k, determinism, JSON, errors."""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio

from node.checkpoint import MODEL_FILE, STATE_FILE
from node.config import NodeConfig
from node.evaluate import EvalError, SCHEMA, _run, evaluate, load_model, pass_at_k, resolve_settings
from node.export import export_checkpoint, find_checkpoint
from node.learner import Learner
from node.policy import load_policy
from node.run import NodeRuntime
from protocol.identity import Identity

ROOT = Path(__file__).resolve().parents[1]
TASKS = "arith,basic_arithmetic"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> NodeRuntime:
    """A lone tiny node that trained 2 rounds on two families and checkpointed."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("node")
    cfg = NodeConfig(offline=True, rounds=2, questions_per_round=8, group_size=4, seed=2,
                     tasks=TASKS, checkpoint_dir=str(tmp / "ck"))
    node = NodeRuntime(cfg, Identity.generate(), load_policy("tiny", device="cpu"))
    trio.run(node.run)
    assert node.last_saved == 1
    return node


def cli(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "node.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_sentence_error(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def test_pass_at_k_is_the_unbiased_estimator():
    # the estimator is the chance that k of the n samples, drawn without replacement, hold a correct one
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 2, 1) == 0.25


def test_greedy_accuracy_per_family_equals_learner_evaluate(trained):
    """The checkpoint, loaded from disk, scores exactly what the node's own Learner.evaluate scores on its live
    policy: overall and per family (a node that trains on one family evaluates it alone)."""
    loaded = load_model(str(trained.checkpoint_dir), device="cpu")
    assert loaded.kind == "checkpoint" and loaded.round == 1
    s = resolve_settings(loaded, n=40, samples=0)
    assert s.tasks == TASKS and s.max_new_tokens == trained.cfg.max_new_tokens  # the checkpoint's own settings
    got = evaluate(loaded.policy, s)
    assert got["overall"]["n"] == 40 and [f["n"] for f in got["families"].values()] == [20, 20]
    assert got["overall"]["greedy_acc"] == trained.learner.evaluate(40)
    for fam in ("arith", "basic_arithmetic"):
        alone = Learner(trained.policy, trained.cfg.replace(tasks=fam), random.Random(0))
        assert got["families"][fam]["greedy_acc"] == alone.evaluate(20), fam
    assert 0 < got["families"]["arith"]["greedy_acc"] < 1  # a figure that can tell two policies apart


def test_json_report_is_deterministic_across_processes_and_has_the_schema(trained, tmp_path):
    out = tmp_path / "r.json"
    ck = str(trained.checkpoint_dir)
    res = cli("eval", "--model", "tiny", "--model", ck, "--n", "24", "--samples", "4", "--k", "1,2,4",
              "--threads", "1", "--seed", "7", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "%|" not in res.stderr  # no progress bar off a terminal
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA and report["split"] == "heldout"
    assert report["settings"] == {"tasks": "arith", "task_config": "", "n": 24, "samples": 4, "ks": [1, 2, 4],
                                  "seed": 7, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
    a, b = report["models"]
    assert (a["model"], a["kind"], a["round"]) == ("tiny", "model", None)
    assert (b["model"], b["kind"], b["round"], b["model_name"]) == (ck, "checkpoint", 1, "tiny")
    for m in report["models"]:
        assert set(m["families"]) == {"arith"}
        for fig in [m["overall"], *m["families"].values()]:
            assert fig["n"] == 24 and set(fig["pass_at_k"]) == {"1", "2", "4"}
            assert fig["pass_at_k"]["1"] == pytest.approx(fig["sampled_acc"])
            ladder = [fig["pass_at_k"][k] for k in ("1", "2", "4")]
            assert ladder == sorted(ladder) and all(0 <= x <= 1 for x in ladder + [fig["greedy_acc"]])
            assert fig["sampled_acc"] * 24 * 4 == pytest.approx(round(fig["sampled_acc"] * 24 * 4))
        assert len(m["questions"]) == 24 and [q[1] for q in m["questions"]] == list(range(24))
        assert sum(q[2] for q in m["questions"]) / 24 == m["overall"]["greedy_acc"]
        assert sum(q[3] for q in m["questions"]) / 96 == pytest.approx(m["overall"]["sampled_acc"])
    assert len(out.read_text().splitlines()) < 150  # a row per line
    # the printed table holds the same figures
    assert f"{b['overall']['greedy_acc']:.3f}" in res.stdout and f"(round 1)" in res.stdout
    assert f"greedy {b['overall']['greedy_acc'] - a['overall']['greedy_acc']:+.3f}" in res.stdout
    # the same command in this process gives the same numbers; another seed other samples
    again = _run(("tiny", ck), device="cpu", dtype="auto", base=None, threads=1, tasks=None, task_config=None, n=24,
                 samples=4, ks=(1, 2, 4), seed=7, max_new_tokens=None, temperature=None, top_p=None)
    strip = lambda r: [{k: v for k, v in m.items() if k != "seconds"} for m in r["models"]]  # noqa: E731
    assert strip(again) == strip(report)
    other = _run(("tiny",), device="cpu", dtype="auto", base=None, threads=1, tasks=None, task_config=None, n=24,
                 samples=4, ks=(1,), seed=8, max_new_tokens=None, temperature=None, top_p=None)
    assert other["models"][0]["overall"]["greedy_acc"] == a["overall"]["greedy_acc"]
    mine, theirs = a["questions"], other["models"][0]["questions"]
    assert [q[:3] for q in mine] == [q[:3] for q in theirs] and [q[3] for q in mine] != [q[3] for q in theirs]


def test_an_export_evaluates_as_its_checkpoint(trained, tmp_path):
    out = export_checkpoint(trained.checkpoint_dir, tmp_path / "out").out
    kw = dict(device="cpu", dtype="auto", base=None, threads=1, tasks=None, task_config=None, n=20, samples=2,
              ks=None, seed=0, max_new_tokens=None, temperature=None, top_p=None)
    a, b = (_run((str(p),), **kw)["models"][0] for p in (trained.checkpoint_dir, out))
    assert (a["kind"], b["kind"]) == ("checkpoint", "directory") and b["round"] == 1
    assert set(b["families"]) == set(TASKS.split(","))  # the export's swarm_node.json: the node's tasks
    assert (a["families"], a["overall"]) == (b["families"], b["overall"])


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from node import evaluate as ev

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bars = []
    make = ev._progress

    def recording(total, label):
        bar = make(total, label)
        bars.append(bar)
        return bar

    monkeypatch.setattr(ev, "_progress", recording)
    kw = dict(device="cpu", dtype="auto", base=None, threads=1, tasks=None, task_config=None, n=10, samples=2,
              ks=None, seed=0, max_new_tokens=None, temperature=None, top_p=None)
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    _run(("tiny",), **kw)
    assert len(bars) == 1 and bars[0].n == bars[0].total == 20  # 10 greedy + 10 sampled questions, all counted
    assert "\rtiny:" in tty.getvalue() and "q/s" in tty.getvalue()
    bars.clear()
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    _run(("tiny",), **kw)
    assert bars == [None] and piped.getvalue() == ""


def damaged_copy(trained: NodeRuntime, tmp: Path) -> Path:
    ck = tmp / "ck"
    shutil.copytree(trained.checkpoint_dir, ck)
    newest = find_checkpoint(ck)
    data = bytearray((newest / MODEL_FILE).read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the weights
    (newest / MODEL_FILE).write_bytes(bytes(data))
    return newest


def test_bad_input_is_one_sentence_and_a_nonzero_exit(trained, tmp_path):
    one_sentence_error(cli("eval", "--model", str(tmp_path / "nowhere")), "no model directory or checkpoint",
                       "nowhere")
    newest = damaged_copy(trained, tmp_path)
    one_sentence_error(cli("eval", "--model", "tiny", "--model", str(newest), "--n", "4", "--samples", "0"),
                       str(newest), "damaged", "SHA-256")
    one_sentence_error(cli("export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")), "no checkpoint")
    assert not (tmp_path / "x").exists()


def run_eval_error(capsys, *words: str, **kw) -> str:
    """The command's body in-process (what the CLI runs after parsing): exit 2, one `error:` line."""
    from node.evaluate import run_eval

    args = dict(models=("tiny",), tasks=None, task_config=None, n=4, samples=0, ks=None, seed=0,
                max_new_tokens=None, temperature=None, top_p=None, device="cpu", dtype="auto", base=None, threads=1,
                out=None)
    assert run_eval(**{**args, **kw}) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def test_more_bad_input(trained, tmp_path, capsys):
    newest = damaged_copy(trained, tmp_path)
    (newest / STATE_FILE).write_text("{not json")
    run_eval_error(capsys, "damaged", STATE_FILE, models=(str(newest),))
    for p in (tmp_path / "ck").glob("round-*"):
        (p / MODEL_FILE).write_bytes(b"")
    run_eval_error(capsys, "no intact checkpoint", models=(str(tmp_path / "ck"),))
    run_eval_error(capsys, "nosuchfamily", tasks="nosuchfamily")
    run_eval_error(capsys, "--samples", samples=4, ks="8")
    run_eval_error(capsys, "--k", ks="1,x")
    run_eval_error(capsys, "--task-config", task_config="[1]")
    run_eval_error(capsys, "cannot write", out="/proc/nope/r.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="neither a model directory"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(EvalError, match="no model directory or checkpoint"):
        load_model("./runs/not-here")
