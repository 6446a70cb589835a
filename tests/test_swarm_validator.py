"""MessageValidator and PeerStanding: every rejection reason, in order, with a fake clock. No network."""
from __future__ import annotations

import pytest

from protocol.envelope import seal
from protocol.identity import Identity
from protocol.messages import PROTOCOL_VERSION, Hello
from tests.doubles import bad_envelopes, dummy_rollouts, forge_signature, make_batch
from swarm.validator import REASONS, MessageValidator, PeerStanding, RateLimit, Rejected

SWARM = "test"
NOW = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ident() -> Identity:
    return Identity(bytes(range(32)))


def validator(clock: Clock, **kw) -> MessageValidator:
    return MessageValidator(SWARM, PROTOCOL_VERSION, clock=clock, **kw)


def sealed(ident: Identity, seq: int, created_at: float = NOW, **kw) -> bytes:
    return seal(make_batch(ident, SWARM, seq=seq, created_at=created_at, **kw), ident)


def reason(v: MessageValidator, data: bytes, from_peer: str) -> str:
    with pytest.raises(Rejected) as e:
        v.check(data, from_peer)
    return e.value.reason


def test_accepts_good_batch_and_hello(ident: Identity) -> None:
    v = validator(Clock())
    msg = v.check(sealed(ident, 1), ident.peer_id)
    assert msg.sender == ident.peer_id and msg.seq == 1 and len(msg.rollouts) == 1
    hello = Hello(ident.peer_id, SWARM, PROTOCOL_VERSION, 3, NOW, 2, "m", ("/ip4/127.0.0.1/tcp/1",))
    assert v.check(seal(hello, ident), ident.peer_id) == hello
    assert v.accepted == 2 and sum(v.counts.values()) == 0


@pytest.mark.parametrize("kind,expected", [
    ("size", "size"), ("decode", "decode"), ("signature", "signature"), ("tampered", "signature"),
    ("sender", "sender"), ("swarm", "swarm"), ("version", "version"), ("stale", "stale"),
])
def test_each_bad_envelope_has_its_reason(ident: Identity, kind: str, expected: str) -> None:
    clock = Clock()
    import time
    clock.t = time.time()  # bad_envelopes uses the wall clock
    v = validator(clock)
    assert reason(v, bad_envelopes(ident, SWARM)[kind], ident.peer_id) == expected
    assert v.counts[expected] == 1 and sum(v.counts.values()) == 1


def test_reason_order(ident: Identity) -> None:
    v = validator(Clock())
    other = Identity.generate()
    # a forged signature wins over a sender mismatch (signature is checked first)
    assert reason(v, forge_signature(sealed(ident, 1)), other.peer_id) == "signature"
    # a well-signed wrong-swarm message from someone other than the libp2p publisher: sender before swarm
    wrong_swarm = seal(make_batch(ident, "elsewhere", seq=1, created_at=NOW), ident)
    assert reason(v, wrong_swarm, other.peer_id) == "sender"
    assert reason(v, wrong_swarm, ident.peer_id) == "swarm"
    # wrong swarm AND stale: swarm first
    old_wrong = seal(make_batch(ident, "elsewhere", seq=1, created_at=NOW - 10_000), ident)
    assert reason(v, old_wrong, ident.peer_id) == "swarm"
    # stale before replay; replay before rate
    v.check(sealed(ident, 5), ident.peer_id)
    assert reason(v, sealed(ident, 5, created_at=NOW - 10_000), ident.peer_id) == "stale"
    assert v.counts == {**{r: 0 for r in REASONS}, "signature": 1, "sender": 1, "swarm": 2, "stale": 1}


def test_stale_window_bounds(ident: Identity) -> None:
    clock = Clock()
    v = validator(clock, max_age_s=900, max_clock_skew_s=60)
    assert v.check(sealed(ident, 1, created_at=NOW - 900), ident.peer_id)
    assert v.check(sealed(ident, 2, created_at=NOW + 60), ident.peer_id)
    assert reason(v, sealed(ident, 3, created_at=NOW - 900.5), ident.peer_id) == "stale"
    assert reason(v, sealed(ident, 4, created_at=NOW + 60.5), ident.peer_id) == "stale"
    clock.t += 1000  # the same message later is stale
    assert reason(v, sealed(ident, 5, created_at=NOW), ident.peer_id) == "stale"


