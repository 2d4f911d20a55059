"""lowbit: quantize trained PyTorch models and embedding tables, and measure what it cost.

The public verbs: `quantize`, `plan`, `save`, `load`, `quantize_checkpoint` (from shards, for
models larger than memory), `compare` (its tasks: `lowbit.tasks`), `sensitivity`, `tune`; training
for compression: `qat.prepare` / `qat.convert`, `quant_noise`, `ipq.quantize` / `ipq.size_report`.
Nothing happens at import.
"""
from ._version import __version__

from . import ipq, qat
from .api import make_recipe, plan, quantize
from .comparison import compare
from .noise import quant_noise
from .io import FormatError, load, save
from .primitives import QuantizationError, QuantizedWeight, quantize_weight
from .recipe import Plan, Recipe, RecipeError, Rule
from .streaming import quantize_checkpoint
from .spec import QuantSpec, SchemeError, parse_scheme
from .sensitivity import sensitivity  # the function; the module stays importable as lowbit.sensitivity
from .tune import tune
from . import tables  # lowbit.tables.open / build / push / export (Redis and Dask load only when used)

__all__ = ["FormatError", "Plan", "QuantSpec", "QuantizationError", "QuantizedWeight", "Recipe",
           "RecipeError", "Rule", "SchemeError", "compare", "load", "make_recipe", "parse_scheme", "plan",
           "quantize", "quantize_checkpoint", "quantize_weight", "save", "ipq", "qat", "quant_noise",
           "sensitivity", "tune"]
