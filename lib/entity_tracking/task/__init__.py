"""The task layer: the entity-tracking dataset, its counterfactuals and the arithmetic fine-tuning data.

Modules: :mod:`.vocab` (word lists), :mod:`.prompts` (templates, spans, one-token vocabulary),
:mod:`.samplers` (evaluation prompts, path-patching pairs, mean reference, desiderata),
:mod:`.arithmetic` (Goat-style problems), :mod:`.encoding` (records to tensors), :mod:`.files`
(the data chapter's files). Everything public is re-exported here: ``from entity_tracking import task as D``.

**The task.** A prompt lists ``num_boxes`` boxes, each holding one object, and then asks for the
content of one of them (paper-methods §1.1)::

    The apple is in Box F, the cup is in Box A, the key is in Box Q. Box A contains the

The answer is the queried object (`` cup``), read off as the first token the model predicts.
Box labels are distinct uppercase letters and objects are distinct nouns within one context;
both are drawn at random per context. The object comes *before* its box so that the query
``Box A contains the`` cannot be answered by copying the continuation of an identical string.
Every object and label must be exactly one token of the tokenizer *as it appears in context*
(with the leading space or ``▁`` the tokenizer attaches), so that "the object" and "the label"
are single positions. :func:`build_vocabulary` filters the word lists per tokenizer and fails
loudly when too few words survive. Token positions are never hard-coded: rendering a prompt
records the character span of every object and label, and :func:`locate_spans` maps spans to
token indices through the fast tokenizer's offset mapping (or, for slow tokenizers, by encoding
prefixes). Four positions matter to the circuit: the **last token** (Value Fetcher and Position
Transmitter heads), the **query label** (Position Detector), the **previous query label**, i.e.
the query label's occurrence in the context (Structure Reader), and the **objects** (what the
Value Fetcher attends to).

**Counterfactuals.** *Path patching* (§1.2) corrupts a base prompt with a *source* prompt from a
different random context whose query sat at a different box index, and whose query label is then
replaced by a letter that is absent from its context: the source carries no answer at all, only
the shape of the task. *Mean ablation* (§1.3) averages activations per absolute token position
over random contexts whose query label is likewise absent; they have the same token length as the
evaluation prompts, so positions line up. *Desiderata* (§1.4, used by DCM) pair a base prompt with
a source prompt so that the three hypotheses about what a group of heads encodes predict three
different answers when the heads' activations are patched from source into base:

* ``positional``: the source queries box index ``p_s != q_b``; if the heads carry *where* the
  queried box sits, the base answers with **its own object at index p_s**;
* ``object_value``: sources drawn as for ``positional``; if the heads carry *what* the answer
  is, the base answers with the **source's object** at ``p_s`` (source objects never occur in
  the base, so this is unambiguous);
* ``box_label_value``: the source queries a label ``L`` that also labels base box ``j != q_b``;
  if the heads carry *which label* was asked for, the base answers with **its object in box L**.
  The source's ``p_s`` is chosen outside ``{q_b, j}`` so the positional reading differs.

Eleven further variants (§1.4) test what kind of position the Position Transmitter carries: each
perturbs the source (text before/after the context, extra tokens inside the correct segment, an
extra segment, extra box mentions, negation, swapped segment order, removed or added commas)
and keeps the positional target ``base.objects[p_s]``, except ``incorrect_segment`` whose target
is the base object one box further, ``(p_s + 1) % num_boxes``. See :data:`DESIDERATA`.

**Two bugs of the reference code are fixed here.** (1) The reference computed the base's query
index from the query sentence instead of the context, so it was always 0 and ~1/num_boxes of
"positional" pairs queried the base's own box; it also located the query by substring search
(labels ``B`` and ``T`` match ``Box`` and ``The``). Here the query index comes from the structure,
positional sources never share it, and the positional target is never the base answer.
(2) The reference's box-label-value target was ``tokenizer.encode(list_of_words)[1]``, the wrong
id; here every target is the single in-context token id of one word (:meth:`Vocabulary.token_id`).

**Record schema** (``SCHEMA_VERSION``), JSON lines written by :func:`entity_tracking.io.write_jsonl`.

A *prompt* record (``eval.jsonl`` and ``mean_reference.jsonl`` lines; ``base``/``source`` of pairs)::

    text          str     the prompt, ending in "... contains the" (no trailing space)
    objects       [str]   object of each rendered segment, in textual order
    labels        [str]   box label of each rendered segment
    forms         [str]   segment form of each segment (keys of SEGMENT_FORMS)
    prefix, suffix, separator : str   text before the first segment / before the period / between segments
    inserts       {str(i): str}       text inserted just before segment i
    query_label   str     the label asked for
    query_index   int|null  segment index whose label is query_label; null if absent (corrupt prompts)
    answer        str|null  objects[query_index]
    n_tokens      int     length of the tokenization (BOS included if the tokenizer adds one)
    positions     {"objects": [int], "labels": [int], "query_label": int,
                   "prev_query_label": int|null, "last": int}   token indices, unpadded
    target_id     int|null  in-context token id of ``answer``

``eval.jsonl`` lines also hold ``id`` and ``context_id`` (each context appears ``num_boxes`` times
in a row, querying box 0, 1, ...). ``mean_reference.jsonl`` lines hold ``id``. Positions and ids
are those of the tokenizer named in ``manifest.json``; :func:`encode_prompts` recomputes them for
whatever tokenizer it is given, from the structure fields (:func:`render_prompt`).

A *path-patching* record (``path_patching.jsonl``)::

    id, base (prompt), source (prompt; query label absent from its context),
    target_word, target_id          the base answer (what patching should destroy)
    source_original_query_label, source_original_query_index   the source before its label was replaced
    corrupt_label_index int         a random segment index of the source; the Structure Reader
                                    step reads the corrupt activation at source.positions.labels[i]

A *desideratum* record (``desiderata/<name>.jsonl``)::

    id, desideratum, split ("train" | "eval" | "test", 50/25/25 in file order),
    base, source (prompts),
    base_query_index    int   q_b, the base's query segment index
    source_query_index  int   p_s, the source's query index among its *original* segments
                              (an extra segment added by add_seg_start is not counted;
                              source.query_index is the index among rendered segments)
    target_from   "base" | "source";  target_index int;  target_word str;  target_id int
                  target_word == (base if target_from == "base" else source).objects[target_index]
                  (add_seg_start shifts the source's segments by one; its target is a base object)
    base_answer   str   the base's own answer

An *arithmetic* record (``arithmetic.jsonl``): ``id, op, a, b, question, answer, text`` with
``question = "What is 123 + 4567 ?"``, ``answer = "4690"`` (division: ``"q R r"``, or ``"q"`` when
the remainder is 0) and ``text = question + " " + answer``.

Everything is deterministic in ``seed``: each file draws from its own ``random.Random`` seeded
with ``f"{seed}:{file}"``; no global random state is touched, so the same seed gives byte-identical
files.
"""