def test_a_delayed_honest_batch_is_accepted_however_many_newer_ones_came_first(ident: Identity) -> None:
    """The replay window is in time, not a count: the old 64-seq window refused batch 8 below (8 delayed honest
    batches were refused that way in a loaded 16-node run, docs/scale.md)."""
    clock = Clock()
    v = validator(clock, rate=RateLimit(1e9, 1e9, 1e12, 1e12, probation_s=0))
    delayed = sealed(ident, 8, created_at=NOW - 1)
    for s in range(10, 210):  # 200 newer messages first
        clock.t += 0.5
        v.check(sealed(ident, s, created_at=clock.t), ident.peer_id)
    assert v.check(delayed, ident.peer_id).seq == 8  # 100 s late, 200 seqs behind: accepted
    assert reason(v, delayed, ident.peer_id) == "replay"  # ... once
    assert reason(v, sealed(ident, 150, created_at=NOW + 70), ident.peer_id) == "replay"  # a seq reused: refused
    assert v.counts["replay"] == 2


def test_every_replay_is_refused_while_it_is_fresh_even_after_the_clock_steps_back(ident: Identity) -> None:
    clock = Clock()
    v = validator(clock, max_age_s=900, max_clock_skew_s=60)
    first = sealed(ident, 1, created_at=NOW)
    v.check(first, ident.peer_id)
    for dt in (10, 500, 899):  # a copy any time within max_age_s: replay
        clock.t = NOW + dt
        assert reason(v, first, ident.peer_id) == "replay"
    clock.t = NOW + 901  # aged out: a copy is stale, and the entry goes at the sender's next message (bounded memory)
    assert reason(v, first, ident.peer_id) == "stale"
    v.check(sealed(ident, 2, created_at=NOW + 900), ident.peer_id)
    assert v._remembered == 1
    clock.t = NOW + 100  # our clock steps back: the copy is fresh again, but still refused as a replay
    assert reason(v, first, ident.peer_id) == "replay"
    assert v.check(sealed(ident, 3, created_at=NOW + 50), ident.peer_id).seq == 3  # newer than what aged out: fine


def test_replay_memory_is_capped_and_copies_of_what_it_dropped_are_still_refused(ident: Identity) -> None:
    v = validator(Clock(), replay_per_sender=4, rate=RateLimit(1e9, 1e9, 1e12, 1e12, probation_s=0))
    msgs = [sealed(ident, s, created_at=NOW - 10 + s) for s in range(6)]
    for m in msgs:
        v.check(m, ident.peer_id)
    assert v._remembered == 4  # the two oldest were dropped early
    for m in msgs:
        assert reason(v, m, ident.peer_id) == "replay"
    # the price of the bound: an unseen batch older than what was dropped is refused too
    assert reason(v, sealed(ident, 99, created_at=NOW - 10), ident.peer_id) == "replay"
    assert v.check(sealed(ident, 100, created_at=NOW), ident.peer_id).seq == 100


def test_replays_stay_refused_when_the_sender_lru_evicts_a_sender(ident: Identity) -> None:
    v = validator(Clock(), max_senders=1, rate=RateLimit(1e9, 1e9, 1e12, 1e12, probation_s=0))
    other = Identity(bytes(range(2, 34)))
    mine = sealed(ident, 1, created_at=NOW - 5)
    v.check(mine, ident.peer_id)
    v.check(sealed(other, 1), other.peer_id)  # evicts ident's state
    assert reason(v, mine, ident.peer_id) == "replay"
    assert v.check(sealed(ident, 2, created_at=NOW), ident.peer_id).seq == 2


def test_total_replay_memory_is_bounded() -> None:
    v = validator(Clock(), replay_per_sender=8, replay_total=20, rate=RateLimit(1e9, 1e9, 1e12, 1e12, probation_s=0,
                                                                              new_senders_burst=1e6))
    senders = [Identity(bytes([i]) * 32) for i in range(10)]
    for i, sender in enumerate(senders):
        for s in range(5):
            v.check(sealed(sender, s, created_at=NOW - 100 + i + s / 10), sender.peer_id)
    assert v._remembered <= 20 and len(v._senders) <= 5
    for sender in senders:  # evicted or not, no copy gets through
        assert reason(v, sealed(sender, 0, created_at=NOW - 100 + senders.index(sender)), sender.peer_id) == "replay"


