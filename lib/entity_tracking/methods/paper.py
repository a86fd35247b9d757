"""The paper's own numbers, to print beside ours (never used as results).

Prakash et al. (ICLR 2024), as read off the authors' reference code and its recorded outputs
(the supplementary methods of the paper). Accuracies are fractions; DCM semantics are percent.
Models are keyed by the paper's names.
"""

from __future__ import annotations

MODELS = ("Llama-7B", "Vicuna-7B", "Goat-7B", "FLoat-7B")

#: 7-box entity-tracking accuracy of each full model.
ACCURACY = {"Llama-7B": 0.66, "Vicuna-7B": 0.67, "Goat-7B": 0.82, "FLoat-7B": 0.82}

#: Heads per group of each model's final circuit (§2).
CIRCUIT_SIZES = {
    "Llama-7B": {"value_fetcher": 40, "position_transmitter": 7, "position_detector": 20, "structure_reader": 5},
    "Goat-7B": {"value_fetcher": 68, "position_transmitter": 28, "position_detector": 40, "structure_reader": 39},
    "FLoat-7B": {"value_fetcher": 68, "position_transmitter": 29, "position_detector": 40, "structure_reader": 38},
}

#: Llama circuit heads shared with the Goat / FLoat circuits, per group (intersection sizes).
CIRCUIT_OVERLAP = {
    "Goat-7B": {"value_fetcher": 27, "position_transmitter": 6, "position_detector": 16, "structure_reader": 5},
    "FLoat-7B": {"value_fetcher": 27, "position_transmitter": 7, "position_detector": 15, "structure_reader": 5},
}

#: Table 1: the Llama circuit evaluated in each model (full model, circuit, random circuit, faithfulness).
FAITHFULNESS = {
    "Llama-7B": {"full": 0.66, "circuit": 0.66, "random": 0.00, "faithfulness": 1.00},
    "Vicuna-7B": {"full": 0.67, "circuit": 0.65, "random": 0.00, "faithfulness": 0.97},
    "Goat-7B": {"full": 0.82, "circuit": 0.73, "random": 0.01, "faithfulness": 0.89},
    "FLoat-7B": {"full": 0.82, "circuit": 0.72, "random": 0.01, "faithfulness": 0.88},
}

#: Completeness of the Llama circuit in Llama: random subsets (p=0.5), F(M\\K) / F(C\\K) / score.
COMPLETENESS_RANDOM_LLAMA = {"F(M\\K)": 0.11, "F(C\\K)": 0.00, "score": 0.10}

#: Completeness of the Llama circuit in Llama, K = one whole group: F(C\\K) and F(M\\K).
COMPLETENESS_GROUPS_LLAMA = {
    "value_fetcher": {"F(C\\K)": 0.00, "F(M\\K)": 0.19},
    "position_transmitter": {"F(C\\K)": 0.02, "F(M\\K)": 0.23},
    "position_detector": {"F(C\\K)": 0.02, "F(M\\K)": 0.04},
    "structure_reader": {"F(C\\K)": 0.46, "F(M\\K)": 0.58},
}

#: DCM per-model semantics of the Llama circuit's DCM heads: % of samples giving the target.
DCM_SEMANTICS = {
    ("value_fetcher", "object_value"): {"Llama-7B": 45.6, "Vicuna-7B": 56.4, "Goat-7B": 65.9, "FLoat-7B": 63.3},
    ("value_fetcher", "positional"): {"Llama-7B": 12.8, "Vicuna-7B": 13.1, "Goat-7B": 13.8, "FLoat-7B": 13.4},
    ("position_transmitter", "positional"): {"Llama-7B": 36.9, "Vicuna-7B": 35.0, "Goat-7B": 38.6, "FLoat-7B": 47.1},
    ("position_transmitter", "object_value"): {"Llama-7B": 2.9, "Vicuna-7B": 3.0, "Goat-7B": 3.0, "FLoat-7B": 3.7},
    ("position_detector", "positional"): {"Llama-7B": 44.0, "Vicuna-7B": 37.7, "Goat-7B": 44.2, "FLoat-7B": 54.7},
    ("position_detector", "object_value"): {"Llama-7B": 2.1, "Vicuna-7B": 2.4, "Goat-7B": 2.5, "FLoat-7B": 2.9},
    ("structure_reader", "positional"): {"Llama-7B": 13.4, "Vicuna-7B": 13.0, "Goat-7B": 13.9, "FLoat-7B": 13.3},
    ("structure_reader", "object_value"): {"Llama-7B": 1.5, "Vicuna-7B": 1.3, "Goat-7B": 1.5, "FLoat-7B": 1.5},
}
#: Every group's box-label-value result in the paper is 0.0, an artefact of a bug (paper-methods §1.4).
DCM_BOX_LABEL_VALUE = 0.0



def dcm_semantics(group: str, desideratum: str, model: str | None) -> float | None:
    """The paper's DCM semantics (percent) of ``group``'s heads selected for ``desideratum``,
    patched in ``model`` (a paper model name): :data:`DCM_SEMANTICS`, and
    :data:`DCM_BOX_LABEL_VALUE` for the box-label-value desideratum in every group. None where
    the paper has no number (another desideratum, a model it did not run, ``model`` None)."""
    if model not in MODELS:
        return None
    if desideratum == "box_label_value":
        return DCM_BOX_LABEL_VALUE
    return DCM_SEMANTICS.get((group, desideratum), {}).get(model)


#: Position Transmitter, Llama, additional desiderata (% of samples).
DCM_ADDITIONAL = {
    "random_text_start": 34.8, "random_text_end": 34.1, "add_tokens_btw_box_and_obj": 38.8,
    "add_seg_start": 25.5, "add_seg_end": 30.5, "add_box_before_correct_segment": 19.4,
    "incorrect_segment": 16.2, "altered_box_obj_order": 16.1, "altered_box_obj_association": 18.0,
    "no_comma": 37.5, "add_comma": 36.3,
}

#: Output CMAP into Llama-7B (accuracy); the base alone is 0.66.
CMAP_OUTPUT = {
    "Goat-7B": {"full circuit": 0.82, "value_fetcher": 0.82, "position_transmitter": 0.78,
                "position_detector": 0.62, "structure_reader": 0.65},
    "FLoat-7B": {"full circuit": 0.82, "value_fetcher": 0.82, "position_transmitter": 0.74,
                 "position_detector": 0.56, "structure_reader": 0.65},
}

#: Input CMAP, Goat-7B -> Llama-7B (accuracy).
CMAP_INPUT = {
    "value_fetcher": {"Q": 0.77, "K": 0.63, "V": 0.69, "QK": 0.76, "QKV": 0.77},
    "position_transmitter": {"Q": 0.66, "K": 0.65, "V": 0.69, "QK": 0.65, "QKV": 0.67},
}


def llama7b_config():
    """The configuration of LLaMA-7B (no weights), for cost estimates on a machine without it."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
