"""Typed argument groups. Key names and meanings follow LLaMA-Factory's hparams.

Every field carries ``metadata['help']``; fields with a closed set of values carry ``metadata['choices']``; a key
accepted for LLaMA-Factory compatibility but not implemented carries ``metadata['unsupported']`` (why), one that is
harmless to ignore ``metadata['no_effect']`` (why). The parser (``lmf.config.parser``) validates types, choices and
ranges (``lmf.config.values.BOUNDS``) and rejects unknown keys with a suggestion.

This module must stay import-light (stdlib only): ``lmf help`` imports it.

Long on purpose: the schema of every key is one table that a reader (and ``lmf help config``, the generated
reference) reads group by group; splitting it would scatter keys that are looked up side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from lmf.config.stages import STAGES, UNIMPLEMENTED_STAGES


def _f(default: Any, help: str, choices: Optional[tuple] = None, **extra: Any) -> Any:
    """A config field: ``help``, optional ``choices``, and its status for keys lmf does not (fully) implement:
    ``unsupported="why"`` (a non-default value is an error) or ``no_effect="why"`` (a warning)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    meta.update(extra)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelArguments:
    """Which model to load and how."""

    model_name_or_path: Optional[str] = _f(None, "Local path (or hub id, when online) of the base model.")
    adapter_name_or_path: Optional[str] = _f(None, "Comma-separated PEFT adapter path(s) to load on top of the base model.")
    cache_dir: Optional[str] = _f(None, "Where to cache downloaded models.")
    model_revision: str = _f("main", "Model revision (branch, tag or commit).")
    trust_remote_code: bool = _f(False, "Allow custom modelling code shipped with the checkpoint.")
    use_fast_tokenizer: bool = _f(True, "Use a fast (Rust) tokenizer.")
    split_special_tokens: bool = _f(False, "Split special tokens when tokenizing.")
    add_tokens: Optional[str] = _f(None, "Comma-separated non-special tokens to add to the tokenizer.")
    add_special_tokens: Optional[str] = _f(None, "Comma-separated special tokens to add to the tokenizer.")
    resize_vocab: bool = _f(False, "Resize the embeddings to the tokenizer's vocabulary.")
    new_special_tokens_config: Optional[str] = _f(None, "A YAML file mapping new special tokens to descriptions "
                                                  "(LLaMA-Factory main): its tokens are added (in place of "
                                                  "add_special_tokens) and desc_init starts their rows from the "
                                                  "descriptions.")
    init_special_tokens: str = _f("noise_init", "How the rows of added tokens start: noise_init (mean + noise), "
                                  "desc_init (the mean of the description's rows), desc_init_w_noise (both).",
                                  ("noise_init", "desc_init", "desc_init_w_noise"))
    adapter_folder: Optional[str] = _f(None, "The sub-folder of each adapter_name_or_path that holds the adapter.")
    offload_folder: str = _f("offload", "Where weights that fit neither GPU nor CPU memory go with "
                                        "quantization_device_map: auto.")
    low_cpu_mem_usage: bool = _f(True, "Load weights lazily to save CPU memory.")
    init_on_rank0: bool = _f(False, "Under FSDP on several processes, only rank 0 reads the checkpoint; the other "
                                    "ranks build the model on the meta device and receive their shards from it "
                                    "(LLaMA-Factory v1's init_on_rank0).")
    init_on_meta: bool = _f(False, "Under FSDP on several processes, every rank builds the model's parameters on the "
                                   "meta device and reads only its own shards from the checkpoint's safetensors, one "
                                   "tensor at a time (LLaMA-Factory v1's init_on_meta; full and freeze tuning, as "
                                   "there: LoRA uses init_on_rank0).")
    flash_attn: str = _f("auto", "Attention implementation.", ("auto", "disabled", "sdpa", "fa2", "eager"))
    mixture_of_depths: Optional[str] = _f(None, "Mixture-of-depths: convert routes every other layer (full SFT/pt), "
                                          "load reads a model trained so.", (None, "convert", "load"))
    shift_attn: bool = _f(False, "Training: LongLoRA's shift short attention (S²-Attn): attend within quarters of "
                          "each row, half of the heads shifted by half a quarter (lmf.model.shift_attention).")
    disable_gradient_checkpointing: bool = _f(False, "Turn gradient checkpointing off (it is on by default for training).")
    use_reentrant_gc: bool = _f(True, "Use reentrant gradient checkpointing (LLaMA-Factory's default; it keeps less "
                                "memory between a layer's recompute and its backward). FSDP sharding always uses the "
                                "non-reentrant implementation.")
    offload_activations: bool = _f(False, "Offload checkpointed activations to CPU memory (GPU only).")
    upcast_layernorm: bool = _f(False, "Upcast layernorm weights to fp32.")
    upcast_lmhead_output: bool = _f(False, "Upcast the lm_head output to fp32.")
    use_chunked_loss: bool = _f(True, "Compute the loss in chunks over the sequence and never materialise full logits.")
    loss_chunk_size: Optional[int] = _f(None, "Tokens per chunk for the chunked loss; unset: as many as keep one "
                                        "chunk's fp32 logits near 256 MiB (1024 up to a 64k vocabulary, 384 for "
                                        "Qwen's 151,936 tokens).")
    padding_free: bool = _f(True, "Train padded batches without their padding: the real tokens of a micro-batch run "
                            "as one row of per-sample segments (sdpa on Llama/Qwen/Mistral-family models; the same "
                            "result, no work on padding). Ignored where per-sample attention does not apply.")
    packed_sdpa: bool = _f(True, "Attend per sample (per-segment sdpa, no [T, T] mask) in packed rows and padding-free "
                           "batches where the model allows it; false: the masked path.")
    fused_lora: bool = _f(True, "Train each plain LoRA linear through one fused autograd node (same outputs, gradients "
                          "and adapter files as peft's forward, less memory); false: peft's forward.")
    malloc_mmap_threshold_mb: Optional[float] = _f(
        None, "Opt-in (glibc): fix malloc's mmap threshold at this many MiB in training processes, so freed "
        "activations go back to the OS (lower peak RSS on CPU; 4 is a good value). Unset: malloc's own behaviour.")
    enable_liger_kernel: bool = _f(False, "On a GPU with liger-kernel installed: its fused linear cross-entropy and "
                                          "module kernels (rope, swiglu, rms_norm ... as liger_kernel_config says).")
    liger_kernel_config: Optional[dict] = _f(None, "liger-kernel switches (transformers' key), each true/false: "
                                                   "fused_linear_cross_entropy, rope, swiglu, rms_norm, geglu, "
                                                   "layer_norm (default: liger's own).")
    use_onednn_matmul: bool = _f(True, "On the CPU in fp32, the chunked loss computes the LM head's matmuls with "
                                       "oneDNN (faster than the default BLAS at those shapes; the same results up to "
                                       "summation order). False: torch.matmul.")
    moe_aux_loss_coef: Optional[float] = _f(None, "Mixture-of-experts models: add this times the router "
                                            "load-balancing loss (logged as aux_loss); unset: no auxiliary loss.")
    train_from_scratch: bool = _f(False, "Randomly initialise the model weights from its config.")
    infer_backend: str = _f("huggingface", "Inference backend for chat/api (sglang is refused saying why).",
                            ("huggingface", "hf", "vllm", "sglang"))
    infer_dtype: str = _f("auto", "Dtype for inference.", ("auto", "float16", "bfloat16", "float32"))
    use_cache: bool = _f(True, "Use the KV cache during generation.")
    print_param_status: bool = _f(False, "Print every parameter's dtype, device and trainable flag.")
    quantization_bit: Optional[int] = _f(None, "QLoRA / QOFT: quantize the base model on load to 4 or 8 bits "
                                         "(bitsandbytes; pip install 'lmf[qlora]'); LoRA or OFT trains on top.",
                                         (None, 4, 8))
    quantization_method: str = _f("bnb", "On-the-fly quantization method: bitsandbytes (hqq and eetq "
                                   "are not implemented).", ("bnb", "hqq", "eetq"))
    quantization_type: str = _f("nf4", "4-bit data type: NormalFloat4 or FP4.", ("nf4", "fp4"))
    double_quantization: bool = _f(True, "4-bit: quantize the quantization constants too (saves ~0.4 bit/param).")
    quantization_device_map: Optional[str] = _f(None, "Inference with a quantized model: 'auto' lets transformers "
                                                "place it (chat/api).", (None, "auto"))
    model_max_length: Optional[int] = _f(None, "Override the tokenizer's model_max_length; with rope_scaling at "
                                         "inference, the length the RoPE is scaled for (training: cutoff_len).")
    rope_scaling: Optional[str] = _f(None, "Scale the RoPE to train or serve past the model's native length: factor "
                                     "ceil(cutoff_len / native length) in training, model_max_length / native "
                                     "length (or 2) at inference, as LLaMA-Factory derives it (lmf.model.rope).",
                                     ("linear", "dynamic", "yarn", "llama3"))
    export_dir: Optional[str] = _f(None, "Directory to write the merged model to (lmf export).")
    export_size: float = _f(5, "Maximum shard size of the exported model, in GB (fractions allowed, e.g. 0.5).")
    export_device: str = _f("cpu", "Device used to merge the adapter.", ("cpu", "auto"))
    export_legacy_format: bool = _f(False, "Save .bin instead of .safetensors when exporting.")
    export_overwrite: bool = _f(False, "Allow lmf export to overwrite a non-empty export_dir.")
    export_gguf: Optional[str] = _f(None, "Also write the model as one GGUF file for llama.cpp / Ollama, with weights "
                                    "of this type (q8_0: 8-bit; 1-D tensors stay f32), and point the Modelfile at it.",
                                    ("f32", "f16", "bf16", "q8_0"))
    export_hub_model_id: Optional[str] = _f(None, "Hub repo id to push the export to.",
        unsupported="pushing to the hub is not possible offline")
    vllm_maxlen: int = _f(4096, "Max sequence length for the vLLM engine.")
    vllm_gpu_util: float = _f(0.7, "GPU memory fraction for vLLM.")
    vllm_enforce_eager: bool = _f(False, "Disable CUDA graphs in vLLM.")
    vllm_max_lora_rank: int = _f(32, "Maximum LoRA rank vLLM accepts.")
    vllm_config: Optional[dict] = _f(None, "Extra arguments of vLLM's engine (a mapping, or a JSON string as "
                                           "LLaMA-Factory takes it), e.g. {max_num_seqs: 8}; they override the "
                                           "vllm_* keys. Checked against vLLM's EngineArgs at start.")


