"""The `swarm-node` command: join a swarm, simulate one locally, read a node's status, manage identities.

Every setting of `join` is also an env var SWARM_NODE_<NAME> and a key of a --config file (TOML or YAML); a flag
wins over the env var, which wins over the file. A user's mistake ends in one sentence and a non-zero exit, never a
traceback.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from node.config import FIELDS, MODEL_DEFAULTS, ConfigError, NodeConfig, data_dir, read_config_file

HELP = {
    "model": "tiny (embedded, default), an alias (qwen-0.5b, qwen-1.5b, qwen3-0.6b, ...), a hub id, or a local directory.",
    "device": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.",
    "dtype": "auto (bf16 on capable GPUs, fp32 otherwise), float32, bfloat16 or float16.",
    "tasks": "Task families and weights, e.g. 'arith' or 'basic_arithmetic:2,base_conversion:1' [default: arith; "
             "tiny-sparse, tiny-cold: their four families].",
    "task_config": "Per-family task settings as JSON, e.g. '{\"arith\": {\"digits\": 3}}' (peers' refs must match).",
    "seed": "Seed for task sampling, generation and training [default: derived from the node's peer ID, so nodes "
            "differ; pass one to reproduce a run].",
    "threads": "Torch CPU threads (0 = all cores).",
    "local": "I: own rollout groups trained on per round.",
    "external": "J: peers' rollout groups trained on per round (own groups fill in when peers have too few).",
    "questions_per_round": "Questions sampled (and shared) per round; one group of completions each.",
    "group_size": "Completions per question (the GRPO group).",
    "max_external_per_peer": "At most this many of one peer's groups per round.",
    "max_staleness_s": "Peers' groups older than this many seconds are dropped.",
    "newcomer_probation_s": "Peers first heard from less than this many seconds ago get at most a quarter of the external slots, after older peers.",
    "share": "What to publish: all groups, only those with mixed rewards (nonzero), or none.",
    "external_baseline": "Advantages of peers' completions: within the peer's group (sender) or against this node's "
                         "own mean reward on the task family (receiver).",
    "external_positive_only": "Train only on peers' completions with a positive advantage.",
    "external_prefilter": "Draw peers' groups whose claimed rewards show signal as candidates (each is rescored); "
                          "off: draw from the whole pool.",
    "external_select": "Which useful peers' groups fill J: uniform, or lacking (families where this node's own "
                       "groups had no signal).",
    "ablation_self_feedback": "Experiment: train on this node's own groups from this many rounds ago in place of "
                              "peers' (0 = off).",
    "adaptive_j": "Move J by an online estimate of whether peers' groups help more than own questions; generate "
                  "I + J minus the peers' groups taken (alone: I + J).",
    "temperature": "Sampling temperature (also used for training log-probs).",
    "top_p": "Nucleus sampling.",
    "max_new_tokens": "Completion length budget.",
    "gen_micro_batch": "Most sequences generated at once (bounds memory) [default: the largest that fits the device's "
                       "free memory, from the memory plan (see --dry-run); tiny: 64].",
    "learning_rate": "AdamW learning rate.",
    "epsilon": "Lower clip range.",
    "epsilon_high": "Upper clip range.",
    "delta": "Two-sided ratio cap (off unless set).",
    "beta": "KL coefficient against a frozen reference (0 = no reference model).",
    "loss_type": "grpo, dapo, dr_grpo or bnpo (as in TRL).",
    "scale_rewards": "Advantage scaling: group, batch or none.",
    "num_iterations": "Optimizer steps per round on the same rollouts.",
    "micro_batch_size": "Sequences per forward/backward (gradient accumulation) [default: the largest that fits the "
                        "device's free memory, from the memory plan (see --dry-run); tiny: 64].",
    "max_grad_norm": "Gradient clipping norm.",
    "weight_decay": "AdamW weight decay.",
    "mask_truncated_completions": "Exclude truncated completions from the loss.",
    "lora_r": "LoRA rank: train only low-rank adapters (far less memory: no gradients or AdamW state for the base "
              "weights); 0 = train every weight.",
    "lora_alpha": "LoRA alpha (scale alpha / r; 0 = 2 x --lora-r).",
    "lora_dropout": "Dropout on the LoRA adapters' input.",
    "lora_target_modules": "Layers that get adapters, in PEFT's names: all-linear (every linear layer but the "
                           "output head) or e.g. q_proj,k_proj,v_proj,o_proj.",
    "memory_check": "Before loading the model, estimate peak memory (see --dry-run) and refuse to start when it "
                    "will not fit the device.",
    "offpolicy_mask": "Mask peers' negative-advantage completions that are far off the local policy.",
    "offpolicy_threshold": "Nats above the policy's entropy beyond which the off-policy mask applies.",
    "reward_mode": "binary (default) or partial verifier credit.",
    "format_reward": "Bonus for a well-formed <answer> block.",
    "rounds": "Stop after this round count (0 = run until stopped; counts resumed rounds).",
    "min_round_s": "Start a round at most every this many seconds, idling in between (0 = back to back): a node on a "
                   "shared machine, or many nodes on one, leave CPU for the mesh and for each other.",
    "checkpoint_dir": "Checkpoint directory (default: <data dir>/checkpoints/<swarm>).",
    "checkpoint_every": "Rounds between checkpoints (also one at every clean stop).",
    "checkpoint_interval_s": "Also checkpoint once this many seconds of work are unsaved (0 = by rounds only); written in the background.",
    "keep_checkpoints": "Checkpoints kept.",
    "resume": "Continue from the newest complete checkpoint.",
    "metrics": "Append one JSON line per round to this file.",
    "tensorboard": "Write TensorBoard event files (every round's metrics, per-peer counts) under this directory, one "
                   "run per node (needs swarm-node[tensorboard]).",
    "wandb": "Log every round to Weights & Biases (needs swarm-node[wandb]); offline unless --wandb-mode online.",
    "wandb_project": "W&B project name.",
    "wandb_mode": "offline (written under the data dir or WANDB_DIR; upload later with `wandb sync`) or online.",
    "eval_every": "Rounds between held-out greedy evaluations (0 = never).",
    "eval_size": "Held-out questions per evaluation.",
    "log_file": "Log file (default: <data dir>/logs/node.log).",
    "swarm": "Swarm name: only nodes with the same name exchange rollouts.",
    "bootstrap": "Multiaddr of a node to join through (repeatable).",
    "listen": "Multiaddr to listen on (default: all interfaces, a free TCP port).",
    "identity": "Identity key file (default: <data dir>/identity.key; created if missing).",
    "status_port": "Serve a live dashboard at http://127.0.0.1:PORT/ and JSON at /status (0 = off).",
    "offline": "Do not join any mesh: plain single-node RL.",
    "mdns": "Also find peers on the local network by mDNS (multicast; off by default).",
    "max_peers": "Peer exchange dials new peers until this many connections (peers dialing in are always accepted).",
    "min_peers": "Wait for this many peers before the first round (0 = start at once).",
    "peer_wait_s": "Longest wait for --min-peers before training alone.",
    "shards": "Gossip topic shards, swarm-wide (1 = every node hears every node). A node publishes to its home shard "
              "(a hash of its peer ID) and listens to --shard-fanin shards; see docs/scale.md.",
    "shard_fanin": "Shards a node listens to: its home shard + rotating others (at most --shards).",
    "shard_rotate_rounds": "Rounds between rotations of the non-home shards a node listens to.",
    "ping_interval_s": "Seconds between liveness pings to each peer; a peer that misses 3 is dropped (0 = off).",
    "ping_timeout_s": "Seconds a peer has to answer a liveness ping.",
}
FLAGS = {"resume", "offline", "mdns", "wandb"}  # presence flags
OPTIONAL_TYPES = {"seed": int, "tasks": str, "task_config": str, "local": int, "external": int, "questions_per_round": int, "max_external_per_peer": int,
             "max_new_tokens": int, "learning_rate": float, "delta": float, "micro_batch_size": int,
             "gen_micro_batch": int,
             "external_baseline": str}
TOGGLES = {"mask_truncated_completions", "offpolicy_mask", "external_positive_only", "adaptive_j", "external_prefilter",
           "memory_check"}  # --x/--no-x


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        try:
            ctx.default_map = {**(ctx.default_map or {}), **read_config_file(value)}
        except ConfigError as e:
            raise click.BadParameter(str(e)) from None
    return value


# the settings of `swarm-node relay` (no model, no training): the swarm's, identity, status, log
RELAY_SETTINGS = ("swarm", "bootstrap", "listen", "identity", "status_port", "mdns", "max_peers", "shards",
                  "shard_fanin", "shard_rotate_rounds", "ping_interval_s", "ping_timeout_s", "max_staleness_s",
                  "log_file")


def node_options(f, names: tuple[str, ...] | None = None):
    """Adds one option per NodeConfig field (or per one of `names`), each with its SWARM_NODE_<NAME> env var."""
    for name in reversed([n for n in FIELDS if names is None or n in names]):
        field = FIELDS[name]
        flag = "--" + name.replace("_", "-")
        env = "SWARM_NODE_" + name.upper()
        if name in FLAGS:
            opt = click.option(flag, is_flag=True, default=False, envvar=env, help=HELP[name])
        elif name in TOGGLES:
            per_model = " [default: per model; see --print-config]" if field.default is None else ""
            opt = click.option(f"{flag}/--no-{flag[2:]}", default=field.default, envvar=env,
                               show_default=field.default is not None, help=HELP[name] + per_model)
        elif name == "bootstrap":
            opt = click.option(flag, multiple=True, envvar=env, help=HELP[name] + f" Env: {env} (space-separated).")
        elif field.default is None:
            per_model = " [default: per model; see --print-config]" if name in MODEL_DEFAULTS["*"] else ""
            opt = click.option(flag, type=OPTIONAL_TYPES[name], default=None, envvar=env, help=HELP[name] + per_model)
        else:
            kind = {int: int, float: float, str: str}.get(type(field.default), float)
            opt = click.option(flag, type=kind, default=field.default, envvar=env, show_default=True, help=HELP[name])
        f = opt(f)
    return click.option(
        "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=_load_config_file,
        envvar="SWARM_NODE_CONFIG", help="TOML or YAML file of settings (flags and env vars win).",
    )(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="swarm-node")
def main() -> None:
    """swarm-node: decentralized RL post-training. Each node trains its own policy with GRPO and shares its rollouts
    with the swarm over a signed libp2p mesh; it rescores everything it learns from with its own verifier."""


@main.command()
@node_options
@click.option("--print-config", is_flag=True, help="Print the resolved settings as JSON and exit.")
@click.option("--dry-run", is_flag=True, help="Print the memory plan (peak memory against what the device has free; "
              "no model weights are loaded) and exit: 0 if it fits, 1 if not.")
def join(print_config: bool, dry_run: bool, **kwargs: Any) -> None:
    """Run a node: train, share rollouts, learn from peers'. Runs alone when no peer answers."""
    cfg = _build_config(kwargs)
    if dry_run:
        from node.memory_plan import run_dry_run

        sys.exit(run_dry_run(cfg))
    if print_config:
        import json

        click.echo(json.dumps(_with_identity_seed(cfg).to_json(), indent=2))
        return
    from node.app import run_join

    sys.exit(run_join(cfg))


