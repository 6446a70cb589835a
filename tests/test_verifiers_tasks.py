"""verifiers.tasks: building, validation, splits, scoring, sampling."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.messages import TaskRef
from verifiers import (
    FAMILIES,
    HELDOUT_SEED_BASE,
    RG_FAMILIES,
    Task,
    TaskError,
    arith_is_heldout,
    build_task,
    default_config,
    heldout_refs,
    make_ref,
    parse_task_weights,
    sample_refs,
    score_answer,
)
from verifiers.tasks import _SPECS

REPO = Path(__file__).resolve().parents[1]
SAPO_NINE = (
    "base_conversion", "basic_arithmetic", "arc_1d", "bf", "propositional_logic",
    "fraction_simplification", "decimal_arithmetic", "calendar_arithmetic", "binary_matrix",
)


def valid_answer(task: Task) -> str:
    """A correct answer: the gold one, or for propositional_logic (answer None) a valid conclusion."""
    if task.answer is not None:
        return task.answer
    example = task.metadata["example_answer"]
    if score_answer(task, example) == 1.0:
        return example
    return " ∧ ".join(f"({p})" for p in task.metadata["premises"])  # the premises imply their conjunction


def test_families() -> None:
    assert FAMILIES == ("arith",) + SAPO_NINE
    assert RG_FAMILIES == SAPO_NINE


@pytest.mark.parametrize("family", FAMILIES)
def test_gold_scores_one_for_every_family(family: str) -> None:
    for i in range(25):
        task = build_task(make_ref(family, 1000 + i, 3 * i))
        assert isinstance(task.question, str) and task.question
        assert score_answer(task, valid_answer(task)) == 1.0, (task.ref, valid_answer(task))
        assert score_answer(task, "  " + valid_answer(task) + "\n") == 1.0  # answers are stripped
        assert score_answer(task, None) == 0.0
        assert score_answer(task, "") == 0.0
        assert score_answer(task, "zzz-not-an-answer") <= 0.05  # verifiers may give tiny "tried" credit


def test_only_propositional_logic_has_no_gold_answer() -> None:
    none = {f for f in FAMILIES for i in range(5) if build_task(make_ref(f, 5, i)).answer is None}
    assert none == {"propositional_logic"}


def test_propositional_logic_scores_through_verifier() -> None:
    task = build_task(make_ref("propositional_logic", 1, 1))
    assert task.answer is None
    good = valid_answer(task)
    assert score_answer(task, good) == 1.0
    assert score_answer(task, "P ∨ ¬P") == 0.25  # tautology: reasoning-gym's "trivial" credit
    assert score_answer(task, "Z") == 0.0  # unknown variable
    assert score_answer(task, "((((" * 300) == 0.0  # over the 512-char cap: never parsed


def test_partial_credit_examples() -> None:
    task = build_task(make_ref("basic_arithmetic", 3, 0))
    gold = task.answer
    assert score_answer(task, f"x = {gold}") == pytest.approx(len(gold) / len(f"x = {gold}"))
    frac = build_task(make_ref("fraction_simplification", 3, 0))
    assert score_answer(frac, "1/999999") == 0.0  # our exact fraction scorer gives no partial credit
    cal = next(t for i in range(50) if (t := build_task(make_ref("calendar_arithmetic", 9, i))).metadata["task"]
               == "count_days")
    near = str(int(cal.answer) + 1)
    assert 0.0 < score_answer(cal, near) < 1.0


def test_binary_matrix_never_evals_answer(tmp_path: Path) -> None:
    task = build_task(make_ref("binary_matrix", 2, 2))
    marker = tmp_path / "pwned"
    evil = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    assert score_answer(task, evil) == 0.0
    assert not marker.exists()
    as_list = repr(task.metadata["solution"])  # python list of lists: reasoning-gym's 0.1 credit, kept
    assert score_answer(task, as_list) == 0.1
    assert score_answer(task, "[" * 5000) == 0.0


def test_score_never_raises_on_odd_strings() -> None:
    odd = ["\x00", "NaN", "Infinity", "-1e999999999", "1" * 5000, "(" * 400 + ")" * 400, "¬¬¬", "$\\frac{}{}$",
           "/", "[[1,2],[3]]", "\ud800", "<answer>", "9" * 4000 + "/1"]
    for family in FAMILIES:
        for i in range(3):
            task = build_task(make_ref(family, 77, i))
            for s in odd:
                v = score_answer(task, s)
                assert 0.0 <= v <= 1.0


def test_scoring_leaves_decimal_context_alone() -> None:
    import decimal

    before = decimal.getcontext().prec
    task = build_task(make_ref("decimal_arithmetic", 4, 4, {"precision": 7}))
    score_answer(task, task.answer)
    assert decimal.getcontext().prec == before


def test_bf_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    build_task(make_ref("bf", 12, 34))
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------------ arith


def test_arith_question_format_and_answer() -> None:
    for digits in (1, 2, 3, 4):
        for ops in ("+", "-", "*", "+-*"):
            for i in range(30):
                task = build_task(make_ref("arith", 5, i, {"digits": digits, "ops": ops}))
                a, op, b = task.metadata["a"], task.metadata["op"], task.metadata["b"]
                assert task.question == f"{a}{op}{b}="
                assert op in ops
                lo, hi = (0, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)
                assert lo <= a <= hi and lo <= b <= hi
                assert task.answer == str({"+": a + b, "-": a - b, "*": a * b}[op])
                assert not arith_is_heldout(a, op, b)


def test_arith_fixed_example() -> None:
    # Pinned so a change to the draw order is noticed (it would change every arith task on the network).
    task = build_task(make_ref("arith", 0, 0))
    assert task.question == "43+75=" and task.answer == "118"


def test_arith_scoring_is_canonical() -> None:
    task = build_task(TaskRef.make("arith", {"digits": 2, "ops": "+", "split": "train"}, 0, 0))
    gold = task.answer
    assert score_answer(task, gold) == 1.0
    for bad in ("0" + gold, "+" + gold, gold + ".0", " ".join(gold), gold + "0", "-" + gold):
        assert score_answer(task, bad) == 0.0, bad
    sub = build_task(next(r for i in range(100)
                          if (r := make_ref("arith", 1, i, {"ops": "-"})) and build_task(r).answer.startswith("-")))
    assert score_answer(sub, sub.answer) == 1.0  # negative results are canonical with a leading "-"


def test_arith_heldout_rule_and_splits() -> None:
    assert arith_is_heldout(1, "+", 2) == (__import__("zlib").crc32(b"1+2") % 10 == 0)
    frac = sum(arith_is_heldout(a, "+", b) for a in range(10, 100) for b in range(10, 100)) / 8100
    assert 0.08 < frac < 0.12
    for i in range(200):
        t = build_task(make_ref("arith", HELDOUT_SEED_BASE + 3, i, {"split": "test"}))
        assert arith_is_heldout(t.metadata["a"], t.metadata["op"], t.metadata["b"])
    for r in heldout_refs("arith", 50, {"digits": 1, "ops": "+-*"}):
        t = build_task(r)
        assert arith_is_heldout(t.metadata["a"], t.metadata["op"], t.metadata["b"])


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "generator, seed, index, config",
    [
        ("nope", 0, 0, None),
        ("arith", 0, 0, {"digits": 5}),
        ("arith", 0, 0, {"digits": 0}),
        ("arith", 0, 0, {"digits": True}),
        ("arith", 0, 0, {"digits": 2.0}),
        ("arith", 0, 0, {"ops": ""}),
        ("arith", 0, 0, {"ops": "++"}),
        ("arith", 0, 0, {"ops": "/"}),
        ("arith", 0, 0, {"split": "dev"}),
        ("arith", 0, 0, {"colour": "red"}),
        ("arith", 0, 0, {"split": "test"}),  # training seed with held-out split
        ("arith", HELDOUT_SEED_BASE, 0, {"split": "train"}),  # held-out seed with training split
        ("arith", HELDOUT_SEED_BASE, 0, None),  # default split is train
        ("arith", -1, 0, None),
        ("arith", 2**63, 0, None),
        ("arith", 0, -1, None),
        ("arith", 0, 2**31, None),
        ("arith", True, 0, None),
        ("arith", 0, 1.0, None),
        ("basic_arithmetic", 0, 0, {"max_digits": 7}),
        ("basic_arithmetic", 0, 0, {"operators": "+-*/"}),  # division needs max_digits <= 2
        ("basic_arithmetic", 0, 0, {"operators": "+x"}),
        ("basic_arithmetic", 0, 0, {"size": 10}),  # not allowlisted
        ("basic_arithmetic", 0, 0, {"seed": 10}),
        ("basic_arithmetic", 0, 0, {"min_terms": 5, "max_terms": 3}),
        ("base_conversion", 0, 0, {"min_base": 2, "max_base": 2}),  # would loop forever in reasoning-gym
        ("arc_1d", 0, 0, {"max_size": 64}),
        ("bf", 0, 0, {"difficulty": 3}),
        ("binary_matrix", 0, 0, {"p_zero": float("nan")}),
        ("binary_matrix", 0, 0, {"p_zero": 0.0}),
        ("decimal_arithmetic", 0, 0, {"precision": 4, "max_num_decimal_places": 3}),
        ("calendar_arithmetic", 0, 0, {"year": 99999}),
        ("propositional_logic", 0, 0, {"max_vars": "4"}),
    ],
)
def test_task_errors(generator, seed, index, config) -> None:
    with pytest.raises(TaskError):
        make_ref(generator, seed, index, config)
    ref = TaskRef.make(generator, config if isinstance(config, dict) else None, seed, index)
    with pytest.raises(TaskError):
        build_task(ref)


def test_build_task_rejects_malformed_refs() -> None:
    with pytest.raises(TaskError):
        build_task("arith")  # type: ignore[arg-type]
    with pytest.raises(TaskError):
        build_task(TaskRef("arith", (("digits", 2), ("digits", 3)), 0, 0))
    with pytest.raises(TaskError):
        build_task(TaskRef("arith", "digits", 0, 0))  # type: ignore[arg-type]
    assert issubclass(TaskError, ValueError)


def test_division_allowed_when_bounded() -> None:
    ref = make_ref("basic_arithmetic", 1, 2, {"operators": "+-*/", "max_digits": 2})
    t = build_task(ref)
    assert score_answer(t, t.answer) == 1.0


def test_make_ref_fills_defaults_and_build_accepts_partial_configs() -> None:
    ref = make_ref("arith", 3, 4)
    assert ref.config_dict() == {"digits": 2, "ops": "+", "split": "train"}
    assert build_task(TaskRef.make("arith", {}, 3, 4)).question == build_task(ref).question
    for f in FAMILIES:
        assert make_ref(f, 0, 0).config_dict() == default_config(f)
    with pytest.raises(TaskError):
        default_config("nope")


def test_defaults_match_reasoning_gym() -> None:
    from reasoning_gym.factory import DATASETS

    overrides = {("base_conversion", "min_value"), ("basic_arithmetic", "operators")}  # documented in tasks.py
    for fam in RG_FAMILIES:
        fields = {f.name: f for f in dataclasses.fields(DATASETS[fam][1])}
        for key, value in default_config(fam).items():
            assert key in fields, (fam, key)
            if (fam, key) not in overrides:
                assert fields[key].default == value, (fam, key)
        assert "seed" not in _SPECS[fam] and "size" not in _SPECS[fam]


def test_task_equality_ignores_metadata() -> None:
    a = build_task(make_ref("bf", 1, 1))
    b = build_task(make_ref("bf", 1, 1))
    assert a == b and hash(a) == hash(b)
    assert dataclasses.replace(a, metadata={}) == a


def test_training_and_heldout_rg_items_differ() -> None:
    # Naive seed+index would make these two the same item; our injective map keeps them apart.
    train = build_task(make_ref("basic_arithmetic", HELDOUT_SEED_BASE - 1, 1))
    held = build_task(make_ref("basic_arithmetic", HELDOUT_SEED_BASE, 0))
    assert train.question != held.question


# ------------------------------------------------------------------------------------------------ determinism

_CHILD = """
import json, sys
from verifiers import FAMILIES, build_task, make_ref, HELDOUT_SEED_BASE
out = []
for f in (FAMILIES if sys.argv[1] == "fwd" else FAMILIES[::-1]):
    for seed, index in ((0, 0), (17, 123456), (2**31 - 1, 2**31 - 1), (HELDOUT_SEED_BASE + 5, 9)):
        cfg = {"split": "test"} if f == "arith" and seed >= HELDOUT_SEED_BASE else None
        t = build_task(make_ref(f, seed, index, cfg))
        out.append([f, seed, index, t.question, t.answer])
