"""Mistakes a user can make end in one clear sentence and a non-zero exit, never a traceback; nothing saved is lost."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "node" / "assets" / "tiny"


def join(tmp: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "node.cli", "join", "--threads", "1", "--log-file", str(tmp / "node.log"), *args]
    full_env = {**os.environ, "SWARM_NODE_HOME": str(tmp / "home"), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def one_sentence_error(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def test_damaged_identity_is_refused_and_kept(tmp_path):
    ident = tmp_path / "id.key"
    ident.write_text("swarm-node identity v1\nkey-type: ed25519\nprivate-key: zz\npeer-id: nope\n")
    res = join(tmp_path, "--offline", "--rounds", "1", "--identity", str(ident))
    one_sentence_error(res, str(ident))
    assert ident.read_text().startswith("swarm-node identity v1\nkey-type: ed25519\nprivate-key: zz")  # not replaced


def test_model_not_available_offline(tmp_path):
    res = join(tmp_path, "--offline", "--rounds", "1", "--model", "qwen-0.5b", env={"HF_HUB_OFFLINE": "1"})
    one_sentence_error(res, "qwen-0.5b", "--model tiny")


def test_listen_port_in_use(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        res = join(tmp_path, "--rounds", "1", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
        one_sentence_error(res, "in use")
    finally:
        s.close()


def test_status_port_in_use(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        res = join(tmp_path, "--offline", "--rounds", "1", "--status-port", str(port))
        one_sentence_error(res, f"status port {port}")
    finally:
        s.close()


def test_checkpoint_from_another_model_and_existing_checkpoints(tmp_path):
    ck = tmp_path / "ck"
    ok = join(tmp_path, "--offline", "--rounds", "2", "--checkpoint-dir", str(ck), "--questions-per-round", "2")
    assert ok.returncode == 0, ok.stderr
    saved = sorted(p.name for p in ck.glob("round-*"))
    assert saved == ["round-000001"]
    # the same weights under another name: a checkpoint made for "tiny" must not be loaded into it
    other = tmp_path / "other-model"
    shutil.copytree(TINY, other)
    res = join(tmp_path, "--offline", "--rounds", "4", "--checkpoint-dir", str(ck), "--resume", "--model", str(other))
    one_sentence_error(res, "tiny")
    # starting fresh over existing checkpoints would shadow them: refused
    res = join(tmp_path, "--offline", "--rounds", "4", "--checkpoint-dir", str(ck))
    one_sentence_error(res, "--resume")
    assert sorted(p.name for p in ck.glob("round-*")) == saved  # nothing saved was lost


def test_identity_command(tmp_path):
    p = tmp_path / "me.key"
    run = lambda *a: subprocess.run([sys.executable, "-m", "node.cli", "identity", "--identity", str(p), *a],
                                    cwd=ROOT, capture_output=True, text=True, timeout=60)
    missing = run()
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "does not exist" in missing.stderr
    created = run("--create")
    assert created.returncode == 0 and "created" in created.stdout and "12D3KooW" in created.stdout
    shown = run()
    assert shown.returncode == 0
    assert created.stdout.split("peer id")[1].split()[0] == shown.stdout.split("peer id")[1].split()[0]
