"""DPO-family preference optimisation (sigmoid/cDPO, hinge, ipo, orpo, simpo).

- ``losses``: pure loss functions on per-sequence log-probs;
- ``objective``: concatenated chosen/rejected forward + reference log-probs -> loss and metrics;
- ``reference``: frozen reference model and precomputed reference log-probs;
- ``recipe``: the ``lmf dpo`` recipe (:func:`~lmf.train.dpo.recipe.build_stage`) for the shared workflow.
"""
