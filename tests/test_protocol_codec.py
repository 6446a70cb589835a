"""Canonical strict msgpack codec: round trips, canonical form, and every rejection class."""
from __future__ import annotations

import math
import struct

import msgpack
import pytest

from protocol import Hello, ProtocolError, Rollout, RolloutBatch, TaskRef, decode, encode
from protocol import messages as M

PID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def batch(**kw) -> RolloutBatch:
    base = dict(sender=PID, swarm="s1", version=1, round=3, created_at=1_700_000_000.5, seq=42, model="m",
                rollouts=(Rollout(TaskRef.make("arith", {"digits": 3, "op": "+"}, 7, 0), ("a", "b"), (1.0, 0.0)),))
    base.update(kw)
    return RolloutBatch(**base)


def hello(**kw) -> Hello:
    base = dict(sender=PID, swarm="s1", version=1, round=0, created_at=0.0, seq=1, model="m",
                listen_addrs=("/ip4/127.0.0.1/tcp/1",))
    base.update(kw)
    return Hello(**base)


def wire(msg) -> dict:
    return msgpack.unpackb(encode(msg), raw=False)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def rejected(data: bytes, reason: str = "decode") -> ProtocolError:
    with pytest.raises(ProtocolError) as ei:
        decode(data)
    assert ei.value.reason == reason
    return ei.value


# ---------------------------------------------------------------- round trips

def test_round_trip_both_types_and_canonical_bytes():
    for msg in (batch(), hello()):
        data = encode(msg)
        assert decode(data) == msg
        assert encode(decode(data)) == data
        assert encode(msg) == data  # deterministic


def test_wire_layout_is_sorted_maps_with_type_key():
    w = wire(batch())
    assert list(w) == sorted(w) and w["type"] == "rollouts"
    r = w["rollouts"][0]
    assert list(r) == ["completions", "rewards", "task"]
    assert list(r["task"]) == ["config", "generator", "index", "seed"]
    assert r["task"]["config"] == {"digits": 3, "op": "+"}
    assert wire(hello())["type"] == "hello"
    # created_at is float64 on the wire (0xcb), even when it is integral
    data = encode(hello(created_at=5.0))
    assert b"\xcb" + struct.pack(">d", 5.0) in data


def test_unicode_and_config_value_types_round_trip():
    task = TaskRef.make("gén", {"b": True, "i": -(2**63), "f": -0.5, "s": "中文😀", "z": M.MAX_INT}, 2**63 - 1, 0)
    msg = batch(model="模型/ü", rollouts=(Rollout(task, ("", "😀" * 10, "\x00\n"), None),))
    back = decode(encode(msg))
    assert back == msg
    cfg = back.rollouts[0].task.config
    assert [type(v) for _, v in cfg] == [bool, float, int, str, int]  # types survive (True is not 1)


def test_edge_limits_accepted():
    long = "x" * M.MAX_COMPLETION_CHARS
    wide = "😀" * M.MAX_COMPLETION_CHARS  # 4 UTF-8 bytes per char: the char limit, not bytes, applies
    cfg = {f"k{i:02d}": "v" * M.MAX_CONFIG_STR_CHARS for i in range(M.MAX_CONFIG_ITEMS)}
    msg = batch(
        sender="p" * M.MAX_PEER_ID_CHARS, swarm="s" * M.MAX_NAME_CHARS, version=M.MAX_INT, round=M.MAX_INT,
        seq=M.MAX_INT, created_at=float(M.MAX_TIME), model="m" * M.MAX_NAME_CHARS,
        rollouts=(Rollout(TaskRef.make("g" * M.MAX_NAME_CHARS, cfg, M.MAX_INT, M.MAX_INT), (long, wide),
                          (1e3, -1e3)),),
    )
    assert decode(encode(msg)) == msg
    many = batch(rollouts=tuple(Rollout(TaskRef.make("g", None, 0, i), ("c",) * M.MAX_COMPLETIONS, None)
                                for i in range(M.MAX_ROLLOUTS)))
    assert decode(encode(many)) == many
    h = hello(listen_addrs=tuple("a" * M.MAX_ADDR_CHARS for _ in range(M.MAX_ADDRS)), created_at=0.0)
    assert decode(encode(h)) == h
    assert decode(encode(batch(rollouts=()))).rollouts == ()  # an empty batch is legal
    assert decode(encode(hello(listen_addrs=()))).listen_addrs == ()


