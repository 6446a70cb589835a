"""Verifiable tasks: rebuild a question and its gold answer from a `TaskRef`, and score answers.

A `TaskRef` (generator, config, seed, index) names a task; every process rebuilds the same task from it, so a receiver
never needs to trust a sender's question or answer.

Families
- "arith": built in. Questions are exactly f"{a}{op}{b}=" (e.g. "12+34="), gold is the exact integer result.
- Nine reasoning-gym (0.1.19) generators from the SAPO paper. All peers must run the same reasoning-gym version.

Seeds and splits
- Training refs use seeds in [0, 2**31); held-out refs use seeds >= HELDOUT_SEED_BASE (2**31). A ref whose seed range
  disagrees with its split is rejected. For "arith" the config's "split" additionally decides which problems can
  appear: (a, op, b) is held out iff crc32(f"{a}{op}{b}") % 10 == 0; "train" only yields other problems, "test" only
  those, so a model trained on "train" never sees a held-out problem, whatever the seed.
- Reasoning-gym items are drawn with `random.Random(dataset_seed + idx)` and do not depend on the dataset's `size`
  (checked in 0.1.19 for all nine). Passing (seed, index) straight through would alias (seed, index + 1) with
  (seed + 1, index), letting a training ref hit a held-out one. We therefore build every dataset with seed 0 and read
  item `seed * 2**31 + index`, an injective map that keeps training items (< 2**62) apart from held-out ones.

Safety: a peer chooses the ref, so configs are restricted to an allowlist of scalar keys with bounded ranges, chosen
so that one build stays in the millisecond range. reasoning-gym's binary_matrix scorer calls `eval` on the answer; we
score that family with an equivalent `ast.literal_eval` version instead. propositional_logic answers may only contain
the task's variables, connectives, parentheses and spaces (reasoning-gym would read "zzz" as a fresh variable), and are
capped at 512 chars (its parser is quadratic). Scores outside [0, 1] (a reasoning-gym bug in calendar_arithmetic for
negative gold answers) count as 0. fraction_simplification is scored by our own exact-fraction check (reasoning-gym
matched only a prefix: "a/b apples" scored 1), and calendar_arithmetic's count_business_days questions get the end
date's real year written in (reasoning-gym printed the start's year, ~8% of those items). Known unsolvable items: ~0.7% of propositional_logic items have tautological
premises, so no conclusion scores above 0.25 (binary reward 0 for the whole group).
"""
from __future__ import annotations

import ast
import contextlib
import datetime
import decimal
import functools
import io
import math
import random
import re
import zlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from protocol.messages import MAX_INT, MAX_NAME_CHARS, ConfigValue, TaskRef

HELDOUT_SEED_BASE = 2**31
SEED_LIMIT = MAX_INT + 1  # seeds are int64-sized on the wire
INDEX_LIMIT = 2**31
SPLITS = ("train", "test")

RG_FAMILIES = (
    "base_conversion",
    "basic_arithmetic",
    "arc_1d",
    "bf",
    "propositional_logic",
    "fraction_simplification",
    "decimal_arithmetic",
    "calendar_arithmetic",
    "binary_matrix",
)
FAMILIES: tuple[str, ...] = ("arith",) + RG_FAMILIES

_RG_SIZE = 1_000  # items do not depend on size; any fixed value works
_ARITH_MAX_DRAWS = 1_000  # >= 10% of problems fall in each split, so 0.9**1000 makes running out impossible
# Longest extracted answer handed to a reasoning-gym scorer. propositional_logic's parser is quadratic in length.
_MAX_ANSWER_CHARS = 4_096
_MAX_ANSWER_CHARS_BY_FAMILY = {"propositional_logic": 512}


class TaskError(ValueError):
    """A task reference or config that cannot (or must not) be built."""


@dataclass(frozen=True)
class Task:
    ref: TaskRef
    question: str
    answer: str | None  # None: several answers are valid; only the verifier can judge
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


# ---------------------------------------------------------------------------------------------------- config specs


@dataclass(frozen=True)
class _Key:
    """One allowed config key: its type, inclusive bounds (numbers) or choices (strings), and default."""

    kind: type  # int, float, bool or str
    default: ConfigValue
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    charset: str | None = None  # str made of distinct chars from this set (operator lists)


def _int(default: int, lo: int, hi: int) -> _Key:
    return _Key(int, default, lo, hi)


