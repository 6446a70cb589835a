"""The CLI surface: commands listed, settings from flags > env > config file > defaults, mistakes as one sentence."""
import json
import subprocess
import sys

from click.testing import CliRunner

from node.cli import main
from node.config import ConfigError, NodeConfig, read_config_file


def resolved(args, env=None):
    res = CliRunner().invoke(main, ["join", *args, "--print-config"], env=env or {})
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_help_lists_commands():
    out = CliRunner().invoke(main, ["--help"]).output
    for cmd in ("join", "simulate", "status", "identity"):
        assert cmd in out


def test_defaults_follow_the_paper():
    cfg = resolved(["--model", "qwen-0.5b"])
    assert (cfg["local"], cfg["external"], cfg["group_size"], cfg["questions_per_round"]) == (4, 4, 8, 8)
    assert (cfg["beta"], cfg["epsilon"], cfg["epsilon_high"]) == (0.0, 0.2, 0.28)
    # the tiny model keeps the 4/4 ratio at a batch it learns from (see node.config.MODEL_DEFAULTS)
    tiny = resolved([])
    assert (tiny["local"], tiny["external"], tiny["questions_per_round"]) == (16, 16, 32)
    assert resolved(["--local", "6", "--external", "2"])["external"] == 2  # a flag still wins


def test_precedence_flag_over_env_over_file(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text('model = "tiny"\nlocal = 6\nexternal = 2\ngroup-size = 4\nbootstrap = ["/ip4/1.2.3.4/tcp/1/p2p/x"]\n')
    cfg = resolved(["--config", str(toml)])
    assert (cfg["local"], cfg["external"], cfg["group_size"]) == (6, 2, 4)
    assert cfg["bootstrap"] == ["/ip4/1.2.3.4/tcp/1/p2p/x"]
    cfg = resolved(["--config", str(toml)], env={"SWARM_NODE_LOCAL": "3"})
    assert cfg["local"] == 3 and cfg["external"] == 2
    cfg = resolved(["--config", str(toml), "--local", "5"], env={"SWARM_NODE_LOCAL": "3"})
    assert cfg["local"] == 5


def test_yaml_config_and_env_bootstrap(tmp_path):
    y = tmp_path / "node.yaml"
    y.write_text("swarm: lab\nquestions-per-round: 4\n")
    cfg = resolved(["--config", str(y)], env={"SWARM_NODE_BOOTSTRAP": "/ip4/1.1.1.1/tcp/1 /ip4/2.2.2.2/tcp/2"})
    assert cfg["swarm"] == "lab" and cfg["questions_per_round"] == 4
    assert cfg["bootstrap"] == ["/ip4/1.1.1.1/tcp/1", "/ip4/2.2.2.2/tcp/2"]


def test_config_file_mistakes_are_one_sentence(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("locale = 3\n")
    try:
        read_config_file(bad)
        raise AssertionError("unknown key accepted")
    except ConfigError as e:
        assert "unknown setting 'locale'" in str(e)
    bad.write_text("local = [\n")
    res = CliRunner().invoke(main, ["join", "--config", str(bad), "--print-config"])
    assert res.exit_code == 2 and "not valid TOML" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["join", "--config", str(tmp_path / "missing.toml"), "--print-config"])
    assert res.exit_code == 2 and "cannot read config file" in res.output


def test_bad_flag_values_exit_nonzero_without_traceback():
    for args, words in [
        (["--group-size", "1"], "group-size"),
        (["--local", "0", "--external", "0"], "--local + --external"),
        (["--local", "abc"], "not a valid integer"),
        (["--status-port", "70000"], "status-port"),
        (["--swarm", "a b"], "--swarm"),
    ]:
        res = CliRunner().invoke(main, ["join", *args, "--print-config"])
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output and "Traceback" not in res.output


def test_config_validation_direct():
    try:
        NodeConfig(temperature=0)
        raise AssertionError
    except ConfigError as e:
        assert "temperature" in str(e)


def test_console_script_help_runs_as_a_process():
    out = subprocess.run([sys.executable, "-m", "node.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "simulate" in out.stdout
