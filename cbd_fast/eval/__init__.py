"""Evaluation: retrieval metrics, accuracy matrices, forgetting, reports."""
from .metrics import continual_summary, retrieval_metrics

__all__ = ["continual_summary", "retrieval_metrics"]
