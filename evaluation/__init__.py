"""Evaluation code shared by the task scripts (one module per concern)."""
