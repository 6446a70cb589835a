"""Canonical, strict msgpack encoding of messages.

Canonical: one record has exactly one encoding (maps with sorted string keys, minimal ints, float64 floats, no ext
types), so decode() can re-encode and compare bytes: any other spelling of the same data is rejected. Strict: every
field is type-, range- and size-checked; bad input raises ProtocolError and nothing else.
"""
from __future__ import annotations

import math
from typing import Any

import msgpack

from .errors import ProtocolError
from .messages import (
    MAX_ADDR_CHARS,
    MAX_ADDRS,
    MAX_COMPLETION_CHARS,
    MAX_COMPLETIONS,
    MAX_CONFIG_ITEMS,
    MAX_CONFIG_STR_CHARS,
    MAX_INT,
    MAX_MESSAGE_BYTES,
    MAX_NAME_CHARS,
    MAX_PEER_ID_CHARS,
    MAX_ROLLOUTS,
    MAX_TIME,
    Hello,
    Message,
    Rollout,
    RolloutBatch,
    TaskRef,
)

MAX_ABS_REWARD = 1e3
MIN_CONFIG_INT = -(2**63)  # config ints may be negative (e.g. a lower bound), but still fit int64

TYPE_ROLLOUTS = "rollouts"
TYPE_HELLO = "hello"

_BATCH_KEYS = frozenset({"type", "sender", "swarm", "version", "round", "created_at", "seq", "model", "rollouts"})
_HELLO_KEYS = frozenset({"type", "sender", "swarm", "version", "round", "created_at", "seq", "model", "listen_addrs"})
_ROLLOUT_KEYS = frozenset({"task", "completions", "rewards"})
_TASK_KEYS = frozenset({"generator", "config", "seed", "index"})

# Unpacker limits: no container or string in a valid message is larger, so hostile length headers fail early.
_MAX_ARRAY = max(MAX_ROLLOUTS, MAX_COMPLETIONS, MAX_ADDRS)
_MAX_MAP = max(MAX_CONFIG_ITEMS, len(_BATCH_KEYS), len(_HELLO_KEYS))
_MAX_STR_BYTES = 4 * max(MAX_COMPLETION_CHARS, MAX_CONFIG_STR_CHARS, MAX_ADDR_CHARS)  # UTF-8: <= 4 bytes per char


class _DuplicateKey(ValueError):
    pass


def _bad(what: str) -> ProtocolError:
    return ProtocolError("decode", what)


def _no_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _DuplicateKey("duplicate map key")
    return d


# ---- field checks (shared by encode and decode, so we never send what a peer would reject) ----

