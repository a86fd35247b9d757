"""Held out means held out: every pair of training and evaluation sets is audited by key.

Each audit replays a short stretch of the real generators at the default profile's settings
(``params/default.yaml`` through :func:`entity_tracking.config.load_profile`) and asks
:func:`entity_tracking.task.overlap` for the evaluation items found in training: the arithmetic
fine-tunes' streams against the recipe's held-out problems, the organism's base curriculum and the
positive control's stream against the book's evaluation contexts and the validation prompts, the
path-patching and DCM pairs against the evaluation contexts. Planted overlaps show the audit can
fail.
"""

from __future__ import annotations

import importlib
import random

import pytest

from entity_tracking import organism as O
from entity_tracking import task as D
from entity_tracking.config import load_profile
from entity_tracking.io import ResultsPaths, read_json
from entity_tracking.model.tokenizer import build_word_tokenizer
from entity_tracking.organism import curriculum
from entity_tracking.organism.train import pretraining_exclusions

F = importlib.import_module("entity_tracking.organism.finetune")  # the module (the package exports a function of that name)

STEPS = 6  # replayed steps per stream (per curriculum stage for the base)


@pytest.fixture(scope="module")
def default():
    return load_profile("default")


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def eval_records(default, tok):
    return D.make_eval_prompts(tok, default.data.n_eval, num_boxes=default.data.num_boxes, seed=default.data.seed)


def _short(ft, **kw):
    """The default recipe with its streams cut to a few steps (the held-out set does not depend on length)."""
    return ft.model_copy(update={"steps": STEPS, "steps_lora": STEPS, **kw})


def _keys(records):
    return [D.problem_key(r["a"], r["op"], r["b"]) for r in records]


def _contexts(rows, tok):
    """The context key of every row of an organism batch (or of token-id lists): the words after BOS
    up to the first ``.``."""
    inv = {i: w for w, i in tok.get_vocab().items()}
    out = []
    for row in rows.input_ids.tolist() if hasattr(rows, "input_ids") else rows:
        words = [inv[i] for i in row[1:]]
        out.append(D.words_context_key(words[: words.index(".")]))
    return out


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def test_problem_key_identifies_commuted_sums_only():
    assert D.problem_key(4, "+", 3) == D.problem_key(3, "+", 4) == D.problem_key(*D.parse_problem("What is 3 + 4 ?"))
    assert D.problem_key(4, "*", 3) == D.problem_key(3, "*", 4)
    assert D.problem_key(4, "-", 3) != D.problem_key(3, "-", 4)
    assert D.problem_key(*D.parse_problem("12+7=")) == D.problem_key(7, "+", 12)  # the pretraining wording
    with pytest.raises(D.DataError, match="'%'"):
        D.problem_key(1, "%", 2)
    with pytest.raises(D.DataError, match="no arithmetic problem"):
        D.parse_problem("What is the answer ?")


def test_words_context_key_reads_every_format_alike(tok):
    objs, labs = ["cup", "key", "apple"], ["F", "A", "Q"]
    want = D.context_key(objs, labs)
    vocab = tok.get_vocab()
    for seed, fmt in enumerate(curriculum.STAGES):
        b = curriculum.make_batch(random.Random(seed), vocab, fmt, 1, (3, 3), 1, objects=objs)
        replay = random.Random(seed)  # make_batch draws the box count, the objects, then the labels
        replay.randint(3, 3)
        drawn = replay.sample(objs, 3)
        assert _contexts(b, tok) == [D.context_key(drawn, replay.sample(list(curriculum.LABELS), 3))], fmt
    rec = D.make_prompt(objs, labs, "A")
    assert D.record_context_key(rec) == want
    words = tok.convert_ids_to_tokens(tok(rec["text"])["input_ids"])
    assert D.words_context_key(words[: words.index(".")]) == want
    with pytest.raises(D.DataError, match="2 objects and 3 labels"):
        D.words_context_key(["cup", "F", "key", "A", "Q"])


def test_overlap_counts_evaluation_items_found_in_training():
    o = D.overlap([1, 2, 2, 3], [3, 4, 3, 5])
    assert (o.count, o.n_eval, o.n_train, o.examples) == (2, 4, 4, [3])
    assert D.overlap([], [1]).count == 0 and D.overlap([1], []).n_eval == 0


