"""Test and demo fixtures, kept out of the training stack: a tiny random-init causal LM with a locally
trained tokenizer (:mod:`lmf.testing.tiny`, ``python -m lmf.testing.tiny OUT_DIR``) and a character-level
tokenizer (:mod:`lmf.testing.char_tokenizer`). Nothing in ``lmf`` imports this package."""
