"""The dashboard at a node's status port: the HTTP routes (pure), then the page in a real headless Chromium, loaded
from real `swarm-node join` and `swarm-node relay` processes, with a hostile publisher so a rejection is counted.

SWARM_NODE_SCREENSHOT=PATH saves the node page's screenshot there (scripts/dashboard_screenshot.py:
docs/img/dashboard.png); otherwise it goes to the test's tmp dir.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from node.status import dashboard_page, respond

SWARM = "dash-" + secrets.token_hex(3)
# small rounds: the page needs a few of them, not a long run
SMALL = ["--questions-per-round", "8", "--local", "4", "--external", "4", "--max-external-per-peer", "4",
         "--checkpoint-every", "1000"]


def test_routes_page_json_history_and_refusals():
    calls = []

    def history(since: int) -> dict:
        calls.append(since)
        return {"rows": [{"round": since}], "next": since + 1, "max_rows": 2000}

    status = lambda: {"round": 3}  # noqa: E731
    code, ctype, body = respond(b"GET", "/", {"host": "127.0.0.1:8480", "accept": "text/html,*/*"}, status, history)
    assert code == "200 OK" and ctype.startswith("text/html") and body == dashboard_page()
    assert b"<script>" in body and b"http://" not in body.split(b"<script>")[1].replace(b"http://www.w3.org", b"")
    for path, headers in (("/status", {}), ("/", {"accept": "application/json"})):  # JSON readers of / keep working
        code, ctype, body = respond(b"GET", path, headers, status, history)
        assert (code, ctype, json.loads(body)) == ("200 OK", "application/json", {"round": 3})
    code, _, body = respond(b"GET", "/history?since=7", {"host": "localhost:1"}, status, history)
    assert json.loads(body)["rows"] == [{"round": 7}] and calls == [7]
    assert respond(b"GET", "/history?since=x", {}, status, history)[0] == "400 Bad Request"
    assert json.loads(respond(b"GET", "/history", {}, status, None)[2])["rows"] == []  # a relay: no rounds
    assert respond(b"GET", "/status", {"host": "evil.example:8480"}, status, history)[0] == "403 Forbidden"
    assert respond(b"POST", "/status", {}, status, history)[0] == "405 Method Not Allowed"
    assert respond(b"GET", "/nope", {}, status, history)[0] == "404 Not Found"
    for junk in ("//[x", "http://[::1", "\x00", ""):  # never a crash: the handler runs in the node's nursery
        assert respond(b"GET", junk, {}, status, history)[0] in ("400 Bad Request", "404 Not Found")


async def test_the_server_answers_junk_and_a_failing_document_without_dying():
    from node.simulate import free_ports
    from node.status import serve_status

    port = free_ports(1)[0]

    def broken() -> dict:
        raise RuntimeError("a bug")

    async def ask(raw: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(raw)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
        return out

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, port, broken)
        assert (await ask(b"GET /status HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 500")
        assert (await ask(b"GET //[x HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 400")
        assert (await ask(b"\xff\xfe garbage\r\n\r\n")).startswith(b"HTTP/1.0 405")
        page = await ask(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        assert page.startswith(b"HTTP/1.0 200") and b"Content-Security-Policy: default-src 'none'" in page
        assert page.endswith(dashboard_page())
        nursery.cancel_scope.cancel()


def test_history_is_bounded_and_incremental():
    from collections import deque

    from node.run import CURVE_ROUNDS, NodeRuntime, curve_row

    node = SimpleNamespace(curves=deque(maxlen=CURVE_ROUNDS), round=0)
    for r in range(CURVE_ROUNDS + 500):
        node.curves.append(curve_row({"round": r, "reward_mean": 0.5, "wall_s": 1.0, "loss": 3.0,
                                      "heldout_acc": float("nan")}))
        node.round = r + 1
    doc = NodeRuntime.history_since(node, 0)
    assert len(doc["rows"]) == CURVE_ROUNDS and doc["rows"][0]["round"] == 500 and doc["next"] == CURVE_ROUNDS + 500
    assert "loss" not in doc["rows"][0] and doc["rows"][0]["heldout_acc"] is None  # only what it draws; JSON-safe
    assert [r["round"] for r in NodeRuntime.history_since(node, CURVE_ROUNDS + 498)["rows"]] == [2498, 2499]
    assert NodeRuntime.history_since(node, doc["next"])["rows"] == []


def test_a_missing_browser_skips_saying_how_to_install_it_and_fails_on_ci(monkeypatch, tmp_path):
    import tests.browser as browser

    monkeypatch.setattr(browser, "_find", lambda names: None)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("SWARM_NODE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no chromium binary.*scripts/setup.sh"):
        browser.chromium_driver(tmp_path)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="browser test required here: no chromium"):
        browser.chromium_driver(tmp_path)


# -- the page in a real browser ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from tests.join_procs import make_nodes, make_relays, wait_for

    tmp = tmp_path_factory.mktemp("dash")
    relay = make_relays(tmp, ["relay"])[0]
    a, b = make_nodes(tmp, ["a", "b"])
    procs = [relay, a, b]
    try:
        relay.start(SWARM)
        wait_for(relay.status, 60, "the relay's status server", [relay])
        a.start(SWARM, [relay.addr], SMALL + ["--eval-every", "2", "--eval-size", "10"])
        b.start(SWARM, [relay.addr], SMALL)
        yield SimpleNamespace(relay=relay, a=a, b=b, tmp=tmp)
    finally:
        for p in procs:  # all at once: each checkpoints on SIGTERM, and they need not wait for each other
            if p.alive():
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def browser(swarm):
    from tests.browser import chromium_driver

    driver = chromium_driver(swarm.tmp)
    yield driver
    driver.quit()


def _attack(addr: str) -> str:
    """Publishes one envelope per rejection reason straight to the node; returns the hostile peer's ID."""
    from protocol.identity import Identity
    from swarm.mesh import topic_for
    from tests.doubles import RawPublisher, bad_envelopes

    evil = Identity.generate()

    async def run() -> None:
        pub = RawPublisher(evil, topic_for(SWARM))
        async with pub.running():
            pid = await pub.connect(addr)
            await pub.wait_subscribed(pid)
            await trio.sleep(1.5)  # let the mesh graft
            for data in bad_envelopes(evil, SWARM).values():
                await pub.publish(data)
            await trio.sleep(2)

    trio.run(run)
    return evil.peer_id


