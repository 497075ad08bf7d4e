"""LLaMA-Factory side of bench/bench_templates.py (runs in bench/.lf-venv; never imports lmf).

``python lf_side.py SPEC.json OUT.json``: for every (template, dataset) of SPEC, LLaMA-Factory's own
``get_dataset`` tokenizes the dataset; OUT gets per-row digests (tests/lf_parity/digest.py) or the error.
lmf's one documented deviation is applied here (a tools list that is empty counts as no tools: no empty
system turn), so that the comparison measures everything else.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "lf_parity"))
from digest import digest_rows  # noqa: E402


def _no_empty_tools() -> None:
    """Treat ``tools: "[]"`` as no tools (lmf's documented deviation)."""
    from llamafactory.data import template as lf_template

    for cls in (lf_template.Template, lf_template.Llama2Template):
        original = cls._encode

        def _encode(self, tokenizer, messages, system, tools, _original=original):
            if tools and tools.strip() == "[]":
                tools = ""
            return _original(self, tokenizer, messages, system, tools)

        cls._encode = _encode


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    _no_empty_tools()
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    results = {}
    for case in spec["cases"]:
        key = f"{case['template']}|{case['dataset']}"
        try:
            model_args, data_args, training_args, _, _ = get_train_args(dict(case["config"]))
            tokenizer_module = load_tokenizer(model_args)
            template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
            module = get_dataset(template, model_args, data_args, training_args, stage=case["stage"], **tokenizer_module)
            results[key] = digest_rows(module["train_dataset"], case["stage"])
        except Exception as exc:  # noqa: BLE001 - reported in the table
            results[key] = {"error": f"{type(exc).__name__}: {exc}"[:300], "trace": traceback.format_exc()[-800:]}
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