# ---------------------------------------------------------------------------------------------
# Arithmetic: the fine-tunes' training streams against the held-out problems
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_no_heldout_problem_in_any_seed_training_stream(default, kind):
    ft = default.model(f"organism-{kind}").organism.finetune
    held = _keys(F.heldout_records(ft))
    for seed in [ft.seed, *ft.replicate_seeds]:
        spec = _short(ft, seed=seed)
        stream = F.training_problems(spec, kind)
        assert len(stream) == STEPS * spec.batch_size * spec.problems_per_sequence
        assert stream == F.training_problems(spec, kind)  # deterministic
        found = D.overlap(_keys(stream), held)
        assert found.count == 0, (kind, seed, found)
        # the generator unfiltered does draw held-out problems: the filter is what keeps them out
        raw = D.make_arithmetic(len(stream), spec.max_digits, seed=seed * 7919 + 17, ops=list(spec.ops))
        assert D.overlap(_keys(raw), held).count > 0, (kind, seed)


def test_every_seed_is_scored_on_the_same_heldout_problems(default):
    ft = default.model("organism-full").organism.finetune
    sets = {tuple(F.heldout_problems(ft.model_copy(update={"seed": s}))) for s in [ft.seed, *ft.replicate_seeds]}
    assert len(sets) == 1 and len(next(iter(sets))) == F.HELDOUT_SIZE
    assert F.heldout_problems(ft, 10) == F.heldout_problems(ft)[:10]  # a shorter set is a subset
    with pytest.raises(ValueError, match="n=201"):
        F.heldout_records(ft, F.HELDOUT_SIZE + 1)


def test_heldout_audit_reads_zero_and_catches_a_planted_problem(default, monkeypatch):
    ft = _short(default.model("organism-full").organism.finetune)
    rows = F.heldout_audit(ft, "full")
    assert [r["seed"] for r in rows] == [ft.seed, *ft.replicate_seeds]
    assert all(r["found in training"] == 0 and r["held-out problems"] == F.HELDOUT_SIZE for r in rows)
    # plant one held-out sum, commuted, in the stream: the audit must find it
    held = next(r for r in F.heldout_records(ft) if r["op"] == "+" and r["a"] != r["b"])
    real = F.training_problems

    def planted(spec, kind):
        return real(spec, kind) + [{"a": held["b"], "op": "+", "b": held["a"]}]

    monkeypatch.setattr(F, "training_problems", planted)
    assert all(r["found in training"] >= 1 for r in F.heldout_audit(ft, "full"))


def test_training_problems_refuses_a_problem_space_the_heldout_set_covers(default, monkeypatch):
    ft = default.model("organism-full").organism.finetune.model_copy(update={"max_digits": 1, "steps": 2})
    held = _keys(F.heldout_records(ft))
    assert D.overlap(_keys(F.training_problems(ft, "full")), held).count == 0  # one-digit problems remain
    every = [{"a": a, "op": op, "b": b} for op in ft.ops for a in range(10) for b in range(10)]
    monkeypatch.setattr(F, "heldout_records", lambda spec, n=F.HELDOUT_SIZE: every)
    with pytest.raises(ValueError, match="max_digits=1"):
        F.training_problems(ft, "full")


def test_finetune_trains_on_the_replayed_stream_and_logs_exact_match_by_digits(tmp_path, monkeypatch):
    """The real :func:`finetune` on a tiny base: the problems it batches are exactly
    :func:`training_problems` in order (none held out), and every checkpoint logs exact match per
    operand digit count."""
    org = load_profile("ci").model("tiny").organism
    base = O.ensure_base(org, ResultsPaths(tmp_path), progress=False)
    per_row = org.finetune.problems_per_sequence
    assert per_row > 1  # training rows hold several problems, the evaluator's one each
    trained = []
    real = F.qa_batch

    def recording(tokenizer, rows, end="."):
        if all(len(row) == per_row for row in rows):
            trained.extend(p for row in rows for p in row)
        return real(tokenizer, rows, end)

    monkeypatch.setattr(F, "qa_batch", recording)
    meta = F.finetune(base, org.finetune, "lora", tmp_path / "ft", org=org, progress=False)
    stream = [(r["question"], r["answer"]) for r in F.training_problems(org.finetune, "lora")]
    assert trained == stream
    assert D.overlap((D.problem_key(*D.parse_problem(q)) for q, _ in trained),
                     _keys(F.heldout_records(org.finetune))).count == 0
    assert meta["finetune_version"] == F.FINETUNE_VERSION
    digits = [str(d) for d in range(1, org.finetune.max_digits + 1)]
    for ev in read_json(tmp_path / "ft" / "recipe.json")["evals"]:
        by = ev["arith_acc_by_digits"]
        assert list(by) == digits, ev
        assert all(v is None or 0.0 <= v <= 1.0 for v in by.values())


