"""Evaluation: answering and scoring question files, metrics, comparison reports, image reliance, lmms-eval."""
