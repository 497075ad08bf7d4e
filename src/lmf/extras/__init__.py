"""Small shared helpers (errors, logging, environment flags)."""
