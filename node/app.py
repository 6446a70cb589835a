"""`swarm-node join` end to end: load identity and model, resume, run under trio, turn user mistakes into one sentence."""
from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path

import trio

from node.config import ConfigError, NodeConfig, data_dir
from node.live import LiveView

log = logging.getLogger("swarm_node")


def setup_logging(cfg: NodeConfig, peer_hint: str = "node") -> Path:
    path = Path(cfg.log_file) if cfg.log_file else data_dir() / "logs" / f"{peer_hint}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    # bounded: a node runs for weeks; 4 files of 10 MB each at most
    file_handler = logging.handlers.RotatingFileHandler(path, maxBytes=10_000_000, backupCount=3)
    file_handler.setFormatter(fmt)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("swarm_node")
    root.handlers[:] = [file_handler, err]
    root.setLevel(logging.INFO)
    root.propagate = False
    for name in ("node", "swarm", "protocol"):  # modules that log under their own names
        lg = logging.getLogger(name)
        lg.handlers[:] = [file_handler, err]
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return path


def user_error(exc: BaseException) -> str | None:
    """The one-sentence message for a mistake the user can fix, or None for a bug (which keeps its traceback)."""
    from node.checkpoint import CheckpointError
    from node.policy import ModelUnavailable
    from node.status import StatusPortError
    from protocol.identity import IdentityError
    from verifiers.tasks import TaskError

    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            msg = user_error(sub)
            if msg:
                return msg
        return None
    if isinstance(exc, (ConfigError, ModelUnavailable, IdentityError, CheckpointError, StatusPortError, TaskError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
        return f"the listen address is already in use ({exc}); pick another --listen port"
    if isinstance(exc, ValueError) and "device" in str(exc):
        return str(exc)
    return None


def run_join(cfg: NodeConfig) -> int:
    from protocol.identity import load_or_create_identity

    view = LiveView()
    try:
        ident_path = Path(cfg.identity) if cfg.identity else data_dir() / "identity.key"
        identity, created = load_or_create_identity(ident_path)
        log_path = setup_logging(cfg, peer_hint=f"node-{identity.peer_id[-8:]}")
        view.message(f"{'new identity' if created else 'identity'} {identity.peer_id} ({ident_path})")
        if cfg.seed is None:
            cfg = cfg.with_seed_for(identity.peer_id)
            view.message(f"seed {cfg.seed} (from the peer ID; --seed {cfg.seed} reproduces it)")

        from node.learner import set_torch_threads
        from node.policy import load_policy
        from node.run import NodeRuntime

        set_torch_threads(cfg.threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load progress bar is noise in a node's output
        from node.memory_plan import GiB, check_before_load

        # before any weight is read: a run that cannot fit ends here, in one sentence; unset micro-batches are chosen
        resolved = check_before_load(cfg)
        cfg, planned = resolved.cfg, resolved.plan
        for line in resolved.why:
            view.message(line)
            log.info(line)
        if planned is not None and planned.available is not None:
            view.message(f"memory plan: about {planned.peak / GiB:.1f} GiB at peak, {planned.available / GiB:.1f} GiB "
                         f"free on {planned.device_name} (see --dry-run)")
        t0 = time.monotonic()
        policy = load_policy(cfg.model, device=cfg.device, dtype=cfg.dtype)
        view.message(f"model {cfg.model} on {policy.device} ({policy.dtype}), loaded in {time.monotonic() - t0:.1f}s; log: {log_path}")

        def on_round(m: dict) -> None:
            rejected = sum(node.rejections().values()) if node.mesh is not None else 0
            view.update(m, rejected=rejected, target=cfg.rounds)

        node = NodeRuntime(cfg, identity, policy, on_round=on_round)
        if cfg.resume:
            resumed = node.resume()
            # rounds are counted from 1 in what a node prints (as the live view and --rounds do); the checkpoint's
            # directory and the metrics' "round" hold the 0-based index
            view.message(f"resumed after round {resumed + 1}" if resumed is not None
                         else "no checkpoint to resume: starting fresh")
        elif any(node.checkpoint_dir.glob("round-*")):
            raise ConfigError(
                f"{node.checkpoint_dir} already holds checkpoints; pass --resume to continue them, "
                "or choose another --checkpoint-dir"
            )

        def on_listening(n: NodeRuntime) -> None:
            # before any --min-peers wait: a peer that needs our address to join must be able to read it
            for addr in n.mesh.listen_addrs():
                view.message(f"listening {addr}")
            if not cfg.bootstrap:
                view.message("no --bootstrap given: waiting for peers to dial in, training alone meanwhile")
            if cfg.min_peers > 0:
                view.message(f"waiting up to {cfg.peer_wait_s:.0f}s for {cfg.min_peers} peer(s) before the first round")

        def on_ready(n: NodeRuntime) -> None:
            if cfg.status_port:
                view.message(f"dashboard on http://127.0.0.1:{cfg.status_port}/ (JSON: /status)")

        trio.run(lambda: node.run(on_ready=on_ready, on_listening=on_listening))
        saved = f"checkpoint of round {node.last_saved + 1}" if node.last_saved is not None else "no checkpoint"
        view.message(f"stopped after round {node.round}; {saved} in {node.checkpoint_dir}")
        return 0
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - sorted into user mistakes and bugs right here
        msg = user_error(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