def _page(driver) -> dict:
    """What the page shows, read from its DOM in one script (one consistent snapshot)."""
    return driver.execute_script("""
        const q = s => document.querySelector(s), all = s => [...document.querySelectorAll(s)];
        const n = s => q(s) ? Number(q(s).dataset.n) : null;
        return {ready: document.body.dataset.ready, updates: Number(document.body.dataset.updates),
                round: Number(document.body.dataset.round), status_round: Number(document.body.dataset.statusRound),
                reward: n('#chart-reward polyline[data-series=reward]'),
                reward_xy: q('#chart-reward polyline[data-series=reward]') ?
                           q('#chart-reward polyline[data-series=reward]').getAttribute('points').trim().split(/\\s+/).filter(Boolean).length : 0,
                heldout: n('#chart-heldout polyline[data-series=heldout]'),
                wall: n('#chart-timing polyline[data-series=wall_s]'),
                curves_hidden: q('#curves').hidden,
                peers: Object.fromEntries(all('#peers tbody tr[data-peer]').map(tr =>
                       [tr.dataset.peer, [...tr.cells].map(c => c.textContent.trim())])),
                peer_head: all('#peers thead th').map(th => th.textContent),
                rejections: Object.fromEntries(all('#rejections tbody tr[data-reason]').map(tr =>
                            [tr.dataset.reason, Number(tr.cells[1].textContent)])),
                bans: all('#bans tbody tr[data-peer]').map(tr => tr.dataset.peer),
                peer_id: q('#peer-id') ? q('#peer-id').textContent : null,
                listen: all('#listen-addrs li').map(li => li.textContent),
                title: q('#title').textContent};
    """)