def _on_shard(shard: int, shards: int) -> Identity:
    from swarm.shards import home_shard

    i = 0
    while True:
        ident = Identity(i.to_bytes(4, "big") * 8)
        if home_shard(ident.peer_id, shards) == shard:
            return ident
        i += 1


def test_topic_rules_of_a_sharded_swarm() -> None:
    from swarm.shards import lobby_topic, shard_topic

    v = validator(Clock(), shards=4)
    topics = [shard_topic(SWARM, PROTOCOL_VERSION, 4, i) for i in range(4)]
    lobby = lobby_topic(SWARM, PROTOCOL_VERSION, 4)
    a = _on_shard(1, 4)

    def hello(seq: int) -> bytes:
        return seal(Hello(a.peer_id, SWARM, PROTOCOL_VERSION, 3, NOW, seq, "m", ("/ip4/127.0.0.1/tcp/1",)), a)

    def topic_reason(data: bytes, topic: str) -> str:
        with pytest.raises(Rejected) as e:
            v.check(data, a.peer_id, topic=topic)
        return e.value.reason

    assert v.check(sealed(a, 1), a.peer_id, topic=topics[1]).seq == 1  # its home shard
    assert v.check(hello(2), a.peer_id, topic=topics[1]).seq == 2
    assert v.check(hello(3), a.peer_id, topic=lobby).seq == 3
    assert topic_reason(sealed(a, 4), topics[2]) == "topic"  # a batch off its home shard
    assert topic_reason(hello(5), topics[0]) == "topic"  # a Hello too
    assert topic_reason(sealed(a, 6), lobby) == "topic"  # only Hellos on the lobby
    assert topic_reason(hello(7), f"{topics[1]}|{lobby}") == "topic"  # one message, several topics
    assert topic_reason(sealed(a, 8), "swarm-node/other/v1/s4/1") == "topic"
    assert v.check(sealed(a, 9), a.peer_id).seq == 9  # no topic given: not checked
    # hard: decided after the signature, before the soft checks; a stale batch on the wrong shard is "topic", verified
    with pytest.raises(Rejected) as e:
        v.check(sealed(a, 10, created_at=NOW - 10_000), a.peer_id, topic=topics[0])
    assert e.value.reason == "topic" and e.value.verified
    assert v.counts["topic"] == 6
    # unsharded: the one topic carries everything, as before
    v1 = validator(Clock())
    assert v1.check(sealed(a, 1), a.peer_id, topic=shard_topic(SWARM, PROTOCOL_VERSION, 1, 0)).seq == 1
    assert "topic" in __import__("swarm.validator", fromlist=["HARD_REASONS"]).HARD_REASONS


def test_rate_limit_messages_and_bytes(ident: Identity) -> None:
    clock = Clock()
    # probation_s=0: an established sender with its full burst (newcomers: test_sybil_* below)
    v = validator(clock, rate=RateLimit(msgs_per_s=2, msgs_burst=3, bytes_per_s=1e9, bytes_burst=1e9, probation_s=0))
    for s in range(3):
        v.check(sealed(ident, s + 1), ident.peer_id)
    assert reason(v, sealed(ident, 4), ident.peer_id) == "rate"
    clock.t += 0.5  # +1 token
    v.check(sealed(ident, 5), ident.peer_id)
    assert reason(v, sealed(ident, 6), ident.peer_id) == "rate"
    # a rate-rejected seq was not recorded: it may come again once there is budget
    clock.t += 1
    v.check(sealed(ident, 6), ident.peer_id)

    big = sealed(ident, 100, rollouts=dummy_rollouts(1, text="x" * 10_000))
    vb = validator(clock, rate=RateLimit(msgs_per_s=1e6, msgs_burst=1e6, bytes_per_s=len(big), bytes_burst=2 * len(big),
                                         probation_s=0))
    vb.check(big, ident.peer_id)
    vb.check(sealed(ident, 101, rollouts=dummy_rollouts(1, text="x" * 10_000)), ident.peer_id)
    assert reason(vb, sealed(ident, 102, rollouts=dummy_rollouts(1, text="x" * 10_000)), ident.peer_id) == "rate"
    clock.t += 1.0
    vb.check(sealed(ident, 103, rollouts=dummy_rollouts(1, text="x" * 10_000)), ident.peer_id)
    # buckets are per sender: another sender is unaffected
    other = Identity.generate()
    vb.check(seal(make_batch(other, SWARM, seq=1, created_at=clock.t), other), other.peer_id)


