"""Three real OS processes (python -m tests.dummy_peer) exchange batches; SIGKILL of one leaves the other two exchanging."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def spawn(tmp: Path, name: str, *bootstrap: str) -> tuple[subprocess.Popen[str], Path]:
    out = tmp / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "tests.dummy_peer", "--swarm", "proc", "--listen", "/ip4/127.0.0.1/tcp/0",
           "--publish-every", "0.5", "--heartbeat", "0.5", "--hello-interval", "1", "--backoff-max", "2",
           "--stats-every", "1", "--out", str(out)]
    if bootstrap:
        cmd += ["--bootstrap", *bootstrap]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(tmp / f"{name}.err", "w"),
                         text=True)
    return p, out


def listen_addr(p: subprocess.Popen[str], timeout: float = 40.0) -> str:
    t0 = time.time()
    assert p.stdout is not None
    line = p.stdout.readline()  # blocks until the mesh is up (or the process dies: empty line)
    assert line.startswith("LISTEN "), f"no LISTEN line (rc={p.poll()}) after {time.time() - t0:.1f}s: {line!r}"
    return line.split()[1]


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def peer_id(path: Path) -> str:
    return next(e["peer_id"] for e in events(path) if e["event"] == "started")


def received_from(path: Path, sender: str, after: float = 0.0) -> int:
    return sum(1 for e in events(path) if e["event"] == "received" and e["from"] == sender and e["t"] > after)


def wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_three_processes_survive_sigkill(tmp_path: Path) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        p1, o1 = spawn(tmp_path, "p1")
        procs.append(p1)
        a1 = listen_addr(p1)
        p2, o2 = spawn(tmp_path, "p2", a1)
        p3, o3 = spawn(tmp_path, "p3", a1)
        procs += [p2, p3]
        listen_addr(p2), listen_addr(p3)
        ids = {o: peer_id(o) for o in (o1, o2, o3)}

        def all_exchanging(after: float = 0.0) -> bool:
            return all(received_from(o, ids[s], after) >= 2 for o in (o1, o2, o3) for s in (o1, o2, o3) if s != o)

        wait_for(all_exchanging, 40, "all three to receive from each other")
        # p2 and p3 bootstrapped to p1 only; peer exchange must have connected them directly
        wait_for(lambda: any(e["event"] == "stats" and ids[o3] in e["peers"] for e in events(o2)), 20,
                 "p2 to be connected to p3 directly")

        p1.send_signal(signal.SIGKILL)
        p1.wait(timeout=10)
        killed_at = time.time()
        wait_for(lambda: received_from(o2, ids[o3], killed_at + 1) >= 4 and received_from(o3, ids[o2], killed_at + 1) >= 4,
                 30, "p2 and p3 to keep exchanging after p1 was killed")

        lat = sorted(e["latency_ms"] for o in (o2, o3) for e in events(o) if e["event"] == "received" and e["t"] > killed_at)
        print(f"\nafter SIGKILL: {len(lat)} deliveries p2<->p3, latency p50 {lat[len(lat) // 2]:.1f} ms, "
              f"p90 {lat[int(len(lat) * 0.9)]:.1f} ms, max {lat[-1]:.1f} ms")

        for p in (p2, p3):  # clean shutdown on SIGTERM
            p.send_signal(signal.SIGTERM)
        for p in (p2, p3):
            assert p.wait(timeout=20) == 0
        assert any(e["event"] == "stopped" for e in events(o2))
        published = sum(1 for e in events(o2) if e["event"] == "published")
        got_by_p3 = received_from(o3, ids[o2])
        assert got_by_p3 >= published - 3  # everything but the last in-flight batches arrived
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
