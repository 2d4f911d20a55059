"""Quality metrics for reports (the numeric definitions live in `lowbit.primitives.metrics`)."""
from ..primitives.metrics import cosine_rows, sqnr_db

__all__ = ["cosine_rows", "sqnr_db"]
