"""DPO-family preference optimisation (sigmoid/cDPO, hinge, ipo, orpo, simpo).

``losses``: pure loss functions on per-sequence log-probs.
"""
