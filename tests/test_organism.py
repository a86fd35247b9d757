"""The model organism and its arithmetic fine-tunes: the recipe learns, is deterministic, is
cached by its hash; the fine-tune's loss mask covers only answers; the LoRA adapter loads with
peft. The slow test trains the real default organism and checks it tracks entities like Llama-7B."""

from __future__ import annotations

import random

import pytest
import torch

from entity_tracking import organism as O
from entity_tracking.model.tokenizer import build_word_tokenizer
from entity_tracking.organism import build as organism_build
from entity_tracking.organism import curriculum
from entity_tracking.config import FinetuneSpec, ModelSpec, OrganismSpec
from entity_tracking.io import ResultsPaths
from entity_tracking.task.prompts import make_prompt
from entity_tracking.task.vocab import LABELS, OBJECTS

TINY = dict(
    n_layers=1, n_heads=2, d_model=32, d_mlp=64, batch_size=8, queries_per_context=2,
    stage_max_steps=3, final_max_steps=3, seed=0,
)
TINY_FT = FinetuneSpec(steps=4, batch_size=4, problems_per_sequence=2, checkpoint_every=2, warmup_steps=1)


def tiny_spec(**kw) -> OrganismSpec:
    return OrganismSpec(**{**TINY, "finetune": TINY_FT, **kw})


