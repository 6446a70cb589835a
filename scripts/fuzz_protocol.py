#!/usr/bin/env python
"""Fuzz the wire protocol: mutated envelopes through read_envelope + verify_envelope.

Prints `inputs=N crashes=K accepted_invalid=M` and a throughput line; exits 1 unless K == M == 0.
A crash is any exception other than ProtocolError. An accepted input is invalid unless its bytes are exactly one of the
original valid envelopes (every structural mutation below is invalid by construction, even when re-signed).

    python scripts/fuzz_protocol.py --count 100000 --seed 0
    python scripts/fuzz_protocol.py --validator --count 100000   # swarm.validator.MessageValidator instead:
                                                                 # see scripts/fuzz_validator.py
"""
from __future__ import annotations

import argparse
import math
import random
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402

from protocol import messages as M  # noqa: E402
from protocol.envelope import (  # noqa: E402
    Envelope, encode_envelope, read_envelope, seal, signing_bytes, verify_envelope)
from protocol.errors import REASONS, ProtocolError  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.messages import Hello, Rollout, RolloutBatch, TaskRef  # noqa: E402

SWARM = "fuzz-swarm"
INT_FIELDS = {"version", "round", "seq", "seed", "index"}
STR_FIELDS = {"sender": M.MAX_PEER_ID_CHARS, "swarm": M.MAX_NAME_CHARS, "model": M.MAX_NAME_CHARS,
              "generator": M.MAX_NAME_CHARS}


# ---------------------------------------------------------------- valid samples

def sample_identities(seed: int = 0) -> tuple[Identity, Identity]:
    rng = random.Random(seed)
    return Identity(rng.randbytes(32)), Identity(rng.randbytes(32))


def sample_messages(identity: Identity, seed: int = 0) -> list[M.Message]:
    """A few valid messages of different shapes: tiny, unicode/config-heavy, no rewards, ~100 KB, empty, hello."""
    rng = random.Random(seed)
    pid = identity.peer_id

    def batch(n_rollouts: int, n_comp: int, chars: int, rewards: bool, seq: int) -> RolloutBatch:
        rollouts = []
        for k in range(n_rollouts):
            task = TaskRef.make("arith", {"digits": 3, "neg": -5, "op": "+ü", "p": 0.25, "hard": k % 2 == 0},
                                seed=rng.randrange(2**40), index=k)
            alphabet = "abc 12+=\n\u00e9\u4e2d\U0001f600"
            comps = tuple("".join(rng.choice(alphabet) for _ in range(rng.randrange(chars + 1))) for _ in range(n_comp))
            rw = tuple(rng.choice([0.0, 1.0, -0.5, 0.125]) for _ in range(n_comp)) if rewards else None
            rollouts.append(Rollout(task, comps, rw))
        return RolloutBatch(pid, SWARM, M.PROTOCOL_VERSION, round=7, created_at=1_700_000_000.25, seq=seq,
                            model="Qwen/Qwen2.5-0.5B", rollouts=tuple(rollouts))

    return [
        batch(1, 1, 8, True, 1),
        batch(4, 4, 40, True, 2),
        batch(3, 2, 20, False, 3),
        batch(48, 8, 200, True, 4),
        batch(0, 1, 0, True, 5),
        Hello(pid, SWARM, M.PROTOCOL_VERSION, round=7, created_at=1_700_000_000.5, seq=6, model="Qwen/Qwen2.5-0.5B",
              listen_addrs=("/ip4/127.0.0.1/tcp/4001", "/ip6/::1/tcp/4001")),
    ]


def sample_envelopes(seed: int = 0) -> list[bytes]:
    ident, _ = sample_identities(seed)
    return [seal(m, ident) for m in sample_messages(ident, seed)]


# ---------------------------------------------------------------- non-canonical msgpack writer

