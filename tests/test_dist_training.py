"""Real multi-process training through the `lmf` CLI (gloo, loopback): DDP, FSDP2, multi-node, elastic restart.

Every run trains the session's tiny Qwen3 model with LoRA on 16 demo rows for 4 optimizer steps with
the same *global* batch (4 rows) and the data in file order, so each distributed run must end with
the adapter of the single-process reference run (up to float reduction order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from lmf.torchrun import find_available_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTER = "adapter_model.safetensors"
MAX_STEPS = 4
# Generous wall-clock limits: the CI box has 2 cores shared with other jobs; a hang would hit these.
RUN_TIMEOUT_S = 300

pytestmark = pytest.mark.slow

_SCRUBBED_ENV = (
    "FORCE_TORCHRUN", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "MAX_RESTARTS", "RDZV_ID",
    "MIN_NNODES", "MAX_NNODES", "USE_RAY", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "LMF_TEST_KILL_AT_STEP", "LMF_TEST_KILL_DURING_SAVE", "LMF_TEST_KILL_RANK", "LMF_FINGERPRINT_OVERRIDE",
    "TORCHELASTIC_RESTART_COUNT",
)


def base_config(model_dir: str, output_dir: str, **overrides) -> dict:
    cfg = {
        "model_name_or_path": model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 4, "lora_target": "all", "dataset_dir": os.path.join(REPO_ROOT, "examples", "data"),
        "dataset": "alpaca_en_demo", "template": "qwen", "cutoff_len": 48, "max_samples": 16,
        "preprocessing_num_workers": 1, "output_dir": output_dir, "logging_steps": 1, "save_steps": 100,
        "report_to": "none", "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-2, "max_steps": MAX_STEPS, "disable_shuffling": True, "disable_tqdm": True, "seed": 42,
        "plot_loss": False,
    }
    cfg.update(overrides)
    return cfg


def write_config(path, cfg: dict) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return str(path)


def lmf_env(cache_dir, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", LMF_CACHE=str(cache_dir))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_lmf(config_path: str, env: dict, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmf", "sft", config_path, *overrides], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"lmf did not finish within {timeout}s (hang?):\n{out[-4000:]}")
    return proc.returncode, out, time.monotonic() - start


def run_lmf(config_path: str, env: dict, *overrides: str) -> tuple[int, str, float]:
    return finish(start_lmf(config_path, env, *overrides))


def load_adapter(output_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, ADAPTER))


def assert_same_adapter(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"adapters differ by {worst}"


def read_state(output_dir) -> dict:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as fh:
        return json.load(fh)


def assert_finished_cleanly(output_dir, world_size: int) -> dict:
    """Finished after MAX_STEPS steps, every step logged once, a complete final checkpoint, no temp dirs."""
    state = read_state(output_dir)
    assert state["finished"] is True and state["global_step"] == MAX_STEPS
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, MAX_STEPS + 1))
    final_ckpt = os.path.join(output_dir, f"checkpoint-{MAX_STEPS}")
    names = set(os.listdir(final_ckpt))
    assert {ADAPTER, "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names
    assert {f"rng_state_{r}.pth" for r in range(world_size)} <= names  # gathered and written by rank 0
    leftovers = [n for n in os.listdir(output_dir) if n.startswith(".tmp")]
    assert not leftovers, leftovers
    return state


@pytest.fixture(scope="module")
def dist_cache(tmp_path_factory):
    """One preprocessing cache for the module (the env var keeps it out of the config hash)."""
    return tmp_path_factory.mktemp("dist_cache")


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory, dist_cache):
    """Single process, micro-batch 4: the adapter every distributed run must reproduce."""
    root = tmp_path_factory.mktemp("single")
    out = str(root / "out")
    cfg = write_config(root / "cfg.yaml", base_config(tiny_model_dir, out))
    rc, log, _ = run_lmf(cfg, lmf_env(dist_cache))
    assert rc == 0, log[-4000:]
    assert "torchrun" not in log
    adapter = load_adapter(out)
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max().item() > 0 for v in lora_b)  # training moved the zero-initialised B
    return {"out": out, "adapter": adapter, "state": read_state(out)}


def _same_losses(state: dict, ref_state: dict) -> None:
    got = [h["loss"] for h in state["log_history"] if "loss" in h]
    want = [h["loss"] for h in ref_state["log_history"] if "loss" in h]
    assert got == pytest.approx(want, abs=1e-4)


PARALLEL_CONFIGS = {
    "ddp": {},
    "fsdp": {"fsdp": "full_shard"},
    # HSDP on a 2-D mesh: one shard group of 2 (as full_shard), or 2 replicas of 1 (parameters replicated)
    "hsdp": {"fsdp": "hybrid_shard auto_wrap"},
    "hsdp-replicate": {"fsdp": "hybrid_shard", "fsdp_config": {"hybrid_shard_size": 1}},
}


@pytest.mark.parametrize("variant", sorted(PARALLEL_CONFIGS))
def test_two_processes_match_single_process(variant, reference_run, tiny_model_dir, tmp_path, dist_cache):
    """FORCE_TORCHRUN=1 NPROC_PER_NODE=2: 2 ranks x micro-batch 2 == 1 process x micro-batch 4; rank 0 alone writes."""
    out = str(tmp_path / "out")
    extra = PARALLEL_CONFIGS[variant]
    parallel = "ddp" if variant == "ddp" else "fsdp"
    cfg = write_config(tmp_path / "cfg.yaml", base_config(tiny_model_dir, out, per_device_train_batch_size=2, **extra))
    env = lmf_env(dist_cache, FORCE_TORCHRUN=1, NPROC_PER_NODE=2, LMF_LOG_ALL_RANKS=1)
    rc, log, elapsed = run_lmf(cfg, env)
    assert rc == 0, log[-4000:]
    assert "launching 2 process(es) per node through torchrun" in log
    assert f"parallel={parallel}" in log
    assert "environment fingerprint identical on all 2 ranks" in log
    # every write happens in a rank-0-only branch that logs "saved ..."; rank 1 logs at INFO here too, but never saves
    saved = [line for line in log.splitlines() if " INFO lmf.train.checkpoint: saved " in line]
    assert saved and all("[rank0]" in line for line in saved), saved
    state = assert_finished_cleanly(out, world_size=2)
    assert state["world_size"] == 2
    _same_losses(state, reference_run["state"])
    assert_same_adapter(load_adapter(out), reference_run["adapter"])
    if variant.startswith("hsdp"):
        assert "device mesh" in log and ("replicated 2 time(s)" in log) == (variant == "hsdp-replicate")
    print(f"{variant} 2-process run: {elapsed:.1f}s")


def test_two_launchers_form_one_multi_node_job(reference_run, tiny_model_dir, tmp_path, dist_cache):
    """NNODES=2 NODE_RANK=0|1 MASTER_ADDR=127.0.0.1 MASTER_PORT=P, one process each: one 2-rank job."""
    out = str(tmp_path / "out")
    cfg = write_config(tmp_path / "cfg.yaml", base_config(tiny_model_dir, out, per_device_train_batch_size=2))
    port = find_available_port()
    procs = []
    for node_rank in (0, 1):
        env = lmf_env(dist_cache, NNODES=2, NODE_RANK=node_rank, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
        procs.append(start_lmf(cfg, env))
    results = [finish(p) for p in procs]
    for node_rank, (rc, log, _) in enumerate(results):
        assert rc == 0, f"node {node_rank}:\n{log[-4000:]}"
        assert f"multi-node training: 2 nodes, this is node {node_rank}" in log
    node0_log = results[0][1]
    assert "environment fingerprint identical on all 2 ranks" in node0_log
    assert "saved the adapter" in node0_log and "saved the adapter" not in results[1][1]  # only global rank 0 writes
    state = assert_finished_cleanly(out, world_size=2)
    assert state["world_size"] == 2
    assert_same_adapter(load_adapter(out), reference_run["adapter"])


def _elastic_env(cache, **extra) -> dict:
    return lmf_env(cache, NPROC_PER_NODE=2, RDZV_ID=f"lmf-test-{os.getpid()}-{time.monotonic_ns()}", MAX_RESTARTS=1,
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=find_available_port(), **extra)


def test_elastic_restart_after_kill_resumes_from_newest_checkpoint(reference_run, tiny_model_dir, tmp_path, dist_cache):
    """kill -9 of rank 1 after step 3 (checkpoints every 2 steps): torchrun restarts the group, which resumes at 2."""
    out = str(tmp_path / "out")
    cfg = write_config(tmp_path / "cfg.yaml", base_config(tiny_model_dir, out, per_device_train_batch_size=2, save_steps=2))
    rc, log, elapsed = run_lmf(cfg, _elastic_env(dist_cache, LMF_TEST_KILL_AT_STEP=3, LMF_TEST_KILL_RANK=1))
    assert rc == 0, log[-6000:]
    assert "lmf test hook: rank 1 killing itself at step 3" in log
    assert log.count("killing itself") == 1  # the restarted group does not die again
    assert f"resuming from {os.path.join(out, 'checkpoint-2')}" in log, log[-6000:]
    assert "resumed from" in log and "at step 2" in log
    state = assert_finished_cleanly(out, world_size=2)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    # 4 optimizer steps in total, exactly as if nothing had happened
    _same_losses(state, reference_run["state"])
    assert_same_adapter(load_adapter(out), reference_run["adapter"])
    print(f"elastic kill/restart run: {elapsed:.1f}s")


def test_elastic_restart_after_kill_during_save_ignores_the_half_written_checkpoint(
    reference_run, tiny_model_dir, tmp_path, dist_cache
):
    """Rank 0 dies while writing checkpoint-2: the restart resumes from checkpoint-1 and removes the debris.

    Static rendezvous (no RDZV_ID) with MAX_RESTARTS=1: torchrun's agent store outlives the dead group,
    so the restarted group must use a fresh key space (``runtime.restart_attempt_store``).
    """
    out = str(tmp_path / "out")
    cfg = write_config(tmp_path / "cfg.yaml", base_config(tiny_model_dir, out, per_device_train_batch_size=2, save_steps=1,
                                                          save_total_limit=2))
    env = lmf_env(dist_cache, FORCE_TORCHRUN=1, NPROC_PER_NODE=2, MAX_RESTARTS=1, LMF_TEST_KILL_DURING_SAVE=2,
                  LMF_TEST_KILL_RANK=0)
    rc, log, _ = run_lmf(cfg, env)
    assert rc == 0, log[-6000:]
    assert "lmf test hook: rank 0 killing itself at save 2" in log
    assert "torchrun restart 1: using a fresh rendezvous key space" in log
    assert "removing an incomplete save left by an interrupted run" in log and ".tmp-checkpoint-2-" in log
    assert f"resuming from {os.path.join(out, 'checkpoint-1')}" in log
    assert_finished_cleanly(out, world_size=2)
    _same_losses(read_state(out), reference_run["state"])
    assert_same_adapter(load_adapter(out), reference_run["adapter"])


def test_dead_worker_without_restarts_fails_the_launcher_promptly(tiny_model_dir, tmp_path, dist_cache):
    """MAX_RESTARTS=0: rank 1 is SIGKILLed after step 2; the job ends non-zero at once, nothing looks finished."""
    out = str(tmp_path / "out")
    cfg = write_config(tmp_path / "cfg.yaml", base_config(tiny_model_dir, out, per_device_train_batch_size=2,
                                                          max_steps=50, ddp_timeout=600))
    env = lmf_env(dist_cache, FORCE_TORCHRUN=1, NPROC_PER_NODE=2, LMF_TEST_KILL_AT_STEP=2, LMF_TEST_KILL_RANK=1)
    proc = start_lmf(cfg, env)
    rc, log, _ = finish(proc)
    assert rc != 0
    assert "lmf test hook: rank 1 killing itself at step 2" in log
    after_kill = log.split("killing itself", 1)[1]
    # the launcher names the killed worker in one line (not torchrun's ChildFailedError traceback)
    assert "lmf: worker rank 1 (local rank 1, pid " in after_kill and "died without reporting: signal SIGKILL" in after_kill
    assert "Traceback" not in after_kill
    # the job ended long before ddp_timeout (600 s) and far from max_steps
    assert "step=10 " not in log
    assert not os.path.exists(os.path.join(out, "trainer_state.json"))