_ARITH_SPEC: dict[str, _Key] = {
    "digits": _int(2, 1, 4),
    "ops": _Key(str, "+", charset="+-*"),
    "split": _Key(str, "train", choices=SPLITS),
}

# Defaults equal reasoning-gym's dataclass defaults (a test checks this), except base_conversion's min_value (1, not 0:
# value 0 gives an empty question number and gold answer) and basic_arithmetic's operators: its
# division path factors products with a sqrt-time loop that hangs (minutes+) on some 4-digit items, so "/" is off by
# default and only allowed with max_digits <= 2 and max_terms <= 6 (checked in _check_cross_rules).
_RG_SPECS: dict[str, dict[str, _Key]] = {
    "base_conversion": {
        "min_base": _int(2, 2, 36),
        "max_base": _int(16, 2, 36),
        "min_value": _int(1, 1, 10**9),  # reasoning-gym renders 0 as "" in bases other than 2 and 16
        "max_value": _int(1000, 2, 10**9),
    },
    "basic_arithmetic": {
        "min_terms": _int(2, 1, 8),
        "max_terms": _int(6, 1, 8),
        "min_digits": _int(1, 1, 6),
        "max_digits": _int(4, 1, 6),
        "operators": _Key(str, "+-*", charset="+-*/"),
        "allow_parentheses": _Key(bool, True),
        "allow_negation": _Key(bool, True),
        "format_style": _Key(str, "simple", choices=("simple", "natural")),
        "whitespace": _Key(str, "single", choices=("no_space", "single", "random")),
    },
    "arc_1d": {
        # Above 40 cells recolor_blocks_from_palette can need >9 distinct colours and loops forever; 30 is the
        # reasoning-gym default and was scanned for hangs.
        "min_size": _int(10, 8, 30),
        "max_size": _int(30, 8, 30),
        "num_train": _int(3, 1, 5),
    },
    "bf": {"difficulty": _int(1, 1, 2)},  # difficulty 3 interprets loops for up to seconds per item
    "propositional_logic": {
        "min_vars": _int(2, 1, 6),
        "max_vars": _int(4, 1, 6),
        "min_statements": _int(2, 1, 6),
        "max_statements": _int(4, 1, 6),
        "min_complexity": _int(1, 1, 4),
        "max_complexity": _int(3, 1, 4),
    },
    "fraction_simplification": {
        "min_value": _int(1, 1, 10**6),
        "max_value": _int(1000, 2, 10**6),
        "min_factor": _int(1, 1, 10**4),
        "max_factor": _int(100, 1, 10**4),
    },
    "decimal_arithmetic": {
        "min_num_decimal_places": _int(3, 1, 8),
        "max_num_decimal_places": _int(3, 1, 8),
        "min_terms": _int(2, 2, 10),
        "max_terms": _int(6, 2, 10),
        "precision": _int(12, 3, 30),
    },
    "calendar_arithmetic": {
        "year": _int(2022, 1800, 2200),
        "offset_upper_bound": _int(100, 1, 1000),
        "leap_year_range": _int(200, 0, 1000),
    },
    "binary_matrix": {
        "min_n": _int(3, 1, 20),
        "max_n": _int(10, 1, 20),
        "p_zero": _Key(float, 0.25, 0.01, 1.0),
    },
}

_SPECS: dict[str, dict[str, _Key]] = {"arith": _ARITH_SPEC, **_RG_SPECS}


def _spec(generator: object) -> dict[str, _Key]:
    if not isinstance(generator, str) or generator not in _SPECS:
        raise TaskError(f"unknown task generator {generator!r}; known: {', '.join(FAMILIES)}")
    return _SPECS[generator]


def default_config(generator: str) -> dict[str, ConfigValue]:
    """The full default config of a family (every allowed key)."""
    return {k: s.default for k, s in _spec(generator).items()}


def _check_value(generator: str, key: str, spec: _Key, value: object) -> ConfigValue:
    where = f"{generator} config {key!r}"
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise TaskError(f"{where} must be a bool, got {type(value).__name__}")
        return value
    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TaskError(f"{where} must be an int, got {type(value).__name__}")
    elif spec.kind is float:
        # Accept ints too: a wire codec may not keep 1.0 and 1 apart.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TaskError(f"{where} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise TaskError(f"{where} must be finite")
    elif spec.kind is str:
        if not isinstance(value, str):
            raise TaskError(f"{where} must be a str, got {type(value).__name__}")
        if spec.choices is not None and value not in spec.choices:
            raise TaskError(f"{where} must be one of {list(spec.choices)}, got {value!r}")
        if spec.charset is not None:
            if not value or len(set(value)) != len(value) or any(c not in spec.charset for c in value):
                raise TaskError(f"{where} must be non-empty distinct characters from {spec.charset!r}, got {value!r}")
        return value
    if spec.lo is not None and spec.hi is not None and not spec.lo <= value <= spec.hi:  # type: ignore[operator]
        raise TaskError(f"{where} must be in [{spec.lo}, {spec.hi}], got {value!r}")
    return value  # type: ignore[return-value]


