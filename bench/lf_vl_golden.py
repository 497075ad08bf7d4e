"""LLaMA-Factory 0.9.5's tokens, labels and pixel inputs of image data (and audio features): the golden file of
tests/test_vision.py.

    .venv/bin/python bench/lf_vl_golden.py build DIR        # the tiny families of FAMILIES
    bench/.lf-venv/bin/python bench/lf_vl_golden.py lf DIR tests/fixtures/lf_vision/golden.json
    LF_GOLDEN_CASES=a,b bench/.lf-venv/bin/python bench/lf_vl_golden.py lf DIR OUT.json   # those cases only

The ``lf`` side never imports lmf. LLaMA-Factory loads its processor with ``AutoProcessor``, which needs
torchvision for the Qwen-VL and LLaVA-NeXT-Video video processors and for PixtralProcessor (LLaVA's and Gemma 3's
load as they are); torchvision's PyPI wheels do not load next to the CPU torch, so the processor here is the model's
own PIL image processor (``Qwen2VLImageProcessorPil``, what transformers picks without torchvision;
``PixtralImageProcessorPil`` with PixtralProcessor's attributes; LLaVA-NeXT-Video's frame steps through the PIL CLIP
image processor) with the tokenizer, in an object LLaMA-Factory's ``load_tokenizer`` accepts.
Each case stores per row the digest of ``[input_ids, labels]`` (tests/lf_parity/digest.py) and of the pixel
inputs LLaMA-Factory's plugin builds for the row's images (videos: tokens only, LLaMA-Factory's video pixels need
torchvision's video processor) (``image_grid_thw`` and ``pixel_values`` rounded to 1e-4). Pixel
values depend on the resize numerics of transformers' image processor and of Pillow (both changed between the
versions here), so the test compares them exactly under the versions recorded here and, under any versions, their
grid, shape and sums within 0.1%.

Audio (Qwen2-Audio): LLaMA-Factory reads a clip with ``torchaudio.load``, which torchaudio 2.9+ hands to torchcodec,
whose PyPI wheel is a CUDA build that does not load here; the golden decodes with PyAV instead (:func:`pyav_load`:
FFmpeg's decoders, as torchcodec's, to float32 [channels, samples]), then LLaMA-Factory's own code averages the
channels, resamples with ``torchaudio.functional.resample`` and runs the Whisper feature extractor. Each row stores
:func:`audio_stats` of its features, compared within a tolerance (lmf resamples with its own copy of the formula).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "lf_parity"))

DPO_RECORDS = [  # a small preference set on the demo images (mllm_demo has no preference data)
    {"messages": [{"role": "user", "content": "<image>Who are they?"}],
     "chosen": {"role": "assistant", "content": "They're Kane and Gretzka from Bayern Munich."},
     "rejected": {"role": "assistant", "content": "They are two cats."}, "images": ["mllm_demo_data/1.jpg"]},
    {"messages": [{"role": "user", "content": "What is in <image> and <image>?"}],
     "chosen": {"role": "assistant", "content": "Two football scenes."},
     "rejected": {"role": "assistant", "content": "Nothing."},
     "images": ["mllm_demo_data/2.jpg", "mllm_demo_data/3.jpg"]},
]

CASES = [  # (name, model family dir, stage, LF keys)
    ("qwen2_vl_sft", "qwen2_vl", "sft", {"template": "qwen2_vl", "dataset": "mllm_demo", "cutoff_len": 2048,
                                         "image_max_pixels": 262144}),
    ("qwen3_vl_nothink_sft_mixed", "qwen3_vl", "sft", {"template": "qwen3_vl_nothink",
                                                       "dataset": "mllm_demo,identity", "max_samples": 8,
                                                       "cutoff_len": 2048, "image_max_pixels": 262144}),
    ("qwen3_vl_sft_small_images", "qwen3_vl", "sft", {"template": "qwen3_vl", "dataset": "mllm_demo",
                                                      "cutoff_len": 4096, "image_max_pixels": 16384,
                                                      "image_min_pixels": 4096}),
    ("qwen2_vl_dpo", "qwen2_vl", "dpo", {"template": "qwen2_vl", "dataset": "mllm_dpo_demo", "cutoff_len": 2048,
                                         "image_max_pixels": 262144}),
    ("qwen2_vl_video_sft", "qwen2_vl", "sft", {"template": "qwen2_vl", "dataset": "mllm_video_demo,mllm_demo",
                                               "cutoff_len": 4096, "video_max_pixels": 16384, "video_fps": 1.0,
                                               "video_maxlen": 8, "image_max_pixels": 65536}),
    ("qwen3_vl_video_sft", "qwen3_vl", "sft", {"template": "qwen3_vl_nothink", "dataset": "mllm_video_demo",
                                               "cutoff_len": 4096, "video_max_pixels": 16384, "video_fps": 1.0,
                                               "video_maxlen": 8}),
    ("llava_sft", "llava", "sft", {"template": "llava", "dataset": "mllm_demo,identity", "max_samples": 8,
                                   "cutoff_len": 1024}),
    ("llava_next_sft", "llava_next", "sft", {"template": "llava_next", "dataset": "mllm_demo,identity",
                                             "max_samples": 8, "cutoff_len": 2048}),
    ("llava_next_small_images", "llava_next", "sft", {"template": "llava_next", "dataset": "mllm_demo",
                                                      "cutoff_len": 2048, "image_max_pixels": 16384}),
    ("llava_next_video_images", "llava_next_video", "sft", {"template": "llava_next_video",
                                                             "dataset": "mllm_demo,identity", "max_samples": 8,
                                                             "cutoff_len": 2048}),
    ("llava_next_video_videos", "llava_next_video", "sft", {"template": "llava_next_video",
                                                             "dataset": "mllm_video_demo", "cutoff_len": 2048,
                                                             "video_max_pixels": 16384, "video_fps": 1.0,
                                                             "video_maxlen": 8}),
    ("gemma3_sft", "gemma3", "sft", {"template": "gemma3", "dataset": "mllm_demo", "cutoff_len": 1024}),
    ("gemma3_dpo", "gemma3", "dpo", {"template": "gemma3", "dataset": "mllm_dpo_demo", "cutoff_len": 1024}),
    ("gemma3_pan_and_scan", "gemma3", "sft", {"template": "gemma3", "dataset": "mllm_demo", "cutoff_len": 2048,
                                              "image_do_pan_and_scan": True}),
    ("pixtral_sft", "pixtral", "sft", {"template": "pixtral", "dataset": "mllm_demo,identity", "max_samples": 8,
                                       "cutoff_len": 2048}),
    ("pixtral_small_images", "pixtral", "sft", {"template": "pixtral", "dataset": "mllm_demo", "cutoff_len": 2048,
                                                "image_max_pixels": 4096}),
    ("ministral3_dpo", "pixtral", "dpo", {"template": "ministral3", "dataset": "mllm_dpo_demo", "cutoff_len": 2048}),
    ("intern_vl_sft", "intern_vl", "sft", {"template": "intern_vl", "dataset": "mllm_demo,identity", "max_samples": 8,
                                           "cutoff_len": 2048}),
    ("intern_vl_crop_to_patches", "intern_vl", "sft", {"template": "intern_vl", "dataset": "mllm_demo",
                                                       "cutoff_len": 4096, "crop_to_patches": True}),
    ("intern_vl_dpo", "intern_vl", "dpo", {"template": "intern_vl", "dataset": "mllm_dpo_demo", "cutoff_len": 2048,
                                           "crop_to_patches": True, "image_max_pixels": 65536}),
    ("mllama_sft", "mllama", "sft", {"template": "mllama", "dataset": "mllm_demo,identity", "max_samples": 8,
                                     "cutoff_len": 1024}),
    ("mllama_dpo", "mllama", "dpo", {"template": "mllama", "dataset": "mllm_dpo_demo", "cutoff_len": 1024}),
    ("glm4v_sft", "glm4v", "sft", {"template": "glm4v", "dataset": "mllm_demo,identity", "max_samples": 8,
                                   "cutoff_len": 2048, "image_max_pixels": 262144}),
    ("glm4v_small_images", "glm4v", "sft", {"template": "glm4v", "dataset": "mllm_demo", "cutoff_len": 2048,
                                            "image_max_pixels": 16384, "image_min_pixels": 4096}),
    ("video_llava_images", "video_llava", "sft", {"template": "video_llava", "dataset": "mllm_demo,identity",
                                                   "max_samples": 8, "cutoff_len": 1024}),
    ("video_llava_videos", "video_llava", "sft", {"template": "video_llava", "dataset": "mllm_video_demo",
                                                   "cutoff_len": 2048, "video_max_pixels": 16384, "video_fps": 1.0,
                                                   "video_maxlen": 8}),
    ("qwen2_audio_sft", "qwen2_audio", "sft", {"template": "qwen2_audio", "dataset": "mllm_audio_demo,identity",
                                               "max_samples": 6, "cutoff_len": 2048}),
]
#: The tiny families the cases use.
FAMILIES = ("qwen2_vl", "qwen3_vl", "llava", "llava_next", "llava_next_video", "gemma3", "pixtral", "qwen2_audio",
            "intern_vl", "mllama", "glm4v", "video_llava")
#: Families whose processor AutoProcessor builds without torchvision (no video processor).
OWN_PROCESSOR = ("llava", "llava_next", "gemma3", "qwen2_audio", "mllama")


def digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:20]


def _pixels(inputs: dict):
    pixels = inputs["pixel_values"] if "pixel_values" in inputs else inputs["pixel_values_images"]
    return pixels if hasattr(pixels, "double") else __import__("torch").as_tensor(pixels)


def pixel_digest(inputs: dict) -> str:
    """Digest of a row's ``pixel_values`` (Video-LLaVA's ``pixel_values_images``: shape, values rounded to 1e-4) and
    ``image_grid_thw`` (Qwen-VL)."""
    grid = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else None
    pixels = _pixels(inputs)
    values = [round(float(x), 4) for x in pixels.double().flatten().tolist()]
    return digest([grid, list(pixels.shape), values])


def pixel_stats(inputs: dict) -> list:
    """``[grid, shape, sum, sum of |x|]`` of a row's pixel inputs: compared with a tolerance where the resize
    numerics differ (Pillow and transformers versions), exactly equal otherwise (:func:`pixel_digest`)."""
    grid = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else None
    pixels = _pixels(inputs).double()
    return [grid, list(pixels.shape), float(pixels.sum()), float(pixels.abs().sum())]


def audio_stats(inputs: dict) -> list:
    """``[shape, unpadded frames per clip, sum, sum of |x|, 16 values of each clip's first frame]`` of a row's
    ``input_features`` / ``feature_attention_mask``."""
    features = inputs["input_features"].double()
    return [list(features.shape), inputs["feature_attention_mask"].sum(-1).tolist(), float(features.sum()),
            float(features.abs().sum()), features[:, :16, 0].flatten().tolist()]


def pyav_load(path: str):
    """``(float32 tensor [channels, samples], sample rate)`` of an audio file, decoded by FFmpeg through PyAV: the
    stand-in of ``torchaudio.load`` (see the module's docstring)."""
    import av
    import numpy as np
    import torch

    with av.open(path) as container:
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")
        chunks = [c.to_ndarray() for frame in container.decode(stream) for c in to_float.resample(frame)]
        chunks += [c.to_ndarray() for c in to_float.resample(None)]
        return torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.float32)), stream.rate


