"""Media plugins: how a model family turns ``<image>`` / ``<video>`` / ``<audio>`` placeholders into its tokens and
the files into its inputs, as LLaMA-Factory's mm_plugin does: :class:`~lmf.data.media.qwen_vl.QwenVLPlugin` (templates ``qwen2_vl``,
``qwen3_vl``, ``qwen3_vl_nothink``, ...), :class:`~lmf.data.media.llava.LlavaPlugin` (``llava``),
:class:`~lmf.data.media.llava.LlavaNextPlugin` (``llava_next``, ``llava_next_*``),
:class:`~lmf.data.media.llava.LlavaNextVideoPlugin` (``llava_next_video``, ``llava_next_video_*``: images and videos),
:class:`~lmf.data.media.llava.VideoLlavaPlugin` (``video_llava``: images and videos),
:class:`~lmf.data.media.gemma3.Gemma3Plugin` (``gemma3``), :class:`~lmf.data.media.pixtral.PixtralPlugin`
(``pixtral``, ``ministral3``, ...), :class:`~lmf.data.media.internvl.InternVLPlugin` (``intern_vl``, ``intern_s1``),
:class:`~lmf.data.media.mllama.MllamaPlugin` (``mllama``: Llama 3.2 Vision),
:class:`~lmf.data.media.glm4v.GLM4VPlugin` (``glm4v``, ``glm4_5v``, ``glm_ocr``),
:class:`~lmf.data.media.qwen_audio.Qwen2AudioPlugin` (``qwen2_audio``: audio);
what they share: :mod:`lmf.data.media.plugin_base`.

:func:`media_plugin_for` picks the plugin of a template for a model directory (None for text models).
"""

from __future__ import annotations

import os

from lmf.data.media import PROCESSOR_FILES
from lmf.data.media.gemma3 import Gemma3Plugin
from lmf.data.media.glm4v import GLM4VPlugin
from lmf.data.media.internvl import InternVLPlugin
from lmf.data.media.mllama import MllamaPlugin
from lmf.data.media.llava import LlavaNextPlugin, LlavaNextVideoPlugin, LlavaPlugin, VideoLlavaPlugin
from lmf.data.media.pixtral import PixtralPlugin
from lmf.data.media.plugin_base import MediaOptions, MediaPlugin  # noqa: F401 - the plugins' shared base, here too
from lmf.data.media.qwen_audio import Qwen2AudioPlugin
from lmf.data.media.qwen_vl import QwenVLPlugin
from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

#: LLaMA-Factory's mm_plugin names lmf implements -> plugin class name.
IMPLEMENTED = {"Qwen2VLPlugin": "QwenVLPlugin", "Qwen3VLPlugin": "QwenVLPlugin", "LlavaPlugin": "LlavaPlugin",
               "LlavaNextPlugin": "LlavaNextPlugin", "LlavaNextVideoPlugin": "LlavaNextVideoPlugin",
               "Gemma3Plugin": "Gemma3Plugin", "PixtralPlugin": "PixtralPlugin", "Qwen2AudioPlugin": "Qwen2AudioPlugin",
               "InternVLPlugin": "InternVLPlugin", "MllamaPlugin": "MllamaPlugin",
               "GLM4VPlugin": "GLM4VPlugin", "VideoLlavaPlugin": "VideoLlavaPlugin"}
PLUGINS = {"QwenVLPlugin": QwenVLPlugin, "LlavaPlugin": LlavaPlugin, "LlavaNextPlugin": LlavaNextPlugin,
           "LlavaNextVideoPlugin": LlavaNextVideoPlugin, "Gemma3Plugin": Gemma3Plugin, "PixtralPlugin": PixtralPlugin,
           "Qwen2AudioPlugin": Qwen2AudioPlugin, "InternVLPlugin": InternVLPlugin,
           "MllamaPlugin": MllamaPlugin, "GLM4VPlugin": GLM4VPlugin, "VideoLlavaPlugin": VideoLlavaPlugin}
#: LLaMA-Factory's plugins of families whose model code transformers does not ship (only ``trust_remote_code``, code
#: downloaded from the hub, loads them) -> the family.
REMOTE_CODE_ONLY = {"KimiVLPlugin": "Kimi-VL", "MiniCPMVPlugin": "MiniCPM-V / MiniCPM-o", "MossVLPlugin": "MOSS-VL",
                    "YoutuVLPlugin": "Youtu-VL"}
#: Plugins of audio-only families: the model's preprocessor_config.json is its audio feature extractor's.
AUDIO_ONLY = (Qwen2AudioPlugin,)