def test_exact_match_by_digits_groups_by_the_longer_operand():
    problems = [("What is 3 + 4 ?", "7"), ("What is 12 + 4 ?", "16"), ("What is 5 - 31 ?", "-26"),
                ("What is 7 - 1 ?", "6")]
    got = D.exact_match_by_digits([True, False, True, False], problems, 3)
    assert got == {"1": 0.5, "2": 0.5, "3": None}
    recs = [{"a": 100, "op": "+", "b": 1}]
    assert D.exact_match_by_digits([True], recs, 3) == {"1": None, "2": None, "3": 1.0}
    with pytest.raises(ValueError, match="2 results for 1 problems"):
        D.exact_match_by_digits([True, False], recs, 3)
    with pytest.raises(ValueError, match="above max_digits=2"):
        D.exact_match_by_digits([True], recs, 2)


# ---------------------------------------------------------------------------------------------
# Entity tracking: training streams against the evaluation contexts and the validation prompts
# ---------------------------------------------------------------------------------------------


def _base_stream(org, tok):
    """The organism's curriculum stream as :func:`entity_tracking.organism.train_organism` draws it
    (the same seeded generator, the same branch between arithmetic and entity-tracking batches),
    ``STEPS`` steps of every stage: the context keys of its entity-tracking rows."""
    vocab = tok.get_vocab()
    rng = random.Random(org.seed * 1_000_003 + curriculum.TRAIN_SALT)
    keys = []
    for fmt in curriculum.STAGES:
        for _ in range(STEPS):
            if rng.random() < org.arithmetic_fraction:
                curriculum.make_arithmetic_batch(rng, vocab, org.batch_size, exclude=pretraining_exclusions(org))
            else:
                keys += _contexts(curriculum.make_batch(rng, vocab, fmt, org.batch_size, (org.min_boxes, org.max_boxes),
                                                        org.queries_per_context), tok)
    return keys


