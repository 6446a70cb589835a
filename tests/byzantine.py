"""A reusable byzantine peer: joins a swarm as an ordinary mesh participant, then misbehaves in one chosen mode.

A test tool, not product code: it lives in tests/ with the other hostile peers (hostile.py) and test doubles
(doubles.py), outside the installed packages; scripts/byzantine_experiment.py runs it from the repository root.

    python -m tests.byzantine --mode false_rewards --swarm S --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW... \
        --duration 60 [--rate 1] [--json stats.json]

The peer runs a real `swarm.mesh.Mesh` (Noise, gossipsub, signed Hellos, peer exchange), so honest nodes see a normal
peer; what it sends depends on the mode. Well-formed payloads go through `Mesh.publish_rollouts` (the honest path:
sealed, paced); what Mesh would never send goes straight to py-libp2p's `Pubsub.publish` under the peer's own libp2p
identity (so it reaches the victims' validators, not ours), or as raw frames on a /meshsub stream.

Modes (the reason a victim should give, or where it should drop the message):
  false_rewards     real arith task refs, wrong answers, reward 1.0 claimed        -> accepted, rescored to 0 (no signal)
  wrong_answers     real arith task refs, well-formed wrong answers, no claim       -> accepted, rescored to 0
  garbage           empty / 16 KB / control-char / tag-abusing completions, groups of 1..60 (within protocol limits)
                                                                                    -> accepted, rescored (0, or dropped)
  unknown_tasks     refs to generators that do not exist, bad configs, split/seed mismatches, hang-prone configs
                                                                                    -> accepted, dropped at rescoring
  flood             valid small batches, unpaced, far over the per-sender rate limit -> "rate", then a ban
  oversized         envelopes over 1,000,000 bytes (raw, and a validly signed one)  -> "size", then a ban
  forged            flipped signature, tampered body, another key's message, swapped key, bytes that are not an envelope
                                                                                    -> "signature"/"sender"/"decode", ban
  replay            our own old envelope again, a stale one, one for another swarm, honest peers' captured envelopes
                    re-published by us, honest peers' captured libp2p messages forwarded as is
                                                                                    -> "replay"/"stale"/"swarm"/"sender"
                                                                                       (forwards: gossip seen-cache)
  bad_version       correctly signed messages with protocol version 0, 2, 255, 2**32 -> "version", then a ban
  malformed_frames  non-protobuf frames on a raw /meshsub/1.2.0 stream               -> bad frame, banned at once
  sybil             (extra) valid batches, each from a fresh identity, published with real libp2p signatures
                                                                                    -> accepted: per-sender limits
                                                                                       never trigger (see docs)

Wrong answers need no verifier: every ref is 2-digit addition ("arith", digits 2, ops "+"), whose sums are 20..198, so
any answer below 20 (or negative) is wrong. Imports only `protocol`, `swarm`, libp2p and trio.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import string
import sys
import time
from collections import Counter
from typing import Any, Sequence

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from libp2p.utils import encode_varint_prefixed

from protocol.envelope import Envelope, encode_envelope, read_envelope, seal, signing_bytes
from protocol.identity import Identity, load_identity
from protocol.messages import (
    MAX_COMPLETION_CHARS,
    PROTOCOL_VERSION,
    Rollout,
    RolloutBatch,
    TaskRef,
)

from swarm.host import key_pair_for
from swarm.mesh import Mesh, MeshConfig, topic_for

log = logging.getLogger(__name__)

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
MODES = ("false_rewards", "wrong_answers", "garbage", "unknown_tasks", "flood", "oversized", "forged", "replay",
         "bad_version", "malformed_frames", "sybil")
# What a victim's counters should show for each mode ("rescore:*" = status rejections; None: accepted as valid).
EXPECTED = {
    "false_rewards": None, "wrong_answers": None, "garbage": None, "unknown_tasks": "rescore:unknown_task",
    "flood": "rate", "oversized": "size", "forged": "signature", "replay": "replay", "bad_version": "version",
    "malformed_frames": "bad_frames", "sybil": None,
}
ARITH_CONFIG = {"digits": 2, "ops": "+", "split": "train"}  # what honest nodes train on by default (full config)
TRAIN_SEEDS = 2**31  # training refs use seeds < 2**31 (held-out ones >= 2**31)
FRAMES = (
    b"\xff\xff\xff\xff",  # invalid wire type
    b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # length-delimited field with an absurd length
    b"\x0a\x05ab",  # truncated field
)


def arith_ref(rng: random.Random) -> TaskRef:
    return TaskRef.make("arith", ARITH_CONFIG, rng.randrange(TRAIN_SEEDS), rng.randrange(2**31))


def wrong_answer(rng: random.Random) -> str:
    """A completion in the right format whose answer no 2-digit addition has (sums are 20..198)."""
    value = rng.choice([rng.randrange(0, 20), -rng.randrange(1, 200)])
    return f"<answer>{value}</answer>"


def unknown_task_refs(rng: random.Random) -> list[TaskRef]:
    """Refs that pass the wire codec but that no receiver can (or may) build."""
    s, i = rng.randrange(TRAIN_SEEDS), rng.randrange(2**31)
    return [
        TaskRef.make("no_such_generator", {}, s, i),
        TaskRef.make("arith", {"digits": 99, "ops": "+", "split": "train"}, s, i),  # out of range
        TaskRef.make("arith", {"digits": 2, "evil": 1}, s, i),  # unknown key
        TaskRef.make("arith", {"digits": 2, "ops": "+", "split": "train"}, 2**31 + s, i),  # held-out seed as "train"
        TaskRef.make("arith", {"digits": 2, "ops": "/", "split": "train"}, s, i),  # op not allowed
        TaskRef.make("arith", {"digits": "2"}, s, i),  # wrong type
        TaskRef.make("arith", ARITH_CONFIG, s, 2**40),  # index beyond 2**31
        TaskRef.make("base_conversion", {"min_base": 7, "max_base": 7}, s, i),  # would loop forever in reasoning-gym
        TaskRef.make("basic_arithmetic", {"operators": "/", "max_digits": 6}, s, i),  # slow divisor search
        TaskRef.make("bf", {"difficulty": 3}, s, i),  # seconds per item
        TaskRef.make("arc_1d", {"max_size": 200}, s, i),  # can loop forever
        TaskRef.make("arith", {"x" * 120: "y" * 256}, s, i),
    ]


def garbage_completions(rng: random.Random, kind: int) -> tuple[str, ...]:
    if kind == 0:  # empty strings
        return ("",) * 8
    if kind == 1:  # as big as the protocol allows per completion (60 x 16,000 chars ~ 1 MB message)
        return tuple("".join(rng.choices(string.printable, k=16_000)) for _ in range(60))
    if kind == 2:  # binary-ish: control characters, NULs, replacement chars, private-use code points
        alphabet = "\x00\x01\x02\x07\x1b\x7f\ufffd\ue000\u202e\u200b\x85\u2028"
        return tuple("".join(rng.choices(alphabet, k=rng.randrange(1, 4000))) for _ in range(8))
    if kind == 3:  # answer-tag abuse: nested, unclosed, repeated, huge answer, non-ASCII digits
        return ("<answer>", "</answer>", "<answer><answer>7</answer>", "<answer>" * 2000 + "1</answer>",
                "<answer>" + "9" * (MAX_COMPLETION_CHARS - 20) + "</answer>", "<answer>\u0664\u0662</answer>",
                "</answer><answer>", "<ANSWER>5</ANSWER>")
    if kind == 4:  # a single completion (GRPO needs >= 2)
        return ("<answer>3</answer>",)
    return tuple(rng.choice(["\U0001F600" * 3000, "\t\n" * 5000, "<answer> </answer>", "A" * MAX_COMPLETION_CHARS])
                 for _ in range(16))


def _libp2p_message(identity: Identity, topic: str, data: bytes, seqno: int) -> rpc_pb2.Message:
    """A gossipsub message published by `identity`, signed the way py-libp2p's strict signing checks it."""
    kp = key_pair_for(identity)
    msg = rpc_pb2.Message(data=data, topicIDs=[topic], from_id=ID.from_pubkey(kp.public_key).to_bytes(),
                          seqno=seqno.to_bytes(8, "big"))
    msg.signature = kp.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = kp.public_key.serialize()
    return msg


