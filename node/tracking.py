"""A node's round metrics where people look: TensorBoard event files (--tensorboard DIR) and Weights & Biases (--wandb).

Both are optional extras (`pip install 'swarm-node[tensorboard]'` / `'swarm-node[wandb]'`); a node asked for one that
is not installed stops before its first round with one sentence saying what to install. W&B runs offline unless the
user opts in (--wandb-mode online): the run is written under the data directory and `wandb sync` uploads it later.
Every round logs the round's metrics (reward, held-out accuracy, timings, loss, ...) at step = round, plus cumulative
counts per peer (groups received, trained on) and rejections by reason.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.config import ConfigError, NodeConfig, data_dir

if TYPE_CHECKING:
    from node.run import NodeRuntime

_SKIP = {"round", "time"}


def tag(key: str) -> str:
    """A round metric's name in the dashboards: grouped the way people read them."""
    if key.startswith("heldout"):
        return f"eval/{key}"
    if "reward" in key:
        return f"reward/{key}"
    if key.endswith("_s"):
        return f"time/{key}"
    return f"train/{key}"


def scalars(m: dict[str, Any], node: "NodeRuntime | None" = None) -> dict[str, float]:
    """The numbers one round logs: its finite numeric metrics, then per-peer counts and rejections (cumulative)."""
    out: dict[str, float] = {}
    for k, v in m.items():
        if k in _SKIP or isinstance(v, str) or v is None:
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            out[tag(k)] = x
    if node is not None:
        for peer, n in node.received_from.items():
            out[f"peers/received/{_short(peer)}"] = float(n)
        for peer, n in node.trained_from.items():
            out[f"peers/trained_on/{_short(peer)}"] = float(n)
        for reason, n in node.rejections().items():
            out[f"rejections/{reason}"] = float(n)
    return out


def _short(peer: str) -> str:
    return peer[-8:]  # as in the node's log file name; a full peer ID makes every chart title unreadable


def run_name(cfg: NodeConfig, peer_id: str) -> str:
    return f"{cfg.swarm}-{_short(peer_id)}"


class Trackers:
    """The sinks a node was asked for; log() after each round, close() at the end."""

    def __init__(self, cfg: NodeConfig, peer_id: str) -> None:
        self.tb: Any = None
        self.wandb_run: Any = None
        self.tb_dir: Path | None = None
        name = run_name(cfg, peer_id)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install 'swarm-node[tensorboard]'"
                                  ) from None
            self.tb_dir = Path(cfg.tensorboard).expanduser() / name  # one run per node: `tensorboard --logdir DIR`
            try:
                self.tb = SummaryWriter(log_dir=str(self.tb_dir))
            except OSError as e:
                raise ConfigError(f"--tensorboard {cfg.tensorboard}: cannot write there ({e.strerror or e})") from None
            self.tb.add_text("config", "```\n" + json.dumps(cfg.to_json(), indent=1) + "\n```", 0)
            self.tb.flush()
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                self.close()
                raise ConfigError("--wandb needs the wandb package: pip install 'swarm-node[wandb]'") from None
            root = Path(os.environ.get("WANDB_DIR") or data_dir()).expanduser()
            try:
                root.mkdir(parents=True, exist_ok=True)
                self.wandb_run = wandb.init(
                    project=cfg.wandb_project, name=name, mode=cfg.wandb_mode, dir=str(root),
                    config=cfg.to_json(), reinit="create_new",
                    settings=wandb.Settings(silent=True, console="off"),  # the node's own output stays its own
                )
            except Exception as e:  # noqa: BLE001 - wandb raises many types (auth, network, usage)
                self.close()
                first = (str(e).splitlines() or [type(e).__name__])[0][:200]
                raise ConfigError(f"W&B could not start a {cfg.wandb_mode} run: {first}") from None

    @property
    def active(self) -> bool:
        return self.tb is not None or self.wandb_run is not None

    @property
    def wandb_dir(self) -> Path | None:
        return Path(self.wandb_run.dir).parent if self.wandb_run is not None else None

    def log(self, m: dict[str, Any], node: "NodeRuntime | None" = None) -> None:
        if not self.active:
            return
        step = int(m["round"])
        values = scalars(m, node)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()  # a killed node keeps every finished round's points
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
