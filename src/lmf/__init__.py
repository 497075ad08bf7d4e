"""lmf: fine-tune large language models (SFT, DPO, reward modelling) from a YAML file."""

__version__ = "0.1.0"
