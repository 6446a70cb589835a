"""A network partition between two halves of a real 4-process swarm, and its healing, without restarting anything.

Topology (built here with unique names per run, always torn down, even on failure):

    netns A: a1, a2 listen on 10.213.0.1 (veth vnA)      netns B: b1, b2 listen on 10.213.0.2 (veth vnB)
              vnA <-> vrA --[ bridge (root netns) ]-- vrB <-> vnB

The cut is `ip link set vrB down` in the root namespace: B's veth loses carrier and nothing crosses the bridge, but
each namespace keeps its address and routes, so the two nodes on one side still reach each other. Nothing is closed
or reset by the cut: connections across it just stop moving, as in a real outage. The restore is `ip link set vrB up`.
Status servers listen on 127.0.0.1 inside each namespace, so status is read with `ip netns exec NS python -c ...`.

Bootstrap: a2 -> a1, b1 -> a1, b2 -> b1. So b1 keeps retrying its bootstrap link to a1, and every other cross link
(a1-b2, a2-b1, a2-b2) exists only through peer exchange (signed Hellos).

Two outages, one after the other, on the same four processes:
- "short": restored as soon as both sides have trained through the cut (seconds on an idle machine), before the
  nodes' liveness check (swarm/liveness.py; here a ping every 3 s, the connection closed after 3 pings missed by 5 s,
  i.e. ~25 s of silence; the defaults are 10 s / 15 s) gives up on the connections across it: they hang and resume.
  Checked: connections that hang do not stall either side, and rollouts flow across again.
- "long": default TCP settings too (TCP alone would keep a silent connection for ~15 min), but the cut lasts until
  every node has dropped the other side's peers, which only the liveness check does; after the restore the mesh
  must be dialled again (b1's bootstrap retry, and discovery's redial of known peers for the other cross links).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from tests.join_procs import JoinProc, make_nodes, wait_for

pytestmark = pytest.mark.slow

SWARM = "part-" + secrets.token_hex(3)
SUBNET = "10.213.0"  # configured only inside the two fresh namespaces: cannot clash with the host's routes
P2P_PORTS = (4101, 4102)  # fresh namespaces: nothing else listens there
STATUS_PORTS = (8571, 8572)

# Reads the given status ports in one interpreter inside a namespace; prints one JSON list (null for a silent node).
_STATUS_SCRIPT = r"""
import json, sys, urllib.request
out = []
for port in sys.argv[1:]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            out.append(json.loads(r.read()))
    except Exception:
        out.append(None)