@main.command()
@(lambda f: node_options(f, RELAY_SETTINGS))
def relay(**kwargs: Any) -> None:
    """Run a relay: no model, no torch. It joins the swarm, validates and forwards its messages and helps peers find
    each other (a bootstrap address for the swarm), with the same identity, limits, bans and --status-port as a node."""
    cfg = _build_config(kwargs)
    from node.relay import run_relay  # protocol + swarm only: never imports torch

    sys.exit(run_relay(cfg))


@main.command()
@click.option("--nodes", type=click.IntRange(1, 64), default=4, show_default=True, help="Node processes to start.")
@click.option("--rounds", type=click.IntRange(1), default=100, show_default=True, help="Rounds each node runs.")
@click.option("--model", default="tiny", show_default=True,
              help="Model for every node, or a comma-separated list given to the nodes in turn (a mixed swarm), "
                   "e.g. tiny,runs/models/small.")
@click.option("--local", "local_", type=click.IntRange(0), default=None, help="I: own groups per round [default: per model].")
@click.option("--external", type=click.IntRange(0), default=None, help="J: peers' groups per round [default: per model].")
@click.option("--out", type=click.Path(file_okay=False), default="runs/simulate", show_default=True, help="Output directory.")
@click.option("--swarm", default="", help="Swarm name (default: a fresh one per run).")
@click.option("--seed", type=int, default=0, show_default=True, help="Base seed; node i uses seed + i.")
@click.option("--base-port", type=click.IntRange(0, 65000), default=0, help="First TCP port (0 = pick free ports).")
@click.option("--eval-every", type=click.IntRange(0), default=0, help="Held-out evaluation interval per node.")
@click.option("--extra", multiple=True, help="Extra flag passed to every node, e.g. --extra=--learning-rate=1e-4.")
@click.option("--compare-isolated", is_flag=True,
              help="Run the same nodes isolated first, then together; write compare.json and compare.png.")
