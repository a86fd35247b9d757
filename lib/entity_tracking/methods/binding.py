"""Where the binding lives: in the content of the context, or in its positions.

A model that answers ``... the cup is in Box A ... Box A contains the`` with `` cup`` must, at
some point, tie the object to its box: it *binds* them. Two mechanisms can do it, and they leave
different traces.

* **By content.** A head copies each object onto its box label in the context; at the query, a
  head finds the context occurrence of the query label and reads the object stored there. The
  binding lives in the *activations at the context positions*, and differs from prompt to prompt.
* **By position.** The model reads *where* the queried box sits (its ordinal position, "the
  third box") and fetches the object at that position. What the context positions carry about
  the binding is then the same in every prompt of the template -- a property of the position,
  not of the content.

Mean ablation tells them apart (paper-methods §1.3, §3). Replacing a head's output by its mean
over random prompts, per absolute position, removes what is *specific to this prompt* and keeps
what is the same at that position in every prompt. :func:`context_ablation` mean-ablates every
head at every **context position** (every token before the query's ``Box``) and keeps the
**query positions** (``Box <label> contains the``). A model that binds by content loses its
accuracy; one that binds by position keeps much of it. Two controls: the same ablation with the
heads at the queried label's context occurrence (``prev_query_label``) *kept* -- enough for a
content binder whose value is stored on that label -- and only the query positions ablated.
The paper's own completeness numbers imply the first picture for Llama-7B: its circuit keeps
0.66 (F(C)) with every context head ablated but those at the queried label, and 0.46 (F(C∖SR))
with those ablated too.

:func:`interchange_map` reads the same question off the residual stream. For a base prompt and a
source prompt with other objects, other labels and another queried box index, it overwrites the
base's residual stream (a block's output, ``[batch, pos, d_model]``) at one (layer, position)
with the source's and asks what the base then answers: **its own** object (the patched site did
not matter), **the source's object** (the site carried the answer's content), or **the base
object at the source's queried index** (the site carried *which position* is queried). Content
binding shows as a route of "source" cells from the context to the last token; positional
binding as "positional" cells.

:func:`accuracy_by_box` splits accuracy by the queried box index (1..num_boxes): a model trained
on few boxes may fail on boxes at positions it never saw.

**The organism's own circuit (ours).** A content binder stores the object on the queried label's
context occurrence, a position where the paper's circuit keeps only its Structure Readers, so the
paper's F(C) mean-ablates the heads that wrote it. :func:`entity_tracking.methods.path_patching.extend_circuit`
adds them as a group of ours (the Object Writers); :func:`extended_faithfulness` evaluates the
paper's circuit and the extended one under the paper's ablation rule unchanged, side by side on the
same prompts (a paired bootstrap over their contexts), each against random circuits of its own group
sizes (``extended_over_random``: the extended circuit's margin over its random circuits), and, for
context, the paper's circuit with *every* head kept at the queried label's context occurrence (what
the largest Object Writer group could recover). When the extended circuit is not faithful
(:data:`entity_tracking.methods.verdicts.FAITHFUL`), :func:`extension_shortfall` says what is still missing,
with numbers: how many Object Writers it would take, and at which of the circuit's positions the
heads outside it cost most.

Shapes: head outputs ``[batch, pos, n_heads, d_head]`` (mean ablation, :mod:`.ablation`),
residual stream ``[batch, pos, d_model]`` (interchange, :mod:`.patching`). Positions of the
regions are added to the batches of :func:`entity_tracking.task.encode_prompts` as
``context_position`` ``[batch, n_context]``, ``context_but_queried_label_position``
``[batch, n_context - 1]`` and ``query_position`` ``[batch, n_query]`` (``-1``-padded), so the
ablations are ordinary :class:`~entity_tracking.methods.ablation.Ablation` settings.

Example (a tiny random model; its numbers mean nothing, the calls are the chapter's)::

    from entity_tracking import binding, data as D
    from entity_tracking.methods.ablation import compute_means
    from entity_tracking.config import ModelSpec, TinySpec
    from entity_tracking.load import build_tiny_model, load_model

    path = build_tiny_model(TinySpec(n_layers=2, n_heads=4, d_model=32, d_mlp=64), "/tmp/tiny-binding")
    lm = load_model(ModelSpec(name="tiny", local_path=str(path)), verbose=False)
    ev = D.make_eval_prompts(lm.tokenizer, 21, num_boxes=3)
    ref = D.make_mean_reference_prompts(lm.tokenizer, 20, num_boxes=3, n_tokens=ev[0]["n_tokens"])
    means = compute_means(lm, ref, progress=False)
    res = binding.context_ablation(lm, ev, means, progress=False)
    print({k: f"{e:.2f}" for k, e in res.summary(n_resamples=200).items()})
    print([f"{b.estimate:.2f}" for b in binding.accuracy_by_box(lm, ev, progress=False)])
    pairs = D.make_desiderata(lm.tokenizer, "object_value", 8, num_boxes=3)
    m = binding.interchange_map(lm, [p["base"] for p in pairs], [p["source"] for p in pairs],
                                layers=[0, 1], positions=None, progress=False)
    print(m.shares["source"].shape)  # [2 layers, n_tokens positions]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from ..intervene.patching import ResidPatch, Session, cache_activations, run
from ..intervene.stats import Estimate, bootstrap, ratio
from ..schema import GROUP_LABELS, GROUPS, Head, position_column
from ..task.encoding import encode_prompts, positions_at, word_token_ids
from ..task.prompts import QUERY_FORM, DataError, locate_spans, render_prompt
from . import paper
from .ablation import (
    Ablation,
    Evaluation,
    MeanActivations,
    context_ids,
    draws_mean,
    every_head,
    evaluate,
    keep_mask,
    random_circuits,
    shared_clusters,
    shortfall_by_position,
)
from .circuit import Circuit
from .path_patching import top_heads
from .verdicts import FAITHFUL

__all__ = [
    "CONTEXT",
    "CONTEXT_LABEL_KEPT",
    "INTERCHANGE_PAIRS",
    "OUTCOMES",
    "QUERY",
    "SETTINGS",
    "BindingError",
    "BoxAccuracy",
    "ContextAblation",
    "ExtendedFaithfulness",
    "ExtensionShortfall",
    "InterchangeMap",
    "accuracy_by_box",
    "context_ablation",
    "context_settings",
    "extended_faithfulness",
    "extension_shortfall",
    "gain_by_box",
    "trained_boxes",
    "spread_layers",
    "encode_regions",
    "interchange_map",
    "paper_implied",
    "patch_residual",
    "position_labels",
]

#: Position keys added to a batch by :func:`encode_regions` (columns :func:`~entity_tracking.schema.position_column`).
CONTEXT = "context"
CONTEXT_LABEL_KEPT = "context_but_queried_label"
QUERY = "query"

#: The settings of :func:`context_ablation`, in display order.
SETTINGS: tuple[str, ...] = ("clean", "context_ablated", "context_ablated_label_kept", "query_ablated")
SETTING_LABELS: dict[str, str] = {
    "clean": "nothing ablated",
    "context_ablated": "every head at every context position",
    "context_ablated_label_kept": "same, heads at the queried label's context occurrence kept",
    "query_ablated": "only the query positions",
}

#: The most interchange pairs the binding chapter patches: the map costs layers x positions x
#: pairs runs, and 100 pairs put a share within about +-0.1 (95% interval).
INTERCHANGE_PAIRS = 100

#: What a base prompt answers after an interchange (:class:`InterchangeMap`).
OUTCOMES: tuple[str, ...] = ("own", "source", "positional", "other")


class BindingError(ValueError):
    """Inputs these measurements cannot use; the message names the problem."""


# --------------------------------------------------------------------------------------------
# Regions of a prompt
# --------------------------------------------------------------------------------------------


def _query_offsets(tokenizer, prompts: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """Unpadded token indices ``(query Box, query label)`` of each prompt, for ``tokenizer``."""
    head = QUERY_FORM.split("{label}")[0]  # "Box "
    word = head.split()[0]
    texts, spans = [], []
    for p in prompts:
        text, sp = render_prompt(p)
        start = sp["query_label"][0] - len(head)
        if text[start:start + len(head)] != head:
            raise BindingError(f"prompt {text!r} does not end in the query form {QUERY_FORM!r}")
        texts.append(text)
        spans.append([(start, start + len(word)), sp["query_label"]])
    try:
        pos, _ = locate_spans(tokenizer, texts, spans)
    except DataError as e:
        raise BindingError(f"cannot find the query's first token: {e}") from None
    return [(r[0], r[1]) for r in pos]


def _pad_rows(rows: list[list[int]]) -> torch.Tensor:
    n = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(n, 1)), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def encode_regions(lm_or_tokenizer, prompts: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """:func:`~entity_tracking.task.encode_prompts` plus the regions of every prompt.

    Adds ``context_position`` ``[batch, n_context]`` (every real token before the query's
    ``Box``, BOS included), ``context_but_queried_label_position`` (the same without the queried
    label's context occurrence) and ``query_position`` ``[batch, n_query]`` (``Box`` to the last
    token), all ``-1``-padded. Every prompt must hold its query label in the context.
    """
    tok = getattr(lm_or_tokenizer, "tokenizer", lm_or_tokenizer)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, Mapping) and "objects" in p for p in prompts):
        raise BindingError("encode_regions needs prompt records (dicts with 'objects', 'labels', 'query_label')")
    batch = encode_prompts(tok, prompts)
    prev = positions_at(batch, "prev_query_label")
    if bool((prev < 0).any()):
        i = int((prev < 0).nonzero()[0])
        raise BindingError(f"prompt {i} ({prompts[i]['text']!r}) asks for a label absent from its context; "
                           "the regions need the queried label's context occurrence")
    offsets = _query_offsets(tok, prompts)
    mask = batch["attention_mask"]
    ctx, kept, query = [], [], []
    for i, (box, label) in enumerate(offsets):
        qbox = box + int(positions_at(batch, "query_label")[i]) - label  # shifted for left padding
        real = [j for j in range(qbox) if int(mask[i, j]) == 1]
        ctx.append(real)
        kept.append([j for j in real if j != int(prev[i])])
        query.append(list(range(qbox, int(positions_at(batch, "last")[i]) + 1)))
    batch[position_column(CONTEXT)] = _pad_rows(ctx)
    batch[position_column(CONTEXT_LABEL_KEPT)] = _pad_rows(kept)
    batch[position_column(QUERY)] = _pad_rows(query)
    return batch


def position_labels(lm_or_tokenizer, batch: Mapping[str, torch.Tensor], row: int = 0) -> list[str]:
    """A name for every position of ``batch`` (read off prompt ``row``): ``object i`` and
    ``label i`` for box i (1-based), ``query label``, ``last``, else the token's own text."""
    tok = getattr(lm_or_tokenizer, "tokenizer", lm_or_tokenizer)
    ids = batch["input_ids"][row].tolist()
    names = [t.replace("Ġ", "").replace("▁", "") or t for t in tok.convert_ids_to_tokens(ids)]
    for i, p in enumerate(batch["object_positions"][row].tolist()):
        if p >= 0:
            names[p] = f"object {i + 1}"
    for i, p in enumerate(batch["label_positions"][row].tolist()):
        if p >= 0:
            names[p] = f"label {i + 1}"
    names[int(positions_at(batch, "query_label")[row])] = "query label"
    names[int(positions_at(batch, "last")[row])] = "last"
    return names