print(json.dumps(out))
"""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


@dataclass
class Topology:
    ns_a: str
    ns_b: str
    bridge: str
    vr_a: str  # root-namespace veth ends (bridge ports)
    vr_b: str

    def cut(self) -> None:
        _run("ip", "link", "set", self.vr_b, "down")

    def restore(self) -> None:
        _run("ip", "link", "set", self.vr_b, "up")


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces and veth pairs"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


@pytest.fixture
def topology():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    topo = Topology(f"swpart-{tag}-a", f"swpart-{tag}-b", f"swbr{tag}", f"swva{tag}", f"swvb{tag}")
    created_ns: list[str] = []
    created_links: list[str] = []
    try:
        for ns in (topo.ns_a, topo.ns_b):
            res = _run("ip", "netns", "add", ns, check=False)
            if res.returncode != 0:
                pytest.skip(f"`ip netns add` is not permitted here: {res.stderr.strip()}")
            created_ns.append(ns)
            # processes must run in it, and the "long" outage needs its own (per-namespace) TCP sysctl
            res = _run("ip", "netns", "exec", ns, "sh", "-c", "echo 15 > /proc/sys/net/ipv4/tcp_retries2", check=False)
            if res.returncode != 0:
                pytest.skip(f"cannot run in a network namespace or set its TCP sysctls: {res.stderr.strip()}")
        res = _run("ip", "link", "add", topo.bridge, "type", "bridge", check=False)
        if res.returncode != 0:
            pytest.skip(f"cannot create a bridge here: {res.stderr.strip()}")
        created_links.append(topo.bridge)
        _run("ip", "link", "set", topo.bridge, "up")
        for ns, vr, ip in ((topo.ns_a, topo.vr_a, f"{SUBNET}.1"), (topo.ns_b, topo.vr_b, f"{SUBNET}.2")):
            vn = "swn" + vr[3:]  # the namespace end (swna…/swnb…)
            res = _run("ip", "link", "add", vr, "type", "veth", "peer", "name", vn, check=False)
            if res.returncode != 0:
                pytest.skip(f"cannot create veth pairs here: {res.stderr.strip()}")
            created_links.append(vr)
            _run("ip", "link", "set", vn, "netns", ns)
            _run("ip", "link", "set", vr, "master", topo.bridge)
            _run("ip", "link", "set", vr, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", vn)
            _run("ip", "-n", ns, "link", "set", vn, "up")
        yield topo
    finally:
        # The nodes fixture (which depends on this one) has stopped every process by now: a namespace outlives
        # `netns del` while a process runs in it. Deleting a namespace destroys its veth ends, and so the pairs.
        for ns in created_ns:
            _run("ip", "netns", "del", ns, check=False)
        for link in reversed(created_links):
            if _run("ip", "link", "show", link, check=False).returncode == 0:
                _run("ip", "link", "del", link, check=False)


class NsNode(JoinProc):
    """A JoinProc started inside a network namespace, listening on that namespace's veth address."""

    ns: str = ""
    ip: str = ""

    @property
    def addr(self) -> str:
        return f"/ip4/{self.ip}/tcp/{self.p2p_port}/p2p/{self.identity.peer_id}"

    def command(self, swarm: str, bootstrap: list[str], extra: list[str]) -> list[str]:
        cmd = super().command(swarm, bootstrap, extra)
        cmd[cmd.index("--listen") + 1] = f"/ip4/{self.ip}/tcp/{self.p2p_port}"
        return ["ip", "netns", "exec", self.ns, *cmd]  # ip execs the command: proc.pid is the node itself

    def status(self) -> dict | None:
        return statuses([self])[self.name]


def statuses(nodes: list[NsNode]) -> dict[str, dict | None]:
    """name -> status document (None when it did not answer), with one `ip netns exec` per namespace."""
    out: dict[str, dict | None] = {}
    by_ns: dict[str, list[NsNode]] = {}
    for n in nodes:
        by_ns.setdefault(n.ns, []).append(n)
    for ns, group in by_ns.items():
        try:
            res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _STATUS_SCRIPT,
                                  *[str(n.status_port) for n in group]], capture_output=True, text=True, timeout=20)
            docs = json.loads(res.stdout) if res.returncode == 0 else [None] * len(group)
        except (subprocess.TimeoutExpired, ValueError):
            docs = [None] * len(group)
        out.update({n.name: d for n, d in zip(group, docs)})
    return out


