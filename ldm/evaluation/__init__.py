"""Evaluation of trained models (prompt adherence, sample quality)."""
