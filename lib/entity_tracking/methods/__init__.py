"""The methods layer: one module per method of the paper (and ours), each over any loaded model.

:mod:`.circuit` (the circuit as data), :mod:`.path_patching` (finding it), :mod:`.ablation` (mean
ablation: faithfulness, completeness, minimality, necessity), :mod:`.dcm` (desiderata-based
component masking), :mod:`.cmap` (cross-model activation patching), :mod:`.attention` (attention
patterns), :mod:`.binding` (where a model binds entities: ours), :mod:`.dynamics` (across
fine-tuning checkpoints), :mod:`.paper` (the paper's published numbers) and :mod:`.verdicts` (the
rules that turn measurements into "holds" / "does not hold").
"""