def simulate(**kwargs: Any) -> None:
    """Start a local swarm of real node processes on loopback, show them live, write summary.json and rewards.png."""
    from node.simulate import run_simulation

    sys.exit(run_simulation(**kwargs))


@main.command()
@click.argument("ports", nargs=-1, type=click.IntRange(1, 65535))
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status(ports: tuple[int, ...], as_json: bool) -> None:
    """Show the status of running nodes (their --status-port; default 8480)."""
    import json

    from node.status import fetch_status, format_status

    failed = 0
    for port in ports or (8480,):
        try:
            s = fetch_status(port)
        except ConnectionError as e:
            click.echo(f"error: {e}", err=True)
            failed += 1
            continue
        click.echo(json.dumps(s, indent=2) if as_json else format_status(s))
        if not as_json:
            click.echo(f"page     http://127.0.0.1:{port}/  (the live dashboard)")
        click.echo()
    sys.exit(1 if failed else 0)


@main.command()
@click.option("--identity", "path", type=click.Path(dir_okay=False), default=None, help="Identity file.")
@click.option("--create", is_flag=True, help="Create the file if it does not exist.")
def identity(path: str | None, create: bool) -> None:
    """Show (or --create) a node identity: its peer ID and public key."""
    from protocol.identity import IdentityError, load_identity, load_or_create_identity

    p = Path(path) if path else data_dir() / "identity.key"
    try:
        ident, created = load_or_create_identity(p) if create else (load_identity(p), False)
    except IdentityError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{'created' if created else 'identity'} {p}")
    click.echo(f"peer id     {ident.peer_id}")
    click.echo(f"public key  {ident.public_key.hex()}")


