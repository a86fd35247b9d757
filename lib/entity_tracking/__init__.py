"""entity_tracking: kernels behind the book reproducing Prakash et al. (ICLR 2024),
"Fine-Tuning Enhances Existing Mechanisms: A Case Study on Entity Tracking".

Modules, one per method: ``data`` (prompts, counterfactuals, desiderata, arithmetic),
``models`` (one loader over an architecture table), ``config`` (params profiles),
``io`` (atomic results files), ``runner`` (executes the book's chapters with papermill).
"""

__version__ = "0.1.0"