# --------------------------------------------------------------------------------------------
# Context ablation
# --------------------------------------------------------------------------------------------


def context_settings(arch, heads: Optional[Iterable[Head]] = None) -> dict[str, Ablation]:
    """The four :class:`~entity_tracking.methods.ablation.Ablation` settings of :func:`context_ablation`
    for ``heads`` (default: every head of the model), keyed by :data:`SETTINGS`."""
    hs = [(l, h) for l in range(arch.n_layers) for h in range(arch.n_heads)] if heads is None else \
        [(int(l), int(h)) for l, h in heads]

    def at(key: str) -> Circuit:
        return Circuit(key, {"value_fetcher": hs}, positions={"value_fetcher": key})

    return {
        "clean": Ablation(label="clean"),
        "context_ablated": Ablation(ablate=at(CONTEXT), label="context_ablated"),
        "context_ablated_label_kept": Ablation(ablate=at(CONTEXT_LABEL_KEPT), label="context_ablated_label_kept"),
        "query_ablated": Ablation(ablate=at(QUERY), label="query_ablated"),
    }


@dataclass
class ContextAblation:
    """Accuracy of one model under the settings of :func:`context_ablation`.

    Attributes:
        model: ``lm.name``.
        evaluations: per setting (:data:`SETTINGS`) the per-prompt :class:`Evaluation`.
        sites_ablated: per setting, the head outputs ``(layer, head, position)`` mean-ablated per
            prompt (averaged over prompts).
    """

    model: str
    evaluations: dict[str, Evaluation]
    sites_ablated: dict[str, float]

    @property
    def n(self) -> int:
        return self.evaluations["clean"].n

    def summary(self, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Estimate]:
        """Accuracy of every setting, and ``retention_<setting>`` = its accuracy / clean accuracy
        (paired bootstrap over the same contexts, all queries of a context together; over prompts
        when they carry no ``context_id``), each with a percentile interval."""
        kw = dict(n_resamples=n_resamples, seed=seed, level=level,
                  clusters=shared_clusters(self.evaluations.values()))
        out = {k: bootstrap(e.correct[None], **kw) for k, e in self.evaluations.items()}
        clean = self.evaluations["clean"].correct
        for k in SETTINGS[1:]:
            vec = torch.stack([self.evaluations[k].correct, clean])
            out[f"retention_{k}"] = bootstrap(vec, lambda a: ratio(a[0], a[1]), **kw)
        return out

    def to_json(self, **kw) -> dict[str, Any]:
        return {"model": self.model, "n_examples": self.n, "sites_ablated": self.sites_ablated,
                **{k: e.as_dict() for k, e in self.summary(**kw).items()}}


