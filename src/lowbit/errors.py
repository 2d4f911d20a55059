"""lowbit's error types. Each names what was wrong (file, layer, key, expected vs found).

`LowbitError` is the common base (a `ValueError`, so callers that catch bad input keep working);
catch it to handle every problem lowbit reports about its input.
"""


class LowbitError(ValueError):
    """Any input lowbit cannot accept: a scheme, a recipe, a model, a file."""


class SchemeError(LowbitError):
    """A scheme string or spec field that lowbit cannot accept."""


class RecipeError(LowbitError):
    """A rule, recipe or quantize() argument lowbit cannot accept."""


class QuantizationError(LowbitError):
    """A tensor that cannot be quantized as asked (NaN/Inf, overflow, bad shape)."""


class PackingError(LowbitError):
    """Packed data whose size or dtype does not match what its shape and bits require."""


class FormatError(LowbitError):
    """A lowbit file that cannot be read as what it claims to be; the message names the file."""