from .arithmetic import exact_match_by_digits, make_arithmetic, operand_digits, parse_problem, problem_key  # noqa: F401
from .encoding import encode_pairs, encode_prompts, position_keys, positions_at, token_table, word_token_ids  # noqa: F401
from .files import (  # noqa: F401
    DESIDERATA_DIR,
    FILES,
    build_datasets,
    data_dir,
    load_arithmetic,
    load_desiderata,
    load_eval_prompts,
    load_manifest,
    load_mean_reference,
    load_path_patching,
)
from .prompts import (  # noqa: F401
    ADDITIONAL_BOXES_TEXT,
    ARITHMETIC_OPS,
    QUERY_FORM,
    RANDOM_TEXT_END,
    RANDOM_TEXT_START,
    SCHEMA_VERSION,
    SEGMENT_FORMS,
    SPLITS,
    DataError,
    Vocabulary,
    annotate_prompts,
    build_vocabulary,
    locate_spans,
    make_prompt,
    render_prompt,
    tokenizer_name,
)
from .splits import Overlap, context_key, overlap, record_context_key, words_context_key  # noqa: F401
from .samplers import (  # noqa: F401
    DESIDERATA,
    Desideratum,
    make_desiderata,
    make_eval_prompts,
    make_mean_reference_prompts,
    make_path_patching_pairs,
)

__all__ = [
    "ADDITIONAL_BOXES_TEXT",
    "ARITHMETIC_OPS",
    "DESIDERATA",
    "DESIDERATA_DIR",
    "FILES",
    "DataError",
    "Desideratum",
    "QUERY_FORM",
    "RANDOM_TEXT_END",
    "RANDOM_TEXT_START",
    "SCHEMA_VERSION",
    "SEGMENT_FORMS",
    "SPLITS",
    "Vocabulary",
    "build_datasets",
    "annotate_prompts",
    "build_vocabulary",
    "data_dir",
    "encode_pairs",
    "encode_prompts",
    "load_arithmetic",
    "load_desiderata",
    "load_eval_prompts",
    "load_manifest",
    "load_mean_reference",
    "load_path_patching",
    "locate_spans",
    "make_arithmetic",
    "make_desiderata",
    "make_eval_prompts",
    "make_mean_reference_prompts",
    "make_path_patching_pairs",
    "make_prompt",
    "position_keys",
    "positions_at",
    "render_prompt",
    "token_table",
    "tokenizer_name",
    "word_token_ids",
    # held-out audits (splits) and arithmetic problem keys
    "Overlap", "context_key", "exact_match_by_digits", "operand_digits", "overlap", "parse_problem", "problem_key",
    "record_context_key", "words_context_key",
]

