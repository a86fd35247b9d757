"""Path patching: which heads carry the answer, and through which later heads (paper §2).

**The method** (Wang et al. 2022, as used by Prakash et al.). Activation patching asks whether
a head matters; *path patching* asks whether it matters **through a given path**: directly to
the logits, or through the queries or values of chosen *receiver* heads. For each *sender*
head ``(l, h)`` at a sender position ``p_s``:

1. **Pass 1.** Run the clean (base) prompt with every head's output, at every position and
   layer, frozen to its clean value -- except the sender at ``p_s``, which takes its value from
   the corrupt (source) prompt at the corresponding corrupt position. Freezing every other head
   stops the change from spreading through any other attention head; it still flows through the
   residual stream and the MLPs. Record the receivers' queries (or values) at the receiver
   position.
2. **Pass 2.** Run the clean prompt again with nothing changed but the receivers' queries (or
   values) at the receiver position, set to the values recorded in pass 1.

The score of the sender is the mean over examples of ``(p_patched - p_clean) / p_clean``, where
``p`` is the probability (softmax over the whole vocabulary) of the correct object at the last
token (the metric :func:`relative`, the paper's). Heads with the **most negative** scores carry the path:
the paper takes the ``k`` lowest scores of a step as its group whatever their sign
(``selection="paper"``, the default); ``selection="negative"`` (ours) keeps only scores below
zero, so a model without the path gets a smaller or empty group (:func:`top_heads`).
The paper's mean of ratios suits a model that is rarely confidently wrong. On one that often is
(the CPU organism gives the answer less than 5% probability in a quarter of its prompts), those
prompts dominate the mean: a head whose patch moves 0.001 to 0.01 scores +9 there and outweighs
ten prompts where it cuts 0.9 to 0.1, so the heads that do the work can score *positive*.
The metric :func:`pooled` scores the relative change of the *mean* probability instead,
``sum(p_patched - p_clean) / sum(p_clean)``: the same scale, every prompt weighted by its clean
probability, and no blow-up. A metric is a callable (as in TransformerLens): any function of the
patched logits, the target and the clean run (:class:`Clean`) whose mean over the prompts is the
score, e.g. a logit difference (:data:`Metric`); a profile names one of the two provided by its name
(:func:`metric_named`). For the first step, whose
"receiver" is the logits, pass 1's logits are scored directly (the sender's direct effect via
the residual stream and the MLPs). The circuit is found backwards from the logits in four steps
(:data:`STEPS`); each step's top heads are the receivers of the next:

==========================  =====================  ============================  ==============
step (group)                sender position        corrupt position              receivers
==========================  =====================  ============================  ==============
Value Fetcher (A)           last token             last token                    logits
Position Transmitter (B)    last token             last token                    Q of top A
Position Detector (C)       query label            query label                   V of top B
Structure Reader (D)        previous query label   a random box label            V of top C
==========================  =====================  ============================  ==============

The receiver position is the sender position in every step. Under grouped-query attention a
receiver's *value* is its kv head (``arch.kv_head(h)``), so patching it changes the value of
every query head of its group (see :mod:`entity_tracking.intervene.patching`).

**A step of ours beyond the four** (:data:`EXTENSION_STEPS`, :func:`extend_circuit`). A model
that binds by content stores the object on its box label in the context, and its Value Fetchers
read it from the queried label's occurrence there: through their **keys** (what makes them look
there) and **values** (what they read). The four steps never score a head at that position through
the Value Fetchers, so the heads that write the object there are out of their reach. The
**Object Writer** step (ours) scores every head at the queried label's context occurrence
(corrupted from a random box label of the corrupt prompt, as in the Structure Reader step) through
the Value Fetchers' keys and values together (receiver site ``"kv"``: both projections' outputs
patched at that position), and takes the ``k`` lowest scores by the same rule as the other groups:

==========================  =====================  ============================  ==============
step (group, ours)          sender position        corrupt position              receivers
==========================  =====================  ============================  ==============
Object Writer               previous query label   a random box label            K and V of A
==========================  =====================  ============================  ==============

**Two implementations of the same scores.** :meth:`PathPatcher.scores` with
``method="naive"`` does exactly the above, two full forward passes per sender (the test
oracle). ``method="fast"`` (the default) computes the same numbers much more cheaply, from
three facts:

* *Pass 1 needs no attention.* With every head frozen, attention is the only operation that
  moves information between positions, so the sender's effect stays at ``p_s``. Take the
  clean residual stream at ``p_s`` entering layer ``l``, add the patched attention output
  ``o_proj(z_patched)`` (the whole patched vector, not a difference, for exactness) in place of
  the clean one, and run only the per-position parts of the later blocks (norms and MLP, with
  each later layer's attention output frozen at its clean value at ``p_s``;
  :meth:`Arch.add_attn`, :meth:`Arch.add_mlp`). Receivers' queries/values are then
  ``q_proj(attn_in_norm(resid))`` at ``p_s``, and the first step's logits are
  ``lm_head(final_norm(resid))``. This is batched over all heads of a layer and all examples:
  a handful of matrix products per layer instead of a forward pass per head.
* *Pass 2 only changes the receiver position and later ones.* Positions before the receiver
  position are clean, and so is every block below the first patched receiver: pass 2 runs, in
  one forward pass, many senders for the examples that share a receiver position, each only from
  that position and from the first receiver's block on, from the clean run of the dataset
  (:meth:`~entity_tracking.intervene.patching.Session.tile`). The first step has no pass 2 at all.
* *Senders that cannot reach a receiver score exactly zero.* A receiver at layer ``l_r`` reads
  the residual stream entering ``l_r``; a sender at layer ``l >= l_r`` cannot change it, and a
  receiver patched with its own clean value changes nothing. Pass 2 of a sender layer patches
  only receivers above it, and a sender layer with none is left out (score 0). And in the
  logits step a sender away from the last token cannot reach the logits (score 0).

Prompts must be unpadded (one length per batch; base and source may differ in length): a
dataset's prompts all have the same length, and positions are then the same for every
chunk. :func:`estimate_cost` states a sweep's cost before it runs (forward-pass equivalents
and a peak activation memory estimate), for a loaded model or just a config (e.g. Llama-7B).
:func:`discover_circuit` runs the four steps and returns a :class:`~entity_tracking.methods.circuit.Circuit`;
minimality pruning (mean ablation) plugs in through its ``prune`` argument.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..intervene.patching import (
    ActivationCache,
    HeadPatch,
    Session,
    batch_chunks,
    lm_parts,
    n_site_heads,
    as_batch,
    check_positions,
    check_unpadded,
    run,
    site_heads,
    target_probs,
)
from ..intervene.metrics import METRICS, Clean, Metric, metric_name, metric_named, pooled, relative
from ..model.arch import Arch, arch_for
from ..schema import GROUPS, Head, position_column
from ..task.encoding import encode_pairs, position_keys, positions_at
from .circuit import Circuit

__all__ = [
    "Clean",
    "EXTENSION_STEPS",
    "METHODS",
    "METRICS",
    "Metric",
    "PAPER_CIRCUIT_K",
    "PAPER_RECEIVERS_K",
    "STEPS",
    "CostEstimate",
    "PathPatcher",
    "SELECTIONS",
    "Step",
    "discover_circuit",
    "estimate_cost",
    "extend_circuit",
    "metric_named",
    "null_circuit",
    "pooled",
    "relative",
    "shuffled_attention",
    "step_scores",
    "top_heads",
]

METHODS = ("fast", "naive")
#: Group selection: the paper's k lowest scores whatever their sign, or only negative scores (ours).
SELECTIONS = ("paper", "negative")
#: Receiver sites: a receiver's query, key or value, or its key and value together ("kv").
RECEIVER_SITES = ("q", "k", "v", "kv")
#: The head sites (:mod:`entity_tracking.intervene.patching`) each receiver site patches.
_SITE_PARTS: dict[str, tuple[str, ...]] = {"q": ("q",), "k": ("k",), "v": ("v",), "kv": ("k", "v")}


@dataclass(frozen=True)
class Step:
    """One path-patching step: the group it finds, where senders are patched, and what they
    are scored through (``receiver_site`` ``None`` = the logits, else ``"q"``, ``"v"`` or
    ``"kv"`` of the top heads of group ``receivers_from``). Positions are position keys
    (``"last"``, ``"query_label"``; :func:`~entity_tracking.schema.position_column` names their
    batch columns)."""

    group: str
    sender_position: str
    corrupt_position: str
    receiver_site: Optional[str]
    receivers_from: Optional[str] = None


#: The paper's four steps, in discovery order.
STEPS: dict[str, Step] = {
    "value_fetcher": Step("value_fetcher", "last", "last", None),
    "position_transmitter": Step("position_transmitter", "last", "last", "q", "value_fetcher"),
    "position_detector": Step("position_detector", "query_label", "query_label", "v",
                              "position_transmitter"),
    "structure_reader": Step("structure_reader", "prev_query_label", "corrupt_label", "v",
                             "position_detector"),
}

#: Steps of ours beyond the paper's four (module docstring), run on a found circuit by
#: :func:`extend_circuit`; the sender position is the group's position in the circuit.
EXTENSION_STEPS: dict[str, Step] = {
    "object_writer": Step("object_writer", "prev_query_label", "corrupt_label", "kv",
                          "value_fetcher"),
}
_ALL_STEPS: dict[str, Step] = {**STEPS, **EXTENSION_STEPS}

#: How many top heads of a step become the next step's receivers (paper, Llama-7B).
PAPER_RECEIVERS_K: dict[str, int] = {"value_fetcher": 20, "position_transmitter": 5, "position_detector": 10}
#: Candidate group sizes handed to minimality pruning (paper, Llama-7B).
PAPER_CIRCUIT_K: dict[str, int] = {"value_fetcher": 58, "position_transmitter": 10, "position_detector": 25,
                                   "structure_reader": 5}

_LOG = "[entity_tracking.methods.path_patching]"
_DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


# --------------------------------------------------------------------------------------------
# Cost


@dataclass
class CostEstimate:
    """A sweep's cost before it runs.

    ``forward_equivalents``: FLOPs in units of one forward pass over the whole dataset
    (``n_examples`` prompts of ``seq_len`` tokens). ``peak_bytes``: estimated peak memory of
    activations and caches (weights excluded). ``per_part``: forward equivalents per part.
    """

    method: str
    model: str
    n_examples: int
    seq_len: int
    dtype: str
    flops: float
    forward_equivalents: float
    peak_bytes: int
    per_part: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:,.1f}" for k, v in self.per_part.items())
        return (f"path patching ({self.method}) on {self.model}, {self.n_examples} examples x {self.seq_len} tokens, "
                f"{self.dtype}: ~{self.forward_equivalents:,.1f} forward-pass equivalents over the dataset "
                f"({self.flops / 1e12:,.2f} TFLOP; {parts}); peak activation memory ~{_fmt_bytes(self.peak_bytes)}")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _as_arch(arch_or_config: Any) -> Arch:
    if isinstance(arch_or_config, Arch):
        return arch_or_config
    a = getattr(arch_or_config, "arch", None)
    return a if isinstance(a, Arch) else arch_for(arch_or_config)


def estimate_cost(
    arch_or_config: Any,
    n_examples: int,
    seq_len: int,
    dtype: Union[str, torch.dtype] = "float32",
    method: str = "fast",
    *,
    steps: Sequence[str] = tuple(STEPS),
    n_receivers: Optional[Mapping[str, int]] = None,
    suffix_lengths: Optional[Mapping[str, float]] = None,
    batch_size: int = 32,
    max_rows: Optional[int] = None,
    receiver_layers: Optional[Mapping[str, Sequence[int]]] = None,
    cache_budget: int = 2 << 30,
) -> CostEstimate:
    """Estimated FLOPs, forward-pass equivalents and peak activation memory of a sweep.

    Works from the geometry alone: ``arch_or_config`` is an :class:`Arch`, a ``LoadedModel``
    or a transformers config (``LlamaConfig(hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)`` for Llama-7B; no weights).

    Args:
        n_examples, seq_len: dataset size and prompt length (tokens, BOS included).
        method: ``"fast"`` or ``"naive"``.
        steps: which of :data:`STEPS` (or :data:`EXTENSION_STEPS`) the sweep runs (default the paper's four).
        n_receivers: receivers per step (default :data:`PAPER_RECEIVERS_K` of the previous group).
        suffix_lengths: mean suffix length (tokens from the receiver position to the end) per
            step; defaults: 1 at the last token, 3 at the query label, ``seq_len / 2`` at the
            previous query label (uniform over the context).
        batch_size: examples per forward pass (naive; fast pass 1).
        max_rows: (sender, example) rows per fast pass-2 forward (default from :func:`_default_max_rows`).
        receiver_layers: per step, the layers of its receivers (known once the previous step
            ran). The fast kernel skips sender layers with no receiver above them and runs pass 2
            from the first receiver layer above the sender; without this the estimate for
            ``fast`` is an upper bound (every layer a receiver layer).
        cache_budget: as in :class:`PathPatcher`: when the whole dataset's clean pass fits it,
            that one pass serves every step; otherwise the fast kernel makes a second clean pass.

    FLOPs count multiply-adds twice; attention scores included; logits of every position
    are counted for full forward passes (transformers computes them).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    a = _as_arch(arch_or_config)
    dt = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dt not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(_DTYPE_NAMES)}")
    nb = _DTYPE_BYTES[dt]
    L, H, Hkv, dh, d = a.n_layers, a.n_heads, a.n_kv_heads, a.d_head, a.d_model
    dm = a.d_mlp or 4 * d
    V = a.vocab_size
    S, N = int(seq_len), int(n_examples)
    for s in steps:
        if s not in _ALL_STEPS:
            raise ValueError(f"unknown step {s!r}; steps are {list(_ALL_STEPS)}")
    recv = {**{g: PAPER_RECEIVERS_K.get(st.receivers_from, 0) for g, st in _ALL_STEPS.items() if st.receivers_from},
            **(n_receivers or {})}
    suf = {"value_fetcher": 1.0, "position_transmitter": 1.0, "position_detector": 3.0,
           "structure_reader": S / 2, "object_writer": S / 2, **(suffix_lengths or {})}

    proj = 2 * d * (H + 2 * Hkv) * dh + 2 * H * dh * d  # q, k, v, o per token
    mlp = 2 * 3 * d * dm  # gated MLP per token
    unembed = 2 * d * V

    def tokens_flops(start: int, stop: int) -> float:  # tokens start..stop-1 attending to all before
        n = max(0, stop - start)
        ctx = (start + stop + 1) * n / 2  # sum of context lengths
        return L * (n * (proj + mlp) + 4 * H * dh * ctx) + n * unembed

    fwd = tokens_flops(0, S)  # one prompt
    parts: dict[str, float] = {"caches": 2 * N * fwd}
    bs = min(batch_size, N)
    act_per_token = (6 * d + 3 * dm + H * S) * nb  # one layer's live activations, roughly
    if method == "naive":
        senders = L * H
        for g in steps:
            passes = 1 if _ALL_STEPS[g].receiver_site is None else 2
            parts[g] = senders * passes * N * fwd
        caches = 2 * N * S * L * H * dh * nb  # clean and corrupt head outputs, every position
        frozen = bs * S * L * H * dh * nb  # one chunk's frozen-head patches
        forward = bs * S * (act_per_token + V * nb)
        peak = caches + frozen + forward
    else:
        state = N * L * S * (2 * Hkv * dh + 3 * d + H * dh) * nb  # the session's clean_state
        kept = state <= cache_budget
        if not kept and any(_ALL_STEPS[g].receiver_site for g in steps):
            parts["caches"] += N * fwd  # a second clean pass: each group's clean keys and values
        rows = min(max_rows or _default_max_rows(a, S, dt), H * N)  # pass 2 runs one sender layer at a time
        senders = L * H
        pass1_layer = 2 * H * dh * d + mlp  # o_proj of the patched vector + MLP, per layer and sender
        for g in steps:
            step = _ALL_STEPS[g]
            p1 = N * H * sum(pass1_layer + (L - 1 - l) * (mlp + 0) for l in range(L))
            if step.receiver_site is None:
                p1 += N * senders * unembed
                parts[g] = p1
            else:
                parts_n = len(_SITE_PARTS[step.receiver_site])  # projections per receiver ("kv": two)
                p1 += N * senders * L * 2 * d * (H * dh) * parts_n  # receivers' projections (upper bound)
                start = int(round(S - suf[g]))
                rl = sorted(set((receiver_layers or {}).get(g, range(1, L))))
                # pass 2 per sender layer l: the suffix through the blocks from the first receiver above l
                frac = sum((L - min(r for r in rl if r > l)) / L for l in range(L) if any(r > l for r in rl)) / L
                p2 = N * senders * frac * tokens_flops(start, S)
                parts[g] = p1 + p2
        caches = 2 * N * 3 * L * (2 * d + H * dh) * nb + (state if kept else 0)
        pass1 = H * bs * (4 * d + 3 * dm + V) * nb
        kv_row = L * 2 * Hkv * S * dh * nb
        t = max((suf[g] for g in steps if _ALL_STEPS[g].receiver_site), default=1)
        pass2 = rows * (kv_row + t * (act_per_token + V * nb))
        peak = caches + max(pass1, pass2)
    flops = sum(parts.values())
    model = f"{a.family} {L}x{H} heads (d_model {d}, d_mlp {dm}, vocab {V})"
    return CostEstimate(method=method, model=model, n_examples=N, seq_len=S, dtype=str(dt).replace("torch.", ""),
                        flops=flops, forward_equivalents=flops / (N * fwd), peak_bytes=int(peak),
                        per_part={k: v / (N * fwd) for k, v in parts.items()})