def context_ablation(lm, prompts: Sequence[Mapping[str, Any]], means: Optional[MeanActivations], *,
                     heads: Optional[Iterable[Head]] = None, targets: Optional[torch.Tensor] = None,
                     batch_size: int = 32, progress: bool = True, check_model: bool = True) -> ContextAblation:
    """Accuracy of ``lm`` with ``heads`` (default every head) mean-ablated at the context, at the
    context but the queried label's occurrence, and at the query positions only (module docstring).

    Args:
        lm: a :class:`~entity_tracking.load.LoadedModel`.
        prompts: evaluation prompt records (their query label in the context), all of one token
            length, the length of the mean-reference prompts.
        means: ``lm``'s :class:`MeanActivations` ``[n_layers, pos, n_heads, d_head]``
            (:func:`~entity_tracking.methods.ablation.compute_means`).
        heads: ``(layer, head)`` pairs to ablate; ``[]`` ablates nothing (every setting = clean).
        targets: token ids ``[batch]`` to score against instead of the prompts' answers (e.g. the
            clean model's own predictions, to measure agreement with it).

    Returns:
        :class:`ContextAblation`, its intervals over the records' ``context_id`` (over prompts
        for records without one).
    """
    batch = encode_regions(lm, prompts)
    if targets is not None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.shape != batch["target"].shape:
            raise BindingError(f"targets must be [batch] = [{len(batch['target'])}], got {list(targets.shape)}")
        batch["target"] = targets
    settings = context_settings(lm.arch, heads)
    evs = evaluate(lm, batch, means, list(settings.values()), batch_size=batch_size, progress=progress,
                   check_model=check_model)
    clusters = context_ids(prompts)  # the encoded batch holds none: the records' own
    evs = [replace(e, clusters=clusters) for e in evs]
    n = int(batch["input_ids"].shape[0])
    sites = {k: float((~keep_mask(lm.arch, batch, ab)).sum()) / n for k, ab in settings.items()}
    return ContextAblation(getattr(lm, "name", ""), dict(zip(settings, evs)), sites)


#: How the paper's numbers stand for two settings of :func:`context_ablation` in Llama-7B.
PAPER_IMPLIED_HOW = (
    "The paper's F(C) mean-ablates every head at every context position except its Structure Readers at the "
    "queried label's occurrence, and F(C\\SR) (completeness, K = the Structure Readers) ablates those too; "
    "both also ablate the heads outside the circuit at the query, so they approximate, probably from below, "
    "'label kept' and 'every context head' here (F(C) is Table 1's, F(C\\SR) the completeness table's; "
    "they come from two versions of the paper's circuit).")


def paper_implied() -> dict[str, Any]:
    """Llama-7B's accuracy under the settings of :func:`context_ablation` as the paper's own numbers
    imply them (:data:`PAPER_IMPLIED_HOW`): ``clean`` = F(M), ``context_ablated_label_kept`` = F(C),
    ``context_ablated`` = F(C\\SR); ``query_ablated`` is not implied (None). ``retention`` holds
    each implied ablated setting's accuracy over ``clean``, as :meth:`ContextAblation.summary`'s
    ``retention_<setting>`` does for ours."""
    out = {
        "model": "Llama-7B",
        "clean": paper.FAITHFULNESS["Llama-7B"]["full"],
        "context_ablated": paper.COMPLETENESS_GROUPS_LLAMA["structure_reader"]["F(C\\K)"],
        "context_ablated_label_kept": paper.FAITHFULNESS["Llama-7B"]["circuit"],
        "query_ablated": None,
        "how": PAPER_IMPLIED_HOW,
    }
    out["retention"] = {k: out[k] / out["clean"] for k in SETTINGS[1:] if out[k] is not None}
    return out


# --------------------------------------------------------------------------------------------
# Accuracy by queried box
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxAccuracy:
    """Accuracy on the prompts that query box ``box`` (1-based), with its bootstrap interval."""

    box: int
    n: int
    estimate: Estimate

    def as_dict(self) -> dict[str, Any]:
        return {"box": self.box, **self.estimate.as_dict()}


