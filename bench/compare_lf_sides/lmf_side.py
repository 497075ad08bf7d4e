"""lmf side of bench/compare_lf.py; runs in lmf's environment (never imports llamafactory).

``python lmf_side.py SPEC.json RESULT.json`` where SPEC is
``{"action": "preprocess" | "train", "config": {lmf config keys}}``.

- preprocess: ``lmf.data.loader.get_dataset`` (read + convert + tokenize/template/mask), timed;
  token statistics of the result.
- train: ``lmf.experiment.run_experiment`` (what ``lmf sft CONFIG`` runs on one device), with
  ``lmf.train.trainer.Trainer.train`` timed, each optimizer step's end clocked (after a CUDA sync), the logged
  losses kept and the tokenized train set counted.
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


def _config_file(config: dict) -> str:
    """lmf's CLI reads a YAML file: write the config next to the result file (JSON is valid YAML)."""
    import json

    path = os.path.splitext(sys.argv[2])[0] + ".config.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=1)
    return path


def preprocess(config: dict) -> dict:
    from lmf.config.parser import get_config
    from lmf.data.loader import get_dataset
    from lmf.data.template import get_template
    from lmf.model.loader import load_tokenizer
    from lmf.train.workflow import load_media_plugin

    cfg = get_config([_config_file(config)])
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.data.template, tokenizer)
    template.fix_tokenizer(tokenizer)
    media = load_media_plugin(cfg, template, tokenizer)  # None for a text model
    import datasets  # noqa: F401  (imported before timing on both sides: time the work, not the import)

    with Stopwatch() as sw:
        module = get_dataset(cfg, tokenizer, template, stage=config.get("stage", "sft"), media=media)
    return {"seconds": sw.seconds, "stats": token_stats(module.train_dataset, tokenizer.pad_token_id)}


_RUN: dict = {}  # the current train() call's results, filled by the hooks below


def _install_hooks() -> None:
    """Wrap lmf's get_dataset, Trainer.train and Trainer._optimizer_step once per process (probe calls train()
    several times)."""
    import lmf.data.loader as loader
    import lmf.train.trainer as trainer_mod

    if getattr(trainer_mod.Trainer, "_bench_hooked", False):
        return
    original_get_dataset = loader.get_dataset
    original_train = trainer_mod.Trainer.train
    original_step = trainer_mod.Trainer._optimizer_step

    def counting_get_dataset(cfg, tokenizer, template, stage, **kw):
        module = original_get_dataset(cfg, tokenizer, template, stage, **kw)
        _RUN["data"] = token_stats(module.train_dataset, tokenizer.pad_token_id, with_digest=False)
        return module

    def timed_train(self, *args, **kwargs):
        _RUN["step_times"] = []
        with Stopwatch() as sw:
            _RUN["train_start"] = time.perf_counter()
            state = original_train(self, *args, **kwargs)
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        _RUN.update(train_seconds=sw.seconds, global_step=state.global_step, epoch=state.epoch,
                    trainer_tokens=state.tokens_seen, losses=losses,
                    first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                    params=sum(p.numel() for p in self.model.parameters()), trainable_params=trainable)
        return state

    def clocked_step(self, items):
        norm = original_step(self, items)
        _RUN["step_times"].append(sync() - _RUN["train_start"])
        return norm

    loader.get_dataset = counting_get_dataset
    trainer_mod.Trainer.train = timed_train
    trainer_mod.Trainer._optimizer_step = clocked_step
    trainer_mod.Trainer._bench_hooked = True


def train(config: dict) -> dict:
    from lmf.experiment import run_experiment

    _install_hooks()
    _RUN.clear()
    run_experiment([_config_file(config)], "train")  # the config's stage
    out = dict(_RUN)
    out.pop("train_start", None)
    return out


def main() -> None:
    spec, result_path = read_spec()
    if spec["action"] == "probe":
        result = probe(train, spec, result_path, "lmf")
    else:
        result = {"preprocess": preprocess, "train": train}[spec["action"]](spec["config"])
    import lmf

    result.update(side="lmf", version=lmf.__version__, process_seconds=time.perf_counter() - PROCESS_START,
                  peak_rss_mib=peak_rss_mib(), cuda_peak_mib=cuda_peak_mib(), cuda_reserved_mib=cuda_reserved_mib())
    write_result(result_path, result)


if __name__ == "__main__":
    main()
