"""Datasets tokenized by both LLaMA-Factory 0.9.5 and lmf, compared token for token (tests/test_lf_parity.py).

Each case is a stage and the config keys both accept. Goldens (per-row digests of LLaMA-Factory's
output) live in tests/fixtures/lf_golden/<name>.json; regenerate them with
``python scripts/make_lf_golden.py`` (needs bench/.lf-venv: ``bash bench/lf_venv.sh``).
"""

from __future__ import annotations

MODEL = "examples/tiny-qwen3"
DATA = "examples/data"
#: Placeholder for a directory with Qwen's real BPE + every template's tokens (:func:`real_tokenizer_dir`).
REAL = "{real_qwen_tokenizer}"


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
    "qwen_kto": {"stage": "kto", "config": dict(_sft("kto_en_demo", "qwen", cutoff_len=512)["config"], stage="kto")},
}
#: Templates LLaMA-Factory added after 0.9.5: their goldens come from LLaMA-Factory main (2026-08, 0.9.6.dev0),
#: made with ``PYTHONPATH=<its src> python scripts/make_lf_golden.py <case>`` (it runs in bench/.lf-venv).
for _name in ("hy_dense_1_8b", "hy_dense_7b"):
    CASES[f"{_name}_alpaca_main"] = _sft("alpaca_en_demo,identity", _name, max_samples=20)
#: Templates whose stop words (or eos) the tiny Qwen vocabulary lacks: both add them as special tokens.
for _name in ("llama3", "glm4_moe", "hunyuan"):
    CASES[f"{_name}_missing_stop_words"] = _sft("alpaca_en_demo,identity", _name, max_samples=20)

#: The families' templates on the realistic tokenizer (Qwen's real BPE + each family's special tokens), on
#: single-turn data with system prompts and on tool-calling multi-turn data.
REAL_TEMPLATES = ("qwen3", "llama3", "llama2", "mistral", "gemma", "gemma2", "glm4", "glm4_moe", "chatglm3",
                  "deepseek3", "gpt_oss", "phi4", "minimax2", "seed_oss", "lfm2", "bailing_v2", "granite3", "olmo")
for _name in REAL_TEMPLATES:
    for _dataset, _short in (("alpaca_en_demo,identity", "alpaca"), ("glaive_toolcall_en_demo", "glaive")):
        _case = _sft(_dataset, _name, max_samples=30, cutoff_len=4096)
        _case["config"]["model_name_or_path"] = REAL
        CASES[f"real_{_name}_{_short}"] = dict(_case, lf_deviation={"empty_tools": True})


def real_tokenizer_dir(path: str) -> str:
    """Build the realistic tokenizer (and a tiny config) into ``path`` (lmf's venv; needs qwen-tokenizer)."""
    import json
    import os
    import shutil

    from lmf.data.template import TEMPLATES
    from lmf.data.template.pieces import Token
    from lmf.testing.qwen_tokenizer import build_qwen_tokenizer

    tokens = set()
    for template in TEMPLATES.values():
        for slots in (template.user, template.assistant, template.system, template.observation, template.function,
                      template.prefix, template.tools_slots or ()):
            tokens.update(p.token for p in slots or () if isinstance(p, Token))
        tokens.update(template.stop_words)
    build_qwen_tokenizer(path, extra_special_tokens=sorted(tokens))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.copy(os.path.join(root, MODEL, "config.json"), os.path.join(path, "config.json"))
    with open(os.path.join(path, "lmf_parity.json"), "w", encoding="utf-8") as fh:
        json.dump({"tokens": len(tokens)}, fh)
    return path


def resolved(config: dict, real_dir: str) -> dict:
    """``config`` with the realistic-tokenizer placeholder replaced by ``real_dir``."""
    return {k: (real_dir if v == REAL else v) for k, v in config.items()}