def test_encode_normalises_int_floats_and_float_subclasses():
    class F(float):
        pass

    msg = batch(created_at=1_700_000_000, rollouts=(Rollout(TaskRef.make("g", None, 0, 0), ("a",), (F(1.0),)),))
    back = decode(encode(msg))
    assert type(back.created_at) is float and back.created_at == 1.7e9
    assert type(back.rollouts[0].rewards[0]) is float


# ---------------------------------------------------------------- decode rejections

def mutate_wire(msg, fn) -> bytes:
    w = wire(msg)
    fn(w)
    return pack(w)


@pytest.mark.parametrize("field,value", [
    ("version", True), ("round", False), ("seq", -1), ("seq", 2**63), ("seq", 2**64 - 1), ("round", 1.0),
    ("version", "1"), ("version", None), ("created_at", 5), ("created_at", math.nan), ("created_at", math.inf),
    ("created_at", -1.0), ("created_at", float(M.MAX_TIME) * 2), ("sender", ""), ("sender", 5),
    ("swarm", "s" * (M.MAX_NAME_CHARS + 1)), ("model", b"m"), ("model", ["m"]), ("type", "other"), ("type", 1),
    ("rollouts", {}), ("rollouts", "x"), ("rollouts", [None]),
])
def test_rejects_bad_top_level_fields(field, value):
    rejected(mutate_wire(batch(), lambda w: w.__setitem__(field, value)))


@pytest.mark.parametrize("field,value", [
    ("seed", -1), ("index", True), ("generator", ""), ("generator", 3), ("config", []), ("config", None),
])
def test_rejects_bad_task_fields(field, value):
    rejected(mutate_wire(batch(), lambda w: w["rollouts"][0]["task"].__setitem__(field, value)))


@pytest.mark.parametrize("value", [None, [1], b"x", {"a": 1}, math.nan, -math.inf, 2**64 - 1,
                                   "v" * (M.MAX_CONFIG_STR_CHARS + 1)])
def test_rejects_bad_config_values(value):
    rejected(mutate_wire(batch(), lambda w: w["rollouts"][0]["task"]["config"].__setitem__("digits", value)))


def test_rejects_missing_and_unknown_fields():
    for path in ([], ["rollouts", 0], ["rollouts", 0, "task"]):
        def target(w, path=path):
            for p in path:
                w = w[p]
            return w

        for key in list(target(wire(batch()))):
            rejected(mutate_wire(batch(), lambda w, key=key, t=target: t(w).pop(key)))
        rejected(mutate_wire(batch(), lambda w, t=target: t(w).__setitem__("zzz", 0)))
    rejected(mutate_wire(hello(), lambda w: w.__setitem__("rollouts", [])))  # a batch field in a hello
    rejected(mutate_wire(hello(), lambda w: w.pop("listen_addrs")))


