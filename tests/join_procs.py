"""Helpers to run real `swarm-node join` processes on loopback in tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.simulate import free_ports, read_metrics
from node.status import fetch_status
from protocol.identity import Identity, save_identity

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class JoinProc:
    name: str
    dir: Path
    identity: Identity
    p2p_port: int
    status_port: int
    proc: subprocess.Popen | None = None
    args: list[str] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.p2p_port}/p2p/{self.identity.peer_id}"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def command(self, swarm: str, bootstrap: list[str], extra: list[str]) -> list[str]:
        return [
            sys.executable, "-m", "node.cli", "join", "--model", "tiny", "--swarm", swarm, "--threads", "1",
            "--listen", f"/ip4/127.0.0.1/tcp/{self.p2p_port}", "--status-port", str(self.status_port),
            "--identity", str(self.dir / "identity.key"), "--checkpoint-dir", str(self.dir / "ck"),
            "--metrics", str(self.metrics_path), "--log-file", str(self.dir / "node.log"),
            *[x for b in bootstrap for x in ("--bootstrap", b)], *extra,
        ]

    def start(self, swarm: str, bootstrap: list[str] = (), extra: list[str] = (),
              env: dict[str, str] | None = None) -> "JoinProc":
        self.args = self.command(swarm, list(bootstrap), list(extra))
        out = open(self.dir / "stdout.log", "a")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        return self

    def status(self) -> dict | None:
        try:
            return fetch_status(self.status_port, timeout=1.0)
        except ConnectionError:
            return None

    def metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        p = self.dir / "stdout.log"
        return p.read_text()[-3000:] if p.exists() else ""


@dataclass
class RelayProc(JoinProc):
    """A `swarm-node relay` process (no model): same helpers, its own command line."""

    def command(self, swarm: str, bootstrap: list[str], extra: list[str]) -> list[str]:
        return [
            sys.executable, "-m", "node.cli", "relay", "--swarm", swarm,
            "--listen", f"/ip4/127.0.0.1/tcp/{self.p2p_port}", "--status-port", str(self.status_port),
            "--identity", str(self.dir / "identity.key"), "--log-file", str(self.dir / "relay.log"),
            *[x for b in bootstrap for x in ("--bootstrap", b)], *extra,
        ]


def make_relays(tmp: Path, names: list[str]) -> list[RelayProc]:
    return [RelayProc(n.name, n.dir, n.identity, n.p2p_port, n.status_port) for n in make_nodes(tmp, names)]


def make_nodes(tmp: Path, names: list[str]) -> list[JoinProc]:
    ports = free_ports(2 * len(names))
    nodes = []
    for i, name in enumerate(names):
        d = tmp / name
        d.mkdir(parents=True, exist_ok=True)
        ident = Identity.generate()
        save_identity(ident, d / "identity.key")
        nodes.append(JoinProc(name, d, ident, ports[2 * i], ports[2 * i + 1]))
    return nodes


def wait_for(pred, timeout: float, what: str, nodes: list[JoinProc] = (), interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        for n in nodes:
            if n.proc is not None and n.proc.poll() is not None and n.proc.returncode not in (0,):
                raise AssertionError(f"{n.name} died (rc={n.proc.returncode}) while waiting for {what}:\n{n.output()}")
        time.sleep(interval)
    logs = "\n".join(f"--- {n.name}\n{n.output()}" for n in nodes)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
