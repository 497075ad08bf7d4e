"""Audio (Qwen2-Audio): decoding and resampling, token counts as the feature extractor masks them, malformed
records, training end to end (LoRA learns, full keeps the audio tower frozen, the clips reach the loss), chat,
prediction, export and the API's ``input_audio`` parts. Tokens and features equal to LLaMA-Factory's on its
mllm_audio_demo are checked in test_vision.py (the golden)."""

from __future__ import annotations

import importlib
import json
import math
import os
import wave

import numpy as np
import pytest

from test_e2e_sft import history
from test_vision_train import FAST, TWO_PROCS, _cli

pytest.importorskip("av")
#: Qwen2-Audio's model class has the layout lmf drives (Qwen2AudioModel) from transformers 5.10 (older: refused, tested)
_MODELING = importlib.import_module("transformers.models.qwen2_audio.modeling_qwen2_audio")
needs_model = pytest.mark.skipif(not hasattr(_MODELING, "Qwen2AudioModel"), reason="Qwen2-Audio: transformers 5.10")
RECORDS = [("<audio>What is this tone?", "A low hum."), ("What do you hear in <audio>?", "A high whistle."),
           ("<audio>Describe it.", "Two notes.")]


def write_wav(path, seconds: float, rate: int = 22050, freq: float = 440.0, channels: int = 1) -> str:
    """A 16-bit PCM tone (``channels`` > 1: the second channel at half the amplitude, inverted)."""
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * freq * t)
    columns = [tone] + [-0.5 * tone] * (channels - 1)
    pcm = (np.stack(columns, axis=1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(channels)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(pcm.tobytes())
    return str(path)


def write_dataset(folder, records=None, count: int = len(RECORDS)) -> str:
    """``folder`` with audio_demo.json (sharegpt, an ``audios`` column) and its ``count`` clips."""
    os.makedirs(folder / "clips", exist_ok=True)
    rows = []
    for i, (question, answer) in enumerate(RECORDS[i % len(RECORDS)] for i in range(count)):
        clip = write_wav(folder / "clips" / f"{i}.wav", 0.6 + 0.4 * i, freq=220.0 * (i + 1), channels=1 + i % 2)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                     "audios": [os.path.relpath(clip, folder)]})
    (folder / "audio_demo.json").write_text(json.dumps(records if records is not None else rows))
    info = {"audio_demo": {"file_name": "audio_demo.json", "formatting": "sharegpt",
                           "columns": {"messages": "messages", "audios": "audios"},
                           "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                    "assistant_tag": "assistant"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return str(folder)


@pytest.fixture(scope="module")
def audio_lm(tmp_path_factory) -> dict:
    """A tiny random-init Qwen2-Audio (local tokenizer) and the audio_demo data, built once per test run."""
    from conftest import build_once
    from lmf.testing.tiny_vlm import build_tiny_vlm

    def build(root):
        build_tiny_vlm(str(root / "model"), "qwen2_audio")
        write_dataset(root / "data")

    root = build_once(tmp_path_factory, "audio-lm", build)
    return {"model": str(root / "model"), "data": str(root / "data")}


def _cfg(audio_lm, **keys):
    from lmf.config import get_config

    args = dict(model_name_or_path=audio_lm["model"], stage="sft", do_train=True, template="qwen2_audio",
                dataset="audio_demo", dataset_dir=audio_lm["data"], output_dir="unused", report_to="none",
                overwrite_cache=True)
    args.update(keys)
    return get_config([f"{k}={v}" for k, v in args.items()])


# --- decoding, resampling, counting ------------------------------------------------------------------------------

def test_resampling_keeps_a_tone_and_gives_torchaudios_length():
    import torch

    from lmf.data.media.audios import resample

    t = torch.arange(44100, dtype=torch.float64) / 44100
    out = resample(torch.sin(2 * math.pi * 440 * t).float()[None], 44100, 16000)
    assert out.shape == (1, 16000)  # ceil(44100 x 160 / 441)
    expected = torch.sin(2 * math.pi * 440 * torch.arange(16000, dtype=torch.float64) / 16000).float()
    assert (out[0, 200:-200] - expected[200:-200]).abs().max() < 5e-3  # away from the zero-padded edges
    odd = resample(torch.ones(2, 3, 1001), 22050, 16000)
    assert odd.shape == (2, 3, math.ceil(1001 * 320 / 441))
    same = torch.randn(5)
    assert resample(same, 16000, 16000) is same


def test_a_stereo_clip_is_averaged_and_resampled(tmp_path):
    from lmf.data.media.audios import decode, load_audio

    path = write_wav(tmp_path / "stereo.wav", 0.5, rate=16000, channels=2)
    samples, rate = decode(path)
    assert samples.shape == (2, 8000) and rate == 16000
    mono = load_audio(path, 16000)
    assert np.allclose(mono, samples.mean(axis=0), atol=1e-6) and np.abs(mono).max() < 0.26
    assert len(load_audio(write_wav(tmp_path / "low.wav", 0.5, rate=8000), 16000)) == 8000
    with pytest.raises(ValueError):
        mono[0] = 1.0  # shared between calls (cached): read-only


@pytest.mark.parametrize("seconds", [0.05, 1.0, 3.21, 31.0])
def test_audio_tokens_are_what_the_feature_extractor_and_the_encoder_count(tmp_path, audio_lm, seconds):
    import torch
    from transformers import AutoConfig

    from lmf.data.media.qwen_audio import audio_tokens
    from lmf.data.template import template_from_args
    from lmf.model.loader import load_tokenizer
    from lmf.train.workflow import load_media_plugin

    cfg = _cfg(audio_lm)
    tokenizer = load_tokenizer(cfg.model)
    media = load_media_plugin(cfg, template_from_args(cfg.data, tokenizer), tokenizer)
    clip = write_wav(tmp_path / "clip.wav", seconds, rate=16000)
    inputs = media.audio_inputs([clip])
    frames = int(inputs["feature_attention_mask"].sum())
    assert media.mel_frames(clip) == frames and inputs["input_features"].shape == (1, 128, 3000)
    text = media.audio_text(clip)
    count = text.count("<|AUDIO|>")
    assert text == "<|audio_bos|>" + "<|AUDIO|>" * count + "<|audio_eos|>" and count == audio_tokens(frames)
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    encoder = Qwen2AudioEncoder(AutoConfig.from_pretrained(audio_lm["model"]).audio_config)
    assert int(encoder._get_feat_extract_output_lengths(torch.tensor([frames]))[1]) == count
    assert media.expected_tokens(inputs, 1) == count


def test_audio_sampling_rate_other_than_the_feature_extractors_is_refused(audio_lm):
    from lmf.extras.errors import ConfigError
    from lmf.train.workflow import load_tokenizer_and_data

    with pytest.raises(ConfigError, match="audio_sampling_rate.*22050.*16000"):
        load_tokenizer_and_data(_cfg(audio_lm, audio_sampling_rate=22050), "sft")


def test_qwen2_audio_under_a_transformers_without_its_base_model_is_refused_by_version(audio_lm, monkeypatch):
    import transformers
    from transformers import AutoConfig

    from lmf.extras.errors import NotAvailableError
    from lmf.model.vision import composite_of

    config = AutoConfig.from_pretrained(audio_lm["model"])
    monkeypatch.setattr(transformers, "__version__", "5.9.0")
    with pytest.raises(NotAvailableError, match=r"qwen2_audio models need transformers >= 5.10.*Qwen2AudioModel.*5\.9\.0"):
        composite_of(config)


# --- malformed records --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    (lambda r, d: r[1].update(audios=["clips/missing.wav"]), r"record 1.*field 'audios'\[0\].*not found"),
    (lambda r, d: r[0].update(audios=r[0]["audios"] * 2), r"record 0.*2 audio file\(s\) but 1 <audio>"),
    (lambda r, d: (d / "clips" / "0.wav").write_bytes(b"RIFF not really a wav"), r"record 0.*cannot be read"),
])
def test_a_bad_audio_record_names_file_record_and_field_or_is_skipped(tmp_path, audio_lm, change, message):
    from lmf.extras.errors import DataError
    from lmf.train.workflow import load_tokenizer_and_data

    folder = tmp_path / "data"
    write_dataset(folder)
    records = json.loads((folder / "audio_demo.json").read_text())
    change(records, folder)
    (folder / "audio_demo.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=message):
        load_tokenizer_and_data(_cfg(audio_lm, dataset_dir=str(folder)), "sft")
    _, _, data = load_tokenizer_and_data(_cfg(audio_lm, dataset_dir=str(folder), skip_bad_records=True), "sft")
    assert len(data.train_dataset) == 2


def test_a_cutoff_through_the_audio_tokens_drops_the_sample_and_says_which(audio_lm, caplog):
    from lmf.train.workflow import load_tokenizer_and_data

    tokenizer, _, whole = load_tokenizer_and_data(_cfg(audio_lm), "sft")
    eos = tokenizer.convert_tokens_to_ids("<|audio_eos|>")
    assert [row["input_ids"].index(eos) for row in whole.train_dataset] == [35, 52, 55]  # clips of 0.6, 1.0, 1.4 s
    _, _, data = load_tokenizer_and_data(_cfg(audio_lm, cutoff_len=48), "sft")  # cuts through the last two clips
    assert len(data.train_dataset) == 1 and eos in data.train_dataset[0]["input_ids"]  # its answer cut, not the clip
    assert "dropped 2 sample(s) whose media tokens do not match" in caplog.text and "sample index 1, 2)" in caplog.text


# --- training, serving --------------------------------------------------------------------------------------------

@needs_model
def test_lora_sft_on_audio_learns_predicts_and_the_adapter_answers_a_clip(tmp_path, audio_lm):
    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config

    out = tmp_path / "lora"
    common = (f"model_name_or_path={audio_lm['model']}", "template=qwen2_audio", f"dataset_dir={audio_lm['data']}",
              "finetuning_type=lora")
    proc = _cli("sft", *common, "dataset=audio_demo", "stage=sft", "do_train=true", f"output_dir={out}", "max_steps=12",
                "learning_rate=1e-2", "per_device_train_batch_size=3", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [h["loss"] for h in history(out) if "loss" in h]
    assert len(losses) == 12 and losses[-1] < 0.9 * losses[0]
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert targets and all("language_model" in t for t in targets)  # the audio tower stays frozen
    pred = tmp_path / "pred"
    proc = _cli("sft", *common, "eval_dataset=audio_demo", "stage=sft", "do_predict=true", "predict_with_generate=true",
                f"adapter_name_or_path={out}", f"output_dir={pred}", "max_new_tokens=4", "do_sample=false", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((pred / "generated_predictions.jsonl").read_text().splitlines()) == 3
    engine = create_engine(load_serving_config(["--model", audio_lm["model"], "--adapter", str(out), "--template",
                                                "qwen2_audio", "max_new_tokens=3", "do_sample=false"]))
    clip = os.path.join(audio_lm["data"], "clips", "1.wav")
    with_audio = engine.chat([{"role": "user", "content": "<audio>What is it?"}], audios=[clip])
    text_only = engine.chat([{"role": "user", "content": "What is it?"}])
    assert with_audio.prompt_tokens > text_only.prompt_tokens + 10 and with_audio.completion_tokens > 0
    from lmf.chat.engine import MessageError

    with pytest.raises(MessageError, match="0 audio file\\(s\\) but 1 <audio>"):
        engine.chat([{"role": "user", "content": "<audio>What is it?"}])
    with pytest.raises(MessageError, match="images with Qwen2AudioPlugin"):
        engine.chat([{"role": "user", "content": "<image>What is it?"}],
                    images=[os.path.join(os.path.dirname(__file__), "..", "examples", "data", "mllm_demo_data",
                                         "1.jpg")])


@needs_model
def test_full_tuning_keeps_the_audio_tower_frozen_and_the_export_serves(tmp_path, audio_lm):
    import torch
    from transformers import AutoConfig

    from lmf.model.loader import auto_model_class

    out = tmp_path / "full"
    proc = _cli("sft", f"model_name_or_path={audio_lm['model']}", "template=qwen2_audio", "dataset=audio_demo",
                "stage=sft", "do_train=true", f"dataset_dir={audio_lm['data']}", "finetuning_type=full",
                f"output_dir={out}", "learning_rate=1e-2", "max_steps=2", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model_class = auto_model_class(AutoConfig.from_pretrained(str(out)))
    before, after = (model_class.from_pretrained(p).state_dict() for p in (audio_lm["model"], str(out)))
    tower = [k for k in before if "audio_tower" in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model.layers" in k)
    assert (out / "preprocessor_config.json").is_file()  # the feature extractor travels with the model


@needs_model
def test_the_audio_clips_reach_the_loss(audio_lm):
    import torch

    from lmf.data.collator import SFTCollator
    from lmf.dist.plan import ParallelPlan
    from lmf.model.loader import load_model
    from lmf.train.sft import SFTObjective
    from lmf.train.workflow import RecipeInputs, load_tokenizer_and_data

    cfg = _cfg(audio_lm)
    tokenizer, template, data = load_tokenizer_and_data(cfg, "sft")
    model = load_model(cfg, tokenizer, is_trainable=True)
    setup = RecipeInputs(cfg, None, ParallelPlan("single"), tokenizer, template, model, data.train_dataset, None,
                         data.media)
    stage = SFTObjective(cfg, model, setup.collate(SFTCollator(tokenizer)))
    batch = stage.collator([data.train_dataset[i] for i in range(3)])
    assert batch["mm_inputs"]["input_features"].shape == (3, 128, 3000)
    loss, tokens, _ = stage.compute_loss(model, batch)
    silent = dict(batch, mm_inputs=dict(batch["mm_inputs"],
                                        input_features=torch.zeros_like(batch["mm_inputs"]["input_features"])))
    assert tokens > 0 and not torch.allclose(loss, stage.compute_loss(model, silent)[0])


@needs_model
def test_api_takes_input_audio_parts_and_refuses_bad_ones(audio_lm):
    import base64

    import httpx

    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config
    from test_api import serve

    engine = create_engine(load_serving_config(["--model", audio_lm["model"], "--template", "qwen2_audio",
                                                "max_new_tokens=4", "do_sample=false"]))
    clip = os.path.join(audio_lm["data"], "clips", "2.wav")
    expected = engine.chat([{"role": "user", "content": "<audio>What is it?"}], audios=[clip]).text
    data = base64.b64encode(open(clip, "rb").read()).decode()

    def ask(url, part):
        return httpx.post(f"{url}/chat/completions", timeout=60, json={"model": engine.model_name, "messages": [
            {"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]})

    with serve(engine, max_body_mb=4) as url:
        reply = ask(url, {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected
        bad = ask(url, {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}})
        assert bad.status_code == 400 and "input_audio.data is not valid base64" in bad.text
        odd = ask(url, {"type": "input_audio", "input_audio": {"data": data, "format": "../x"}})
        assert odd.status_code == 400 and "input_audio.format" in odd.text
        junk = ask(url, {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"noise").decode(),
                                                                 "format": "mp3"}})
        assert junk.status_code == 400 and "audio 0: audio file" in junk.text


@needs_model
def test_chat_session_attaches_audio_with_the_audio_command(audio_lm, tmp_path):
    import io

    from lmf.chat import create_engine
    from lmf.chat.cli import chat_loop
    from lmf.chat.options import load_serving_config

    engine = create_engine(load_serving_config(["--model", audio_lm["model"], "--template", "qwen2_audio",
                                                "max_new_tokens=2", "do_sample=false"]))
    clip = os.path.join(audio_lm["data"], "clips", "0.wav")
    out, err = io.StringIO(), io.StringIO()
    chat_loop(engine, io.StringIO(f"/audio {clip}\nWhat is it?\n/audio {tmp_path}/none.wav\nexit\n"), out, err)
    assert "Audio attached to the next message (1)." in err.getvalue()
    assert "Assistant: " in out.getvalue()
    assert "audio 0: audio file" in err.getvalue() and "not found" in err.getvalue()


@needs_model
@pytest.mark.slow
def test_two_process_fsdp2_trains_audio_like_one_process(tmp_path, audio_lm):
    data = write_dataset(tmp_path / "data", count=8)
    common = (f"model_name_or_path={audio_lm['model']}", "template=qwen2_audio", "dataset=audio_demo", "stage=sft",
              "do_train=true", f"dataset_dir={data}", "finetuning_type=lora", "learning_rate=5e-3", "max_steps=2",
              "logging_steps=1", "disable_tqdm=true", "report_to=none", "dataloader_num_workers=0")
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"  # DDP: the image/video test's (same collator path)
    p1 = _cli("sft", *common, f"output_dir={single}", "gradient_accumulation_steps=4")
    assert p1.returncode == 0, p1.stderr[-3000:]
    p3 = _cli("sft", *common, f"output_dir={fsdp}", "gradient_accumulation_steps=2", "fsdp=full_shard",
              env_extra=TWO_PROCS)
    assert p3.returncode == 0 and "parallel=fsdp" in p3.stderr, p3.stderr[-3000:]
    reference = [h["loss"] for h in history(single) if "loss" in h]
    assert len(reference) == 2
    assert [h["loss"] for h in history(fsdp) if "loss" in h] == pytest.approx(reference, rel=1e-4)
