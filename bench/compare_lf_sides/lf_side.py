"""LLaMA-Factory side of bench/compare_lf.py; runs in bench/.lf-venv (never imports lmf).

``python lf_side.py SPEC.json RESULT.json`` where SPEC is
``{"action": "preprocess" | "train", "config": {LLaMA-Factory config keys}}``.

- preprocess: LLaMA-Factory's own ``get_dataset`` (load + align + tokenize/template/mask), timed;
  token statistics of the result.
- train: LLaMA-Factory's ``run_exp`` (what ``llamafactory-cli train`` runs on one device), with
  ``transformers.Trainer.train`` timed, each optimizer step's end clocked (a callback's ``on_step_end``, after a
  CUDA sync), the logged losses kept and the tokenized train set counted.
- probe: ``train`` at increasing cutoff_len in one process under a CUDA memory cap (``common.probe``).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Stopwatch, cuda_peak_mib, cuda_reserved_mib, peak_rss_mib, probe, read_spec, sync,  # noqa: E402
                    token_stats, write_result)

PROCESS_START = time.perf_counter()


def preprocess(config: dict) -> dict:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(dict(config))
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    import datasets  # noqa: F401  (imported before timing on both sides: time the work, not the import)

    with Stopwatch() as sw:
        module = get_dataset(template, model_args, data_args, training_args, stage=config.get("stage", "sft"),
                             **tokenizer_module)
    train = module["train_dataset"]
    return {"seconds": sw.seconds, "stats": token_stats(train, tokenizer.pad_token_id)}


_RUN: dict = {}  # the current train() call's results, filled by the hooks below


def _install_hooks(stage: str) -> None:
    """Wrap the stage workflow's get_dataset and transformers.Trainer.train once per process (probe calls
    train() several times)."""
    import importlib

    import transformers

    workflow = importlib.import_module(f"llamafactory.train.{stage}.workflow")
    if getattr(workflow, "_bench_hooked", False):
        return
    original_get_dataset = workflow.get_dataset

    def counting_get_dataset(template, model_args, data_args, training_args, stage, tokenizer, **kw):
        module = original_get_dataset(template, model_args, data_args, training_args, stage, tokenizer, **kw)
        _RUN["data"] = token_stats(module["train_dataset"], tokenizer.pad_token_id, with_digest=False)
        return module

    workflow.get_dataset = counting_get_dataset
    workflow._bench_hooked = True
    if getattr(transformers.Trainer, "_bench_hooked", False):
        return
    original_train = transformers.Trainer.train

    class StepClock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _RUN["step_times"].append(sync() - _RUN["train_start"])

    def timed_train(self, *args, **kwargs):
        _RUN["step_times"] = []
        self.add_callback(StepClock())
        with Stopwatch() as sw:
            _RUN["train_start"] = time.perf_counter()
            result = original_train(self, *args, **kwargs)
        st = self.state
        losses = [h["loss"] for h in st.log_history if "loss" in h]
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        _RUN.update(train_seconds=sw.seconds, global_step=st.global_step, epoch=st.epoch,
                    trainer_tokens=getattr(st, "num_input_tokens_seen", None), losses=losses,
                    first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                    params=sum(p.numel() for p in self.model.parameters()), trainable_params=trainable)
        return result

    transformers.Trainer.train = timed_train
    transformers.Trainer._bench_hooked = True


def train(config: dict) -> dict:
    from llamafactory.train.tuner import run_exp

    _install_hooks(config.get("stage", "sft"))
    _RUN.clear()
    run_exp(dict(config))
    out = dict(_RUN)
    out.pop("train_start", None)
    return out


def _image_processor_only(model_dir: str) -> None:
    """LLaMA-Factory loads the processor with AutoProcessor, which needs torchvision for the Qwen-VL video
    processor (torchvision's PyPI wheels do not load next to the CPU torch): give it the model's image processor
    and tokenizer instead (bench/lf_vl_golden.py's processor; images only)."""
    import transformers

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lf_vl_golden import _processor

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    transformers.AutoProcessor.from_pretrained = staticmethod(lambda *a, **k: _processor(model_dir, tokenizer))


def main() -> None:
    spec, result_path = read_spec()
    if spec.get("vision"):
        _image_processor_only(spec["config"]["model_name_or_path"])
    if spec["action"] == "probe":
        result = probe(train, spec, result_path, "llamafactory")
    else:
        result = {"preprocess": preprocess, "train": train}[spec["action"]](spec["config"])
    import llamafactory

    result.update(side="llamafactory", version=llamafactory.__version__,
                  process_seconds=time.perf_counter() - PROCESS_START,
                  peak_rss_mib=peak_rss_mib(), cuda_peak_mib=cuda_peak_mib(), cuda_reserved_mib=cuda_reserved_mib())
    write_result(result_path, result)


if __name__ == "__main__":
    main()
