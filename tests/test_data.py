"""The data chapter's library: prompts, positions, counterfactuals, desiderata, arithmetic, files.

Targets are re-derived here from the prompt *text* with a parser written independently of
:mod:`entity_tracking.task` (regular expressions over the sentence), so a generator bug cannot
hide behind a shared helper.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from entity_tracking import task as D
from entity_tracking.config import DataSpec
from entity_tracking.model.tokenizer import build_word_tokenizer
from entity_tracking.schema import position_column
from entity_tracking.task.prompts import render_parts
from entity_tracking.task.vocab import ARITHMETIC_WORDS, FUNCTION_WORDS, LABELS, OBJECTS

from conftest import HELD_OUT_OBJECTS

K = 7  # the paper's number of boxes
N_PAIRS = 24  # pairs per desideratum in these tests

# --------------------------------------------------------------------------------------------
# An independent parser of prompt text
# --------------------------------------------------------------------------------------------

_SEGMENT = re.compile(
    r"(?:\b[Tt]he (?P<o1>[a-z]+),? is (?:not |contained )?in (?:the )?Box (?P<l1>[A-Z])\b)"
    r"|(?:\bBox (?P<l2>[A-Z]) contains the (?P<o2>[a-z]+))"
)


def parse(text: str) -> tuple[list[str], list[str], str]:
    """(objects, labels, query label) of a prompt, read from its text alone."""
    context, query = text.rsplit(". ", 1)
    m = re.fullmatch(r"Box ([A-Z]) contains the", query)
    assert m, f"query part {query!r} has the wrong form"
    objs, labs = [], []
    for s in _SEGMENT.finditer(context):
        objs.append(s.group("o1") or s.group("o2"))
        labs.append(s.group("l1") or s.group("l2"))
    return objs, labs, m.group(1)


def derive_target(name: str, base_text: str, source_text: str) -> tuple[str, int, int]:
    """(target word, base query index, source query index in its original segments) from text."""
    b_objs, b_labs, b_q = parse(base_text)
    s_objs, s_labs, s_q = parse(source_text)
    q_b = b_labs.index(b_q)
    p_s = s_labs.index(s_q)
    if name == "add_seg_start":  # the extra segment is the first one
        p_s -= 1
    if name == "object_value":
        return s_objs[p_s], q_b, p_s
    if name == "box_label_value":
        return b_objs[b_labs.index(s_q)], q_b, p_s
    if name == "incorrect_segment":
        return b_objs[(p_s + 1) % len(b_objs)], q_b, p_s
    return b_objs[p_s], q_b, p_s


# How each variant's source text must look (its definition, checked on the text).
SOURCE_SHAPE = {
    "positional": lambda t, k: len(parse(t)[0]) == k,
    "object_value": lambda t, k: len(parse(t)[0]) == k,
    "box_label_value": lambda t, k: len(parse(t)[0]) == k,
    "incorrect_segment": lambda t, k: len(parse(t)[0]) == k,
    "random_text_start": lambda t, k: t.startswith("There are a bunch of boxes containing objects, the "),
    "random_text_end": lambda t, k: ", these are a bunch of boxes containing objects. Box " in t,
    "add_tokens_btw_box_and_obj": lambda t, k: t.count(" is contained in the Box ") == 1,
    "add_seg_start": lambda t, k: len(parse(t)[0]) == k + 1,
    "add_seg_end": lambda t, k: len(parse(t)[0]) == k + 1,
    "add_box_before_correct_segment": lambda t, k: t.count("three additional boxes, Box PP, Box BB and Box AA, ") == 1,
    "altered_box_obj_order": lambda t, k: len(re.findall(r"Box [A-Z] contains the [a-z]+", t)) == 1,
    "altered_box_obj_association": lambda t, k: t.count(" is not in Box ") == 1,
    "no_comma": lambda t, k: "," not in t and len(parse(t)[0]) == k,
    "add_comma": lambda t, k: t.count(", is in Box ") == k,
}


def word_of(tok, token_id: int) -> str:
    return tok.decode([int(token_id)]).strip()


def in_context_id(tok, word: str) -> int:
    """The id of ``word`` after "contains the", found by diffing two encodings (independent of data.py)."""
    a = tok("Box F contains the")["input_ids"]
    b = tok(f"Box F contains the {word}")["input_ids"]
    assert b[: len(a)] == a and len(b) == len(a) + 1, f"{word!r} is not one token after 'the'"
    return b[-1]


@pytest.fixture(scope="module")
def vocab(word_tokenizer):
    return D.build_vocabulary(word_tokenizer, num_boxes=K, min_objects=2 * K + 1)


@pytest.fixture(scope="module")
def desiderata(word_tokenizer, vocab):
    return {name: D.make_desiderata(word_tokenizer, name, N_PAIRS, K, seed=3, vocab=vocab) for name in D.DESIDERATA}


# --------------------------------------------------------------------------------------------
# Vocabulary: single tokens in context, clear errors
# --------------------------------------------------------------------------------------------


class TestVocabulary:
    def test_word_tokenizer_keeps_every_object_and_label(self, word_tokenizer):
        v = D.build_vocabulary(word_tokenizer, num_boxes=K)
        assert v.objects == OBJECTS and v.labels == LABELS
        assert all(v.token_id(w) == word_tokenizer.convert_tokens_to_ids(w) for w in OBJECTS + LABELS)

    @pytest.mark.parametrize("which", ["gpt2_style", "llama_style"])
    def test_default_objects_filtered_to_single_tokens(self, all_tokenizers, which):
        tok = all_tokenizers[which]
        v = D.build_vocabulary(tok, num_boxes=K)
        expected = []
        for w in OBJECTS:
            try:
                in_context_id(tok, w)
                expected.append(w)
            except AssertionError:
                pass
        assert list(v.objects) == expected
        assert set(v.rejected_objects) == set(OBJECTS) - set(expected)
        assert set(v.rejected_objects) <= set(HELD_OUT_OBJECTS)
        assert all(v.token_id(w) == in_context_id(tok, w) for w in v.objects)

    @pytest.mark.parametrize("which", ["word", "gpt2_style", "llama_style"])
    def test_explicit_multi_token_object_fails_naming_the_word(self, all_tokenizers, which):
        objs = list(OBJECTS[:20]) + ["harmonica"]
        with pytest.raises(D.DataError, match="harmonica"):
            D.build_vocabulary(all_tokenizers[which], objs, num_boxes=K)

    def test_too_few_single_token_objects_names_tokenizer_and_counts(self, tmp_path):
        few = list(OBJECTS[:8])
        tok = build_word_tokenizer(list(FUNCTION_WORDS) + list(LABELS) + few, save_dir=tmp_path / "tok")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
        with pytest.raises(D.DataError) as err:
            D.build_vocabulary(tok, num_boxes=K, min_objects=2 * K + 1)
        msg = str(err.value)
        assert type(tok).__name__ in msg and str(tmp_path / "tok") in msg
        assert "at least 15" in msg and "only 8 of 100" in msg
        assert OBJECTS[8] in msg  # a word that failed

    def test_too_few_names_a_stand_in_tokenizer(self, gpt2_style_tokenizer):
        with pytest.raises(D.DataError, match=r"stand-in/gpt2-style-bpe.*at least 99.*only 90 of 100.*wool"):
            D.build_vocabulary(gpt2_style_tokenizer, num_boxes=K, min_objects=99)

    def test_words_merging_with_punctuation_are_not_single_tokens(self, comma_merging_tokenizer):
        tok = comma_merging_tokenizer
        assert "▁F," in tok.tokenize("The apple is in Box F, the cup")
        with pytest.raises(D.DataError, match="metaspace-merging-commas"):
            D.build_vocabulary(tok, num_boxes=K)
        text = "The apple is in Box F, the cup is in Box A. Box F contains the"
        with pytest.raises(D.DataError, match="'F' is not exactly one token"):
            D.locate_spans(tok, [text], [[(20, 21)]])

    def test_num_boxes_larger_than_labels_fails(self, word_tokenizer):
        with pytest.raises(D.DataError, match="num_boxes=27 exceeds the 26"):
            D.make_eval_prompts(word_tokenizer, 10, num_boxes=27)

    def test_more_contexts_than_exist_fails(self, word_tokenizer):
        v = D.build_vocabulary(word_tokenizer, ["apple", "cup"], ["A", "B"], num_boxes=2)
        with pytest.raises(D.DataError, match="distinct contexts"):
            D.make_eval_prompts(word_tokenizer, 10, num_boxes=2, vocab=v)

    def test_labels_must_be_uppercase_letters(self, word_tokenizer):
        with pytest.raises(D.DataError, match="uppercase"):
            D.build_vocabulary(word_tokenizer, labels=["A", "b"], num_boxes=2)


# --------------------------------------------------------------------------------------------
# Prompts and token positions
# --------------------------------------------------------------------------------------------


class TestPrompts:
    def test_eval_prompts_follow_the_template(self, word_tokenizer, vocab):
        prompts = D.make_eval_prompts(word_tokenizer, 3 * K, K, seed=1, vocab=vocab)
        for p in prompts:
            objs, labs, q = parse(p["text"])
            assert (objs, labs, q) == (p["objects"], p["labels"], p["query_label"])
            assert len(set(objs)) == K and len(set(labs)) == K
            assert p["answer"] == objs[labs.index(q)]
            assert p["target_id"] == word_tokenizer.convert_tokens_to_ids(p["answer"])
        assert [p["query_index"] for p in prompts] == list(range(K)) * 3  # each context queried at every box
        assert len({p["context_id"] for p in prompts}) == 3

    def test_paper_layout_is_recovered_not_hard_coded(self, word_tokenizer, vocab):
        # With BOS and one token per word the reference's 54-token layout comes out of the offsets.
        p = D.make_eval_prompts(word_tokenizer, 1, K, vocab=vocab)[0]
        segment = len("the x is in Box L ,".split())
        assert p["n_tokens"] == 54
        assert p["positions"]["labels"] == [6 + segment * i for i in range(K)]
        assert p["positions"]["query_label"] == p["positions"]["last"] - 2 == 51

    def test_records_positions_match_a_fresh_encoding(self, word_tokenizer, vocab):
        prompts = D.make_eval_prompts(word_tokenizer, 10, K, vocab=vocab)
        enc = D.encode_prompts(word_tokenizer, prompts, padding_side="right")
        for b, p in enumerate(prompts):
            assert enc["object_positions"][b].tolist() == p["positions"]["objects"]
            assert enc["label_positions"][b].tolist() == p["positions"]["labels"]
            assert enc["last_position"][b].item() == p["positions"]["last"]
            assert enc["target"][b].item() == p["target_id"]


def _mixed_batch(tok) -> list[dict]:
    """Prompts of different lengths and structures (3 and 5 boxes, perturbed sources)."""
    v3 = D.build_vocabulary(tok, num_boxes=3, min_objects=7)
    prompts = D.make_eval_prompts(tok, 3, 3, seed=0, vocab=v3)
    prompts += D.make_eval_prompts(tok, 2, 5, seed=1)
    for name in ("random_text_start", "add_seg_start", "altered_box_obj_order", "add_box_before_correct_segment",
                 "no_comma"):
        prompts += [r["source"] for r in D.make_desiderata(tok, name, 4, 3, seed=2, vocab=v3)[:1]]
    prompts += [r["source"] for r in D.make_path_patching_pairs(tok, 1, 3, seed=0, vocab=v3)]
    return prompts


class TestPositions:
    @pytest.mark.parametrize("side", ["left", "right"])
    @pytest.mark.parametrize("which", ["word", "word_no_bos", "gpt2_style", "llama_style"])
    def test_every_role_decodes_to_its_word(self, all_tokenizers, which, side):
        tok = all_tokenizers[which]
        prompts = _mixed_batch(tok)
        enc = D.encode_prompts(tok, prompts, padding_side=side)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        B, T = ids.shape
        assert len({len(p["text"]) for p in prompts}) > 1 and (enc["length"] < T).any()  # padding happened
        for b, p in enumerate(prompts):
            n = len(p["objects"])
            row = ids[b]
            for i in range(n):
                assert word_of(tok, row[enc["object_positions"][b, i]]) == p["objects"][i]
                assert word_of(tok, row[enc["label_positions"][b, i]]) == p["labels"][i]
            assert (enc["object_positions"][b, n:] == -1).all()
            assert word_of(tok, row[enc["query_label_position"][b]]) == p["query_label"]
            assert word_of(tok, row[enc["last_position"][b]]) == "the"
            prev = enc["prev_query_label_position"][b].item()
            if p["query_label"] in p["labels"]:
                assert word_of(tok, row[prev]) == p["query_label"] and prev < enc["query_label_position"][b]
            else:
                assert prev == -1
            for key in ("object_positions", "label_positions"):
                assert mask[b, enc[key][b, :n]].all()
            length = enc["length"][b].item()
            if side == "left":
                assert enc["last_position"][b] == T - 1 and mask[b, T - length:].all() and not mask[b, : T - length].any()
            else:
                assert enc["last_position"][b] == length - 1 and mask[b, :length].all() and not mask[b, length:].any()
            first = T - length if side == "left" else 0
            has_bos = which in ("word", "llama_style")
            assert (row[first].item() == tok.bos_token_id) == has_bos
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            assert (row[mask[b] == 0] == pad).all()

    def test_shapes_and_dtypes(self, word_tokenizer, vocab):
        prompts = D.make_eval_prompts(word_tokenizer, 5, K, vocab=vocab)
        enc = D.encode_prompts(word_tokenizer, prompts)
        assert enc["input_ids"].shape == enc["attention_mask"].shape == (5, 54)
        assert enc["object_positions"].shape == enc["label_positions"].shape == (5, K)
        for key in ("query_label_position", "prev_query_label_position", "last_position", "length", "target"):
            assert enc[key].shape == (5,)
        assert all(t.dtype == torch.long for t in enc.values())

    @pytest.mark.parametrize("which", ["word", "word_no_bos", "gpt2_style", "llama_style"])
    def test_prefix_fallback_agrees_with_offsets(self, all_tokenizers, which):
        tok = all_tokenizers[which]
        prompts = _mixed_batch(tok)
        a = D.encode_prompts(tok, prompts, method="offsets")
        b = D.encode_prompts(tok, prompts, method="prefix")
        for key in a:
            assert torch.equal(a[key], b[key]), key

    def test_target_is_the_next_token_after_the_prompt(self, llama_style_tokenizer):
        tok = llama_style_tokenizer
        for p in D.make_eval_prompts(tok, 4, K):
            full = tok(p["text"] + " " + p["answer"])["input_ids"]
            assert full[:-1] == tok(p["text"])["input_ids"] and full[-1] == p["target_id"]

    def test_token_table_roles(self, word_tokenizer, vocab):
        p = D.make_eval_prompts(word_tokenizer, 2, K, vocab=vocab)[1]
        rows = D.token_table(word_tokenizer, p)
        roles = [r["role"] for r in rows]
        assert roles.count("object") == roles.count("box label") == K
        assert roles[-1] == "last token" and roles[-3] == "query label" and roles[0] == "special"
        (prev,) = [r for r in rows if r["prev_query_label"]]
        (ans,) = [r for r in rows if r["answer"]]
        assert prev["token"] == p["query_label"] and ans["token"] == p["answer"]


# --------------------------------------------------------------------------------------------
# Desiderata
# --------------------------------------------------------------------------------------------


class TestDesiderata:
    def test_there_are_fourteen(self):
        assert len(D.DESIDERATA) == 14
        assert sum(d.group == "core" for d in D.DESIDERATA.values()) == 3

    @pytest.mark.parametrize("name", list(D.DESIDERATA))
    def test_target_rederived_from_text(self, word_tokenizer, desiderata, name):
        for r in desiderata[name]:
            word, q_b, p_s = derive_target(name, r["base"]["text"], r["source"]["text"])
            assert r["target_word"] == word
            assert r["target_id"] == word_tokenizer.convert_tokens_to_ids(word)
            assert (r["base_query_index"], r["source_query_index"]) == (q_b, p_s)
            assert SOURCE_SHAPE[name](r["source"]["text"], K), r["source"]["text"]
            base = r["base"]
            assert parse(base["text"])[:2] == (base["objects"], base["labels"])  # bases are plain prompts
            holder = r["base"] if r["target_from"] == "base" else r["source"]
            if not (name == "add_seg_start" and r["target_from"] == "source"):
                assert holder["objects"][r["target_index"]] == word

    @pytest.mark.parametrize("name", [n for n, d in D.DESIDERATA.items() if d.target != "box_label_value"])
    def test_positional_sources_never_share_the_base_query_index(self, desiderata, name):
        """Bug 1 of the reference: its base query index was always 0 (read from the query sentence)."""
        rows = desiderata[name]
        for r in rows:
            _, q_b, p_s = derive_target(name, r["base"]["text"], r["source"]["text"])
            assert p_s != q_b
            assert r["target_word"] != r["base_answer"]  # a positional target is never the base's own answer
        assert len({r["base_query_index"] for r in rows}) > 1  # not stuck at 0

    def test_query_labels_b_and_t_are_located_by_structure(self, word_tokenizer, vocab):
        """Bug 1, second half: substring search put labels 'B' and 'T' at index 0 ('Box', 'The')."""
        rows = D.make_desiderata(word_tokenizer, "positional", 400, K, seed=5, vocab=vocab)
        hit = {"B": 0, "T": 0}
        for r in rows:
            for prompt, idx in ((r["base"], r["base_query_index"]), (r["source"], r["source_query_index"])):
                if prompt["query_label"] in hit:
                    hit[prompt["query_label"]] += 1
                    assert prompt["labels"][idx] == prompt["query_label"]
        assert all(hit.values())

    @pytest.mark.parametrize("which", ["word", "llama_style", "gpt2_style"])
    def test_box_label_target_is_the_single_token_id_of_the_base_object(self, all_tokenizers, which):
        """Bug 2 of the reference: its target was ``encode(list_of_words)[1]``."""
        tok = all_tokenizers[which]
        for r in D.make_desiderata(tok, "box_label_value", 12, K, seed=0):
            b_objs, b_labs, _ = parse(r["base"]["text"])
            _, _, s_q = parse(r["source"]["text"])
            word = b_objs[b_labs.index(s_q)]
            assert r["target_word"] == word
            assert isinstance(r["target_id"], int) and r["target_id"] == in_context_id(tok, word)
            assert r["target_id"] != tok.unk_token_id

    def test_box_label_source_design(self, desiderata):
        for r in desiderata["box_label_value"]:
            b_objs, b_labs, b_q = parse(r["base"]["text"])
            s_objs, s_labs, s_q = parse(r["source"]["text"])
            assert s_q in b_labs and s_q != b_q
            positional = b_objs[s_labs.index(s_q)]
            assert positional != r["target_word"] != r["base_answer"] != positional  # three distinct readings

    @pytest.mark.parametrize("name", list(D.DESIDERATA))
    def test_source_objects_are_absent_from_the_base(self, desiderata, name):
        for r in desiderata[name]:
            assert not set(parse(r["base"]["text"])[0]) & set(parse(r["source"]["text"])[0])
            if D.DESIDERATA[name].target != "box_label_value":
                assert parse(r["source"]["text"])[2] not in parse(r["base"]["text"])[1]

    def test_incorrect_segment_target_is_neither_positional_nor_base_answer(self, desiderata):
        for r in desiderata["incorrect_segment"]:
            b_objs = parse(r["base"]["text"])[0]
            assert r["target_word"] not in (b_objs[r["source_query_index"]], r["base_answer"])

    def test_splits_are_50_25_25_in_order(self, desiderata):
        rows = desiderata["positional"]
        splits = [r["split"] for r in rows]
        n = len(rows)
        assert splits == ["train"] * (n // 2) + ["eval"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)

    def test_pairs_encode(self, word_tokenizer, desiderata):
        rows = desiderata["add_seg_start"]
        enc = D.encode_pairs(word_tokenizer, rows)
        assert enc["source"]["object_positions"].shape == (len(rows), K + 1)
        assert enc["target"].tolist() == [r["target_id"] for r in rows]
        for b, r in enumerate(rows):  # the source's previous query label is its correct segment's label
            pos = enc["source"]["prev_query_label_position"][b]
            assert word_of(word_tokenizer, enc["source"]["input_ids"][b, pos]) == r["source"]["query_label"]

    def test_unknown_desideratum(self, word_tokenizer):
        with pytest.raises(D.DataError, match="unknown desideratum"):
            D.make_desiderata(word_tokenizer, "positonal", 8)


# --------------------------------------------------------------------------------------------
# Path patching and mean ablation
# --------------------------------------------------------------------------------------------


class TestPathPatching:
    def test_sources_are_corrupt_contexts(self, word_tokenizer, vocab):
        pairs = D.make_path_patching_pairs(word_tokenizer, 40, K, seed=0, vocab=vocab)
        for r in pairs:
            b_objs, b_labs, b_q = parse(r["base"]["text"])
            s_objs, s_labs, s_q = parse(r["source"]["text"])
            assert s_q not in s_labs  # the query points at no box
            assert r["source_original_query_label"] in s_labs
            assert s_labs.index(r["source_original_query_label"]) == r["source_original_query_index"]
            assert r["source_original_query_index"] != b_labs.index(b_q)
            assert not set(s_objs) & set(b_objs)
            assert r["target_word"] == b_objs[b_labs.index(b_q)] == r["base"]["answer"]
            assert r["source"]["positions"]["prev_query_label"] is None
            assert 0 <= r["corrupt_label_index"] < K
        enc = D.encode_pairs(word_tokenizer, pairs)
        for b, r in enumerate(pairs):
            pos = enc["source"]["corrupt_label_position"][b]
            assert word_of(word_tokenizer, enc["source"]["input_ids"][b, pos]) == r["source"]["labels"][r["corrupt_label_index"]]


class TestMeanReference:
    @pytest.mark.parametrize("which", ["word", "gpt2_style", "llama_style"])
    def test_same_length_as_eval_and_no_answer(self, all_tokenizers, which):
        tok = all_tokenizers[which]
        ev = D.make_eval_prompts(tok, 14, K)
        ref = D.make_mean_reference_prompts(tok, 30, K, n_tokens=ev[0]["n_tokens"])
        assert {p["n_tokens"] for p in ev} == {p["n_tokens"] for p in ref}
        enc = D.encode_prompts(tok, ev + ref)
        assert (enc["length"] == enc["input_ids"].shape[1]).all()
        for p in ref:
            _, labs, q = parse(p["text"])
            assert q not in labs and p["answer"] is None and p["query_index"] is None


# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------


class TestArithmetic:
    def test_answers_are_correct(self):
        rows = D.make_arithmetic(400, max_digits=5, seed=1)
        for r in rows:
            m = re.fullmatch(r"What is (\d+) ([-+*/]) (\d+) \?", r["question"])
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            if op == "/":
                q, _, rem = (r["answer"] + " R 0").split(" ")[:3]
                q, rem = int(q), int(rem)
                assert a == q * b + rem and 0 <= rem < b
            else:
                assert int(r["answer"]) == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert max(len(str(a)), len(str(b))) <= 5
            assert r["text"] == f"{r['question']} {r['answer']}"
        assert {r["op"] for r in rows} == set(D.ARITHMETIC_OPS)
        assert any(" R " in r["answer"] for r in rows) and any(r["answer"].startswith("-") for r in rows)

    def test_every_token_is_in_the_word_tokenizer(self, word_tokenizer):
        unk = word_tokenizer.unk_token_id
        known = set(ARITHMETIC_WORDS) | {"is"}
        for r in D.make_arithmetic(60, seed=0):
            ids = word_tokenizer(r["text"])["input_ids"]
            assert unk not in ids
            assert set(word_tokenizer.convert_ids_to_tokens(ids[1:])) <= known

    def test_bad_ops(self):
        with pytest.raises(D.DataError, match="ops"):
            D.make_arithmetic(4, ops=["%"])


# --------------------------------------------------------------------------------------------
# Files: determinism, manifest, loaders
# --------------------------------------------------------------------------------------------

SMALL = DataSpec(num_boxes=4, seed=11, n_eval=10, n_path_patching=6, n_mean_reference=5, n_desiderata=8,
                 n_arithmetic=12, arithmetic_max_digits=3)


def _bytes(files: dict[str, Path]) -> dict[str, bytes]:
    return {k: p.read_bytes() for k, p in files.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory, word_tokenizer):
    d = tmp_path_factory.mktemp("data")
    return D.build_datasets(SMALL, d, word_tokenizer), d


class TestFiles:
    def test_same_seed_gives_byte_identical_files(self, built, tmp_path, word_tokenizer):
        files, _ = built
        again = D.build_datasets(SMALL, tmp_path, word_tokenizer)
        assert _bytes(files) == _bytes(again)

    def test_different_seed_gives_different_files(self, built, tmp_path, word_tokenizer):
        files, _ = built
        other = D.build_datasets(SMALL.model_copy(update={"seed": 12}), tmp_path, word_tokenizer)
        a, b = _bytes(files), _bytes(other)
        assert all(a[k] != b[k] for k in a)

    def test_every_file_is_written_and_loads(self, built):
        files, d = built
        assert set(files) == {"eval", "path_patching", "mean_reference", "arithmetic", "manifest"} | {
            f"desiderata/{n}" for n in D.DESIDERATA}
        m = D.load_manifest(d)
        assert m["schema_version"] == D.SCHEMA_VERSION and m["seed"] == 11 and m["num_boxes"] == 4
        assert m["counts"]["eval"] == len(D.load_eval_prompts(d)) == 10
        assert m["counts"]["path_patching"] == len(D.load_path_patching(d)) == 6
        assert m["counts"]["mean_reference"] == len(D.load_mean_reference(d)) == 5
        assert m["counts"]["arithmetic"] == len(D.load_arithmetic(d)) == 12
        for name in D.DESIDERATA:
            assert len(D.load_desiderata(d, name)) == m["counts"][f"desiderata/{name}"] == 8
        assert [len(D.load_desiderata(d, "positional", s)) for s in D.SPLITS] == [4, 2, 2]
        assert m["tokenizer"]["adds_bos"] is True and m["prompt_tokens"] == 1 + 7 * 4 + 4

    def test_lines_have_sorted_keys(self, built):
        files, _ = built
        line = files["eval"].read_text().splitlines()[0]
        assert line.index('"answer"') < line.index('"text"')

    def test_rebuild_is_skipped_unless_forced(self, built, word_tokenizer):
        files, d = built
        before = {k: p.stat().st_mtime_ns for k, p in files.items()}
        D.build_datasets(SMALL, d, word_tokenizer)
        assert {k: p.stat().st_mtime_ns for k, p in files.items()} == before
        D.build_datasets(SMALL, d, word_tokenizer, force=True)
        assert files["eval"].stat().st_mtime_ns != before["eval"]

    def test_profile_objects_must_be_single_tokens(self, tmp_path, word_tokenizer):
        spec = SMALL.model_copy(update={"objects": list(OBJECTS[:12]) + ["harmonica"]})
        with pytest.raises(D.DataError, match="harmonica"):
            D.build_datasets(spec, tmp_path, word_tokenizer)

    def test_missing_files_say_how_to_build(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="build_datasets"):
            D.load_eval_prompts(tmp_path)


def test_render_parts_are_the_prompts_pieces_and_the_question_follows_the_context():
    for rec in (D.make_prompt(["comb", "cup"], ["U", "F"], "F"),
                D.make_prompt(["comb", "cup"], ["U", "F"], "F", prefix=D.RANDOM_TEXT_START, forms=["box_contains", "is_in"])):
        parts, spans = render_parts(rec)
        text, same = D.render_prompt(rec)
        assert "".join(parts) == text == rec["text"] and spans == same and all(parts)
        assert text[spans["question"][0]:] == ". Box F contains the" and text[spans["question"][1]:] == ""
    parts, _ = render_parts(D.make_prompt(["comb", "cup"], ["U", "F"], "F"))
    assert parts[:4] == ["The ", "comb", " is in Box ", "U"] and parts[-2:] == ["F", " contains the"]


def test_a_position_is_named_by_its_key_and_read_from_a_batch_column():
    tok = build_word_tokenizer()
    prompts = D.make_eval_prompts(tok, 3, num_boxes=3, seed=0)
    batch = D.encode_prompts(tok, prompts)
    assert position_column("last") == "last_position"
    assert D.positions_at(batch, "last").tolist() == [p["positions"]["last"] for p in prompts]
    assert D.positions_at(batch, "query_label").tolist() == [p["positions"]["query_label"] for p in prompts]
    assert {"last", "query_label", "prev_query_label"} <= set(D.position_keys(batch))
    with pytest.raises(D.DataError, match="no positions for 'object'.*position keys: \\["):
        D.positions_at(batch, "object")
    with pytest.raises(ValueError, match="'last_position' is not a position key"):
        D.positions_at(batch, "last_position")