def _int(v: Any, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(v) is not int or not lo <= v <= hi:  # `type is`: bool is an int subclass and must not pass
        raise _bad(f"{what} must be an int in [{lo}, {hi}]")
    return v


def _float(v: Any, what: str, lo: float, hi: float) -> float:
    if type(v) is not float or not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(f"{what} must be a finite float in [{lo}, {hi}]")
    return v


def _str(v: Any, what: str, max_chars: int, allow_empty: bool = False) -> str:
    if type(v) is not str or len(v) > max_chars or (not allow_empty and not v):
        raise _bad(f"{what} must be a {'' if allow_empty else 'non-empty '}string of at most {max_chars} chars")
    return v


def _list(v: Any, what: str, max_items: int, min_items: int = 0) -> list[Any]:
    if type(v) is not list or not min_items <= len(v) <= max_items:
        raise _bad(f"{what} must be a list of {min_items}..{max_items} items")
    return v


def _map(v: Any, what: str, keys: frozenset[str]) -> dict[str, Any]:
    if type(v) is not dict or v.keys() != keys:
        raise _bad(f"{what} must be a map with exactly the fields {sorted(keys)}")
    return v


def _config_value(v: Any, key: str) -> Any:
    t = type(v)
    if t is bool:
        return v
    if t is int:
        return _int(v, f"config[{key!r}]", MIN_CONFIG_INT, MAX_INT)
    if t is float:
        if not math.isfinite(v):
            raise _bad(f"config[{key!r}] must be finite")
        return v
    if t is str:
        return _str(v, f"config[{key!r}]", MAX_CONFIG_STR_CHARS, allow_empty=True)
    raise _bad(f"config[{key!r}] must be bool, int, float or str")


def _task_from_wire(obj: Any) -> TaskRef:
    m = _map(obj, "task", _TASK_KEYS)
    cfg = m["config"]
    if type(cfg) is not dict or len(cfg) > MAX_CONFIG_ITEMS:
        raise _bad(f"task.config must be a map of at most {MAX_CONFIG_ITEMS} items")
    items = []
    prev = None
    for k, v in cfg.items():  # dict keeps wire order: it must already be sorted
        _str(k, "config key", MAX_NAME_CHARS)
        if prev is not None and k <= prev:
            raise _bad("task.config keys must be unique and sorted")
        prev = k
        items.append((k, _config_value(v, k)))
    return TaskRef(
        generator=_str(m["generator"], "task.generator", MAX_NAME_CHARS),
        config=tuple(items),
        seed=_int(m["seed"], "task.seed"),
        index=_int(m["index"], "task.index"),
    )


def _rollout_from_wire(obj: Any) -> Rollout:
    m = _map(obj, "rollout", _ROLLOUT_KEYS)
    completions = _list(m["completions"], "rollout.completions", MAX_COMPLETIONS, min_items=1)
    for c in completions:
        _str(c, "completion", MAX_COMPLETION_CHARS, allow_empty=True)
    rewards = m["rewards"]
    if rewards is not None:
        _list(rewards, "rollout.rewards", MAX_COMPLETIONS)
        if len(rewards) != len(completions):
            raise _bad("rollout.rewards must have one entry per completion")
        for r in rewards:
            _float(r, "reward", -MAX_ABS_REWARD, MAX_ABS_REWARD)
        rewards = tuple(rewards)
    return Rollout(task=_task_from_wire(m["task"]), completions=tuple(completions), rewards=rewards)


def _common_fields(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(
        sender=_str(obj["sender"], "sender", MAX_PEER_ID_CHARS),
        swarm=_str(obj["swarm"], "swarm", MAX_NAME_CHARS),
        version=_int(obj["version"], "version"),
        round=_int(obj["round"], "round"),
        created_at=_float(obj["created_at"], "created_at", 0.0, float(MAX_TIME)),
        seq=_int(obj["seq"], "seq"),
        model=_str(obj["model"], "model", MAX_NAME_CHARS),
    )


def _from_wire(obj: Any) -> Message:
    if type(obj) is not dict:
        raise _bad("message must be a map")
    kind = obj.get("type")
    if kind == TYPE_ROLLOUTS:
        _map(obj, "rollouts message", _BATCH_KEYS)
        fields = _common_fields(obj)
        rollouts = _list(obj["rollouts"], "rollouts", MAX_ROLLOUTS)
        return RolloutBatch(**fields, rollouts=tuple(_rollout_from_wire(r) for r in rollouts))
    if kind == TYPE_HELLO:
        _map(obj, "hello message", _HELLO_KEYS)
        fields = _common_fields(obj)
        addrs = _list(obj["listen_addrs"], "listen_addrs", MAX_ADDRS)
        for a in addrs:
            _str(a, "listen address", MAX_ADDR_CHARS)
        return Hello(**fields, listen_addrs=tuple(addrs))
    raise _bad("unknown message type")


# ---- record -> wire structure (keys inserted in sorted order: packb keeps dict order) ----

def _as_float(v: Any) -> Any:
    # ints and float subclasses (numpy.float64) go out as plain float64; anything else is left for the checks to refuse
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _seq(v: Any, what: str) -> list[Any]:
    # a str or dict would iterate "successfully" into nonsense: only real sequences are accepted
    if not isinstance(v, (tuple, list)):
        raise _bad(f"{what} must be a tuple")
    return list(v)


def _task_to_wire(t: TaskRef) -> dict[str, Any]:
    pairs = _seq(t.config, "task.config")
    if any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
        raise _bad("task.config must be a tuple of (key, value) pairs (use TaskRef.make)")
    keys = [k for k, _ in pairs]
    if any(type(k) is not str for k in keys) or any(b <= a for a, b in zip(keys, keys[1:])):
        # checked here because the dict below would silently merge duplicate keys
        raise _bad("task.config keys must be unique sorted strings (use TaskRef.make)")
    return {"config": {k: v for k, v in pairs}, "generator": t.generator, "index": t.index, "seed": t.seed}


def _rollout_to_wire(r: Rollout) -> dict[str, Any]:
    rewards = None if r.rewards is None else [_as_float(x) for x in _seq(r.rewards, "rollout.rewards")]
    return {"completions": _seq(r.completions, "rollout.completions"), "rewards": rewards,
            "task": _task_to_wire(r.task)}


def _to_wire(msg: Message) -> dict[str, Any]:
    if isinstance(msg, RolloutBatch):
        return {"created_at": _as_float(msg.created_at), "model": msg.model,
                "rollouts": [_rollout_to_wire(r) for r in _seq(msg.rollouts, "rollouts")], "round": msg.round,
                "sender": msg.sender, "seq": msg.seq, "swarm": msg.swarm, "type": TYPE_ROLLOUTS,
                "version": msg.version}
    if isinstance(msg, Hello):
        return {"created_at": _as_float(msg.created_at), "listen_addrs": _seq(msg.listen_addrs, "listen_addrs"),
                "model": msg.model, "round": msg.round, "sender": msg.sender, "seq": msg.seq,
                "swarm": msg.swarm, "type": TYPE_HELLO, "version": msg.version}
    raise _bad(f"cannot encode {type(msg).__name__}: not a protocol message")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False, strict_types=True)


def encode(msg: Message) -> bytes:
    """Canonical bytes of a message. Refuses (ProtocolError) any record that a peer's decode() would reject."""
    try:
        obj = _to_wire(msg)
        _from_wire(obj)  # same checks as the receiver
        data = _pack(obj)
    except ProtocolError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # e.g. a lone surrogate in a str
        raise _bad(f"cannot encode message: {e}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("size", f"encoded message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    return data


def decode(data: bytes) -> Message:
    """Strictly decode canonical message bytes; raises ProtocolError(reason "size" or "decode") for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad("message must be bytes")
    data = bytes(data)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("size", f"message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, object_pairs_hook=_no_duplicates,
            max_str_len=_MAX_STR_BYTES, max_bin_len=0, max_array_len=_MAX_ARRAY, max_map_len=_MAX_MAP,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types (ExtraData, StackError, UnicodeDecodeError, ValueError...)
        raise _bad(f"not a valid msgpack message: {type(e).__name__}") from None
    msg = _from_wire(obj)
    if _pack(_to_wire(msg)) != data:
        raise _bad("message is not canonically encoded")
    return msg