def test_sender_lru_is_bounded(ident: Identity) -> None:
    v = validator(Clock(), max_senders=3)
    ids = [Identity.generate() for _ in range(5)]
    for i in ids:
        v.check(seal(make_batch(i, SWARM, seq=1, created_at=NOW), i), i.peer_id)
    assert len(v._senders) == 3


@pytest.mark.parametrize("junk", [b"", b"\x00", b"\x80" * 50, "text", None, 12, b"\x93\x01\x02\x03", b"\xde\xff\xff"])
def test_never_raises_anything_but_rejected(ident: Identity, junk: object) -> None:
    v = validator(Clock())
    with pytest.raises(Rejected):
        v.check(junk, ident.peer_id)  # type: ignore[arg-type]


def test_peer_standing_threshold_window_and_expiry() -> None:
    clock = Clock(0.0)
    s = PeerStanding(threshold=3, window_s=10, ban_s=100, clock=clock)
    # hard reasons strike publisher and forwarder; soft ones only a publisher that sent the message itself
    assert s.on_rejection("signature", "pub", "fwd") == []
    assert s.on_rejection("stale", "pub", "pub") == []
    assert s.recent() == {"pub": 2, "fwd": 1}
    for _ in range(10):  # someone relaying pub's old messages: nobody is struck (pub cannot be framed)
        assert s.on_rejection("replay", "pub", "fwd") == []
    assert s.recent() == {"pub": 2, "fwd": 1}
    clock.t = 11  # the first strikes fall out of the window
    assert s.on_rejection("replay", "pub", "pub") == []
    assert s.on_rejection("replay", "pub", "pub") == []
    assert s.on_rejection("replay", "pub", "pub") == []
    assert s.on_rejection("rate", "pub", "pub") == ["pub"]  # 4 > 3 within 10 s
    assert s.is_banned("pub") and not s.is_banned("fwd")
    assert s.on_rejection("rate", "pub", "pub") == []  # already banned: no new ban
    clock.t = 111
    assert s.expired() == ["pub"] and not s.is_banned("pub")


# ---------------------------------------------------------------- sybils: identities are free, the budget is not

def test_sybil_flood_through_one_connection_is_bounded_by_its_newcomer_budget() -> None:
    """200 fresh identities, 5 messages each, all relayed by one peer: what gets through is the forwarder's newcomer
    budget (newcomer_share senders' worth), not 200 x the per-sender burst; an established sender relayed by the
    same peer and young senders relayed by another peer are unaffected."""
    clock = Clock()
    rate = RateLimit(msgs_per_s=10, msgs_burst=30, bytes_per_s=1e9, bytes_burst=1e9,
                     new_senders_per_s=1e6, new_senders_burst=1e6, probation_s=60, newcomer_share=2)
    v = validator(clock, rate=rate)
    honest = Identity.generate()
    v.check(sealed(honest, 1), honest.peer_id)
    clock.t += 61  # honest is past probation
    attacker = "12D3KooWAttacker"
    sybils = [Identity.generate() for _ in range(200)]
    accepted = 0
    for s in sybils:
        for seq in range(1, 6):
            try:
                v.check(sealed(s, seq, created_at=clock.t), s.peer_id, attacker)
                accepted += 1
            except Rejected as r:
                assert r.reason == "newcomer"
    assert accepted == 2 * 30  # newcomer_share x msgs_burst, in one instant
    assert v.counts["newcomer"] == 1000 - 60
    v.check(sealed(honest, 2, created_at=clock.t), honest.peer_id, attacker)  # established: own budget only
    newbie = Identity.generate()
    v.check(sealed(newbie, 1, created_at=clock.t), newbie.peer_id, "12D3KooWSomeoneElse")
    # the attacker's budget refills at newcomer_share x msgs_per_s
    clock.t += 1
    fresh = [Identity.generate() for _ in range(40)]
    ok = 0
    for s in fresh:
        try:
            v.check(sealed(s, 1, created_at=clock.t), s.peer_id, attacker)
            ok += 1
        except Rejected:
            pass
    assert ok == 20