def test_rejects_rewards_problems():
    r = lambda fn: mutate_wire(batch(), lambda w: fn(w["rollouts"][0]))  # noqa: E731
    rejected(r(lambda x: x.__setitem__("rewards", [1.0])))  # length != completions
    rejected(r(lambda x: x.__setitem__("rewards", [1.0, 0.0, 0.0])))
    rejected(r(lambda x: x.__setitem__("rewards", [1.0, math.nan])))
    rejected(r(lambda x: x.__setitem__("rewards", [1.0, math.inf])))
    rejected(r(lambda x: x.__setitem__("rewards", [1.0, 1000.5])))
    rejected(r(lambda x: x.__setitem__("rewards", [1.0, -1000.5])))
    rejected(r(lambda x: x.__setitem__("rewards", [1.0, 1])))  # int, not float
    rejected(r(lambda x: x.__setitem__("rewards", [1.0, True])))
    rejected(r(lambda x: x.__setitem__("rewards", "ab")))
    rejected(r(lambda x: x.update(completions=[], rewards=None)))  # empty completions
    rejected(r(lambda x: x.update(completions=["a", 1], rewards=None)))
    rejected(r(lambda x: x.update(completions=["c" * (M.MAX_COMPLETION_CHARS + 1)], rewards=None)))


def test_rejects_too_many_items():
    ro = wire(batch())["rollouts"][0]
    rejected(mutate_wire(batch(), lambda w: w.__setitem__("rollouts", [ro] * (M.MAX_ROLLOUTS + 1))))
    rejected(mutate_wire(batch(), lambda w: w["rollouts"][0].update(
        completions=["c"] * (M.MAX_COMPLETIONS + 1), rewards=None)))
    rejected(mutate_wire(hello(), lambda w: w.__setitem__("listen_addrs", ["a"] * (M.MAX_ADDRS + 1))))
    rejected(mutate_wire(hello(), lambda w: w.__setitem__("listen_addrs", [""])))
    rejected(mutate_wire(hello(), lambda w: w.__setitem__("listen_addrs", ["a" * (M.MAX_ADDR_CHARS + 1)])))
    cfg = {f"k{i:02d}": i for i in range(M.MAX_CONFIG_ITEMS + 1)}
    rejected(mutate_wire(batch(), lambda w: w["rollouts"][0]["task"].__setitem__("config", cfg)))


def _with_config_pairs(pairs: list[tuple]) -> bytes:
    marker = "\x00marker\x00"
    data = mutate_wire(batch(), lambda w: w["rollouts"][0]["task"].__setitem__("config", marker))
    head = bytes([0x80 | len(pairs)])
    return data.replace(pack(marker), head + b"".join(pack(k) + pack(v) for k, v in pairs))


def test_rejects_unsorted_and_duplicate_config_and_duplicate_map_keys():
    assert decode(_with_config_pairs([("a", 1), ("b", 2)])).rollouts[0].task.config == (("a", 1), ("b", 2))
    e = rejected(_with_config_pairs([("b", 1), ("a", 2)]))
    assert "sorted" in str(e)
    rejected(_with_config_pairs([("a", 1), ("a", 1)]))
    rejected(_with_config_pairs([("", 1)]))
    rejected(_with_config_pairs([("k" * (M.MAX_NAME_CHARS + 1), 1)]))
    rejected(_with_config_pairs([(1, 1)]))  # non-string key
    data = encode(hello())
    dup = b"\x8a" + data[1:] + pack("seq") + pack(1)  # the top map with "seq" written twice
    rejected(dup)


def test_rejects_non_canonical_encodings():
    data = encode(hello())
    w = wire(hello())
    rejected(pack(dict(reversed(list(w.items())))))  # unsorted keys
    rejected(msgpack.packb(w, use_single_float=True))  # float32
    # an int written wider than needed: seq=1 as uint64
    wide = data.replace(pack("seq") + b"\x01", pack("seq") + b"\xcf" + struct.pack(">Q", 1))
    assert wide != data
    rejected(wide)
    # a short string as str8 instead of fixstr
    s8 = data.replace(pack("model") + pack("m"), pack("model") + b"\xd9\x01m")
    assert s8 != data
    rejected(s8)
    # a map header as map16
    rejected(b"\xde\x00" + bytes([data[0] & 0x0F]) + data[1:])


