"""DCM: the mask's two extremes are oracles, a head built to carry the answer is the one found, the
mask is chosen on the eval split (ties to more heads), the semantics draw fresh pairs, and masks of
several models round-trip through one file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from entity_tracking import task as D
from entity_tracking.methods import dcm
from entity_tracking.config import DataSpec, DCMSpec, ModelSpec, TinySpec
from entity_tracking.methods.dcm import DCMError, DCMResult, better_mask, desideratum_accuracy, fresh_pairs, masked_logits, read_selections, source_head_outputs, take_rows, train_mask, write_masks
from entity_tracking.io import read_json, write_json
from entity_tracking.model.tiny import build_tiny_model
from entity_tracking.load import load_model
from entity_tracking.intervene.patching import HeadPatch, Session, last_logits, run

N_LAYERS, N_HEADS, D_MODEL = 2, 4, 64
D_HEAD = D_MODEL // N_HEADS


def _load(path: Path):
    return load_model(ModelSpec(name=path.name, local_path=str(path)), verbose=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = build_tiny_model(TinySpec(n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL, d_mlp=96, seed=5),
                         tmp_path_factory.mktemp("dcm") / "tiny")
    return _load(d)


@pytest.fixture(scope="module")
def pairs(tiny):
    recs = D.make_desiderata(tiny.tokenizer, "positional", 24, num_boxes=3, seed=2)
    return D.encode_pairs(tiny.tokenizer, recs, padding_side="right")


GROUP = [(1, h) for h in range(N_HEADS)] + [(0, 2)]


def test_mask_of_ones_is_the_base_run(tiny, pairs):
    src = source_head_outputs(tiny, pairs["source"], GROUP, "last")
    got = masked_logits(tiny, pairs["base"], src, GROUP, "last", torch.ones(len(GROUP)))
    assert torch.allclose(got, last_logits(tiny, pairs["base"]), atol=1e-5)


@pytest.mark.parametrize("position", ["last", "query_label", "prev_query_label"])
def test_mask_of_zeros_is_patching_the_whole_group(tiny, pairs, position):
    src = source_head_outputs(tiny, pairs["source"], GROUP, position)
    got = masked_logits(tiny, pairs["base"], src, GROUP, position, torch.zeros(len(GROUP)))
    # the oracle: plain activation patching of every group head, source read at its own position
    by_layer = {0: [2], 1: list(range(N_HEADS))}
    cache = run(tiny, reads=[("z", l) for l in by_layer], batch=pairs["source"],
                positions=pairs["source"][f"{position}_position"], logits=None).cache
    patches = [HeadPatch("z", l, hs, cache["z", l][:, :, hs], pairs["base"][f"{position}_position"])
               for l, hs in by_layer.items()]
    want = run(tiny, patches, batch=pairs["base"]).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, last_logits(tiny, pairs["base"]), atol=1e-4)


def test_mask_is_differentiable(tiny, pairs):
    src = source_head_outputs(tiny, pairs["source"], GROUP, "last")
    m = torch.full((len(GROUP),), 0.5, requires_grad=True)
    masked_logits(tiny, pairs["base"], src, GROUP, "last", m)[:, 3].sum().backward()
    assert m.grad is not None and m.grad.abs().sum() > 0


def test_bad_mask_shape_is_named(tiny, pairs):
    src = source_head_outputs(tiny, pairs["source"], GROUP, "last")
    with pytest.raises(DCMError, match=r"one entry per head \(5\)"):
        masked_logits(tiny, pairs["base"], src, GROUP, "last", torch.ones(3))


@pytest.mark.parametrize("position", ["last", "query_label", "prev_query_label"])
@pytest.mark.parametrize("rows", [24, 5, 1])
def test_a_run_from_the_base_prefix_is_the_full_run(tiny, pairs, position, rows):
    """Fast path: only the tokens from the earliest patch position are run, from the base prompts'
    cached keys and values; logits and the mask's gradient are the full run's, to float32 round-off (with
    few rows the suffix grows to keep MIN_SUFFIX_ROWS rows x tokens)."""
    whole = Session(tiny, pairs["base"], batch_size=7, cached=True)
    prefix = whole.prefix
    assert prefix is not None and prefix.start == pairs["base"]["input_ids"].shape[1] - 2
    idx = torch.arange(rows)
    base = take_rows(pairs["base"], idx)
    src = {l: v[idx] for l, v in source_head_outputs(tiny, pairs["source"], GROUP, position).items()}
    got = []
    for pre in (None, whole.rows(idx)):
        mask = torch.tensor([0.2, 0.9, 0.5, 0.0, 0.7], requires_grad=True)
        logits = masked_logits(tiny, base, src, GROUP, position, mask, pre)
        (grad,) = torch.autograd.grad(logits[:, 3].sum() + logits.logsumexp(-1).sum(), mask)
        got.append((logits.detach(), grad))
    # bit for bit where the CPU's kernels round alike for both shapes (measured so on Intel); MKL's
    # AVX2 path on AMD EPYC differs by a few float32 ulps (1.8e-7 here): a wrong prefix is off by far more
    torch.testing.assert_close(got[1][0], got[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1][1], got[0][1], atol=1e-6, rtol=1e-5)
    heads = [(1, 0), (0, 2)]
    plain = desideratum_accuracy(tiny, heads, position, pairs, batch_size=5)
    fast = desideratum_accuracy(tiny, heads, position, pairs, batch_size=5,
                                session=Session(tiny, pairs["base"], batch_size=5, cached=True))
    assert fast == plain


def test_no_prefix_for_padded_prompts(tiny):
    recs = D.make_desiderata(tiny.tokenizer, "positional", 6, num_boxes=3, seed=2)
    longer = D.make_desiderata(tiny.tokenizer, "positional", 6, num_boxes=4, seed=2)
    enc = D.encode_pairs(tiny.tokenizer, recs + longer, padding_side="right")
    assert Session(tiny, enc["base"], cached=True).prefix is None


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny):
    """A copy of the tiny model in which head (1, CARRIER) dominates the last layer's output:
    its W_O columns are scaled up and the other heads' scaled down."""
    dst = tmp_path_factory.mktemp("planted") / "m"
    shutil.copytree(Path(tiny.source), dst)
    f = next(dst.glob("*.safetensors"))
    sd = load_file(f)
    w = sd["model.layers.1.self_attn.o_proj.weight"]
    for h in range(N_HEADS):
        w[:, h * D_HEAD:(h + 1) * D_HEAD] *= 40.0 if h == CARRIER else 0.01
    save_file(sd, f, metadata={"format": "pt"})
    return _load(dst)