def data_dir(out_dir: str, demo: str = "") -> str:
    """The demo data (``demo``: LLaMA-Factory's data folder, ../shared's by default) plus ``mllm_dpo_demo``
    (DPO_RECORDS) in ``out_dir/data``."""
    demo = demo or os.path.join(os.path.dirname(ROOT), "shared", "data", "lf-demo")
    path = os.path.join(out_dir, "data")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(demo, "dataset_info.json"), encoding="utf-8") as fh:
        info = json.load(fh)
    info["mllm_dpo_demo"] = {"file_name": "mllm_dpo_demo.json", "formatting": "sharegpt", "ranking": True,
                             "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected",
                                         "images": "images"},
                             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                      "assistant_tag": "assistant"}}
    with open(os.path.join(path, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1)
    with open(os.path.join(path, "mllm_dpo_demo.json"), "w", encoding="utf-8") as fh:
        json.dump(DPO_RECORDS, fh, indent=1)
    for name in sorted(set(os.listdir(demo)) - {"dataset_info.json"}):
        link = os.path.join(path, name)
        if not os.path.exists(link):
            os.symlink(os.path.join(demo, name), link)
    return path


def build(out_dir: str) -> None:
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from lmf.testing.tiny_vlm import build_tiny_vlm

    for family in FAMILIES:
        build_tiny_vlm(os.path.join(out_dir, family), family, qwen_tokenizer=True)
    data_dir(out_dir)


def _processor(model_dir: str, tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class Qwen2VLProcessor:  # the name LLaMA-Factory's load_tokenizer checks for
        model_input_names = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]

        def __init__(self):
            self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
            self.video_processor = self.image_processor  # Qwen3VLPlugin reads its merge_size (no videos here)
            self.tokenizer = tokenizer

        def _calculate_timestamps(self, indices, video_fps, merge_size=2):  # Qwen3VLProcessor's, for Qwen3-VL videos
            from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as Qwen3

            return Qwen3._calculate_timestamps(self, indices, video_fps, merge_size)

        def save_pretrained(self, out_dir):  # LLaMA-Factory saves the processor with the trained model
            self.image_processor.save_pretrained(out_dir)
            self.tokenizer.save_pretrained(out_dir)

    return Qwen2VLProcessor()


def _frame_video_processor(model_dir: str):
    """The video processor of LLaVA-NeXT-Video and Video-LLaVA (transformers builds it with torchvision): its settings
    (``video_preprocessor_config.json``) through the PIL CLIP image processor, frame by frame (what the video processor
    does: resize, center crop, rescale, normalize)."""
    import numpy as np
    import torch
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    with open(os.path.join(model_dir, "video_preprocessor_config.json"), encoding="utf-8") as fh:
        video = json.load(fh)
    keys = ("size", "crop_size", "image_mean", "image_std", "do_resize", "do_center_crop", "do_rescale",
            "rescale_factor", "do_normalize", "do_convert_rgb", "resample")
    frames = CLIPImageProcessorPil(**{key: video[key] for key in keys if key in video})

    class VideoProcessor:
        def preprocess(self, images=None, videos=None, return_tensors=None):  # LLaMA-Factory passes videos=
            stacked = [np.stack(frames(list(v), return_tensors="np")["pixel_values"]) for v in videos]
            return {"pixel_values_videos": torch.from_numpy(np.stack(stacked))}

        __call__ = preprocess

    return VideoProcessor()


def _llava_video_processor(name: str, image_processor, model_dir: str, tokenizer, **extra):
    """A processor named ``name`` (LLaMA-Factory's load_tokenizer checks the name) with ``image_processor``, the frame
    video processor and the LLaVA attributes LLaMA-Factory's plugins read (``processor_config.json``)."""
    with open(os.path.join(model_dir, "processor_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)

    def save_pretrained(self, out_dir):
        self.image_processor.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)

    processor = type(name, (), dict(extra, save_pretrained=save_pretrained))()
    processor.image_processor, processor.video_processor = image_processor, _frame_video_processor(model_dir)
    processor.tokenizer = tokenizer
    for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
        setattr(processor, key, config[key])
    return processor


def _llava_next_video_processor(model_dir: str, tokenizer):
    """LLaVA-NeXT-Video's processor: the PIL LLaVA-NeXT image processor, the frame video processor, its tokens."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next_video.processing_llava_next_video import LlavaNextVideoProcessor as Real

    with open(os.path.join(model_dir, "processor_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    return _llava_video_processor(
        "LlavaNextVideoProcessor", LlavaNextImageProcessorPil.from_pretrained(model_dir), model_dir, tokenizer,
        model_input_names=["input_ids", "attention_mask", "pixel_values", "image_sizes", "pixel_values_videos"],
        _get_number_of_features=Real._get_number_of_features, _get_unpadded_features=Real._get_unpadded_features,
        image_token=config["image_token"], video_token=config["video_token"])


def _video_llava_processor(model_dir: str, tokenizer):
    """Video-LLaVA's processor: the model's own (PIL) VideoLlavaImageProcessor and the frame video processor."""
    from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

    return _llava_video_processor("VideoLlavaProcessor", VideoLlavaImageProcessor.from_pretrained(model_dir),
                                  model_dir, tokenizer)


def _pixtral_processor(model_dir: str, tokenizer):
    """PixtralProcessor asks for torchvision at construction: the same attributes around the model's PIL image
    processor (what LLaMA-Factory's PixtralPlugin reads: patch_size, spatial_merge_size, the break and end tokens)."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    with open(os.path.join(model_dir, "processor_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)

    class PixtralProcessor:  # LLaMA-Factory's load_tokenizer checks the name
        model_input_names = ["input_ids", "attention_mask", "pixel_values", "image_sizes"]

        def __init__(self):
            self.image_processor = PixtralImageProcessorPil.from_pretrained(model_dir)
            self.tokenizer = tokenizer
            self.patch_size = config["patch_size"]
            self.spatial_merge_size = config["spatial_merge_size"]
            self.image_token, self.image_break_token = config["image_token"], config["image_break_token"]
            self.image_end_token = config["image_end_token"]

        def save_pretrained(self, out_dir):
            self.image_processor.save_pretrained(out_dir)
            self.tokenizer.save_pretrained(out_dir)

    return PixtralProcessor()


def _glm4v_processor(model_dir: str, tokenizer):
    """Glm4vProcessor builds its video processor with torchvision: the model's PIL image processor (Glm4v's) and the
    tokenizer, what LLaMA-Factory's GLM4VPlugin reads for images."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    class Glm4vProcessor:  # LLaMA-Factory's load_tokenizer checks the name
        model_input_names = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]

        def __init__(self):
            self.image_processor = Glm4vImageProcessorPil.from_pretrained(model_dir)
            self.video_processor = self.image_processor  # LLaMA-Factory checks there is one (no videos here)
            self.tokenizer = tokenizer

        def save_pretrained(self, out_dir):
            self.image_processor.save_pretrained(out_dir)
            self.tokenizer.save_pretrained(out_dir)

    return Glm4vProcessor()


def _internvl_processor(model_dir: str, tokenizer):
    """InternVLProcessor builds its video processor with torchvision: the attributes LLaMA-Factory's InternVLPlugin
    reads (``image_seq_length``) around the model's PIL image processor (GotOcr2's)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    with open(os.path.join(model_dir, "processor_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)

    class InternVLProcessor:  # LLaMA-Factory's load_tokenizer checks the name
        model_input_names = ["input_ids", "attention_mask", "pixel_values"]

        def __init__(self):
            self.image_processor = GotOcr2ImageProcessorPil.from_pretrained(model_dir)
            self.tokenizer = tokenizer
            self.image_seq_length = config["image_seq_length"]

        def save_pretrained(self, out_dir):
            self.image_processor.save_pretrained(out_dir)
            self.tokenizer.save_pretrained(out_dir)

    return InternVLProcessor()


def _nested_num_crops(image_processor) -> None:
    """LLaMA-Factory 0.9.5's Gemma3Plugin reads ``num_crops[0][i]``, transformers 4's nesting (one list per batch);
    transformers 5 returns one flat tensor, on which LLaMA-Factory stops with an IndexError on every image. The
    golden takes what LLaMA-Factory meant: the processor's crop counts in the nesting it indexes."""
    base = type(image_processor)

    class Nested(base):
        def __call__(self, *args, **kwargs):
            out = base.__call__(self, *args, **kwargs)
            if "num_crops" in out:
                out["num_crops"] = [out["num_crops"].tolist()]
            return out

    image_processor.__class__ = Nested


def _smart_resize_without_torchvision() -> None:
    """LLaMA-Factory's video token count imports ``smart_resize`` from transformers' torchvision image processor
    module; the PIL module holds the same function (copied from it), so that module's name is given it alone."""
    import types

    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    name = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    stub = types.ModuleType(name)
    stub.smart_resize = pil.smart_resize
    sys.modules.setdefault(name, stub)


def lf(out_dir: str, golden_path: str) -> None:
    _smart_resize_without_torchvision()
    import llamafactory
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data import mm_plugin
    from llamafactory.hparams import get_train_args
    from llamafactory.model import loader as lf_loader
    from transformers import AutoProcessor, AutoTokenizer

    from digest import digest_rows

    import PIL
    import transformers

    results = {"lf_version": llamafactory.__version__, "transformers": transformers.__version__,
               "pillow": PIL.__version__, "cases": {}}
    own_processor = AutoProcessor.from_pretrained
    mm_plugin.torchaudio.load = pyav_load
    only = set(filter(None, os.environ.get("LF_GOLDEN_CASES", "").split(",")))  # a subset, to add new cases
    for name, family, stage, keys in CASES:
        if only and name not in only:
            continue
        model_dir = os.path.join(out_dir, family)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if family in OWN_PROCESSOR:
            AutoProcessor.from_pretrained = own_processor
        elif family == "pixtral":
            AutoProcessor.from_pretrained = staticmethod(lambda *a, **k: _pixtral_processor(model_dir, tokenizer))
        elif family == "glm4v":
            AutoProcessor.from_pretrained = staticmethod(lambda *a, **k: _glm4v_processor(model_dir, tokenizer))
        elif family == "intern_vl":
            AutoProcessor.from_pretrained = staticmethod(lambda *a, **k: _internvl_processor(model_dir, tokenizer))
        elif family == "llava_next_video":
            AutoProcessor.from_pretrained = staticmethod(lambda *a, **k: _llava_next_video_processor(model_dir,
                                                                                                     tokenizer))
        elif family == "video_llava":
            AutoProcessor.from_pretrained = staticmethod(lambda *a, **k: _video_llava_processor(model_dir, tokenizer))
        else:
            AutoProcessor.from_pretrained = staticmethod(lambda *a, **k: _processor(model_dir, tokenizer))
        config = dict(keys, stage="rm" if stage == "dpo" else stage, do_train=True, model_name_or_path=model_dir, finetuning_type="lora",
                      dataset_dir=os.path.join(out_dir, "data"), output_dir=os.path.join(out_dir, "lf_out"),
                      overwrite_cache=True, report_to="none", preprocessing_num_workers=1)
        model_args, data_args, training_args, _, _ = get_train_args(config)
        module = lf_loader.load_tokenizer(model_args)
        if keys.get("image_do_pan_and_scan"):
            _nested_num_crops(module["processor"].image_processor)
        template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
        lf_stage = "rm" if stage == "dpo" else stage  # LLaMA-Factory tokenizes DPO data as stage rm
        dataset = get_dataset(template, model_args, data_args, training_args, stage=lf_stage, **module)["train_dataset"]
        rows = [dict(r) for r in dataset]
        pixels, stats, audio = [], [], []
        for row in rows:
            audios = row.get("audios") or []
            audio.append(audio_stats(template.mm_plugin.get_mm_inputs([], [], audios, [0], [0], [len(audios)], [],
                                                                       module["processor"])) if audios else None)
            images = row.get("images") or []
            inputs = template.mm_plugin.get_mm_inputs(images, [], [], [len(images)], [0], [0], [row.get(
                "input_ids", row.get("chosen_input_ids"))], module["processor"])
            pixels.append(pixel_digest(inputs) if images else None)
            stats.append(pixel_stats(inputs) if images else None)
        results["cases"][name] = {"family": family, "stage": stage, "config": keys, **digest_rows(rows, stage),
                                  "pixels": pixels, "pixel_stats": stats,
                                  **({"audio_stats": audio} if any(audio) else {})}
    with open(golden_path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    command, out = sys.argv[1:3]
    build(out) if command == "build" else lf(out, sys.argv[3])
