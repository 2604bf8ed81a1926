"""Scoring a model: loss and generation metrics."""
