"""The organism layer: a small Llama taught entity tracking from scratch by a staged curriculum.

Modules: :mod:`.curriculum` (the synthetic text of each stage), :mod:`.train` (training from scratch),
:mod:`.finetune` (the arithmetic fine-tunes and the positive control), :mod:`.build` (recipe hash,
cache, building every organism model of a profile). The public names are re-exported here.

The paper studies Llama-7B, which tracks entities in 66% of 7-box prompts. A CPU cannot run it, so
the default profile studies a *model organism*: a 4-layer, 8-head ``LlamaForCausalLM`` (about
1M parameters) trained here, on synthetic text, in a few minutes. Trained directly on the paper's
format (``The apple is in Box F, the cup is in Box B. Box F contains the`` → ``apple``), such a model
sits at chance for thousands of steps: the object comes *before* its label, so the answer must be
moved onto the label position by one head and read from there by a later one (V-composition),
which gradient descent does not find quickly. A curriculum finds it (see
the lab notebook ``notes/organism.md``):

1. ``kv``     ``F apple B cup . F`` → ``apple``: key before value, a plain induction lookup;
2. ``vk``     ``apple F cup B . F`` → ``apple``: value before key, the same lookup reversed;
3. ``filler`` ``the apple Box F , the cup Box B . Box F contains the`` → ``apple``: filler tokens
   and the paper's full query;
4. ``paper``  the paper's format itself.

A deeper model (4 layers) with the usual initialisation stays at chance even on stage 1 for
750+ steps at lr 3e-4 or 1e-3 (measured here), whereas 2 layers solve it in 200 steps. Starting every
block as the identity (``residual_init=0``: ``o_proj`` and ``down_proj`` zero-initialised, so at
step 0 the network is a bigram model and each block joins as its gradient grows) removes that
plateau: 4 layers × 8 heads then master stage 1 in ~500 steps at lr 1e-3 and the whole curriculum
in ~900. Each context is followed by several queries (with replacement, so the last one cannot be guessed by
elimination) and only the answer tokens carry loss. A stage advances when its own format reaches
``mastery`` accuracy (checked every few steps), never after a fixed count: deeper models need
different times. Training uses 2–4 boxes only, and the last stage stops as soon as 7-box accuracy
on a *validation* set (seeded apart from the held-out test prompts) reaches ``target_accuracy``:
the organism then tracks entities like Llama-7B, well but not perfectly, and leaves fine-tuning room
to improve it. 7-box accuracy jumps by tens of points within a few steps, so it is checked every
step once it nears the target. A share of the batches (``arithmetic_fraction``) is multi-digit
addition and subtraction, so that arithmetic fine-tuning (:mod:`entity_tracking.organism.finetune`) starts
from a model that has seen digits.

The result is saved with ``save_pretrained`` beside the project's word-level tokenizer, so
``AutoModelForCausalLM``/``AutoTokenizer`` load it like any hub model, with ``recipe.json`` holding
the recipe, its hash (config + seed + recipe version) and the training log. :func:`ensure_built`
reuses a build whose hash matches and otherwise trains one (deterministic given the seed and the
thread count). Measured results and what was tried are in the lab notebook ``notes/organism.md``.

**A positional variant (issue 17, research).** This organism binds *by content* (the object is
copied onto its label in the context); Llama binds *by position*. ``OrganismSpec.positional``
(:class:`~entity_tracking.config.PositionalSpec`) changes only the paper-format stage: one box
count per batch and *context resampling* (:mod:`.resample`): every head's output at every context
position taken from another prompt, so only where things are, never what they are, reaches the
queries through the context. Optional: the batch mean instead of another row, a consistency
loss, and ordinal queries (``. Box F =`` -> ``3``). Left at ``None`` the recipe and its hash are
exactly the content organism's.
"""

from .build import (  # noqa: F401
    RECIPE_VERSION,
    base_dir,
    build_all,
    ensure_base,
    ensure_built,
    ensure_finetune,
    recipe_hash,
    replicates,
)
from .curriculum import (  # noqa: F401
    STAGES,
    Batch,
    context_length,
    make_arithmetic_batch,
    make_batch,
    ordinal_query_words,
    paper_prompts,
)
from .finetune import (  # noqa: F401
    FINETUNE_VERSION,
    arithmetic_correct,
    arithmetic_pairs,
    control_finetune,
    control_objects,
    finetune,
    heldout_problems,
    qa_batch,
)
from .resample import derangement, resampled_context  # noqa: F401
from .train import answer_consistency, entity_accuracy, positional_step, prompt_accuracy, train_organism, train_threads  # noqa: F401

__all__ = ["Batch", "FINETUNE_VERSION", "RECIPE_VERSION", "STAGES", "answer_consistency", "arithmetic_correct", "arithmetic_pairs", "base_dir", "build_all", "context_length", "control_finetune", "control_objects", "derangement", "ensure_base", "ensure_built", "ensure_finetune", "entity_accuracy", "finetune", "heldout_problems", "make_arithmetic_batch", "make_batch", "ordinal_query_words", "paper_prompts", "positional_step", "prompt_accuracy", "qa_batch", "recipe_hash", "replicates", "resampled_context", "train_organism", "train_threads"]
