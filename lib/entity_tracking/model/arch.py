"""The architecture table: where each model family keeps its layers, heads and projections.

Every method of the book (activation and path patching, DCM, CMAP) reads and writes the same
few places inside a decoder: the attention heads' outputs, their queries, keys and values, the
residual stream after a block, the final norm and the unembedding. Their module paths and the
numbers needed to split a projection into heads differ per family and per config, so they are
written down exactly once, here, as a table of :class:`Layout` rows (one per family) and the
:class:`Arch` object that :func:`arch_for` builds from a model or config. Nothing else in the
code base names ``model.layers[...]`` or a module path: kernels ask the ``Arch`` for an nnsight
envoy (``arch.o_proj(nn, layer)``) or read and write an activation *site* inside a trace
(``arch.read(nn, "z", layer)``, ``arch.write(nn, "z", layer, value)``); one table,
:data:`SITE_MODULES`, says which module's input or output each site is and how it splits into
heads. :meth:`Arch.attention_pattern` recomputes a layer's attention weights from recorded
queries and keys by the layer's own rules, so no method needs a fused kernel to hand them out.

Conventions, shared by every family in the table:

* **Per-head outputs** are the *input* of ``o_proj``: the attention-weighted values of every
  head, concatenated, before the output projection mixes them. Reshaped it is
  ``[batch, pos, n_heads, d_head]``; head ``h`` owns the slice ``h*d_head:(h+1)*d_head``, and
  ``o_proj`` is linear, so a head's contribution to the residual stream is its slice times
  the matching columns of ``W_O``. This is the paper's "head output" (its hooks read the same
  tensor); reading it through the module input keeps any LoRA delta of ``o_proj`` in the
  forward pass (the reference code recomputed ``o_proj`` from base weights and lost it).
* **Queries, keys, values** are the *outputs* of ``q_proj``/``k_proj``/``v_proj``:
  ``[batch, pos, n_heads, d_head]`` for queries and ``[batch, pos, n_kv_heads, d_head]`` for
  keys and values, before rotary embeddings (and before Gemma3's per-head ``q_norm``/``k_norm``).
* **Grouped-query attention (GQA).** With ``n_kv_heads < n_heads`` the query heads come in
  ``group = n_heads // n_kv_heads`` consecutive blocks sharing one key/value head:
  query head ``h`` attends with kv head ``h // group`` (:meth:`Arch.kv_head`), and kv head
  ``g`` serves query heads ``g*group ... (g+1)*group - 1`` (:meth:`Arch.query_heads`).
  This is transformers' ``repeat_kv`` (``repeat_interleave`` on the head axis). Patching a
  key or value head therefore changes ``group`` query heads at once; multi-head attention is
  the special case ``group == 1``.
* **Blocks return a tensor** in transformers 5 (``[batch, pos, d_model]``), not a tuple;
  attention modules still return a tuple ``(out, weights)``.
* **The residual block.** Each family's decoder block is attention then MLP around the residual
  stream, with the norms in family-specific places (the ``*_norm`` fields of :class:`Layout`):

  ==================  ===============================================================
  Llama/Mistral/Qwen2 ``mid = resid + attn(input_layernorm(resid))``;
                      ``post = mid + mlp(post_attention_layernorm(mid))``
  Gemma3              ``mid = resid + post_attention_layernorm(attn(input_layernorm(resid)))``;
                      ``post = mid + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(mid)))``
  ==================  ===============================================================

  Everything but attention acts on each position separately, so
  :meth:`Arch.attn_input`, :meth:`Arch.add_attn`, :meth:`Arch.add_mlp` and :meth:`Arch.unembed`
  can recompute one position's path through the network from its cached residual stream and
  the attention outputs (``o_proj`` outputs, :meth:`Arch.attn_out`) -- what fast path patching
  does when every head is frozen. They take plain tensors ``[..., d_model]`` (any leading shape).

Inside an nnsight trace, read modules **in forward order** within one invoke (layer by layer;
q, k, v, then o inside a layer) or nnsight raises ``OutOfOrderError``. Reads return live
tensors: ``arch.read(nn, "z", l)`` is a *view* of the o_proj input, so ``.clone()`` or ``.save()`` it
before keeping it. Writes (``arch.write(...)``) *replace* the module's
input/output with a new tensor rather than editing in place, which is what autograd needs when
a learned mask (DCM) is trained through the intervention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..schema import SITES

__all__ = [
    "Arch",
    "FAMILIES",
    "Layout",
    "MODEL_TYPES",
    "SITE_MODULES",
    "SiteModule",
    "UnsupportedArchitecture",
    "arch_for",
    "tokenizer_adds_bos",
]


class UnsupportedArchitecture(ValueError):
    """A model whose architecture has no row in the table (:data:`FAMILIES`)."""


@dataclass(frozen=True)
class Layout:
    """Module paths of one family, relative to the ``*ForCausalLM`` root.

    ``layers`` is the ``ModuleList`` of decoder blocks; ``attn``, the projections and ``mlp``
    are relative to one block (``attn`` first, then the projection name). ``qk_norm`` records
    that the family normalises queries and keys per head after the projections (Gemma3), so
    a patched ``q_proj``/``k_proj`` output still passes through that norm.
    """

    family: str
    classes: tuple[str, ...]
    layers: str = "model.layers"
    attn: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    mlp_out_proj: str = "down_proj"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    qk_norm: bool = False
    #: Per-position norms of the residual block (relative to one block); ``None`` = absent.
    attn_in_norm: str = "input_layernorm"
    attn_out_norm: Optional[str] = None
    mlp_in_norm: str = "post_attention_layernorm"
    mlp_out_norm: Optional[str] = None
    #: The model's rotary-embedding module; Gemma3's takes the layer type (sliding or full).
    rotary: str = "model.rotary_emb"
    rotary_per_layer_type: bool = False


#: One row per family. Llama-1/2/3, Vicuna, Goat, FLoat, SmolLM2 are ``LlamaForCausalLM``;
#: Mistral has the same tree. Qwen2 adds q/k/v biases (same paths). Gemma3 text models
#: (``Gemma3ForCausalLM``, ``model_type`` ``gemma3_text``) have an explicit ``head_dim`` with
#: ``n_heads * head_dim != d_model`` and per-head q/k norms.
FAMILIES: dict[str, Layout] = {
    "llama": Layout("llama", classes=("LlamaForCausalLM", "MistralForCausalLM")),
    "qwen2": Layout("qwen2", classes=("Qwen2ForCausalLM",)),
    "gemma3": Layout(
        "gemma3",
        classes=("Gemma3ForCausalLM",),
        qk_norm=True,
        rotary_per_layer_type=True,
        attn_out_norm="post_attention_layernorm",
        mlp_in_norm="pre_feedforward_layernorm",
        mlp_out_norm="post_feedforward_layernorm",
    ),
}

#: ``config.model_type`` -> family.
MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gemma3_text": "gemma3",
}

#: Sites inside one decoder block, and sites of the whole model (no layer index).
LAYER_SITES = ("layer", "attn", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "mlp_out_proj")
MODEL_SITES = ("embed", "final_norm", "lm_head")
#: The norms of the residual block (per layer); a family lacking one has ``None`` in its Layout.
NORM_SITES = ("attn_in_norm", "attn_out_norm", "mlp_in_norm", "mlp_out_norm")


@dataclass(frozen=True)
class SiteModule:
    """Where an activation site lives: the module (a :data:`LAYER_SITES` name), whether the site is
    that module's ``input`` or ``output``, and whether it splits into heads (``"q"``: the query
    heads, ``"kv"``: the key/value heads; None: a residual-width tensor ``[batch, pos, d_model]``)."""

    module: str
    end: str
    heads: Optional[str] = None


#: Every activation site (:data:`entity_tracking.schema.SITES`, in forward order within a block):
#: the one table :meth:`Arch.read` and :meth:`Arch.write` work from.
SITE_MODULES: dict[str, SiteModule] = {
    "resid_pre": SiteModule("layer", "input"),  # the block's input (layer 0: the embeddings)
    "q": SiteModule("q_proj", "output", "q"),  # before rotary embeddings (and Gemma3's q_norm)
    "k": SiteModule("k_proj", "output", "kv"),
    "v": SiteModule("v_proj", "output", "kv"),
    "z": SiteModule("o_proj", "input", "q"),  # per-head outputs, before W_O: the paper's head output
    "attn_out": SiteModule("o_proj", "output"),  # before any post-attention norm
    "resid_post": SiteModule("layer", "output"),
}


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` prepends its BOS token to plain text (Llama-1/2 and Gemma do;
    Qwen2 and SmolLM2 do not; Llama-3 does). Positions in a prompt shift by one with it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("The", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _config_of(model_or_config: Any):
    """The HF config behind a config, an HF model, an nnsight envoy or a LoadedModel."""
    obj = _unwrap(model_or_config)
    if hasattr(obj, "model_type") and hasattr(obj, "to_dict"):
        return obj
    cfg = getattr(obj, "config", None)
    if cfg is not None and hasattr(cfg, "model_type"):
        return cfg
    raise UnsupportedArchitecture(
        f"cannot read a transformers config from {type(model_or_config).__name__}; "
        "pass a PretrainedConfig, a transformers model, or an nnsight TransformersModel"
    )


def _unwrap(obj: Any) -> Any:
    """A LoadedModel (marked by a class attribute, so nnsight's attribute fall-through is never
    consulted) stands for its nnsight model."""
    return obj.nn if getattr(type(obj), "_IS_LOADED_MODEL", False) else obj


def _resolve(root: Any, path: str) -> Any:
    root = _unwrap(root)
    if isinstance(root, torch.nn.Module):
        return root.get_submodule(path)
    getter = getattr(type(root), "get", None)
    if getter is None:
        raise TypeError(f"cannot resolve '{path}' on {type(root).__name__}")
    return root.get(path)


def _torch_module_of(obj: Any) -> Optional[torch.nn.Module]:
    obj = _unwrap(obj)
    if isinstance(obj, torch.nn.Module):
        return obj
    mod = getattr(obj, "_module", None)  # nnsight Envoy
    return mod if isinstance(mod, torch.nn.Module) else None


@dataclass(frozen=True)
class Arch:
    """One model's architecture: its family's :class:`Layout` and its head geometry.

    Built by :func:`arch_for`. Site accessors take ``root`` -- an nnsight ``TransformersModel``
    (returns the envoy, for use inside a trace), a plain ``torch.nn.Module`` (returns the
    submodule) or a ``LoadedModel`` (uses its ``.nn``) -- and a layer index (negative counts
    from the end).

    Attributes:
        family: row of :data:`FAMILIES` (``llama``, ``qwen2``, ``gemma3``).
        model_type: the config's ``model_type`` (``llama``, ``mistral``, ``qwen2``, ...).
        n_layers, n_heads, n_kv_heads, d_head, d_model, vocab_size: from the config;
            ``d_head`` is the config's ``head_dim`` when it has one, else ``d_model // n_heads``.
        adds_bos: whether the tokenizer prepends BOS (``None`` when no tokenizer was given).
    """

    family: str
    model_type: str
    layout: Layout
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    vocab_size: int
    adds_bos: Optional[bool] = None
    d_mlp: Optional[int] = None
    logit_softcap: Optional[float] = None

    # -- geometry -------------------------------------------------------------

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.n_kv_heads < self.n_heads

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` attends with: ``head // group_size``."""
        self.check_head(head, self.n_heads, "query")
        return head // self.group_size

    def query_heads(self, kv_head: int) -> range:
        """The query heads served by key/value head ``kv_head``."""
        self.check_head(kv_head, self.n_kv_heads, "key/value")
        g = self.group_size
        return range(kv_head * g, (kv_head + 1) * g)

    def expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n_kv_heads, d_head]`` -> ``[..., n_heads, d_head]``: each kv head repeated for
        the query heads it serves (what attention computes with; identity without GQA)."""
        if x.shape[-2] != self.n_kv_heads:
            raise ValueError(f"expected {self.n_kv_heads} kv heads on dim -2, got shape {tuple(x.shape)}")
        return x.repeat_interleave(self.group_size, dim=-2)

    def split_heads(self, x: torch.Tensor, n_heads: Optional[int] = None) -> torch.Tensor:
        """``[..., n * d_head]`` -> ``[..., n, d_head]`` (a view); ``n`` defaults to ``n_heads``."""
        n = n_heads or self.n_heads
        if x.shape[-1] != n * self.d_head:
            raise ValueError(
                f"cannot split last dim {x.shape[-1]} into {n} heads x d_head {self.d_head} "
                f"(shape {tuple(x.shape)})"
            )
        return x.view(*x.shape[:-1], n, self.d_head)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """``[..., n, d_head]`` -> ``[..., n * d_head]``."""
        return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])

    def check_head(self, head: int, n: int, kind: str) -> None:
        """Raise an ``IndexError`` naming the head unless ``0 <= head < n`` (``kind``: ``"query"``
        for a query head among ``n_heads``, ``"key/value"`` among ``n_kv_heads``)."""
        if not 0 <= head < n:
            raise IndexError(f"{kind} head {head} out of range: the model has {n}")

    def layer_index(self, layer: int) -> int:
        """``layer`` as an index in ``[0, n_layers)`` (negative counts from the end); an
        ``IndexError`` naming the layer when it is out of range."""
        idx = layer + self.n_layers if layer < 0 else layer
        if not 0 <= idx < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        return idx

    # -- paths and modules ----------------------------------------------------

    def path(self, site: str, layer: Optional[int] = None) -> str:
        """Dotted module path of ``site`` (one of :data:`LAYER_SITES` or :data:`NORM_SITES` with a
        layer, or of :data:`MODEL_SITES` without), e.g.
        ``path("o_proj", 3) == "model.layers.3.self_attn.o_proj"``."""
        L = self.layout
        if site in MODEL_SITES:
            if layer is not None:
                raise ValueError(f"site '{site}' is not per layer; call path('{site}')")
            return getattr(L, site)
        if site not in LAYER_SITES and site not in NORM_SITES:
            raise ValueError(f"unknown site '{site}' (per layer: {LAYER_SITES}; model: {MODEL_SITES})")
        if layer is None:
            raise ValueError(f"site '{site}' needs a layer index")
        block = f"{L.layers}.{self.layer_index(layer)}"
        if site == "layer":
            return block
        if site in NORM_SITES:
            name = getattr(L, site)
            if name is None:
                raise ValueError(f"family '{self.family}' has no {site} in its residual block")
            return f"{block}.{name}"
        if site in ("attn", "mlp"):
            return f"{block}.{getattr(L, site)}"
        if site == "mlp_out_proj":  # the MLP's last projection, which writes to the residual stream
            return f"{block}.{L.mlp}.{L.mlp_out_proj}"
        return f"{block}.{L.attn}.{getattr(L, site)}"

    def module(self, root: Any, site: str, layer: Optional[int] = None) -> Any:
        """The envoy (nnsight root) or submodule (torch root) at ``site``."""
        return _resolve(root, self.path(site, layer))

    def layers(self, root: Any) -> Any:
        """The ``ModuleList`` (envoy) of decoder blocks."""
        return _resolve(root, self.layout.layers)

    def layer(self, root: Any, layer: int) -> Any:
        """Decoder block ``layer``; its output is the residual stream ``[batch, pos, d_model]``."""
        return self.module(root, "layer", layer)

    def attn(self, root: Any, layer: int) -> Any:
        """Attention module of block ``layer``; its output is a tuple ``(out, weights)``."""
        return self.module(root, "attn", layer)

    def q_proj(self, root: Any, layer: int) -> Any:
        return self.module(root, "q_proj", layer)

    def k_proj(self, root: Any, layer: int) -> Any:
        return self.module(root, "k_proj", layer)

    def v_proj(self, root: Any, layer: int) -> Any:
        return self.module(root, "v_proj", layer)

    def o_proj(self, root: Any, layer: int) -> Any:
        """Output projection of block ``layer``; its *input* holds the per-head outputs."""
        return self.module(root, "o_proj", layer)

    def mlp(self, root: Any, layer: int) -> Any:
        return self.module(root, "mlp", layer)

    def attention_projections(self, root: Any, layer: int) -> list[torch.nn.Module]:
        """The torch modules ``[q_proj, k_proj, v_proj, o_proj]`` of block ``layer`` (for weight edits)."""
        model = self.torch_module(root)
        return [model.get_submodule(self.path(site, layer)) for site in ("q_proj", "k_proj", "v_proj", "o_proj")]

    def embed(self, root: Any) -> Any:
        return self.module(root, "embed")

    def final_norm(self, root: Any) -> Any:
        return self.module(root, "final_norm")

    def lm_head(self, root: Any) -> Any:
        return self.module(root, "lm_head")

    # -- reads and writes inside an nnsight trace -----------------------------

    def site_module(self, site: str) -> "SiteModule":
        """The :data:`SITE_MODULES` row of ``site`` (raises naming the sites)."""
        try:
            return SITE_MODULES[site]
        except KeyError:
            raise ValueError(f"unknown site '{site}'; sites are {tuple(SITE_MODULES)}") from None

    def head_count(self, site: str) -> Optional[int]:
        """How many heads ``site`` splits into: ``n_heads`` (``q``, ``z``), ``n_kv_heads``
        (``k``, ``v``), or None for a residual-width site ``[batch, pos, d_model]``."""
        heads = self.site_module(site).heads
        return None if heads is None else (self.n_kv_heads if heads == "kv" else self.n_heads)

    def _envoy_value(self, nn: Any, site: str, layer: int) -> tuple[Any, str]:
        row = self.site_module(site)
        return self.module(nn, row.module, layer), row.end

    def read(self, nn: Any, site: str, layer: int) -> torch.Tensor:
        """The live activation at ``site`` of ``layer`` inside an nnsight trace.

        Head sites come split, ``[batch, pos, n, d_head]`` (``n`` = :meth:`head_count`): a *view*
        of the module's tensor, so ``.clone()``/``.save()`` it to keep it past later writes.
        Residual sites are ``[batch, pos, d_model]``. Read sites in forward order
        (:data:`SITE_MODULES` lists them so within a layer)::

            with lm.trace(ids):
                z = arch.read(lm.nn, "z", 3).clone().save()   # [batch, pos, n_heads, d_head]
        """
        mod, end = self._envoy_value(nn, site, layer)
        value = mod.input if end == "input" else mod.output
        n = self.head_count(site)
        return value if n is None else self.split_heads(value, n)

    def write(self, nn: Any, site: str, layer: int, value: torch.Tensor) -> None:
        """Replace the activation at ``site`` of ``layer`` with ``value`` (the shape :meth:`read`
        returns). The module's input or output is *replaced* by a new tensor, never edited in
        place, so gradients flow through a written value (DCM trains a mask this way)::

            with lm.trace(ids):
                z = arch.read(lm.nn, "z", 0).clone()
                z[:, :, 1] = 0                    # knock out head 1 everywhere
                arch.write(lm.nn, "z", 0, z)
        """
        mod, end = self._envoy_value(nn, site, layer)
        n = self.head_count(site)
        if n is None:
            if value.shape[-1] != self.d_model:
                raise ValueError(f"write {site}: expected [batch, pos, {self.d_model}] (d_model), got {list(value.shape)}")
        else:
            self._check_shape(value, n, f"write {site}")
            value = self.merge_heads(value)
        if end == "input":
            mod.input = value
        else:
            mod.output = value

    # -- attention patterns from recorded queries and keys --------------------

    def rope(self, root: Any, site: str, layer: int, x: torch.Tensor,
             position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Queries or keys as attention uses them: the projection output ``x``
        ``[batch, pos, n, d_head]`` (``site`` ``"q"`` or ``"k"``, as :meth:`read` gives it) through
        the family's per-head norm (Gemma3's ``q_norm``/``k_norm``) and the rotary embedding of
        the model's own ``rotary_emb`` module at ``position_ids`` ``[batch, pos]`` (default
        ``0 .. pos-1``, what the model uses when given none, padded or not)."""
        if site not in ("q", "k"):
            raise ValueError(f"rope: site must be 'q' or 'k', got '{site}'")
        model = self.torch_module(root)
        attn = model.get_submodule(self.path("attn", layer))
        if self.layout.qk_norm:
            x = getattr(attn, f"{site}_norm")(x)
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        rotary = model.get_submodule(self.layout.rotary)
        layer_type = getattr(attn, "layer_type", None)
        args = (x, position_ids) + ((layer_type,) if self.layout.rotary_per_layer_type else ())
        cos, sin = rotary(*args)  # [batch, pos, d_head]
        cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate each pair of halves
        return x * cos + rotated * sin

    def attention_pattern(self, root: Any, layer: int, q: torch.Tensor, k: torch.Tensor, *,
                          query_positions: Optional[torch.Tensor] = None,
                          attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention weights ``[batch, n_heads, n_q, pos]`` of ``layer`` from queries ``q``
        ``[batch, n_q, n_heads, d_head]`` at ``query_positions`` ``[batch, n_q]`` (default: the
        last ``n_q`` positions) to keys ``k`` ``[batch, pos, n_kv_heads, d_head]``, both after
        :meth:`rope`. The layer's own rules, read off its attention module: its ``scaling``, the
        GQA repeat (:meth:`expand_kv`), a sliding window where it has one, the causal mask and
        the padding mask ``[batch, pos]``; softmax in float32 as the eager implementation
        computes it. No attention-logit soft-capping: Gemma3 keeps ``attn_logit_softcapping`` in
        its config but its attention never applies it (transformers 5; Gemma2's did), and the
        other families have none.

        >>> at = batch["last_position"][:, None]  # q: the queries at each prompt's last token
        >>> pat = arch.attention_pattern(lm.hf, 1, arch.rope(lm.hf, "q", 1, q, position_ids=at), arch.rope(lm.hf, "k", 1, k),
        ...                              query_positions=at)
        >>> tuple(pat.shape[1:3]) == (arch.n_heads, 1) and torch.allclose(pat.sum(-1), torch.ones(1))
        True
        """
        attn = self.torch_module(root).get_submodule(self.path("attn", layer))
        B, n_q = q.shape[:2]
        S = k.shape[1]
        if query_positions is None:
            query_positions = torch.arange(S - n_q, S, device=q.device)[None].expand(B, -1)
        qpos = torch.as_tensor(query_positions, device=q.device).reshape(B, n_q)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, self.expand_kv(k)) * attn.scaling
        kpos = torch.arange(S, device=q.device)
        allowed = kpos[None, None, :] <= qpos[:, :, None]  # [batch, n_q, pos]
        # Qwen2 and Gemma3 set it per layer on the module; Mistral's config applies to every layer
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
        if window:
            allowed &= kpos[None, None, :] > qpos[:, :, None] - window
        if attention_mask is not None:
            allowed &= attention_mask.to(q.device).bool()[:, None, :]
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        return scores.softmax(-1, dtype=torch.float32).to(q.dtype)

    # -- the per-position parts of a block, on plain tensors ------------------

    def _norm(self, root: Any, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.layout, site) is None:
            return x
        return self.torch_module(root).get_submodule(self.path(site, layer))(x)

    def torch_module(self, root: Any) -> torch.nn.Module:
        """The plain ``torch.nn.Module`` behind ``root`` (an nnsight model, a ``LoadedModel`` or
        the module itself): for weights, its config and computation outside a trace."""
        mod = _torch_module_of(root)
        if mod is None:
            raise TypeError(f"per-position block computation needs a torch model, got {type(root).__name__}")
        return mod

    def attn_input(self, root: Any, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """What the q/k/v projections of ``layer`` read: ``attn_in_norm(resid)`` ``[..., d_model]``."""
        return self._norm(root, "attn_in_norm", layer, resid)

    def add_attn(self, root: Any, layer: int, resid: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual after attention: ``resid + attn_out_norm(attn_out)`` (``attn_out`` = o_proj
        output; the norm only in families that have one, e.g. Gemma3)."""
        return resid + self._norm(root, "attn_out_norm", layer, attn_out)

    def add_mlp(self, root: Any, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
        """Residual after the MLP: ``mid + mlp_out_norm(mlp(mlp_in_norm(mid)))``."""
        h = self._norm(root, "mlp_in_norm", layer, resid_mid)
        h = self.torch_module(root).get_submodule(self.path("mlp", layer))(h)
        return resid_mid + self._norm(root, "mlp_out_norm", layer, h)

    def unembed(self, root: Any, resid: torch.Tensor) -> torch.Tensor:
        """Logits from the final residual stream: ``lm_head(final_norm(resid))``, with the
        config's final-logit soft-capping (Gemma-style ``c * tanh(x / c)``) when it has one."""
        m = self.torch_module(root)
        logits = m.get_submodule(self.path("lm_head"))(m.get_submodule(self.path("final_norm"))(resid))
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def _check_shape(self, value: torch.Tensor, n: int, what: str) -> None:
        if value.dim() != 4 or value.shape[-2:] != (n, self.d_head):
            raise ValueError(
                f"{what}: expected [batch, pos, {n}, {self.d_head}], got {tuple(value.shape)}"
            )

    def with_tokenizer(self, tokenizer) -> "Arch":
        """A copy with ``adds_bos`` read from ``tokenizer``."""
        return dataclasses.replace(self, adds_bos=tokenizer_adds_bos(tokenizer))

    def describe(self) -> str:
        kv = f", {self.n_kv_heads} kv heads (GQA group {self.group_size})" if self.is_gqa else ""
        bos = "" if self.adds_bos is None else f", BOS {'added' if self.adds_bos else 'not added'}"
        return (
            f"{self.family}/{self.model_type}: {self.n_layers} layers x {self.n_heads} heads{kv}, "
            f"d_head {self.d_head}, d_model {self.d_model}{bos}"
        )


def _supported() -> str:
    return ", ".join(f"{mt} ({fam})" for mt, fam in MODEL_TYPES.items())


def arch_for(model_or_config: Any, tokenizer: Any = None) -> Arch:
    """Build the :class:`Arch` of a config, transformers model, nnsight model or LoadedModel.

    With a model (not a bare config) the o_proj/q_proj/k_proj shapes are checked against the
    head geometry, so a config attribute read wrongly fails here rather than splitting heads
    at the wrong boundaries. ``tokenizer`` fills in :attr:`Arch.adds_bos`.

    Raises :class:`UnsupportedArchitecture` naming the architecture for a family not in
    :data:`FAMILIES` (add a :class:`Layout` row and a :data:`MODEL_TYPES` entry to support it).
    """
    cfg = _config_of(model_or_config)
    model_type = getattr(cfg, "model_type", None)
    archs = list(getattr(cfg, "architectures", None) or [])
    family = MODEL_TYPES.get(model_type)
    if family is None:
        hint = ""
        if getattr(cfg, "text_config", None) is not None:
            hint = " (a multimodal config: load the text-only *ForCausalLM checkpoint instead)"
        raise UnsupportedArchitecture(
            f"architecture {archs[0] if archs else type(cfg).__name__!r} (model_type {model_type!r}) "
            f"is not in the architecture table{hint}; supported model types: {_supported()}"
        )
    layout = FAMILIES[family]
    module = _torch_module_of(model_or_config)
    cls_names = [type(module).__name__] if module is not None else archs
    bad = [c for c in cls_names if c not in layout.classes]
    if bad:
        raise UnsupportedArchitecture(
            f"architecture {bad[0]!r} (model_type {model_type!r}) is not a causal-LM class of the "
            f"'{family}' row (expected one of {layout.classes})"
        )
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    d_model = int(cfg.hidden_size)
    d_head = int(getattr(cfg, "head_dim", None) or d_model // n_heads)
    if n_heads % n_kv:
        raise UnsupportedArchitecture(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    arch = Arch(
        family=family,
        model_type=model_type,
        layout=layout,
        n_layers=int(cfg.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        d_model=d_model,
        vocab_size=int(cfg.vocab_size),
        d_mlp=int(cfg.intermediate_size) if getattr(cfg, "intermediate_size", None) else None,
        logit_softcap=float(cfg.final_logit_softcapping) if getattr(cfg, "final_logit_softcapping", None) else None,
    )
    if module is not None:
        _check_geometry(arch, module)
    if tokenizer is not None:
        arch = arch.with_tokenizer(tokenizer)
    return arch


def _in_out(mod: torch.nn.Module) -> tuple[int, int]:
    base = getattr(mod, "base_layer", mod)  # an unmerged PEFT LoRA layer wraps the Linear
    return int(base.in_features), int(base.out_features)


def _check_geometry(arch: Arch, model: torch.nn.Module) -> None:
    expect = {
        "o_proj": (arch.n_heads * arch.d_head, arch.d_model),
        "q_proj": (arch.d_model, arch.n_heads * arch.d_head),
        "k_proj": (arch.d_model, arch.n_kv_heads * arch.d_head),
        "v_proj": (arch.d_model, arch.n_kv_heads * arch.d_head),
    }
    for site, (fan_in, fan_out) in expect.items():
        try:
            mod = arch.module(model, site, 0)
        except AttributeError as e:
            raise UnsupportedArchitecture(
                f"{type(model).__name__}: no module at '{arch.path(site, 0)}' ({e})"
            ) from None
        got = _in_out(mod)
        if got != (fan_in, fan_out):
            raise UnsupportedArchitecture(
                f"{type(model).__name__}: {arch.path(site, 0)} maps {got[0]} -> {got[1]} features, but the "
                f"config implies {fan_in} -> {fan_out} ({arch.n_heads} heads, {arch.n_kv_heads} kv heads, "
                f"d_head {arch.d_head})"
            )
