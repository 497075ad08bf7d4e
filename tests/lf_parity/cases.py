"""Datasets tokenized by both LLaMA-Factory 0.9.5 and lmf, compared token for token (tests/test_lf_parity.py).

Each case is a stage and the config keys both accept. Goldens (per-row digests of LLaMA-Factory's
output) live in tests/fixtures/lf_golden/<name>.json; regenerate them with
``python scripts/make_lf_golden.py`` (needs bench/.lf-venv: ``bash bench/lf_venv.sh``).
"""

from __future__ import annotations

MODEL = "examples/tiny-qwen3"
DATA = "examples/data"


def _sft(dataset: str, template: str, **extra) -> dict:
    config = dict(model_name_or_path=MODEL, dataset_dir=DATA, dataset=dataset, template=template, cutoff_len=1024,
                  stage="sft", do_train=True, finetuning_type="lora", output_dir="unused",
                  preprocessing_num_workers=1, overwrite_cache=True)
    config.update(extra)
    return {"stage": config["stage"], "config": config}


#: A deliberate deviation (documented in the README): for a record whose ``tools`` is an empty list and
#: that has no system prompt, LLaMA-Factory renders an empty system turn (``"[]"`` is a non-empty
#: string to it), which the model's own chat template (and so vLLM at serving time) never renders.
#: lmf renders no system turn; the goldens hold LLaMA-Factory's rows with that empty turn removed.
EMPTY_SYSTEM_TURN = {"strip_prefix": "<|im_start|>system\n<|im_end|>\n",
                     "why": "an empty tools list renders no (empty) system turn"}

CASES: dict[str, dict] = {
    "qwen_glaive_toolcall": _sft("glaive_toolcall_en_demo", "qwen"),
    "qwen_alpaca_identity": _sft("alpaca_en_demo,identity", "qwen"),
    "qwen_alpaca_cutoff64": _sft("alpaca_en_demo", "qwen", cutoff_len=64),
    "qwen_alpaca_train_on_prompt": _sft("alpaca_en_demo", "qwen", train_on_prompt=True, max_samples=50),
    "qwen3_glaive_toolcall": dict(_sft("glaive_toolcall_en_demo", "qwen3", cutoff_len=8192),
                                  lf_deviation=EMPTY_SYSTEM_TURN),
    "qwen3_alpaca_nothinking": _sft("alpaca_en_demo", "qwen3", enable_thinking=False, max_samples=50),
    "qwen3_nothink_alpaca": _sft("alpaca_en_demo", "qwen3_nothink", max_samples=50),
    "chatml_glaive_toolcall": dict(_sft("glaive_toolcall_en_demo", "chatml", max_samples=60, cutoff_len=8192),
                                   lf_deviation=EMPTY_SYSTEM_TURN),
    "qwen_interleave_under": _sft("alpaca_en_demo,identity", "qwen", mix_strategy="interleave_under",
                                  interleave_probs="0.3,0.7", max_samples=100),
    "qwen_interleave_over": _sft("alpaca_en_demo,identity", "qwen", mix_strategy="interleave_over",
                                 interleave_probs="0.5,0.5", max_samples=60),
    "qwen_dpo": {"stage": "rm", "config": dict(_sft("dpo_en_demo", "qwen")["config"], stage="rm")},
}
