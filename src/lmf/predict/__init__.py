"""Prediction (``do_predict`` + ``predict_with_generate``): answers generated for ``eval_dataset`` with the
training template, written to ``generated_predictions.jsonl`` with BLEU-4 / ROUGE in ``predict_results.json``.

:mod:`lmf.predict.runner` runs it (transformers ``generate`` in batches, one shard per rank under torchrun,
or vLLM with ``infer_backend: vllm``); :mod:`lmf.predict.metrics` scores the answers as LLaMA-Factory does.
"""
