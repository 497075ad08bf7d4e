"""lmf.chat."""
