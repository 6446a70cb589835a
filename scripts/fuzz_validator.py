#!/usr/bin/env python
"""Fuzz the gossip validator: a stream of mutated, replayed, stale, misattributed and bursty messages through one
stateful MessageValidator driven by a fake clock, judged by an independent model of what it may accept.

Prints `inputs=N crashes=K accepted_invalid=M` and a detail line; exits 1 unless K == M == 0.
- A crash is any exception other than Rejected, or a Rejected that came from the validator's catch-all (detail
  "unexpected ..."): that one is a bug the catch-all hid.
- An accepted input is invalid unless its bytes are exactly an envelope this harness sealed itself, published by its
  signer, and the model agrees it came on a topic that fits it (sharded swarm: its sender's home shard, or the lobby
  for a Hello), is fresh (created_at within [now - max_age_s, now + max_clock_skew_s]), is not a replay (its seq was
  not accepted from that sender with a created_at that a copy could still be fresh with by the latest clock reading,
  and it was not created at or before an accepted message of that sender that has aged out), within the sender's
  token buckets and within the node's total ones (young senders only above their floor). `rejected_valid` (inputs
  the model would accept but the validator refused) is reported too.

    python scripts/fuzz_validator.py --count 100000 --seed 0
    python scripts/fuzz_protocol.py --validator --count 100000   # the same
"""
from __future__ import annotations

import argparse
import bisect
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import messages as M  # noqa: E402
from protocol.envelope import Envelope, encode_envelope, read_envelope, seal, signing_bytes  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.messages import Hello, Rollout, RolloutBatch, TaskRef  # noqa: E402
from scripts.fuzz_protocol import (  # noqa: E402
    byte_mutation, envelope_structural_mutation, semantic_mutation, structural_mutation)
from swarm.shards import home_shard, lobby_topic, shard_topic  # noqa: E402
from swarm.validator import REASONS, MessageValidator, RateLimit, Rejected  # noqa: E402

