"""LLaMA-Factory's text-similarity metrics of generated answers (its ``ComputeSimilarity``).

Per sample: ROUGE-1/2/L F-scores (``rouge-chinese``) on jieba-segmented words and sentence BLEU-4 on
characters (``nltk``, smoothing method 3), each x100 rounded to 4 decimals; the result is the mean per
metric. An empty prediction or reference scores 0 ROUGE.
"""

from __future__ import annotations

import importlib.util
import logging

from lmf.extras.errors import NotAvailableError

METRIC_PACKAGES = {"jieba": "jieba", "nltk": "nltk", "rouge_chinese": "rouge-chinese"}


def check_metrics_available() -> None:
    """Raise :class:`NotAvailableError` with the pip line when a metric package is missing."""
    missing = [pkg for module, pkg in METRIC_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise NotAvailableError(f"do_predict scores answers with {', '.join(missing)}, which is not installed: "
                                "pip install 'lmf[metrics]'")


def similarity_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """``{"rouge-1", "rouge-2", "rouge-l", "bleu-4"}``: means over the samples of the per-sample scores."""
    check_metrics_available()
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    scores: dict[str, list[float]] = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(predictions, references, strict=True):
        hypothesis, reference = " ".join(jieba.cut(pred)), " ".join(jieba.cut(label))
        if not hypothesis.split() or not reference.split():
            rouge = {k: {"f": 0.0} for k in ("rouge-1", "rouge-2", "rouge-l")}
        else:
            rouge = Rouge().get_scores(hypothesis, reference)[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            scores[key].append(round(rouge[key]["f"] * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        scores["bleu-4"].append(round(bleu * 100, 4))
    import numpy as np

    return {k: float(np.mean(v)) if v else 0.0 for k, v in scores.items()}
