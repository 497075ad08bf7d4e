"""Damaged checkpoints are skipped on resume (manifest), and a full disk is one line, not a zip-writer assert."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from _train_helpers import losses, make_config, train_tiny
from test_e2e_sft import DEMO, REPO_ROOT

from lmf.extras.errors import ConfigError, LmfError
from lmf.train import checkpoint as ckpt
from lmf.train.durable import MANIFEST_NAME, check_free_space, verify, write_manifest
from lmf.train.resume import decide_resume

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs


def _log_lines(fn):
    """Run ``fn``; return its result and what lmf's training logger wrote meanwhile."""
    from conftest import log_records

    with log_records("lmf.train") as records:
        result = fn()
    return result, "\n".join(r.getMessage() for r in records)


def test_manifest_names_the_truncated_missing_or_changed_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text("{}")
    write_manifest(str(tmp_path))
    assert verify(str(tmp_path)) is None
    with open(tmp_path / "a.bin", "r+b") as fh:
        fh.write(b"y")  # same size, other bytes
    assert "a.bin does not hold what was written" in verify(str(tmp_path))
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    assert "a.bin has 10 bytes, 1000 were written" in verify(str(tmp_path))
    (tmp_path / "sub" / "b.json").unlink()
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    assert verify(str(tmp_path)).endswith("b.json is missing")
    (tmp_path / MANIFEST_NAME).write_text("{trunc")
    assert "unreadable" in verify(str(tmp_path))


@pytest.fixture(scope="module")
def unfinished_run(tiny_model_dir, tmp_path_factory):
    """3 steps saved every step, then the final trainer_state.json removed: an unfinished run to relaunch."""
    out = str(tmp_path_factory.mktemp("unfinished") / "run")
    _, state = train_tiny(make_config(tiny_model_dir, out, max_steps=3, save_steps=1))
    os.remove(os.path.join(out, "trainer_state.json"))
    return out, losses(state)


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


@pytest.mark.parametrize("damaged_file", ["adapter_model.safetensors", "optimizer.pt", "rng_state_0.pth",
                                          "trainer_state.json"])
def test_resume_skips_a_damaged_newest_checkpoint_and_moves_it_aside(unfinished_run, tiny_model_dir, tmp_path,
                                                                     damaged_file):
    src, reference = unfinished_run
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    bad = os.path.join(out, "checkpoint-3", damaged_file)
    _truncate(bad)
    (_, state), log = _log_lines(lambda: train_tiny(make_config(tiny_model_dir, out, max_steps=3, save_steps=1)))
    assert f"skipping damaged checkpoint {os.path.join(out, 'checkpoint-3')}: {bad} has" in log, log
    assert "resuming from" in log and "checkpoint-2" in log
    assert losses(state) == reference  # resumed exactly from checkpoint-2
    (previous,) = os.listdir(os.path.join(out, ".previous"))
    moved = os.path.join(out, ".previous", previous, "checkpoint-3")
    assert os.path.isfile(os.path.join(moved, damaged_file))  # kept, never deleted
    assert verify(os.path.join(out, "checkpoint-3")) is None  # rewritten by the resumed run


def test_a_named_damaged_checkpoint_is_refused_naming_the_file(unfinished_run, tiny_model_dir, tmp_path):
    src, _ = unfinished_run
    ck = str(tmp_path / "checkpoint-2")
    shutil.copytree(os.path.join(src, "checkpoint-2"), ck)
    _truncate(os.path.join(ck, "optimizer.pt"))
    cfg = make_config(tiny_model_dir, str(tmp_path / "o"), resume_from_checkpoint=ck)
    with pytest.raises(ConfigError, match=r"'resume_from_checkpoint': .* is damaged: .*optimizer.pt has"):
        decide_resume(cfg)