@pytest.fixture
def nodes(topology, tmp_path):
    base = make_nodes(tmp_path, ["a1", "a2", "b1", "b2"])
    placed = []
    for b, ns, ip, port, sport in zip(base, [topology.ns_a, topology.ns_a, topology.ns_b, topology.ns_b],
                                      [f"{SUBNET}.1", f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.2"],
                                      P2P_PORTS * 2, STATUS_PORTS * 2):
        n = NsNode(b.name, b.dir, b.identity, port, sport)
        n.ns, n.ip = ns, ip
        placed.append(n)
    try:
        yield {n.name: n for n in placed}
    finally:
        for n in placed:  # SIGTERM all first (each checkpoints and exits), then wait
            if n.alive():
                n.proc.terminate()
        for n in placed:
            n.stop(timeout=30)


def test_partition_heals_without_restarts(topology, nodes):
    a1, a2, b1, b2 = nodes["a1"], nodes["a2"], nodes["b1"], nodes["b2"]
    everyone = [a1, a2, b1, b2]
    pid = {n.name: n.identity.peer_id for n in everyone}
    name_of = {v: k for k, v in pid.items()}
    side = {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}
    others = {n.name: [m.name for m in everyone if m is not n] for n in everyone}
    same = {n: [o for o in others[n] if side[o] == side[n]] for n in others}
    across = {n: [o for o in others[n] if side[o] != side[n]] for n in others}
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    def snap() -> dict[str, dict] | None:
        s = statuses(everyone)
        return s if all(s.values()) else None  # type: ignore[return-value]

    def got(s: dict, who: str, frm: str) -> int:
        return s[who]["received_from"].get(pid[frm], 0)

    def peers_of(s: dict, who: str) -> set[str]:
        return {name_of.get(p, p) for p in s[who]["peers"]}

    def until(cond):
        """A wait_for predicate: the status snapshot once cond(snapshot) holds."""
        def pred():
            s = snap()
            return s if s is not None and cond(s) else None
        return pred

    # ---- one mesh of four: everybody peers with everybody and has rollouts from everybody ------------------------
    # liveness faster than the 10 s / 15 s defaults, so the long outage is detected in ~30 s instead of ~80 s
    live = ["--ping-interval-s", "3", "--ping-timeout-s", "5"]
    a1.start(SWARM, extra=live)
    wait_for(lambda: statuses([a1])["a1"], 90, "a1's status server", everyone)
    a2.start(SWARM, [a1.addr], extra=live)
    b1.start(SWARM, [a1.addr], extra=live)
    b2.start(SWARM, [b1.addr], extra=live)
    wait_for(until(lambda s: all(peers_of(s, n) == set(others[n]) and all(got(s, n, o) > 0 for o in others[n])
                                 for n in others)),
             120, "all four nodes to peer with each other and exchange rollouts", everyone)
    timings["formed"] = time.monotonic() - t0
    for n in everyone:  # the groups are in every pool; the next round that collects trains on them (bounded wait)
        wait_for(lambda: any(m["n_external"] > 0 for m in n.metrics()), 60, f"{n.name} to train on external groups",
                 everyone)
    pids_before = {n.name: n.proc.pid for n in everyone}

    def partition(outage: str) -> None:
        # the cut: each side keeps training and exchanging within the side; nothing crosses
        topology.cut()
        t_cut = time.monotonic()
        if outage == "long":
            wait_for(until(lambda s: all(peers_of(s, n) == set(same[n]) for n in others)), 120,
                     f"every node to drop the other side's peers ({outage} outage)", everyone)
            timings[f"{outage}:cut_detected"] = time.monotonic() - t_cut
        else:
            time.sleep(2)  # whatever the kernel had already received before the cut is delivered by now
        mid = wait_for(snap, 20, "status after the cut", everyone)
        during = wait_for(until(lambda s: all(
            s[n]["round"] >= mid[n]["round"] + 3 and all(got(s, n, o) > got(mid, n, o) for o in same[n])
            for n in others)), 60, f"both sides to keep training and exchanging within the side ({outage} outage)",
            everyone)
        for n in others:
            for o in across[n]:
                assert got(during, n, o) == got(mid, n, o), f"{n} received from {o} across the cut"
        timings[f"{outage}:cut_lasted"] = time.monotonic() - t_cut

        # the restore: the mesh re-forms across the cut and rollouts flow again
        base = wait_for(snap, 20, "status before the restore", everyone)
        topology.restore()
        t_restore = time.monotonic()
        wait_for(until(lambda s: all(peers_of(s, n) == set(others[n]) and all(got(s, n, o) > got(base, n, o)
                                                                              for o in across[n]) for n in others)),
                 75, f"the mesh to re-form across the cut and rollouts to flow again ({outage} outage)", everyone)
        timings[f"{outage}:healed"] = time.monotonic() - t_restore

    partition("short")  # the connections across the cut hang, then resume
    partition("long")  # liveness drops the silent connections; they must be dialled again
    assert all(n.alive() for n in everyone) and {n.name: n.proc.pid for n in everyone} == pids_before
    timings["total"] = time.monotonic() - t0
    print("partition timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
