"""Constants shared by several layers (import-light: stdlib only)."""

#: Label value of positions that are never a training target (PyTorch cross-entropy's ``ignore_index``).
IGNORE_INDEX = -100

#: Finetuning types whose result is a peft adapter (saved alone, loaded onto the base model).
ADAPTER_TYPES = ("lora", "oft")