def test_rejects_garbage_trailing_and_wrong_containers():
    data = encode(batch())
    rejected(data + b"\x00")
    rejected(data[:-1])
    rejected(b"")
    rejected(b"\xc1")  # never-used msgpack byte
    rejected(pack([1, 2]))
    rejected(pack("hello"))
    rejected(pack({"type": "hello"}))
    rejected(msgpack.packb(msgpack.ExtType(1, b"x")))
    rejected(b"\x91" * 100_000)  # deep nesting: msgpack's stack limit, not a RecursionError
    rejected(b"\xdd\xff\xff\xff\xff")  # array header claiming 4G items, no allocation
    rejected(b"\xdb\xff\xff\xff\xff")  # str header claiming 4 GB
    with pytest.raises(ProtocolError):
        decode("not bytes")  # type: ignore[arg-type]


def test_rejects_invalid_utf8():
    data = encode(hello(model="mm"))
    bad = data.replace(pack("mm"), b"\xa2\xff\xfe")
    assert bad != data
    rejected(bad)
    rejected(data.replace(pack("mm"), b"\xa2\xed\xa0"))  # surrogate half


def test_rejects_oversized_input_with_size_reason():
    rejected(b"\x00" * (M.MAX_MESSAGE_BYTES + 1), reason="size")


# ---------------------------------------------------------------- encode refuses what peers would reject

@pytest.mark.parametrize("msg", [
    batch(seq=-1), batch(version=True), batch(created_at=math.nan), batch(created_at=-1.0), batch(sender=""),
    batch(model="m" * (M.MAX_NAME_CHARS + 1)),
    batch(rollouts=(Rollout(TaskRef.make("g", None, 0, 0), (), None),)),
    batch(rollouts=(Rollout(TaskRef.make("g", None, 0, 0), ("a", "b"), (1.0,)),)),
    batch(rollouts=(Rollout(TaskRef.make("g", None, 0, 0), ("a",), (1e4,)),)),
    batch(rollouts=(Rollout(TaskRef("g", (("b", 1), ("a", 2)), 0, 0), ("a",), None),)),  # unsorted config
    batch(rollouts=(Rollout(TaskRef("g", (("a", 1), ("a", 2)), 0, 0), ("a",), None),)),  # duplicate key
    batch(rollouts=(Rollout(TaskRef("g", {"ab": 1}, 0, 0), ("a",), None),)),  # dict instead of pairs
    batch(rollouts=(Rollout(TaskRef.make("g", {"x": None}, 0, 0), ("a",), None),)),
    batch(rollouts=(Rollout(TaskRef.make("g", {"x": -(2**63) - 1}, 0, 0), ("a",), None),)),
    batch(seq=2**70),
    batch(rollouts=(Rollout(TaskRef.make("g", None, 0, 0), "abc", None),)),  # a str is not a tuple
    batch(rollouts=(Rollout(TaskRef.make("g", None, 0, 0), ("\ud800",), None),)),  # lone surrogate
    batch(rollouts=(Rollout(TaskRef.make("g", None, 0, 0), ("c",) * (M.MAX_COMPLETIONS + 1), None),)),
    hello(listen_addrs="/ip4/1.2.3.4/tcp/1"),
    "not a message",
])
def test_encode_refuses_invalid_records(msg):
    with pytest.raises(ProtocolError) as ei:
        encode(msg)
    assert ei.value.reason == "decode"


def test_encode_refuses_oversized_message():
    big = "x" * M.MAX_COMPLETION_CHARS
    msg = batch(rollouts=tuple(Rollout(TaskRef.make("g", None, 0, i), (big,) * 8, None) for i in range(8)))
    with pytest.raises(ProtocolError) as ei:
        encode(msg)
    assert ei.value.reason == "size"


def test_protocol_package_is_pure():
    import subprocess
    import sys

    code = ("import sys, protocol, protocol.codec, protocol.envelope, protocol.identity; "
            "bad = [m for m in ('torch', 'transformers', 'libp2p', 'trio') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