def _pack_loose(obj: Any, widen: int, counter: list[int]) -> bytes:
    """msgpack of `obj`, canonical except the node with index `widen`, which gets a wider/other legal encoding."""
    me = counter[0]
    counter[0] += 1
    w = me == widen
    if obj is None or isinstance(obj, bool):
        return msgpack.packb(obj)
    if isinstance(obj, int):
        if w:
            return (b"\xcf" + struct.pack(">Q", obj)) if obj >= 0 else (b"\xd3" + struct.pack(">q", obj))
        return msgpack.packb(obj)
    if isinstance(obj, float):
        return (b"\xca" + struct.pack(">f", obj)) if w else msgpack.packb(obj)
    if isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        return (b"\xdb" + struct.pack(">I", len(b)) + b) if w else msgpack.packb(obj)
    if isinstance(obj, bytes):
        return (b"\xc6" + struct.pack(">I", len(obj)) + obj) if w else msgpack.packb(obj, use_bin_type=True)
    if isinstance(obj, list):
        head = (b"\xdd" + struct.pack(">I", len(obj))) if w else _array_head(len(obj))
        return head + b"".join(_pack_loose(x, widen, counter) for x in obj)
    if isinstance(obj, dict):
        items = list(obj.items())
        if w and len(items) > 1:  # other legal choice for a map: reversed key order
            items.reverse()
        head = (b"\xdf" + struct.pack(">I", len(items))) if w and len(items) <= 1 else _map_head(len(items))
        return head + b"".join(_pack_loose(k, widen, counter) + _pack_loose(v, widen, counter) for k, v in items)
    raise TypeError(type(obj))