CARRIER = 2


def test_dcm_selects_the_head_that_carries_the_answer(planted):
    tok = planted.tokenizer
    recs = D.make_desiderata(tok, "positional", 96, num_boxes=3, seed=4)
    enc = D.encode_pairs(tok, recs, padding_side="right")
    group = [(1, h) for h in range(N_HEADS)]
    # the desideratum this model satisfies by construction: what it says when the carrier is patched
    src = source_head_outputs(planted, enc["source"], group, "last")
    only_carrier = torch.tensor([0.0 if h == CARRIER else 1.0 for h in range(N_HEADS)])
    enc["target"] = masked_logits(planted, enc["base"], src, group, "last", only_carrier).argmax(-1).detach()
    keep_all = masked_logits(planted, enc["base"], src, group, "last", torch.ones(N_HEADS)).argmax(-1)
    assert (keep_all != enc["target"]).float().mean() > 0.3, "the planted head must matter"
    split = {k: {"base": take_rows(enc["base"], s), "source": take_rows(enc["source"], s), "target": enc["target"][s]}
             for k, s in {"train": slice(0, 48), "eval": slice(48, 72), "test": slice(72, 96)}.items()}
    res = train_mask(planted, group, "last", split["train"], split["eval"], split["test"],
                     lam=0.05, lr=0.1, epochs=4, batch_size=16, eval_every=2, seed=0, progress=False)
    assert res.selected == [(1, CARRIER)]
    assert res.test_accuracy > 0.9
    sem = desideratum_accuracy(planted, res.selected, "last", split["test"], n_resamples=5)
    assert abs(sem["accuracy"] - res.test_accuracy) < 1e-9


