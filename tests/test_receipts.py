"""swarm.receipts: the per-batch ledger scripts/bench_swarm.py counts delivery from, through two real hosts."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import trio

from protocol.identity import Identity
from swarm.mesh import Mesh, MeshConfig
from tests.doubles import dummy_rollouts

LOOP = "/ip4/127.0.0.1/tcp/0"


async def _start(nursery: trio.Nursery, receipts: str, *bootstrap: Mesh, shards: int = 1) -> Mesh:
    cfg = MeshConfig(swarm="rc", listen=LOOP, bootstrap=tuple(m.listen_addrs()[0] for m in bootstrap),
                     hello_interval_s=1.0, heartbeat_s=1.0, bootstrap_backoff_max_s=2.0, receipts=receipts,
                     shards=shards, shard_fanin=shards)
    mesh = Mesh(Identity.generate(), cfg)
    await nursery.start(mesh.run)
    return mesh


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


async def test_receipts_name_each_published_and_accepted_batch(tmp_path: Path) -> None:
    ra, rb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    async with trio.open_nursery() as n:
        a = await _start(n, str(ra), shards=2)
        b = await _start(n, str(rb), a, shards=2)
        got = []

        async def drain() -> None:
            async for rec in b.incoming:
                got.append(rec)
        n.start_soon(drain)
        with trio.fail_after(30):
            while not got:
                await a.publish_rollouts(1, "m", dummy_rollouts(2, text="y" * 1500))
                await trio.sleep(1.0)
        n.cancel_scope.cancel()
    pubs = [x for x in _lines(ra) if x["ev"] == "pub"]
    accs = [x for x in _lines(rb) if x["ev"] == "acc"]
    assert pubs and all(p["shard"] == a.home_shard for p in pubs)
    assert accs[0]["sender"] == a.peer_id and accs[0]["via"] == a.peer_id
    assert {x["seq"] for x in accs} <= {p["seq"] for p in pubs}  # every accepted batch is one a published
    assert accs[0]["seq"] == got[0].batch.seq and accs[0]["created_at"] == got[0].batch.created_at
    listen = [x for x in _lines(rb) if x["ev"] == "listen"]
    assert listen[0]["shards"][0] == b.home_shard and set(listen[0]["shards"]) == {0, 1}  # home first


async def test_an_unwritable_receipts_file_is_a_warning_not_a_dead_node(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="swarm.receipts")
    async with trio.open_nursery() as n:
        a = await _start(n, str(tmp_path / "no" / "such" / "dir.jsonl"))
        assert await a.publish_rollouts(1, "m", dummy_rollouts(1)) == 1
        n.cancel_scope.cancel()
    assert any("receipts off" in r.getMessage() for r in caplog.records)


def test_bench_counts_delivery_batch_by_batch_from_receipts() -> None:
    """scripts/bench_swarm.py analyze_receipts on a hand-made run: what is expected where, what is missing, and
    what is left out (publish before everyone joined, off-shard receiver, too close to the receiver's end)."""
    from scripts.bench_swarm import analyze_receipts

    def proc(name: str, joined: float, end: float, receipts: list[dict]) -> dict:
        st = {"n_peers": 1}
        return {"name": name, "peer_id": "P" + name, "receipts": receipts,
                "samples": [{"t": joined, "st": st}, {"t": end, "st": st}]}

    pub = lambda t, seq, shard=0: {"ev": "pub", "t": t, "seq": seq, "created_at": t, "shard": shard}  # noqa: E731
    acc = lambda t, s, seq: {"ev": "acc", "t": t, "sender": "P" + s, "seq": seq, "created_at": 0.0, "via": ""}  # noqa: E731
    listen = lambda t, *sh: {"ev": "listen", "t": t, "shards": list(sh)}  # noqa: E731
    a = proc("a", 10, 200, [listen(0, 0), pub(5, 1), pub(50, 2), pub(60, 3), pub(190, 4)])
    b = proc("b", 20, 200, [listen(0, 0), acc(51, "a", 2)])  # missed seq 3; seq 1 before all joined; 4 at the edge
    c = proc("c", 20, 200, [listen(0, 1), listen(55, 0), acc(61, "a", 3)])  # shard 0 only from t = 55: seq 2 not expected
    e = analyze_receipts({"nodes": [a, b, c], "relays": []}, drain_s=30)["trainers"]
    assert (e["expected"], e["delivered"], e["edge"]) == (3, 2, 2)
    assert e["per_receiver"]["b"]["missing"] == [{"sender": "a", "seq": 3, "published_s": 40.0}]
    assert e["batches_missed"] == 1 and e["batches_missed_by_all"] == 0  # c got seq 3: not lost at the sender
    assert e["delivery"] == round(2 / 3, 4)
