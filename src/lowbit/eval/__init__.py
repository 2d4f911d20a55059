"""Evaluation: metrics, reports."""
from .metrics import cosine_rows, sqnr_db

__all__ = ["cosine_rows", "sqnr_db"]