class _CapturingMesh(Mesh):
    """A normal Mesh that also keeps a few raw libp2p messages from honest peers (for replays)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.captured: list[rpc_pb2.Message] = []

    def _on_message(self, msg: rpc_pb2.Message) -> None:
        if msg.from_id != self._my_id_bytes and len(self.captured) < 64:
            copy = rpc_pb2.Message()
            copy.CopyFrom(msg)
            self.captured.append(copy)
        super()._on_message(msg)


class ByzantinePeer:
    """A peer that joins `swarm` through `bootstrap` and misbehaves in `mode` (one of MODES).

    `sent` counts what it tried, per kind (e.g. "forged:signature", "replay:own_envelope"); `rollouts` keeps the groups it
    published with a claim (bounded), so a test can rescore them itself.
    """

    def __init__(self, mode: str, swarm: str, bootstrap: Sequence[str] = (), *, identity: Identity | None = None,
                 listen: str = LOOPBACK, rate: float = 1.0, groups_per_batch: int = 16, group_size: int = 8,
                 seed: int = 0, model: str = "tiny") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode, self.swarm = mode, swarm
        self.identity = identity or Identity.generate()
        self.rate = rate
        self.groups_per_batch, self.group_size = groups_per_batch, group_size
        self.model = model
        self.rng = random.Random(seed)
        self.topic = topic_for(swarm)
        self.mesh = _CapturingMesh(self.identity, MeshConfig(swarm=swarm, listen=listen, bootstrap=tuple(bootstrap),
                                                             hello_interval_s=2.0))
        self.sent: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.rollouts: list[Rollout] = []
        self.sybils: list[str] = []  # peer IDs of the fresh identities used by "sybil"
        self.forged_senders: list[str] = []  # identities whose messages we published as if they were ours
        self._round = 0
        self._seq = 0
        self._own_old: bytes | None = None  # an envelope we published once (replayed later)
        self._started = time.time()

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    async def run(self, duration: float | None = None, *, wait_peers_s: float = 30.0,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> dict[str, Any]:
        """Join, wait for a peer, then attack for `duration` seconds (forever if None); returns `report()`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.mesh.run)
            self.mesh.set_status(0, self.model)
            with trio.move_on_after(wait_peers_s):
                while not self.mesh.peers():
                    await trio.sleep(0.2)
            await trio.sleep(1.5)  # let the mesh graft us before the first message
            task_status.started()
            with trio.move_on_after(math.inf if duration is None else duration):
                await self.attack()
            nursery.cancel_scope.cancel()
        return self.report()

    async def attack(self) -> None:
        step = getattr(self, f"_step_{self.mode}")
        while True:
            try:
                await step()
            except (trio.Cancelled, KeyboardInterrupt):
                raise
            except Exception as e:  # e.g. no stream to a peer that just banned us: keep going
                self.errors[type(e).__name__] += 1
                log.debug("byzantine step failed: %r", e)
                await trio.sleep(0.2)

    def report(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "peer_id": self.peer_id, "sent": dict(self.sent), "messages": sum(self.sent.values()),
            "errors": dict(self.errors), "peers_now": self.mesh.peers(), "connected_now": self.mesh.connected(),
            "sybils": len(self.sybils), "captured": len(self.mesh.captured),
            "uptime_s": round(time.time() - self._started, 1),
        }

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    def _batch(self, rollouts: Sequence[Rollout], *, identity: Identity | None = None, swarm: str | None = None,
               version: int = PROTOCOL_VERSION, created_at: float | None = None) -> RolloutBatch:
        ident = identity or self.identity
        return RolloutBatch(sender=ident.peer_id, swarm=self.swarm if swarm is None else swarm, version=version,
                            round=self._round, created_at=time.time() if created_at is None else created_at,
                            seq=self._next_seq(), model=self.model, rollouts=tuple(rollouts))

    def _wrong_groups(self, n: int, claim: float | None) -> list[Rollout]:
        out = []
        for _ in range(n):
            comps = tuple(wrong_answer(self.rng) for _ in range(self.group_size))
            rewards = None if claim is None else (claim,) * len(comps)
            out.append(Rollout(arith_ref(self.rng), comps, rewards))
        return out

    def _topic_peers(self) -> list[ID]:
        ps = self.mesh._pubsub
        return [p for p in ps.peer_topics.get(self.topic, set()) if p in ps.peers]

    def _send_direct(self, msg: rpc_pb2.Message) -> int:
        """Send one gossipsub message straight to every peer on the topic (not just our gossip mesh), as an attacker
        would: each victim runs its own validator on it. Returns the number of peers it was queued for."""
        rpc = rpc_pb2.RPC(publish=[msg])
        peers = self._topic_peers()
        for pid in peers:
            self.mesh._pubsub.router.send_rpc(pid, rpc)
        return len(peers)

    async def _publish_raw(self, kind: str, data: bytes) -> None:
        """Publish bytes under our own libp2p identity (properly libp2p-signed), bypassing every check of ours."""
        ps = self.mesh._pubsub
        msg = rpc_pb2.Message(data=data, topicIDs=[self.topic], from_id=ps.my_id.to_bytes(), seqno=ps._next_seqno())
        msg.signature = ps.sign_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
        msg.key = ps.host.get_public_key().serialize()
        self._send_direct(msg)
        self.sent[kind] += 1
        await trio.sleep(0)

    async def _publish_groups(self, kind: str, rollouts: list[Rollout]) -> None:
        """The honest path: sealed, split to <= 1 MB, paced by Mesh."""
        self._round += 1
        n = await self.mesh.publish_rollouts(self._round, self.model, rollouts)
        self.sent[kind] += n
        self.rollouts.extend(rollouts)
        del self.rollouts[:-2048]

    async def _tick(self) -> None:
        await trio.sleep(1.0 / self.rate)

    # ---- modes -------------------------------------------------------------------------------------------------

    async def _step_false_rewards(self) -> None:
        await self._publish_groups("false_rewards", self._wrong_groups(self.groups_per_batch, 1.0))
        await self._tick()

    async def _step_wrong_answers(self) -> None:
        await self._publish_groups("wrong_answers", self._wrong_groups(self.groups_per_batch, None))
        await self._tick()

    async def _step_garbage(self) -> None:
        kind = self.sent["garbage"] % 6
        groups = [Rollout(arith_ref(self.rng), garbage_completions(self.rng, kind), None)]
        if kind != 1:  # the 1 MB group travels alone
            groups += [Rollout(arith_ref(self.rng), garbage_completions(self.rng, kind), None) for _ in range(3)]
        await self._publish_groups("garbage", groups)
        await self._tick()

    async def _step_unknown_tasks(self) -> None:
        refs = unknown_task_refs(self.rng)
        groups = [Rollout(r, tuple(wrong_answer(self.rng) for _ in range(self.group_size)), (1.0,) * self.group_size)
                  for r in refs]
        await self._publish_groups("unknown_tasks", groups)
        await self._tick()

    async def _step_flood(self) -> None:
        # Valid, small, correctly signed batches with fresh seqs: only the rate limit can stop them.
        for _ in range(25):  # up to ~500 msg/s: far over what a receiver accepts from one sender (20/s, burst 60)
            await self._publish_raw("flood", seal(self._batch(self._wrong_groups(1, None)), self.identity))
        await trio.sleep(0.05)

    async def _step_oversized(self) -> None:
        if self.sent["oversized:raw"] <= self.sent["oversized:signed"]:
            await self._publish_raw("oversized:raw", b"\x00" * 1_000_500)
        else:  # a properly signed envelope whose body alone is over the limit
            body = bytes(self.rng.getrandbits(8) for _ in range(64)) * 15_628  # 1,000,192 bytes
            sig = self.identity.sign(signing_bytes(self.swarm, PROTOCOL_VERSION, body))
            await self._publish_raw("oversized:signed", encode_envelope(Envelope(body, self.identity.public_key, sig)))
        await trio.sleep(0.2)

    async def _step_forged(self) -> None:
        good = seal(self._batch(self._wrong_groups(2, 1.0)), self.identity)
        env = read_envelope(good)
        k = sum(v for key, v in self.sent.items() if key.startswith("forged")) % 5
        if k == 0:  # one flipped signature bit
            data = encode_envelope(Envelope(env.body, env.public_key, bytes([env.signature[0] ^ 1]) + env.signature[1:]))
            await self._publish_raw("forged:signature", data)
        elif k == 1:  # body changed after signing (same length: one answer digit swapped)
            i = env.body.find(b"<answer>") + len(b"<answer>")
            body = env.body[:i] + (b"8" if env.body[i:i + 1] != b"8" else b"9") + env.body[i + 1:]
            await self._publish_raw("forged:tampered", encode_envelope(Envelope(body, env.public_key, env.signature)))
        elif k == 2:  # validly signed by somebody else, published by us
            other = Identity.generate()
            self.forged_senders.append(other.peer_id)
            await self._publish_raw("forged:other_sender", seal(self._batch(self._wrong_groups(2, 1.0), identity=other),
                                                                other))
        elif k == 3:  # not an envelope at all
            await self._publish_raw("forged:not_msgpack", b"\xc1" + bytes(self.rng.getrandbits(8) for _ in range(200)))
        else:  # our body and signature under another public key
            other = Identity.generate()
            self.forged_senders.append(other.peer_id)
            await self._publish_raw("forged:swapped_key", encode_envelope(Envelope(env.body, other.public_key,
                                                                                   env.signature)))
        await trio.sleep(0.2)

    async def _step_replay(self) -> None:
        k = sum(v for key, v in self.sent.items() if key.startswith("replay")) % 5
        if self._own_old is None:  # publish one valid envelope first: it is accepted once
            self._own_old = seal(self._batch(self._wrong_groups(1, None)), self.identity)
            await self._publish_raw("replay:original", self._own_old)
        elif k == 0:  # the same signed envelope again (new libp2p seqno, so gossip's seen-cache does not catch it)
            await self._publish_raw("replay:own_envelope", self._own_old)
        elif k == 1:  # an hour old
            await self._publish_raw("replay:stale", seal(self._batch(self._wrong_groups(1, None),
                                                                     created_at=time.time() - 3600), self.identity))
        elif k == 2:  # signed for another swarm
            await self._publish_raw("replay:other_swarm", seal(self._batch(self._wrong_groups(1, None),
                                                                           swarm=self.swarm + "-other"), self.identity))
        elif k == 3 and self.mesh.captured:  # an honest peer's envelope, re-published by us
            msg = self.mesh.captured[self.rng.randrange(len(self.mesh.captured))]
            await self._publish_raw("replay:honest_envelope", bytes(msg.data))
        elif self.mesh.captured:  # an honest peer's libp2p message forwarded as is (its own libp2p signature)
            msg = self.mesh.captured[self.rng.randrange(len(self.mesh.captured))]
            self._send_direct(msg)  # as if we were relaying it; it still carries its origin's libp2p signature
            self.sent["replay:honest_forward"] += 1
        else:
            await self._publish_raw("replay:own_envelope", self._own_old)
        await trio.sleep(0.2)

    async def _step_bad_version(self) -> None:
        version = (0, PROTOCOL_VERSION + 1, 255, 2**32)[self.sent["bad_version"] % 4]
        await self._publish_raw("bad_version", seal(self._batch(self._wrong_groups(1, None), version=version),
                                                    self.identity))
        await trio.sleep(0.2)

    async def _step_malformed_frames(self) -> None:
        async def one(pid: ID) -> None:
            frame = FRAMES[self.sent["malformed_frames"] % len(FRAMES)]
            try:
                with trio.move_on_after(5):
                    stream = await self.mesh._host.new_stream(pid, [PROTOCOL_ID_V12])
                    await stream.write(encode_varint_prefixed(frame))
                    self.sent["malformed_frames"] += 1
            except Exception as e:  # a peer that already banned us
                self.errors[type(e).__name__] += 1

        async with trio.open_nursery() as nursery:
            for pid in self.mesh._host.get_connected_peers():
                nursery.start_soon(one, pid)
        await trio.sleep(1.0)

    async def _step_sybil(self) -> None:
        # Each message from a fresh identity: libp2p-signed by it, forwarded by us. Nothing is invalid, so per-sender
        # rate limits and strikes never apply.
        for _ in range(20):
            ident = Identity.generate()
            data = seal(self._batch(self._wrong_groups(1, None), identity=ident), ident)
            self._send_direct(_libp2p_message(ident, self.topic, data, time.time_ns()))
            self.sybils.append(ident.peer_id)
            del self.sybils[:-4096]
            self.sent["sybil"] += 1
            await trio.sleep(0)
        await trio.sleep(1.0 / max(self.rate, 1e-3))


