"""Unlearning experiments behind `sapsel demo`: one module per task (labels, canary)."""