def test_new_identities_are_admitted_at_a_bounded_rate() -> None:
    clock = Clock()
    v = validator(clock, rate=RateLimit(new_senders_per_s=0.5, new_senders_burst=8))
    ids = [Identity.generate() for _ in range(20)]
    got = []
    for i in ids:
        try:
            v.check(sealed(i, 1), i.peer_id)
            got.append(i)
        except Rejected as r:
            assert r.reason == "newcomer"
    assert len(got) == 8
    for i in got:  # admitted ones keep going
        v.check(sealed(i, 2), i.peer_id)
    clock.t += 4.0  # two more admissions
    late = [i for i in ids if i not in got]
    n = 0
    for i in late:
        try:
            v.check(sealed(i, 1, created_at=clock.t), i.peer_id)
            n += 1
        except Rejected:
            pass
    assert n == 2


def test_a_new_sender_starts_with_one_second_of_budget_not_the_burst() -> None:
    clock = Clock()
    v = validator(clock, rate=RateLimit(msgs_per_s=5, msgs_burst=50, bytes_per_s=1e9, bytes_burst=1e9))
    s = Identity.generate()
    n = 0
    for seq in range(1, 50):
        try:
            v.check(sealed(s, seq), s.peer_id)
            n += 1
        except Rejected as r:
            assert r.reason == "rate"
    assert n == 5
    assert PeerStanding().on_rejection("newcomer", s.peer_id, "12D3KooWRelay") == []  # soft: no strike on a relay


# ---------------------------------------------------------- issue 12: cheap checks first, relays pay, total budget