def _array_head(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + struct.pack(">H", n) if n < 65536 else b"\xdd" + struct.pack(">I", n)


def _map_head(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return b"\xde" + struct.pack(">H", n) if n < 65536 else b"\xdf" + struct.pack(">I", n)


def _pack_pairs(pairs: list[tuple[Any, Any]]) -> bytes:
    """A map written from pairs as given: allows duplicate keys."""
    return _map_head(len(pairs)) + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)


def _count_nodes(obj: Any) -> int:
    if isinstance(obj, list):
        return 1 + sum(_count_nodes(x) for x in obj)
    if isinstance(obj, dict):
        return 1 + sum(_count_nodes(k) + _count_nodes(v) for k, v in obj.items())
    return 1


def _is_loose_noop(obj: Any, widen: int) -> bool:
    # widening picks a node whose wide form equals the canonical one only for nil/bool: skip those
    return _pack_loose(obj, widen, [0]) == msgpack.packb(obj, use_bin_type=True)


# ---------------------------------------------------------------- structural mutations (invalid by construction)

def _positions(obj: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every (path, value) in the tree; a path is a tuple of dict keys / list indices."""
    out = [(path, obj)]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_positions(v, path + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_positions(v, path + (i,)))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _bad_values(path: tuple, value: Any) -> list[Any]:
    """Replacement values that are invalid at `path` whatever the rest of the message holds."""
    key = next((p for p in reversed(path) if isinstance(p, str)), None)
    common = [None, [], {}, b"x", msgpack.ExtType(1, b"z")]
    if len(path) >= 2 and path[-2] == "config":  # a config value
        return common + [math.nan, math.inf, 2**64 - 1, "v" * (M.MAX_CONFIG_STR_CHARS + 1)]
    if key == "completions" and isinstance(path[-1], int):
        return common + [5, True, 1.5, "c" * (M.MAX_COMPLETION_CHARS + 1)]
    if key == "rewards" and isinstance(path[-1], int):
        return common + [math.nan, -math.inf, 1e3 + 1, -1e3 - 0.5, 1, True, "1"]
    if key == "listen_addrs" and isinstance(path[-1], int):
        return common + ["", "a" * (M.MAX_ADDR_CHARS + 1), 7]
    if path and path[-1] in INT_FIELDS:
        return common + [-1, 2**63, 2**64 - 1, True, False, 1.0, "1"]
    if path and path[-1] == "created_at":
        return common + [math.nan, math.inf, -1.0, float(M.MAX_TIME) * 2, 1_700_000_000, True, "t"]
    if path and path[-1] in STR_FIELDS:
        return common + ["", "n" * (STR_FIELDS[path[-1]] + 1), 3, True]
    if path and path[-1] == "type":
        return common + ["other", "", 1, "Rollouts"]
    if path and path[-1] in ("rollouts", "listen_addrs"):
        return [None, "x", {}, 3]
    if path and path[-1] == "completions":
        return [None, [], "x", {}, [None]]
    if path and path[-1] == "rewards":
        return [[], "x", {}, 3, [0.0] * (len(value) + 1) if isinstance(value, list) else [0.0] * 99]
    if path and path[-1] == "config":
        return [None, [], "x", 3, {"": 1}, {"k" * (M.MAX_NAME_CHARS + 1): 1}]
    if path and path[-1] in ("task",):
        return [None, [], "x", 3, {}]
    return [None, "x", 3]


def structural_mutation(body: bytes, rng: random.Random) -> bytes:
    """An invalid re-encoding of a valid body (the caller re-signs it, so only the body checks can catch it)."""
    obj = msgpack.unpackb(body, raw=False)
    op = rng.randrange(8)
    positions = _positions(obj)
    if op == 0:  # replace one value by an invalid one
        path, value = rng.choice([p for p in positions if p[0]])
        _set(obj, path, rng.choice(_bad_values(path, value)))
    elif op == 1:  # drop a required field (any map but a task's config)
        maps = [(p, v) for p, v in positions if isinstance(v, dict) and v and (not p or p[-1] != "config")]
        path, m = rng.choice(maps)
        del m[rng.choice(list(m))]
    elif op == 2:  # add an unknown field (any map but config)
        maps = [(p, v) for p, v in positions if isinstance(v, dict) and (not p or p[-1] != "config")]
        path, m = rng.choice(maps)
        m[rng.choice(["zzz", "extra", "Type", "a", ""])] = rng.choice([0, "x", None])
    elif op == 3:  # a non-canonical but otherwise legal encoding of the same valid structure
        n = _count_nodes(obj)
        for _ in range(20):
            widen = rng.randrange(n)
            if not _is_loose_noop(obj, widen):
                return _pack_loose(obj, widen, [0])
        return b"\x80" + body  # fallback: extra leading element (trailing-data style)
    elif op == 4:  # too many items in a list
        lists = [(p, v) for p, v in positions if isinstance(v, list) and v]
        if not lists:
            return msgpack.packb({**obj, "rollouts": [None] * (M.MAX_ROLLOUTS + 1)})
        path, lst = rng.choice(lists)
        limit = {"rollouts": M.MAX_ROLLOUTS, "listen_addrs": M.MAX_ADDRS}.get(path[-1], M.MAX_COMPLETIONS)
        lst.extend([lst[0]] * (limit + 1 - len(lst)))
        if path[-1] == "completions":  # keep rewards the right length so only the count is wrong
            rpath = path[:-1] + ("rewards",)
            if isinstance(_get(obj, rpath), list):
                _set(obj, rpath, [0.0] * len(lst))
    elif op == 5:  # config: unsorted or duplicate keys, or too many items
        configs = [(p, v) for p, v in positions if p and p[-1] == "config"]
        if not configs:
            obj["type"] = "nope"
        else:
            path, cfg = rng.choice(configs)
            pairs = list(cfg.items())
            kind = rng.randrange(3)
            if kind == 0 and len(pairs) >= 2:
                pairs.reverse()
            elif kind == 1 and pairs:
                pairs.append(pairs[0])
            else:
                pairs = [(f"k{i:03d}", i) for i in range(M.MAX_CONFIG_ITEMS + 1)]
            marker = "\x00CFG\x00"
            _set(obj, path, marker)
            raw = msgpack.packb(obj, use_bin_type=True)
            return raw.replace(msgpack.packb(marker), _pack_pairs(pairs), 1)
    elif op == 6:  # rewards length mismatch or empty completions
        rolls = [(p, v) for p, v in positions if isinstance(v, dict) and "completions" in v]
        if not rolls:
            obj["version"] = -1
        else:
            _, r = rng.choice(rolls)
            if r["rewards"] is not None and rng.random() < 0.5:
                r["rewards"] = r["rewards"][:-1] if len(r["rewards"]) > 1 else r["rewards"] + [0.0]
            else:
                r["completions"], r["rewards"] = [], None
    else:  # trailing data or a second object after the body
        return body + rng.choice([b"\x00", b"\xc0", msgpack.packb({"type": "hello"})])
    return msgpack.packb(obj, use_bin_type=True)


def envelope_structural_mutation(env: Envelope, rng: random.Random) -> bytes:
    op = rng.randrange(6)
    d: dict[str, Any] = {"body": env.body, "public_key": env.public_key, "signature": env.signature}
    if op == 0:
        d["extra"] = b""
    elif op == 1:
        del d[rng.choice(list(d))]
    elif op == 2:
        k = rng.choice(list(d))
        d[k] = rng.choice([None, 1, "s", d[k][:-1], d[k] + b"\x00", list(d[k][:3])])
    elif op == 3:
        return _pack_loose(d, rng.randrange(_count_nodes(d)), [0])
    elif op == 4:
        return _pack_pairs([("body", b"x"), *d.items()])  # duplicate key
    else:
        return msgpack.packb(list(d.values()), use_bin_type=True)
    return msgpack.packb(d, use_bin_type=True)


def semantic_mutation(env: Envelope, ident: Identity, other: Identity, rng: random.Random) -> bytes:
    """Well-formed bodies that must still be refused: wrong signer, wrong signed context, other swarm/version."""
    op = rng.randrange(4)
    body = env.body
    if op == 0:  # another key signs the original body, which claims the original sender
        return encode_envelope(Envelope(body, other.public_key,
                                        other.sign(signing_bytes(SWARM, M.PROTOCOL_VERSION, body))))
    if op == 1:  # signed for another swarm or version than the body says
        sig = ident.sign(signing_bytes(rng.choice([SWARM + "x", ""]), M.PROTOCOL_VERSION + rng.randrange(2), body))
        if rng.random() < 0.5:
            sig = ident.sign(signing_bytes(SWARM, M.PROTOCOL_VERSION + 1, body))
        return encode_envelope(Envelope(body, ident.public_key, sig))
    obj = msgpack.unpackb(body, raw=False)
    if op == 2:
        obj["swarm"] = "other-swarm"  # correctly signed, but for a swarm we are not in
    else:
        obj["version"] = M.PROTOCOL_VERSION + 1  # correctly signed, but a protocol version we do not speak
    body = msgpack.packb(obj, use_bin_type=True)
    sig = ident.sign(signing_bytes(obj["swarm"], obj["version"], body))
    return encode_envelope(Envelope(body, ident.public_key, sig))


# ---------------------------------------------------------------- byte-level mutations

def byte_mutation(data: bytes, other: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(9)
    n = len(data)
    b = bytearray(data)
    if op == 0:  # bit flips
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # byte replace
        i = rng.randrange(n)
        b[i] = rng.choice([(b[i] + 1) & 0xFF, (b[i] - 1) & 0xFF, 0x00, 0xFF, rng.randrange(256)])
    elif op == 2:  # insert
        i = rng.randrange(n + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 4))
    elif op == 3:  # delete
        i = rng.randrange(n)
        del b[i:i + rng.randint(1, 4)]
    elif op == 4:  # truncate
        del b[rng.randrange(n):]
    elif op == 5:  # splice two envelopes
        return data[:rng.randrange(n + 1)] + other[rng.randrange(len(other) + 1):]
    elif op == 6:  # duplicate a region
        i = rng.randrange(n)
        j = min(n, i + rng.randint(1, 64))
        k = rng.randrange(n + 1)
        b[k:k] = data[i:j]
    elif op == 7:  # random bytes
        return rng.randbytes(rng.randint(0, 300))
    else:  # random bytes behind a valid-looking envelope header
        return data[:rng.randint(1, 40)] + rng.randbytes(rng.randint(0, 100))
    return bytes(b)


# ---------------------------------------------------------------- driver

@dataclass
class FuzzResult:
    inputs: int = 0
    crashes: int = 0
    accepted_invalid: int = 0
    accepted_valid: int = 0
    reasons: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0


def check_input(data: bytes, valid: frozenset[bytes], result: FuzzResult, swarm: str = SWARM) -> None:
    result.inputs += 1
    try:
        verify_envelope(read_envelope(data), swarm=swarm)
    except ProtocolError as e:
        result.reasons[e.reason] += 1
        return
    except Exception:  # noqa: BLE001 - counting exactly these is the point
        result.crashes += 1
        if len(result.examples) < 5:
            result.examples.append(f"crash on {data[:80].hex()}...\n{traceback.format_exc()}")
        return
    if data in valid:
        result.accepted_valid += 1
    else:
        result.accepted_invalid += 1
        if len(result.examples) < 5:
            result.examples.append(f"accepted invalid input {data[:80].hex()}...")


def generate_inputs(seed: int) -> tuple[frozenset[bytes], Callable[[], bytes]]:
    rng = random.Random(seed)
    ident, other_ident = sample_identities(seed)
    envs = sample_envelopes(seed)
    parsed = [read_envelope(e) for e in envs]
    # keep the ~100 KB sample rare: mutating it costs ~10x the others
    weights = [1.0 if len(e) < 20_000 else 0.15 for e in envs]

    def next_input() -> bytes:
        i = rng.choices(range(len(envs)), weights)[0]
        data, env = envs[i], parsed[i]
        r = rng.random()
        if r < 0.002:  # over the size limit: must be refused before any parsing
            return data + bytes(M.MAX_MESSAGE_BYTES + 1 - len(data) + rng.randrange(100))
        if r < 0.6:
            return byte_mutation(data, rng.choice(envs), rng)
        if r < 0.9:
            body = structural_mutation(env.body, rng)
            signer = ident if rng.random() < 0.9 else other_ident  # other signer: claims the original sender
            swarm_for_sig, version_for_sig = SWARM, M.PROTOCOL_VERSION
            sig = signer.sign(signing_bytes(swarm_for_sig, version_for_sig, body))
            return encode_envelope(Envelope(body, signer.public_key, sig))
        if r < 0.94:
            return envelope_structural_mutation(env, rng)
        if r < 0.98:
            return semantic_mutation(env, ident, other_ident, rng)
        return data  # an unmodified valid envelope must be accepted

    return frozenset(envs), next_input


def run_fuzz(count: int, seed: int = 0) -> FuzzResult:
    valid, next_input = generate_inputs(seed)
    result = FuzzResult()
    t0 = time.perf_counter()
    for _ in range(count):
        check_input(next_input(), valid, result)
    result.seconds = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validator", action="store_true",
                    help="fuzz the stateful gossip validator (fake clock: stale, replay and rate paths too)")
    args = ap.parse_args(argv)
    if args.validator:
        from scripts.fuzz_validator import report, run_validator_fuzz

        return report(run_validator_fuzz(args.count, args.seed))
    res = run_fuzz(args.count, args.seed)
    print(f"inputs={res.inputs} crashes={res.crashes} accepted_invalid={res.accepted_invalid}")
    rate = res.inputs / res.seconds if res.seconds else float("inf")
    reasons = " ".join(f"{k}={v}" for k, v in res.reasons.items())
    print(f"throughput={rate:.0f} inputs/s seconds={res.seconds:.1f} accepted_valid={res.accepted_valid} "
          f"rejected: {reasons}")
    for ex in res.examples:
        print(ex, file=sys.stderr)
    return 0 if res.crashes == 0 and res.accepted_invalid == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