# ---- command line ------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.byzantine", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--swarm", required=True)
    p.add_argument("--bootstrap", action="append", default=[], help="multiaddr of a peer (repeatable)")
    p.add_argument("--duration", type=float, default=None, help="seconds to attack (default: until Ctrl-C)")
    p.add_argument("--rate", type=float, default=1.0, help="batches per second for the payload modes")
    p.add_argument("--groups", type=int, default=16, help="groups per batch (false_rewards, wrong_answers)")
    p.add_argument("--listen", default=LOOPBACK)
    p.add_argument("--identity", default="", help="identity file (default: a fresh identity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the final report here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    identity = load_identity(args.identity) if args.identity else None
    peer = ByzantinePeer(args.mode, args.swarm, args.bootstrap, identity=identity, listen=args.listen, rate=args.rate,
                         groups_per_batch=args.groups, seed=args.seed)
    print(json.dumps({"mode": args.mode, "peer_id": peer.peer_id}), flush=True)

    async def _main() -> dict[str, Any]:
        result: dict[str, Any] = {}
        with trio.open_signal_receiver(2, 15) as signals:
            async with trio.open_nursery() as nursery:
                async def attack() -> None:
                    result.update(await peer.run(args.duration))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(attack)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
        return result or peer.report()

    report = trio.run(_main)
    print(json.dumps(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