def accuracy_by_box(lm, prompts: Sequence[Mapping[str, Any]], *, evaluation: Optional[Evaluation] = None,
                    n_resamples: int = 1000, seed: int = 0, level: float = 0.95, batch_size: int = 32,
                    progress: bool = True) -> list[BoxAccuracy]:
    """Accuracy of ``lm`` per queried box index (``query_index + 1``), boxes ``1..num_boxes``.

    ``evaluation`` reuses a per-prompt :class:`Evaluation` of the same ``prompts`` (e.g. one
    setting of :func:`context_ablation`) instead of running the clean model. A box no prompt
    queries gets ``n = 0`` and NaN. Intervals resample contexts (the evaluation's ``clusters``,
    else the records' ``context_id``; prompts when neither is known).
    """
    prompts = list(prompts)
    if not prompts:
        raise BindingError("accuracy_by_box needs at least one prompt")
    missing = [i for i, p in enumerate(prompts) if p.get("query_index") is None]
    if missing:
        raise BindingError(f"prompts {missing[:5]} have no query_index (query label absent from the context)")
    if evaluation is None:
        (evaluation,) = evaluate(lm, prompts, None, [Ablation(label="clean")], batch_size=batch_size,
                                 progress=progress)
    if evaluation.n != len(prompts):
        raise BindingError(f"the evaluation covers {evaluation.n} prompts, not the {len(prompts)} given")
    q = torch.tensor([int(p["query_index"]) for p in prompts])
    k = max(len(p["objects"]) for p in prompts)
    clusters = evaluation.clusters if evaluation.clusters is not None else context_ids(prompts)
    out = []
    for b in range(k):
        sel = evaluation.correct[q == b]
        est = (bootstrap(sel[None], n_resamples=n_resamples, seed=seed, level=level,
                         clusters=None if clusters is None else clusters[q == b]) if len(sel)
               else Estimate(float("nan"), float("nan"), float("nan"), level, 0))
        out.append(BoxAccuracy(b + 1, int(len(sel)), est))
    return out


def _box_range(boxes: Sequence[int]) -> str:
    boxes = sorted(boxes)
    if not boxes:
        return "none"
    return str(boxes[0]) if len(boxes) == 1 else f"{boxes[0]}-{boxes[-1]}"


def trained_boxes(model: Any) -> Optional[int]:
    """The most boxes a model of the project's own recipe saw in training (an organism's
    ``max_boxes``), or None for a model trained elsewhere (a hub model: unknown)."""
    org = getattr(model, "organism", None)
    return int(org.max_boxes) if org is not None and getattr(model, "build", None) else None


def gain_by_box(base: Evaluation, finetuned: Evaluation, prompts: Sequence[Mapping[str, Any]], *,
                seen_boxes: Optional[int] = None, n_resamples: int = 1000, seed: int = 0,
                level: float = 0.95) -> dict[str, Any]:
    """Where a fine-tune's gain over its base sits: the paired gain in accuracy (fine-tuned minus
    base, on the same prompts; intervals resample contexts, paired) over all prompts, per queried
    box, and -- given ``seen_boxes``, the most boxes the base was trained on -- on the boxes it saw
    (``1..seen_boxes``) and on those it never saw. A gain made only on unseen boxes teaches the
    base positions it never had, rather than sharpening what it did.

    Returns ``{"gain", "by_box": [{"box", "n", **estimate}], "seen", "unseen", "seen_boxes",
    "unseen_boxes"}`` (estimates as dicts; ``seen``/``unseen`` None without ``seen_boxes``).

    >>> # g = gain_by_box(base_eval, control_eval, eval_records, seen_boxes=4); g["unseen"]["value"]
    """
    prompts = list(prompts)
    if base.n != len(prompts) or finetuned.n != len(prompts):
        raise BindingError(f"gain_by_box: evaluations of {base.n} and {finetuned.n} prompts for {len(prompts)} prompts")
    missing = [i for i, p in enumerate(prompts) if p.get("query_index") is None]
    if missing:
        raise BindingError(f"prompts {missing[:5]} have no query_index (query label absent from the context)")
    clusters = shared_clusters([base, finetuned])
    if clusters is None:
        clusters = context_ids(prompts)
    vec = torch.stack([finetuned.correct.float(), base.correct.float()])
    box = torch.tensor([int(p["query_index"]) + 1 for p in prompts])
    kw = dict(n_resamples=n_resamples, seed=seed, level=level)

    def gain(mask: torch.Tensor) -> Optional[dict[str, Any]]:
        if not bool(mask.any()):
            return None
        return bootstrap(vec[:, mask], lambda a: a[0] - a[1], clusters=None if clusters is None else clusters[mask],
                         **kw).as_dict()

    k = int(box.max())
    out: dict[str, Any] = {"gain": gain(torch.ones_like(box, dtype=torch.bool)),
                           "by_box": [{"box": b, "n": int((box == b).sum()), **(gain(box == b) or {})}
                                      for b in range(1, k + 1)],
                           "seen": None, "unseen": None, "seen_boxes": "", "unseen_boxes": ""}
    if seen_boxes is not None:
        if seen_boxes < 1:
            raise BindingError(f"seen_boxes must be at least 1, got {seen_boxes}")
        out.update(seen=gain(box <= seen_boxes), unseen=gain(box > seen_boxes),
                   seen_boxes=_box_range(range(1, min(seen_boxes, k) + 1)),
                   unseen_boxes=_box_range(range(seen_boxes + 1, k + 1)))
    return out


# --------------------------------------------------------------------------------------------
# Residual interchange
# --------------------------------------------------------------------------------------------


def _pair_batches(lm, base_prompts, source_prompts) -> tuple[dict, dict]:
    base_prompts, source_prompts = list(base_prompts), list(source_prompts)
    if len(base_prompts) != len(source_prompts):
        raise BindingError(f"{len(base_prompts)} base prompts but {len(source_prompts)} source prompts")
    if not base_prompts:
        raise BindingError("interchange needs at least one (base, source) pair")
    base = encode_prompts(lm.tokenizer, base_prompts)
    source = encode_prompts(lm.tokenizer, source_prompts)
    lengths = sorted({int(x) for x in torch.cat([base["length"], source["length"]])})
    if len(lengths) != 1:
        raise BindingError(f"interchange lines positions up: base and source prompts must all have one token "
                           f"length, got lengths {lengths}; build them with the same num_boxes and template")
    return base, source


