"""Regenerate tests/fixtures/lf_golden/ollama_modelfiles.json: the Ollama Modelfile LLaMA-Factory 0.9.5's export
writes (``Template.get_ollama_modelfile``) for every one of its templates, with the repository's tiny Qwen3
tokenizer fixed by each template first (``get_template_and_fix_tokenizer``), as its export does.

    bench/.lf-venv/bin/python bench/lf_modelfile_golden.py tests/fixtures/lf_golden/ollama_modelfiles.json

A template whose Modelfile LLaMA-Factory cannot write (a slot naming a token: "Dict is not supported.") is stored as
``{"error": message}``; ``tests/test_export_gguf.py`` compares lmf's text for the others.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(os.path.dirname(HERE), "examples", "tiny-qwen3")


def main(out_path: str) -> None:
    from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    out = {"source": "LLaMA-Factory 0.9.5 Template.get_ollama_modelfile, see bench/lf_modelfile_golden.py",
           "tokenizer": "examples/tiny-qwen3", "templates": {}}
    for name in sorted(TEMPLATES):
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
        try:
            template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=name))
            out["templates"][name] = template.get_ollama_modelfile(tokenizer)
        except Exception as exc:  # noqa: BLE001 - recorded as LLaMA-Factory's outcome
            out["templates"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1, ensure_ascii=False)
        fh.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
