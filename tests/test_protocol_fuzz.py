"""Property tests: hostile bytes into decode/open_envelope may only ever raise ProtocolError."""
from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import Hello, ProtocolError, Rollout, RolloutBatch, TaskRef, decode, encode, open_envelope, read_envelope
from protocol import messages as M
from scripts.fuzz_protocol import SWARM, main, run_fuzz, sample_envelopes

ENVELOPES = sample_envelopes(seed=1)
SMALL = [e for e in ENVELOPES if len(e) < 20_000]  # mutating the 100 KB sample is slow and adds little
VALID = frozenset(ENVELOPES)
BODIES = [read_envelope(e).body for e in SMALL]
SETTINGS = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _open_checked(data: bytes) -> None:
    try:
        msg = open_envelope(data, swarm=SWARM)
    except ProtocolError:
        return
    assert data in VALID, "accepted an envelope that is not one of the originals"
    assert msg is not None


def _decode_checked(data: bytes) -> None:
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert encode(msg) == data  # anything accepted is canonical


@st.composite
def mutated(draw, sources: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(sources)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == 1 and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3:
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes_into_open_envelope(data):
    _open_checked(data)


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes_into_decode(data):
    _decode_checked(data)


@SETTINGS
@given(mutated(SMALL))
def test_mutated_envelopes_into_open_envelope(data):
    _open_checked(data)


@SETTINGS
@given(mutated(BODIES))
def test_mutated_bodies_into_decode(data):
    _decode_checked(data)


# msgpack objects of arbitrary shape (right-looking keys included): decode must refuse them cleanly
_KEYS = st.sampled_from(["type", "sender", "swarm", "version", "round", "created_at", "seq", "model", "rollouts",
                         "listen_addrs", "task", "completions", "rewards", "config", "generator", "seed", "index"])
_LEAF = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
         | st.binary(max_size=8) | st.sampled_from(["rollouts", "hello"]))
_TREE = st.recursive(_LEAF, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_KEYS | st.text(max_size=3),
                                                                                        kids, max_size=9),
                     max_leaves=30)


@SETTINGS
@given(_TREE)
def test_structured_msgpack_into_decode(obj):
    _decode_checked(msgpack.packb(obj, use_bin_type=True))


def test_fuzz_driver_finds_no_crash_and_no_accepted_invalid():
    res = run_fuzz(3000, seed=11)
    assert res.inputs == 3000
    assert res.crashes == 0, res.examples
    assert res.accepted_invalid == 0, res.examples
    assert res.accepted_valid > 0  # unmodified envelopes still pass
    assert all(res.reasons[r] > 0 for r in ("decode", "signature", "sender", "swarm", "version"))


def test_fuzz_script_output_and_exit_code(capsys):
    assert main(["--count", "300", "--seed", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "inputs=300 crashes=0 accepted_invalid=0"


# valid records of random content: always round trip to equal records and identical bytes
_NAME = st.text(min_size=1, max_size=M.MAX_NAME_CHARS)
_U63 = st.integers(0, M.MAX_INT)
_CFG_VALUE = (st.booleans() | st.integers(-(2**63), M.MAX_INT) | st.floats(allow_nan=False, allow_infinity=False)
              | st.text(max_size=M.MAX_CONFIG_STR_CHARS))
_TASK = st.builds(TaskRef.make, _NAME, st.dictionaries(_NAME, _CFG_VALUE, max_size=6), _U63, _U63)


@st.composite
def _rollout(draw) -> Rollout:
    comps = draw(st.lists(st.text(max_size=50), min_size=1, max_size=6))
    rewards = draw(st.none() | st.lists(st.floats(-1e3, 1e3), min_size=len(comps), max_size=len(comps)))
    return Rollout(draw(_TASK), tuple(comps), None if rewards is None else tuple(rewards))


_COMMON = dict(sender=st.text(min_size=1, max_size=M.MAX_PEER_ID_CHARS), swarm=_NAME, version=_U63, round=_U63,
               created_at=st.floats(0.0, float(M.MAX_TIME)), seq=_U63, model=_NAME)
_MESSAGES = (st.builds(RolloutBatch, rollouts=st.lists(_rollout(), max_size=4).map(tuple), **_COMMON)
             | st.builds(Hello, listen_addrs=st.lists(st.text(min_size=1, max_size=40), max_size=4).map(tuple),
                         **_COMMON))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_MESSAGES)
def test_valid_records_round_trip_canonically(msg):
    data = encode(msg)
    back = decode(data)
    assert back == msg
    assert encode(back) == data


def test_fuzz_harness_detects_crashes_and_accepted_invalid(monkeypatch, capsys):
    import scripts.fuzz_protocol as fz

    monkeypatch.setattr(fz, "verify_envelope", lambda env, swarm: None)  # a verifier that accepts everything
    assert fz.main(["--count", "200", "--seed", "3"]) == 1
    assert "accepted_invalid=0" not in capsys.readouterr().out

    def boom(env, swarm):
        raise KeyError("bug")

    monkeypatch.setattr(fz, "verify_envelope", boom)
    res = fz.run_fuzz(200, seed=3)
    assert res.crashes > 0 and res.accepted_invalid == 0
    assert res.crashes + sum(res.reasons.values()) == 200


def test_protocol_error_reasons_and_copy():
    import copy

    e = ProtocolError("size")
    assert e.reason == "size" and isinstance(e, ValueError) and str(e)
    c = copy.deepcopy(ProtocolError("sender", "bad key"))
    assert c.reason == "sender" and str(c) == "bad key"
    try:
        ProtocolError("other", "x")
    except ValueError as err:
        assert "unknown" in str(err)
    else:
        raise AssertionError("unknown reason accepted")