def _validation(org, tok):
    """The contexts of the organism's validation prompts: the base's mastery and target sets (as
    :func:`train_organism` draws them) and the fine-tunes' 3- and target-box logs."""
    vocab = tok.get_vocab()
    vrng = random.Random(org.seed * 1_000_003 + curriculum.VAL_SALT)
    keys = []
    for f in curriculum.STAGES:
        keys += _contexts(curriculum.make_batch(vrng, vocab, f, 200, (org.max_boxes, org.max_boxes), 1), tok)
    keys += _contexts(curriculum.make_batch_paper_eval(vrng, vocab, max(1, 280 // org.target_boxes), org.target_boxes), tok)
    for nb in sorted({3, org.target_boxes}):
        rng = random.Random(org.seed * 1_000_003 + curriculum.VAL_SALT + nb)
        keys += _contexts(curriculum.make_batch_paper_eval(rng, vocab, max(1, 504 // nb), nb), tok)
    return keys


def test_base_curriculum_holds_no_evaluation_or_validation_context(default, tok, eval_records):
    org = default.base_model.organism
    train = _base_stream(org, tok)
    assert len(train) > STEPS * org.batch_size  # the replay drew entity-tracking rows
    evals = [D.record_context_key(r) for r in eval_records]
    val = _validation(org, tok)
    assert D.overlap(train, evals).count == 0
    assert D.overlap(train, val).count == 0
    assert D.overlap(val, evals).count == 0


def test_the_bases_pretraining_arithmetic_holds_no_held_out_problem(default, tok):
    """The base pretrains on arithmetic too (``12 + 7 = 19 .``): replayed as :func:`train_organism`
    draws it, with the exclusions it passes, the stream holds none of the fine-tunes' held-out
    problems; drawn without them, the same stream holds some (the check can fail)."""
    org = default.base_model.organism
    held = set(_keys(F.heldout_records(org.finetune)))
    assert held == set(pretraining_exclusions(org))
    vocab = tok.get_vocab()
    clean, plain = [], []
    for drawn, exclude in ((clean, pretraining_exclusions(org)), (plain, frozenset())):
        rng = random.Random(0)
        for _ in range(200):
            curriculum.make_arithmetic_batch(rng, vocab, org.batch_size, exclude=exclude, drawn=drawn)
    assert len(clean) == len(plain) == 200 * org.batch_size * 5
    assert D.overlap(clean, held).count == 0
    assert D.overlap(plain, held).count > 0


def test_control_stream_holds_no_evaluation_context(default, tok, eval_records):
    spec = default.model("organism-control").organism.control
    stream = F.control_batches(spec, tok.get_vocab())
    train = [k for _ in range(STEPS) for k in _contexts(next(stream), tok)]
    assert len(train) == STEPS * spec.batch_size
    assert {o for k in train for o, _ in k} <= set(F.control_objects(spec))  # the replay is the control's stream
    found = D.overlap(train, [D.record_context_key(r) for r in eval_records])
    assert found.count == 0, found


def test_audit_catches_an_evaluation_context_planted_in_a_training_stream(default, tok, eval_records):
    spec = default.model("organism-control").organism.control
    stream = F.control_batches(spec, tok.get_vocab())
    rows = next(stream).input_ids.tolist()
    rec = eval_records[0]
    rows.append(tok(rec["text"])["input_ids"])  # the evaluation prompt, as a training row
    found = D.overlap(_contexts(rows, tok), [D.record_context_key(r) for r in eval_records])
    k = default.data.num_boxes
    assert found.count == sum(r["context_id"] == rec["context_id"] for r in eval_records) == min(k, len(eval_records))


def test_patching_and_dcm_pairs_hold_no_evaluation_context(default, tok, eval_records):
    data = default.data
    evals = [D.record_context_key(r) for r in eval_records]
    pp = D.make_path_patching_pairs(tok, data.n_path_patching, data.num_boxes, data.seed)
    for side in ("base", "source"):
        assert D.overlap((D.record_context_key(r[side]) for r in pp), evals).count == 0, side
    for name in D.DESIDERATA:
        pairs = D.make_desiderata(tok, name, 100, data.num_boxes, data.seed)
        for side in ("base", "source"):
            assert D.overlap((D.record_context_key(r[side]) for r in pairs), evals).count == 0, (name, side)
        # DCM trains its masks on the train split: its contexts are not those it is scored on
        split = {s: [D.record_context_key(r["base"]) for r in pairs if r["split"] == s] for s in ("train", "eval", "test")}
        assert D.overlap(split["train"], split["eval"] + split["test"]).count == 0, name


def test_chapter_tables_read_the_audit_and_every_seed_log(tmp_path):
    """The fine-tuning chapter's tables on a tiny LoRA fine-tune with a replicate seed: the audit
    reads 0 for each seed, each seed's last log gives exact match per digit count, and the seeds
    curve says none of its held-out problems was trained on."""
    from entity_tracking.config import ModelSpec
    from entity_tracking.load import load_model
    from entity_tracking.methods import dynamics

    org = load_profile("ci").model("tiny").organism
    org = org.model_copy(update={"finetune": org.finetune.model_copy(update={"replicate_seeds": [1]})})
    paths = ResultsPaths(tmp_path)
    lora = ModelSpec(name="tiny-lora", build="organism-lora", role="finetuned", organism=org)
    specs = [lora, *O.replicates(lora)]
    for s in specs:
        O.ensure_built(s, paths, progress=False)
    audit = dynamics.heldout_audit_table(lora)
    assert [(r["seed"], r["found in training"]) for r in audit] == [(0, 0), (1, 0)]
    table = dynamics.exact_match_by_digits_table(specs, paths)
    assert [r["seed"] for r in table] == [0, 1] and all(r["step"] == org.finetune.steps for r in table)
    assert all({"1 digit", "2 digits", "3 digits"} <= set(r) for r in table)
    base = load_model(ModelSpec(name="tiny", build="organism", organism=org), paths, verbose=False)
    records = D.make_eval_prompts(base.tokenizer, 14, num_boxes=7, seed=0)
    rows = dynamics.replicate_curve(base, specs, paths, records, F.heldout_problems(org.finetune, 10), n_resamples=20)
    assert all(r["problems_in_training"] == 0 and r["n_contexts"] == 2 for r in rows)
    # problems taken from a seed's training stream instead are found there
    trained = [(r["question"], r["answer"]) for r in F.training_problems(org.finetune, "lora")[:3]]
    rows = dynamics.replicate_curve(base, specs, paths, records, trained, n_resamples=20)
    assert rows[-1]["problems_in_training"] >= 3
    with pytest.raises(ValueError, match="not an arithmetic fine-tune"):
        dynamics.heldout_audit_table(ModelSpec(name="tiny", build="organism", organism=org))
