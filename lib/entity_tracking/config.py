"""Params profiles: one typed schema, validated before any notebook runs.

A profile (``params/<name>.yaml``) says which models a run studies and how every chapter is
parametrised. It is parsed into :class:`Profile`, a tree of pydantic models that forbid unknown
keys, so a typo (``num_boxs``) or a wrong type fails at once with the file and the dotted key
named, instead of being silently ignored deep inside a chapter. Local paths named by a profile
(models, adapters, tokenizers) must exist when the profile is loaded.

A profile may also live anywhere on disk: pass its path. Chapters receive a profile's *name*
(papermill parameters, results under ``results/<name>/``), so the runner lists a profile file
outside ``params/`` in ``$ENTITY_TRACKING_PROFILES`` (:data:`PROFILES_ENV`, files separated by
``os.pathsep``) and :func:`profile_path` resolves a name there before looking in ``params/``.

Secrets (an HF token, an NDIF key) are never profile keys: papermill writes parameters into
executed notebooks. They are read from the environment by the code that needs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .schema import EXTENSION_GROUPS

__all__ = [
    "CMAPSpec",
    "CircuitSpec",
    "ControlSpec",
    "DCMSpec",
    "DataSpec",
    "FaithfulnessSpec",
    "FinetuneSpec",
    "GroundTruthSpec",
    "ModelSpec",
    "OrganismSpec",
    "PlantedFinetuneSpec",
    "PositionalSpec",
    "Profile",
    "ProfileError",
    "TinySpec",
    "find_repo_root",
    "load_profile",
    "profile_name",
    "profile_path",
]

ROOT_ENV = "ENTITY_TRACKING_ROOT"
#: Profile files outside ``params/`` that names resolve to (``os.pathsep``-separated paths).
PROFILES_ENV = "ENTITY_TRACKING_PROFILES"


class ProfileError(ValueError):
    """A params profile is missing, malformed or fails validation."""


def find_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The project root: ``$ENTITY_TRACKING_ROOT``, else the first ancestor holding ``params/``
    and ``_toc.yml`` (from ``start`` or the working directory, then from this file)."""
    env = os.environ.get(ROOT_ENV)
    if env:
        return Path(env).resolve()
    candidates = [Path(start or os.getcwd()).resolve(), Path(__file__).resolve().parent]
    for c in candidates:
        for p in (c, *c.parents):
            if (p / "params").is_dir() and (p / "_toc.yml").is_file():
                return p
    raise ProfileError(
        f"cannot find the project root (a folder with params/ and _toc.yml) above {candidates[0]}; "
        f"set {ROOT_ENV} to the repository checkout"
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Family = Literal["llama", "qwen2", "gemma3"]
DType = Literal["float32", "float16", "bfloat16"]


class TinySpec(_Strict):
    """A tiny, randomly initialised model of a real architecture, built locally in seconds.

    ``n_kv_heads`` below ``n_heads`` gives grouped-query attention; ``d_head`` defaults to
    ``d_model // n_heads`` (Gemma3-style models set it explicitly). ``add_bos`` defaults to the
    family's real tokenizers: Llama and Gemma3 prepend BOS, Qwen2 does not.
    """

    family: Family = "llama"
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: Optional[int] = Field(None, ge=1)
    d_model: int = Field(64, ge=8)
    d_mlp: int = Field(128, ge=8)
    d_head: Optional[int] = Field(None, ge=2)
    add_bos: Optional[bool] = None
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_head or self.d_model // self.n_heads) % 2:
            raise ValueError("the head dimension must be even (rotary embeddings rotate pairs)")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
        return self


class FinetuneSpec(_Strict):
    """Arithmetic fine-tuning of the organism (Goat-style LoRA, FLoat-style full); see
    :mod:`entity_tracking.organism.finetune`. Never shown entity-tracking data."""

    # Trained until arithmetic is learned or plateaus (issue 14; organism notes): with every weight
    # trained at lr 1e-3, exact match passes 0.5 near step 700 of 800 on one machine's base and
    # 0.495 at 800 on another's (lr 2e-3 and 3e-3 no better); LoRA on q/k/v/o plateaus below 0.05
    # at lr 3e-3 and 1e-2 alike. The default profile sets its own lengths (params/default.yaml).
    steps: int = Field(800, ge=1, description="steps of the full fine-tune (and of LoRA when steps_lora is null)")
    steps_lora: Optional[int] = Field(None, ge=1, description="steps of the LoRA fine-tune; null: steps")
    batch_size: int = Field(32, ge=1)
    lr_lora: float = Field(3e-3, gt=0)
    lr_full: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(8, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    max_digits: int = Field(3, ge=1, le=8, description="operands have 1..max_digits digits")
    ops: list[Literal["+", "-", "*", "/"]] = Field(["+", "-"], min_length=1, description="Goat used all four")
    problems_per_sequence: int = Field(4, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0
    replicate_seeds: list[int] = Field(
        [1, 2],
        description="seeds of the replicate fine-tunes the fine-tuning chapter trains beside the profile's "
                    "own (seed above), for intervals over seeds; not part of any build's recipe hash",
    )

    def steps_of(self, kind: str) -> int:
        """Optimizer steps of the ``kind`` (``"lora"`` or ``"full"``) fine-tune."""
        return self.steps_lora if kind == "lora" and self.steps_lora is not None else self.steps


class ControlSpec(_Strict):
    """The positive control (ours, never the paper's): the organism fine-tuned on entity tracking
    itself, 5-7-box prompts in the paper's format, every weight trained; see
    :func:`entity_tracking.organism.finetune.control_finetune`. Its training objects are every second word of
    :data:`entity_tracking.task.vocab.OBJECTS` (``objects: half``), so the book can show its gain on
    answers it never saw in fine-tuning."""

    # lr 1e-4 and 3e-4 both reach +0.23 / +0.27 on 7 boxes in 150 steps (one seed each, measured
    # before choosing); the smaller one lets the gain grow over several checkpoints
    steps: int = Field(150, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    min_boxes: int = Field(5, ge=2, le=26)
    max_boxes: int = Field(7, ge=2, le=26)
    queries_per_context: int = Field(8, ge=1)
    objects: Literal["half", "all"] = Field("half", description="'half': every second object only")
    checkpoint_every: int = Field(25, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.min_boxes > self.max_boxes:
            raise ValueError(f"control: min_boxes={self.min_boxes} exceeds max_boxes={self.max_boxes}")
        return self


class PositionalSpec(_Strict):
    """Context resampling: the option set that pushes the organism to bind entities *by position*
    (issue 17; see :mod:`entity_tracking.organism.resample`).

    In the paper-format stage every entity-tracking batch has one box count, so every row has the
    same template and its context positions line up. On a resampled batch, every head's output
    (the ``o_proj`` input) at every context position (BOS up to the first query's ``.``) is
    replaced, in every layer, by the same positions of *another* row of the batch (``mean_share``
    of the resampled batches use the batch mean instead). Only information that is the same in
    every prompt at a position -- where it is, not what it holds -- then reaches the queries
    through the context's attention outputs, so the content route (an object copied onto its
    label) cannot be learned there.
    """

    resample: float = Field(1.0, ge=0, le=1, description="share of paper-format entity batches resampled")
    mean_share: float = Field(
        0.0, ge=0, le=1,
        description="share of resampled batches that take the batch mean per position instead of another "
                    "row (the context-ablation test mean-ablates; this shows the model that case too)",
    )
    consistency: float = Field(
        0.0, ge=0,
        description="weight of a consistency loss on resampled batches: the clean run's answer distribution "
                    "is pulled towards the resampled run's (KL, the resampled side held fixed); 0 = off "
                    "(one forward pass a batch)",
    )
    ordinal_share: float = Field(
        0.0, ge=0, lt=1,
        description="share of the paper-format queries that ask for the queried box's ordinal number "
                    "(`. Box F =` -> `3`) instead of its object: direct supervision of where each box sits",
    )
    val_every: int = Field(
        25, ge=1,
        description="steps between 7-box validation checks in the paper-format stage (the default recipe checks "
                    "every 1-3 steps to stop at its target; this one trains to final_max_steps or the target)",
    )
    min_boxes: int = Field(2, ge=2, le=26, description="box counts of the paper-format stage (one per batch)")
    max_boxes: int = Field(7, ge=2, le=26)

    @model_validator(mode="after")
    def _check(self):
        if self.min_boxes > self.max_boxes:
            raise ValueError(f"positional: min_boxes={self.min_boxes} exceeds max_boxes={self.max_boxes}")
        if self.ordinal_share > 0 and self.max_boxes > 9:
            raise ValueError("positional: ordinal queries are answered by one digit, so max_boxes must be at most 9")
        return self


class OrganismSpec(_Strict):
    """The CPU model organism: a small Llama trained from scratch by a staged curriculum
    (:mod:`entity_tracking.organism`). Every field enters the recipe hash of the cached build."""

    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(8, ge=1)
    n_kv_heads: Optional[int] = Field(None, ge=1, description="set below n_heads for GQA")
    d_model: int = Field(128, ge=8)
    d_mlp: int = Field(512, ge=8)
    seed: int = 0
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up at the start")
    residual_init: float = Field(
        0.0, ge=0, description="scale of the initial o_proj/down_proj weights (0 = each block starts as identity)"
    )
    batch_size: int = Field(64, ge=1)
    min_boxes: int = Field(2, ge=2, le=26)
    max_boxes: int = Field(4, ge=2, le=26)
    queries_per_context: int = Field(8, ge=1)
    arithmetic_fraction: float = Field(0.2, ge=0, lt=1, description="share of base batches that are arithmetic")
    mastery: float = Field(0.95, gt=0, le=1, description="accuracy that advances a curriculum stage")
    stage_max_steps: int = Field(2500, ge=1, description="give up on a curriculum stage after this many steps")
    final_max_steps: int = Field(1500, ge=1, description="cap on the steps of the paper-format stage")
    target_accuracy: float = Field(0.66, gt=0, le=1, description="stop when 7-box validation accuracy reaches this")
    target_boxes: int = Field(7, ge=2, le=26)
    train_threads: int = Field(
        1, ge=1,
        description="torch threads that train the base: they fix its floating-point reduction order, so they are "
                    "part of the recipe (1 = the recipe before this field, whose hash does not depend on it). "
                    "The fine-tunes train one per core with one thread each",
    )
    positional: Optional[PositionalSpec] = Field(
        None,
        description="context resampling in the paper-format stage (a positional organism, issue 17); "
                    "None = the content-binding recipe, whose recipe hash does not depend on this field",
    )
    finetune: FinetuneSpec = FinetuneSpec()
    control: ControlSpec = ControlSpec()

    @model_validator(mode="after")
    def _check(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % (self.n_kv_heads or self.n_heads):
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.min_boxes > self.max_boxes:
            raise ValueError("min_boxes must not exceed max_boxes")
        return self


class PlantedFinetuneSpec(_Strict):
    """A planted fine-tune with a known answer (issue 29): the planted base with the value rows of
    one designated group scaled by ``scale`` (the degraded base), then fine-tuned on entity
    tracking changing only the weights of ``heads`` (``None``: that group's own planted heads;
    else heads outside the circuit, every circuit head frozen)."""

    group: Literal["position_detector", "position_transmitter", "value_fetcher"]
    scale: float = Field(ge=0, le=1)
    heads: Optional[list[tuple[int, int]]] = None
    projections: list[Literal["q_proj", "k_proj", "v_proj", "o_proj"]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
        description="which of the trained heads' weights change; without o_proj every change shows in the heads' "
                    "outputs z, the site the kernel and CMAP patch",
    )
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 1


class GroundTruthSpec(_Strict):
    """The planted models of the ground-truth chapter (:mod:`entity_tracking.organism.plant`): the
    paper's mechanism trained into designated heads by SIIT, and two fine-tunes of it whose answer
    to the paper's question is known. Every field enters the planted build's recipe hash."""

    seed: int = 0
    steps_scale: float = Field(
        1.0, gt=0, le=1,
        description="each curriculum stage's steps times this (at least 1): below 1 only for the CI profile, "
                    "whose planted model does not learn the task and whose chapter runs every code path on it",
    )
    enhance: PlantedFinetuneSpec = PlantedFinetuneSpec(group="position_transmitter", scale=0.5)
    route: PlantedFinetuneSpec = PlantedFinetuneSpec(group="value_fetcher", scale=0.1, heads=[(3, 2), (3, 3)])
    n_random: int = Field(20, ge=10, description="random head sets of the planted circuit's group sizes, per baseline")


class ModelSpec(_Strict):
    """One model of a profile: where it comes from and how it is loaded.

    Exactly one source: ``hub_id`` (a model hub id), ``local_path`` (a directory, relative to the
    repository root or absolute) or ``build`` (a model the project makes itself).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    label: Optional[str] = None
    role: Literal["base", "finetuned"] = "base"
    control: bool = Field(
        False,
        description="a positive control (ours): a fine-tune trained on the task itself. The chapters run it "
                    "like any fine-tune and show it beside the paper's models, never inside the paper's claims",
    )
    hub_id: Optional[str] = None
    local_path: Optional[str] = None
    build: Optional[Literal["tiny", "organism", "organism-lora", "organism-full", "organism-control"]] = None
    tiny: Optional[TinySpec] = None
    organism: Optional[OrganismSpec] = None
    adapter: Optional[str] = None
    merge_adapter: bool = True
    tokenizer: Optional[str] = None
    dtype: DType = "float32"
    device: str = "auto"
    device_map: Optional[Union[str, dict[str, Any]]] = None
    remote: bool = False
    paper_accuracy: Optional[float] = Field(None, ge=0, le=1)
    paper_model: Optional[Literal["Llama-7B", "Vicuna-7B", "Goat-7B", "FLoat-7B"]] = Field(
        None, description="the paper's model this one stands for, to print the paper's numbers beside ours"
    )

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("hub_id", "local_path", "build") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"model '{self.name}' needs exactly one of hub_id, local_path, build (got {given or 'none'})"
            )
        if self.build == "tiny" and self.tiny is None:
            object.__setattr__(self, "tiny", TinySpec())
        if self.tiny is not None and self.build != "tiny":
            raise ValueError("'tiny' is only allowed with build: tiny")
        if self.control and self.role != "finetuned":
            raise ValueError(f"model '{self.name}': control: true needs role: finetuned")
        if self.is_organism and self.organism is None:
            object.__setattr__(self, "organism", OrganismSpec())
        if self.organism is not None and not self.is_organism:
            raise ValueError("'organism' is only allowed with build: organism, organism-lora, organism-full "
                             "or organism-control")
        return self

    @property
    def is_organism(self) -> bool:
        """Whether the project trains this model: the organism or one of its fine-tunes (``build:
        organism...``), each with a ``recipe.json`` beside its weights."""
        return self.build is not None and self.build.startswith("organism")

    @property
    def display(self) -> str:
        return self.label or self.name


class DataSpec(_Strict):
    """The entity-tracking data of the data chapter (paper-methods §1)."""

    num_boxes: int = Field(7, ge=2, le=26)
    seed: int = 0
    n_eval: int = Field(500, ge=1, description="held-out prompts for accuracy and circuit evaluation")
    n_path_patching: int = Field(300, ge=1)
    n_mean_reference: int = Field(500, ge=1)
    n_desiderata: int = Field(2000, ge=4, description="pairs per DCM desideratum (split 50/25/25)")
    n_arithmetic: int = Field(2000, ge=1)
    arithmetic_max_digits: int = Field(4, ge=1, le=16)
    objects: Optional[list[str]] = Field(None, description="override of the object vocabulary")


class CircuitSpec(_Strict):
    """Circuit discovery by path patching (paper-methods §2)."""

    method: Literal["fast", "naive"] = "fast"
    metric: Literal["relative", "pooled"] = Field(
        "relative",
        description="path-patching score: the paper's mean relative change of p(correct) per prompt, "
                    "or 'pooled', the relative change of the mean p(correct) (robust when the model is "
                    "often confidently wrong)",
    )
    selection: Literal["paper", "negative"] = Field(
        "paper",
        description="how a step's scores become a group: 'paper', the reference's k lowest scores whatever "
                    "their sign (every step runs from its k receivers), or 'negative', only heads whose score "
                    "is below zero (a group may come out smaller, or empty, and a step after an empty group "
                    "finds nothing)",
    )
    n_examples: Optional[int] = Field(None, ge=1, description="path-patching pairs used (default: all of data.n_path_patching)")
    receivers: dict[str, int] = Field(
        default_factory=lambda: {"value_fetcher": 20, "position_transmitter": 5, "position_detector": 10},
        description="top-k heads of a step that become the receivers of the next step",
    )
    candidates: dict[str, int] = Field(
        default_factory=lambda: {"value_fetcher": 58, "position_transmitter": 10, "position_detector": 25, "structure_reader": 5},
        description="top-k heads per group handed to the minimality pruning",
    )
    extension_candidates: dict[str, int] = Field(
        default_factory=lambda: {"object_writer": 4},
        description="ours, beside the paper's circuit: top-k heads of each extension group "
                    "(entity_tracking.schema.EXTENSION_GROUPS), found through the circuit's own groups by "
                    "entity_tracking.methods.path_patching.extend_circuit with the same selection rule; the binding "
                    "chapter evaluates the extended circuit",
    )
    minimality_threshold: float = Field(0.01, ge=0)
    minimality_examples: int = Field(100, ge=1, description="prompts minimality prunes on (at most as many as its split holds)")
    minimality_split: Literal["selection", "evaluation"] = Field(
        "selection",
        description="the prompts minimality prunes on: 'selection' (ours), the base prompts of the path-patching "
                    "pairs, disjoint from the evaluation prompts faithfulness, necessity and CMAP are scored on; "
                    "'evaluation', those evaluation prompts themselves (a leak wherever pruning happens; the paper "
                    "does not say which prompts it pruned on). The other selection steps are fixed: path patching, "
                    "its null (attention shuffled) and the Object Writer search (binding chapter) run on the "
                    "path-patching pairs; DCM learns its masks on its desiderata's train split and picks them on "
                    "their eval split (dcm chapter)",
    )
    batch_size: int = Field(32, ge=1)


    @field_validator("extension_candidates")
    @classmethod
    def _extension_groups(cls, v: dict[str, int]):

        if not v:
            raise ValueError(f"name at least one extension group (the binding chapter extends the circuit with it); "
                             f"extension groups are {list(EXTENSION_GROUPS)}")
        unknown = sorted(set(v) - set(EXTENSION_GROUPS))
        if unknown:
            raise ValueError(f"unknown extension group(s) {unknown}; extension groups are {list(EXTENSION_GROUPS)} "
                             "(the paper's groups take their sizes from 'candidates')")
        bad = {g: k for g, k in v.items() if k < 1}
        if bad:
            raise ValueError(f"every extension group needs at least 1 head, got {bad}")
        return v


class FaithfulnessSpec(_Strict):
    """Mean ablation, faithfulness, completeness, minimality (paper-methods §3)."""

    n_random: int = Field(10, ge=1, description="random circuits of the same group sizes")
    n_completeness_draws: int = Field(10, ge=1)
    n_bootstrap: int = Field(1000, ge=10)
    batch_size: int = Field(32, ge=1)


class DCMSpec(_Strict):
    """Desiderata-based component masking (paper-methods §4)."""

    lambdas: list[float] = Field(default_factory=lambda: [0.01], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    lr: float = Field(0.1, gt=0)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_every: int = Field(4, ge=1)
    relaxation: Literal["clamp", "sigmoid"] = "clamp"
    n_resamples: int = Field(10, ge=1, description="runs of the per-model semantics (mean and std over them)")
    sample_size: int = Field(500, ge=1, description="pairs per run of the per-model semantics")
    semantics_pairs: Literal["fresh", "bootstrap"] = Field(
        "fresh",
        description="'fresh': every run draws sample_size new pairs from the desideratum generator, as the "
                    "reference code does; 'bootstrap': runs resample the stored test split with replacement",
    )
    extra_models: Literal["base", "all"] = Field(
        "base",
        description="where the Position Transmitters' positional heads are tested on the eleven extra variants "
                    "of the positional desideratum: in the base model only, as the paper reports them "
                    "('base'), or in every model of the profile ('all', ours)",
    )
    eval_batch_size: int = Field(
        256, ge=1,
        description="pairs per forward pass when a mask is scored and in the per-model semantics (no gradient); "
                    "the answers are those of batch_size, only the passes are fewer",
    )


class CMAPSpec(_Strict):
    """Cross-model activation patching (paper-methods §5; :mod:`entity_tracking.methods.cmap`)."""

    batch_size: int = Field(32, ge=1)
    n_bootstrap: int = Field(1000, ge=10)
    n_random: int = Field(
        10, ge=10,
        description="random head sets of the full circuit's sizes at its positions, patched beside it (issue 28: "
                    "at least 10 draws, so the random sets' share has an interval over draws); seeded by the "
                    "profile's seed",
    )
    circuit: Literal["own", "base"] = Field(
        "own",
        description="whose heads are patched from each fine-tuned model: 'own' = that model's own circuit and "
                    "the DCM heads learned on it in that model, as the paper's final CMAP; 'base' = the base "
                    "model's circuit and DCM heads, the same for every fine-tune",
    )
    input_kv_positions: Literal["before", "through"] = Field(
        "before",
        description="input CMAP patches a head's keys/values at the positions strictly before its own "
                    "('before', the paper's reference code) or up to and including its own ('through', ours)",
    )
    input_restore: Literal["before_last", "others"] = Field(
        "before_last",
        description="after an input-CMAP patch, every head output before the last position goes back to the "
                    "base model's ('before_last', the paper's reference code), or the patched layers' head "
                    "outputs everywhere except each patched head at its own position ('others', ours; with "
                    "'through', q+k+v input CMAP then equals output CMAP)",
    )


class Profile(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    models: list[ModelSpec] = Field(min_length=1)
    data: DataSpec = DataSpec()
    circuit: CircuitSpec = CircuitSpec()
    faithfulness: FaithfulnessSpec = FaithfulnessSpec()
    dcm: DCMSpec = DCMSpec()
    cmap: CMAPSpec = CMAPSpec()
    ground_truth: GroundTruthSpec = GroundTruthSpec()
    study: Literal["competent", "all"] = Field(
        "competent",
        description="which models the faithfulness and DCM chapters analyse: 'competent', those that do the "
                    "task by the circuit chapter's competence rule (the paper's models all do), the others "
                    "left out of the analysis (faithfulness still measures their accuracy) and their claims "
                    "not testable, since how a model does a task it does not do cannot be studied; 'all', every model (the CI profile, whose models "
                    "are at chance, runs every code path this way)",
    )

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: list[ModelSpec]):
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {dup}")
        return v

    @property
    def controls(self) -> list[str]:
        """Names of the positive controls (``control: true``): marked in every verdict, kept out of
        the paper's claims."""
        return [m.name for m in self.models if m.control]

    @property
    def base_model(self) -> ModelSpec:
        return next((m for m in self.models if m.role == "base"), self.models[0])

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"profile '{self.name}' has no model '{name}' (models: {[m.name for m in self.models]})")


def profile_name(path: str | os.PathLike) -> str:
    """The name a profile file declares (its ``name`` key), else its file name without suffix."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        raw = None
    name = raw.get("name") if isinstance(raw, dict) else None
    return str(name) if name else path.stem


def profile_path(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The file of a profile given by path, or by name: a file listed in ``$ENTITY_TRACKING_PROFILES``
    that declares this name (the runner lists the file it was given there), else ``params/<name>.yaml``."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or p.exists():
        return p.resolve()
    for entry in os.environ.get(PROFILES_ENV, "").split(os.pathsep):
        if entry and Path(entry).is_file() and profile_name(entry) == str(name_or_path):
            return Path(entry).resolve()
    base = Path(root) if root is not None else find_repo_root()
    return base / "params" / f"{name_or_path}.yaml"


def _format_loc(loc: tuple) -> str:
    return ".".join(str(x) for x in loc) or "<top level>"


def _check_local_paths(profile: Profile, root: Path, file: Path) -> None:
    for i, m in enumerate(profile.models):
        for key in ("local_path", "adapter", "tokenizer"):
            value = getattr(m, key)
            if value is None:
                continue
            looks_local = key == "local_path" or value.startswith((".", "/", "~"))
            if looks_local:
                p = Path(value).expanduser()
                p = p if p.is_absolute() else root / p
                if not p.exists():
                    raise ProfileError(f"{file}: key 'models.{i}.{key}': no such file or directory: {p}")


def load_profile(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Profile:
    """Load and validate a profile by name (``params/<name>.yaml``) or path.

    Raises :class:`ProfileError` naming the file and the key for an unknown key, a wrong type,
    a missing value or a local path that does not exist.
    """
    root_path = Path(root) if root is not None else find_repo_root()
    path = profile_path(name_or_path, root_path)
    if not path.is_file():
        available = sorted(p.stem for p in (root_path / "params").glob("*.yaml"))
        raise ProfileError(f"{path}: no such profile (available: {', '.join(available) or 'none'})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: a profile must be a mapping of keys, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = _format_loc(err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{path}: key '{loc}': {msg}")
        raise ProfileError("\n".join(lines)) from None
    _check_local_paths(profile, root_path, path)
    return profile