@dataclass
class DataArguments:
    """Which data to train on and how to turn it into tokens."""

    template: Optional[str] = _f(None, "Chat template name (see `lmf data templates`), or 'auto' for the tokenizer's own.")
    dataset: Optional[str] = _f(None, "Comma-separated dataset names from dataset_info.json (or file paths).")
    eval_dataset: Optional[str] = _f(None, "Comma-separated evaluation dataset names.")
    dataset_dir: str = _f("data", "Folder holding dataset_info.json and the data files.")
    media_dir: Optional[str] = _f(None, "Folder for images/videos/audios (defaults to dataset_dir).")
    image_max_pixels: int = _f(768 * 768, "Images larger than this many pixels are scaled down (LLaMA-Factory's rule).")
    image_min_pixels: int = _f(32 * 32, "Images smaller than this many pixels are scaled up.")
    image_do_pan_and_scan: bool = _f(False, "Gemma 3: each image also as pan-and-scan crops (LLaMA-Factory's settings: "
                                            "crops of >= 256 pixels, at most 4, from an aspect ratio of 1.2).")
    crop_to_patches: bool = _f(False, "InternVL: up to 12 tiles and a thumbnail per image (LLaMA-Factory's settings).")
    video_max_pixels: int = _f(256 * 256, "Video frames larger than this many pixels are scaled down.")
    video_min_pixels: int = _f(16 * 16, "Video frames smaller than this are scaled up.")
    video_fps: float = _f(2.0, "Frames sampled per second of video.")
    video_maxlen: int = _f(128, "At most this many frames per video.")
    audio_sampling_rate: int = _f(16000, "Audio is resampled to this many samples per second (LLaMA-Factory's key).")
    cutoff_len: int = _f(2048, "Maximum tokens per sample after tokenization.")
    train_on_prompt: bool = _f(False, "Also compute the loss on prompt tokens.")
    mask_history: bool = _f(False, "Train on the last assistant turn only.")
    streaming: bool = _f(False, "Read and tokenize the training data while training instead of preprocessing it "
                         "into the cache first (needs max_steps; each process reads its share of the records).")
    buffer_size: int = _f(16384, "Rows in the shuffle buffer of streamed training data.")
    mix_strategy: str = _f("concat", "How to mix several datasets: concatenate, or interleave until the first "
                           "(under) / every (over) dataset is exhausted, or each record once (once).",
                           ("concat", "interleave_under", "interleave_over", "interleave_once"))
    interleave_probs: Optional[str] = _f(None, "Comma-separated sampling probabilities of the datasets when interleaving.")
    overwrite_cache: bool = _f(False, "Re-run preprocessing even if a cached result exists.")
    preprocessing_batch_size: int = _f(1000, "Records per preprocessing batch.")
    preprocessing_num_workers: Optional[int] = _f(None, "Processes used for preprocessing.")
    max_samples: Optional[int] = _f(None, "Keep at most this many records per dataset.")
    eval_num_beams: Optional[int] = _f(None, "Beams of prediction (do_predict) when num_beams is 1, as "
                                             "LLaMA-Factory passes it to generate.")
    ignore_pad_token_for_loss: bool = _f(True, "false (SFT): padded label positions carry the pad token and are "
                                               "trained, batches padded to a multiple of 8 (LLaMA-Factory's rule).")
    val_size: float = _f(0.0, "Validation split: a fraction in [0,1) or an absolute count.")
    eval_on_each_dataset: bool = _f(False, "Evaluate on each eval_dataset separately (logged as eval_<name>_loss).")
    packing: Optional[bool] = _f(None, "Pack several samples into one sequence (default: on for pt, off otherwise).")
    neat_packing: bool = _f(False, "Packing without cross-sample attention (per-sample position ids).")
    tool_format: Optional[str] = _f(None, "Tool format of the calls and tools (default: the template's own): default, "
                                    "qwen, qwen3_5, glm4, glm4_moe, llama3, mistral, minimax1, minimax2, seed_oss, "
                                    "ling, lfm2, gemma4.")
    default_system: Optional[str] = _f(None, "Override the template's default system prompt.")
    enable_thinking: Optional[bool] = _f(True, "Whether reasoning (thinking) templates keep the thought.")
    preserve_thinking: bool = _f(False, "Reasoning templates: keep the thoughts of earlier turns in the prompt.")
    tokenized_path: Optional[str] = _f(None, "Save/load the tokenized dataset to/from this path.")
    data_shared_file_system: bool = _f(False, "Whether nodes share a file system for the data cache.",
        no_effect="the preprocessing cache is built on local rank 0 of every node")
    skip_bad_records: bool = _f(False, "Skip malformed records (counted and reported) instead of failing.")
    preprocessing_cache_dir: Optional[str] = _f(None, "Where preprocessed datasets are cached (default: $LMF_CACHE or ~/.cache/lmf/datasets).")


