"""`lmf data check`: real pipeline on the demo data, report content, error exit codes; tokenized_path reuse."""

from __future__ import annotations

import json


from lmf.data_check import render_with_mask, run_data_command
from lmf.testing.char_tokenizer import build_char_tokenizer


def test_render_with_mask():
    tok = build_char_tokenizer()
    ids = [ord(c) for c in "abcd"]
    assert render_with_mask(tok, ids, [-100, -100, ord("c"), ord("d")]) == "ab[[cd]]"
    assert render_with_mask(tok, ids, [ord("a"), -100, ord("c"), -100]) == "[[a]]b[[c]]d"


def test_data_check_prints_counts_stats_and_masked_sample(tmp_path, demo_data_dir, tiny_model_dir, capsys):
    args = ["check", f"model_name_or_path={tiny_model_dir}", f"dataset_dir={demo_data_dir}",
            "dataset=identity,alpaca_en_demo", "template=qwen", "max_samples=10",
            f"preprocessing_cache_dir={tmp_path}/cache"]
    assert run_data_command(args) == 0
    out = capsys.readouterr().out
    assert "stage: sft  template: qwen  cutoff_len: 2048" in out
    assert "dataset identity: 10 records" in out and "dataset alpaca_en_demo: 10 records" in out
    assert "skipped malformed records: 0" in out
    assert "label tokens:" in out and "length min/mean/max:" in out
    assert "[[Hello! I am {{name}}, an AI assistant developed by {{author}}." in out
    assert "cache: built" in out
    assert run_data_command(args) == 0
    assert "cache: hit" in capsys.readouterr().out
    assert run_data_command(args + ["cutoff_len=1024", "packing=true"]) == 0
    out = capsys.readouterr().out
    assert "packing:" in out and "samples/sequence, padding waste" in out


def test_data_check_cli_reports_bad_record(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.json").write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q"}]))
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_dir: {data}\ndataset: d\ntemplate: qwen\n"
                   f"preprocessing_cache_dir: {tmp_path}/cache\n")
    from lmf.testing.cli import run_lmf

    proc = run_lmf("data", "check", str(cfg))
    assert proc.returncode == 1
    assert "record 1: field 'output' is missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = run_lmf("data", "check", str(cfg), "skip_bad_records=true")
    assert ok.returncode == 0, ok.stderr
    assert "skipped malformed records: 1" in ok.stdout and "record 1: field 'output' is missing" in ok.stdout


def test_tokenized_path_saved_and_loaded(tmp_path, demo_data_dir, tiny_model_dir, capsys):
    tokenized = tmp_path / "tokenized"
    base = ["check", f"model_name_or_path={tiny_model_dir}", "template=qwen", f"tokenized_path={tokenized}",
            f"preprocessing_cache_dir={tmp_path}/cache"]
    assert run_data_command(base + [f"dataset_dir={demo_data_dir}", "dataset=identity", "max_samples=5"]) == 0
    assert (tokenized / "train").is_dir() and (tokenized / "stats.json").is_file()
    capsys.readouterr()
    # the second run needs no dataset at all
    assert run_data_command(base) == 0
    out = capsys.readouterr().out
    assert "cache: tokenized_path" in out and "train samples: 5" in out
