"""The ``quantization_config`` entry lowbit writes into a transformers model's ``config.json``.

With it, ``AutoModel.from_pretrained(folder)`` (after ``import lowbit.hf``) hands the folder to
lowbit's quantizer; the file header stays the truth about what each layer holds. Plain JSON, no
transformers import: `lowbit.hf.LowbitConfig.from_dict` reads it back.

    {"quant_method": "lowbit", "format_version": 2, "scheme": "w4g128" | {recipe JSON object},
     "targets": null | [names], "ignore": [names], "method": "rtn", "allow_empty": false}
"""
from __future__ import annotations

import json

from .format import FORMAT_VERSION

QUANT_METHOD = "lowbit"


def quantization_config_dict(source: dict | None) -> dict:
    """The entry for a model quantized as ``source`` (a model's ``lowbit_source``) says."""
    source = source or {}
    scheme = source.get("scheme", "w4g128")
    if isinstance(scheme, str) and scheme.lstrip().startswith("{"):
        scheme = json.loads(scheme)  # a recipe, kept as a JSON object rather than a string
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "scheme": scheme,
            "targets": source.get("targets"), "ignore": list(source.get("ignore", ())),
            "method": source.get("method", "rtn"), "allow_empty": bool(source.get("allow_empty", False))}
