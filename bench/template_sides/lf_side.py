"""LLaMA-Factory side of bench/bench_templates.py (runs in bench/.lf-venv; never imports lmf).

``python lf_side.py SPEC.json OUT.json``: for every (template, dataset) of SPEC, LLaMA-Factory's own
``get_dataset`` tokenizes the dataset; OUT gets per-row digests (tests/lf_parity/digest.py) or the error.
lmf's two documented deviations are applied here (a tools list that is empty counts as no tools: no empty
system turn; a token slot that names a token other than bos/eos, such as phi_small's ``{"<|endoftext|>"}``
prefix, is that token, where LLaMA-Factory drops it), so that the comparison measures everything else.
With ``--text-rows-without-processor`` (the spec's ``text_rows_without_processor``), the vision/audio
templates' multimodal plugins pass rows without media through unchanged instead of demanding the model's
processor (LF 0.9.5 stops with "Processor was not found"; on text-only rows its plugins change nothing).
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


def _named_token_slots() -> None:
    """A token slot ``{"<|endoftext|>"}`` is that token's id (lmf's documented deviation; LF drops it)."""
    from llamafactory.data import template as lf_template

    original = lf_template.Template._convert_elements_to_ids

    def _convert(self, tokenizer, elements, _original=original):
        token_ids = []
        for elem in elements:
            if isinstance(elem, set) and not elem & {"bos_token", "eos_token"}:
                token_ids += [tokenizer.convert_tokens_to_ids(token) for token in sorted(elem)]
            else:
                token_ids += _original(self, tokenizer, [elem])
        return token_ids

    lf_template.Template._convert_elements_to_ids = _convert


def _text_rows_without_processor() -> None:
    """Rows without images, videos or audios skip the multimodal plugins (which need a processor to run)."""
    import inspect

    from llamafactory.data import mm_plugin

    for cls in [c for c in vars(mm_plugin).values() if inspect.isclass(c) and hasattr(c, "process_token_ids")]:
        messages_fn, ids_fn = cls.process_messages, cls.process_token_ids

        def process_messages(self, messages, images, videos, audios, processor, _fn=messages_fn):
            return messages if not (images or videos or audios) else _fn(self, messages, images, videos, audios,
                                                                         processor)

        def process_token_ids(self, input_ids, labels, images, videos, audios, tokenizer, processor, _fn=ids_fn):
            if not (images or videos or audios):
                return input_ids, labels
            return _fn(self, input_ids, labels, images, videos, audios, tokenizer, processor)

        cls.process_messages, cls.process_token_ids = process_messages, process_token_ids


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    _no_empty_tools()
    _named_token_slots()
    if spec.get("text_rows_without_processor"):
        _text_rows_without_processor()
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