def _positions(positions: Optional[Iterable[int]], seq: int) -> list[int]:
    if positions is None:
        return list(range(seq))
    out = [int(p) for p in positions]
    bad = [p for p in out if not 0 <= p < seq]
    if bad:
        raise BindingError(f"position {bad[0]} is out of range for prompts of {seq} tokens")
    if not out:
        raise BindingError("no positions to patch")
    return out


def spread_layers(n_layers: int, at_most: int = 8) -> list[int]:
    """At most ``at_most`` layer indices spread evenly over ``0..n_layers-1``, first and last
    included: every layer of a small model, a sample of a deep one (the map's cost is linear in it)."""
    if n_layers < 1 or at_most < 1:
        raise BindingError(f"need n_layers >= 1 and at_most >= 1, got {n_layers}, {at_most}")
    if n_layers <= at_most:
        return list(range(n_layers))
    if at_most == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (at_most - 1)) for i in range(at_most)})


def _layers(arch, layers: Optional[Iterable[int]]) -> list[int]:
    if layers is None:
        return list(range(arch.n_layers))
    out = [int(l) for l in layers]
    bad = [l for l in out if not 0 <= l < arch.n_layers]
    if bad:
        raise BindingError(f"layer {bad[0]} is out of range for a model of {arch.n_layers} layers")
    if not out:
        raise BindingError("no layers to patch")
    return out


def patch_residual(lm, base_prompts, source_prompts, layer: int, positions: Optional[Iterable[int]] = None, *,
                   site: str = "resid_post", batch_size: int = 32) -> torch.Tensor:
    """Logits ``[batch, vocab]`` at the last token of each base prompt whose residual stream at
    ``site`` (``"resid_post"``: block ``layer``'s output; ``"resid_pre"``: its input) is replaced
    at ``positions`` (absolute; default all) by that of its source prompt, ``[batch, pos, d_model]``."""
    base, source = _pair_batches(lm, base_prompts, source_prompts)
    seq = int(base["input_ids"].shape[1])
    pos = _positions(positions, seq)
    layer = _layers(lm.arch, [layer])[0]
    cache = cache_activations(lm, source, sites=(site,), layers=[layer], batch_size=batch_size)
    p = torch.tensor(pos)
    vals = cache[site, layer][:, p]
    patch = ResidPatch(site, layer, vals, p[None].expand(len(vals), -1))
    return run(Session(lm, base, batch_size=batch_size), [patch]).logits


