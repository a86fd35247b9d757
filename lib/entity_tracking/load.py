"""Loading a profile's models: one function from a :class:`~entity_tracking.config.ModelSpec`
to an nnsight model, its tokenizer and its architecture.

:func:`load_model` is the only way the book gets a model. It resolves where the weights live
(a local directory, a model-hub id, a tiny random model built here, or the project's trained
model organism), loads them with the requested dtype onto a device (``auto`` picks CUDA when
present, else the CPU, and says which) or shards them with a ``device_map``, applies a PEFT
adapter and, by default, **merges** it into the base weights (``merge_and_unload``), so every
hook -- an o_proj input or output, a q/k/v projection -- sees the fine-tuned weights. (The
paper's reference code read o_proj weights from the PEFT model's base layer inside its hooks
and so silently dropped Goat's o_proj LoRA delta; with the adapter merged there is nothing to
drop.) The model is wrapped in nnsight's ``TransformersModel`` and returned with its tokenizer
and its :class:`~entity_tracking.model.arch.Arch` (module paths, head geometry, BOS handling) as a
:class:`LoadedModel`.

Failures are named: a model that is neither on disk nor reachable raises
:class:`ModelNotAvailable` with the id, an architecture outside the table raises
:class:`~entity_tracking.model.arch.UnsupportedArchitecture`, and a remote model without an NDIF key
raises :class:`RemoteNotConfigured`. Remote execution on NDIF (``remote: true`` in a profile)
never loads weights locally: the model is built on the ``meta`` device and every trace that
passes ``**lm.trace_kwargs`` (or uses ``lm.trace``) runs on the server; the key comes from the
``NDIF_API_KEY`` environment variable, never from a profile. ``trust_remote_code`` is always
off: only architectures in the table run.

Tiny models (``build: tiny``) are random models of a real family (Llama, Qwen2, Gemma3; GQA
via ``n_kv_heads``) with the project's word-level tokenizer, built in a second under
``results/<profile>/models/<name>`` and rebuilt when their spec changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, TypeVar

import torch

from .config import ModelSpec, find_repo_root
from .io import ResultsPaths
from .model.arch import Arch, arch_for
from .model.tiny import TINY_STAMP, build_tiny_model, tiny_stamp
from .organism.build import ensure_built

__all__ = [
    "LoadedModel",
    "ModelNotAvailable",
    "RemoteNotConfigured",
    "load_model",
    "load_tokenizer",
    "model_dir",
    "model_sources",
    "remote_trace_kwargs",
    "resolve_device",
    "TORCH_DTYPES",
]

NDIF_KEY_ENV = "NDIF_API_KEY"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LOG_PREFIX = "[entity_tracking.load]"

T = TypeVar("T")


class ModelNotAvailable(RuntimeError):
    """A model, adapter or tokenizer that is not on disk and cannot be fetched."""


class RemoteNotConfigured(RuntimeError):
    """``remote: true`` without what remote execution needs (an NDIF key, a hub id)."""


# --------------------------------------------------------------------------------------------
# The loaded object


@dataclass
class LoadedModel:
    """A model ready for nnsight traces.

    Attributes:
        nn: the nnsight ``TransformersModel``; trace it with ``lm.trace(...)`` (which adds
            ``remote=True`` for a remote model) or ``lm.nn.trace(..., **lm.trace_kwargs)``.
        tokenizer: the tokenizer (pad = eos when it had none). nnsight sets its
            ``padding_side`` to ``"left"`` for causal models, so string prompts batched by
            nnsight align at the right edge; pass ``input_ids`` to control positions exactly.
        arch: module paths and head geometry (:class:`~entity_tracking.model.arch.Arch`), with
            ``adds_bos`` read from the tokenizer.
        spec: the profile's model spec it was loaded from.
        device: where inputs should go (the embedding's device; ``cpu`` for a remote model).
        source: the local directory or hub id the weights came from.
        adapter: the PEFT adapter applied (path or hub id), if any; ``adapter_merged`` says
            whether it was merged into the weights (the default) or attached as LoRA layers.
        remote: traces run on NDIF.
    """

    _IS_LOADED_MODEL: ClassVar[bool] = True

    nn: Any
    tokenizer: Any
    arch: Arch
    spec: ModelSpec
    device: torch.device
    source: str
    adapter: Optional[str] = None
    adapter_merged: bool = False
    remote: bool = False
    dtype: torch.dtype = torch.float32
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def hf(self) -> torch.nn.Module:
        """The underlying transformers model (on ``meta`` for a remote model)."""
        return self.arch.torch_module(self.nn)

    @property
    def trace_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every kernel passes to ``nn.trace``/``nn.session``."""
        return {"remote": True} if self.remote else {}

    def trace(self, *inputs: Any, **kwargs: Any):
        """``nn.trace`` with :attr:`trace_kwargs` applied (explicit kwargs win)."""
        return self.nn.trace(*inputs, **{**self.trace_kwargs, **kwargs})

    def session(self, **kwargs: Any):
        """``nn.session`` with :attr:`trace_kwargs` applied (a remote session is one job)."""
        return self.nn.session(**{**self.trace_kwargs, **kwargs})

    def __repr__(self) -> str:
        extra = ""
        if self.adapter:
            extra = f" + adapter {self.adapter} ({'merged' if self.adapter_merged else 'attached'})"
        where = "remote (NDIF)" if self.remote else str(self.device)
        return (
            f"LoadedModel({self.name}: {self.source}{extra}; {self.arch.describe()}; "
            f"{str(self.dtype).removeprefix('torch.')} on {where})"
        )


# --------------------------------------------------------------------------------------------
# Errors from the hub, translated


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _hub_call(fn: Callable[[], T], ident: str, what: str) -> T:
    """Run a from_pretrained-like call, turning "not on disk / hub unreachable / no such repo"
    into :class:`ModelNotAvailable` naming ``ident``."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - classified below, re-raised otherwise
        kinds = list(_chain(e))
        if any(isinstance(k, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for k in kinds):
            raise ModelNotAvailable(
                f"{ident!r} ({what}) is not on disk and the model hub cannot be reached "
                f"(HF_HUB_OFFLINE=1 or no network); download it first (`hf download {ident}`) "
                f"or point local_path at a copy"
            ) from e
        if any(isinstance(k, GatedRepoError) for k in kinds):
            raise ModelNotAvailable(
                f"{ident!r} ({what}) is gated on the model hub: accept its license and log in "
                f"(HF_TOKEN in the environment)"
            ) from e
        if any(isinstance(k, (RepositoryNotFoundError, EntryNotFoundError, HFValidationError)) for k in kinds):
            raise ModelNotAvailable(
                f"{ident!r} ({what}) is neither a local directory nor a repository on the model hub"
            ) from e
        raise


def _is_local_ref(value: str) -> bool:
    # The rule of config._check_local_paths: paths start with '.', '/' or '~'; the rest are hub ids.
    return value.startswith((".", "/", "~"))


def _resolve_ref(value: str, what: str, model: str) -> str:
    """A profile's reference to a model/adapter/tokenizer: an existing local path (absolute,
    or relative to the repository root) or a hub id (returned as is)."""
    if not _is_local_ref(value):
        return value
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = find_repo_root() / p
    if not p.exists():
        raise ModelNotAvailable(f"model '{model}': {what} directory {p} does not exist")
    return str(p)


# --------------------------------------------------------------------------------------------
# Where a spec's weights live


def _need_paths(spec: ModelSpec, paths: Optional[ResultsPaths]) -> ResultsPaths:
    if paths is None:
        raise ValueError(f"model '{spec.name}' (build: {spec.build}) needs ResultsPaths to build into")
    return paths


def model_sources(spec: ModelSpec, paths: Optional[ResultsPaths] = None) -> tuple[str, Optional[str]]:
    """``(model, adapter)`` of ``spec``: each a local directory or a hub id (adapter may be None).

    Builds tiny models on first use (and when their spec changed) and delegates the
    ``organism*`` builds to :func:`entity_tracking.organism.build.ensure_built`.
    """
    adapter = _resolve_ref(spec.adapter, "adapter", spec.name) if spec.adapter else None
    if spec.build == "tiny":
        d = _need_paths(spec, paths).models / spec.name
        stamp = d / TINY_STAMP
        if not (d / "config.json").exists() or not stamp.exists() or stamp.read_text() != tiny_stamp(spec.tiny):
            build_tiny_model(spec.tiny, d)
        return str(d), adapter
    if spec.build is not None and spec.build.startswith("organism"):
        mdir, adir = ensure_built(spec, _need_paths(spec, paths))
        if adir is not None and adapter is not None:
            raise ValueError(f"model '{spec.name}': the organism build brings its own adapter; drop 'adapter'")
        return str(mdir), (str(adir) if adir is not None else adapter)
    if spec.local_path is not None:
        p = Path(spec.local_path).expanduser()
        p = p if p.is_absolute() else find_repo_root() / p
        if not p.exists():
            raise ModelNotAvailable(f"model '{spec.name}': local_path {p} does not exist")
        return str(p), adapter
    if spec.hub_id is not None:
        return spec.hub_id, adapter
    raise ValueError(f"model '{spec.name}': no source (hub_id, local_path or build)")


def model_dir(spec: ModelSpec, paths: Optional[ResultsPaths] = None) -> Path | str:
    """Local directory (built on first use) or hub id holding the base weights of ``spec``."""
    src, _ = model_sources(spec, paths)
    return src if spec.hub_id is not None else Path(src)


_GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def _declared_generic_tokenizer(src: str) -> bool:
    """A local tokenizer saved as a plain ``tokenizers`` tokenizer (the project's word-level one).

    AutoTokenizer overrides that declaration for some model types (qwen2 maps to
    ``Qwen2Tokenizer``, which rebuilds a byte-level BPE pipeline around the vocabulary), so a
    tiny Qwen2 with the word tokenizer must be loaded through the generic class directly.
    """
    cfg = Path(src) / "tokenizer_config.json"
    if not cfg.is_file():
        return False
    try:
        declared = json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return declared in _GENERIC_TOKENIZER_CLASSES and (Path(src) / "tokenizer.json").is_file()


def _load_tokenizer_from(src: str, model: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if _declared_generic_tokenizer(src):
        tok = PreTrainedTokenizerFast.from_pretrained(src)
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        return tok
    tok = _hub_call(
        lambda: AutoTokenizer.from_pretrained(src, trust_remote_code=False), src, f"tokenizer of model '{model}'"
    )
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(spec: ModelSpec, paths: Optional[ResultsPaths] = None):
    """The tokenizer of ``spec``: its ``tokenizer`` override (local path or hub id), else the
    model's own. Pad token = eos when the tokenizer has none; padding side as saved."""
    if spec.tokenizer:
        src = _resolve_ref(spec.tokenizer, "tokenizer", spec.name)
    else:
        src = str(model_dir(spec, paths))
    return _load_tokenizer_from(src, spec.name)


# --------------------------------------------------------------------------------------------
# Device, dtype, remote


def resolve_device(device: str = "auto", *, name: str = "", verbose: bool = True) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu`` (printed); else ``torch.device(device)``."""
    if device == "auto":
        if torch.cuda.is_available():
            chosen, why = torch.device("cuda"), f"CUDA available ({torch.cuda.get_device_name(0)})"
        else:
            chosen, why = torch.device("cpu"), "no CUDA device"
        if verbose:
            print(f"{_LOG_PREFIX} {name + ': ' if name else ''}device auto -> {chosen} ({why})")
        return chosen
    try:
        chosen = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"model '{name}': invalid device {device!r} ({e})") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model '{name}': device {device!r} requested but no CUDA device is available")
    return chosen


def remote_trace_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """``{"remote": True}`` for a remote spec (after checking ``NDIF_API_KEY`` is set and handing
    it to nnsight), ``{}`` otherwise. Kernels pass the result to every ``trace``."""
    if not spec.remote:
        return {}
    key = os.environ.get(NDIF_KEY_ENV)
    if not key:
        raise RemoteNotConfigured(
            f"model '{spec.name}' has remote: true but {NDIF_KEY_ENV} is not set; export your NDIF "
            f"API key (https://ndif.us) in the environment -- never in a params profile"
        )
    from nnsight import CONFIG

    CONFIG.API.APIKEY = key
    return {"remote": True}


def _check_adapter_landed(peft_model, adapter: str) -> None:
    """Refuse an adapter whose LoRA B matrices are all zero after loading: its weights did not
    land (names did not match), and a 'fine-tuned' model would silently equal the base."""
    bs = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    if bs and not any(bool(b.detach().abs().sum() > 0) for b in bs):
        raise ModelNotAvailable(
            f"adapter {adapter!r}: every LoRA B matrix is zero after loading -- its weights did not "
            f"match the base model's module names, so it would be the identity"
        )


# --------------------------------------------------------------------------------------------
# The loader


def load_model(
    spec: ModelSpec,
    paths: Optional[ResultsPaths] = None,
    *,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    verbose: bool = True,
) -> LoadedModel:
    """Load the model of ``spec`` and wrap it for nnsight.

    Args:
        spec: a profile's model spec (``profile.model(name)``). Use ``spec.model_copy(update=
            {...})`` to point it elsewhere (e.g. ``{"hub_id": None, "local_path": dir}``).
        paths: the profile's results layout; needed for ``build:`` models.
        device: overrides ``spec.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``); ignored
            when ``spec.device_map`` shards the model.
        dtype: overrides ``spec.dtype`` (``float32``, ``float16``, ``bfloat16``).
        verbose: print the device choice and what was loaded.

    Returns:
        A :class:`LoadedModel` (``.nn``, ``.tokenizer``, ``.arch``, ``.spec``, ``.device``);
        parameters are frozen (``requires_grad=False``) and the model is in eval mode.

    Raises:
        ModelNotAvailable: weights, adapter or tokenizer neither on disk nor reachable (names the id).
        UnsupportedArchitecture: the architecture has no row in :mod:`entity_tracking.model.arch`.
        RemoteNotConfigured: ``remote: true`` without ``NDIF_API_KEY`` or without a hub id.
    """
    from nnsight import TransformersModel
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = TORCH_DTYPES[dtype or spec.dtype]
    if spec.remote:
        return _load_remote(spec, torch_dtype, verbose)

    src, adapter = model_sources(spec, paths)
    what = f"model '{spec.name}'"
    # Fail on a missing model or an unsupported architecture before any weights are read.
    arch_for(_hub_call(lambda: AutoConfig.from_pretrained(src, trust_remote_code=False), src, what))
    tok = load_tokenizer(spec, paths)

    notes: list[str] = []
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": False}
    if spec.device_map is not None:
        load_kwargs["device_map"] = spec.device_map
        if verbose:
            print(f"{_LOG_PREFIX} {spec.name}: device_map={spec.device_map!r} (sharded by accelerate)")
    else:
        dev = resolve_device(device or spec.device, name=spec.name, verbose=verbose)
        if dev.type != "cpu":
            load_kwargs["device_map"] = str(dev)
        if dev.type == "cpu" and torch_dtype == torch.float16:
            notes.append("float16 on CPU is slow and less accurate; consider dtype: float32 there")

    hf = _hub_call(lambda: AutoModelForCausalLM.from_pretrained(src, **load_kwargs), src, what)

    peft_arg = None
    merged = False
    if adapter is not None:
        if spec.merge_adapter:
            from peft import PeftModel

            pm = _hub_call(lambda: PeftModel.from_pretrained(hf, adapter), adapter, f"adapter of {what}")
            _check_adapter_landed(pm, adapter)
            hf = pm.merge_and_unload()
            merged = True
        else:
            # nnsight injects the LoRA layers in place: module paths stay those of the base
            # model, and o_proj's output (not its input) includes the LoRA delta.
            peft_arg = adapter
    hf.eval()
    hf.requires_grad_(False)

    arch = arch_for(hf, tokenizer=tok)
    wrap = lambda: TransformersModel(hf, task="text-generation", tokenizer=tok, peft=peft_arg)  # noqa: E731
    nn = _hub_call(wrap, adapter, f"adapter of {what}") if peft_arg else wrap()
    if peft_arg:
        arch.torch_module(nn).requires_grad_(False)
    in_device = hf.get_input_embeddings().weight.device
    lm = LoadedModel(
        nn=nn, tokenizer=tok, arch=arch, spec=spec, device=in_device, source=str(src),
        adapter=adapter, adapter_merged=merged, remote=False, dtype=torch_dtype, notes=notes,
    )
    if verbose:
        print(f"{_LOG_PREFIX} loaded {lm!r}")
        for n in notes:
            print(f"{_LOG_PREFIX} {spec.name}: note: {n}")
    return lm


def _load_remote(spec: ModelSpec, torch_dtype: torch.dtype, verbose: bool) -> LoadedModel:
    """A meta-device model whose traces run on NDIF; the adapter (if any) is applied there."""
    from nnsight import TransformersModel

    if spec.hub_id is None:
        raise RemoteNotConfigured(
            f"model '{spec.name}' has remote: true but no hub_id: NDIF serves hub models only"
        )
    if spec.device_map is not None:
        raise RemoteNotConfigured(f"model '{spec.name}': device_map has no meaning for a remote model")
    if spec.adapter and _is_local_ref(spec.adapter):
        raise RemoteNotConfigured(
            f"model '{spec.name}': a remote model takes a hub adapter id, not the local path {spec.adapter!r}"
        )
    trace_kwargs = remote_trace_kwargs(spec)
    tok = load_tokenizer(spec)
    notes = []
    if spec.adapter and spec.merge_adapter:
        notes.append("adapter attached as LoRA layers on the server (a remote model cannot be merged)")
    nn = _hub_call(
        lambda: TransformersModel(spec.hub_id, task="text-generation", tokenizer=tok, peft=spec.adapter, dtype=torch_dtype),
        spec.hub_id,
        f"model '{spec.name}'",
    )
    arch = arch_for(nn, tokenizer=tok)
    lm = LoadedModel(
        nn=nn, tokenizer=tok, arch=arch, spec=spec, device=torch.device("cpu"), source=spec.hub_id,
        adapter=spec.adapter, adapter_merged=False, remote=bool(trace_kwargs), dtype=torch_dtype, notes=notes,
    )
    if verbose:
        print(f"{_LOG_PREFIX} {spec.name}: remote (NDIF) {lm!r}")
    return lm
