"""`Client`: a small HTTP client for `lowbit serve` (httpx, keep-alive)."""
from __future__ import annotations

import numpy as np

from ..errors import LowbitError


class ServeError(LowbitError):
    """The server answered with an error; ``status`` is its HTTP status, the message its text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    """``Client("http://127.0.0.1:8080").predict({"user": [...], ...})`` -> probabilities (B,)."""

    def __init__(self, url: str = "http://127.0.0.1:8080", timeout_s: float = 10.0) -> None:
        try:
            import httpx
        except ImportError:
            raise LowbitError("lowbit.serve.Client needs httpx: pip install 'lowbit[serve]'") from None
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)
        self.last_versions: dict = {}

    def _json(self, response):
        try:
            doc = response.json()
        except ValueError:
            raise ServeError(response.status_code, response.text[:200]) from None
        if response.status_code != 200:
            raise ServeError(response.status_code, doc.get("error", str(doc)) if isinstance(doc, dict) else str(doc))
        return doc

    def predict_raw(self, inputs: dict) -> dict:
        """The whole answer: {"outputs": ..., "versions": ...}."""
        return self._json(self._http.post("/predict", json={"inputs": inputs}))

    def predict(self, inputs: dict) -> np.ndarray:
        """Probabilities (B,) float64; the versions that answered are kept in ``last_versions``."""
        doc = self.predict_raw(inputs)
        self.last_versions = doc["versions"]
        return np.asarray(doc["outputs"]["probability"], dtype=np.float64)

    def health(self) -> dict:
        return self._json(self._http.get("/health"))

    def metadata(self) -> dict:
        return self._json(self._http.get("/metadata"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def split_inputs(split, idx) -> dict:
    """Samples ``idx`` of a `lowbit.ctr.data.Split` as /predict inputs (JSON-ready lists)."""
    part = split.rows(np.asarray(idx))
    inputs = {n: part.bag_lists(n) for n in part.sparse}
    inputs["dense"] = part.dense.tolist()
    return inputs
