"""Planting the paper's positional mechanism in designated heads (issue 29): a Llama trained so
that known heads implement :mod:`~entity_tracking.methods.causal_model`, the ground truth every
method of the book is scored against.

**The mechanism planted** (the paper's, §3-§4), on the paper's prompts with ``n`` boxes:

* the **Position Detectors** (layer 1), at the query label, attend to the context label that
  matches it and copy that segment's *ordinal position code*;
* the **Position Transmitters** (layer 2), at the last token, attend to the query label and copy
  the code on;
* the **Value Fetchers** (layer 3), at the last token, attend to the object whose position code
  it is and copy the object: the answer.

A tiny Llama has no absolute position embedding (RoPE is relative), so nothing in its residual
stream says "segment 3" unless a head computes it. Our addition, labelled as such: one layer-0
**position-code head** attends uniformly to BOS and to every segment start so far; its output is
``1/(i+2)`` of BOS's value at segment ``i``, the same in every prompt of one layout. It carries no
prompt-specific information, so no interchange or resample ablation between prompts of one
layout changes it, and the methods cannot (and should not) find it: it is scaffolding, written in
the ground-truth file's ``meta``, not part of the circuit.

**How it is planted**: SIIT (Gupta et al. 2024, arXiv 2407.14494) on fresh (base, source) pairs
of the ``positional`` desideratum's distribution (source objects and labels disjoint from the
base's, the source's query at another segment), every step:

* behaviour: cross-entropy of the answer on base and source;
* attention supervision (Strubell et al. 2018): ``-log`` of each designated head's attention on
  its target token, and cross-entropy against the uniform pattern for the position-code head;
* IIT (Geiger et al. 2022): one group's head outputs at its position taken from the source run,
  target the causal model's counterfactual (:func:`~entity_tracking.methods.causal_model.interchange`);
* strict: every (head, position) node outside the circuit resample-ablated from the source
  (designated heads at other positions included), target the base's own answer.

The interventions here are ``o_proj`` input hooks over one batch (the mechanism of
:mod:`.resample`); the planted model is then *checked* through the book's kernel
(:mod:`entity_tracking.methods.planting`), an independent path to the same numbers.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from ..model.arch import arch_for
from ..model.tiny import TinySpec, tiny_config
from ..model.tokenizer import build_word_tokenizer
from ..task.vocab import LABELS, OBJECTS
from .curriculum import paper_words
from .train import scale_block_writes

__all__ = ["Layout", "PlantRecipe", "Pairs", "plant", "sample_pairs", "layout", "evaluate", "prompt_ids", "context_keys"]

#: The attention a supervised head must put on its target before its supervision stops pulling.
ATTN_ENOUGH = 0.9

GROUPS = ("position_detector", "position_transmitter", "value_fetcher")
GROUP_POSITION = {"position_detector": "query_label", "position_transmitter": "last", "value_fetcher": "last"}
GROUP_VARIABLE = {"position_detector": "position", "position_transmitter": "position", "value_fetcher": "value"}


@dataclass(frozen=True)
class PlantRecipe:
    """Everything that fixes a planted model (its hash is the cache key)."""

    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    d_mlp: int = 512
    num_boxes: int = 4
    min_boxes: int = 0  # > 0: each step draws its box count from min_boxes..num_boxes
    heads_per_group: int = 2
    seed: int = 0
    lr: float = 1e-3
    warmup: int = 100
    decay: bool = False  # after the warm-up, a cosine decay of the learning rate to 0 at ``steps``
    steps: int = 1500
    batch_size: int = 64
    w_attn: float = 1.0
    w_iit: float = 1.0
    w_strict: float = 1.0
    iit_from: int = 0
    strict_from: int = 0
    code_head: bool = True
    residual_init: float = 0.0
    w_probe: float = 0.0
    w_ctx: float = 0.0
    attn_from: int = 0
    tie_embeddings: bool = False
    attn_qk_only: bool = True
    attn_full: str = ""  # groups whose attention supervision reaches every weight (the code's route)
    supervise: str = "position_detector,position_transmitter,value_fetcher"

    def designated(self) -> dict[str, list[tuple[int, int]]]:
        """Group -> heads: PD in layer 1, PT in layer 2, VF in layer 3 (the first heads of each)."""
        k = self.heads_per_group
        return {g: [(1 + i, h) for h in range(k)] for i, g in enumerate(GROUPS)}


@dataclass(frozen=True)
class Layout:
    """Token positions of the paper's prompt with ``n`` boxes under the word tokenizer (one word
    one token; checked against the template by :func:`layout`)."""

    n: int

    @property
    def seg_start(self) -> list[int]:
        return [1 + 7 * i for i in range(self.n)]

    @property
    def obj(self) -> list[int]:
        return [2 + 7 * i for i in range(self.n)]

    @property
    def label(self) -> list[int]:
        return [6 + 7 * i for i in range(self.n)]

    @property
    def query_label(self) -> int:
        return 7 * self.n + 2

    @property
    def last(self) -> int:
        return 7 * self.n + 4

    @property
    def length(self) -> int:
        return 7 * self.n + 5

    @property
    def context(self) -> int:
        """Positions ``0 .. context-1`` are BOS, the context and the question's ``.``."""
        return 7 * self.n + 1

    def position(self, key: str) -> int:
        return {"query_label": self.query_label, "last": self.last}[key]