@dataclass
class InterchangeMap:
    """What base prompts answer after one (layer, position) of their residual stream is taken
    from a source prompt.

    Attributes:
        model: ``lm.name``.
        site: the residual site patched (``"resid_post"``: block outputs).
        layers, positions: the patched layers and absolute positions (the map's axes).
        position_labels: a name per patched position (:func:`position_labels`).
        predicted: ``[n_layers, n_positions, n_pairs]`` argmax token after each patch.
        answers: per outcome (``own``, ``source``, ``positional``) ``[n_pairs]`` token ids.
        clean_predicted: ``[n_pairs]`` the base's own argmax, nothing patched.
    """

    model: str
    site: str
    layers: list[int]
    positions: list[int]
    position_labels: list[str]
    predicted: torch.Tensor
    answers: dict[str, torch.Tensor]
    clean_predicted: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.predicted.shape[-1])

    @property
    def shares(self) -> dict[str, torch.Tensor]:
        """Share ``[n_layers, n_positions]`` of pairs answering each of :data:`OUTCOMES`
        (``other``: none of the three). They add up to 1 when the three answers differ."""
        hit = {k: self.predicted == v[None, None] for k, v in self.answers.items()}
        other = ~(hit["own"] | hit["source"] | hit["positional"])
        return {**{k: h.float().mean(-1) for k, h in hit.items()}, "other": other.float().mean(-1)}

    @property
    def clean_accuracy(self) -> float:
        return float((self.clean_predicted == self.answers["own"]).float().mean())

    def strongest(self, outcome: str) -> dict[str, Any]:
        """Where the most pairs give ``outcome`` (one of :data:`OUTCOMES`): ``{"share", "layer",
        "position", "label"}`` of the (layer, position) patch with the largest share (the first
        such cell, layers then positions in order, on a tie)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        sh = self.shares[outcome]
        i, j = divmod(int(sh.argmax()), int(sh.shape[1]))
        return {"share": float(sh[i, j]), "layer": self.layers[i], "position": self.positions[j],
                "label": self.position_labels[j]}

    def rows(self) -> list[dict[str, Any]]:
        """One row per (layer, position, outcome) with its share: a long table for plotting."""
        sh = self.shares
        return [{"layer": l, "position": p, "label": lab, "outcome": k, "share": float(sh[k][i, j])}
                for k in OUTCOMES for i, l in enumerate(self.layers)
                for j, (p, lab) in enumerate(zip(self.positions, self.position_labels))]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "site": self.site, "layers": self.layers, "positions": self.positions,
                "position_labels": self.position_labels, "n_pairs": self.n, "clean_accuracy": self.clean_accuracy,
                "shares": {k: v.tolist() for k, v in self.shares.items()}}


def interchange_map(lm, base_prompts: Sequence[Mapping[str, Any]], source_prompts: Sequence[Mapping[str, Any]],
                    layers: Optional[Iterable[int]] = None, positions: Optional[Iterable[int]] = None, *,
                    site: str = "resid_post", batch_size: int = 32, progress: bool = True,
                    reuse_base: bool = True) -> InterchangeMap:
    """Patch the residual stream at one (layer, position) at a time from source into base.

    Args:
        lm: a :class:`~entity_tracking.load.LoadedModel`.
        base_prompts, source_prompts: paired prompt records of one token length; each source
            should hold other objects and labels than its base and query another box index
            (e.g. the ``object_value`` desiderata of :func:`entity_tracking.task.make_desiderata`),
            so that the three answers differ.
        layers: block indices (default all); positions: absolute token positions (default all).
        site: ``"resid_post"`` (block output) or ``"resid_pre"`` (block input).
        reuse_base: run the patches in a cached session of the base prompts, which keeps the base
            run's residual stream and starts each patched run above the patched layer (the blocks
            below it are the base's own); False runs every block again (the same predictions;
            the test oracle).

    Returns:
        :class:`InterchangeMap`: for every (layer, position) the base's answer, sorted into its
        own object, the source's answer and the base object at the source's queried index.
    """
    base_prompts, source_prompts = list(base_prompts), list(source_prompts)
    base, source = _pair_batches(lm, base_prompts, source_prompts)
    seq = int(base["input_ids"].shape[1])
    pos = _positions(positions, seq)
    lays = _layers(lm.arch, layers)
    for i, (b, s) in enumerate(zip(base_prompts, source_prompts)):
        if s.get("query_index") is None or b.get("query_index") is None:
            raise BindingError(f"pair {i}: base and source must both query a box of their own context")
        if s["query_index"] >= len(b["objects"]):
            raise BindingError(f"pair {i}: the source queries box {s['query_index'] + 1}, the base has "
                               f"{len(b['objects'])} boxes")
    tok = lm.tokenizer
    answers = {
        "own": base["target"],
        "source": source["target"],
        "positional": torch.tensor(word_token_ids(tok, [b["objects"][s["query_index"]]
                                                        for b, s in zip(base_prompts, source_prompts)])),
    }
    n, P = len(base_prompts), len(pos)
    cache = cache_activations(lm, source, sites=(site,), layers=lays, batch_size=batch_size)
    session = Session(lm, base, batch_size=batch_size, cached=reuse_base)
    clean = session.clean([(site, l) for l in lays] if reuse_base else ()).logits.argmax(-1)
    ex = torch.arange(n).repeat(P)  # rows (position, pair), position-major
    at = torch.tensor(pos).repeat_interleave(n)
    rows = session.rows(ex)
    predicted = torch.empty(len(lays), P, n, dtype=torch.long)
    it = lays
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(lays, desc=f"interchange ({getattr(lm, 'name', '')}, {P} positions x {n} pairs)")
    for i, layer in enumerate(it):
        vals = cache[site, layer][ex, at]  # [rows, d_model]
        logits = run(rows, [ResidPatch(site, layer, vals[:, None], at[:, None])]).logits
        predicted[i] = logits.argmax(-1).view(P, n)
    labels = position_labels(tok, base)
    return InterchangeMap(getattr(lm, "name", ""), site, lays, pos, [labels[p] for p in pos], predicted, answers, clean)


# --------------------------------------------------------------------------------------------
# The organism's own circuit (ours): the paper's circuit extended, under the paper's ablation
# --------------------------------------------------------------------------------------------


def _extensions(circuit: Circuit, extended: Circuit) -> list[str]:
    """The groups ``extended`` adds to ``circuit``; the paper's groups must be the same in both."""
    if {g: extended.groups[g] for g in GROUPS} != {g: circuit.groups[g] for g in GROUPS}:
        raise BindingError(f"the extended circuit of '{extended.model}' does not hold the paper circuit's groups "
                           "unchanged; extend it with path_patching.extend_circuit")
    added = [g for g in extended.group_names if g not in circuit.group_names]
    if not added:
        raise BindingError(f"the extended circuit of '{extended.model}' holds no group beyond the paper's")
    return added


#: The settings of :class:`ExtendedFaithfulness` in display order: (key, label).
EXTENDED_SETTINGS: tuple[tuple[str, str], ...] = (
    ("paper", "the paper's circuit"),
    ("extended", "+ Object Writers (ours)"),
    ("label_kept", "+ every head at the context label"),
    ("random_paper", "random, the paper's sizes"),
    ("random_extended", "random, the extended sizes"),
)


