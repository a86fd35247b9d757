"""A word-level tokenizer for the task's closed vocabulary, saved as a regular HF tokenizer.

The ``ci`` profile's tiny model and the CPU model organism read text through this tokenizer:
one token per word, punctuation isolated, digits split one per token (as Llama's tokenizer does),
and a BOS token prepended like Llama's. ``save_pretrained`` writes ``tokenizer.json`` so that
``AutoTokenizer.from_pretrained(dir)`` loads it like any hub tokenizer, offsets included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from ..task.vocab import SPECIAL_TOKENS, task_vocabulary

__all__ = ["build_word_tokenizer", "split_words"]

#: How the word-level tokenizer splits text before its lookup: at whitespace, each punctuation
#: mark on its own, each digit on its own.
WORD_SPLIT = pre_tokenizers.Sequence(
    [
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ]
)


def split_words(text: str) -> list[str]:
    """The words the word-level tokenizer reads ``text`` as, one token each (BOS not included):
    ``split_words("the cup is in Box F. Box F contains the")`` is
    ``["the", "cup", "is", "in", "Box", "F", ".", "Box", "F", "contains", "the"]``."""
    return [w for w, _ in WORD_SPLIT.pre_tokenize_str(text)]


def build_word_tokenizer(
    words: Iterable[str] | None = None,
    save_dir: str | Path | None = None,
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """Build (and optionally save) a word-level fast tokenizer over ``words``.

    ``words`` defaults to :func:`entity_tracking.task.vocab.task_vocabulary`; special tokens
    (``<s>``, ``</s>``, ``<unk>``, ``<pad>``) are always present with ids 0..3.
    """
    vocab_words = list(SPECIAL_TOKENS.values())
    for w in words if words is not None else task_vocabulary():
        if w not in vocab_words:
            vocab_words.append(w)
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tok = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = WORD_SPLIT
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    bos = SPECIAL_TOKENS["bos_token"]
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.padding_side = "right"
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast
