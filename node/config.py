"""A node's settings: one frozen record, built from flags, env vars (SWARM_NODE_<NAME>) and a config file.

The CLI owns precedence (flags > env > config file > defaults); this module owns the defaults, validation and the
config-file reader, so scripts and tests can build a NodeConfig without click.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from swarm.shards import MAX_SHARDS


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one clear sentence."""


def data_dir() -> Path:
    """Where a node keeps its identity, checkpoints and logs unless told otherwise."""
    if os.environ.get("SWARM_NODE_HOME"):
        return Path(os.environ["SWARM_NODE_HOME"])
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "swarm-node"


# Settings whose right value depends on the model (None in NodeConfig = take it from here). The tiny model answers in ~5
# tokens and learns from bigger batches: measured with scripts/tune_tiny_grpo.py, 8 questions a round left 60 rounds
# within noise while 32 raised held-out greedy accuracy 0.27 -> 0.41-0.51 (lr 3e-4 collapsed). Real models keep the
# paper's shape: 8 questions, I + J = 8.
# The sparse regime's four task families (scripts/build_sparse_model.py, docs/sapo_experiment.md): short prompts the
# character tokenizer handles, each family one specialty with one config (what peers' refs must match).
SPARSE_TASKS = "arith,basic_arithmetic,decimal_arithmetic,fraction_simplification"
SPARSE_TASK_CONFIG: dict[str, dict[str, Any]] = {
    "arith": {"digits": 2, "ops": "+-"},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1, "operators": "+-*",
                         "allow_parentheses": False, "allow_negation": False, "whitespace": "single"},
    "decimal_arithmetic": {"min_terms": 2, "max_terms": 2, "min_num_decimal_places": 1, "max_num_decimal_places": 1,
                           "precision": 3},
    "fraction_simplification": {"max_value": 30, "max_factor": 6},
}

# The sparse regime's models (scripts/build_sparse_model.py): tiny-sparse, and tiny-cold, the same build with a colder
# start (3% of its warm-start targets in the rewarded format instead of 15%)
_SPARSE_DEFAULTS: dict[str, Any] = {
    "tasks": SPARSE_TASKS, "task_config": json.dumps(SPARSE_TASK_CONFIG, sort_keys=True),
    "questions_per_round": 32, "local": 16, "external": 16, "max_external_per_peer": 8,
    "max_new_tokens": 10, "learning_rate": 1e-4, "micro_batch_size": 64, "gen_micro_batch": 64,
    "external_baseline": "receiver", "external_positive_only": True, "adaptive_j": True}

MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    # the receiver's choices: measured in docs/sapo_experiment.md ("Settings: what was measured where")
    "tiny": {"questions_per_round": 32, "local": 16, "external": 16, "max_external_per_peer": 8,
             "max_new_tokens": 8, "learning_rate": 1e-4, "micro_batch_size": 64, "gen_micro_batch": 64,
             "external_baseline": "receiver", "external_positive_only": True, "adaptive_j": False},
    "tiny-sparse": _SPARSE_DEFAULTS,
    "tiny-cold": _SPARSE_DEFAULTS,
    "*": {"questions_per_round": 8, "local": 4, "external": 4, "max_external_per_peer": 2,
          "max_new_tokens": 512, "learning_rate": 1e-6,
          # not measured on real models yet: GRPO within the sender's group, as the paper does
          "external_baseline": "sender", "external_positive_only": False, "adaptive_j": False},
}
# Real models leave --micro-batch-size and --gen-micro-batch unset (None): node.memory_plan picks the largest that fit
# the device's free memory at start. Where no plan can (a script's NodeConfig, a model config unreadable here), the fixed
# default before.
MICRO_BATCH_FALLBACK = 64
# --learning-rate when --lora-r > 0 and none is given: LoRA's usual 1e-5 for real models; the tiny model measured with
# scripts/bench_lora.py
LORA_LEARNING_RATE: dict[str, float] = {"tiny": 3e-4, "tiny-sparse": 3e-4, "tiny-cold": 3e-4, "*": 1e-5}
DEFAULTS_FOR_ALL = {"tasks": "arith", "task_config": ""}  # per-model settings most models share