@dataclass
class ExtendedFaithfulness:
    """Faithfulness of the paper's circuit and of its extension in one model, on the same prompts.

    Attributes:
        model: ``lm.name``.
        circuit, extended: the paper's circuit and the extended one (same paper groups).
        label_kept: the paper's circuit with every head kept at each extension group's position.
        full: F(M); evaluations: per key of :data:`EXTENDED_SETTINGS` but the random ones, F(C);
        random: per ``"random_paper"`` / ``"random_extended"`` the random circuits' F(C).
    """

    model: str
    circuit: Circuit
    extended: Circuit
    label_kept: Circuit
    full: Evaluation
    evaluations: dict[str, Evaluation]
    random: dict[str, list[Evaluation]]

    @property
    def n(self) -> int:
        return self.full.n

    @property
    def clusters(self) -> Optional[torch.Tensor]:
        """The evaluation prompts' context ids (None: prompts without ``context_id``, resampled one by one)."""
        return shared_clusters([self.full, *self.evaluations.values(),
                                *(e for evs in self.random.values() for e in evs)])

    def summary(self, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Estimate]:
        """``full_accuracy``; per setting ``<key>_accuracy`` and ``<key>_faithfulness`` (F(C)/F(M); for the
        random ones, of the mean over draws); ``gain``: extended minus paper faithfulness;
        ``extended_over_random`` (with random circuits of the extended sizes): extended faithfulness
        minus theirs, the random draws resampled too. Every number is a paired percentile bootstrap
        over the same contexts, all queries of a context together (over prompts when they carry no
        ``context_id``)."""
        kw = dict(n_resamples=n_resamples, seed=seed, level=level, clusters=self.clusters)
        fixed = [k for k, _ in EXTENDED_SETTINGS if k in self.evaluations]
        rows = [self.full.correct] + [self.evaluations[k].correct for k in fixed]
        spans: dict[str, slice] = {k: slice(1 + i, 2 + i) for i, k in enumerate(fixed)}
        for k, evs in self.random.items():
            if evs:
                spans[k] = slice(len(rows), len(rows) + len(evs))
                rows += [e.correct for e in evs]
        vec = torch.stack(rows)
        out = {"full_accuracy": bootstrap(vec, lambda a: a[0], **kw)}
        for k, sl in spans.items():
            out[f"{k}_accuracy"] = bootstrap(vec, lambda a, sl=sl: a[sl].mean(0), **kw)
            out[f"{k}_faithfulness"] = bootstrap(vec, lambda a, sl=sl: ratio(a[sl].mean(0), a[0]), **kw)
        p, e = spans["paper"], spans["extended"]
        out["gain"] = bootstrap(vec, lambda a: ratio(a[e].mean(0), a[0]) - ratio(a[p].mean(0), a[0]), **kw)
        if "random_extended" in spans:
            rand = draws_mean(spans["random_extended"], seed + 1)
            out["extended_over_random"] = bootstrap(vec, lambda a: ratio(a[e].mean(0), a[0]) - ratio(rand(a), a[0]),
                                                    **kw)
        return out

    def sizes(self) -> dict[str, int]:
        """Heads in each circuit evaluated (per key of :data:`EXTENDED_SETTINGS`)."""
        return {"paper": self.circuit.n_heads, "extended": self.extended.n_heads, "label_kept": self.label_kept.n_heads,
                "random_paper": self.circuit.n_heads, "random_extended": self.extended.n_heads}

    def rows(self, paper_model: Optional[str] = None, **kw) -> list[dict[str, Any]]:
        """One row per setting with its estimates (``value``/``low``/``high`` of faithfulness)
        and their display strings: a table and a figure's data. With ``paper_model`` (a model of
        the paper's Table 1, e.g. ``"Llama-7B"``), column ``paper`` holds the paper's faithfulness
        of its circuit and of its random circuits beside ours (NaN where the paper has none)."""
        s = self.summary(**kw)
        sizes = self.sizes()
        t1 = paper.FAITHFULNESS.get(paper_model or "", {})
        theirs = {"paper": t1.get("faithfulness"), "random_paper": t1["random"] / t1["full"] if t1 else None}
        return [{"model": self.model, "key": k, "circuit": label, "heads": sizes[k],
                 "F(C)": f"{s[f'{k}_accuracy']:.2f}", "faithfulness": f"{s[f'{k}_faithfulness']:.2f}",
                 "value": s[f"{k}_faithfulness"].value, "low": s[f"{k}_faithfulness"].low,
                 "high": s[f"{k}_faithfulness"].high,
                 "paper": float("nan") if theirs.get(k) is None else float(theirs[k])}
                for k, label in EXTENDED_SETTINGS if f"{k}_faithfulness" in s]

    def to_json(self, **kw) -> dict[str, Any]:
        added = [g for g in self.extended.group_names if g not in GROUPS]
        return {"model": self.model, "n_examples": self.n, "n_random": len(self.random.get("random_paper", [])),
                "groups": {g: [list(h) for h in self.extended.groups[g]] for g in self.extended.group_names},
                "extension_groups": added, "positions": {g: self.extended.positions[g] for g in added},
                "group_sizes": self.sizes(),
                "summary": {k: e.as_dict() for k, e in self.summary(**kw).items()},
                "random_accuracies": {k: [e.accuracy for e in evs] for k, evs in self.random.items()}}


def extended_faithfulness(lm, prompts, means: MeanActivations, circuit: Circuit, extended: Circuit, *,
                          n_random: int = 10, seed: int = 0, batch_size: int = 32, progress: bool = True,
                          check_model: bool = True) -> ExtendedFaithfulness:
    """F(C)/F(M) of ``circuit`` (the paper's) and of ``extended`` (it plus groups of ours) in ``lm``,
    under the paper's mean ablation (:mod:`entity_tracking.methods.ablation`), in one batched evaluation.

    Args:
        prompts: evaluation prompt records, or an encoded batch (its ``target`` is scored).
        means: ``lm``'s own :class:`MeanActivations`.
        n_random, seed: random circuits of each circuit's group sizes, drawn as the faithfulness
            chapter draws them (the paper circuit's baseline is the same draws; the extended
            circuit's draws add its extension groups to those).

    Returns:
        :class:`ExtendedFaithfulness`. The paper circuit's numbers are exactly those of
        :func:`entity_tracking.methods.ablation.faithfulness` on the same prompts, means and seed.
    """
    label_kept = extended
    for g in _extensions(circuit, extended):
        label_kept = label_kept.with_group(g, every_head(lm.arch), extended.positions[g], meta={"kind": "label kept"})
    circuits = {"paper": circuit, "extended": extended, "label_kept": label_kept}
    rand = {"random_paper": random_circuits(lm.arch, circuit, n_random, seed) if n_random else [],
            "random_extended": random_circuits(lm.arch, extended, n_random, seed) if n_random else []}
    settings = [Ablation(label="F(M)")] + [Ablation(keep=c, label=f"F({k})") for k, c in circuits.items()]
    settings += [Ablation(keep=r, label=f"F({k} {i})") for k, rs in rand.items() for i, r in enumerate(rs)]
    evs = evaluate(lm, prompts, means, settings, batch_size=batch_size, progress=progress, check_model=check_model)
    fixed = dict(zip(circuits, evs[1:1 + len(circuits)]))
    rest, random = evs[1 + len(circuits):], {}
    for k, rs in rand.items():
        random[k], rest = rest[:len(rs)], rest[len(rs):]
    return ExtendedFaithfulness(getattr(lm, "name", circuit.model), circuit, extended, label_kept, evs[0], fixed, random)


