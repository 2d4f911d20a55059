"""Structured logs: one JSON object per line on stderr (``ts``, ``level``, ``logger``, ``msg`` and
any ``extra`` fields), for our request log and for uvicorn's own messages."""
from __future__ import annotations

import json
import logging
import time

_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def log_config(level: str = "info") -> dict:
    """A `logging.config.dictConfig` for uvicorn and lowbit.serve: JSON lines on stderr, no access
    log (the request log of `lowbit.serve.app` replaces it)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    named = {"level": level.upper(), "handlers": ["stderr"], "propagate": False}
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": "lowbit.serve.logs.JsonFormatter"}},
            "handlers": {"stderr": handler},
            "loggers": {"uvicorn": named, "uvicorn.error": named, "lowbit.serve": named,
                        "uvicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False}}}
