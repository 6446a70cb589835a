"""--tensorboard / --wandb: a node's rounds land in real TensorBoard event files and a real (offline) W&B run, read back
with TensorBoard's own event reader and wandb's own record protobuf, value for value against the --metrics lines."""
from __future__ import annotations

import builtins
import json
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
import trio

from node.app import user_error
from node.config import ConfigError, NodeConfig
from node.policy import load_policy
from node.run import NodeRuntime
from node.tracking import Trackers, run_name
from protocol.identity import Identity

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def wandb_history(run_file: Path) -> tuple[dict[int, dict[str, float]], dict]:
    """(step -> logged values, config) from a .wandb file: LevelDB-log framing (wandb's own format, 32 KiB blocks,
    7-byte headers; wandb 0.31 ships no Python reader) around wandb's own Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, buf, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first, then middle / last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    history: dict[int, dict[str, float]] = {}
    config: dict = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            history[int(row.pop("_step"))] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind in ("run", "config"):  # the run record carries wandb.init's config
            items = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    return history, config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A lone node, 3 rounds, a held-out evaluation every round, with --metrics, --tensorboard and --wandb."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_DIR", str(tmp / "wb"))
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("WANDB_MODE", raising=False)
    cfg = NodeConfig(offline=True, rounds=3, questions_per_round=8, group_size=4, eval_every=1, eval_size=16,
                     checkpoint_dir=str(tmp / "ck"), metrics=str(tmp / "m.jsonl"), tensorboard=str(tmp / "tb"),
                     wandb=True, wandb_project="test-project")
    node = NodeRuntime(cfg, Identity.generate(), load_policy("tiny", device="cpu"))
    trio.run(node.run)
    mp.undo()
    rows = [json.loads(x) for x in (tmp / "m.jsonl").read_text().splitlines()]
    return tmp, node, rows


def test_tensorboard_event_files_hold_every_rounds_metrics(run):
    tmp, node, rows = run
    run_dir = tmp / "tb" / run_name(node.cfg, node.identity.peer_id)
    got = tb_scalars(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key, tag in (("reward_mean", "reward/reward_mean"), ("heldout_acc", "eval/heldout_acc"),
                     ("wall_s", "time/wall_s"), ("loss", "train/loss"), ("n_local", "train/n_local"),
                     ("peers", "train/peers")):
        assert [s for s, _ in got[tag]] == [0, 1, 2], tag
        # event files store float32
        assert [v for _, v in got[tag]] == pytest.approx([float(r[key]) for r in rows], rel=1e-6, abs=1e-7), tag


def test_wandb_offline_run_holds_every_rounds_metrics(run):
    tmp, node, rows = run
    files = list((tmp / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1  # offline by default: nothing was sent anywhere
    history, config = wandb_history(files[0])
    assert sorted(history) == [0, 1, 2]
    assert config["swarm"] == node.cfg.swarm and config["group_size"] == 4 and config["wandb_mode"] == "offline"
    for r in rows:
        h = history[r["round"]]
        assert h["reward/reward_mean"] == pytest.approx(r["reward_mean"])
        assert h["eval/heldout_acc"] == pytest.approx(r["heldout_acc"])
        assert h["train/n_local"] == r["n_local"]


class FakeNode:
    received_from = Counter({"12D3KooWpeerAAAAAAAA11111111": 5, "12D3KooWpeerBBBBBBBB22222222": 2})
    trained_from = Counter({"12D3KooWpeerAAAAAAAA11111111": 3})

    def rejections(self) -> dict[str, int]:
        return {"bad_signature": 4, "rescore:foreign_config": 1}


def test_per_peer_counts_and_rejections_are_logged(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = NodeConfig(tensorboard=str(tmp_path / "tb"), wandb=True, wandb_project="t")
    t = Trackers(cfg, "12D3KooWmynodeXXXXXXXX")
    t.log({"round": 7, "reward_mean": 0.5, "note": "text is not a scalar", "nan": float("nan")}, FakeNode())
    t.close()
    got = tb_scalars(tmp_path / "tb" / run_name(cfg, "12D3KooWmynodeXXXXXXXX"))
    want = {"peers/received/11111111": 5.0, "peers/received/22222222": 2.0, "peers/trained_on/11111111": 3.0,
            "rejections/bad_signature": 4.0, "rejections/rescore:foreign_config": 1.0, "reward/reward_mean": 0.5}
    assert {k: v[0] for k, v in got.items()} == {k: (7, v) for k, v in want.items()}
    history, _ = wandb_history(next((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")))
    assert history == {7: want}


def test_a_missing_extra_is_one_sentence_before_the_first_round(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = NodeConfig(offline=True, rounds=1, questions_per_round=4, group_size=2, wandb=True,
                     checkpoint_dir=str(tmp_path / "ck"), metrics=str(tmp_path / "m.jsonl"))
    node = NodeRuntime(cfg, Identity.generate(), load_policy("tiny", device="cpu"))
    with pytest.raises(BaseException) as info:
        trio.run(node.run)
    assert user_error(info.value) == "--wandb needs the wandb package: pip install 'swarm-node[wandb]'"
    assert node.round == 0 and (not (tmp_path / "m.jsonl").exists() or not (tmp_path / "m.jsonl").read_text())
    with pytest.raises(ConfigError, match="--wandb-mode must be offline or online"):
        NodeConfig(wandb_mode="sometimes")