out.sort(key=lambda r: (r[0], r[1], r[2]))
print(json.dumps(out))
"""


def test_cross_process_determinism() -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, order], env=dict(os.environ, PYTHONHASHSEED=hashseed,
                         PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for hashseed, order in (("0", "fwd"), ("123", "rev"))
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert results[0] == results[1]
    assert len(results[0]) == 4 * len(FAMILIES)
    here = [[f, s, i, *(lambda t: (t.question, t.answer))(build_task(
        make_ref(f, s, i, {"split": "test"} if f == "arith" and s >= HELDOUT_SEED_BASE else None)))]
        for f, s, i, _, _ in results[0]]
    assert here == results[0]


# ------------------------------------------------------------------------------------------------ sampling


def test_sample_refs_train_never_heldout() -> None:
    weights = {f: 1.0 for f in FAMILIES}
    refs = sample_refs(weights, 2000, random.Random(0))
    assert len(refs) == 2000
    assert {r.generator for r in refs} == set(FAMILIES)
    assert all(0 <= r.seed < HELDOUT_SEED_BASE and 0 <= r.index < 2**31 for r in refs)
    assert all(r.config_dict()["split"] == "train" for r in refs if r.generator == "arith")
    held = {(r.generator, r.seed, r.index) for f in FAMILIES for r in heldout_refs(f, 20)}
    assert not held & {(r.generator, r.seed, r.index) for r in refs}
    for r in refs[:300]:
        if r.generator == "arith":
            t = build_task(r)
            assert not arith_is_heldout(t.metadata["a"], t.metadata["op"], t.metadata["b"])


def test_sample_refs_weights_and_determinism() -> None:
    refs = sample_refs({"arith": 3, "bf": 1, "binary_matrix": 0}, 4000, random.Random(1))
    n_arith = sum(r.generator == "arith" for r in refs)
    assert 2850 < n_arith < 3150 and all(r.generator in ("arith", "bf") for r in refs)
    assert refs[:50] == sample_refs({"bf": 1, "arith": 3}, 50, random.Random(1))  # mapping order irrelevant
    cfg = sample_refs({"arith": 1}, 3, random.Random(2), configs={"arith": {"digits": 3}})
    assert all(r.config_dict()["digits"] == 3 for r in cfg)
    test = sample_refs({"arith": 1, "bf": 1}, 100, random.Random(3), split="test")
    assert all(r.seed >= HELDOUT_SEED_BASE for r in test)
    for r in test[:20]:
        build_task(r)
    for bad in ({}, {"nope": 1}, {"arith": -1}, {"arith": 0}, {"arith": float("inf")}):
        with pytest.raises(TaskError):
            sample_refs(bad, 1, random.Random(0))
    with pytest.raises(TaskError):
        sample_refs({"arith": 1}, 1, random.Random(0), split="dev")


def test_heldout_refs_fixed() -> None:
    refs = heldout_refs("basic_arithmetic", 5)
    assert refs == heldout_refs("basic_arithmetic", 5)
    assert [r.index for r in refs] == [0, 1, 2, 3, 4] and {r.seed for r in refs} == {HELDOUT_SEED_BASE}
    assert heldout_refs("arith", 2)[0].config_dict()["split"] == "test"
    with pytest.raises(TaskError):
        heldout_refs("arith", 2, {"split": "train"})
    with pytest.raises(TaskError):
        heldout_refs("nope", 2)


def test_parse_task_weights() -> None:
    assert parse_task_weights("arith") == {"arith": 1.0}
    assert parse_task_weights("arith:2,basic_arithmetic:1") == {"arith": 2.0, "basic_arithmetic": 1.0}
    assert parse_task_weights(" arith : 0.5 , bf ") == {"arith": 0.5, "bf": 1.0}
    assert parse_task_weights("arith:1,bf:0") == {"arith": 1.0, "bf": 0.0}
    for bad in ("", " ", "nope", "arith:x", "arith:-1", "arith:nan", "arith:inf", "arith,arith", "arith,,bf",
                "arith:0", "arith:1:2"):
        with pytest.raises(TaskError):
            parse_task_weights(bad)


# -- scorer repairs (security issue, "Also") ------------------------------------------------------------------------

def test_fraction_simplification_pays_only_one_exact_fraction():
    from verifiers.rewards import reward
    task = build_task(make_ref("fraction_simplification", 1, 3))
    a, b = task.metadata["simplified_numerator"], task.metadata["simplified_denominator"]
    for ok in (task.answer, f"{a}/{b}", f"$\\frac{{{a}}}{{{b}}}$", f"\\dfrac{{{a}}}{{{b}}}"):
        assert reward(task, f"<answer>{ok}</answer>") == 1.0, ok
    for bad in (f"$\\frac{{{a}}}{{{b}}}$ or $\\frac{{1}}{{2}}$", f"$\\frac{{{a}}}{{{b}}}$ apples", f"{a}/{b}x",
                f"<answer>{a}/{b}", f"{a * 2}/{b * 2}"):
        assert reward(task, f"<answer>{bad}</answer>") == 0.0, bad
    assert score_answer(task, f"{a}/{b}/7") == 0.0


def test_count_business_days_questions_name_the_date_the_gold_answer_counts_to():
    import datetime
    import re
    checked = fixed = 0
    for i in range(3000):
        task = build_task(make_ref("calendar_arithmetic", 1, i))
        if task.metadata.get("task") != "count_business_days":
            continue
        day, last = re.findall(r"([A-Z][a-z]+), ([A-Z][a-z]+ \d+, \d{4})", task.question)[-1]
        end = datetime.datetime.strptime(last, "%B %d, %Y").date()
        assert str(end) == task.metadata["end_date"], task.question
        assert end.strftime("%A") == day
        checked += 1
        fixed += end.year != datetime.date.fromisoformat(task.metadata["start_date"]).year
    assert checked > 300 and fixed > 10  # reasoning-gym printed the wrong year in these ~8%