def _check_cross_rules(generator: str, cfg: Mapping[str, ConfigValue]) -> None:
    for key in cfg:
        if key.startswith("min_"):
            hi_key = "max_" + key[4:]
            if hi_key in cfg and cfg[key] > cfg[hi_key]:  # type: ignore[operator]
                raise TaskError(f"{generator} config {key}={cfg[key]!r} exceeds {hi_key}={cfg[hi_key]!r}")
    if generator == "basic_arithmetic" and "/" in str(cfg["operators"]):
        if int(cfg["max_digits"]) > 2 or int(cfg["max_terms"]) > 6:  # type: ignore[call-overload]
            raise TaskError("basic_arithmetic with '/' needs max_digits <= 2 and max_terms <= 6 (slow divisor search)")
    if generator == "decimal_arithmetic" and cfg["precision"] <= cfg["max_num_decimal_places"] + 1:  # type: ignore
        raise TaskError("decimal_arithmetic precision must exceed max_num_decimal_places + 1")
    if generator == "base_conversion" and cfg["min_value"] >= cfg["max_value"]:  # type: ignore[operator]
        raise TaskError("base_conversion min_value must be < max_value")
    if generator == "base_conversion" and cfg["min_base"] >= cfg["max_base"]:  # type: ignore[operator]
        # reasoning-gym redraws the target base until it differs from the source: one base loops forever
        raise TaskError("base_conversion min_base must be < max_base")
    if generator == "fraction_simplification" and cfg["min_value"] >= cfg["max_value"]:  # type: ignore[operator]
        raise TaskError("fraction_simplification min_value must be < max_value")


def _full_config(generator: str, config: Mapping[str, ConfigValue] | None) -> dict[str, ConfigValue]:
    """Defaults overlaid with `config`, every key and value checked."""
    spec = _spec(generator)
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TaskError(f"config must be a mapping, got {type(config).__name__}")
    cfg = default_config(generator)
    for key, value in config.items():
        if not isinstance(key, str) or key not in spec:
            raise TaskError(f"{generator} config has unknown key {key!r}; allowed: {', '.join(spec)}")
        cfg[key] = _check_value(generator, key, spec[key], value)
    _check_cross_rules(generator, cfg)
    return cfg


def _ref_split(generator: str, cfg: Mapping[str, ConfigValue], seed: int) -> str:
    seed_split = "test" if seed >= HELDOUT_SEED_BASE else "train"
    if generator == "arith" and cfg["split"] != seed_split:
        raise TaskError(
            f"arith split {cfg['split']!r} does not match seed {seed} "
            f"(train seeds are < {HELDOUT_SEED_BASE}, held-out seeds >= {HELDOUT_SEED_BASE})"
        )
    return seed_split


