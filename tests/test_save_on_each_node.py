"""save_on_each_node: two "nodes" (one process each, NNODES=2 on loopback) without a shared filesystem, simulated by
running each node in its own working directory with a relative output_dir: each node's local rank 0 writes its own
checkpoints and final adapter, a relaunch resumes from each node's own copy, and nodes whose copies disagree (a save
that completed on one node only) stop with a message naming both and the checkpoint they share."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from lmf.torchrun import find_available_port
from tests.test_dist_training import (
    assert_same_adapter,
    base_config,
    finish,
    lmf_env,
    load_adapter,
    read_state,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("each_node_cache")


def _run_two_nodes(tmp_path, cache, *overrides: str) -> list[tuple[int, str]]:
    """Both nodes of one 2-rank job, each in tmp_path/node<N> (its own output_dir "out")."""
    port = find_available_port()
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        env = lmf_env(cache, NNODES=2, NODE_RANK=node, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "lmf", "sft", str(tmp_path / "cfg.yaml"), *overrides],
                                      env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [finish(p)[:2] for p in procs]


def _logs(runs) -> str:
    return "\n".join(f"node {node} (rc {rc}):\n{log[-3000:]}" for node, (rc, log) in enumerate(runs))


def test_each_node_writes_and_resumes_from_its_own_copy(tiny_model_dir, tmp_path, cache):
    write_config(tmp_path / "cfg.yaml", base_config(tiny_model_dir, "out", per_device_train_batch_size=2,
                                                    save_steps=2, save_on_each_node=True))
    runs = _run_two_nodes(tmp_path, cache)
    assert all(rc == 0 for rc, _ in runs), _logs(runs)
    outs = [tmp_path / f"node{n}" / "out" for n in (0, 1)]
    for out in outs:  # every node holds the whole run
        assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
        state = read_state(out)
        assert state["finished"] and state["global_step"] == 4
        assert sorted(n for n in os.listdir(out / "checkpoint-4") if n.startswith("rng_state")) == \
            ["rng_state_0.pth", "rng_state_1.pth"]
    first = load_adapter(outs[0])
    assert_same_adapter(load_adapter(outs[1]), first, atol=0)

    # a save that completed on node 0 only: the nodes disagree on where to resume, and say so
    shutil.rmtree(outs[1] / "checkpoint-4")
    runs = _run_two_nodes(tmp_path, cache, "resume_from_checkpoint=true")
    for node, (rc, log) in enumerate(runs):
        assert rc != 0, f"node {node}:\n{log[-3000:]}"
        assert "the nodes' output_dirs disagree" in log and "node 0: out/checkpoint-4" in log \
            and "node 1: out/checkpoint-2" in log and "set resume_from_checkpoint to out/checkpoint-2" in log, log[-3000:]
        assert "Traceback" not in log

    # resumed from the checkpoint both hold: each node's own copy, the same final adapter as the uninterrupted run
    runs = _run_two_nodes(tmp_path, cache, "resume_from_checkpoint=out/checkpoint-2")
    assert all(rc == 0 for rc, _ in runs), _logs(runs)
    assert "resuming from out/checkpoint-2" in runs[0][1]
    for out in outs:
        assert read_state(out)["global_step"] == 4
        assert_same_adapter(load_adapter(out), first)


def test_save_on_each_node_under_fsdp_is_refused_naming_both():
    from lmf.config.parser import build_config
    from lmf.dist.plan import plan_parallelism
    from lmf.extras.errors import ConfigError

    cfg = build_config({"model_name_or_path": "m", "save_on_each_node": True, "fsdp": "full_shard"})
    with pytest.raises(ConfigError, match="'save_on_each_node' under FSDP sharding"):
        plan_parallelism(cfg, 2)
    plan_parallelism(build_config({"model_name_or_path": "m", "save_on_each_node": True}), 2)  # DDP: fine