@dataclass
class FinetuningArguments:
    """What to train: stage, method and method-specific knobs."""

    stage: str = _f("sft", "Training stage (lmf.config.stages).", (*STAGES, *UNIMPLEMENTED_STAGES))
    finetuning_type: str = _f("lora", "Which parameters to train.", ("lora", "freeze", "full", "oft"))
    freeze_trainable_layers: int = _f(2, "Freeze: train the last N layers (negative: the first -N).")
    freeze_trainable_modules: str = _f("all", "Freeze: comma-separated module names within trainable layers.")
    freeze_extra_modules: Optional[str] = _f(None, "Freeze: extra non-layer modules to train (e.g. embed_tokens).")
    lora_rank: int = _f(8, "LoRA rank.")
    lora_alpha: Optional[int] = _f(None, "LoRA alpha (default: 2 * lora_rank).")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target: str = _f("all", "Comma-separated module names to adapt, or 'all' for every linear layer but the head.")
    additional_target: Optional[str] = _f(None, "Comma-separated extra modules trained in full and saved with the adapter.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA; also on quantized bases).")
    pissa_init: bool = _f(False, "PiSSA: LoRA A/B initialised from the principal singular vectors of each weight "
                                 "(the base keeps the residual).")
    pissa_iter: int = _f(16, "PiSSA: iterations of the randomised SVD (-1: the exact SVD).")
    pissa_convert: bool = _f(False, "PiSSA: also save the adapter converted to a plain LoRA on the original base "
                                    "(output_dir/pissa_converted; the initial one in output_dir/pissa_init).")
    loraplus_lr_ratio: Optional[float] = _f(None, "LoRA+: the LoRA B matrices train at learning_rate x this ratio.")
    loraplus_lr_embedding: float = _f(1e-6, "LoRA+: learning rate of the B matrices of LoRA on embeddings.")
    create_new_adapter: bool = _f(False, "Create a new adapter on top of loaded ones instead of resuming them.")
    oft_rank: int = _f(0, "OFT: number of orthogonal blocks per layer (0: set by oft_block_size).")
    oft_block_size: int = _f(32, "OFT: size of each orthogonal block (0: set by oft_rank).")
    oft_target: str = _f("all", "OFT: comma-separated module names, or 'all' for every linear layer but the head.")
    module_dropout: float = _f(0.0, "OFT: probability of dropping a module's rotation while training.")
    use_dft_loss: bool = _f(False, "SFT with the DFT loss: token cross-entropy weighted by the token's detached "
                                   "probability (Dynamic Fine-Tuning).")
    use_eaft_loss: bool = _f(False, "SFT with the EAFT loss (LLaMA-Factory main): token cross-entropy weighted by "
                                    "(entropy of the model's top-20 next-token distribution / 3) ^ eaft_alpha.")
    eaft_alpha: float = _f(1.0, "EAFT: the power of the entropy weight.")
    use_asft_loss: bool = _f(False, "SFT with the ASFT loss (LLaMA-Factory main): the DFT loss plus asft_alpha x the "
                                    "KL divergence from the frozen reference (the base model: disabled LoRA "
                                    "adapters, or ref_model) to the policy at each label token.")
    asft_alpha: float = _f(0.1, "ASFT: the weight of the KL anchor to the reference.")
    neftune_noise_alpha: Optional[float] = _f(None, "NEFTune: uniform noise of scale alpha / sqrt(length x hidden) "
                                                    "added to the input embeddings while training.")
    # preference
    pref_beta: float = _f(0.1, "Beta of the preference loss.")
    pref_ftx: float = _f(0.0, "Weight of the SFT loss added to the preference loss.")
    pref_bco_weight: float = _f(0.0, "DPO with a reference: weight of the BCO loss mixed into it, (dpo + w x bco) / "
                                     "(1 + w), against a running mean of the rewards (LLaMA-Factory, after TRL).")
    pref_loss: str = _f("sigmoid", "Preference loss.", ("sigmoid", "hinge", "ipo", "orpo", "simpo"))
    dpo_label_smoothing: float = _f(0.0, "Label smoothing for the sigmoid DPO loss (cDPO).")
    simpo_gamma: float = _f(0.5, "Target reward margin of SimPO.")
    ld_alpha: Optional[float] = _f(None, "LD-DPO (LLaMA-Factory): in the policy's log-probability of each answer, "
                                         "the tokens past the shorter answer of its pair count ld_alpha times "
                                         "(0 < ld_alpha <= 1; the reference's are plain).")
    ref_model: Optional[str] = _f(None, "Reference model path for DPO (default: the base model).")
    ref_model_adapters: Optional[str] = _f(None, "Adapters of the reference model.")
    ref_model_quantization_bit: Optional[int] = _f(None, "Load the separate reference model (full/freeze tuning, "
                                                   "or ref_model) quantized to 4 or 8 bits with bitsandbytes; "
                                                   "otherwise it is unquantized, as in LLaMA-Factory.", (None, 4, 8))
    precompute_ref_log_probs: bool = _f(False, "Compute reference log-probs once before training (full fine-tuning).")
    kto_chosen_weight: float = _f(1.0, "KTO: weight of the loss of desirable answers.")
    kto_rejected_weight: float = _f(1.0, "KTO: weight of the loss of undesirable answers.")
    plot_loss: bool = _f(False, "Write training_loss.png at the end.")
    compute_accuracy: bool = _f(False, "Compute token accuracy during evaluation.")
    disable_shuffling: bool = _f(False, "Do not shuffle the training data.")
    include_effective_tokens_per_second: bool = _f(False, "Report effective tokens/s.",
        no_effect="lmf always reports tokens/s")
    pure_bf16: bool = _f(False, "Train in pure bf16 (no AMP).")
    use_llama_pro: bool = _f(False, "LLaMA-Pro: train only the blocks `lmf expand` inserted (freeze: the "
                                    "freeze_trainable_layers copies; lora/oft: their modules).")
    # optimizers (LLaMA-Factory's keys; each needs its PyPI package: pip install 'lmf[galore]' etc.)
    use_galore: bool = _f(False, "GaLore: Adam on low-rank projections of the gradients of linear weights.")
    galore_target: str = _f("all", "GaLore: comma-separated linear module names, or 'all'.")
    galore_rank: int = _f(16, "GaLore: rank of the gradient projection.")
    galore_update_interval: int = _f(200, "GaLore: steps between projection updates (SVD).")
    galore_scale: float = _f(2.0, "GaLore: scale of the projected-back update.")
    galore_proj_type: str = _f("std", "GaLore: projection side.", ("std", "reverse_std", "right", "left", "full"))
    galore_layerwise: bool = _f(False, "GaLore: step each weight during backward (no full gradient kept; one "
                                       "process, gradient_accumulation_steps 1).")
    use_apollo: bool = _f(False, "APOLLO: AdamW with channel- or tensor-wise scaling from a low-rank auxiliary state.")
    apollo_target: str = _f("all", "APOLLO: comma-separated linear module names, or 'all'.")
    apollo_rank: int = _f(16, "APOLLO: rank of the auxiliary projection.")
    apollo_update_interval: int = _f(200, "APOLLO: steps between projection updates.")
    apollo_scale: float = _f(32.0, "APOLLO: update scale.")
    apollo_proj: str = _f("random", "APOLLO: projection.", ("random", "svd"))
    apollo_proj_type: str = _f("std", "APOLLO: projection side.", ("std", "right", "left"))
    apollo_scale_type: str = _f("channel", "APOLLO: scaling granularity.", ("channel", "tensor"))
    apollo_layerwise: bool = _f(False, "APOLLO: step each weight during backward (one process, "
                                       "gradient_accumulation_steps 1).")
    apollo_scale_front: bool = _f(False, "APOLLO: apply the norm-growth limiter before scaling.")
    use_badam: bool = _f(False, "BAdam: block coordinate Adam, one decoder layer trained at a time.")
    badam_mode: str = _f("layer", "BAdam: blocks are decoder layers (layer) or a ratio of every weight (ratio).",
                         ("layer", "ratio"))
    badam_start_block: Optional[int] = _f(None, "BAdam: index of the first block (default: by badam_switch_mode).")
    badam_switch_mode: str = _f("ascending", "BAdam: block order.", ("ascending", "descending", "random", "fixed"))
    badam_switch_interval: int = _f(50, "BAdam: optimizer steps per block.")
    badam_update_ratio: float = _f(0.05, "BAdam ratio mode: fraction of each weight updated.",
        no_effect="it applies to badam_mode: ratio, which is not implemented")
    badam_mask_mode: str = _f("adjacent", "BAdam ratio mode: which entries.", ("adjacent", "scatter"),
        no_effect="it applies to badam_mode: ratio, which is not implemented")
    badam_verbose: int = _f(0, "BAdam: 0 quiet, 1 the active block at each switch, 2 also its parameter names.")
    use_adam_mini: bool = _f(False, "Adam-mini: one second-moment value per block (head, row) instead of per weight.")
    use_muon: bool = _f(False, "Muon: orthogonalised momentum for 2-D hidden weights (torch.optim.Muon), AdamW "
                               "for embeddings, head, norms and biases.")
    freeze_vision_tower: bool = _f(True, "Vision-language models: keep the vision tower frozen (no LoRA on it).")
    freeze_multi_modal_projector: bool = _f(True, "Vision-language models: keep the projector (merger) frozen.")
    freeze_language_model: bool = _f(False, "Vision-language models: keep the language model frozen.")
    use_swanlab: bool = _f(False, "Report to SwanLab (as report_to: swanlab), with the swanlab_* keys.")
    swanlab_project: Optional[str] = _f("llamafactory", "SwanLab project.")
    swanlab_workspace: Optional[str] = _f(None, "SwanLab workspace.")
    swanlab_run_name: Optional[str] = _f(None, "SwanLab experiment name (default: run_name).")
    swanlab_mode: str = _f("cloud", "SwanLab mode: cloud, local (swanlab watch), offline (swanlab sync later).",
                           ("cloud", "local", "offline"))
    swanlab_api_key: Optional[str] = _f(None, "SwanLab API key (swanlab.login).")
    swanlab_logdir: Optional[str] = _f(None, "Folder of SwanLab's run files (default: swanlog in the working directory).")
    swanlab_lark_webhook_url: Optional[str] = _f(None, "Lark (Feishu) webhook SwanLab notifies when the run ends.")
    swanlab_lark_secret: Optional[str] = _f(None, "Secret of the Lark webhook.")
    early_stopping_steps: Optional[int] = _f(None, "Stop when the eval loss has not improved for N evaluations.")