def _check_seed_index(seed: object, index: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise TaskError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < INDEX_LIMIT:
        raise TaskError(f"index must be an int in [0, 2**31), got {index!r}")


def make_ref(generator: str, seed: int, index: int, config: Mapping[str, ConfigValue] | None = None) -> TaskRef:
    """A validated ref with the full (default-filled) config."""
    cfg = _full_config(generator, config)
    _check_seed_index(seed, index)
    _ref_split(generator, cfg, seed)
    return TaskRef.make(generator, cfg, seed, index)


def _validate_ref(ref: object) -> dict[str, ConfigValue]:
    if not isinstance(ref, TaskRef):
        raise TaskError(f"expected a TaskRef, got {type(ref).__name__}")
    if not isinstance(ref.generator, str) or len(ref.generator) > MAX_NAME_CHARS:
        raise TaskError("bad generator name")
    if not isinstance(ref.config, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in ref.config):
        raise TaskError("ref config must be a tuple of (key, value) pairs")
    keys = [k for k, _ in ref.config]
    if len(set(keys)) != len(keys):
        raise TaskError("ref config has duplicate keys")
    cfg = _full_config(ref.generator, dict(ref.config))  # missing keys take defaults
    _check_seed_index(ref.seed, ref.index)
    _ref_split(ref.generator, cfg, ref.seed)
    return cfg


# ---------------------------------------------------------------------------------------------------- arith


def arith_is_heldout(a: int, op: str, b: int) -> bool:
    """True iff the problem belongs to the held-out ("test") split; a fixed hash, identical in every process."""
    return zlib.crc32(f"{a}{op}{b}".encode()) % 10 == 0


def _arith_eval(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _build_arith(ref: TaskRef, cfg: Mapping[str, ConfigValue]) -> Task:
    digits = int(cfg["digits"])  # type: ignore[arg-type]
    ops = str(cfg["ops"])
    want_heldout = cfg["split"] == "test"
    lo, hi = (0, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)
    # An int seed: Random(int) is independent of PYTHONHASHSEED and injective in (seed, index).
    rng = random.Random(ref.seed * INDEX_LIMIT + ref.index)
    for _ in range(_ARITH_MAX_DRAWS):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        op = rng.choice(ops)
        if arith_is_heldout(a, op, b) == want_heldout:
            answer = str(_arith_eval(a, op, b))
            meta = MappingProxyType({"a": a, "op": op, "b": b})
            return Task(ref, f"{a}{op}{b}=", answer, meta)
    raise TaskError(f"no {cfg['split']} problem found for {ref}")  # unreachable in practice (see _ARITH_MAX_DRAWS)


# ---------------------------------------------------------------------------------------------------- reasoning-gym


def _fixed_decimal_context() -> decimal.Context:
    # decimal_arithmetic sets getcontext().prec; isolate it, and don't let the caller's context change answers.
    return decimal.Context(
        prec=28,
        rounding=decimal.ROUND_HALF_EVEN,
        Emin=-999999,
        Emax=999999,
        capitals=1,
        clamp=0,
        flags=[],
        traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
    )


@contextlib.contextmanager
def _rg_guard(generator: str):
    with decimal.localcontext(_fixed_decimal_context()):
        if generator == "bf":
            # bf's compiler prints progress dots to stdout.
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        else:
            yield


def _rg_kwargs(generator: str, cfg: Mapping[str, ConfigValue]) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(cfg)
    if generator == "basic_arithmetic":
        kwargs["operators"] = tuple(str(cfg["operators"]))
    return kwargs


@functools.lru_cache(maxsize=64)
def _rg_dataset(generator: str, config: tuple[tuple[str, ConfigValue], ...]) -> Any:
    import reasoning_gym  # lazy: importing it takes ~1.3 s

    try:
        return reasoning_gym.create_dataset(generator, seed=0, size=_RG_SIZE, **_rg_kwargs(generator, dict(config)))
    except Exception as exc:  # config rejected by reasoning-gym's own validate()
        raise TaskError(f"{generator}: invalid config {dict(config)}: {exc!r}") from exc


def _build_rg(ref: TaskRef, cfg: Mapping[str, ConfigValue]) -> Task:
    ds = _rg_dataset(ref.generator, tuple(sorted(cfg.items())))
    try:
        with _rg_guard(ref.generator):
            entry = ds[ref.seed * INDEX_LIMIT + ref.index]
    except Exception as exc:
        raise TaskError(f"{ref.generator}: generation failed for {ref}: {exc!r}") from exc
    answer = entry["answer"]
    question = str(entry["question"])
    if ref.generator == "calendar_arithmetic":
        question = _repair_business_days(question, entry["metadata"])
    return Task(ref, question, None if answer is None else str(answer), MappingProxyType(entry["metadata"]))


def _repair_business_days(question: str, metadata: Mapping[str, Any]) -> str:
    """reasoning-gym 0.1.19's count_business_days prints the end date with the start date's year ("from November 15,
    2022 to January 14, 2022") while its gold answer counts to the real end date (2023): write the real date in."""
    if metadata.get("task") != "count_business_days":
        return question
    try:
        end = datetime.date.fromisoformat(str(metadata["end_date"]))
    except (KeyError, ValueError):
        return question
    shown = re.findall(r"[A-Z][a-z]+ \d{1,2}, \d{4}", question)
    if not shown:  # some templates give the start date without a year: the last full date is the end date
        return question
    right = f"{end.strftime('%B')} {end.day}, {end.year}"
    if shown[-1] == right:
        return question
    head, sep, tail = question.rpartition(shown[-1])
    return head + right + tail


def build_task(ref: TaskRef) -> Task:
    """Rebuild the task a ref names. Raises TaskError for anything invalid."""
    cfg = _validate_ref(ref)
    if ref.generator == "arith":
        return _build_arith(ref, cfg)
    return _build_rg(ref, cfg)


# ---------------------------------------------------------------------------------------------------- scoring


def _score_binary_matrix(answer: str, task: Task) -> float:
    # Same as reasoning-gym's scorer, with ast.literal_eval in place of its eval() of the answer.
    gold = task.answer
    if answer == gold:
        return 1.0
    try:
        value = ast.literal_eval(answer)
        text = "\n".join(" ".join(str(x) for x in row) for row in value)
        return 0.1 if text == gold else 0.0
    except Exception:
        return 0.0


_LOGIC_SYMBOLS = frozenset("()∧∨¬→↔ ")


_FRACTION = re.compile(r"\$?\s*(?:\\d?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}|(\d+)\s*/\s*(\d+))\s*\$?")


def _score_fraction(answer: str, task: Task) -> float:
    """1 for exactly one fraction in lowest terms, nothing else (reasoning-gym matches only a prefix, so
    "$\\frac{a}{b}$ or $\\frac{c}{d}$" and "$\\frac{a}{b}$ apples" scored 1); 0 otherwise. Its partial credit is dropped:
    binary mode would zero it anyway, and partial mode should not pay for wrong fractions."""
    m = _FRACTION.fullmatch(answer)
    if m is None:
        return 0.0
    num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
    md = task.metadata
    return 1.0 if (int(num), int(den)) == (md["simplified_numerator"], md["simplified_denominator"]) else 0.0


def _is_formula(answer: str, task: Task) -> bool:
    # reasoning-gym parses any unknown word as a fresh variable, so "zzz" scores 0.25 when the premises are
    # contradictory; only the task's variables, the five connectives, parentheses and spaces may appear.
    allowed = _LOGIC_SYMBOLS | set(task.metadata["variables"])
    return all(c in allowed for c in answer)


def score_answer(task: Task, answer: str | None) -> float:
    """Verifier score in [0, 1] for an extracted answer (stripped first). Never raises; anything odd scores 0."""
    try:
        if not isinstance(answer, str):
            return 0.0
        answer = answer.strip()
        if task.ref.generator == "arith":
            # Gold is canonical (no sign, zeros, spaces or decimals), so equality is the canonical-integer test.
            return 1.0 if answer == task.answer else 0.0
        limit = _MAX_ANSWER_CHARS_BY_FAMILY.get(task.ref.generator, _MAX_ANSWER_CHARS)
        if not answer or len(answer) > limit:
            return 0.0
        if task.ref.generator == "binary_matrix":
            score = _score_binary_matrix(answer, task)
        elif task.ref.generator == "fraction_simplification":
            score = _score_fraction(answer, task)
        elif task.ref.generator == "propositional_logic" and not _is_formula(answer, task):
            score = 0.0
        else:
            ds = _rg_dataset(task.ref.generator, tuple(sorted(_validate_ref(task.ref).items())))
            entry = {"question": task.question, "answer": task.answer, "metadata": task.metadata}
            with _rg_guard(task.ref.generator):
                score = ds.score_answer(answer, entry)
        score = float(score)
        return score if 0.0 <= score <= 1.0 else 0.0  # NaN and out-of-range mean a scorer bug
    except Exception:
        return 0.0


# ---------------------------------------------------------------------------------------------------- sampling


def _check_weights(weights: Mapping[str, float]) -> list[tuple[str, float]]:
    if not isinstance(weights, Mapping) or not weights:
        raise TaskError("task weights must be a non-empty mapping")
    items = []
    for name in sorted(weights):  # sorted: the same rng draws give the same refs whatever the mapping order
        _spec(name)
        w = weights[name]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise TaskError(f"weight for {name!r} must be a finite number >= 0, got {w!r}")
        if w > 0:
            items.append((name, float(w)))
    if not items:
        raise TaskError("at least one task weight must be > 0")
    return items


def sample_refs(
    weights: Mapping[str, float],
    n: int,
    rng: random.Random,
    *,
    split: str = "train",
    configs: Mapping[str, Mapping[str, ConfigValue]] | None = None,
) -> list[TaskRef]:
    """n refs: family by weight, seed uniform in the split's seed range, index uniform in [0, 2**31).

    split "train" never yields a held-out ref; "test" draws fresh held-out refs (seeds >= HELDOUT_SEED_BASE).
    `configs` optionally overrides per-family config keys (the split key of arith is set from `split`).
    """
    if split not in SPLITS:
        raise TaskError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TaskError(f"n must be an int >= 0, got {n!r}")
    items = _check_weights(weights)
    names = [name for name, _ in items]
    cum_weights = list(_accumulate([w for _, w in items]))
    cfgs: dict[str, dict[str, ConfigValue]] = {}
    for name in names:
        cfg = dict((configs or {}).get(name, {}))
        if name == "arith":
            cfg["split"] = split
        cfgs[name] = _full_config(name, cfg)
    base = HELDOUT_SEED_BASE if split == "test" else 0
    refs = []
    for _ in range(n):
        name = rng.choices(names, cum_weights=cum_weights)[0]
        seed = base + rng.randrange(HELDOUT_SEED_BASE)
        index = rng.randrange(INDEX_LIMIT)
        refs.append(TaskRef.make(name, cfgs[name], seed, index))
    return refs


def training_configs(
    weights: Mapping[str, float], configs: Mapping[str, Mapping[str, ConfigValue]] | None = None
) -> dict[str, dict[str, ConfigValue]]:
    """The full config of every family `sample_refs(weights, ..., configs=configs)` draws training refs from."""
    out = {}
    for name, _ in _check_weights(weights):
        cfg = dict((configs or {}).get(name, {}))
        if name == "arith":
            cfg["split"] = "train"
        out[name] = _full_config(name, cfg)
    return out


def foreign_ref_reason(ref: TaskRef, allowed: Mapping[str, Mapping[str, ConfigValue]]) -> str | None:
    """Why a peer's ref is not one this node would have drawn itself, or None when it is.

    A receiver trains only on its own training distribution: a held-out ref would contaminate its evaluation, and a
    family or config it never chose is outside what it asked to learn (and may be expensive to build). Cheap: no task
    is built. `allowed` comes from `training_configs`.
    """
    if not isinstance(ref, TaskRef) or ref.generator not in allowed:
        return "foreign_task"
    if isinstance(ref.seed, bool) or not isinstance(ref.seed, int) or ref.seed >= HELDOUT_SEED_BASE:
        return "heldout_ref"
    try:
        cfg = _full_config(ref.generator, ref.config_dict())
    except (TaskError, TypeError, ValueError):
        return "foreign_config"
    if cfg != dict(allowed[ref.generator]):
        return "foreign_config"
    return None


def _accumulate(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def heldout_refs(generator: str, n: int, config: Mapping[str, ConfigValue] | None = None) -> list[TaskRef]:
    """A fixed evaluation set: seed HELDOUT_SEED_BASE, indices 0..n-1 (arith: split "test")."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= INDEX_LIMIT:
        raise TaskError(f"n must be an int in [0, 2**31], got {n!r}")
    cfg = dict(config or {})
    if generator == "arith":
        if cfg.get("split", "test") != "test":
            raise TaskError("held-out arith refs use split 'test'")
        cfg["split"] = "test"
    full = _full_config(generator, cfg)
    return [TaskRef.make(generator, full, HELDOUT_SEED_BASE, i) for i in range(n)]


def parse_task_weights(spec: str) -> dict[str, float]:
    """Parse a CLI flag: "arith" or "arith:2,basic_arithmetic:1" (a bare name weighs 1)."""
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError("task spec is empty")
    out: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise TaskError(f"empty entry in task spec {spec!r}")
        name, sep, raw = part.partition(":")
        name = name.strip()
        _spec(name)
        if name in out:
            raise TaskError(f"task {name!r} listed twice")
        if sep:
            try:
                weight = float(raw.strip())
            except ValueError:
                raise TaskError(f"bad weight {raw!r} for task {name!r}") from None
        else:
            weight = 1.0
        if not math.isfinite(weight) or weight < 0:
            raise TaskError(f"weight for {name!r} must be finite and >= 0, got {raw!r}")
        out[name] = weight
    if not any(w > 0 for w in out.values()):
        raise TaskError("at least one task weight must be > 0")
    return out


__all__ = [
    "FAMILIES",
    "HELDOUT_SEED_BASE",
    "foreign_ref_reason",
    "training_configs",
    "RG_FAMILIES",
    "Task",
    "TaskError",
    "arith_is_heldout",
    "build_task",
    "default_config",
    "heldout_refs",
    "make_ref",
    "parse_task_weights",
    "sample_refs",
    "score_answer",
]
