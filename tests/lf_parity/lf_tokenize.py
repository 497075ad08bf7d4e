"""Tokenize a dataset with LLaMA-Factory's own pipeline; runs in bench/.lf-venv (never imports lmf).

``python lf_tokenize.py SPEC.json OUT.json``: SPEC is ``{"stage": ..., "config": {LLaMA-Factory keys}}``;
OUT gets, per row of LLaMA-Factory's ``get_dataset`` result, the lengths and a sha256 of its token
ids and labels (``digest_rows`` in tests/lf_parity/digest.py computes the same on lmf's side).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digest import FrozenDatetime, digest_rows  # noqa: E402


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    deviation = spec.get("lf_deviation") or {}
    if deviation.get("empty_tools"):  # lmf's documented deviation: an empty tools list is no tools
        from llamafactory.data import template as lf_template

        for cls in (lf_template.Template, lf_template.Llama2Template):
            def _encode(self, tokenizer, messages, system, tools, _original=cls._encode):
                return _original(self, tokenizer, messages, system, "" if tools and tools.strip() == "[]" else tools)

            cls._encode = _encode
    from llamafactory.data import tool_utils

    tool_utils.datetime = FrozenDatetime  # the goldens' date, not today's (digest.GOLDEN_DATE)
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(dict(spec.get("resolved_config") or spec["config"]))
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template, model_args, data_args, training_args, stage=spec["stage"], **tokenizer_module)
    rows = [dict(row) for row in module["train_dataset"]]
    changed = 0
    if deviation.get("strip_prefix"):  # a documented deviation of lmf (tests/lf_parity/cases.py): LF's rows with a prefix removed
        prefix = tokenizer_module["tokenizer"].encode(deviation["strip_prefix"], add_special_tokens=False)
        for row in rows:
            if row["input_ids"][:len(prefix)] == prefix:
                row["input_ids"], row["labels"] = row["input_ids"][len(prefix):], row["labels"][len(prefix):]
                changed += 1
    import llamafactory

    result = {"lf_version": llamafactory.__version__, "stage": spec["stage"], "config": spec["config"],
              "deviating_rows": changed, **digest_rows(rows, spec["stage"])}
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
