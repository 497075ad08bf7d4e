"""``lmf export``: the merged Hugging Face model folder (:mod:`lmf.export.merge`), optionally with a GGUF file for
llama.cpp / Ollama (:mod:`lmf.export.gguf`) and an Ollama ``Modelfile``."""

from lmf.export.merge import export_model, run_export

__all__ = ["export_model", "run_export"]
