"""``do_predict``: generate an answer for every ``eval_dataset`` sample, write and score them.

Order of work: checks (output files, metric packages) -> process group -> tokenizer, template, prediction
set (prompt ids + reference ids, :data:`lmf.data.layout.GENERATE`) -> this rank's shard -> answers
(transformers ``generate`` on left-padded batches, or vLLM) -> gathered on rank 0 in dataset order ->
``generated_predictions.jsonl`` (prompt, predict, label, as LLaMA-Factory writes it) and
``predict_results.json`` (BLEU-4, ROUGE-1/2/L, runtime, samples/s), both written atomically.

After ``do_train`` in the same run (:func:`lmf.experiment.run_experiment`), the model that was just saved in
``output_dir`` answers.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any, Optional

from lmf.data.media import MEDIA_COLUMNS
from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"
ALL_RESULTS_FILE = "all_results.json"


def check_outputs_writable(cfg: "LmfConfig") -> None:
    """Earlier predictions in ``output_dir`` are only replaced with ``overwrite_output_dir: true``."""
    out = cfg.training.output_dir
    existing = [name for name in (PREDICTIONS_FILE, RESULTS_FILE) if os.path.exists(os.path.join(out, name))]
    if existing and not cfg.training.overwrite_output_dir:
        raise ConfigError(f"output_dir {out} already holds {', '.join(existing)} of an earlier prediction; set "
                          "overwrite_output_dir: true to replace them, or choose another output_dir")


def run_prediction(cfg: "LmfConfig") -> dict[str, float]:
    """Predict ``cfg.data.eval_dataset``; returns the metrics (on every rank)."""
    from lmf.data.loader import get_prediction_dataset
    from lmf.data.template import template_from_args
    from lmf.dist.runtime import barrier, destroy_distributed
    from lmf.model.loader import load_tokenizer
    from lmf.predict.metrics import check_metrics_available
    from lmf.train.output_lock import hold_output_dir
    from lmf.train.process import set_seed, setup_runtime

    check_outputs_writable(cfg)
    check_metrics_available()
    runtime = setup_runtime(cfg)
    try:
        with hold_output_dir(cfg.training.output_dir, runtime):  # no other run writes here meanwhile
            set_seed(cfg.training.seed)
            tokenizer = load_tokenizer(cfg.model)
            template = template_from_args(cfg.data, tokenizer)
            template.fix_tokenizer(tokenizer)
            from lmf.train.workflow import load_media_plugin

            media = load_media_plugin(cfg, template, tokenizer)
            dataset, _ = get_prediction_dataset(cfg, tokenizer, template, media)
            prompts = [list(ids) for ids in dataset["input_ids"]]
            images = ([tuple(list(files) for files in row) for row in zip(*(dataset[c] for c in MEDIA_COLUMNS))]
                      if "images" in dataset.column_names else None)
            labels = [list(ids) for ids in dataset["labels"]]
            stop_ids = template.stop_token_ids(tokenizer)
            mine = list(range(runtime.rank, len(prompts), runtime.world_size))  # every sample once, over the ranks
            start = time.perf_counter()
            answers = _generate(cfg, tokenizer, runtime, [prompts[i] for i in mine], stop_ids,
                                [images[i] for i in mine] if images else None, media)
            runtime_s = time.perf_counter() - start
            gathered = _gather(dict(zip(mine, answers)), runtime)
            metrics: dict[str, float] = {}
            if runtime.is_main:
                ordered = [gathered[i] for i in range(len(prompts))]
                metrics = _write_outputs(cfg, tokenizer, prompts, ordered, labels, runtime_s, runtime.world_size)
            barrier()  # no rank leaves (and so no teardown of a peer can stop rank 0) before the files are written
            return metrics
    finally:
        destroy_distributed()


def _generate(cfg, tokenizer, runtime, prompts: list[list[int]], stop_ids: list[int], images=None,
              media=None) -> list[list[int]]:
    from lmf.chat.engine import GenerationSettings

    settings = GenerationSettings.from_args(cfg.generating)
    beams = cfg.generating.num_beams if cfg.generating.num_beams > 1 else (cfg.data.eval_num_beams or 1)
    if cfg.model.infer_backend == "vllm":
        if cfg.generating.generation_config:
            raise ConfigError("config keys 'generation_config' and 'infer_backend: vllm': not implemented together; "
                              "predict with infer_backend: huggingface, or set the generating keys")
        if beams > 1:
            raise ConfigError("config keys 'num_beams' (or 'eval_num_beams') and 'infer_backend': beam search with "
                              "vLLM is not implemented in lmf; predict with infer_backend: huggingface")
        if images and any(any(files) for files in images):
            raise NotAvailableError("prediction on images with infer_backend: vllm is not implemented in lmf yet; "
                                    "use infer_backend: huggingface")
        if runtime.world_size > 1:
            raise ConfigError("infer_backend: vllm predicts in one process (vLLM parallelises itself); "
                              "run it without torchrun")
        from lmf.predict.vllm_generate import generate_with_vllm

        return generate_with_vllm(cfg, tokenizer, prompts, stop_ids, settings)
    from lmf.model.loader import load_model
    from lmf.chat.hf_engine import load_generation_config
    from lmf.predict.hf_generate import generate_in_batches

    base = load_generation_config(cfg.generating.generation_config) if cfg.generating.generation_config else None
    model = load_model(cfg, tokenizer, is_trainable=False, device=runtime.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    logger.info("predicting %d samples on %s with transformers generate (batch %d, %s%s)", len(prompts),
                runtime.device, cfg.training.per_device_eval_batch_size,
                "greedy" if settings.greedy else "sampling",
                f", {beams} beams, length_penalty {cfg.generating.length_penalty:g}" if beams > 1 else "")
    return generate_in_batches(model, prompts, stop_ids, pad_id, settings, cfg.training.per_device_eval_batch_size,
                               use_cache=cfg.model.use_cache, images=images, media=media, num_beams=beams,
                               length_penalty=cfg.generating.length_penalty, generation_config=base)


def _gather(answers: dict[int, list[int]], runtime) -> dict[int, list[int]]:
    if runtime.world_size == 1:
        return answers
    import torch.distributed as dist

    parts: list[Optional[dict]] = [None] * runtime.world_size
    dist.all_gather_object(parts, answers)
    merged: dict[int, list[int]] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def _write_outputs(cfg, tokenizer, prompts, answers, labels, runtime_s: float, world_size: int) -> dict[str, float]:
    from lmf.predict.metrics import similarity_scores

    skip = cfg.generating.skip_special_tokens
    decoded_prompts = tokenizer.batch_decode(prompts, skip_special_tokens=False)
    predicted = tokenizer.batch_decode(answers, skip_special_tokens=skip)
    expected = tokenizer.batch_decode(labels, skip_special_tokens=skip)
    lines = [json.dumps({"prompt": p, "predict": a, "label": lab}, ensure_ascii=False) + "\n"
             for p, a, lab in zip(decoded_prompts, predicted, expected)]
    # LLaMA-Factory scores the texts without special tokens, whatever skip_special_tokens says for the file
    scores = similarity_scores(predicted if skip else tokenizer.batch_decode(answers, skip_special_tokens=True),
                               expected if skip else tokenizer.batch_decode(labels, skip_special_tokens=True))
    batch = cfg.training.per_device_eval_batch_size
    steps = -(-len(prompts) // (batch * world_size))
    metrics = {f"predict_{k}": v for k, v in scores.items()}
    metrics.update(predict_runtime=round(runtime_s, 4),
                   predict_samples_per_second=round(len(prompts) / runtime_s, 3) if runtime_s else 0.0,
                   predict_steps_per_second=round(steps / runtime_s, 3) if runtime_s else 0.0)
    out = cfg.training.output_dir
    os.makedirs(out, exist_ok=True)
    _atomic_write(os.path.join(out, PREDICTIONS_FILE), "".join(lines))
    _atomic_write(os.path.join(out, RESULTS_FILE), json.dumps(metrics, indent=4, sort_keys=True) + "\n")
    all_results = _read_json(os.path.join(out, ALL_RESULTS_FILE))
    all_results.update(metrics)
    _atomic_write(os.path.join(out, ALL_RESULTS_FILE), json.dumps(all_results, indent=4, sort_keys=True) + "\n")
    logger.info("wrote %d predictions to %s", len(lines), os.path.join(out, PREDICTIONS_FILE))
    logger.info("predict metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return data if isinstance(data, dict) else {}


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
