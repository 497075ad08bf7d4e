"""lmf.model: tokenizer and model loading, adapters, attention, quantization (see docs/architecture.md)."""

from lmf.model.startup import defer_import_time_compiles

defer_import_time_compiles()  # bitsandbytes' import-time torch.compile calls wait for first use (lmf.model.startup)
