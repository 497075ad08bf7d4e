"""Config: typed argument groups and the YAML/override parser."""

from lmf.config.args import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments, TrainingArguments
from lmf.config.parser import LmfConfig, build_config, get_config

__all__ = [
    "DataArguments",
    "FinetuningArguments",
    "GeneratingArguments",
    "LmfConfig",
    "ModelArguments",
    "TrainingArguments",
    "build_config",
    "get_config",
]
