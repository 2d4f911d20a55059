"""The one numeric truth of lowbit: rounding, clamping, ranges and bit layouts."""
from .affine import QuantizationError
from .packing import PACKING_VERSION, PackingError, pack, packed_cols, unpack
from .qweight import QuantizedWeight, fake_quantize, quantize_weight

__all__ = ["PACKING_VERSION", "PackingError", "QuantizationError", "QuantizedWeight",
           "fake_quantize", "pack", "packed_cols", "quantize_weight", "unpack"]
