"""lmf.model."""
