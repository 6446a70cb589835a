"""No Docker engine runs here, so the compose file and Dockerfile are checked by parsing; `simulate` runs the same
topology for real."""
import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from node.cli import main
from protocol.identity import load_identity

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
CPU_NODES = ["seed", "node1", "node2", "node3"]


def resolved(service):
    """The settings a service's container would run with, resolved by our own CLI."""
    svc = SERVICES[service]
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert svc["command"][0] == "join"
    args = [a.replace("/seed/identity.key", str(ROOT / "docker" / "seed-identity.key")) for a in svc["command"][1:]]
    res = CliRunner().invoke(main, ["join", *args, "--print-config"], env=env)
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_four_cpu_nodes_on_tiny_with_restart_and_resume():
    for name in CPU_NODES:
        cfg = resolved(name)
        assert cfg["model"] == "tiny" and cfg["swarm"] == "docker-local" and cfg["resume"] is True
        assert SERVICES[name]["restart"] == "unless-stopped"
        assert cfg["listen"] == "/ip4/0.0.0.0/tcp/4001"


def test_others_bootstrap_to_the_seed_address():
    seed = load_identity(ROOT / "docker" / "seed-identity.key")
    ip = SERVICES["seed"]["networks"]["swarm"]["ipv4_address"]
    expected = f"/ip4/{ip}/tcp/4001/p2p/{seed.peer_id}"
    assert resolved("seed")["bootstrap"] == []  # the seed is a peer like the others; it dials nobody
    for name in ["node1", "node2", "node3", "worker", "gpu-node"]:
        assert resolved(name)["bootstrap"] == [expected], name
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


def test_gpu_profile_runs_a_real_model():
    gpu = SERVICES["gpu-node"]
    assert gpu["profiles"] == ["gpu"]
    cfg = resolved("gpu-node")
    assert cfg["model"] == "qwen-0.5b" and cfg["device"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_dockerfile_installs_gmp_and_cpu_torch():
    text = (ROOT / "Dockerfile").read_text()
    assert "libgmp-dev" in text
    assert "torch==2.13.0" in text and "whl/cpu" in text
    assert "SWARM_NODE_HOME=/data" in text
    assert 'ENTRYPOINT ["swarm-node"]' in text
