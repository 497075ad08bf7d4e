"""DPO-family preference optimisation (sigmoid/cDPO, hinge, ipo, orpo, simpo).

- ``losses``: pure loss functions on per-sequence log-probs;
- ``objective``: concatenated chosen/rejected forward + reference log-probs -> loss and metrics;
- ``reference``: frozen reference model and precomputed reference log-probs;
- ``workflow``: :func:`run_dpo`, the ``lmf dpo`` entry point on the shared training loop.
"""

from __future__ import annotations


def run_dpo(cfg) -> None:
    """Run ``lmf dpo`` (see :mod:`lmf.train.dpo.workflow`)."""
    from lmf.train.dpo.workflow import run_dpo as _run

    _run(cfg)