def _history(port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/history?since=0", timeout=3) as r:
        return json.loads(r.read())["rows"]


@pytest.mark.slow
def test_node_dashboard_draws_its_rounds_peers_and_rejections_live(swarm, browser, tmp_path):
    from tests.join_procs import wait_for

    a, b, relay = swarm.a, swarm.b, swarm.relay
    nodes = [a, b, relay]
    wait_for(a.status, 90, "a's status server", nodes)
    browser.get(f"http://127.0.0.1:{a.status_port}/")  # opened early: what follows must reach it live
    first = wait_for(lambda: (p := _page(browser))["ready"] == "1" and p, 30, "the page's first update")
    assert "signature" not in first["rejections"]  # before the attack
    wait_for(lambda: {b.identity.peer_id, relay.identity.peer_id} <= set((a.status() or {}).get("peers", [])), 90,
             "a to see b and the relay", nodes)
    evil = _attack(a.addr)
    wait_for(lambda: (a.status() or {}).get("received_from", {}).get(b.identity.peer_id, 0) > 0
             and a.status()["rejections"].get("signature", 0) >= 1, 90, "a to receive b's groups and count the attack",
             nodes)
    # live, without a reload: the curves grow, the rejections and b's model (from its Hello) appear
    grow = max(first["reward"] + 3, 4, int(os.environ.get("SWARM_NODE_SCREENSHOT_ROUNDS", 0)))
    counted = lambda: {k: v for k, v in a.status()["rejections"].items() if v}  # noqa: E731
    page = wait_for(lambda: (p := _page(browser))["reward"] >= grow and p["rejections"] == counted()
                    and p["peers"].get(b.identity.peer_id, [""] * 2)[1] == "tiny" and p, 120, "the page to update", nodes)
    s, hist = a.status(), _history(a.status_port)
    # one point per round done (the page's own /history and /status reads), nothing lost or doubled
    assert page["reward"] == page["reward_xy"] == page["wall"] == page["round"] <= page["status_round"] <= s["round"]
    assert page["round"] <= len(hist) and page["updates"] > first["updates"]
    evals = sum(r.get("heldout_acc") is not None for r in hist if r["round"] < page["round"])
    assert page["heldout"] == evals == page["round"] // 2 >= 2  # --eval-every 2
    # the peers table: b and the relay, with b's groups counted as the node counted them
    assert {b.identity.peer_id, relay.identity.peer_id} <= set(page["peers"])
    assert page["peer_head"][:6] == ["peer", "model", "round", "groups received", "trained on", "useful for us"]
    row_b = page["peers"][b.identity.peer_id]
    assert row_b[1] == "tiny" and 0 < int(row_b[3]) <= s["received_from"][b.identity.peer_id]
    assert page["peers"][relay.identity.peer_id][1] == "relay"
    # rejections: the hostile publisher's envelopes, by reason, as /status counts them (they stopped coming)
    for reason in ("signature", "decode", "swarm", "version", "stale", "size"):
        assert page["rejections"].get(reason, 0) == s["rejections"][reason] >= 1, (reason, page["rejections"])
    struck = set(s["mesh"]["strikes_total"]) | set(s["mesh"]["banned"])
    assert evil in struck and set(page["bans"]) == struck
    assert page["peer_id"] == a.identity.peer_id and a.addr in page["listen"] and not page["curves_hidden"]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # the script ran clean, and nothing was fetched from elsewhere
    shot = Path(os.environ.get("SWARM_NODE_SCREENSHOT") or tmp_path / "dashboard.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_relay_dashboard_lists_peers_without_curves(swarm, browser):
    from tests.join_procs import wait_for

    a, b, relay = swarm.a, swarm.b, swarm.relay
    wait_for(lambda: {a.identity.peer_id, b.identity.peer_id} <= set((relay.status() or {}).get("peers", [])), 90,
             "the relay to see both nodes", [a, b, relay])
    browser.get(f"http://127.0.0.1:{relay.status_port}/")
    page = wait_for(lambda: (p := _page(browser))["ready"] == "1" and p, 30, "the relay page's first update")
    assert page["title"] == "swarm-node relay" and page["curves_hidden"]
    assert {a.identity.peer_id, b.identity.peer_id} <= set(page["peers"])
    assert "batches relayed" in page["peer_head"] and "trained on" not in page["peer_head"]
    assert page["peers"][a.identity.peer_id][1] == "tiny" and page["peer_id"] == relay.identity.peer_id
    assert relay.status()["process"]["torch_loaded"] is False  # serving the page pulled no torch into the relay
    shown = subprocess.run([sys.executable, "-m", "node.cli", "status", str(relay.status_port)], capture_output=True,
                           text=True, timeout=60)
    assert f"page     http://127.0.0.1:{relay.status_port}/" in shown.stdout  # `swarm-node status` names the page
