"""Environment fingerprint: comparison/table logic, the test override, and a real 2-process gloo mismatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from lmf.dist.fingerprint import (
    EnvironmentMismatchError,
    check_consistency,
    collect_fingerprint,
    find_mismatches,
    format_mismatch_table,
    mismatch_message,
)
from lmf.extras.errors import LmfError
from lmf.torchrun import find_available_port

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

BASE = {
    "lmf": "0.1.0", "python": "3.11.9", "torch": "2.13.0", "cuda": "12.4", "nccl": "2.21.5",
    "transformers": "5.23.0", "peft": "0.21.2", "datasets": "5.2.0", "accelerate": "1.15.0",
    "deepspeed": "not installed", "config_hash": "abc", "host": "node-a",
}


def test_collect_fingerprint_has_every_compared_key(monkeypatch):
    monkeypatch.delenv("LMF_FINGERPRINT_OVERRIDE", raising=False)
    import torch

    from lmf import __version__

    fp = collect_fingerprint("cfg42")
    for key in ("lmf", "python", "torch", "cuda", "nccl", "transformers", "peft", "datasets", "accelerate",
                "deepspeed", "config_hash", "host"):
        assert key in fp, key
    assert fp["torch"] == torch.__version__
    assert fp["lmf"] == __version__
    assert fp["config_hash"] == "cfg42"
    assert all(isinstance(v, str) for v in fp.values())


def test_override_env_is_merged(monkeypatch):
    monkeypatch.setenv("LMF_FINGERPRINT_OVERRIDE", '{"torch": "9.9", "nccl": "1.0"}')
    fp = collect_fingerprint("h")
    assert fp["torch"] == "9.9" and fp["nccl"] == "1.0"


@pytest.mark.parametrize("raw", ["{not json", '["torch"]'])
def test_bad_override_is_a_clear_error(monkeypatch, raw):
    monkeypatch.setenv("LMF_FINGERPRINT_OVERRIDE", raw)
    with pytest.raises(LmfError, match="LMF_FINGERPRINT_OVERRIDE must be a JSON object"):
        collect_fingerprint("h")


def test_identical_fingerprints_have_no_mismatch():
    assert find_mismatches([dict(BASE), dict(BASE), dict(BASE)]) == []


def test_host_is_display_only():
    other = dict(BASE, host="node-b")
    assert find_mismatches([BASE, other]) == []


def test_mismatched_keys_are_found_and_sorted():
    other = dict(BASE, torch="2.5.1", deepspeed="0.16.0", host="node-b")
    third = dict(BASE, config_hash="zzz")
    assert find_mismatches([BASE, other, third]) == ["config_hash", "deepspeed", "torch"]


def test_missing_key_counts_as_a_difference():
    other = dict(BASE)
    del other["nccl"]
    assert find_mismatches([BASE, other]) == ["nccl"]


def test_table_has_one_row_per_rank_with_the_differing_values():
    fps = [BASE, dict(BASE, torch="9.9", host="node-b")]
    table = format_mismatch_table(fps, ["torch"])
    lines = table.splitlines()
    assert lines[1].split("|")[1:-1] == [" rank ", " host   ", " torch  "]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["0", "node-a", "2.13.0"]
    assert [c.strip() for c in lines[4].split("|")[1:-1]] == ["1", "node-b", "9.9"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert "transformers" not in table  # only differing keys are shown


def test_mismatch_message_names_keys_and_has_table():
    fps = [BASE, dict(BASE, torch="9.9", config_hash="other")]
    msg = mismatch_message(fps, find_mismatches(fps))
    assert "differing: config_hash, torch" in msg
    assert "9.9" in msg and "2.13.0" in msg and "| rank |" in msg


def test_single_process_check_returns_own_fingerprint(monkeypatch):
    monkeypatch.delenv("LMF_FINGERPRINT_OVERRIDE", raising=False)
    fps = check_consistency("hash1")
    assert len(fps) == 1 and fps[0]["config_hash"] == "hash1"


def test_mismatch_error_is_an_lmf_error():
    assert issubclass(EnvironmentMismatchError, LmfError)


WORKER = textwrap.dedent(
    """
    import sys
    from lmf.dist.runtime import init_distributed, destroy_distributed
    from lmf.dist.fingerprint import check_consistency
    from lmf.extras.errors import LmfError

    init_distributed(timeout_s=int(sys.argv[2]) if len(sys.argv) > 2 else 30)
    try:
        fps = check_consistency(sys.argv[1])
    except LmfError as exc:
        print(f"lmf: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    print("consistent", len(fps), flush=True)
    destroy_distributed()
    """
)


def _run_two_ranks(tmp_path, overrides: dict[int, str], hashes=("cfg", "cfg"), timeout_s: int = 30):
    script = tmp_path / "fp_worker.py"
    script.write_text(WORKER)
    port = str(find_available_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
        env.pop("LMF_FINGERPRINT_OVERRIDE", None)
        if rank in overrides:
            env["LMF_FINGERPRINT_OVERRIDE"] = overrides[rank]
        procs.append(subprocess.Popen([sys.executable, str(script), hashes[rank], str(timeout_s)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.mark.slow
def test_two_ranks_with_same_environment_pass(tmp_path):
    results = _run_two_ranks(tmp_path, {})
    for rc, out, err in results:
        assert rc == 0, err
        assert "consistent 2" in out


@pytest.mark.slow
def test_two_ranks_with_different_torch_both_fail_with_table(tmp_path):
    start = time.monotonic()
    results = _run_two_ranks(tmp_path, {1: json.dumps({"torch": "9.9"})})
    assert time.monotonic() - start < 45
    import torch

    for rank, (rc, out, err) in enumerate(results):
        assert rc != 0, f"rank {rank} should have failed:\n{err}"
        assert "do not share the same environment" in err, err
        assert "differing: torch" in err
        table_rows = [line for line in err.splitlines() if line.startswith("| ")]
        assert [c.strip() for c in table_rows[0].split("|")[1:-1]] == ["rank", "host", "torch"]
        assert [c.strip() for c in table_rows[1].split("|")[1:-1]][::2] == ["0", torch.__version__]
        assert [c.strip() for c in table_rows[2].split("|")[1:-1]][::2] == ["1", "9.9"]


@pytest.mark.slow
def test_a_rank_that_cannot_fingerprint_fails_every_rank_at_once(tmp_path):
    start = time.monotonic()
    results = _run_two_ranks(tmp_path, {1: "{broken json"}, timeout_s=300)
    assert time.monotonic() - start < 60  # rank 0 did not wait for the 300 s collective timeout
    for rc, _, err in results:
        assert rc != 0
        assert "could not compare the ranks' environments: rank 1: LMF_FINGERPRINT_OVERRIDE must be a JSON object" in err


@pytest.mark.slow
def test_two_ranks_with_different_config_fail(tmp_path):
    results = _run_two_ranks(tmp_path, {}, hashes=("aaa", "bbb"))
    for rc, _, err in results:
        assert rc != 0
        assert "differing: config_hash" in err and "aaa" in err and "bbb" in err


@pytest.mark.slow
def test_cli_multi_node_with_mismatched_node_fails_on_every_rank(tiny_model_dir, tmp_path):
    """Two `lmf sft` "nodes" (NNODES=2); node 1 reports another torch: both launchers exit non-zero with the table."""
    import yaml

    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name_or_path": tiny_model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset_dir": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data"),
        "dataset": "alpaca_en_demo", "template": "qwen", "max_samples": 8, "cutoff_len": 32, "output_dir": str(out),
        "max_steps": 1, "report_to": "none",
    }))
    port = str(find_available_port())
    procs = []
    for node in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("LMF_FINGERPRINT_OVERRIDE", "RDZV_ID", "FORCE_TORCHRUN")}
        env.update(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1", LMF_CACHE=str(tmp_path / "cache"))
        if node == 1:
            env["LMF_FINGERPRINT_OVERRIDE"] = json.dumps({"torch": "9.9"})
        procs.append(subprocess.Popen([sys.executable, "-m", "lmf", "sft", str(cfg)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for node, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode != 0, f"node {node} should have failed:\n{log[-3000:]}"
        assert "lmf: error: the 2 ranks of this job do not share the same environment (differing: torch)" in log, log[-3000:]
        assert "| 1    |" in log and "9.9" in log
    assert not out.exists() or not any(out.iterdir())  # failed before anything was written
