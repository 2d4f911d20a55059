"""`lowbit serve`: a CTR model served from quantized embedding tables over HTTP (FastAPI +
uvicorn), and its `Client`. FastAPI, uvicorn and httpx load only when used."""
from .client import Client, ServeError, split_inputs

__all__ = ["Client", "ServeError", "split_inputs"]