def _with_identity_seed(cfg: NodeConfig) -> NodeConfig:
    """--print-config shows the seed the node would run with: derived from its identity file when that exists (a
    node without one gets a new identity, and so its seed, at its first start: the seed stays null here)."""
    from protocol.identity import IdentityError, load_identity

    path = Path(cfg.identity) if cfg.identity else data_dir() / "identity.key"
    if cfg.seed is not None or not path.exists():
        return cfg
    try:
        return cfg.with_seed_for(load_identity(path).peer_id)
    except IdentityError as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Model directory to write (created; must be empty).")
@click.option("--base", default=None, help="Load the base model from here instead of the name the checkpoint records.")
@click.option("--dtype", default="auto", show_default=True, help="auto (as trained), float32, bfloat16 or float16.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@click.option("--push-to-hub", "repo", default=None, metavar="REPO", help="Then upload it to this Hub repo (owner/name).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
def export(**kwargs: Any) -> None:
    """Write a checkpoint (or a checkpoint directory's newest) as a Hugging Face model directory with a model card."""
    from node.export import run_export

    sys.exit(run_export(**kwargs))


@main.command("eval")
@click.option("--model", "models", multiple=True, required=True,
              help="A model name, model directory, node checkpoint or checkpoint directory (repeat to compare).")
@click.option("--tasks", default=None, help="Task families [default: the first checkpoint's, else the model's].")
@click.option("--task-config", default=None, help=HELP["task_config"])
@click.option("--n", type=click.IntRange(1), default=500, show_default=True,
              help="Held-out questions in all, split evenly over the families (as the node's --eval-size).")
@click.option("--samples", type=click.IntRange(0), default=8, show_default=True,
              help="Sampled completions per question for sampled accuracy and pass@k (0 = greedy only).")
@click.option("--k", "ks", default=None, help="pass@k values, e.g. 1,4,8 [default: 1 and --samples].")
@click.option("--max-new-tokens", type=click.IntRange(1), default=None, help="[default: as the node trained]")
@click.option("--temperature", type=float, default=None, help="Sampling temperature [default: as the node trained].")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling [default: as the node trained].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampled completions.")
@click.option("--device", default="auto", show_default=True, help=HELP["device"])
@click.option("--dtype", default="auto", show_default=True, help="auto (a checkpoint's own; else as join), float32, ...")
@click.option("--base", default=None, help="Base model for checkpoints whose recorded model is elsewhere.")
@click.option("--threads", type=click.IntRange(0), default=0, help=HELP["threads"])
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON here.")
def eval_(**kwargs: Any) -> None:
    """Held-out accuracy (greedy, sampled, pass@k) per task family, on the node's held-out split; models side by side."""
    from node.evaluate import run_eval

    sys.exit(run_eval(**kwargs))


def _build_config(kwargs: dict[str, Any]) -> NodeConfig:
    kwargs["bootstrap"] = tuple(a for item in kwargs.get("bootstrap") or () for a in str(item).split())
    try:
        return NodeConfig(**kwargs)
    except (ConfigError, TypeError) as e:
        raise click.UsageError(str(e)) from None


if __name__ == "__main__":
    main()
