"""LM generation with per-token log-probs."""