def test_header_is_read_without_decoding_the_payload(ident: Identity) -> None:
    from swarm.validator import peek_header

    data = sealed(ident, 42, created_at=NOW - 5, rollouts=dummy_rollouts(3, text="x" * 5000))
    h = peek_header(data)
    assert h is not None and (h.kind, h.sender, h.swarm, h.seq, h.created_at) == ("rollouts", ident.peer_id, SWARM,
                                                                                   42, NOW - 5)
    hello = seal(Hello(ident.peer_id, SWARM, PROTOCOL_VERSION, 3, NOW, 2, "m", ("/ip4/127.0.0.1/tcp/1",)), ident)
    assert peek_header(hello).kind == "hello"
    truncated = data[:len(data) // 2]
    for junk in (b"", b"\x83\xa4body", data[:40], b"\x83\xa4body\xc6\xff\xff\xff\xff", truncated, b"\x00" * 99):
        assert peek_header(junk) is None


def test_stale_and_replayed_messages_are_rejected_before_the_signature_check(ident: Identity, monkeypatch) -> None:
    import swarm.validator as sv

    calls = []
    real = sv.verify_envelope
    monkeypatch.setattr(sv, "verify_envelope", lambda *a, **k: calls.append(1) or real(*a, **k))
    v = validator(Clock())
    big = dict(rollouts=dummy_rollouts(1, text="x" * 16_000, completions=60))  # ~1 MB
    r = pytest.raises(Rejected, v.check, sealed(ident, 1, created_at=NOW - 3600, **big), ident.peer_id)
    assert r.value.reason == "stale" and not r.value.verified and calls == []
    data = sealed(ident, 2, **big)
    v.check(data, ident.peer_id)
    assert len(calls) == 1
    r = pytest.raises(Rejected, v.check, data, ident.peer_id)
    assert r.value.reason == "replay" and not r.value.verified and len(calls) == 1
    assert v.prechecked == 2
    # a forged signature on a stale header: rejected as stale, unverified, and nothing of ident's state changed
    r = pytest.raises(Rejected, v.check, forge_signature(sealed(ident, 3, created_at=NOW - 3600)), ident.peer_id)
    assert r.value.reason == "stale" and not r.value.verified
    v.check(sealed(ident, 3), ident.peer_id)  # seq 3 was never recorded
    # a header naming somebody else, another swarm or version goes the full way (hard reasons stay hard)
    other = Identity.generate()
    assert reason(v, sealed(ident, 4, created_at=NOW - 3600), other.peer_id) == "sender"
    elsewhere = seal(make_batch(ident, "elsewhere", seq=5, created_at=NOW - 3600), ident)
    assert reason(v, elsewhere, ident.peer_id) == "swarm"


def test_a_forged_header_cannot_spend_a_senders_budget(ident: Identity) -> None:
    v = validator(Clock(), rate=RateLimit(msgs_per_s=1, msgs_burst=3, bytes_per_s=1e9, bytes_burst=1e9, probation_s=0))
    v.check(sealed(ident, 1), ident.peer_id)
    for seq in range(10, 40):  # fresh headers claiming ident, bad signatures: signature rejections, no tokens taken
        assert reason(v, forge_signature(sealed(ident, seq)), ident.peer_id) == "signature"
    v.check(sealed(ident, 2), ident.peer_id)
    v.check(sealed(ident, 3), ident.peer_id)
    r = pytest.raises(Rejected, v.check, sealed(ident, 4), ident.peer_id)
    assert r.value.reason == "rate" and not r.value.verified  # the bucket is empty: known from the header alone


def test_total_budget_sheds_load_young_senders_first() -> None:
    clock = Clock()
    rate = RateLimit(msgs_per_s=1e6, msgs_burst=1e6, bytes_per_s=1e9, bytes_burst=1e9, new_senders_burst=1e6,
                     probation_s=60, newcomer_share=1e6, total_msgs_per_s=10, total_msgs_burst=20,
                     total_bytes_per_s=1e12, total_bytes_burst=1e12, young_total_floor=0.5)
    v = validator(clock, rate=rate)
    old = Identity.generate()
    v.check(sealed(old, 1), old.peer_id)
    clock.t += 61  # old is established; the total bucket is full again (20)
    young = [Identity.generate() for _ in range(20)]
    got = 0
    for i in young:
        try:
            v.check(sealed(i, 1, created_at=clock.t), i.peer_id)
            got += 1
        except Rejected as r:
            assert r.reason == "load"
    assert got == 10  # young ones stop at the floor (half the burst)
    for seq in range(2, 12):
        v.check(sealed(old, seq, created_at=clock.t), old.peer_id)  # the established sender has the other half
    assert reason(v, sealed(old, 12, created_at=clock.t), old.peer_id) == "load"
    assert v.counts["load"] == 11
    clock.t += 1  # +10 tokens, still under the floor: young senders keep waiting, the established one goes on
    assert reason(v, sealed(young[0], 2, created_at=clock.t), young[0].peer_id) == "load"
    v.check(sealed(old, 12, created_at=clock.t), old.peer_id)


def test_a_lagging_node_sheds_rollouts_but_not_hellos(ident: Identity) -> None:
    v = validator(Clock())
    r = pytest.raises(Rejected, v.check, sealed(ident, 1), ident.peer_id, lagging=True)
    assert r.value.reason == "load"
    hello = Hello(ident.peer_id, SWARM, PROTOCOL_VERSION, 3, NOW, 2, "m", ("/ip4/127.0.0.1/tcp/1",))
    assert v.check(seal(hello, ident), ident.peer_id, lagging=True) == hello
    v.check(sealed(ident, 1), ident.peer_id)  # shed, not recorded: accepted once the node catches up
    assert PeerStanding(threshold=0).on_rejection("load", ident.peer_id, ident.peer_id) == []


def test_a_relay_of_soft_rejections_is_struck_once_over_its_budget() -> None:
    clock = Clock(0.0)
    s = PeerStanding(threshold=10, window_s=60, ban_s=600, clock=clock, relay_msgs_per_s=1, relay_msgs_burst=30,
                     relay_bytes_per_s=1e6, relay_bytes_burst=16e6)
    # an honest relay forwarding a few late messages (one a second, for minutes): never struck
    for t in range(300):
        clock.t = float(t)
        assert s.on_rejection("stale", f"pub{t % 7}", "honest-relay", 2_000) == []
    assert "honest-relay" not in s.recent() and "honest-relay" not in s.total
    # a relay pouring ~1 MB stale envelopes of fresh identities: 16 free (the byte budget), then one strike each
    banned_at = None
    for i in range(100):
        if s.on_rejection("stale", f"sybil{i}", "attacker", 960_000) == ["attacker"]:
            banned_at = i
            break
    assert banned_at == 16 + 10  # 16 MB of budget, then 11 strikes > threshold 10
    assert s.is_banned("attacker") and not any(s.is_banned(f"sybil{i}") for i in range(100))
    # "newcomer" and "load" are our own policy and load: never charged to a relay
    for _ in range(100):
        assert s.on_rejection("newcomer", "young", "busy-relay", 960_000) == []
        assert s.on_rejection("load", "young", "busy-relay", 960_000) == []
    assert s.recent().get("busy-relay", 0) == 0
