"""Goat-style arithmetic problems, the fine-tuning data of the paper's Goat and FLoat models.

>>> make_arithmetic(1, max_digits=2, seed=0)[0]["question"]  # doctest: +SKIP
'What is 12 + 7 ?'
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from .prompts import ARITHMETIC_OPS, DataError
from .samplers import stream_rng

__all__ = ["make_arithmetic"]


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


