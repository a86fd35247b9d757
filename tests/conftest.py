"""Shared offline fixtures: tokenizers built locally in well under a second.

No hub is reachable, so the tokenizer families the data code must handle are stood in for by
small tokenizers trained here with the ``tokenizers`` library on the task's own words:

* ``word_tokenizer`` / ``word_tokenizer_no_bos``: the project's word-level tokenizer
  (:func:`entity_tracking.model.tokenizer.build_word_tokenizer`), with and without a BOS token;
* ``gpt2_style_tokenizer``: byte-level BPE like GPT-2: no BOS, words carry a leading space
  (``Ġapple``), punctuation split off by the byte-level pre-tokenizer;
* ``llama_style_tokenizer``: BPE over SentencePiece-style ``▁`` pieces like Llama: ``<s>``
  prepended, ``▁`` only on the first word of the text added (``prepend_scheme="first"``),
  punctuation split off;
* ``comma_merging_tokenizer``: the same without the punctuation split, so ``▁F,`` can become one
  token: a tokenizer on which labels are *not* single tokens in context.

The stand-ins never see the last :data:`HELD_OUT_OBJECTS` words of ``OBJECTS`` while training, so
most of those end up multi-token: the vocabulary filter has something to reject.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from entity_tracking.model.tokenizer import build_word_tokenizer
from entity_tracking.task.vocab import FUNCTION_WORDS, LABELS, OBJECTS

HELD_OUT_OBJECTS: tuple[str, ...] = OBJECTS[-10:]
TRAIN_OBJECTS: tuple[str, ...] = OBJECTS[:-10]
STAND_IN_VOCAB_SIZE = 1500


def _corpus(repeats: int = 3) -> list[str]:
    """Sentences in the task's templates over the training objects and every label."""
    lines = [" ".join(FUNCTION_WORDS)] * repeats
    n_obj, n_lab = len(TRAIN_OBJECTS), len(LABELS)
    for r in range(repeats):
        for i, obj in enumerate(TRAIN_OBJECTS):
            lab = LABELS[(i + r) % n_lab]
            other, lab2 = TRAIN_OBJECTS[(i + 7 * r + 1) % n_obj], LABELS[(i + r + 5) % n_lab]
            lines.append(f"The {obj} is in Box {lab}, the {other} is in Box {lab2}. Box {lab} contains the {obj}")
            lines.append(f"the {other}, is in Box {lab2} the {obj} is not in Box {lab}. Box {lab2} contains the {other}")
    return lines


def _bpe(pre_tokenizer, decoder, special: list[str], add_prefix_space_alphabet: bool) -> Tokenizer:
    tk = Tokenizer(models.BPE(unk_token=None if add_prefix_space_alphabet else "<unk>"))
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=STAND_IN_VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if add_prefix_space_alphabet else [],
        show_progress=False,
    )
    tk.train_from_iterator(_corpus(), trainer)
    return tk


@pytest.fixture(scope="session")
def word_tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="session")
def word_tokenizer_no_bos():
    return build_word_tokenizer(add_bos=False)


@pytest.fixture(scope="session")
def gpt2_style_tokenizer():
    tk = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), ["<|endoftext|>"], True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", name_or_path="stand-in/gpt2-style-bpe")
    tok.padding_side = "right"
    return tok


def _llama_like(split_punctuation: bool, name: str):
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    pre = pre_tokenizers.Sequence([meta, pre_tokenizers.Punctuation(behavior="isolated")]) if split_punctuation else meta
    tk = _bpe(pre, decoders.Metaspace(replacement="▁", prepend_scheme="first"), ["<unk>", "<s>", "</s>"], False)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", name_or_path=name
    )
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def llama_style_tokenizer():
    return _llama_like(True, "stand-in/llama-style-metaspace")


@pytest.fixture(scope="session")
def comma_merging_tokenizer():
    return _llama_like(False, "stand-in/metaspace-merging-commas")


@pytest.fixture(scope="session")
def all_tokenizers(word_tokenizer, word_tokenizer_no_bos, gpt2_style_tokenizer, llama_style_tokenizer):
    return {
        "word": word_tokenizer,
        "word_no_bos": word_tokenizer_no_bos,
        "gpt2_style": gpt2_style_tokenizer,
        "llama_style": llama_style_tokenizer,
    }


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """Every chapter executed on the ci profile through the runner (reusing up-to-date results)
    and the book built with -W into a temporary folder; returns its ``index.html``."""
    from pathlib import Path

    from entity_tracking.book import runner
    from entity_tracking.config import find_repo_root

    repo = find_repo_root(Path(__file__).parent)
    out = tmp_path_factory.mktemp("book")
    runner.run_chapters("ci", repo)
    return runner.build_book("ci", repo, out_root=out)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one torch thread avoids oversubscription stalls
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
