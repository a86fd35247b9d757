"""The words of the task, shared by the data generator and the project's own word-level tokenizer.

The paper's prompts use lowercase everyday objects and uppercase single-letter box labels.
``OBJECTS`` is the project's own list of common concrete nouns (the paper filtered a BNC-ranked
list to single Llama tokens; the filter for any tokenizer lives in :mod:`entity_tracking.task`).
``FUNCTION_WORDS`` covers every template and desideratum variant of the data chapter, and
``ARITHMETIC_WORDS`` the Goat-style arithmetic of the fine-tuning data.
"""

from __future__ import annotations

import string

OBJECTS: tuple[str, ...] = (
    "apple", "bag", "ball", "banana", "bell", "belt", "bike", "boat", "bone", "book",
    "boot", "bottle", "bowl", "bread", "brick", "brush", "bucket", "cake", "camera", "candle",
    "cap", "car", "card", "carpet", "chain", "chair", "cheese", "clock", "coat", "coin",
    "comb", "cookie", "cup", "dish", "doll", "drum", "egg", "fan", "flag", "flower",
    "fork", "glass", "glove", "guitar", "hammer", "hat", "horn", "jacket", "jar", "key",
    "kite", "knife", "lamp", "leaf", "lemon", "letter", "lock", "magnet", "map", "mask",
    "milk", "mirror", "mug", "nail", "needle", "onion", "orange", "paper", "pen", "pencil",
    "phone", "piano", "pillow", "pipe", "plate", "radio", "ring", "rope", "ruler", "scarf",
    "shirt", "shoe", "soap", "sock", "spoon", "stamp", "stone", "sugar", "table", "tape",
    "ticket", "toy", "towel", "tray", "wallet", "watch", "wheel", "whistle", "wire", "wool",
)

LABELS: tuple[str, ...] = tuple(string.ascii_uppercase)

FUNCTION_WORDS: tuple[str, ...] = (
    "The", "the", "is", "in", "Box", "contains", ",", ".",
    # desideratum variants (paper-methods §1.4)
    "There", "are", "a", "bunch", "of", "boxes", "containing", "objects", "these",
    "contained", "not", "there", "three", "additional", "and", "PP", "BB", "AA",
)

ARITHMETIC_WORDS: tuple[str, ...] = tuple(string.digits) + (
    "+", "-", "*", "/", "=", "?", "What", "Answer", ":", "R",
)

SPECIAL_TOKENS: dict[str, str] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def task_vocabulary(objects: tuple[str, ...] | list[str] = OBJECTS) -> list[str]:
    """All words of the task, deduplicated, in a fixed order (special tokens first)."""
    words = list(SPECIAL_TOKENS.values()) + list(FUNCTION_WORDS) + list(LABELS) + list(objects) + list(ARITHMETIC_WORDS)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)
