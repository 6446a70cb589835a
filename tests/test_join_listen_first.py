"""`join --min-peers N` prints its listen address before it waits for peers (issue 12): a peer that reads the address
to join would otherwise wait for a node that waits for it."""
from __future__ import annotations

import pytest

from tests.join_procs import make_nodes, wait_for

pytestmark = pytest.mark.slow


def test_join_prints_its_listen_address_before_the_min_peers_wait(tmp_path) -> None:
    (a,) = make_nodes(tmp_path, ["a"])
    a.start("listen-first", extra=["--min-peers", "1", "--peer-wait-s", "600"])
    try:
        out = wait_for(lambda: "listening /ip4/" in a.output() and a.output(), 120, "a's listen address", [a])
        assert a.addr in out, out  # the address a peer needs: /ip4/127.0.0.1/tcp/<port>/p2p/<peer id>
        assert "waiting up to 600s for 1 peer(s)" in out
        assert a.alive() and a.status() is None  # still in the wait: no round, no status server yet
    finally:
        a.stop()
