"""lmf side of bench/bench_templates.py: the same (template, dataset) cases through lmf's pipeline."""

from __future__ import annotations

import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "lf_parity"))
from digest import digest_rows  # noqa: E402


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    from lmf.config.parser import build_config
    from lmf.train.workflow import load_tokenizer_and_data

    results = {}
    for case in spec["cases"]:
        key = f"{case['template']}|{case['dataset']}"
        try:
            cfg = build_config(dict(case["config"], preprocessing_cache_dir=spec["lmf_cache"]))
            _, _, data = load_tokenizer_and_data(cfg, case["stage"])
            results[key] = digest_rows(data.train_dataset, case["stage"])
        except Exception as exc:  # noqa: BLE001 - reported in the table
            results[key] = {"error": f"{type(exc).__name__}: {exc}"[:300], "trace": traceback.format_exc()[-800:]}
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