def test_functionality_reads_the_paper_pattern():
    from entity_tracking.methods import paper
    from entity_tracking.methods.dcm import functionality

    # the paper: 10 fresh draws of 500 pairs, standard deviations of about 2 points
    rows = [{"group": g, "desideratum": d, "selected_for": d, "model": "Llama-7B", "mean": v["Llama-7B"],
             "std": 2.0, "n_runs": 10, "pairs": "fresh"} for (g, d), v in paper.DCM_SEMANTICS.items()]
    got = functionality(rows)["Llama-7B"]
    assert got == {"value_fetcher": "value", "position_transmitter": "position", "position_detector": "position",
                   "structure_reader": "neither"}
    # the same means measured too noisily to tell apart: nothing is claimed
    noisy = [{**r, "std": 40.0} for r in rows]
    assert set(functionality(noisy)["Llama-7B"].values()) == {"neither"}
    # bootstrap runs resample one split: their std is the standard error itself
    # (Transmitters, positional 36.9: with std 9, 36.9 - 1.96 * 9 < 20, but 36.9 - 1.96 * 9 / sqrt(10) > 20)
    assert functionality([{**r, "std": 9.0, "pairs": "bootstrap"} for r in rows])["Llama-7B"]["position_transmitter"] == "neither"
    assert functionality([{**r, "std": 9.0} for r in rows])["Llama-7B"]["position_transmitter"] == "position"


# --------------------------------------------------------------------------------------------
# Choosing the mask: on the eval split, ties to more heads


def test_better_mask_prefers_accuracy_then_more_heads():
    assert better_mask(0.8, 0, 0.7, 3)  # accuracy first
    assert not better_mask(0.7, 5, 0.8, 0)
    assert better_mask(0.8, 3, 0.8, 2)  # equal accuracy: more selected heads win
    assert not better_mask(0.8, 2, 0.8, 3)
    assert not better_mask(0.8, 2, 0.8, 2)  # a full tie keeps the earlier mask
    assert better_mask(0.0, 0, -1.0, -1)  # anything beats the start


@pytest.fixture(scope="module")
def planted_pairs(planted):
    """160 positional pairs on the planted model with two target sets: ``carrier``, what it says
    when only the carrier head is patched, and ``keep``, what it says unpatched."""
    tok = planted.tokenizer
    enc = D.encode_pairs(tok, D.make_desiderata(tok, "positional", 160, num_boxes=3, seed=6), padding_side="right")
    group = [(1, h) for h in range(N_HEADS)]
    src = source_head_outputs(planted, enc["source"], group, "last")
    only_carrier = torch.tensor([0.0 if h == CARRIER else 1.0 for h in range(N_HEADS)])
    with torch.no_grad():
        carrier = masked_logits(planted, enc["base"], src, group, "last", only_carrier).argmax(-1)
        keep = masked_logits(planted, enc["base"], src, group, "last", torch.ones(N_HEADS)).argmax(-1)
    return enc, group, carrier, keep


def _split(enc, rows, target):
    rows = torch.as_tensor(rows)
    return {"base": take_rows(enc["base"], rows), "source": take_rows(enc["source"], rows), "target": target[rows]}


def _rounded(lm, split, group, mask) -> float:
    src = source_head_outputs(lm, split["source"], group, "last")
    with torch.no_grad():
        pred = masked_logits(lm, split["base"], src, group, "last", torch.tensor(mask, dtype=torch.float32)).argmax(-1)
    return float((pred == split["target"]).float().mean())


def test_mask_is_chosen_on_the_eval_split(planted, planted_pairs):
    """Train and test ask for the carrier's answer, eval for the unpatched answer: the carrier mask
    that training finds is best on train and test, but the eval split prefers keeping every head.
    Only an eval-based choice returns a mask without the carrier, with its eval accuracy 1."""
    enc, group, carrier, keep = planted_pairs
    train = _split(enc, range(0, 64), carrier)
    ev = _split(enc, range(64, 96), keep)
    test = _split(enc, range(96, 128), carrier)
    assert (keep[64:96] != carrier[64:96]).any(), "the carrier mask must lose on eval"
    assert (keep[96:128] != carrier[96:128]).float().mean() > 0.3, "and win on test"
    res = train_mask(planted, group, "last", train, ev, test, lam=0.05, lr=0.1, epochs=4, batch_size=16,
                     eval_every=1, seed=0, progress=False)
    assert any(h["n_selected"] >= 1 for h in res.history), "training must have reached the carrier mask"
    assert (1, CARRIER) not in res.selected
    assert res.eval_accuracy == 1.0
    assert res.eval_accuracy == pytest.approx(_rounded(planted, ev, group, res.mask))
    assert res.test_accuracy == pytest.approx(_rounded(planted, test, group, res.mask))
    assert res.test_accuracy < 0.7
    assert max(h["eval_accuracy"] for h in res.history) == res.eval_accuracy


