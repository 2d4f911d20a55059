"""`LowbitConfig`: lowbit's quantization config for transformers' `from_pretrained`."""
from __future__ import annotations

import json
from typing import Any, Sequence

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..algorithms import ALGORITHMS
from ..api import make_recipe
from ..errors import RecipeError
from ..io.format import FORMAT_VERSION
from ..io.hfconfig import QUANT_METHOD
from ..recipe import Recipe
from ..spec import QuantSpec, Scheme


class LowbitConfig(QuantizationConfigMixin):
    """What `lowbit.quantize` takes: a scheme (``"w4g128"``) or a recipe (`Recipe`, its JSON text
    or JSON object), ``targets`` (None: every Linear but the output head), ``ignore``, ``method``
    and ``allow_empty``. Round-trips through ``config.json`` (`to_dict` / `from_dict`).

    Only methods that need no calibration data run at load time (``lowbit.algorithms.NEEDS_DATA``
    is empty today); quantize with `lowbit.quantize` and save for the others.
    """

    def __init__(self, scheme: "str | QuantSpec | Scheme | Recipe | dict" = "w4g128",
                 targets: Sequence[str] | str | None = None, ignore: Sequence[str] | str = (),
                 method: str = "rtn", allow_empty: bool = False, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = kwargs.pop("format_version", FORMAT_VERSION)
        kwargs.pop("quant_method", None)
        if kwargs:
            raise RecipeError(f"LowbitConfig: unknown field(s) {sorted(kwargs)}; fields: scheme, "
                              "targets, ignore, method, allow_empty")
        self.scheme = _scheme_json(scheme)
        self.targets = [targets] if isinstance(targets, str) else (None if targets is None else list(targets))
        self.ignore = [ignore] if isinstance(ignore, str) else list(ignore)
        self.method = method
        self.allow_empty = bool(allow_empty)
        if method not in ALGORITHMS:
            raise RecipeError(f"LowbitConfig: unknown method {method!r}; methods: {sorted(ALGORITHMS)}")
        self.recipe()  # a bad scheme, target or recipe fails here, before any weight is read

    def recipe(self) -> Recipe:
        """The `Recipe` that `lowbit.quantize` would build from the same arguments."""
        if isinstance(self.scheme, dict):
            return make_recipe(Recipe.from_json(json.dumps(self.scheme)), self.targets, self.ignore, self.method)
        return make_recipe(self.scheme, self.targets, self.ignore, self.method)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "scheme": self.scheme, "targets": self.targets, "ignore": list(self.ignore),
                "method": self.method, "allow_empty": self.allow_empty}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _scheme_json(scheme) -> "str | dict":
    """A scheme name stays a string; a recipe becomes a JSON object (config.json holds it)."""
    if isinstance(scheme, Recipe):
        return json.loads(scheme.to_json())
    if isinstance(scheme, (QuantSpec, Scheme)):
        return scheme.name
    if isinstance(scheme, str) and scheme.lstrip().startswith("{"):
        return json.loads(Recipe.from_json(scheme).to_json())
    if isinstance(scheme, dict):
        return json.loads(Recipe.from_json(json.dumps(scheme)).to_json())
    if isinstance(scheme, str):
        return scheme
    raise RecipeError(f"LowbitConfig: scheme must be a scheme name, a Recipe or recipe JSON, "
                      f"found {type(scheme).__name__}")
