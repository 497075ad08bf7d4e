"""Objective metrics across micro-batches and ranks: a number is averaged over micro-batches (training) or
weighted by items (evaluation); a :class:`Ratio` is logged as sum(numerator) / sum(denominator), for means
over a subset that a micro-batch may lack (KTO's desirable / undesirable answers); a :class:`Difference` is
logged as one finalized metric minus another (KTO's reward margin)."""

from __future__ import annotations

from typing import NamedTuple

_NUM, _DEN, _DIFF = "\x00num", "\x00den", "\x00diff\x00"


class Ratio(NamedTuple):
    numerator: float
    denominator: float


class Difference(NamedTuple):
    minuend: str
    subtrahend: str


def accumulate(sums: dict[str, float], metrics: dict, weight: float = 1.0) -> None:
    """Add one micro-batch's ``metrics`` into ``sums`` (numbers times ``weight``; ratios as two sums)."""
    for key, value in metrics.items():
        if isinstance(value, Difference):
            sums.setdefault(key + _DIFF + value.minuend + _DIFF + value.subtrahend, 0.0)
        elif isinstance(value, Ratio):
            sums[key + _NUM] = sums.get(key + _NUM, 0.0) + float(value.numerator)
            sums[key + _DEN] = sums.get(key + _DEN, 0.0) + float(value.denominator)
        else:
            sums[key] = sums.get(key, 0.0) + float(value) * weight


def finalize(names: list[str], totals: list[float], divisor: float) -> dict[str, float]:
    """Logged values from the reduced sums (``names`` sorted as in ``sums``); a ratio over nothing is left out."""
    values = dict(zip(names, totals))
    out: dict[str, float] = {}
    for key, total in values.items():
        if key.endswith(_NUM):
            den = values[key[:-len(_NUM)] + _DEN]
            if den > 0:
                out[key[:-len(_NUM)]] = round(total / den, 6)
        elif not key.endswith(_DEN) and _DIFF not in key:
            out[key] = round(total / max(divisor, 1e-12), 6)
    for key in values:
        if _DIFF in key:
            name, minuend, subtrahend = key.split(_DIFF)
            if minuend in out and subtrahend in out:
                out[name] = round(out[minuend] - out[subtrahend], 6)
    return out