def layout(n: int, tok) -> tuple[Layout, torch.Tensor]:
    """The layout of ``n`` boxes and its template ids ``[length]`` (objects, labels and the query
    label left as the first object/label), checked against the book's template."""
    lay = Layout(n)
    objs, labs = [OBJECTS[0]] * n, [LABELS[0]] * n
    ctx, q = paper_words(objs, labs, labs[0])
    words = ctx + q
    ids = [tok.bos_token_id] + tok.convert_tokens_to_ids(words)
    if len(ids) != lay.length or any(words[p - 1] != OBJECTS[0] for p in lay.obj) or \
            any(words[p - 1] != LABELS[0] for p in lay.label + [lay.query_label]):
        raise ValueError(f"the paper's template no longer has the planted layout: {words}")
    return lay, torch.tensor(ids)


@dataclass
class Pairs:
    """A batch of (base, source) prompts of one layout. ``*_ids [B, T]``; ``q_b``/``p_s`` the
    queried segments; ``answer``/``source_answer`` token ids; ``cf[variable]`` the causal
    model's counterfactual answer ids."""

    base_ids: torch.Tensor
    source_ids: torch.Tensor
    q_b: torch.Tensor
    p_s: torch.Tensor
    answer: torch.Tensor
    source_answer: torch.Tensor
    cf: dict[str, torch.Tensor]


def sample_pairs(g: torch.Generator, lay: Layout, template: torch.Tensor, obj_ids: torch.Tensor,
                 lab_ids: torch.Tensor, batch: int) -> Pairs:
    """Fresh pairs from the ``positional`` desideratum's distribution (see module docstring)."""
    n = lay.n
    objs = obj_ids[torch.rand(batch, len(obj_ids), generator=g).argsort(-1)[:, : 2 * n]]
    labs = lab_ids[torch.rand(batch, len(lab_ids), generator=g).argsort(-1)[:, : 2 * n]]
    q_b = torch.randint(0, n, (batch,), generator=g)
    p_s = (q_b + torch.randint(1, n, (batch,), generator=g)) % n
    rows = torch.arange(batch)

    def ids(o, l, q):
        x = template.expand(batch, -1).clone()
        x[:, lay.obj] = o
        x[:, lay.label] = l
        x[:, lay.query_label] = l[rows, q]
        return x

    bo, so, bl, sl = objs[:, :n], objs[:, n:], labs[:, :n], labs[:, n:]
    return Pairs(ids(bo, bl, q_b), ids(so, sl, p_s), q_b, p_s, bo[rows, q_b], so[rows, p_s],
                 {"position": bo[rows, p_s], "value": so[rows, p_s]})


