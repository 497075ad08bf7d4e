"""lmf.data."""
