"""Regenerate tests/fixtures/lf_v1/golden_digests.json: LLaMA-Factory v1's own tokens and labels of the v1 demo
data (LLaMA-Factory at GitHub ff6d4d12, whose examples/v1 and data/v1_* are ../shared's; the 0.9.5 wheel's v1 is
older). v1 renders with the tokenizer's chat template, so lmf's ``template: auto`` must give the same ids.

    git -C <LLaMA-Factory checkout> checkout ff6d4d12
    cd <a folder with data -> ../shared/data/lf-demo and v1_sft_full.yaml from tests/fixtures/lf_v1>
    PYTHONPATH=<checkout>/src bench/.lf-venv/bin/python <lmf>/bench/lf_v1_golden.py <lmf>/tests/fixtures/lf_v1/golden_digests.json

Each row is stored as the first 16 hex digits of the SHA-1 of its JSON ``[input_ids, labels]`` (preference rows:
``[chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels]``, split from v1's concatenated row by
its token_type_ids); ``tests/test_v1_configs.py::test_v1_tokens_equal_llamafactory_v1`` compares lmf's rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(os.path.dirname(HERE), "examples", "tiny-qwen3")


def digest(values: list) -> str:
    return hashlib.sha1(json.dumps(values).encode()).hexdigest()[:16]


def main(out_path: str) -> None:
    from llamafactory.v1.accelerator.interface import DistributedInterface
    from llamafactory.v1.core.data_engine import DataEngine
    from llamafactory.v1.core.rendering import Renderer
    from transformers import AutoTokenizer

    DistributedInterface()
    renderer = Renderer(AutoTokenizer.from_pretrained(TOKENIZER))
    out = {"tokenizer": "examples/tiny-qwen3",
           "source": "LLaMA-Factory v1 (GitHub ff6d4d12): DataEngine + Renderer.process_samples, see bench/lf_v1_golden.py"}
    for spec in ("data/v1_sft_demo.jsonl", "v1_sft_full.yaml"):
        engine = DataEngine(spec)
        rows = [renderer.process_samples([engine[i]])[0] for i in range(len(engine))]
        out[spec] = [digest([list(r["input_ids"]), list(r["labels"])]) for r in rows]
    engine = DataEngine("data/v1_dpo_demo.jsonl")
    rows = []
    for i in range(len(engine)):
        r = renderer.process_samples([engine[i]])[0]
        sides = []
        for kind in (1, 2):
            sides.append([x for x, t in zip(r["input_ids"], r["token_type_ids"]) if t == kind])
            sides.append([x for x, t in zip(r["labels"], r["token_type_ids"]) if t == kind])
        rows.append(digest(sides))
    out["data/v1_dpo_demo.jsonl"] = rows
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=0)


if __name__ == "__main__":
    main(sys.argv[1])