def test_each_rounded_mask_is_evaluated_once(planted, planted_pairs, monkeypatch):
    """Evaluations are memoised by rounded mask: the eval split is scored once per distinct mask,
    and every history entry still carries that mask's accuracy."""
    enc, group, carrier, keep = planted_pairs
    calls, real = [], dcm._rounded_accuracy

    def spy(session, pairs, src, heads, position, mask_values):
        acc = real(session, pairs, src, heads, position, mask_values)
        calls.append((pairs is ev, tuple(int(x >= 0.5) for x in mask_values.tolist()), acc))
        return acc

    ev = _split(enc, range(64, 96), keep)
    monkeypatch.setattr(dcm, "_rounded_accuracy", spy)
    res = train_mask(planted, group, "last", _split(enc, range(0, 64), carrier), ev, _split(enc, range(96, 128), carrier),
                     lam=0.05, lr=0.1, epochs=4, batch_size=16, eval_every=1, seed=0, progress=False)
    on_eval = [(m, a) for is_eval, m, a in calls if is_eval]
    assert len(on_eval) == len({m for m, _ in on_eval}) < len(res.history)
    acc_of = dict(on_eval)
    assert [h["n_selected"] for h in res.history if h["eval_accuracy"] == res.eval_accuracy]
    assert {h["eval_accuracy"] for h in res.history} <= set(acc_of.values())
    assert acc_of[tuple(res.mask)] == res.eval_accuracy


def test_ties_go_to_the_mask_with_more_heads(planted, planted_pairs):
    """An eval split on which the carrier changes nothing: keeping every head (the first rounded
    mask) and patching the carrier score the same, and the mask that selects more heads is kept."""
    enc, group, carrier, keep = planted_pairs
    agree = [i for i in range(64, 160) if keep[i] == carrier[i]][:24]
    assert len(agree) >= 8
    res = train_mask(planted, group, "last", _split(enc, range(0, 64), carrier), _split(enc, agree, carrier),
                     _split(enc, range(64, 96), carrier), lam=0.05, lr=0.1, epochs=4, batch_size=16,
                     eval_every=1, seed=0, progress=False)
    first = res.history[0]
    assert first["n_selected"] == 0 and first["eval_accuracy"] == 1.0, "the first rounded mask keeps every head"
    assert res.eval_accuracy == 1.0
    assert (1, CARRIER) in res.selected
    assert len(res.selected) == max(h["n_selected"] for h in res.history if h["eval_accuracy"] == 1.0)
    assert res.best_step > first["step"]


# --------------------------------------------------------------------------------------------
# Fresh pairs for the per-model semantics