@dataclass
class ExtensionShortfall:
    """What the extended circuit still misses, when it is not faithful.

    Attributes:
        model, group: the model and the extension group examined.
        faithfulness: the extended circuit's faithfulness (with its interval).
        threshold: :data:`entity_tracking.methods.verdicts.FAITHFUL` ``.holds``; ``missing`` is True when
            the faithfulness interval does not lie wholly at or above it.
        label_kept: faithfulness with every head kept at the group's position.
        ladder: ``{"heads", "faithfulness"}`` rows: the group grown to its ``heads`` best-scoring
            heads (path-patching order), doubling up to every head (empty when not ``missing``).
        by_position: rows of :func:`entity_tracking.methods.ablation.shortfall_by_position` for the
            extended circuit (``setting``, ``heads_ablated``, ``accuracy``; empty when not ``missing``).
    """

    model: str
    group: str
    faithfulness: Estimate
    threshold: float
    label_kept: Estimate
    ladder: list[dict[str, Any]]
    by_position: list[dict[str, Any]]

    @property
    def missing(self) -> bool:
        return not self.faithfulness.low >= self.threshold

    @property
    def heads_needed(self) -> Optional[int]:
        """The smallest group size tried whose faithfulness reaches the threshold (None: none does)."""
        return next((r["heads"] for r in self.ladder if r["faithfulness"].value >= self.threshold), None)

    @property
    def text(self) -> str:
        """What is missing, in words and numbers (markdown)."""
        name = GROUP_LABELS.get(self.group, self.group).removesuffix(" (ours)")
        head = (f"`{self.model}`: the extended circuit's faithfulness is {self.faithfulness:.2f}")
        if not self.missing:
            return head + f", at or above {self.threshold:g} with its whole interval: nothing is missing by this rule."
        out = [head + f", not at or above {self.threshold:g} with its whole interval."]
        need = self.heads_needed
        steps = ", ".join(f"{r['heads']} heads {r['faithfulness'].value:.2f}" for r in self.ladder)
        out.append(f"- More {name}s (the best-scoring heads first): {steps}; "
                   + (f"{need} heads reach {self.threshold:g}." if need is not None else
                      f"none reaches {self.threshold:g}, not even every head ({self.label_kept.value:.2f}): "
                      "what is missing lies at other positions."))
        rows = {r["setting"]: r for r in self.by_position}
        fm = rows.get("F(M)")
        vital = [r for r in self.by_position if r["heads_ablated"] is not None and r["setting"] != "all vital positions"]
        if fm and vital:
            worst = min(vital, key=lambda r: r["accuracy"].value)
            out.append(f"- With everything else intact, ablating the heads outside the circuit at one of its positions "
                       f"costs most at `{worst['setting']}` ({worst['heads_ablated']} heads): accuracy "
                       f"{worst['accuracy']:.2f} against {fm['accuracy']:.2f} unablated; "
                       + "; ".join(f"`{r['setting']}` {r['accuracy'].value:.2f}" for r in vital) + ".")
        if "F(C)" in rows and "all vital positions" in rows:
            out.append(f"- The heads outside the circuit ablated at all its positions at once, everything else intact: "
                       f"accuracy {rows['all vital positions']['accuracy']:.2f}; with every other position ablated "
                       f"too (F(C), the paper's rule): {rows['F(C)']['accuracy']:.2f}.")
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "group": self.group, "threshold": self.threshold, "missing": self.missing,
                "faithfulness": self.faithfulness.as_dict(), "label_kept_faithfulness": self.label_kept.as_dict(),
                "heads_needed": self.heads_needed,
                "ladder": [{"heads": r["heads"], "faithfulness": r["faithfulness"].as_dict()} for r in self.ladder],
                "by_position": [{"setting": r["setting"], "heads_ablated": r["heads_ablated"],
                                 "accuracy": r["accuracy"].as_dict()} for r in self.by_position]}


def _ladder(k: int, n: int) -> list[int]:
    """Group sizes above ``k``, doubling, ending at ``n`` (every head)."""
    out, j = [], max(1, k)
    while j < n:
        j = min(2 * j, n)
        out.append(j)
    return out


def extension_shortfall(lm, prompts, means: MeanActivations, result: ExtendedFaithfulness, group: str = "object_writer",
                        *, n_resamples: int = 1000, seed: int = 0, batch_size: int = 32,
                        progress: bool = True) -> ExtensionShortfall:
    """What ``result``'s extended circuit misses, with numbers, when its faithfulness is not at or
    above :data:`entity_tracking.methods.verdicts.FAITHFUL` with its whole interval (nothing is run
    otherwise): ``group`` grown to its best-scoring heads by doubling (its score map's order,
    every head last), and :func:`~entity_tracking.methods.ablation.shortfall_by_position` of the extended
    circuit (where, with everything else intact, the heads outside it cost most)."""

    if group not in result.extended.group_names or group in GROUPS:
        raise BindingError(f"'{group}' is not an extension group of the extended circuit "
                           f"({[g for g in result.extended.group_names if g not in GROUPS]})")
    kw = dict(n_resamples=n_resamples, seed=seed)
    s = result.summary(**kw)
    out = ExtensionShortfall(result.model, group, s["extended_faithfulness"], float(FAITHFUL.holds),
                             s["label_kept_faithfulness"], [], [])
    if not out.missing:
        return out
    ext = result.extended
    scores = torch.as_tensor(ext.scores[group]) if ext.scores.get(group) else torch.zeros(lm.arch.n_layers,
                                                                                           lm.arch.n_heads)
    ranked = top_heads(scores, scores.numel())  # every head, the lowest score first
    sizes = _ladder(len(ext.groups[group]), len(ranked))
    grown = [ext.with_group(group, ranked[:j], ext.positions[group]) for j in sizes]
    evs = evaluate(lm, prompts, means, [Ablation(label="F(M)")] + [Ablation(keep=c, label=f"{j} heads")
                                                                   for j, c in zip(sizes, grown)],
                   batch_size=batch_size, progress=progress)
    for j, ev in zip(sizes, evs[1:]):
        vec = torch.stack([evs[0].correct, ev.correct])
        out.ladder.append({"heads": j, "faithfulness": bootstrap(vec, lambda a: ratio(a[1], a[0]),
                                                                 clusters=shared_clusters([evs[0], ev]), **kw)})
    rows = shortfall_by_position(lm, prompts, means, ext, batch_size=batch_size, progress=progress)
    out.by_position.extend({"setting": r["setting"], "heads_ablated": r["heads_ablated"],
                            "accuracy": r["evaluation"].estimate(**kw)} for r in rows)
    return out