def test_short_run_lowers_the_loss():
    spec = tiny_spec(lr=3e-3, arithmetic_fraction=0.0, stage_max_steps=40, warmup_steps=0)
    res = O.train_organism(spec, progress=False, stages=("kv",), max_total_steps=40)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_same_seed_same_weights():
    a = O.train_organism(tiny_spec(), progress=False).model.state_dict()
    b = O.train_organism(tiny_spec(), progress=False).model.state_dict()
    c = O.train_organism(tiny_spec(seed=1), progress=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_batches_supervise_only_answers():
    tok_vocab = build_word_tokenizer().get_vocab()
    b = O.make_batch(random.Random(0), tok_vocab, "paper", 4, (3, 3), 2)
    inv = {v: k for k, v in tok_vocab.items()}
    for row_ids, row_lab in zip(b.input_ids.tolist(), b.labels.tolist()):
        sup = [i for i, l in enumerate(row_lab) if l != -100]
        assert len(sup) == 2
        for i in sup:
            assert inv[row_ids[i - 1]] == "the" and inv[row_ids[i - 2]] == "contains"
            assert row_lab[i] == row_ids[i]


@pytest.mark.parametrize("num_boxes", [2, 4, 7])
def test_the_organisms_paper_prompts_are_the_books_prompts_token_for_token(num_boxes):
    """The organism trains and validates on the paper's prompts in its own stream of words; each
    must be, token for token, the prompt the book evaluates it on (entity_tracking.task's
    template through the word tokenizer). The draws replay make_batch_paper_eval's: per context,
    its objects, then its labels."""
    tok = build_word_tokenizer()
    vocab = tok.get_vocab()
    n_contexts = 5
    batch = curriculum.make_batch_paper_eval(random.Random(11), vocab, n_contexts, num_boxes)
    replay = random.Random(11)
    rows = []
    for _ in range(n_contexts):
        objs = replay.sample(list(OBJECTS), num_boxes)
        labels = replay.sample(list(LABELS), num_boxes)
        rows += [tok(make_prompt(objs, labels, labels[q])["text"])["input_ids"] + [vocab[objs[q]]]
                 for q in range(num_boxes)]
    assert len(rows) == len(batch.input_ids)
    for want, got in zip(rows, batch.input_ids.tolist()):
        assert got[: len(want)] == want and set(got[len(want):]) <= {vocab["<pad>"]}


def test_paper_prompt_layout_matches_the_paper():
    tok = build_word_tokenizer()
    (p, a, q), *_ = O.paper_prompts(1, 7, seed=3)
    ids = tok(p)["input_ids"]
    assert len(ids) == 54  # paper-methods §1.1: every 7-box prompt is 54 tokens with BOS
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[5] == "Box" and toks[51] == toks[6] and toks[-1] == "the"


def test_cache_is_reused_and_hash_tracks_the_recipe(tmp_path, monkeypatch):
    paths = ResultsPaths(tmp_path)
    spec = tiny_spec()
    d1 = O.ensure_base(spec, paths, progress=False)
    assert (d1 / "config.json").is_file() and (d1 / "recipe.json").is_file()

    def boom(*a, **k):
        raise AssertionError("retrained although the cache matches")

    monkeypatch.setattr(organism_build, "train_organism", boom)  # where ensure_base looks it up
    assert O.ensure_base(spec, paths, progress=False) == d1
    assert O.recipe_hash(spec) != O.recipe_hash(tiny_spec(lr=spec.lr * 2))
    assert O.recipe_hash(spec) != O.recipe_hash(tiny_spec(seed=1))
    assert O.recipe_hash(spec, "organism-lora") != O.recipe_hash(spec, "organism-full")
    # fine-tune fields change the fine-tune hash but not the base's
    other = tiny_spec(finetune=TINY_FT.model_copy(update={"steps": 5}))
    assert O.recipe_hash(spec) == O.recipe_hash(other)
    assert O.recipe_hash(spec, "organism-lora") != O.recipe_hash(other, "organism-lora")
    # ... except those that define the held-out problems, which the base's pretraining leaves out
    wider = tiny_spec(finetune=TINY_FT.model_copy(update={"max_digits": TINY_FT.max_digits + 1}))
    assert O.recipe_hash(spec) != O.recipe_hash(wider)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(d1)
    tok = AutoTokenizer.from_pretrained(d1)
    assert model.config.num_hidden_layers == 1 and tok("Box F")["input_ids"][0] == tok.bos_token_id


def test_the_base_trains_with_its_recipes_thread_count_which_enters_the_hash(tmp_path, monkeypatch):
    one, two = tiny_spec(), tiny_spec(train_threads=2)
    assert "train_threads" not in organism_build.base_fields(one)  # recipes from before the field keep their hashes
    assert O.recipe_hash(two) != O.recipe_hash(one)
    assert O.recipe_hash(two, "organism-lora") != O.recipe_hash(one, "organism-lora")
    seen = []

    class Stop(Exception):
        pass

    def record(spec, progress=True):
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setenv("ENTITY_TRACKING_TRAIN_THREADS", "1")  # the recipe's count wins over the environment
    monkeypatch.setattr(organism_build, "train_organism", record)
    before = torch.get_num_threads()
    paths = ResultsPaths(tmp_path)
    with pytest.raises(Stop):
        O.ensure_base(two, paths, progress=False)
    assert seen == [2] and torch.get_num_threads() == before
    assert not O.base_dir(two, paths).exists()  # nothing half-written


def test_gqa_option():
    res = O.train_organism(tiny_spec(n_heads=4, n_kv_heads=2), progress=False, max_total_steps=1)
    assert res.model.config.num_key_value_heads == 2
    with pytest.raises(ValueError):
        OrganismSpec(n_heads=8, n_kv_heads=3)


def test_finetune_mask_covers_only_answer_tokens():
    from entity_tracking.organism.finetune import qa_batch

    tok = build_word_tokenizer()
    ids, labels = qa_batch(tok, [[("What is 12 + 5 ?", "17"), ("What is 9 - 3 ?", "6")], [("What is 1 + 1 ?", "2")]])
    words = [tok.convert_ids_to_tokens(r) for r in ids.tolist()]
    sup = [[w for w, l in zip(ws, ls) if l != -100] for ws, ls in zip(words, labels.tolist())]
    assert sup == [["1", "7", ".", "6", "."], ["2", "."]]
    assert (labels[1, len(tok("What is 1 + 1 ? 2 .")["input_ids"]):] == -100).all()  # padding


def test_lora_and_full_finetunes(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    paths = ResultsPaths(tmp_path)
    org = tiny_spec()
    lora = ModelSpec(name="org-lora", build="organism-lora", role="finetuned", organism=org)
    base, adapter = O.ensure_built(lora, paths, progress=False)
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "checkpoints" / "step-0002" / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    assert any("lora_A" in n for n, _ in model.named_parameters())

    full = ModelSpec(name="org-full", build="organism-full", role="finetuned", organism=org)
    d, none = O.ensure_built(full, paths, progress=False)
    assert none is None and (d / "checkpoints" / "step-0004" / "config.json").is_file()
    ft = AutoModelForCausalLM.from_pretrained(d).state_dict()
    b = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert any(not torch.equal(ft[k], b[k]) for k in b)


def test_steps_lora_sets_the_lora_fine_tunes_length_only(tmp_path):
    from entity_tracking.io import read_json

    org = tiny_spec(finetune=TINY_FT.model_copy(update={"steps_lora": 2}))
    assert (org.finetune.steps_of("lora"), org.finetune.steps_of("full")) == (2, 4)
    assert TINY_FT.steps_of("lora") == TINY_FT.steps  # unset: LoRA trains as long as the full fine-tune
    # it enters the LoRA recipe alone; unset, it leaves the hashes from before it existed
    assert O.recipe_hash(org, "organism-lora") != O.recipe_hash(tiny_spec(), "organism-lora")
    assert O.recipe_hash(org, "organism-full") == O.recipe_hash(tiny_spec(), "organism-full")
    _, adapter = O.ensure_built(ModelSpec(name="org-lora", build="organism-lora", role="finetuned", organism=org),
                                ResultsPaths(tmp_path), progress=False)
    rec = read_json(adapter / "recipe.json")
    assert [h["step"] for h in rec["history"]] == [1, 2]
    assert [e["step"] for e in rec["evals"]] == [0, 2]
    assert sorted(p.name for p in (adapter / "checkpoints").iterdir()) == ["step-0002"]


def test_build_all_starts_the_longest_fine_tune_first(tmp_path, monkeypatch):
    """With one worker the fine-tunes run in the order handed to the pool: longest first, so that
    with two the short ones fill in at the end instead of a long one running alone."""
    org = tiny_spec(finetune=TINY_FT.model_copy(update={"steps_lora": 2, "steps": 8}))
    specs = [ModelSpec(name="org", build="organism", organism=org),
             ModelSpec(name="org-lora", build="organism-lora", role="finetuned", organism=org),
             ModelSpec(name="org-ctl", build="organism-control", role="finetuned", control=True, organism=org),
             ModelSpec(name="org-full", build="organism-full", role="finetuned", organism=org)]
    order = []
    monkeypatch.setattr(organism_build, "_build_one", lambda s, root: (order.append(s.name), (s.name, 0.0))[1])
    O.build_all(specs, ResultsPaths(tmp_path), workers=1, progress=False)
    # full: 8 steps x 4 rows; LoRA: 2 x 4; control: 150 x 32 (ControlSpec's default)
    assert order == ["org-ctl", "org-full", "org-lora"]


@pytest.fixture(scope="module")
def default_base(tmp_path_factory):
    """The real default organism, trained once for this module's slow tests (minutes)."""
    paths = ResultsPaths(tmp_path_factory.mktemp("default"))
    d, _ = O.ensure_built(ModelSpec(name="organism", build="organism"), paths, progress=False)
    return d


@pytest.mark.slow
def test_default_organism_tracks_entities_like_llama(default_base):
    """Trains the real default organism (minutes) and checks 7-box accuracy on 500 held-out
    prompts, seeded apart from its validation prompts, is in [0.5, 0.85] (Llama-7B: 0.66)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = default_base
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    prompts, answers = _heldout_prompts(tok)
    acc = O.prompt_accuracy(model, tok, prompts, answers)
    assert 0.5 <= acc <= 0.85, acc


@pytest.mark.slow
def test_short_positive_control_raises_seven_box_accuracy(default_base, tmp_path):
    """A short run of the positive-control fine-tune (40 of its 150 steps, objects it trains on
    being half of the vocabulary) raises the organism's 7-box validation accuracy by at least
    0.05 (0.67 -> 0.90 after the whole run, notes/organism.md), and leaves 3 boxes solved.

    On the default organism, not a tiny one: models of 2 layers and d <= 128 do not learn the
    lookup within minutes (they stay at 1/7 on 7 boxes with or without the control; the runs are
    in notes/organism.md), so a tiny model could not show a gain. The ci profile builds the
    control (``tiny-control``) through the same code in every test run."""
    from entity_tracking.config import ControlSpec
    from entity_tracking.organism.finetune import control_finetune

    meta = control_finetune(default_base, ControlSpec(steps=40, checkpoint_every=40), tmp_path / "ctl",
                            progress=False)
    before, after = meta["evals"][0], meta["evals"][-1]
    assert after["step"] == 40
    assert after["val_acc_7"] >= before["val_acc_7"] + 0.05, (before, after)
    assert after["val_acc_3"] >= before["val_acc_3"] - 0.05, (before, after)


def _heldout_prompts(tok, n: int = 500):
    """The data chapter's 500 held-out 7-box prompts (data seed 0, as in the default profile)."""
    from entity_tracking.task.samplers import make_eval_prompts

    recs = make_eval_prompts(tok, n, num_boxes=7, seed=0)
    return [r["text"] for r in recs], [r["answer"] for r in recs]


def test_load_model_loads_the_organism_builds(tmp_path):
    """The project's loader (``models.load_model``) takes all three organism builds."""
    from entity_tracking.load import load_model

    paths = ResultsPaths(tmp_path)
    org = tiny_spec()
    for build in ("organism", "organism-lora", "organism-full"):
        spec = ModelSpec(name=build, build=build, organism=org, role="base" if build == "organism" else "finetuned")
        lm = load_model(spec, paths, device="cpu", verbose=False)
        enc = lm.tokenizer("The apple is in Box F . Box F contains the", return_tensors="pt")
        assert lm.nn._module(**enc).logits.shape[-1] == len(lm.tokenizer)


def test_replicates_change_only_the_finetune_seed():
    org = tiny_spec()
    spec = ModelSpec(name="org-lora", build="organism-lora", role="finetuned", organism=org)
    reps = O.replicates(spec)
    assert [r.name for r in reps] == ["org-lora-seed1", "org-lora-seed2"]
    assert [r.organism.finetune.seed for r in reps] == [1, 2]
    hashes = {O.recipe_hash(r.organism, "organism-lora") for r in reps} | {O.recipe_hash(org, "organism-lora")}
    assert len(hashes) == 3  # three different fine-tunes ...
    assert {O.recipe_hash(r.organism) for r in reps} == {O.recipe_hash(org)}  # ... of one base
    assert O.replicates(ModelSpec(name="o", build="organism")) == []
    # the list of replicate seeds is not part of any build's recipe
    more = org.model_copy(update={"finetune": org.finetune.model_copy(update={"replicate_seeds": [1, 2, 3]})})
    assert O.recipe_hash(more, "organism-lora") == O.recipe_hash(org, "organism-lora")


def test_control_recipe_is_its_own():
    from entity_tracking.config import ControlSpec
    from entity_tracking.organism.finetune import control_objects
    from entity_tracking.task.vocab import OBJECTS

    org = tiny_spec()
    other = org.model_copy(update={"control": ControlSpec(steps=7)})
    assert O.recipe_hash(other, "organism-control") != O.recipe_hash(org, "organism-control")
    assert O.recipe_hash(other, "organism-lora") == O.recipe_hash(org, "organism-lora")
    assert O.recipe_hash(other) == O.recipe_hash(org)
    half = control_objects(ControlSpec())
    assert len(half) == len(OBJECTS) // 2 and set(half) < set(OBJECTS)
    with pytest.raises(ValueError, match="min_boxes"):
        ControlSpec(min_boxes=7, max_boxes=5)
    with pytest.raises(ValueError, match="role: finetuned"):
        ModelSpec(name="c", build="organism-control", control=True)


def test_build_all_builds_in_parallel_what_one_process_builds(tmp_path):
    """Fine-tunes built two at a time in child processes equal the same builds made one by one."""
    from transformers import AutoModelForCausalLM

    org = tiny_spec()
    specs = [ModelSpec(name="org", build="organism", organism=org),
             ModelSpec(name="org-full", build="organism-full", role="finetuned", organism=org),
             ModelSpec(name="org-ctl", build="organism-control", role="finetuned", control=True,
                       organism=org.model_copy(update={"control": org.control.model_copy(
                           update={"steps": 3, "batch_size": 4, "checkpoint_every": 2})}))]
    par = O.build_all(specs, ResultsPaths(tmp_path / "par"), workers=2, progress=False)
    assert set(par) == {"org", "org-full", "org-ctl"} and not any(v["cached"] for v in par.values())
    again = O.build_all(specs, ResultsPaths(tmp_path / "par"), workers=2, progress=False)
    assert all(v["cached"] for v in again.values())
    seq = ResultsPaths(tmp_path / "seq")
    for s in specs:
        O.ensure_built(s, seq, progress=False)
    for name in ("org-full", "org-ctl"):
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "par" / "models" / name).state_dict()
        b = AutoModelForCausalLM.from_pretrained(seq.models / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_seed_bootstrap_holds_the_spread_of_seeds():
    from entity_tracking.methods.dynamics import seed_bootstrap

    n = 200
    g = torch.Generator().manual_seed(0)
    one = (torch.rand(n, generator=g) < 0.6).float()
    same = torch.stack([one, one, one])[:, None]  # three identical seeds
    spread = torch.stack([(torch.rand(n, generator=g) < p).float() for p in (0.3, 0.6, 0.9)])[:, None]
    a, b = seed_bootstrap(same, n_resamples=400), seed_bootstrap(spread, n_resamples=400)
    assert a.value == pytest.approx(float(one.mean())) and a.low < a.value < a.high
    assert b.value == pytest.approx(float(spread.mean()))
    assert (b.high - b.low) > 2 * (a.high - a.low)  # seeds that disagree widen the interval
    ones = seed_bootstrap(torch.ones(3, 1, 10), n_resamples=50)
    assert (ones.value, ones.low, ones.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="n_seeds, k, n"):
        seed_bootstrap(torch.ones(3, 10))


def test_gain_by_answer_splits_on_the_trained_objects():
    from entity_tracking.methods.dynamics import gain_by_answer

    recs = [{"answer": a} for a in ("apple", "cup", "apple", "key")]
    rows = gain_by_answer(torch.tensor([1., 1., 1., 0.]), torch.tensor([0., 1., 0., 0.]), recs, ["apple"],
                          n_resamples=50)
    by = {r["prompts"]: r for r in rows}
    assert by["answer seen in fine-tuning"]["n"] == 2 and by["answer seen in fine-tuning"]["gain"] == 1.0
    assert by["answer never seen in fine-tuning"]["n"] == 2 and by["answer never seen in fine-tuning"]["gain"] == 0.0
    assert by["all prompts"]["gain"] == 0.5


def test_replicate_curve_gives_every_step_an_interval(tmp_path):
    """The seeds curve of the fine-tuning chapter: step 0 is the base (gain exactly 0), and every
    row, the base's included, carries a finite interval around its value (no NaN in the JSON)."""
    import math

    from entity_tracking.task.samplers import make_eval_prompts
    from entity_tracking.methods.dynamics import replicate_curve
    from entity_tracking.organism.finetune import heldout_problems
    from entity_tracking.load import load_model

    paths = ResultsPaths(tmp_path)
    org = tiny_spec(finetune=TINY_FT.model_copy(update={"replicate_seeds": [1]}))
    lora = ModelSpec(name="org-lora", build="organism-lora", role="finetuned", organism=org)
    specs = [lora, *O.replicates(lora)]
    for s in specs:
        O.ensure_built(s, paths, progress=False)
    base = load_model(ModelSpec(name="org", build="organism", organism=org), paths, verbose=False)
    records = make_eval_prompts(base.tokenizer, 20, num_boxes=3, seed=0)
    rows = replicate_curve(base, specs, paths, records, heldout_problems(org.finetune, 10), n_resamples=50)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["gain"] == rows[0]["gain_low"] == rows[0]["gain_high"] == 0.0
    assert all(r["seeds"] == 2 for r in rows)
    for r in rows:
        for m in ("accuracy", "gain", "arithmetic"):
            assert all(math.isfinite(r[m + x]) for x in ("", "_low", "_high")), r
            assert r[m + "_low"] - 1e-6 <= r[m] <= r[m + "_high"] + 1e-6, r
