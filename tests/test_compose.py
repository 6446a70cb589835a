"""No Docker engine runs here, so the compose file, the Dockerfile and .dockerignore are checked by parsing them and
resolving each service's settings with our own CLI; a container's life (finish, restart, resume) runs as a real
process with a service's environment; `simulate` runs the same topology for real.

What a real engine showed (issue 15): every node ran with the same seed (identical first-round rewards), a finished
node was restarted forever by `unless-stopped`, build tools stayed in the image, the image was built four times, and the
logs counted rounds from 0 and from 1 in the same life."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from node.cli import main
from node.config import NodeConfig, seed_for_peer
from protocol.identity import Identity, load_identity, load_or_create_identity

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
CPU_NODES = ["seed", "node1", "node2", "node3"]
CPU_SERVICES = [n for n, s in SERVICES.items() if "gpu" not in s.get("profiles", [])]
SEED_KEY = ROOT / "docker" / "seed-identity.key"


def resolved(service: str, home: Path) -> dict:
    """The settings a service's container would run with, resolved by our own CLI; `home` stands for its /data volume
    (the image sets SWARM_NODE_HOME=/data)."""
    svc = SERVICES[service]
    env = {k: str(v) for k, v in svc["environment"].items()}
    env["SWARM_NODE_HOME"] = str(home)
    assert svc["command"][0] == "join"
    args = [a.replace("/seed/identity.key", str(SEED_KEY)) for a in svc["command"][1:]]
    res = CliRunner().invoke(main, ["join", *args, "--print-config"], env=env)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_four_cpu_nodes_on_tiny_with_resume(tmp_path):
    for name in CPU_NODES:
        cfg = resolved(name, tmp_path / name)
        assert cfg["model"] == "tiny" and cfg["swarm"] == "docker-local" and cfg["resume"] is True
        assert cfg["listen"] == "/ip4/0.0.0.0/tcp/4001"


def test_others_bootstrap_to_the_seed_address(tmp_path):
    seed = load_identity(SEED_KEY)
    ip = SERVICES["seed"]["networks"]["swarm"]["ipv4_address"]
    expected = f"/ip4/{ip}/tcp/4001/p2p/{seed.peer_id}"
    assert resolved("seed", tmp_path / "seed")["bootstrap"] == []  # the seed is a peer like the others; it dials nobody
    for name in ["node1", "node2", "node3", "worker", "gpu-node"]:
        assert resolved(name, tmp_path / name)["bootstrap"] == [expected], name
    subnet = COMPOSE["networks"]["swarm"]["ipam"]["config"][0]["subnet"]
    assert ip.startswith(subnet.split(".0.0/")[0] + ".")


def test_each_node_has_its_own_data_volume():
    mounts = {}
    for name in CPU_NODES:
        vols = [v for v in SERVICES[name]["volumes"] if v.endswith(":/data")]
        assert len(vols) == 1, name
        mounts[name] = vols[0].split(":")[0]
        assert mounts[name] in COMPOSE["volumes"]
    assert len(set(mounts.values())) == len(CPU_NODES)
    assert SERVICES["worker"]["volumes"] == ["/data"]  # one anonymous volume per scaled replica


def test_gpu_profile_runs_a_real_model(tmp_path):
    gpu = SERVICES["gpu-node"]
    assert gpu["profiles"] == ["gpu"]
    cfg = resolved("gpu-node", tmp_path)
    assert cfg["model"] == "qwen-0.5b" and cfg["device"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    # its own tag (it must not overwrite the CPU image) and the CUDA torch through the builder's ARG
    assert gpu["image"] != SERVICES["seed"]["image"]
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX"]
    assert "TORCH_INDEX" in " ".join(i for stage in dockerfile_stages()[:-1] for i in stage["lines"])


# -- seeds: each node its own, an explicit one reproduces -------------------------------------------------------------

def test_no_service_pins_a_seed_so_each_node_derives_its_own(tmp_path):
    for name, svc in SERVICES.items():
        assert "--seed" not in svc["command"] and "SWARM_NODE_SEED" not in svc["environment"], name
    # the seed's identity is fixed, so is its seed; --print-config shows the one it runs with
    assert resolved("seed", tmp_path / "seed")["seed"] == seed_for_peer(load_identity(SEED_KEY).peer_id)
    # a fresh volume has no identity yet (the first start creates it): no seed to show
    assert resolved("node1", tmp_path / "node1")["seed"] is None
    # once each container has made its identity (two scaled workers included), every node has a different seed
    seeds = {"seed": resolved("seed", tmp_path / "seed")["seed"]}
    for name in ["node1", "node2", "node3", "worker", "worker"]:
        home = tmp_path / f"{name}-{len(seeds)}"
        ident, created = load_or_create_identity(home / "identity.key")
        assert created
        seeds[f"{name}-{len(seeds)}"] = s = resolved(name, home)["seed"]
        assert s == seed_for_peer(ident.peer_id)
    assert len(set(seeds.values())) == len(seeds), seeds
    # an explicit one wins over the identity, 0 included
    res = CliRunner().invoke(main, ["join", "--seed", "0", "--identity", str(SEED_KEY), "--print-config"])
    assert res.exit_code == 0 and json.loads(res.output)["seed"] == 0, res.output


@pytest.fixture(scope="module")
def policy():
    from node.policy import load_policy

    torch.set_num_threads(1)
    return load_policy("tiny")


def first_round(cfg: NodeConfig, identity: Identity, policy) -> tuple[int, list[str], list[tuple[str, ...]]]:
    """(resolved seed, questions, completions) of a node's first round, through the node's own RNG and learner."""
    from node.run import NodeRuntime
    from verifiers.tasks import build_task

    node = NodeRuntime(cfg, identity, policy)
    groups = node.learner.rollout(0, 8)
    return node.cfg.seed, [build_task(g.ref).question for g in groups], [g.completions for g in groups]


def test_two_default_nodes_sample_different_tasks_and_an_explicit_seed_reproduces(policy, tmp_path):
    a, b = Identity.generate(), Identity.generate()
    cfg = NodeConfig(offline=True, group_size=4, checkpoint_dir=str(tmp_path))
    seed_a, qa, ca = first_round(cfg, a, policy)
    seed_b, qb, cb = first_round(cfg, b, policy)
    assert (seed_a, seed_b) == (seed_for_peer(a.peer_id), seed_for_peer(b.peer_id)) and seed_a != seed_b
    # one shared default seed gave 8 of 8 identical questions (and identical completions) on every node
    assert sum(x == y for x, y in zip(qa, qb)) <= 1, (qa, qb)
    assert ca != cb
    # the same identity again: the same seed, the same round (a node's own run is still reproducible)
    assert first_round(cfg, a, policy) == (seed_a, qa, ca)
    # an explicit seed reproduces a run whatever the identity, and is the one passed (0 included)
    explicit = cfg.replace(seed=0)
    s0, q0, c0 = first_round(explicit, a, policy)
    assert s0 == 0 and first_round(explicit, b, policy) == (0, q0, c0)


# -- restart policy, numbering of rounds in the logs ------------------------------------------------------------------

def container_life(home: Path, rounds: int) -> tuple[int, str]:
    """One life of node1's container as a real process: its environment and command, offline (no seed to dial) and
    stopping after `rounds` rounds (SWARM_NODE_ROUNDS, as in the issue's run)."""
    svc = SERVICES["node1"]
    env = {**os.environ, **{k: str(v) for k, v in svc["environment"].items()}, "SWARM_NODE_HOME": str(home),
           "SWARM_NODE_ROUNDS": str(rounds), "SWARM_NODE_METRICS": str(home / "metrics.jsonl"),
           "SWARM_NODE_STATUS_PORT": "0", "SWARM_NODE_QUESTIONS_PER_ROUND": "8", "SWARM_NODE_GROUP_SIZE": "4",
           "PYTHONUNBUFFERED": "1"}
    del env["SWARM_NODE_BOOTSTRAP"]
    cmd = [sys.executable, "-m", "node.cli", *svc["command"][:1], "--listen", "/ip4/127.0.0.1/tcp/0", "--offline",
           *svc["command"][3:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_clean_finish_exits_0_so_on_failure_leaves_it_down_and_the_logs_count_rounds_from_1(tmp_path):
    # Docker's on-failure restarts a container whose process exits non-zero (a crash, an OOM kill: 137) and leaves
    # one that exits 0 down; unless-stopped restarted a finished node forever (8 restarts in 75 s).
    for name, svc in SERVICES.items():
        assert svc["restart"] == "on-failure", name
    home = tmp_path / "node1-data"
    rc, out = container_life(home, 1)
    assert rc == 0, out
    peer = load_identity(home / "identity.key").peer_id
    seed = seed_for_peer(peer)
    assert f"seed {seed} (from the peer ID" in out, out
    assert re.search(r"stopped after round 1; checkpoint of round 1 in ", out), out
    ck = next(home.glob("checkpoints/docker-local/round-*"))
    assert json.loads((ck / "state.json").read_text())["config"]["seed"] == seed  # the checkpoint records it
    # the container started again (docker start, or a crash): it resumes where it stopped, counting the same way
    rc, out = container_life(home, 2)
    assert rc == 0, out
    assert "resumed after round 1\n" in out and re.search(r"stopped after round 2; checkpoint of round 2 in ", out), out
    assert [json.loads(x)["round"] for x in (home / "metrics.jsonl").read_text().splitlines()] == [0, 1]


# -- one image, built once, without build tools -----------------------------------------------------------------------

def test_the_image_is_built_once_and_reused_by_every_cpu_service():
    builders = [n for n in CPU_SERVICES if "build" in SERVICES[n]]
    assert builders == ["seed"]  # `build: .` in the shared anchor built it four times
    for name in CPU_SERVICES:
        assert SERVICES[name]["image"] == "swarm-node:cpu", name
        if name not in builders:
            assert SERVICES[name]["pull_policy"] == "never", name  # local only: never looked up on a registry


def dockerfile_stages() -> list[dict]:
    """The Dockerfile's stages: {"name", "lines"}, each instruction on one line (continuations joined, comments out)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?$", line, re.IGNORECASE)
        if m:
            stages.append({"name": m.group(1), "lines": []})
        else:
            stages[-1]["lines"].append(line)
    return stages


def test_the_final_stage_has_no_build_tools():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    built = " ".join(build["lines"])
    assert "gcc" in built and "libgmp-dev" in built  # fastecdsa (py-libp2p) compiles against GMP, in the builder
    assert "torch==2.13.0" in built and "whl/cpu" in built
    run = " ".join(i for i in final["lines"] if i.upper().startswith("RUN"))
    for tool in ("gcc", "g++", "libgmp-dev", "build-essential", "make ", "pip install"):
        assert tool not in run, tool
    assert "libgmp10" in run  # GMP's runtime library only
    assert f"COPY --from={build['name']} /opt/venv /opt/venv" in final["lines"]
    env = " ".join(i for i in final["lines"] if i.startswith("ENV"))
    assert "SWARM_NODE_HOME=/data" in env and "PATH=/opt/venv/bin:" in env
    assert 'ENTRYPOINT ["swarm-node"]' in final["lines"]
    # an instruction has no trailing comments in a Dockerfile: a "# ..." after WORKDIR would become the path
    assert all(" #" not in i for s in stages for i in s["lines"] if not i.upper().startswith("RUN"))


# -- ports, teardown, build context ----------------------------------------------------------------------------------

def test_published_ports_are_on_loopback_only():
    published = [(n, p) for n, s in SERVICES.items() for p in s.get("ports", [])]
    assert published == [("seed", "127.0.0.1:4001:4001")]  # its private key is in this repository


def test_readme_documents_complete_teardown_and_the_restart_policy():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A local swarm with Docker", 1)[1].split("\n## ", 1)[0]
    profiles = {p for s in SERVICES.values() for p in s.get("profiles", [])}
    downs = [line for line in section.splitlines() if "docker compose" in line and " down" in line]
    assert any(all(f"--profile {p}" in line for p in profiles) for line in downs), downs
    assert "`restart: on-failure`" in section


def dockerignore_excludes(patterns: list[tuple[bool, re.Pattern, str]], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides ('!' re-includes)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negated, rx, _ in patterns:
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[tuple[bool, re.Pattern, str]]:
    """(negated, regex, pattern) per line; `**` spans directories (zero included), `*` and `?` stay within one."""
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!").lstrip("/"))
        rx = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        out.append((negated, re.compile(rx.replace(r"\?", "[^/]")), pat))
    return out


def test_dockerignore_keeps_the_venv_runs_and_checkpoints_out_of_the_context_but_not_the_sources():
    patterns = dockerignore_patterns()
    reinclude = [re.split(r"[*?\[]", pat)[0] for neg, _, pat in patterns if neg]  # the literal heads of '!' lines
    context, size = set(), 0
    for d, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(d, ROOT)
        rel = "" if rel == "." else rel + "/"
        # a directory that no '!' pattern reaches into is not walked (the .venv alone is 1.5 GB)
        dirs[:] = [x for x in dirs if not dockerignore_excludes(patterns, rel + x)
                   or any(r.startswith(rel + x + "/") or (rel + x + "/").startswith(r) for r in reinclude)]
        for f in files:
            if not dockerignore_excludes(patterns, rel + f):
                context.add(rel + f)
                size += os.path.getsize(os.path.join(d, f))
    for kept_out in (".venv/", "runs/", ".git/"):
        assert not any(p.startswith(kept_out) for p in context), kept_out
    assert not any("/checkpoints/" in p or p.startswith("checkpoints/") or p.endswith("identity.key") for p in context)
    assert dockerignore_excludes(patterns, "runs/x/ck/round-000003/model.safetensors")
    assert dockerignore_excludes(patterns, "node/__pycache__/cli.cpython-311.pyc")
    # everything the Dockerfile copies is there, the tiny model's weights (package data) included
    copied = [i.split()[1:-1] for i in dockerfile_stages()[0]["lines"] if i.startswith("COPY")]
    for src in (s for srcs in copied for s in srcs):
        p = ROOT / src
        wanted = [str(f.relative_to(ROOT)) for f in (p.rglob("*") if p.is_dir() else [p])
                  if f.is_file() and "__pycache__" not in f.parts]
        assert wanted and set(wanted) <= context, src
    assert "node/assets/tiny/model.safetensors" in context
    assert size < 100 * 2**20, size / 2**20  # MB sent to the engine per build (the .venv alone was 1.5 GB)