def copy_processor_files(base_dir: str, out_dir: str) -> list[str]:
    """Copy the base model's processor files (:data:`~lmf.data.media.PROCESSOR_FILES`) into ``out_dir``, where it
    has none of its own; returns the names copied."""
    import shutil

    copied = []
    for name in PROCESSOR_FILES:
        src = os.path.join(base_dir, name)
        if os.path.isfile(src) and not os.path.exists(os.path.join(out_dir, name)):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def has_image_processor(model_path: str) -> bool:
    return os.path.isfile(os.path.join(model_path, "preprocessor_config.json"))


def media_plugin_for(template, model_path: str, tokenizer, data_args, trust_remote_code: bool = False):
    """The media plugin of ``template`` for the model at ``model_path``, or None (a text template, or a model
    without an image processor or audio feature extractor: text only)."""
    name = getattr(template, "mm_plugin", None)
    if data_args.image_do_pan_and_scan and name != "Gemma3Plugin":
        logger.warning("image_do_pan_and_scan has no effect with template %r: it is Gemma 3's (as in LLaMA-Factory)",
                       getattr(template, "name", template))
    if data_args.crop_to_patches and name != "InternVLPlugin":
        logger.warning("crop_to_patches has no effect with template %r: it is InternVL's (as in LLaMA-Factory)",
                       getattr(template, "name", template))
    if not name or not os.path.isdir(model_path) or not has_image_processor(model_path):
        return None
    if name in REMOTE_CODE_ONLY:
        raise NotAvailableError(
            f"template {template.name!r}: {REMOTE_CODE_ONLY[name]} models load only through trust_remote_code (model "
            f"code downloaded from the hub; transformers does not ship it), so LLaMA-Factory's {name} is not "
            "implemented in lmf")
    if name not in IMPLEMENTED:
        raise NotAvailableError(
            f"template {template.name!r}: images with LLaMA-Factory's {name} are not implemented in lmf (vision-language "
            f"templates lmf implements: those of {', '.join(sorted(IMPLEMENTED))}, e.g. qwen2_vl, qwen3_vl, llava, "
            "gemma3, pixtral, intern_vl, mllama, glm4v, video_llava, qwen2_audio)")
    plugin = PLUGINS[IMPLEMENTED[name]]
    options = MediaOptions.from_data_args(data_args)
    if plugin in AUDIO_ONLY:
        return plugin(None, tokenizer, options, name=name, processor_config=_processor_config(model_path),
                      feature_extractor=load_feature_extractor(model_path, trust_remote_code))
    try:
        image_processor = load_image_processor(model_path, trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"model_name_or_path={model_path!r}: cannot load its image processor: {exc}") from exc
    if issubclass(plugin, QwenVLPlugin) and not hasattr(image_processor, "get_number_of_image_patches"):
        raise NotAvailableError(f"{type(image_processor).__name__}: lmf's {name} needs a Qwen-VL image processor")
    return plugin(image_processor, tokenizer, options, name=name, processor_config=_processor_config(model_path))


def load_feature_extractor(model_path: str, trust_remote_code: bool = False):
    """The model's audio feature extractor (``preprocessor_config.json``)."""
    import transformers

    try:
        return transformers.AutoFeatureExtractor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"model_name_or_path={model_path!r}: cannot load its audio feature extractor: {exc}") from exc


def load_image_processor(model_path: str, trust_remote_code: bool = False):
    """The model's image processor; without torchvision, its PIL implementation (transformers < 5.24's
    ``AutoImageProcessor`` asks for torchvision instead of falling back)."""
    import json

    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except ImportError:
        with open(os.path.join(model_path, "preprocessor_config.json"), encoding="utf-8") as fh:
            name = (json.load(fh).get("image_processor_type") or "").removesuffix("Fast")
        # the PIL class (transformers >= 5.x names it ...Pil), else the plain one where it is PIL-based (Video-LLaVA's)
        for candidate in filter(None, (name and name + "Pil", name)):
            try:
                return getattr(transformers, candidate).from_pretrained(model_path)
            except (AttributeError, ImportError):
                continue
        raise


def _processor_config(model_path: str) -> dict:
    import json

    config: dict = {}
    path = os.path.join(model_path, "processor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    video = os.path.join(model_path, "video_preprocessor_config.json")
    if os.path.isfile(video):
        with open(video, encoding="utf-8") as fh:
            config["video_processor"] = json.load(fh)
    return config
