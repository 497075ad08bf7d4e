"""DPO-family preference optimisation (sigmoid/cDPO, hinge, ipo, orpo, simpo).

- ``losses``: pure loss functions on per-sequence log-probs;
- ``objective``: one chosen/rejected forward + reference log-probs -> loss and metrics;
- ``precompute``: reference log-probs precomputed once over the data (the reference model: ``lmf.train.reference``);
- ``recipe``: the ``lmf dpo`` recipe (:func:`~lmf.train.dpo.recipe.build_objective`) for the shared workflow.
"""
