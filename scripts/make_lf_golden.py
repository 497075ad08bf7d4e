"""Regenerate tests/fixtures/lf_golden/*.json: LLaMA-Factory 0.9.5's tokenization of the parity cases.

    bash bench/lf_venv.sh && python scripts/make_lf_golden.py [CASE ...]

Each case (tests/lf_parity/cases.py) runs tests/lf_parity/lf_tokenize.py in bench/.lf-venv, in a
fresh process, from the repository root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "lf_parity"))
from cases import CASES, REAL, real_tokenizer_dir, resolved  # noqa: E402

LF_PYTHON = os.environ.get("LF_PYTHON", os.path.join(ROOT, "bench", ".lf-venv", "bin", "python"))
GOLDEN_DIR = os.path.join(ROOT, "tests", "fixtures", "lf_golden")


def main(names: list[str]) -> int:
    if not os.path.isfile(LF_PYTHON):
        print(f"no LLaMA-Factory venv at {LF_PYTHON}: run `bash bench/lf_venv.sh` first", file=sys.stderr)
        return 1
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    real_dir = tempfile.mkdtemp(prefix="lmf-real-tokenizer-")
    if any(CASES[n]["config"].get("model_name_or_path") == REAL for n in (names or CASES)):
        real_tokenizer_dir(real_dir)
    for name in names or sorted(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            spec = os.path.join(tmp, "spec.json")
            with open(spec, "w", encoding="utf-8") as fh:
                json.dump(dict(CASES[name], resolved_config=resolved(CASES[name]["config"], real_dir)), fh)
            out = os.path.join(GOLDEN_DIR, f"{name}.json")
            env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=os.path.join(tmp, "hf"),
                       DISABLE_VERSION_CHECK="1", OMP_NUM_THREADS="1")
            proc = subprocess.run([LF_PYTHON, os.path.join(ROOT, "tests", "lf_parity", "lf_tokenize.py"), spec, out],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: LLaMA-Factory failed:\n{proc.stderr[-4000:]}", file=sys.stderr)
                return 1
            with open(out, encoding="utf-8") as fh:
                rows = json.load(fh)["rows"]
            print(f"{name}: {rows} rows -> {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
