"""What vLLM's LoRA loader accepts in an adapter (``--enable-lora``), checked when lmf saves one, so that the user
learns it at the end of training rather than when the server refuses the adapter."""

from __future__ import annotations

#: vLLM's default ``--max-lora-rank``.
VLLM_DEFAULT_MAX_LORA_RANK = 16


def vllm_lora_warnings(adapter_config: dict) -> list[str]:
    """One line per adapter feature that vLLM rejects or needs a flag for (empty: it serves as saved)."""
    problems = []
    if adapter_config.get("peft_type", "LORA") != "LORA":
        problems.append(f"it is a {adapter_config.get('peft_type')} adapter: vLLM serves LoRA adapters only; merge it "
                        "with `lmf export` and serve the merged model")
        return problems
    if adapter_config.get("use_dora"):
        problems.append("use_dora: vLLM does not serve DoRA adapters; merge it with `lmf export` and serve the "
                        "merged model")
    if adapter_config.get("modules_to_save"):
        problems.append(f"modules_to_save {adapter_config['modules_to_save']} (additional_target): vLLM's LoRA loader "
                        "ignores or rejects fully trained modules; merge with `lmf export` to keep them")
    ranks = [int(adapter_config.get("r") or 0), *map(int, (adapter_config.get("rank_pattern") or {}).values())]
    if max(ranks) > VLLM_DEFAULT_MAX_LORA_RANK:
        problems.append(f"rank {max(ranks)} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}: start "
                        f"vLLM with --max-lora-rank {_next_rank(max(ranks))}")
    return problems


def _next_rank(rank: int) -> int:
    """The smallest of vLLM's allowed --max-lora-rank values that holds ``rank``."""
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    return rank


def warn_if_vllm_refuses(adapter_dir: str) -> None:
    """Log what vLLM's ``--enable-lora`` would refuse in the adapter saved in ``adapter_dir``."""
    import json
    import os

    from lmf.extras.logging import get_logger

    path = os.path.join(adapter_dir, "adapter_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
        for problem in vllm_lora_warnings(config):
            get_logger(__name__).warning("serving this adapter with vLLM: %s", problem)
