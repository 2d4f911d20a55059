"""The one numeric truth of lowbit: rounding, clamping, ranges and bit layouts."""
from ..errors import QuantizationError
from .packing import PACKING_VERSION, PackingError, pack, packed_cols, unpack
from .codebook import CodebookWeight
from .qweight import QuantizedWeight, fake_quantize, quantize_weight

# weight kind name (file headers, module registry) -> class with tensor_names / from_tensors / meta
WEIGHT_KINDS = {QuantizedWeight.KIND: QuantizedWeight, CodebookWeight.KIND: CodebookWeight}

__all__ = ["CodebookWeight", "PACKING_VERSION", "PackingError", "WEIGHT_KINDS", "QuantizationError", "QuantizedWeight",
           "fake_quantize", "pack", "packed_cols", "quantize_weight", "unpack"]