@dataclass
class TrainingArguments:
    """How to train: optimisation, schedule, precision, distribution, outputs."""

    output_dir: str = _f("saves/default", "Where checkpoints and the final model go.")
    overwrite_output_dir: bool = _f(False, "Allow writing into a non-empty output_dir without resuming.")
    do_train: bool = _f(True, "Run training.")
    do_eval: bool = _f(False, "Run evaluation.")
    do_predict: bool = _f(False, "Generate answers for eval_dataset (with predict_with_generate): "
                                 "generated_predictions.jsonl and BLEU-4/ROUGE in predict_results.json.")
    per_device_train_batch_size: int = _f(1, "Micro-batch size per device.")
    per_device_eval_batch_size: int = _f(1, "Evaluation batch size per device.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    global_batch_size: Optional[int] = _f(None, "Samples per optimizer step over every process (LLaMA-Factory v1): "
                                                "sets gradient_accumulation_steps = global_batch_size / (processes x "
                                                "per_device_train_batch_size) once the processes are known.")
    dp_size: Optional[int] = _f(None, "The number of data-parallel processes the config was written for (LLaMA-Factory "
                                      "v1's dist_config.dp_size): checked against the processes at launch (lmf has no "
                                      "model-parallel mesh).")
    learning_rate: float = _f(5e-5, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    num_train_epochs: float = _f(3.0, "Epochs to train (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Optimizer steps to train; overrides num_train_epochs when > 0.")
    lr_scheduler_type: str = _f(
        "linear", "Learning-rate schedule.",
        ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt"),
    )
    lr_scheduler_kwargs: dict = _f({}, "Extra scheduler arguments (e.g. min_lr_rate).")
    warmup_ratio: float = _f(0.0, "Fraction of steps used for linear warmup.")
    warmup_steps: int = _f(0, "Warmup steps (overrides warmup_ratio when > 0).")
    optim: str = _f("adamw_torch", "Optimizer (*8bit/paged_*: bitsandbytes).", ("adamw_torch", "adamw_hf", "adamw", "sgd",
                    "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"))
    optim_args: Optional[str] = _f(None, "More optimizer arguments, 'key=value,key=value' (transformers' optim_args): "
                                         "sgd: momentum, dampening, nesterov; AdamW: amsgrad, maximize.")
    optim_target_modules: Union[str, list, None] = _f(None, "The modules GaLore / APOLLO project (transformers' name "
                                                            "for galore_target / apollo_target).")
    group_by_length: bool = _f(False, "Micro-batches of similar lengths: each epoch's shuffled order is cut into "
                                      "mega-batches sorted longest first, the longest sample in the first batch "
                                      "(transformers' LengthGroupedSampler; train_sampling_strategy: group_by_length).")
    debug: Union[str, list] = _f("", "underflow_overflow: stop at the first module whose output has inf or nan, "
                                     "with a report of the frames before it (transformers' DebugUnderflowOverflow).")
    auto_find_batch_size: bool = _f(False, "One process: a step that runs out of memory is retried from its first "
                                           "sample with micro-batches of half the size (or less) and accumulation "
                                           "grown to keep the samples per step (transformers restarts the run).")
    fp8: bool = _f(False, "FP8 training: linear layers compute in float8 (torchao; a GPU of compute capability 8.9+).")
    fp8_backend: str = _f("auto", "FP8 backend: auto / torchao (te and msamp are refused).",
                          ("auto", "torchao", "te", "msamp"))
    fp8_enable_fsdp_float8_all_gather: bool = _f(False, "FP8 under FSDP2: all-gather the weights in float8.")
    bf16_full_eval: bool = _f(False, "The evaluation after the last step runs in bf16 (autocast; transformers casts "
                                     "the model for the evaluation after training).")
    fp16_full_eval: bool = _f(False, "The evaluation after the last step runs in fp16 (as bf16_full_eval).")
    prediction_loss_only: bool = _f(False, "Evaluation computes the loss only (lmf's evaluation computes the loss, "
                                           "and accuracy only with compute_accuracy).")
    bf16: bool = _f(False, "bfloat16 mixed precision (GPU; on CPU training falls back to fp32 with a warning).")
    fp16: bool = _f(False, "float16 mixed precision (GPU only).")
    tf32: Optional[bool] = _f(None, "Allow TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing: Optional[bool] = _f(None, "Activation checkpointing per decoder layer (default: on unless disable_gradient_checkpointing).")
    seed: int = _f(42, "Random seed.")
    label_smoothing_factor: float = _f(0.0, "SFT/pre-training: smooth the next-token targets, (1 - e) x cross-entropy "
                                            "+ e x the mean over the vocabulary of -log p (transformers' "
                                            "LabelSmoother), in the training and the eval loss.")
    full_determinism: bool = _f(False, "Deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN "
                                       "deterministic, a fixed cuBLAS workspace) for bit-identical reruns on GPU; "
                                       "slower. On CPU lmf's runs are already deterministic for a seed.")
    data_seed: Optional[int] = _f(None, "Seed for data shuffling (default: seed).")
    logging_steps: int = _f(10, "Log every N optimizer steps.")
    logging_dir: Optional[str] = _f(None, "TensorBoard log dir (default: output_dir/runs).")
    logging_first_step: bool = _f(False, "Log the first step.")
    logging_strategy: str = _f("steps", "When training metrics are logged: every logging_steps, at each epoch's end, "
                                        "or never.", ("no", "steps", "epoch"))
    save_strategy: str = _f("steps", "When to checkpoint.", ("no", "steps", "epoch"))
    save_steps: float = _f(500, "Checkpoint every N optimizer steps.")
    save_total_limit: Optional[int] = _f(None, "Keep at most N checkpoints.")
    save_only_model: bool = _f(False, "Checkpoints hold only the model (no optimizer state; not resumable exactly).")
    eval_strategy: str = _f("no", "When to evaluate.", ("no", "steps", "epoch"))
    evaluation_strategy: Optional[str] = _f(None, "Deprecated alias of eval_strategy.", (None, "no", "steps", "epoch"))
    eval_steps: Optional[float] = _f(None, "Evaluate every N steps (default: logging_steps).")
    eval_on_start: bool = _f(False, "Evaluate once before the first training step (a check of the eval set).")
    eval_delay: float = _f(0, "No evaluation before this many steps (eval_strategy steps) or epochs (epoch).")
    metric_for_best_model: Optional[str] = _f(None, "The eval metric that ranks checkpoints and drives early stopping "
                                              "(eval_loss, else loss, by default; 'eval_' is added when missing).")
    greater_is_better: Optional[bool] = _f(None, "Whether a larger metric_for_best_model is better (default: false "
                                           "for a metric ending in 'loss', true otherwise).")
    load_best_model_at_end: bool = _f(False, "After training, load the checkpoint with the best "
                                      "metric_for_best_model and save it as the final model (named in the log and "
                                      "in trainer_state.json's best_model_checkpoint); needs save_strategy equal to "
                                      "eval_strategy (save_steps a multiple of eval_steps); not under FSDP sharding.")
    report_to: Union[str, list] = _f("none", "Where to report metrics: none, tensorboard, wandb, mlflow, swanlab, "
                                             "trackio, all (the installed ones); comma-separated or a list.")
    run_name: Optional[str] = _f(None, "Run name for trackers.")
    project: str = _f("huggingface", "Trackio project (transformers' key).")
    trackio_space_id: Optional[str] = _f(None, "Trackio: the Hugging Face Space the run syncs to (default: local only).")
    trackio_bucket_id: Optional[str] = _f(None, "Trackio: the Hugging Face bucket that stores its data.")
    enable_torch_profiler: bool = _f(False, "Profile training steps with torch.profiler (lmf.train.profiler): each "
                                            "rank writes Chrome traces (TensorBoard's profiler plugin, Perfetto).")
    profile_modules: Optional[str] = _f(None, "Time the forward and backward of the modules matching these comma-"
                                              "separated fnmatch patterns (e.g. '*.layers.0.self_attn,*.mlp'), logged "
                                              "at each logging step (LLaMA-Factory main).")
    profiler_output_dir: Optional[str] = _f(None, "Where the traces go (default: output_dir/profiler), in rank_<N>/.")
    profiler_wait_steps: int = _f(1, "Profiler schedule: steps skipped at the start of each cycle.")
    profiler_warmup_steps: int = _f(1, "Profiler schedule: warm-up steps of each cycle (traced, discarded).")
    profiler_active_steps: int = _f(1, "Profiler schedule: steps recorded in each cycle.")
    profiler_repeat: int = _f(1, "Profiler schedule: cycles (0: until training ends).")
    profiler_record_shapes: bool = _f(True, "Profiler: record the operators' input shapes.")
    profiler_profile_memory: bool = _f(True, "Profiler: record tensor memory allocations.")
    profiler_with_stack: bool = _f(True, "Profiler: record Python stacks of the operators.")
    resume_from_checkpoint: Union[bool, str, None] = _f(None, "true: newest checkpoint in output_dir; a path: that checkpoint.")
    deepspeed: Optional[str] = _f(None, "DeepSpeed JSON config: ZeRO stages and CPU offload mapped onto "
                                         "FSDP2, batch/precision/clipping checked against the YAML; the DeepSpeed "
                                         "engine is never run (docs/distributed.md: DeepSpeed configs).")
    fsdp: Union[str, list, None] = _f(None, "FSDP options, e.g. 'full_shard' (FSDP2).")
    fsdp_config: Union[dict, str, None] = _f(None, "FSDP extra config.")
    ddp_timeout: int = _f(1800, "Collective timeout in seconds.")
    save_on_each_node: bool = _f(False, "Nodes without a shared filesystem: the local rank 0 of every node writes "
                                        "output_dir on its node and resumes from its own copy (DDP).")
    ddp_backend: Optional[str] = _f(None, "Process group backend (default: nccl on GPU, gloo on CPU).", (None, "nccl", "gloo"))
    ddp_find_unused_parameters: Optional[bool] = _f(None, "DDP find_unused_parameters.")
    ddp_bucket_cap_mb: Optional[int] = _f(None, "DDP: size of the gradient buckets in MiB (torch's default: 25).")
    ddp_broadcast_buffers: Optional[bool] = _f(None, "DDP: broadcast rank 0's buffers before each forward (torch's "
                                                     "default: true).")
    ddp_static_graph: Optional[bool] = _f(None, "DDP: the model uses the same parameters at every step (lets DDP "
                                                "plan its communication once).")
    torch_empty_cache_steps: Optional[int] = _f(None, "Every N optimizer steps, hand the accelerator's cached free "
                                                      "memory back (torch.cuda.empty_cache; nothing to do on CPU).")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes.")
    ignore_data_skip: bool = _f(False, "On resume, start the data over from its first micro-batch instead of "
                                "where the checkpoint stopped (weights, optimizer, schedule and step still resume).")
    dataloader_drop_last: bool = _f(False, "Drop each epoch's last training micro-batch of a process when it is "
                                           "incomplete (evaluation always sees every sample).")
    dataloader_persistent_workers: bool = _f(False, "Keep the DataLoader worker processes from one epoch to the next "
                                                    "(needs dataloader_num_workers > 0).")
    dataloader_prefetch_factor: Optional[int] = _f(None, "Micro-batches each DataLoader worker prepares ahead "
                                                         "(needs dataloader_num_workers > 0; torch's default: 2).")
    dataloader_pin_memory: bool = _f(True, "Pin DataLoader memory (GPU).",
        no_effect="pinning is decided by the device")
    remove_unused_columns: bool = _f(False, "Accepted for compatibility; lmf never drops columns it needs.",
        no_effect="lmf never drops columns it needs")
    use_cpu: bool = _f(False, "Train on CPU even when a GPU is present.")
    torch_compile: bool = _f(False, "Compile each decoder block with torch.compile before training "
                                    "(lmf.train.compile); the first steps include the compilation.")
    torch_compile_backend: Optional[str] = _f(None, "torch.compile backend (default inductor; aot_eager and eager "
                                                    "compile without code generation).")
    torch_compile_mode: Optional[str] = _f(None, "torch.compile mode.",
                                           (None, "default", "reduce-overhead", "max-autotune",
                                            "max-autotune-no-cudagraphs"))
    predict_with_generate: bool = _f(False, "Generate during prediction (do_predict needs it).")
    batching_strategy: Optional[str] = _f(
        None, "Micro-batches: normal (per_device_train_batch_size samples, padded), padding_free (the same samples, "
              "padding removed), dynamic_batching / dynamic_padding_free (as many samples as fit cutoff_len x "
              "per_device_train_batch_size padded / real tokens; need max_steps). Default: normal, with padding_free "
              "per its key.", (None, "normal", "padding_free", "dynamic_batching", "dynamic_padding_free"))
    # Ray (LLaMA-Factory's RayArguments): Ray Train runs with USE_RAY=1 or when the config sets a ray key
    ray_num_workers: Optional[int] = _f(None, "Ray Train workers (default: NPROC_PER_NODE x NNODES).")
    ray_init_kwargs: Union[dict, str, None] = _f(None, "Arguments of ray.init (a mapping or JSON), e.g. address, "
                                                       "runtime_env.")
    ray_run_name: Optional[str] = _f(None, "Ray Train run name (default: lmf-<command>).")
    ray_storage_path: Optional[str] = _f(None, "Where Ray Train keeps its run folder (default: Ray's own).")
    ray_storage_filesystem: Optional[str] = _f(None, "Filesystem of ray_storage_path.", (None, "s3", "gs", "gcs"))
    resources_per_worker: Union[dict, str, None] = _f(None, "Ray resources of each worker (a mapping or JSON), "
                                                            "e.g. {GPU: 1, CPU: 8}.")
    placement_strategy: str = _f("PACK", "Ray placement of the workers.",
                                 ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    master_addr: Optional[str] = _f(None, "Ray: node of rank 0.",
        unsupported="choosing Ray's rendezvous node is not implemented (Ray Train picks it)")
    master_port: Optional[str] = _f(None, "Ray: rendezvous port.",
        unsupported="choosing Ray's rendezvous port is not implemented (Ray Train picks it)")
    disable_tqdm: bool = _f(False, "No progress bar.")
    push_to_hub: bool = _f(False, "Push the result to the hub.",
        unsupported="pushing to the hub is not possible offline")
    label_names: Optional[list] = _f(None, "Accepted for compatibility.",
        no_effect="lmf knows its label columns")
    max_checkpoint_wait: int = _f(0, "Accepted for compatibility.",
        no_effect="not used")


@dataclass
class GeneratingArguments:
    """Sampling settings for chat/api."""

    do_sample: bool = _f(True, "Sample instead of greedy decoding.")
    temperature: float = _f(0.95, "Sampling temperature.")
    top_p: float = _f(0.7, "Nucleus sampling probability.")
    top_k: int = _f(50, "Top-k sampling.")
    num_beams: int = _f(1, "Beam search width of prediction (do_predict, huggingface backend); chat and api "
                           "stream their replies and refuse beams.")
    max_length: int = _f(1024, "Maximum total length (prompt + reply); applies when max_new_tokens <= 0.")
    max_new_tokens: int = _f(1024, "Maximum new tokens of a reply (<= 0: limited by max_length instead).")
    repetition_penalty: float = _f(1.0, "Repetition penalty.")
    length_penalty: float = _f(1.0, "Length penalty of beam search (prediction): the beams' scores are divided "
                                   "by length ** length_penalty.")
    skip_special_tokens: bool = _f(True, "Skip special tokens when decoding.")
    generation_config: Optional[str] = _f(None, "Prediction (huggingface backend): a generation_config.json, or the "
                                                "folder holding one, whose settings apply under the generating keys "
                                                "lmf sets (transformers' Seq2Seq generation_config).")


ARG_GROUPS = {
    "model": ModelArguments,
    "data": DataArguments,
    "finetuning": FinetuningArguments,
    "training": TrainingArguments,
    "generating": GeneratingArguments,
}