DATA = DataSpec(num_boxes=3, seed=3, n_eval=6, n_path_patching=4, n_mean_reference=4, n_desiderata=16,
                n_arithmetic=4, arithmetic_max_digits=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("dcm_data")
    D.build_datasets(DATA, d, tiny.tokenizer)
    return d


def _texts(recs):
    return [(r["base"]["text"], r["source"]["text"]) for r in recs]


def test_fresh_pairs_are_new_and_reproducible(tiny, data_dir):
    stored = set(_texts(D.load_desiderata(data_dir, "positional")))
    a = fresh_pairs(data_dir, tiny.tokenizer, "positional", 12, draw=0)
    b = fresh_pairs(data_dir, tiny.tokenizer, "positional", 12, draw=1)
    assert len(a) == len(b) == 12
    assert a == fresh_pairs(data_dir, tiny.tokenizer, "positional", 12, draw=0)  # same draw, same pairs
    assert _texts(a) != _texts(b)
    assert not set(_texts(a)) & set(_texts(b))
    assert not (set(_texts(a)) | set(_texts(b))) & stored
    assert _texts(a) != _texts(fresh_pairs(data_dir, tiny.tokenizer, "positional", 12, draw=0, seed=1))
    # every pair is used, with the manifest's vocabulary and number of boxes
    assert all(r["split"] == "fresh" and r["draw"] == 0 for r in a)
    vocab = set(D.load_manifest(data_dir)["vocabulary"]["objects"])
    assert all(set(r["base"]["objects"]) <= vocab and len(r["base"]["objects"]) == DATA.num_boxes for r in a)
    assert dcm.fresh_seed(DATA.seed, "positional", 0) != DATA.seed
    # fewer pairs than the generator's split needs still works
    assert len(fresh_pairs(data_dir, tiny.tokenizer, "object_value", 2, draw=4)) == 2


def test_desideratum_accuracy_fresh_runs_are_the_draws(tiny, data_dir):
    recs = [r for i in range(3) for r in fresh_pairs(data_dir, tiny.tokenizer, "positional", 8, draw=i)]
    enc = D.encode_pairs(tiny.tokenizer, recs, padding_side="right")
    # targets that make the runs differ: draw i is right on i + 2 of its 8 samples
    base_pred = run(tiny, batch=enc["base"]).logits.argmax(-1)
    target = base_pred.clone() + 1
    for i in range(3):
        target[8 * i: 8 * i + i + 2] = base_pred[8 * i: 8 * i + i + 2]
    enc["target"] = target
    r = desideratum_accuracy(tiny, [], "last", enc, mode="fresh", n_resamples=3, sample_size=8)
    assert r["runs"] == [2 / 8, 3 / 8, 4 / 8]
    assert r["mean"] == pytest.approx(3 / 8) and r["std"] == pytest.approx(1 / 8)
    with pytest.raises(DCMError, match="3 draws of 5"):
        desideratum_accuracy(tiny, [], "last", enc, mode="fresh", n_resamples=3, sample_size=5)


def test_semantics_fresh_draws_new_pairs_once_for_all_models(tiny, data_dir, monkeypatch):
    spec = DCMSpec(n_resamples=3, sample_size=8, batch_size=8)
    made, seen = [], []
    real_fresh, real_acc = dcm.fresh_pairs, dcm.desideratum_accuracy

    def spy_fresh(where, tokenizer, name, n, draw, seed=0, **kw):
        made.append((name, draw, n))
        return real_fresh(where, tokenizer, name, n, draw, seed, **kw)

    def spy_acc(lm, heads, position, pairs, **kw):
        out = real_acc(lm, heads, position, pairs, **kw)
        seen.append((pairs, kw, out))
        return out

    monkeypatch.setattr(dcm, "fresh_pairs", spy_fresh)
    monkeypatch.setattr(dcm, "desideratum_accuracy", spy_acc)
    selections = {("value_fetcher", "positional"): [(1, 0), (1, 2)], ("value_fetcher", "object_value"): [(1, 1)]}
    rows = dcm.semantics([("a", tiny), ("b", tiny)], selections, {"value_fetcher": "last"}, data_dir, spec)
    # generated once per (desideratum, draw), shared by both models
    assert sorted(made) == [(d, i, 8) for d in ("object_value", "positional") for i in range(3)]
    assert len(rows) == 4 and all(r["pairs"] == "fresh" and r["n_runs"] == 3 for r in rows)
    # the first selection was evaluated on draws 0, 1, 2 of fresh positional pairs, in order
    draws = [real_fresh(data_dir, tiny.tokenizer, "positional", 8, i) for i in range(3)]
    want = D.encode_pairs(tiny.tokenizer, [r for d in draws for r in d], padding_side="right")
    pairs, kw, out = seen[0]
    assert kw["mode"] == "fresh" and kw["n_resamples"] == 3 and kw["sample_size"] == 8
    assert torch.equal(pairs["base"]["input_ids"], want["base"]["input_ids"])
    assert torch.equal(pairs["source"]["input_ids"], want["source"]["input_ids"])
    assert torch.equal(pairs["target"], want["target"])
    # mean and std over the three runs, in percent, each run one draw
    for row, (_, _, out) in zip(rows, seen):
        assert len(out["runs"]) == 3
        assert row["mean"] == pytest.approx(100 * sum(out["runs"]) / 3)
        m = sum(out["runs"]) / 3
        assert row["std"] == pytest.approx(100 * (sum((x - m) ** 2 for x in out["runs"]) / 2) ** 0.5)
    # run i is the accuracy on draw i alone
    per_draw = [desideratum_accuracy(tiny, [(1, 0), (1, 2)], "last",
                                     D.encode_pairs(tiny.tokenizer, d, padding_side="right"))["accuracy"] for d in draws]
    assert seen[0][2]["runs"] == pytest.approx(per_draw)


def test_semantics_bootstrap_resamples_the_test_split(tiny, data_dir, monkeypatch):
    spec = DCMSpec(n_resamples=4, sample_size=5, batch_size=8, semantics_pairs="bootstrap")
    monkeypatch.setattr(dcm, "fresh_pairs", lambda *a, **k: pytest.fail("bootstrap mode must not draw fresh pairs"))
    rows = dcm.semantics([("a", tiny)], {("value_fetcher", "positional"): [(1, 0)]}, {"value_fetcher": "last"},
                         data_dir, spec)
    assert rows[0]["pairs"] == "bootstrap" and rows[0]["n_runs"] == 4


def test_semantics_shares_one_source_run_and_gives_each_selection_its_own_numbers(tiny, data_dir, monkeypatch):
    """Selections that overlap, on one desideratum and position, plus empty ones: each selection is
    patched with exactly its own heads' source outputs (sliced from one shared source run), and
    the unpatched run is made once and reported for every empty selection."""
    spec = DCMSpec(n_resamples=3, sample_size=6, batch_size=8, semantics_pairs="bootstrap")
    sel = {("value_fetcher", "positional"): [(1, 0), (0, 2)], ("position_transmitter", "positional"): [(0, 2), (1, 1)],
           ("structure_reader", "positional"): [], ("position_detector", "positional"): []}
    positions = {"value_fetcher": "last", "position_transmitter": "last", "structure_reader": "last",
                 "position_detector": "query_label"}
    pairs = dcm.encode_desideratum(tiny.tokenizer, data_dir, "positional", "test")
    seen, real = [], dcm.desideratum_accuracy

    def spy(lm, heads, position, p, **kw):
        seen.append((list(heads), position, kw.get("source_z")))
        return real(lm, heads, position, p, **kw)

    monkeypatch.setattr(dcm, "desideratum_accuracy", spy)
    rows = dcm.semantics([("a", tiny)], sel, positions, data_dir, spec)
    assert [h for h, _, _ in seen] == [[(1, 0), (0, 2)], [(0, 2), (1, 1)], []]  # one unpatched run for two
    for heads, position, src in seen[:2]:
        want = dcm.source_head_outputs(tiny, pairs["source"], heads, position, batch_size=8)
        assert src.keys() == want.keys() and all(torch.equal(src[l], want[l]) for l in want)
    assert rows[2]["mean"] == rows[3]["mean"] and rows[2]["std"] == rows[3]["std"]


def test_learn_masks_runs_each_source_once_and_learns_the_masks_of_per_mask_source_runs(tiny, data_dir, monkeypatch):
    """Fast paths: learn_masks runs each (desideratum, position, split) source once, for the union of
    the heads acting there, and hands every lambda, seed and group its own heads' slice, and every
    step runs from the base prompts' cached prefix; the masks are those of train_mask running its
    own source runs over every position."""
    from entity_tracking.methods.circuit import Circuit

    circuit = Circuit("t", {"value_fetcher": [(1, 0), (1, 2)], "position_transmitter": [(0, 2), (1, 0)],
                            "position_detector": [(0, 1), (1, 3)], "structure_reader": []})
    spec = DCMSpec(lambdas=[0.01, 0.2], seeds=[0, 1], epochs=2, batch_size=4, eval_every=1)
    calls, real = [], dcm.source_head_outputs

    def spy(lm, source, heads, position, **kw):
        calls.append((position, list(heads)))
        return real(lm, source, heads, position, **kw)

    monkeypatch.setattr(dcm, "source_head_outputs", spy)
    fast = dcm.learn_masks(tiny, circuit, data_dir, spec, desiderata=("positional", "object_value"))
    monkeypatch.setattr(dcm, "source_head_outputs", real)
    assert len(calls) == 2 * 2 * 3, "one source run per desideratum, position and split"
    assert all(h == [(0, 2), (1, 0), (1, 2)] for p, h in calls if p == "last")
    for (g, d), got in fast.items():
        splits = {s: dcm.encode_desideratum(tiny.tokenizer, data_dir, d, s) for s in ("train", "eval", "test")}
        slow = [train_mask(tiny, circuit.groups[g], circuit.positions[g], splits["train"], splits["eval"], splits["test"],
                           lam=lam, lr=spec.lr, epochs=spec.epochs, batch_size=spec.batch_size,
                           eval_every=spec.eval_every, seed=seed, progress=False, cached=False)
                for lam in spec.lambdas for seed in spec.seeds]
        best = slow[0]
        for r in slow[1:]:
            if better_mask(r.eval_accuracy, len(r.selected), best.eval_accuracy, len(best.selected)):
                best = r
        assert got.to_json() == best.to_json(), (g, d)


def test_semantics_from_the_base_prefix_are_those_of_full_runs(tiny, data_dir):
    spec = DCMSpec(n_resamples=3, sample_size=6, batch_size=8, semantics_pairs="fresh")
    sel = {("value_fetcher", "positional"): [(1, 0), (0, 2)], ("position_transmitter", "positional"): [(1, 1)],
           ("position_detector", "object_value"): [(0, 1)], ("structure_reader", "positional"): []}
    positions = {"value_fetcher": "last", "position_transmitter": "last", "structure_reader": "prev_query_label",
                 "position_detector": "query_label"}
    args = ([("a", tiny)], sel, positions, data_dir, spec, {("position_transmitter", "positional"): ["positional",
                                                                                                 "object_value"]})
    assert dcm.semantics(*args, base="a") == dcm.semantics(*args, base="a", cached=False)


def test_the_extra_desiderata_run_in_the_base_model_only_unless_asked_for_every_model(tiny, data_dir):
    """The paper reports the Transmitters' extra variants for Llama-7B only: by default they are
    evaluated in the base model and the other models get their core rows alone, the same numbers
    as with ``extra_models: all``."""
    sel = {("position_transmitter", "positional"): [(1, 1)], ("value_fetcher", "object_value"): [(1, 0)]}
    positions = {"position_transmitter": "last", "value_fetcher": "last"}
    evals = {("position_transmitter", "positional"): ["positional", "no_comma"]}
    models = [("a", tiny), ("b", tiny)]
    kw = dict(n_resamples=2, sample_size=4, batch_size=8)
    paper_rows = dcm.semantics(models, sel, positions, data_dir, DCMSpec(**kw), evals, base="a")
    every = dcm.semantics(models, sel, positions, data_dir, DCMSpec(extra_models="all", **kw), evals)
    assert [(r["model"], r["desideratum"]) for r in paper_rows] == [
        ("a", "positional"), ("a", "no_comma"), ("a", "object_value"), ("b", "positional"), ("b", "object_value")]
    assert paper_rows == [r for r in every if r["model"] == "a" or r["desideratum"] == r["selected_for"]]
    with pytest.raises(DCMError, match="base="):
        dcm.semantics(models, sel, positions, data_dir, DCMSpec(**kw), evals)


# --------------------------------------------------------------------------------------------
# Masks of several models in one file


def _result(selected_heads, heads=((0, 1), (1, 0), (1, 2))):
    mask = [0 if h in selected_heads else 1 for h in heads]
    return DCMResult(list(heads), mask, "last", 0.01, 0, "clamp", 0.5, 0.4, 3)


def test_masks_round_trip_per_model(tmp_path):
    path = tmp_path / "dcm_masks.json"
    masks = {
        "base": {("value_fetcher", "object_value"): _result([(1, 0)]), ("position_detector", "positional"): _result([])},
        "ft": {("value_fetcher", "object_value"): _result([(0, 1), (1, 2)])},
    }
    write_masks(path, masks)
    assert set(read_json(path)) == {"base", "ft"}
    stored = read_json(path)["ft"]["value_fetcher/object_value"]
    assert stored == masks["ft"][("value_fetcher", "object_value")].to_json()
    assert read_selections(path, "base") == {("value_fetcher", "object_value"): [(1, 0)],
                                             ("position_detector", "positional"): []}
    assert read_selections(path, "ft") == {("value_fetcher", "object_value"): [(0, 1), (1, 2)]}
    with pytest.raises(DCMError, match=r"'other'.*\['base', 'ft'\]"):
        read_selections(path, "other")


def test_read_selections_names_an_old_single_model_file(tmp_path):
    path = tmp_path / "dcm_masks.json"
    write_json(path, {"value_fetcher/object_value": _result([(1, 0)]).to_json()})
    with pytest.raises(DCMError, match="'base'.*older version"):
        read_selections(path, "base")


def test_the_papers_semantics_for_a_selection():
    from entity_tracking.methods import paper

    assert paper.dcm_semantics("value_fetcher", "object_value", "Goat-7B") == 65.9
    assert paper.dcm_semantics("position_detector", "box_label_value", "Llama-7B") == paper.DCM_BOX_LABEL_VALUE == 0.0
    assert paper.dcm_semantics("value_fetcher", "no_comma", "Llama-7B") is None  # a desideratum it did not report
    assert paper.dcm_semantics("value_fetcher", "object_value", None) is None  # a model of ours
    assert paper.dcm_semantics("value_fetcher", "box_label_value", "tiny") is None