def vocab_ids(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids of the object words and of the box labels, the trainer's vocabulary."""
    return (torch.tensor(tok.convert_tokens_to_ids(list(OBJECTS))),
            torch.tensor(tok.convert_tokens_to_ids(list(LABELS))))


def fresh_pairs(tok, n_boxes: int, n: int, seed: int) -> tuple[Layout, Pairs]:
    """``n`` pairs of the trainer's distribution with ``n_boxes`` boxes from a generator seeded
    ``seed`` (held-out pairs: the trainer's own stream is seeded by the recipe's seed)."""
    lay, template = layout(n_boxes, tok)
    return lay, sample_pairs(torch.Generator().manual_seed(seed), lay, template, *vocab_ids(tok), n)


def prompt_ids(tok, prompts: Sequence[Mapping], lay: Layout) -> torch.Tensor:
    """``[n, lay.length]`` token ids of prompt records (``objects``, ``labels``, ``query_label``;
    the book's eval prompts or either side of a pair) in the planted layout, as the trainer
    writes its own prompts (BOS, then the word tokenizer's words)."""
    rows = []
    for p in prompts:
        if len(p["objects"]) != lay.n:
            raise ValueError(f"prompt {p.get('id', '')}: {len(p['objects'])} boxes, the layout has {lay.n}")
        ctx, q = paper_words(p["objects"], p["labels"], p["query_label"])
        rows.append([tok.bos_token_id, *tok.convert_tokens_to_ids(ctx + q)])
    if any(len(r) != lay.length for r in rows):
        raise ValueError("prompts are not in the planted layout (the default template, one word one token)")
    return torch.tensor(rows, dtype=torch.long)


def context_keys(ids: torch.Tensor, lay: Layout) -> list[int]:
    """One 64-bit key per row of ``ids`` (``[n, >= lay.context]`` token ids) for its context (BOS,
    the boxes' objects and labels, the question's ``.``): equal contexts, equal keys, whatever the
    query. The overlap audit compares the keys of every prompt the trainer drew with the book's.

    >>> lay = Layout(2)
    >>> a = torch.arange(lay.length)[None]; b = a.clone(); b[0, lay.last] = 0
    >>> context_keys(a, lay) == context_keys(b, lay), context_keys(a, lay) == context_keys(a + 1, lay)
    (True, False)
    """
    import hashlib

    ctx = ids[:, : lay.context].to(torch.int64).contiguous()
    return [int.from_bytes(hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest(), "little")
            for row in ctx]


def pairs_from_records(tok, records: Sequence[Mapping], lay: Layout) -> Pairs:
    """The :class:`Pairs` of desiderata records (:func:`entity_tracking.task.make_desiderata`,
    ``positional`` or ``object_value``, ``lay.n`` boxes): the book's own pairs, for evaluating a
    planted model on them and for checking these hooks against the book's kernel. ``cf`` is the
    causal model's interchange (:func:`entity_tracking.methods.causal_model.interchange`, which
    this layer cannot import; the tests check they agree)."""
    base_ids = prompt_ids(tok, [r["base"] for r in records], lay)
    source_ids = prompt_ids(tok, [r["source"] for r in records], lay)
    word = lambda w: tok.convert_tokens_to_ids(w)  # noqa: E731
    q_b = torch.tensor([r["base"]["labels"].index(r["base"]["query_label"]) for r in records])
    p_s = torch.tensor([int(r["source_query_index"]) for r in records])
    return Pairs(base_ids, source_ids, q_b, p_s, torch.tensor([word(r["base"]["answer"]) for r in records]),
                 torch.tensor([word(r["source"]["answer"]) for r in records]),
                 {"position": torch.tensor([word(r["base"]["objects"][int(r["source_query_index"])]) for r in records]),
                  "value": torch.tensor([word(r["source"]["objects"][int(r["source_query_index"])]) for r in records])})


# ---------------------------------------------------------------------------------------------
# Head-output hooks (the o_proj input, [batch, pos, n_heads * d_head], as in .resample)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _o_proj_hooks(model, fns: Mapping[int, Callable[[torch.Tensor], Optional[torch.Tensor]]]) -> Iterator[None]:
    arch = arch_for(model)
    handles = []
    for layer, fn in fns.items():
        def hook(module, args, fn=fn):
            new = fn(args[0])
            return None if new is None else (new, *args[1:])
        handles.append(arch.module(model, "o_proj", layer).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record_z(model, ids: torch.Tensor, layers: Sequence[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Every head's output (o_proj input) in ``layers`` on ``ids`` and the logits, no graph."""
    out: dict[int, torch.Tensor] = {}

    def keep(layer):
        def fn(x):
            out[layer] = x.detach()
        return fn

    with torch.no_grad(), _o_proj_hooks(model, {l: keep(l) for l in layers}):
        logits = model(input_ids=ids).logits
    return out, logits


def group_nodes(heads: Sequence[tuple[int, int]], position: int) -> dict[int, list[tuple[int, int]]]:
    """``{layer: [(position, head)]}`` of ``heads`` at one position."""
    nodes: dict[int, list[tuple[int, int]]] = {}
    for l, h in heads:
        nodes.setdefault(l, []).append((position, h))
    return nodes


def node_mask(lay: Layout, n_layers: int, n_heads: int, nodes: Mapping[int, Sequence[tuple[int, int]]]) -> dict[int, torch.Tensor]:
    """``{layer: [T, n_heads] bool}``: True at the (position, head) nodes given per layer."""
    masks = {l: torch.zeros(lay.length, n_heads, dtype=torch.bool) for l in range(n_layers)}
    for l, ph in nodes.items():
        for p, h in ph:
            masks[l][p, h] = True
    return masks


def patched_logits(model, ids: torch.Tensor, source_z: Mapping[int, torch.Tensor],
                   take: Mapping[int, torch.Tensor], d_head: int, extra: Optional[dict] = None) -> torch.Tensor:
    """The model's output on ``ids`` (``.logits`` ``[B, T, V]``) with, per layer, the (position,
    head) nodes where ``take[layer]`` (``[T, H]`` bool) is True taken from ``source_z[layer]``."""

    def swap(layer):
        m = take[layer].repeat_interleave(d_head, dim=1)  # [T, H*dh]

        def fn(x):
            return torch.where(m.to(x.device), source_z[layer], x)
        return fn

    with _o_proj_hooks(model, {l: swap(l) for l in take if bool(take[l].any())}):
        return model(input_ids=ids, **(extra or {}))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _attention_targets(lay: Layout, pairs: Pairs, recipe: PlantRecipe) -> dict:
    """Per designated group: (position attended from, target position per row [B])."""
    obj = torch.tensor(lay.obj)
    lab = torch.tensor(lay.label)
    return {"position_detector": (lay.query_label, lab[pairs.q_b]),
            "position_transmitter": (lay.last, torch.full_like(pairs.q_b, lay.query_label)),
            "value_fetcher": (lay.last, obj[pairs.q_b])}


def code_pattern(lay: Layout) -> torch.Tensor:
    """``[T, T]``: the position-code head's target attention: uniform over BOS and the segment
    starts at or before each position."""
    keys = torch.zeros(lay.length, dtype=torch.bool)
    keys[0] = True
    keys[lay.seg_start] = True
    causal = torch.ones(lay.length, lay.length).tril().bool()
    allowed = (causal & keys[None, :]).float()
    return allowed / allowed.sum(-1, keepdim=True)


def _attn_loss(attns, lay: Layout, pairs: Pairs, recipe: PlantRecipe, code: torch.Tensor,
               designated: bool = True, full: Optional[bool] = None) -> torch.Tensor:
    """The attention supervision; ``full`` True/False: only the groups in / not in
    ``recipe.attn_full`` (the code head counts as not), None: all."""
    rows = torch.arange(len(pairs.q_b))
    loss = attns[0].new_zeros(())
    tgt = _attention_targets(lay, pairs, recipe)
    chosen = [g for g in recipe.supervise.split(",") if g]
    in_full = [g for g in recipe.attn_full.split(",") if g]
    for g, heads in (recipe.designated().items() if designated else ()):
        if g not in chosen or (full is not None and (g in in_full) != full):
            continue
        q, k = tgt[g]
        for l, h in heads:
            a = attns[l][rows, h, q, k]
            # a hinge: no pull once the head puts ATTN_ENOUGH on its target (an unbounded
            # -log a keeps sharpening the pattern by growing the residual stream's norm)
            loss = loss + torch.relu(math.log(ATTN_ENOUGH) - torch.log(a.clamp_min(1e-6))).mean()
    if recipe.code_head and not full:
        a = attns[0][:, 0].clamp_min(1e-6)  # [B, T, T]
        loss = loss - (code[None] * torch.log(a)).sum(-1).mean()
    return loss


def _ce_last(logits: torch.Tensor, lay: Layout, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, lay.last].float(), target)


def circuit_nodes(recipe: PlantRecipe, lay: Layout) -> dict[int, list[tuple[int, int]]]:
    """``{layer: [(position, head)]}`` of the planted circuit."""
    nodes: dict[int, list[tuple[int, int]]] = {}
    for g, heads in recipe.designated().items():
        p = lay.position(GROUP_POSITION[g])
        for l, h in heads:
            nodes.setdefault(l, []).append((p, h))
    return nodes


def _probe_loss(hidden, lay: Layout, pairs: Pairs, probes) -> torch.Tensor:
    """Auxiliary linear read-outs of the causal model's ``position`` variable (ours): the segment
    index at every object and label after layer 0 (the code), the queried index at the query
    label after layer 1 (the detectors) and at the last token after layer 2 (the transmitters).
    The probes are trained with the model and thrown away."""
    half = len(pairs.q_b)
    ce = torch.nn.functional.cross_entropy
    n = lay.n
    seg = torch.arange(n).repeat(2)
    h0 = hidden[1][:half, lay.obj + lay.label]  # [B, 2n, d]
    loss = ce(probes[0](h0).flatten(0, 1), seg.expand(half, -1).flatten())
    loss = loss + ce(probes[1](hidden[2][:half, lay.query_label]), pairs.q_b)
    loss = loss + ce(probes[2](hidden[3][:half, lay.last]), pairs.q_b)
    return loss


def step_losses(model, recipe: PlantRecipe, lay: Layout, pairs: Pairs, code: torch.Tensor, step: int,
                group: str, probes=None) -> dict[str, torch.Tensor]:
    """The losses of one SIIT step (module docstring); ``group`` is the one interchanged."""
    n_layers, n_heads = recipe.n_layers, recipe.n_heads
    d_head = recipe.d_model // n_heads
    both = torch.cat([pairs.base_ids, pairs.source_ids])
    out = model(input_ids=both, output_attentions=recipe.w_attn > 0, output_hidden_states=recipe.w_probe > 0)
    ans = torch.cat([pairs.answer, pairs.source_answer])
    losses = {"behaviour": _ce_last(out.logits, lay, ans)}
    if recipe.w_attn > 0:
        half = len(pairs.q_b)
        attns = [a[:half] for a in out.attentions]
        if recipe.attn_full:
            losses["attention"] = recipe.w_attn * _attn_loss(attns, lay, pairs, recipe, code, step >= recipe.attn_from, False)
            losses["attention_full"] = recipe.w_attn * _attn_loss(attns, lay, pairs, recipe, code, step >= recipe.attn_from, True)
        else:
            losses["attention"] = recipe.w_attn * _attn_loss(attns, lay, pairs, recipe, code, step >= recipe.attn_from)
    if recipe.w_probe > 0:
        losses["probe"] = recipe.w_probe * _probe_loss(out.hidden_states, lay, pairs, probes)
    need_source = (recipe.w_iit > 0 and step >= recipe.iit_from) or (recipe.w_strict > 0 and step >= recipe.strict_from) \
        or recipe.w_ctx > 0
    if need_source:
        source_z, _ = record_z(model, pairs.source_ids, range(n_layers))
    if recipe.w_iit > 0 and step >= recipe.iit_from:
        p = lay.position(GROUP_POSITION[group])
        take = node_mask(lay, n_layers, n_heads, group_nodes(recipe.designated()[group], p))
        logits = patched_logits(model, pairs.base_ids, source_z, take, d_head).logits
        losses["iit"] = recipe.w_iit * _ce_last(logits, lay, pairs.cf[GROUP_VARIABLE[group]])
    if recipe.w_strict > 0 and step >= recipe.strict_from:
        inside = node_mask(lay, n_layers, n_heads, circuit_nodes(recipe, lay))
        take = {l: ~m for l, m in inside.items()}
        logits = patched_logits(model, pairs.base_ids, source_z, take, d_head).logits
        losses["strict"] = recipe.w_strict * _ce_last(logits, lay, pairs.answer)
    if recipe.w_ctx > 0:
        ctx = torch.zeros(lay.length, n_heads, dtype=torch.bool)
        ctx[: lay.context] = True
        logits = patched_logits(model, pairs.base_ids, source_z, {l: ctx for l in range(n_layers)}, d_head).logits
        losses["context"] = recipe.w_ctx * _ce_last(logits, lay, pairs.answer)
    return losses


def _qk_weights(model, recipe: PlantRecipe) -> list[torch.Tensor]:
    arch = arch_for(model)
    layers = sorted({l for g, hs in recipe.designated().items() for l, _ in hs} | ({0} if recipe.code_head else set()))
    return [arch.module(model, p, l).weight for l in layers for p in ("q_proj", "k_proj")]


def backward(model, recipe: PlantRecipe, losses: Mapping[str, torch.Tensor]) -> None:
    """Gradients of the summed losses; with ``attn_qk_only`` the attention supervision reaches only
    the supervised heads' query and key weights: it chooses where they look among the features the
    task builds, and does not reshape the residual stream to make patterns sharp (which stalled
    the task: notes/organism.md)."""
    rest = sum(v for k, v in losses.items() if k != "attention" or not recipe.attn_qk_only)
    if "attention" in losses and recipe.attn_qk_only:
        qk = _qk_weights(model, recipe)
        grads = torch.autograd.grad(losses["attention"], qk, retain_graph=True, allow_unused=True)
        rest.backward()
        for w, g in zip(qk, grads):
            if g is not None:
                w.grad = g if w.grad is None else w.grad + g
    else:
        rest.backward()


def build_model(recipe: PlantRecipe, tok):
    from transformers import LlamaForCausalLM

    cfg = tiny_config(TinySpec(family="llama", n_layers=recipe.n_layers, n_heads=recipe.n_heads,
                               d_model=recipe.d_model, d_mlp=recipe.d_mlp), tok)
    cfg.tie_word_embeddings = recipe.tie_embeddings
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("eager")  # the attention supervision reads the patterns
    # every block starts as the identity (residual_init 0): the organism's cure for the plateau of
    # deep tiny models (organism/__init__.py)
    scale_block_writes(model, recipe.residual_init)
    return model


@torch.no_grad()
def evaluate(model, recipe: PlantRecipe, lay: Layout, pairs: Pairs) -> dict[str, float]:
    """The planting numbers on held-out pairs, through the training hooks: clean accuracy (and
    per queried box), interchange accuracy per group, accuracy with every node outside the
    circuit resample-ablated, and with every head at every context position resample-ablated."""
    n_layers, n_heads = recipe.n_layers, recipe.n_heads
    d_head = recipe.d_model // n_heads
    model.eval()
    source_z, _ = record_z(model, pairs.source_ids, range(n_layers))
    logits = model(input_ids=pairs.base_ids).logits[:, lay.last]
    ok = logits.argmax(-1) == pairs.answer
    out = {"clean": ok.float().mean().item()}
    out["by_box"] = [round(ok[pairs.q_b == i].float().mean().item(), 3) for i in range(lay.n)]
    for g, heads in recipe.designated().items():
        p = lay.position(GROUP_POSITION[g])
        take = node_mask(lay, n_layers, n_heads, group_nodes(heads, p))
        lg = patched_logits(model, pairs.base_ids, source_z, take, d_head).logits[:, lay.last]
        out[f"iia_{g}"] = (lg.argmax(-1) == pairs.cf[GROUP_VARIABLE[g]]).float().mean().item()
    inside = node_mask(lay, n_layers, n_heads, circuit_nodes(recipe, lay))
    lg = patched_logits(model, pairs.base_ids, source_z, {l: ~m for l, m in inside.items()}, d_head).logits[:, lay.last]
    out["strict_nodes"] = (lg.argmax(-1) == pairs.answer).float().mean().item()
    ctx = torch.zeros(lay.length, n_heads, dtype=torch.bool)
    ctx[: lay.context] = True
    lg = patched_logits(model, pairs.base_ids, source_z, {l: ctx for l in range(n_layers)}, d_head).logits[:, lay.last]
    out["context_resampled"] = (lg.argmax(-1) == pairs.answer).float().mean().item()
    model.train()
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def lr_factor(recipe: PlantRecipe, step: int) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based): a linear warm-up, then
    constant or (``recipe.decay``) a cosine to 0 at ``recipe.steps``.

    >>> r = PlantRecipe(warmup=10, steps=110, decay=True)
    >>> lr_factor(r, 0), lr_factor(r, 9), round(lr_factor(r, 59), 3), lr_factor(r, 109)
    (0.1, 1.0, 0.5, 0.0)
    """
    warm = min(1.0, (step + 1) / max(1, recipe.warmup))
    if not recipe.decay or step + 1 <= recipe.warmup:
        return warm
    t = (step + 1 - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def plant(recipe: PlantRecipe, *, progress: bool = True, every: int = 100,
          callback: Optional[Callable[[dict], None]] = None, model=None,
          on_eval: Optional[Callable[[int, object], None]] = None, stream: Optional[set] = None):
    """Train a planted model from scratch (or continue ``model``); returns (model, tokenizer, log).
    ``stream``: a set that receives the :func:`context_keys` of every prompt the trainer draws
    (base and source), for the overlap audit."""
    from tqdm.auto import tqdm

    tok = build_word_tokenizer()
    lay, template = layout(recipe.num_boxes, tok)
    counts = range(recipe.min_boxes or recipe.num_boxes, recipe.num_boxes + 1)
    layouts = {n: layout(n, tok) for n in counts}
    codes = {n: code_pattern(layouts[n][0]) for n in counts}
    obj_ids, lab_ids = vocab_ids(tok)
    model = build_model(recipe, tok) if model is None else model
    model.train()
    g = torch.Generator().manual_seed(recipe.seed)
    held = sample_pairs(torch.Generator().manual_seed(10_000 + recipe.seed), lay, template, obj_ids, lab_ids, 512)
    probes = torch.nn.ModuleList([torch.nn.Linear(recipe.d_model, lay.n) for _ in range(3)])
    opt = torch.optim.AdamW(list(model.parameters()) + list(probes.parameters()), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(recipe, s))
    code = code_pattern(lay)
    rng = random.Random(recipe.seed)
    log: list[dict] = []
    t0 = time.perf_counter()
    for step in tqdm(range(1, recipe.steps + 1), disable=not progress, desc="planting"):
        n = rng.choice(counts)
        lay_n, template_n = layouts[n]
        pairs = sample_pairs(g, lay_n, template_n, obj_ids, lab_ids, recipe.batch_size)
        if stream is not None:
            stream.update(context_keys(pairs.base_ids, lay_n) + context_keys(pairs.source_ids, lay_n))
        losses = step_losses(model, recipe, lay_n, pairs, codes[n], step, rng.choice(GROUPS), probes)
        opt.zero_grad(set_to_none=True)
        backward(model, recipe, losses)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % every == 0 or step == recipe.steps:
            rec = {"step": step, "seconds": round(time.perf_counter() - t0, 1),
                   **{k: round(v.item(), 4) for k, v in losses.items()}, **evaluate(model, recipe, lay, held)}
            log.append(rec)
            if callback:
                callback(rec)
            if on_eval:
                on_eval(step, model)
    model.eval()
    return model, tok, log


# ---------------------------------------------------------------------------------------------
# Planted fine-tunes: the known answers to the paper's question
# ---------------------------------------------------------------------------------------------


def degrade_heads(model, heads: Sequence[tuple[int, int]], scale: float) -> None:
    """Scale the value projection of ``heads`` by ``scale`` in place: their outputs (the ``z`` the
    kernel patches, before ``o_proj``) shrink, the signal they carry weakens (the degraded base
    of fine-tune (a), issue 29). Multi-head attention only (a value row serves one head)."""
    arch = arch_for(model)
    if arch.is_gqa:
        raise ValueError("degrade_heads: a GQA model shares value rows between heads")
    dh = arch.d_head
    with torch.no_grad():
        for l, h in heads:
            arch.module(model, "v_proj", l).weight[h * dh:(h + 1) * dh] *= scale


def train_heads_only(model, recipe: PlantRecipe, heads: Sequence[tuple[int, int]], steps: int, *, lr: float = 1e-3,
                     seed: int = 1, attention: Optional[Mapping[tuple[int, int], str]] = None,
                     projections: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                     progress: bool = False, stream: Optional[set] = None) -> list[dict]:
    """Fine-tune ``model`` on entity tracking (the behaviour loss on fresh pairs) changing only
    the weights of ``heads`` (their query, key, value rows and output columns; every other
    weight, the other heads' slices of the same matrices included, stays bit for bit);
    ``projections`` narrows that to some of the four (without ``o_proj`` every change is visible
    in the heads' ``z``, the site the kernel patches). ``stream``: as in :func:`plant`.
    ``attention``: a head -> group map whose heads are also supervised to attend as that group
    does (a new route planted outside the circuit). Returns the log (:func:`evaluate` every 100
    steps)."""
    from tqdm.auto import tqdm

    arch = arch_for(model)
    dh = arch.d_head
    tok = build_word_tokenizer()
    lay, template = layout(recipe.num_boxes, tok)
    obj_ids, lab_ids = vocab_ids(tok)
    masks = {}
    for l, h in heads:
        for proj in projections:
            w = arch.module(model, proj, l).weight
            m = masks.setdefault(w, torch.zeros_like(w, dtype=torch.bool))
            unit = h if proj in ("q_proj", "o_proj") else arch.kv_head(h)
            if proj == "o_proj":
                m[:, unit * dh:(unit + 1) * dh] = True
            else:
                m[unit * dh:(unit + 1) * dh] = True
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(masks)
    for w in params:
        w.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    held = sample_pairs(torch.Generator().manual_seed(20_000 + seed), lay, template, obj_ids, lab_ids, 512)
    rows = torch.arange(recipe.batch_size)
    log = []
    model.train()
    for step in tqdm(range(1, steps + 1), disable=not progress, desc="fine-tuning heads"):
        pairs = sample_pairs(g, lay, template, obj_ids, lab_ids, recipe.batch_size)
        if stream is not None:
            stream.update(context_keys(pairs.base_ids, lay) + context_keys(pairs.source_ids, lay))
        out = model(input_ids=pairs.base_ids, output_attentions=bool(attention))
        loss = _ce_last(out.logits, lay, pairs.answer)
        if attention:
            tgt = _attention_targets(lay, pairs, recipe)
            for (l, h), group in attention.items():
                q, k = tgt[group]
                loss = loss - torch.log(out.attentions[l][rows, h, q, k].clamp_min(1e-6)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for w, m in masks.items():
            w.grad[~m] = 0
        opt.step()
        if step % 100 == 0 or step == steps:
            log.append({"step": step, "loss": round(loss.item(), 4), **evaluate(model, recipe, lay, held)})
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return log


#: The planting curriculum that worked on 4 boxes (notes/organism.md, runs F6 -> G2 -> H2): the mechanism is
#: found on 2 boxes, carried to 4, then the strict and context-resampling losses make the rest of
#: the model inert. Each stage continues the last with a fresh optimizer (warm-up 100 steps).
STAGES: tuple[dict, ...] = (
    {"num_boxes": 2, "steps": 3000, "w_strict": 0.0, "w_ctx": 0.0},
    {"num_boxes": 4, "steps": 1000, "w_strict": 0.0, "w_ctx": 0.0},
    {"num_boxes": 4, "steps": 1000, "w_strict": 1.0, "w_ctx": 1.0},
)

#: The same curriculum ending on the paper's 7 boxes. Run H1 met every check of the issue at 7
#: boxes after 1,500 steps of the last stage, and two seeds from scratch met them on the trainer's
#: evaluation after 500 (notes/organism.md): the last stage is 500 steps, its rate decaying to 0
#: so that the model it ends on is not caught mid-swing.
STAGES_7: tuple[dict, ...] = STAGES[:2] + (
    {"num_boxes": 7, "steps": 500, "w_strict": 1.0, "w_ctx": 1.0, "decay": True},)

#: What every stage shares: a 4 x 4 Llama of width 64 with tied embeddings, every designated
#: group's attention supervised through every weight, IIT from the first step.
PLANTED = PlantRecipe(d_model=64, d_mlp=256, tie_embeddings=True,
                      attn_full="position_detector,position_transmitter,value_fetcher")


def plant_stages(recipe: PlantRecipe = PLANTED, stages: Sequence[Mapping] = STAGES, *, progress: bool = True,
                 every: int = 250, callback: Optional[Callable[[dict], None]] = None, stream: Optional[set] = None):
    """Run the planting curriculum: :func:`plant` once per stage (``recipe`` with the stage's
    fields), each continuing the model of the last. Returns (model, tokenizer, log); each log
    record carries its ``stage``."""
    from dataclasses import replace

    model, tok, log = None, None, []
    for i, stage in enumerate(stages):
        r = replace(recipe, **stage)
        cb = (lambda rec, i=i: callback({"stage": i, **rec})) if callback else None
        model, tok, part = plant(r, progress=progress, every=every, callback=cb, model=model, stream=stream)
        log += [{"stage": i, **rec} for rec in part]
    return model, tok, log