SWARM = "fuzz-swarm"  # semantic_mutation signs for this swarm name
T0 = 1_700_000_000.0
MAX_AGE_S, SKEW_S, WINDOW = 900.0, 60.0, 16  # WINDOW: how far out of order the harness sends seqs
SHARDS = 4
TOPICS = [shard_topic(SWARM, M.PROTOCOL_VERSION, SHARDS, i) for i in range(SHARDS)]
LOBBY = lobby_topic(SWARM, M.PROTOCOL_VERSION, SHARDS)
# small buckets so that the rate and load paths are reached often
RATE = RateLimit(msgs_per_s=10.0, msgs_burst=20.0, bytes_per_s=40_000.0, bytes_burst=120_000.0,
                 total_msgs_per_s=12.0, total_msgs_burst=40.0, total_bytes_per_s=60_000.0, total_bytes_burst=200_000.0)


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class _Bucket:
    """The model's own token bucket (deliberately not swarm.validator.TokenBucket)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def level(self, now: float) -> float:
        return min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)

    def spend(self, amount: float, now: float) -> None:
        self.tokens, self.at = self.level(now) - amount, max(self.at, now)


class Model:
    """What the validator may accept: a spec written from the README/docstrings, independent of its code."""

    def __init__(self) -> None:
        self.last_created: dict[str, dict[int, float]] = {}  # sender -> seq -> created_at of its latest acceptance
        self.created: dict[str, list[float]] = {}  # sender -> created_at of every accepted message, ascending
        self.clock_max = -float("inf")  # the latest clock reading the validator has seen (tick)
        self.buckets: dict[str, tuple[_Bucket, _Bucket]] = {}
        self.first_seen: dict[str, float] = {}
        self.admit = _Bucket(RATE.new_senders_per_s, RATE.new_senders_burst, T0)
        self.forwarders: dict[str, tuple[_Bucket, _Bucket]] = {}
        self.total = (_Bucket(RATE.total_msgs_per_s, RATE.total_msgs_burst, T0),
                      _Bucket(RATE.total_bytes_per_s, RATE.total_bytes_burst, T0))

    def tick(self, now: float) -> None:
        """The validator read its clock (it does so once for every input)."""
        self.clock_max = max(self.clock_max, now)

    def verdict(self, msg: M.Message, size: int, from_peer: str, now: float, topic: str | None = None) -> str:
        """'ok' or the reason it must be refused (signature/decode problems are decided by the sealed-bytes set)."""
        self.tick(now)
        if msg.sender != from_peer:
            return "sender"
        if topic is not None:
            if topic == LOBBY:
                if not isinstance(msg, Hello):
                    return "topic"
            elif topic not in TOPICS or TOPICS.index(topic) != home_shard(msg.sender, SHARDS):
                return "topic"
        if not (now - MAX_AGE_S <= msg.created_at <= now + SKEW_S):
            return "stale"
        if msg.sender not in self.buckets:  # a new identity: admitted at a bounded rate, starts with 1 s of budget
            if self.admit.level(now) < 1:
                return "newcomer"
            self.admit.spend(1, now)
            self.first_seen[msg.sender] = now
            msgs, nbytes = _Bucket(RATE.msgs_per_s, RATE.msgs_burst, now), _Bucket(RATE.bytes_per_s, RATE.bytes_burst, now)
            if RATE.probation_s > 0:
                msgs.tokens = min(RATE.msgs_burst, max(1.0, RATE.msgs_per_s))
                nbytes.tokens = min(RATE.bytes_burst, max(float(M.MAX_MESSAGE_BYTES), RATE.bytes_per_s))
            self.buckets[msg.sender] = (msgs, nbytes)
        # replay: the window is in time (the validator's doc), judged by the latest clock reading
        horizon = self.clock_max - MAX_AGE_S
        last = self.last_created.get(msg.sender, {}).get(msg.seq)
        if last is not None and last >= horizon:  # a copy of an accepted message could still be fresh
            return "replay"
        created = self.created.get(msg.sender, [])
        aged = bisect.bisect_left(created, horizon)  # accepted messages that aged out: created_at < horizon
        if aged and msg.created_at <= created[aged - 1]:
            return "replay"
        msgs, nbytes = self.buckets[msg.sender]
        if msgs.level(now) < 1 or nbytes.level(now) < size:
            return "rate"
        if self._young(msg.sender, now):  # young senders also share their forwarder's newcomer budget
            fm, fb = self._forwarder(from_peer, now)
            if fm.level(now) < 1 or fb.level(now) < size:
                return "newcomer"
        floor = RATE.young_total_floor if self._young(msg.sender, now) else 0.0  # young ones are shed first
        tm, tb = self.total
        if tm.level(now) < 1 + floor * RATE.total_msgs_burst or tb.level(now) < size + floor * RATE.total_bytes_burst:
            return "load"
        return "ok"

    def _young(self, sender: str, now: float) -> bool:
        return now - self.first_seen[sender] < RATE.probation_s

    def _forwarder(self, peer: str, now: float) -> tuple[_Bucket, _Bucket]:
        k = RATE.newcomer_share
        if peer not in self.forwarders:
            self.forwarders[peer] = (_Bucket(k * RATE.msgs_per_s, k * RATE.msgs_burst, now),
                                     _Bucket(k * RATE.bytes_per_s, k * RATE.bytes_burst, now))
        return self.forwarders[peer]

    def accept(self, msg: M.Message, size: int, now: float) -> None:
        self.last_created.setdefault(msg.sender, {})[msg.seq] = msg.created_at
        bisect.insort(self.created.setdefault(msg.sender, []), msg.created_at)
        msgs, nbytes = self.buckets[msg.sender]
        msgs.spend(1, now)
        nbytes.spend(size, now)
        self.total[0].spend(1, now)
        self.total[1].spend(size, now)
        if self._young(msg.sender, now):
            fm, fb = self._forwarder(msg.sender, now)  # the harness's forwarder is the publisher
            fm.spend(1, now)
            fb.spend(size, now)


@dataclass
class ValidatorFuzzResult:
    inputs: int = 0
    crashes: int = 0
    accepted_invalid: int = 0
    accepted_valid: int = 0
    rejected_valid: int = 0
    reasons: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def note(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)


class Harness:
    def __init__(self, seed: int, validator: MessageValidator | None = None) -> None:
        self.rng = random.Random(seed)
        self.clock = FakeClock()
        self.validator = validator or MessageValidator(
            SWARM, M.PROTOCOL_VERSION, max_age_s=MAX_AGE_S, max_clock_skew_s=SKEW_S, rate=RATE,
            shards=SHARDS, clock=self.clock)
        self.model = Model()
        self.idents = [Identity(self.rng.randbytes(32)) for _ in range(4)]
        self.stranger = Identity(self.rng.randbytes(32))
        self.edge = Identity(self.rng.randbytes(32))
        self.next_seq = {i.peer_id: 1_000 for i in self.idents}
        # every valid envelope this harness made that may still come back -> its message (the history, and the
        # input being checked)
        self.sealed: dict[bytes, M.Message] = {}
        self.history: list[tuple[bytes, Identity]] = []  # sealed envelopes kept for replays and mutations
        self._kept: set[bytes] = set()  # the bytes in history
        self._count = 0
        self.result = ValidatorFuzzResult()

    # ------------------------------------------------------------ valid messages

    def _message(self, ident: Identity, seq: int, created_at: float) -> M.Message:
        rng = self.rng
        if rng.random() < 0.15:
            return Hello(ident.peer_id, SWARM, M.PROTOCOL_VERSION, round=rng.randrange(100), created_at=created_at,
                         seq=seq, model="m", listen_addrs=("/ip4/127.0.0.1/tcp/4001",))
        n = rng.choice([0, 1, 1, 2, 3, 8])
        chars = rng.choice([1, 20, 200, 3000])  # the big ones drain the byte bucket
        rollouts = tuple(
            Rollout(TaskRef.make("arith", {"digits": 2}, rng.randrange(2**32), k),
                    tuple("x" * rng.randrange(chars) for _ in range(2)), (1.0, 0.0)) for k in range(n))
        return RolloutBatch(ident.peer_id, SWARM, M.PROTOCOL_VERSION, round=rng.randrange(100),
                            created_at=created_at, seq=seq, model="m", rollouts=rollouts)

    def fresh(self) -> tuple[bytes, Identity]:
        rng = self.rng
        ident = rng.choice(self.idents)
        pid = ident.peer_id
        r = rng.random()
        if r < 0.7:  # the next seq
            self.next_seq[pid] += rng.randint(1, 3)
            seq = self.next_seq[pid]
        elif r < 0.95:  # out of order: inside or just outside the replay window
            seq = max(0, self.next_seq[pid] - rng.randint(0, 2 * WINDOW * 2))
        elif r < 0.98:  # a jump ahead (a restart: seqs are time-based), or back to 0
            if rng.random() < 0.5:
                self.next_seq[pid] += rng.randint(100, 10**6)
            seq = self.next_seq[pid] if rng.random() < 0.5 else 0
        else:  # the edges of the seq range, from a sender of its own (it ends up refused as a replay mostly)
            ident, seq = self.edge, rng.choice([0, 1, M.MAX_INT - 1, M.MAX_INT, rng.randrange(M.MAX_INT)])
        now = self.clock.t
        r = rng.random()
        if r < 0.8:
            created = now - rng.uniform(0, 30)
        elif r < 0.9:  # near the edges of the freshness window
            created = now + rng.choice([-MAX_AGE_S, SKEW_S]) + rng.uniform(-1, 1)
        else:
            created = now + rng.uniform(-5 * MAX_AGE_S, 5 * SKEW_S)
        created = min(max(created, 0.0), float(M.MAX_TIME))
        data = self._seal(self._message(ident, seq, created), ident)
        self.history.append((data, ident))
        self._kept.add(data)
        if len(self.history) > 500:
            old, _ = self.history.pop(self.rng.randrange(len(self.history) - 1))
            self._kept.discard(old)
            self.sealed.pop(old, None)
        return data, ident

    def _seal(self, msg: M.Message, ident: Identity) -> bytes:
        data = seal(msg, ident)
        self.sealed[data] = msg
        return data

    def _check_and_forget(self, data: bytes, from_peer: str) -> None:
        self._check(data, from_peer)
        if data not in self._kept:
            self.sealed.pop(data, None)

    # ------------------------------------------------------------ the input stream

    def next_input(self) -> tuple[bytes, str]:
        rng = self.rng
        r = rng.random()
        if r < 0.01:  # the clock jumps (forward mostly; a stepped-back clock too)
            self.clock.t += rng.choice([MAX_AGE_S + 1, 3 * MAX_AGE_S, -2 * SKEW_S, rng.uniform(0, 100)])
        else:
            self.clock.t += rng.expovariate(20.0)  # ~20 inputs a second: the rate limit bites on bursts
        r = rng.random()
        if r < 0.3 or not self.history:
            data, ident = self.fresh()
            return data, ident.peer_id
        if r < 0.32:  # a burst from one sender: the rate path
            ident = rng.choice(self.idents)
            data = b""
            for _ in range(rng.randint(5, 40)):
                if data:
                    self._check_and_forget(data, ident.peer_id)
                if self.result.inputs >= self._count - 1:
                    break
                self.next_seq[ident.peer_id] += 1
                data = self._seal(self._message(ident, self.next_seq[ident.peer_id], self.clock.t), ident)
            return data, ident.peer_id
        data, ident = rng.choice(self.history[-50:] if rng.random() < 0.7 else self.history)
        if r < 0.322:  # over the size limit
            return data + bytes(M.MAX_MESSAGE_BYTES + 1 - len(data) + rng.randrange(100)), ident.peer_id
        if r < 0.45:  # a replay, from its signer or relayed as someone else's
            return data, ident.peer_id if rng.random() < 0.8 else rng.choice(self.idents).peer_id
        if r < 0.55:  # a stranger publishes someone's envelope (or its own, claimed by another publisher)
            if rng.random() < 0.5:
                return data, self.stranger.peer_id
            return self._seal(self._message(self.stranger, 1, self.clock.t), self.stranger), ident.peer_id
        env = read_envelope(data)
        if r < 0.8:
            other = rng.choice(self.history)[0]
            return byte_mutation(data, other, rng), ident.peer_id
        if r < 0.9:
            body = structural_mutation(env.body, rng)
            signer = ident if rng.random() < 0.9 else self.stranger
            sig = signer.sign(signing_bytes(SWARM, M.PROTOCOL_VERSION, body))
            return encode_envelope(Envelope(body, signer.public_key, sig)), ident.peer_id
        if r < 0.95:
            return envelope_structural_mutation(env, rng), ident.peer_id
        return semantic_mutation(env, ident, self.stranger, rng), ident.peer_id

    # ------------------------------------------------------------ judging

    def _topic(self, msg: M.Message | None, from_peer: str) -> str:
        """Mostly the topic an honest node would use; sometimes a wrong shard, the lobby for a batch, several topics
        at once or a topic of another swarm."""
        rng = self.rng
        sender = msg.sender if msg is not None else from_peer
        hello = isinstance(msg, Hello) if msg is not None else rng.random() < 0.2
        r = rng.random()
        if r < 0.85:
            return LOBBY if hello and rng.random() < 0.5 else TOPICS[home_shard(sender, SHARDS)]
        if r < 0.93:
            return rng.choice(TOPICS + [LOBBY])
        if r < 0.97:
            return "|".join(rng.sample(TOPICS + [LOBBY], 2))
        return rng.choice(["", shard_topic("other", M.PROTOCOL_VERSION, SHARDS, 0), TOPICS[0] + "x"])

    def _check(self, data: bytes, from_peer: str) -> None:
        res, now = self.result, self.clock.t
        res.inputs += 1
        valid_msg = self.sealed.get(data)
        topic = self._topic(valid_msg, from_peer)
        self.model.tick(now)
        expected = "invalid" if valid_msg is None else self.model.verdict(valid_msg, len(data), from_peer, now, topic)
        try:
            msg = self.validator.check(data, from_peer, topic=topic)
        except Rejected as r:
            res.reasons[r.reason] = res.reasons.get(r.reason, 0) + 1
            if r.detail.startswith("unexpected "):
                res.crashes += 1
                res.note(f"masked crash ({r}) on {data[:80].hex()}... from {from_peer}")
            elif expected == "ok":
                res.rejected_valid += 1
                res.note(f"rejected a valid input ({r}) at t={now:.3f}: seq {valid_msg.seq}")
            return
        except BaseException as e:  # noqa: BLE001 - counting exactly these is the point
            if isinstance(e, KeyboardInterrupt):
                raise
            res.crashes += 1
            res.note(f"crash on {data[:80].hex()}... from {from_peer}\n{traceback.format_exc()}")
            return
        if expected == "ok" and msg == valid_msg:
            res.accepted_valid += 1
            self.model.accept(msg, len(data), now)
        else:
            res.accepted_invalid += 1
            res.note(f"accepted an input the model refuses ({expected}) at t={now:.3f}: {data[:80].hex()}...")

    def run(self, count: int) -> ValidatorFuzzResult:
        self._count = count
        t0 = time.perf_counter()
        while self.result.inputs < count:
            data, from_peer = self.next_input()
            self._check_and_forget(data, from_peer)
        self.result.seconds = time.perf_counter() - t0
        return self.result


def run_validator_fuzz(count: int, seed: int = 0, validator: MessageValidator | None = None) -> ValidatorFuzzResult:
    return Harness(seed, validator).run(count)


def report(res: ValidatorFuzzResult) -> int:
    print(f"inputs={res.inputs} crashes={res.crashes} accepted_invalid={res.accepted_invalid}")
    rate = res.inputs / res.seconds if res.seconds else float("inf")
    reasons = " ".join(f"{k}={v}" for k, v in res.reasons.items())
    print(f"throughput={rate:.0f} inputs/s seconds={res.seconds:.1f} accepted_valid={res.accepted_valid} "
          f"rejected_valid={res.rejected_valid} rejected: {reasons}")
    for ex in res.examples:
        print(ex, file=sys.stderr)
    return 0 if res.crashes == 0 and res.accepted_invalid == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return report(run_validator_fuzz(args.count, args.seed))


if __name__ == "__main__":
    sys.exit(main())