def _default_max_rows(arch: Arch, seq_len: int, dtype: torch.dtype, budget: int = 1 << 30) -> int:
    """(sender, example) rows per fast pass-2 forward so that its tiled key/value cache and
    suffix activations fit in ``budget`` bytes (1 GiB)."""
    nb = _DTYPE_BYTES.get(dtype, 4)
    row = arch.n_layers * 2 * arch.n_kv_heads * seq_len * arch.d_head * nb
    row += 4 * (6 * arch.d_model + 3 * (arch.d_mlp or 4 * arch.d_model) + arch.vocab_size) * nb
    return max(1, budget // row)


# --------------------------------------------------------------------------------------------
# The kernel


def _receivers_by_layer(arch: Arch, receivers: Sequence[Head], site: str) -> dict[int, list[int]]:
    """``{layer: indices on the site's head axis}`` (kv heads for ``k``, ``v`` and ``kv``), layers ascending."""
    out: dict[int, list[int]] = {}
    for layer, head in receivers:
        layer = arch.layer_index(int(layer))
        out.setdefault(layer, []).append(int(head))
    return {l: site_heads(arch, _SITE_PARTS[site][-1], hs) for l, hs in sorted(out.items())}


class PathPatcher:
    """Path patching on one dataset: clean/corrupt caches shared by several steps.

    Args:
        lm: a :class:`~entity_tracking.load.LoadedModel` (local; fast pass 1 calls its modules).
        base, source: :func:`~entity_tracking.task.encode_prompts` batches (or ids) of the clean and corrupt
            prompts, each without padding; example ``i`` of ``source`` corrupts example ``i``.
        target: ``[batch]`` correct-object token ids (scored at the base's last position).
        batch_size: examples per forward pass (caches, naive passes, fast pass 1).
        max_rows: (sender, example) rows per fast pass-2 forward (default: a 1 GiB budget).
        cache_budget: bytes allowed for keeping the clean run's key/value cache and residual
            stream of the whole dataset across steps (default 2 GiB; beyond it, per group).
        metric: a :data:`Metric`: :func:`relative` (the paper's mean of per-prompt relative
            changes), :func:`pooled` (relative change of the mean probability) or your own.
    """

    def __init__(self, lm: Any, base: Any, source: Any, target: torch.Tensor, *, batch_size: int = 32,
                 max_rows: Optional[int] = None, progress: bool = True, verbose: bool = True,
                 cache_budget: int = 2 << 30, metric: Metric = relative):
        if not callable(metric):
            raise TypeError(f"a path-patching metric is a callable (relative, pooled or your own), got {metric!r}; "
                            f"a profile's name becomes one with metric_named({metric!r})")
        self.metric = metric
        self.metric_name = metric_name(metric)
        self.lm = lm
        self.nn, self.arch, self.device, _ = lm_parts(lm)
        if getattr(lm, "remote", False):
            raise ValueError("path patching runs locally: load the model without remote: true")
        self.base = as_batch(base)
        self.source = as_batch(source)
        self.seq_len = check_unpadded(self.base, "base prompts")
        self.source_len = check_unpadded(self.source, "source (corrupt) prompts")
        self.n = self.base["input_ids"].shape[0]
        if self.source["input_ids"].shape[0] != self.n:
            raise ValueError(f"{self.n} base prompts but {self.source['input_ids'].shape[0]} source prompts")
        self.target = torch.as_tensor(target, dtype=torch.long)
        if self.target.shape != (self.n,):
            raise ValueError(f"target must be [batch] = [{self.n}], got {tuple(self.target.shape)}")
        if (self.target < 0).any() or (self.target >= self.arch.vocab_size).any():
            raise IndexError(f"target ids must lie in [0, {self.arch.vocab_size})")
        if not bool((self.base["last_position"] == self.seq_len - 1).all()):
            raise ValueError("base last_position must be the final token of every (unpadded) prompt")
        self.batch_size = batch_size
        self.dtype = next(self.arch.torch_module(lm).parameters()).dtype
        self.max_rows = max_rows or _default_max_rows(self.arch, self.seq_len, self.dtype)
        self.progress = progress
        self.verbose = verbose
        self._p_clean: Optional[torch.Tensor] = None
        self._clean_logits: Optional[torch.Tensor] = None
        self._full: dict[str, Any] = {}
        self._at: dict[tuple[str, tuple], Any] = {}
        self.cache_budget = cache_budget
        self.sessions = {which: Session(lm, batch, batch_size=batch_size, out_device=self.device, budget=cache_budget)
                         for which, batch in (("base", self.base), ("source", self.source))}

    # -- positions --------------------------------------------------------------------------

    def positions(self, which: str, key: Union[str, torch.Tensor]) -> torch.Tensor:
        """Per-example positions ``[batch]`` of the base (``which="base"``) or source batch:
        a position key (``"query_label"``) or a tensor; validated against the length."""
        batch = self.base if which == "base" else self.source
        if isinstance(key, str):
            if position_column(key) not in batch:
                raise KeyError(f"the {which} batch has no positions for '{key}' (its position keys: "
                               f"{position_keys(batch)}); encode it with task.encode_pairs")
            pos = positions_at(batch, key)
        else:
            pos = torch.as_tensor(key)
        what = f"{which} {key}" if isinstance(key, str) else f"{which} position"
        return check_positions(pos, batch["input_ids"].shape[1], what)[:, 0]

    # -- clean quantities -----------------------------------------------------------------

    @property
    def p_clean(self) -> torch.Tensor:
        """``[batch]`` clean probability of the target at the last token."""
        if self._p_clean is None:
            self._clean(run(Session(self.lm, self.base, batch_size=self.batch_size)).logits)
        return self._p_clean

    def _clean(self, logits: torch.Tensor) -> None:
        """Keep the clean run's last-position logits ``[batch, vocab]`` (the first ones made)."""
        if self._p_clean is None:
            self._clean_logits = logits
            self._p_clean = target_probs(logits, self.target)

    def _score(self, logits: torch.Tensor, rows: Union[slice, torch.Tensor]) -> torch.Tensor:
        """The metric's terms ``[rows]`` of patched ``logits`` ``[rows, vocab]`` for the prompts ``rows``."""
        dev = logits.device
        clean = Clean(self.p_clean.to(dev)[rows], self.p_clean.mean().to(dev), lambda: self._clean_logits.to(dev)[rows])
        return self.metric(logits, self.target.to(dev)[rows], clean)

    # -- naive ------------------------------------------------------------------------------

    def _full_z(self, which: str):
        if which not in self._full:
            batch = self.base if which == "base" else self.source
            res = run(Session(self.lm, batch, batch_size=self.batch_size), reads=[("z", l) for l in range(self.arch.n_layers)],
                      logits="last" if which == "base" else None)
            self._full[which] = res.cache
            if which == "base":
                self._clean(res.logits)
        return self._full[which]

    def naive_scores(self, sender_pos: torch.Tensor, corrupt_pos: torch.Tensor,
                     receivers: Sequence[Head] = (), site: Optional[str] = None) -> torch.Tensor:
        """The oracle: two full forward passes per sender and chunk of examples. ``[n_layers, n_heads]``."""
        a = self.arch
        clean, corrupt = self._full_z("base"), self._full_z("source")
        recv = _receivers_by_layer(a, receivers, site) if site else {}
        scores = torch.zeros(a.n_layers, a.n_heads)
        senders = [(l, h) for l in range(a.n_layers) for h in range(a.n_heads)]
        it = senders
        if self.progress:
            it = tqdm(senders, desc="path patching (naive)", leave=False)
        for (l, h) in it:
            total = 0.0
            for sl in batch_chunks(self.n, self.batch_size, False, ""):
                n = sl.stop - sl.start
                bi = torch.arange(n)
                chunk = {k: v[sl] for k, v in self.base.items() if isinstance(v, torch.Tensor)}
                ps, pc = sender_pos[sl], corrupt_pos[sl]
                frozen = []
                for l2 in range(a.n_layers):
                    z = clean["z", l2][sl].clone()
                    if l2 == l:
                        z[bi, ps, h] = corrupt["z", l2][sl][bi, pc, h]
                    frozen.append(HeadPatch("z", l2, None, z))
                one = Session(self.lm, chunk, batch_size=None)
                if site is None:
                    logits = run(one, frozen).logits
                else:
                    parts = _SITE_PARTS[site]
                    rec = run(one, frozen, [(s, l2) for l2 in recv for s in parts], positions=ps, logits=None).cache
                    patches = [HeadPatch(s, l2, hs, rec[s, l2][:, :, hs], ps) for l2, hs in recv.items() for s in parts]
                    logits = run(one, patches).logits
                total += float(self._score(logits, sl).sum())
            scores[l, h] = total / self.n
        return scores

    # -- fast -------------------------------------------------------------------------------

    _FAST_SITES = {"base": ("resid_pre", "z", "attn_out"), "source": ("z",)}

    def _at_positions(self, which: str, pos: torch.Tensor):
        """The fast kernel's cache of every layer at per-example ``pos`` ``[batch]`` (memoised):
        ``resid_pre``, ``z``, ``attn_out`` of the base, ``z`` of the source."""
        key = (which, tuple(pos.tolist()))
        if key not in self._at:
            st = self._kept() if which == "base" else None
            if st is not None:  # gathered from the whole-dataset clean pass
                b = torch.arange(self.n, device=self.device)
                p = pos.to(self.device)
                data = {(site, l): st[site][l][b, p][:, None] for site in self._FAST_SITES["base"]
                        for l in range(self.arch.n_layers)}
                self._at[key] = ActivationCache(data, pos[:, None], self.base["attention_mask"])
            else:
                self._cache_at(which, [pos])
        return self._at[key]

    def _cache_at(self, which: str, columns: Sequence[torch.Tensor]) -> None:
        """One run caching the fast kernel's sites at several position columns ``[batch]`` each."""
        batch = self.base if which == "base" else self.source
        sites = self._FAST_SITES[which]
        res = run(self.sessions[which], reads=[(s, l) for l in range(self.arch.n_layers) for s in sites],
                  positions=torch.stack(list(columns), 1), logits="last" if which == "base" else None)
        if which == "base":
            self._clean(res.logits)
        for j, col in enumerate(columns):
            data = {k: v[:, j:j + 1] for k, v in res.cache.data.items()}
            self._at[(which, tuple(col.tolist()))] = ActivationCache(data, col[:, None], res.cache.attention_mask)

    def prefetch(self, steps: Sequence[str] = tuple(STEPS)) -> None:
        """Cache, in one clean and one corrupt run, what the fast kernel needs for ``steps``
        (their sender and corrupt positions), so that several steps share two forward passes."""
        cols = {"base": {}, "source": {}}
        self._kept()  # the base's positions come from the whole-dataset clean pass when it fits
        for g in steps:
            st = _ALL_STEPS[g]
            for which, key in (("base", st.sender_position), ("source", st.corrupt_position)):
                pos = self.positions(which, key)
                k = (which, tuple(pos.tolist()))
                if k not in self._at:
                    cols[which][k] = pos
        for which, c in cols.items():
            if c:
                self._cache_at(which, list(c.values()))

    def fast_scores(self, sender_pos: torch.Tensor, corrupt_pos: torch.Tensor,
                    receivers: Sequence[Head] = (), site: Optional[str] = None) -> torch.Tensor:
        """Same scores as :meth:`naive_scores`, without attention in pass 1 and from the clean run
        in pass 2 (module docstring). ``[n_layers, n_heads]``."""
        a, dev = self.arch, self.device
        L, H = a.n_layers, a.n_heads
        clean = self._at_positions("base", sender_pos)
        corrupt = self._at_positions("source", corrupt_pos)
        recv = _receivers_by_layer(a, receivers, site) if site else {}
        # A sender layer matters only if some receiver sits above it (or the logits do).
        layers = [l for l in range(L) if site is None or any(l2 > l for l2 in recv)]
        sums = torch.zeros(L, H, device=dev)
        with torch.no_grad():
            if site is None:
                # With every head frozen the sender's effect stays at its position: it reaches the
                # logits (read at the last token) only for examples whose sender is the last token.
                at_last = (sender_pos == self.seq_len - 1).nonzero()[:, 0].to(dev)
                for l in self._progress(layers, "fast, logits"):
                    for sl in batch_chunks(len(at_last), self.batch_size, False, ""):
                        e = at_last[sl]
                        _, logits = self._pass1(l, e, clean, corrupt, {}, None, logits=True)
                        sums[l] += self._score(logits.reshape(H * len(e), -1), e.repeat(H)).view(H, -1).sum(1)
            else:
                groups = []  # (receiver position, examples): one tiled run per chunk of senders
                per = max(1, self.max_rows // H)
                for P in sorted(set(sender_pos.tolist())):
                    ex = (sender_pos == P).nonzero()[:, 0].to(dev)
                    groups += [(P, ex[s]) for s in batch_chunks(len(ex), per, False, "")]
                for P, e in self._progress(groups, f"fast, {site} receivers"):
                    rows = self.sessions["base"].rows(e)
                    for l in layers:
                        active = {l2: hs for l2, hs in recv.items() if l2 > l}
                        vals, _ = self._pass1(l, e, clean, corrupt, active, site)
                        sums[l] += self._pass2(P, rows, e, active, vals)
        return (sums / self.n).cpu()

    def _progress(self, items: list, what: str):
        if self.progress and len(items) > 1:
            return tqdm(items, desc=f"path patching ({what})", leave=False)
        return items

    def _pass1(self, l: int, e: torch.Tensor, clean, corrupt, active: dict[int, list[int]],
               site: Optional[str], logits: bool = False):
        """Fast pass 1 for all ``H`` senders of layer ``l`` and examples ``e``, at the sender position.

        Returns ``({receiver layer: {head site: [sender, n_e, n_sel, d_head]}}, logits [sender, n_e, vocab]
        or None)``; the head sites are those of ``site`` (``"kv"``: ``"k"`` and ``"v"``).
        """
        a = self.arch
        hf = a.torch_module(self.lm)
        H = a.n_heads
        diag = torch.arange(H, device=self.device)
        zp = clean["z", l][e, 0].unsqueeze(0).repeat(H, 1, 1, 1)  # [sender, n_e, H, d_head]
        zp[diag, :, diag] = corrupt["z", l][e, 0].transpose(0, 1)  # sender h takes its corrupt value
        attn = a.o_proj(hf, l)(a.merge_heads(zp))  # o_proj of the whole patched vector [sender, n_e, d]
        resid = a.add_mlp(hf, l, a.add_attn(hf, l, clean["resid_pre", l][e, 0], attn))
        stop = a.n_layers if logits else (max(active) if active else l)
        values: dict[int, dict[str, torch.Tensor]] = {}
        for l2 in range(l + 1, stop + 1 if not logits else stop):
            if l2 in active:
                x = a.attn_input(hf, l2, resid)
                values[l2] = {p: a.split_heads(a.module(hf, f"{p}_proj", l2)(x), n_site_heads(a, p))[:, :, active[l2]]
                              for p in _SITE_PARTS[site]}
            if l2 < stop:  # frozen heads: the clean attention output at this position
                resid = a.add_mlp(hf, l2, a.add_attn(hf, l2, resid, clean["attn_out", l2][e, 0]))
        return values, (a.unembed(hf, resid) if logits else None)

    def _kept(self) -> Optional[dict]:
        """The base session's clean run of the whole dataset (None beyond ``cache_budget``), whose
        logits give the clean probabilities."""
        st = self.sessions["base"].clean_state()
        if st is not None:
            self._clean(st["logits"][0])
        return st

    def _pass2(self, P: int, rows: Session, e: torch.Tensor, active: dict[int, list[int]],
               values: dict[int, dict[str, torch.Tensor]]) -> torch.Tensor:
        """Fast pass 2: summed scores ``[sender]`` over examples ``e`` (``rows`` of the base session,
        all with receiver position ``P``): every chunk of senders in one tiled run of the examples,
        with the receivers' pass-1 values written at ``P``."""
        a = self.arch
        H, n_e = a.n_heads, len(e)
        sums = torch.zeros(H, device=self.device)
        for ssl in batch_chunks(H, max(1, self.max_rows // n_e), False, ""):
            k = ssl.stop - ssl.start
            n_rows = n_e * k  # example-major: row = example * k + sender
            at = torch.full((n_rows, 1), P, dtype=torch.long)
            patches = [HeadPatch(p, l2, active[l2], v[ssl].transpose(0, 1).reshape(n_rows, 1, len(active[l2]), a.d_head), at)
                       for l2, by_site in values.items() for p, v in by_site.items()]
            logits = run(rows.tile(k), patches).logits
            sums[ssl] += self._score(logits, e.repeat_interleave(k)).view(n_e, k).sum(0)
        return sums

    # -- entry ------------------------------------------------------------------------------

    def scores(self, sender_position: Union[str, torch.Tensor], corrupt_position: Union[str, torch.Tensor],
               receivers: Sequence[Head] = (), site: Optional[str] = None, method: str = "fast",
               label: str = "") -> torch.Tensor:
        """Scores ``[n_layers, n_heads]`` of every sender head (see module docstring).

        ``sender_position``/``corrupt_position``: base/source batch keys or ``[batch]`` tensors.
        ``receivers``: ``(layer, head)`` query heads, read through ``site`` (``"q"``, ``"k"``,
        ``"v"``, or ``"kv"``: key and value together) at the sender position; ``site=None`` scores
        the direct effect on the logits.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if site is not None and site not in RECEIVER_SITES:
            raise ValueError(f"receiver site must be None (logits) or one of {RECEIVER_SITES}; got {site!r}")
        if site is not None and not receivers:
            raise ValueError(f"receiver site '{site}' given but no receiver heads")
        if site is None and receivers:
            raise ValueError("receivers given without a receiver site ('q' or 'v')")
        for layer, head in receivers:
            self.arch.layer_index(int(layer))
            self.arch.kv_head(int(head))  # range check
        ps = self.positions("base", sender_position)
        pc = self.positions("source", corrupt_position)
        if self.verbose:
            like = label if label in _ALL_STEPS and _ALL_STEPS[label].receiver_site == site else _step_like(site)
            est = estimate_cost(self.arch, self.n, self.seq_len, self.dtype, method,
                                steps=[like], n_receivers={like: len(receivers)},
                                suffix_lengths={like: float((self.seq_len - ps).float().mean())},
                                receiver_layers={like: [int(l) % self.arch.n_layers for l, _ in receivers]},
                                batch_size=self.batch_size, max_rows=self.max_rows)
            print(f"{_LOG} {label + ': ' if label else ''}{est}")
        fn = self.fast_scores if method == "fast" else self.naive_scores
        return fn(ps, pc, list(receivers), site)


def _step_like(site: Optional[str]) -> str:
    return {None: "value_fetcher", "q": "position_transmitter", "v": "position_detector",
            "k": "position_detector", "kv": "object_writer"}[site]


# --------------------------------------------------------------------------------------------
# Steps and the circuit


def _patcher_for(lm: Any, pairs: Any, **kw) -> PathPatcher:
    if isinstance(pairs, PathPatcher):
        return pairs
    if not isinstance(pairs, Mapping):

        pairs = encode_pairs(lm.tokenizer, list(pairs), padding_side="right")
    return PathPatcher(lm, pairs["base"], pairs["source"], pairs["target"], **kw)


def step_scores(lm: Any, pairs: Any, step: str, receivers: Sequence[Head] = (), *, method: str = "fast",
                **kw) -> torch.Tensor:
    """Scores ``[n_layers, n_heads]`` of one of the paper's :data:`STEPS` (``"value_fetcher"``,
    ...) or of ours (:data:`EXTENSION_STEPS`). ``pairs``: an :func:`~entity_tracking.task.encode_pairs` result,
    path-patching records, or a :class:`PathPatcher` (to share caches between steps).
    ``receivers``: the top heads of the step's ``receivers_from`` group (none for ``value_fetcher``)."""
    if step not in _ALL_STEPS:
        raise ValueError(f"unknown step {step!r}; steps are {list(_ALL_STEPS)}")
    s = _ALL_STEPS[step]
    pp = _patcher_for(lm, pairs, **kw)
    return pp.scores(s.sender_position, s.corrupt_position, receivers if s.receiver_site else (),
                     s.receiver_site, method, label=step)


def top_heads(scores: torch.Tensor, k: int, selection: str = "paper") -> list[Head]:
    """The ``k`` heads with the lowest scores, most negative first (ties: lower index).

    ``selection="paper"`` is the reference code's rule (``compute_topk_components(...,
    largest=False)``): the ``k`` lowest scores whatever their sign, so a group always has ``k``
    heads, positive-score ones included when fewer than ``k`` score below zero.
    ``selection="negative"`` (ours) keeps only heads whose score is below zero: a head that
    cannot reach the receivers scores exactly 0, and one whose patch *raises* the correct
    answer's probability does not carry it, so a group can come out smaller than ``k``, or empty.

    >>> top_heads(torch.tensor([[0.2, -0.1], [0.0, 0.3]]), 2)
    [(0, 1), (1, 0)]
    >>> top_heads(torch.tensor([[0.2, -0.1], [0.0, 0.3]]), 2, "negative")
    [(0, 1)]
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection rule {selection!r}; rules are {list(SELECTIONS)}")
    flat = torch.as_tensor(scores).flatten()
    k = max(0, min(int(k), flat.numel()))
    if selection == "negative":
        k = min(k, int((flat < 0).sum()))
    order = torch.sort(flat, stable=True).indices[:k]
    n_heads = scores.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def discover_circuit(
    lm: Any,
    pairs: Any,
    *,
    model_name: Optional[str] = None,
    receivers_k: Optional[Mapping[str, int]] = None,
    circuit_k: Optional[Mapping[str, int]] = None,
    method: str = "fast",
    drop_vf_pt_overlap: bool = True,
    prune: Optional[Callable[[Circuit], Circuit]] = None,
    metric: Metric = relative,
    selection: str = "paper",
    batch_size: int = 32,
    max_rows: Optional[int] = None,
    progress: bool = True,
    verbose: bool = True,
) -> Circuit:
    """Run the four steps and return the candidate circuit (or the pruned one).

    Args:
        pairs: :func:`~entity_tracking.task.encode_pairs` of path-patching records (or the records themselves).
        receivers_k: top heads of a step used as the next step's receivers (default
            :data:`PAPER_RECEIVERS_K`, clipped to the number of heads).
        circuit_k: heads per group in the candidate circuit (default :data:`PAPER_CIRCUIT_K`).
        drop_vf_pt_overlap: drop heads that are also Position Transmitters from the Value
            Fetchers (the paper's candidate sets do).
        prune: minimality pruning, ``Circuit -> Circuit`` (e.g. built on mean ablation,
            :mod:`entity_tracking.methods.ablation`); ``None`` returns the candidates.
        metric: :func:`relative` (the paper's), :func:`pooled` or your own (:data:`Metric`); ignored
            when ``pairs`` is a :class:`PathPatcher`, which has its own.
        selection: how a step's scores become a group (:func:`top_heads`): ``"paper"`` (the
            reference's k lowest scores, whatever their sign; every step runs from its k
            receivers) or ``"negative"`` (ours: negative scores only; a step whose receiver
            group came out empty scores zeros and finds nothing).

    Returns:
        a :class:`~entity_tracking.methods.circuit.Circuit` whose ``scores[group]`` are the score maps
        ``[n_layers][n_heads]`` (nested lists) and whose ``meta`` records the parameters,
        each step's receivers, the dataset size and the method.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection rule {selection!r}; rules are {list(SELECTIONS)}")
    pp = _patcher_for(lm, pairs, batch_size=batch_size, max_rows=max_rows, progress=progress, verbose=verbose,
                      metric=metric)
    a = pp.arch
    if method == "fast":
        pp.prefetch(GROUPS)
    rk = {**PAPER_RECEIVERS_K, **(receivers_k or {})}
    ck = {**PAPER_CIRCUIT_K, **(circuit_k or {})}
    scores: dict[str, torch.Tensor] = {}
    used_receivers: dict[str, list[Head]] = {}
    for g in GROUPS:
        s = STEPS[g]
        recv = top_heads(scores[s.receivers_from], rk[s.receivers_from], selection) if s.receivers_from else []
        used_receivers[g] = recv
        if s.receivers_from and not recv:  # "negative" only: the previous group is empty, no path to score
            scores[g] = torch.zeros(a.n_layers, a.n_heads)
            continue
        scores[g] = step_scores(lm, pp, g, recv, method=method)
    groups = {g: top_heads(scores[g], ck[g], selection) for g in GROUPS}
    if drop_vf_pt_overlap:
        pt = set(groups["position_transmitter"])
        groups["value_fetcher"] = [h for h in groups["value_fetcher"] if h not in pt]
    name = model_name or getattr(lm, "name", None) or "model"
    circuit = Circuit(
        model=name,
        groups=groups,
        scores={g: scores[g].tolist() for g in GROUPS},
        meta={
            "method": "path_patching",
            "kernel": method,
            "metric": pp.metric_name,
            "selection": selection,
            "receivers_k": {k: int(v) for k, v in rk.items()},
            "circuit_k": {k: int(v) for k, v in ck.items()},
            "drop_vf_pt_overlap": drop_vf_pt_overlap,
            "receivers": {g: [list(h) for h in hs] for g, hs in used_receivers.items()},
            "steps": {g: asdict(STEPS[g]) for g in GROUPS},
            "n_examples": pp.n,
            "mean_p_clean": float(pp.p_clean.mean()),
            "seq_len": pp.seq_len,
            "n_layers": a.n_layers,
            "n_heads": a.n_heads,
            "pruned": False,
        },
    )
    if prune is not None:
        circuit = prune(circuit)
        circuit.meta = {**circuit.meta, "pruned": True}
    return circuit


def extend_circuit(
    lm: Any,
    pairs: Any,
    circuit: Circuit,
    group: str = "object_writer",
    *,
    k: int,
    method: str = "fast",
    metric: Optional[Metric] = None,
    selection: Optional[str] = None,
    batch_size: int = 32,
    max_rows: Optional[int] = None,
    progress: bool = True,
    verbose: bool = True,
) -> Circuit:
    """``circuit`` with one group of ours added (:data:`EXTENSION_STEPS`, module docstring): the
    ``k`` lowest-scoring heads of the group's step, through ``circuit``'s own receivers (for the
    Object Writers, its Value Fetchers' keys and values at the queried label's context occurrence).

    Args:
        pairs: as for :func:`discover_circuit` (a :class:`PathPatcher` shares its caches).
        metric, selection: default to the ones ``circuit`` was found with (its ``meta`` names them;
            a metric by :func:`metric_named`), else the paper's (:func:`relative`, ``"paper"``): the
            new group is chosen by the same rule as the others.

    Returns:
        a copy of ``circuit`` whose paper groups are unchanged, holding ``group`` at the step's
        sender position, its score map in ``scores[group]`` and ``meta["extension"][group]``
        (step, receivers, k, metric, selection, kernel, examples). When ``circuit`` has no
        receivers the scores are zeros and the group is empty.
    """
    if group not in EXTENSION_STEPS:
        raise ValueError(f"unknown extension step {group!r}; extension steps are {list(EXTENSION_STEPS)}")
    if int(k) < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    metric = metric or metric_named(circuit.meta.get("metric", "relative"))
    selection = selection or circuit.meta.get("selection", "paper")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection rule {selection!r}; rules are {list(SELECTIONS)}")
    step = EXTENSION_STEPS[group]
    position = step.sender_position
    pp = _patcher_for(lm, pairs, batch_size=batch_size, max_rows=max_rows, progress=progress, verbose=verbose,
                      metric=metric)
    receivers = list(circuit.groups[step.receivers_from])
    if receivers:
        scores = step_scores(lm, pp, group, receivers, method=method)
    else:
        scores = torch.zeros(pp.arch.n_layers, pp.arch.n_heads)
    heads = top_heads(scores, k, selection)
    meta = {"step": asdict(step), "receivers": [list(h) for h in receivers], "k": int(k), "metric": pp.metric_name,
            "selection": selection, "kernel": method, "n_examples": pp.n, "mean_p_clean": float(pp.p_clean.mean())}
    return circuit.with_group(group, heads, position, scores=scores.tolist(),
                              meta={"extension": {**circuit.meta.get("extension", {}), group: meta}})


# --------------------------------------------------------------------------------------------
# The null: what a sweep finds in a model whose attention is scrambled


@contextmanager
def shuffled_attention(lm: Any, seed: int = 0) -> Iterator[Any]:
    """Within the block, ``lm``'s attention is scrambled: the entries of every q/k/v/o projection
    weight of every layer are randomly permuted in place (the same values, no structure). The
    weights are restored on exit, also after an error.

    Path patching on this model measures what the sweep reports when no head implements anything:
    the scale of scores that noise alone produces (:func:`null_circuit`)."""
    arch = lm.arch
    gen = torch.Generator().manual_seed(seed)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in range(arch.n_layers):
                for mod in arch.attention_projections(lm, layer):
                    w = mod.weight
                    saved.append((w, w.detach().to("cpu", copy=True)))
                    perm = torch.randperm(w.numel(), generator=gen).to(w.device)
                    w.copy_(w.detach().flatten()[perm].view_as(w))
        yield lm
    finally:
        with torch.no_grad():
            for w, orig in saved:
                w.copy_(orig.to(w.device))


def null_circuit(lm: Any, pairs: Any, *, seed: int = 0, **discover_kw) -> Circuit:
    """:func:`discover_circuit` on ``lm`` with :func:`shuffled_attention` (same prompts, same
    k, same rules): its per-step scores are the null the real sweep's groups are read against
    (:func:`entity_tracking.methods.verdicts.groups_standing_out`).

    >>> # null = null_circuit(lm, pairs, receivers_k=spec.receivers, circuit_k=spec.candidates)
    """
    if isinstance(pairs, PathPatcher):
        raise TypeError("null_circuit needs the pairs, not a PathPatcher: its clean caches belong to the real model")
    name = discover_kw.pop("model_name", None) or getattr(lm, "name", None) or "model"
    with shuffled_attention(lm, seed):
        c = discover_circuit(lm, pairs, model_name=f"{name} (attention shuffled)", **discover_kw)
    c.meta = {**c.meta, "null": "shuffled attention", "null_seed": seed}
    return c
