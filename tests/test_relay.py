"""`swarm-node relay` as a real process: no torch, status, identity, bans, clean stop; and two training nodes that reach
each other only through a relay still learn from each other's groups."""
from __future__ import annotations

import secrets
import signal
import subprocess
import sys

import pytest
import trio

from protocol.envelope import seal
from swarm.mesh import topic_for
from tests.doubles import RawPublisher, forge_signature, make_batch
from tests.join_procs import RelayProc, make_nodes, make_relays, wait_for

pytestmark = pytest.mark.slow


def relay_in(tmp, name: str = "relay") -> RelayProc:
    return make_relays(tmp, [name])[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_relay_runs_without_torch_bans_a_forger_and_stops_cleanly(tmp_path, sig):
    swarm = "r-" + secrets.token_hex(3)
    r = relay_in(tmp_path).start(swarm)
    try:
        s = wait_for(r.status, 60, "the relay's status server", [r])
        assert s["role"] == "relay" and s["peer_id"] == r.identity.peer_id  # the identity file's key
        assert s["process"]["torch_loaded"] is False  # the whole relay path, CLI included, never imports torch
        assert s["listen_addrs"] == [r.addr]

        async def forge() -> str:
            # its limits and bans are a node's: 11 forged signatures from one peer get it banned
            evil = RawPublisher(make_nodes(tmp_path, ["evil"])[0].identity, topic_for(swarm))
            async with evil.running():
                pid = await evil.connect(r.addr)
                await evil.wait_subscribed(pid)
                for i in range(11):
                    await evil.publish(forge_signature(seal(make_batch(evil.identity, swarm, round=i), evil.identity)))
                with trio.fail_after(30):
                    while evil.identity.peer_id not in (r.status() or {}).get("mesh", {}).get("banned", {}):
                        await trio.sleep(0.2)
            return evil.identity.peer_id

        evil_id = trio.run(forge)
        s = r.status()
        assert s["rejections"]["signature"] >= 11 and evil_id in s["mesh"]["banned"]
        assert s["process"]["torch_loaded"] is False
        shown = subprocess.run([sys.executable, "-m", "node.cli", "status", str(r.status_port)], capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0 and f"relay    {r.identity.peer_id}" in shown.stdout
        assert "signature=" in shown.stdout and " MB resident" in shown.stdout
    finally:
        rc = r.stop(sig, timeout=30)
    out = r.output()
    assert rc == 0, out
    assert "Traceback" not in out and "stopped after" in out, out


def test_two_training_nodes_that_reach_each_other_only_through_a_relay_learn_from_each_other(tmp_path):
    """A and B bootstrap to the relay and may dial nobody else (--max-peers 1): every group between them is
    validated and forwarded by the relay process, and each trains on the other's."""
    swarm = "r-" + secrets.token_hex(3)
    r = relay_in(tmp_path)
    a, b = make_nodes(tmp_path, ["a", "b"])
    nodes = [r, a, b]
    r.start(swarm)
    try:
        wait_for(r.status, 60, "the relay's status server", [r])
        for n in (a, b):
            n.start(swarm, [r.addr], ["--max-peers", "1"])
        for n, other in ((a, b), (b, a)):
            wait_for(lambda: other.identity.peer_id in ((n.status() or {}).get("trained_from") or {}), 240,
                     f"{n.name} to train on {other.name}'s groups", nodes)
        rs = r.status()
        assert {a.identity.peer_id, b.identity.peer_id} <= set(rs["received_from"])  # validated at the relay
        assert rs["process"]["torch_loaded"] is False
        for n in (a, b):
            s = n.status()
            assert s["mesh"]["peers"] == [r.identity.peer_id]  # the relay was their only connection
            assert sum(s["rejections"].values()) == 0
    finally:
        for n in (a, b, r):
            n.stop()
