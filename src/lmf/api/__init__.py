"""lmf.api."""
