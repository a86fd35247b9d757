"""Goat-style arithmetic problems, the fine-tuning data of the paper's Goat and FLoat models.

>>> make_arithmetic(1, max_digits=2, seed=0)[0]["question"]
'What is 4 + 34 ?'
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping, Sequence

from .prompts import ARITHMETIC_OPS, DataError
from .samplers import stream_rng

__all__ = ["COMMUTATIVE_OPS", "HELDOUT_SEED", "HELDOUT_SIZE", "exact_match_by_digits", "heldout_arithmetic",
           "heldout_keys", "make_arithmetic", "operand_digits", "parse_problem", "problem_key"]

#: Operations whose operands commute: ``3 + 4`` and ``4 + 3`` are one problem.
COMMUTATIVE_OPS = frozenset({"+", "*"})
_PROBLEM = re.compile(r"(\d+)\s*([-+*/])\s*(\d+)")


# --------------------------------------------------------------------------------------------
# Arithmetic (Goat-style fine-tuning data)
# --------------------------------------------------------------------------------------------


def _operand(rng: random.Random, max_digits: int, minimum: int = 0) -> int:
    digits = rng.randint(1, max_digits)
    low = 10 ** (digits - 1) if digits > 1 else minimum
    return rng.randint(max(low, minimum), 10 ** digits - 1)


def make_arithmetic(n: int, max_digits: int = 4, seed: int = 0,
                    ops: Sequence[str] = ARITHMETIC_OPS) -> list[dict[str, Any]]:
    """Goat-style arithmetic question/answer pairs, the four operations in turn.

    Operand digit counts are uniform in ``1..max_digits``; subtraction may go negative;
    division is integer division written ``"q R r"`` (``"q"`` when ``r == 0``), divisor >= 1.
    Every token is in :data:`entity_tracking.vocab.ARITHMETIC_WORDS` plus ``What``/``is``.
    """
    bad = [o for o in ops if o not in ARITHMETIC_OPS]
    if bad or not ops:
        raise DataError(f"ops must be a non-empty subset of {ARITHMETIC_OPS}, got {list(ops)}")
    if max_digits < 1:
        raise DataError(f"max_digits must be >= 1, got {max_digits}")
    rng = stream_rng(seed, "arithmetic")
    out = []
    for i in range(n):
        op = ops[i % len(ops)]
        a = _operand(rng, max_digits)
        b = _operand(rng, max_digits, minimum=1 if op == "/" else 0)
        if op == "+":
            answer = str(a + b)
        elif op == "-":
            answer = str(a - b)
        elif op == "*":
            answer = str(a * b)
        else:
            q, r = divmod(a, b)
            answer = f"{q} R {r}" if r else str(q)
        question = f"What is {a} {op} {b} ?"
        out.append({"id": i, "op": op, "a": a, "b": b, "question": question, "answer": answer,
                    "text": f"{question} {answer}"})
    return out


# --------------------------------------------------------------------------------------------
# Problems as keys: what "the same problem" means for a held-out set
# --------------------------------------------------------------------------------------------


def problem_key(a: int, op: str, b: int) -> tuple[int, str, int]:
    """The canonical form of the problem ``a op b``: two problems with the same key are the same
    problem, whatever their wording. The operands of ``+`` and ``*`` are sorted (``4 + 3`` is
    ``3 + 4``), those of ``-`` and ``/`` kept in order.

    >>> problem_key(4, "+", 3) == problem_key(3, "+", 4), problem_key(4, "-", 3) == problem_key(3, "-", 4)
    (True, False)
    """
    if op not in ARITHMETIC_OPS:
        raise DataError(f"problem_key: unknown operation {op!r} in {a} {op} {b}; one of {ARITHMETIC_OPS}")
    a, b = int(a), int(b)
    return (min(a, b), op, max(a, b)) if op in COMMUTATIVE_OPS else (a, op, b)


def parse_problem(text: str) -> tuple[int, str, int]:
    """``(a, op, b)`` of the first problem written in ``text``, in the fine-tuning wording
    (``What is 12 + 7 ?``) or the organism's pretraining wording (``12 + 7 =``, with or without spaces)."""
    m = _PROBLEM.search(text)
    if not m:
        raise DataError(f"no arithmetic problem 'a op b' in {text!r}")
    return int(m.group(1)), m.group(2), int(m.group(3))


def operand_digits(a: int, b: int) -> int:
    """The digit count of a problem: that of its longer operand."""
    return max(len(str(abs(int(a)))), len(str(abs(int(b)))))


def _problem_of(p: Mapping[str, Any] | Sequence[str] | str) -> tuple[int, str, int]:
    if isinstance(p, Mapping):
        return int(p["a"]), str(p["op"]), int(p["b"])
    return parse_problem(p if isinstance(p, str) else p[0])


def exact_match_by_digits(correct: Sequence[Any], problems: Sequence[Any], max_digits: int) -> dict[str, float | None]:
    """Exact match per digit count: ``{"1": .., ..., str(max_digits): ..}``, the mean of ``correct``
    (one boolean per problem) over the problems whose longer operand has that many digits
    (:func:`operand_digits`); None where the set has no such problem. ``problems``: records of
    :func:`make_arithmetic`, ``(question, answer)`` pairs or questions."""
    if len(correct) != len(problems):
        raise ValueError(f"exact_match_by_digits: {len(correct)} results for {len(problems)} problems")
    sums: dict[int, list[float]] = {d: [] for d in range(1, max_digits + 1)}
    for ok, p in zip(correct, problems):
        a, _, b = _problem_of(p)
        d = operand_digits(a, b)
        if d not in sums:
            raise ValueError(f"exact_match_by_digits: problem {a} ? {b} has {d} digits, above max_digits={max_digits}")
        sums[d].append(float(ok))
    return {str(d): (sum(v) / len(v) if v else None) for d, v in sums.items()}


# --------------------------------------------------------------------------------------------
# The held-out problems: never trained on, by the fine-tunes nor by the base's pretraining
# --------------------------------------------------------------------------------------------

#: The seed of the held-out stream, and how many problems it holds out.
HELDOUT_SEED = 99991
HELDOUT_SIZE = 200


def heldout_arithmetic(max_digits: int, ops: Sequence[str], n: int = HELDOUT_SIZE) -> list[dict[str, Any]]:
    """The first ``n`` held-out arithmetic problems of a fine-tuning recipe with operands of up
    to ``max_digits`` digits and operations ``ops`` (:func:`make_arithmetic` records): the
    problems every fine-tune's exact match is measured on, which no training stream of the
    project holds (the fine-tunes' :func:`~entity_tracking.organism.finetune.training_problems`
    and the base organism's pretraining arithmetic filter them out by :func:`problem_key`)."""
    if not 1 <= n <= HELDOUT_SIZE:
        raise DataError(f"heldout: n={n} held-out problems asked for; a recipe holds out 1..{HELDOUT_SIZE}")
    return make_arithmetic(n, max_digits, seed=HELDOUT_SEED, ops=list(ops))


def heldout_keys(max_digits: int, ops: Sequence[str]) -> frozenset:
    """The :func:`problem_key` of every held-out problem (:func:`heldout_arithmetic`)."""
    return frozenset(problem_key(r["a"], r["op"], r["b"]) for r in heldout_arithmetic(max_digits, ops))