def model_defaults(model: str) -> dict[str, Any]:
    return {**DEFAULTS_FOR_ALL, **MODEL_DEFAULTS.get(model, MODEL_DEFAULTS["*"])}


def parse_task_config(spec: str) -> dict[str, dict[str, Any]]:
    """--task-config: a JSON object of per-family config overrides, e.g. '{"arith": {"digits": 3}}' ("" = none)."""
    if not spec.strip():
        return {}
    try:
        raw = json.loads(spec)
    except ValueError as e:
        raise ConfigError(f"--task-config must be a JSON object of family -> settings: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in raw.items()):
        raise ConfigError('--task-config must be a JSON object of family -> settings, e.g. {"arith": {"digits": 3}}')
    return raw


@dataclass(frozen=True)
class NodeConfig:
    # what to train
    model: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    tasks: str | None = None  # "family[:weight],..." (verifiers.parse_task_weights); None = the model's (arith)
    task_config: str | None = None  # JSON: per-family config overrides; None = the model's ("" = none)
    seed: int | None = None  # None = derived from the node's peer ID (seed_for_peer), resolved at startup
    threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)
    # the SAPO mix
    # None = the model's default (MODEL_DEFAULTS)
    local: int | None = None  # I: own groups trained on per round
    external: int | None = None  # J: peers' groups trained on per round (own groups fill in when the pool is short)
    questions_per_round: int | None = None  # groups generated (and shared) per round
    group_size: int = 8
    max_external_per_peer: int | None = None  # per round: one peer cannot dominate a round's batch
    max_staleness_s: float = 900.0  # peers' groups older than this are dropped
    newcomer_probation_s: float = 60.0  # senders newer than this are last in line for J slots (swarm.pool)
    share: str = "all"  # "all" | "nonzero" (only groups with mixed rewards) | "none"
    # the receiver's choices (node.mix): advantages of peers' completions, which peers' groups, how many
    # None = the model's default (MODEL_DEFAULTS)
    external_baseline: str | None = None  # "sender" (GRPO within the peer's group) | "receiver" (our own family mean)
    external_positive_only: bool | None = None  # train only peers' completions with a positive advantage
    external_select: str = "uniform"  # "uniform" | "lacking" (families where our own groups had no signal)
    external_prefilter: bool = True  # J candidates: pooled groups whose claimed rewards show signal (then rescored)
    adaptive_j: bool | None = None  # move J by whether peers' groups help; generate I + J - (groups taken)
    ablation_self_feedback: int = 0  # experiment: peers' groups replaced by our own from this many rounds ago (0: off)
    # generation
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    gen_micro_batch: int | None = None  # None = the largest that fits, from node.memory_plan at start (tiny: 64)
    # GRPO (names follow TRL)
    learning_rate: float | None = None
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    delta: float | None = None
    beta: float = 0.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1
    micro_batch_size: int | None = None  # None = the largest that fits, from node.memory_plan at start (tiny: 64)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    mask_truncated_completions: bool = False
    # LoRA (node.lora): only low-rank adapters train and carry optimizer state; 0 = every weight trains
    lora_r: int = 0
    lora_alpha: float = 0.0  # 0 = 2 * lora_r
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"  # PEFT's names: "all-linear" or e.g. "q_proj,k_proj,v_proj,o_proj"
    memory_check: bool = True  # refuse to start when node.memory_plan says the run will not fit the device
    offpolicy_mask: bool = True
    offpolicy_threshold: float = 1.0
    reward_mode: str = "binary"
    format_reward: float = 0.0
    # the run
    rounds: int = 0  # 0 = until stopped
    min_round_s: float = 0.0  # start rounds at most this often (0 = back to back): leaves a shared machine's CPU to others
    checkpoint_dir: str = ""  # "" = <data dir>/checkpoints/<swarm>
    checkpoint_every: int = 5
    checkpoint_interval_s: float = 60.0  # ... or sooner, once this much work is unsaved (0 = rounds only)
    keep_checkpoints: int = 3
    resume: bool = False
    metrics: str = ""  # JSONL path, one line per round
    tensorboard: str = ""  # TensorBoard log dir ("" = off); a run per node under it (node.tracking)
    wandb: bool = False  # log to Weights & Biases (node.tracking)
    wandb_project: str = "swarm-node"
    wandb_mode: str = "offline"  # "offline" (written locally, `wandb sync` later) | "online"
    eval_every: int = 0  # rounds between held-out greedy evaluations (0 = never)
    eval_size: int = 100
    log_file: str = ""  # "" = <data dir>/logs/node-<peer>.log
    # the swarm
    swarm: str = "default"
    bootstrap: tuple[str, ...] = ()
    listen: str = "/ip4/0.0.0.0/tcp/0"
    identity: str = ""  # "" = <data dir>/identity.key
    status_port: int = 0  # 0 = no status server
    min_peers: int = 0  # wait for this many peers before the first round (experiments that start together)
    peer_wait_s: float = 60.0  # ... but no longer than this; then train alone
    offline: bool = False  # no mesh at all: plain single-node RL
    mdns: bool = False  # also discover peers on the LAN by multicast DNS
    max_peers: int = 32  # peer exchange dials until this many connections (inbound dials are always accepted)
    # topic sharding (swarm.shards, docs/scale.md): swarm-wide; 1 = every node hears every node, as before
    shards: int = 1
    shard_fanin: int = 2  # shards a node listens to: its home shard + (fanin - 1) rotating others
    shard_rotate_rounds: int = 10
    # liveness (swarm.liveness): ping every peer this often; 3 pings missed by --ping-timeout-s drop it (0: off)
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        if self.learning_rate is None and self.lora_r > 0:  # adapters want a higher rate than full weights
            object.__setattr__(self, "learning_rate", LORA_LEARNING_RATE.get(self.model, LORA_LEARNING_RATE["*"]))
        for name, value in model_defaults(self.model).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: resolved once, here
        checks = [
            (self.local >= 0 and self.external >= 0 and self.local + self.external > 0, "--local + --external must be > 0"),
            (self.questions_per_round >= 1, "--questions-per-round must be >= 1"),
            (isinstance(parse_task_config(self.task_config), dict), "--task-config must be a JSON object"),
            (self.group_size >= 2, "--group-size must be >= 2 (GRPO compares completions within a group)"),
            (self.temperature > 0, "--temperature must be > 0"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
            (all(v is None or v >= 1 for v in (self.micro_batch_size, self.gen_micro_batch)),
             "--micro-batch-size and --gen-micro-batch must be >= 1"),
            (self.learning_rate > 0, "--learning-rate must be > 0"),
            (self.rounds >= 0, "--rounds must be >= 0 (0 runs until stopped)"),
            (0 <= self.min_round_s < 1e9, "--min-round-s must be a number of seconds >= 0 (0 = rounds back to back)"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
            (self.checkpoint_interval_s >= 0, "--checkpoint-interval-s must be >= 0 (0 = by rounds only)"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
            (0 <= self.status_port <= 65535, "--status-port must be a TCP port (0-65535)"),
            (self.share in ("all", "nonzero", "none"), "--share must be all, nonzero or none"),
            (self.external_baseline in ("sender", "receiver"), "--external-baseline must be sender or receiver"),
            (self.external_select in ("uniform", "lacking"), "--external-select must be uniform or lacking"),
            (self.wandb_mode in ("offline", "online"), "--wandb-mode must be offline or online"),
            (self.ablation_self_feedback >= 0, "--ablation-self-feedback must be >= 0 (0 = off)"),
            (self.max_external_per_peer >= 1, "--max-external-per-peer must be >= 1"),
            (self.newcomer_probation_s >= 0, "--newcomer-probation-s must be >= 0"),
            (self.eval_every >= 0 and self.eval_size >= 1, "--eval-every must be >= 0 and --eval-size >= 1"),
            (self.threads >= 0, "--threads must be >= 0"),
            (self.lora_r >= 0 and self.lora_alpha >= 0, "--lora-r and --lora-alpha must be >= 0 (--lora-r 0 = off)"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (self.lora_r == 0 or bool(self.lora_target_modules.strip(", ")),
             "--lora-target-modules needs 'all-linear' or module names such as q_proj,v_proj"),
            (1 <= self.shards <= MAX_SHARDS, f"--shards must be between 1 and {MAX_SHARDS} (the same on every node)"),
            (self.shard_fanin >= 1, "--shard-fanin must be >= 1 (1 = only the home shard)"),
            (self.shard_rotate_rounds >= 1, "--shard-rotate-rounds must be >= 1"),
            (self.ping_interval_s >= 0 and self.ping_timeout_s > 0,
             "--ping-interval-s must be >= 0 (0 = no liveness pings) and --ping-timeout-s > 0"),
            (self.min_peers >= 0 and self.peer_wait_s >= 0, "--min-peers and --peer-wait-s must be >= 0"),
            (self.max_peers >= 1, "--max-peers must be >= 1"),
            (bool(self.swarm) and len(self.swarm) <= 64 and self.swarm.replace("-", "").replace("_", "").replace(".", "").isalnum(),
             "--swarm must be 1-64 characters of letters, digits, '-', '_' or '.'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def train_groups(self) -> int:
        return self.local + self.external

    def replace(self, **changes: Any) -> "NodeConfig":
        return dataclasses.replace(self, **changes)

    def with_seed_for(self, peer_id: str) -> "NodeConfig":
        """This config with its seed resolved: an explicit --seed as given, else the one derived from the peer ID."""
        return self if self.seed is not None else self.replace(seed=seed_for_peer(peer_id))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bootstrap"] = list(self.bootstrap)
        return d


FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def seed_for_peer(peer_id: str) -> int:
    """The default seed of a node (31 bits of a hash of its peer ID). One shared default made every node that set no
    --seed sample the same questions with the same generation RNG, so peers gossiped near-duplicate rollouts; from the
    identity, nodes differ, and a node keeps its seed across restarts since its identity lives in its data directory."""
    return int.from_bytes(hashlib.sha256(b"swarm-node/seed/" + peer_id.encode()).digest()[:4], "big") >> 1


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a TOML (.toml) or YAML (.yaml/.yml) file of node settings; keys use flag names (dashes or underscores)."""
    p = Path(path)
    if p.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {p} must end in .toml, .yaml or .yml")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else (yaml.safe_load(text) or {})
    except Exception as e:  # noqa: BLE001 - any parser failure (YAMLError, a bad !!int/date, RecursionError, ...)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config file {p} is not valid {p.suffix[1:].upper()}: {first}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {p} must hold a table of settings, not a {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_") if isinstance(key, str) else None
        if name not in FIELDS or name == "resume":
            known = ", ".join(sorted(k.replace("_", "-") for k in FIELDS))
            raise ConfigError(f"config file {p}: unknown setting {_show(key)} (known: {known})")
        problem = _value_problem(name, value)
        if problem:
            raise ConfigError(f"config file {p}: setting '{key}' {problem}")
        out[name] = value
    return out


_INT64 = 2**63
_KIND_WORDS = {"int": "whole number", "float": "number", "str": "string"}


def _show(key: Any) -> str:
    """A key for a one-line message: quoted, escaped, shortened."""
    if isinstance(key, str):
        return repr(key) if len(key) <= 60 else repr(key[:60]) + "..."
    try:
        return f"'{str(key)[:60]}'"
    except ValueError:  # an int too long for str()
        return f"<a long {type(key).__name__}>"


def _value_problem(name: str, value: Any) -> str:
    """Why a config-file value cannot be a setting's value ("" if it can); click converts strings and numbers later.
    Catches what click's converters would crash on (lists, dicts, dates, ints beyond 64 bits, inf into an int, ...)."""
    kind = str(FIELDS[name].type).split(" | ")[0]  # "int", "float", "str", "bool", "tuple[str, ...]" (+ " | None")
    if value is None:
        return "" if FIELDS[name].default is None else "must have a value (leave it out for the default)"
    if kind.startswith("tuple"):
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return ""
        return "must be a list of strings"
    if isinstance(value, bool) or isinstance(value, str):
        return "" if kind in ("bool", "str") or isinstance(value, str) else f"must be a number, not {value}"
    if kind == "bool":
        return "must be true or false"
    if isinstance(value, int):
        return "" if -_INT64 <= value < _INT64 else "is out of range"
    if isinstance(value, float):
        if kind == "int" and not value.is_integer():
            return f"must be a whole number, not {value}"
        return "" if kind != "int" or abs(value) < _INT64 else "is out of range"
    return f"must be a {_KIND_WORDS.get(kind, kind)}, not a {type(value).__name__}"
