"""lmf.loss."""