def test_all_checkpoints_damaged_is_an_error_that_changes_nothing(unfinished_run, tiny_model_dir, tmp_path):
    src, _ = unfinished_run
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    for step in (1, 2, 3):
        _truncate(os.path.join(out, f"checkpoint-{step}", "optimizer.pt"))
    before = sorted(os.listdir(out))
    with pytest.raises(ConfigError, match="none of them intact .*optimizer.pt has"):
        decide_resume(make_config(tiny_model_dir, out, max_steps=3, save_steps=1))
    assert sorted(os.listdir(out)) == before


def test_a_checkpoint_without_manifest_still_resumes(unfinished_run, tiny_model_dir, tmp_path):
    src, _ = unfinished_run
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    for step in (1, 2, 3):
        os.remove(os.path.join(out, f"checkpoint-{step}", MANIFEST_NAME))  # written before manifests existed
    assert ckpt.checkpoint_problem(os.path.join(out, "checkpoint-3")) is None
    assert decide_resume(make_config(tiny_model_dir, out, max_steps=3, save_steps=1)).checkpoint.endswith("checkpoint-3")


def test_free_space_check_says_what_is_needed(tmp_path):
    check_free_space(str(tmp_path), 1)
    with pytest.raises(LmfError, match=r"no space left on device for a save into .* free, the checkpoint needs ~"):
        check_free_space(str(tmp_path), 1 << 60)


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


NEEDS_TMPFS = pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` and a tmpfs mount (user namespaces)")


def _in_small_tmpfs(disk, size_k: int, command: str, cwd=REPO_ROOT, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("FORCE_TORCHRUN", None)
    script = f"mount -t tmpfs -o size={size_k}k tmpfs {disk} && {command}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@NEEDS_TMPFS
def test_disk_full_while_writing_names_the_file_and_removes_the_partial_save(tmp_path):
    """A real ENOSPC inside torch.save (the zip writer's 'unexpected pos' assert): one line, tmp dir gone."""
    disk = tmp_path / "disk"
    disk.mkdir()
    code = ("import os, types, torch; from lmf.train.durable import RankZeroSave\n"
            f"out = '{disk}/o'\n"
            "save = RankZeroSave(types.SimpleNamespace(is_main=True, is_writer=True, writers_per_node=False), out, 'checkpoint-5', out + '/checkpoint-5')\n"
            "try:\n"
            "    save.step(lambda tmp: torch.save({'w': torch.zeros(300_000)}, os.path.join(tmp, 'optimizer.pt')))\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n"
            "print(sorted(os.listdir(out)))\n")
    proc = _in_small_tmpfs(disk, 512, f"{sys.executable} -c \"{code}\"")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, listing = proc.stdout.strip().split("\n")
    assert first.startswith(f"LmfError no space left on device while writing {disk}/o/checkpoint-5/optimizer.pt ("), first
    assert listing == "[]"


@NEEDS_TMPFS
def test_disk_full_before_a_save_is_one_line_and_keeps_earlier_checkpoints(tmp_path):
    """A 1000 KiB tmpfs holds two ~380 KiB checkpoints; the third save is refused before it writes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "o"
    command = (f"{sys.executable} -c 'from lmf.launcher import launch; launch()' sft {DEMO} output_dir={out} "
               f"max_steps=6 save_steps=1 && exit 0; rc=$?; ls -a {out} > {tmp_path}/listing; "
               f"{sys.executable} -c 'import sys; from lmf.train.durable import verify; "
               f"[print(p, verify(p)) for p in sys.argv[1:]]' {out}/checkpoint-* > {tmp_path}/verified; exit $rc")
    proc = _in_small_tmpfs(disk, 1000, command)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmf: error:")]
    assert f"no space left on device for a save into {out}/checkpoint-3 (" in line, line
    assert "free, the checkpoint needs ~0.4 MiB" in line, line
    listing = (tmp_path / "listing").read_text().split()
    assert not [n for n in listing if n.startswith(".tmp-")], listing  # nothing partial left
    verified = (tmp_path / "verified").read_text().splitlines()
    assert [v.split()[0].rsplit("/", 1)[1] for v in verified] == ["checkpoint-1", "checkpoint-2"]
    assert all(v.endswith(" None") for v in verified)  # complete, and every file matches its manifest
