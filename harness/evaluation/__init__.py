"""Evaluation: perplexity, ROUGE-L, zero-shot (lm-eval), token importance."""
