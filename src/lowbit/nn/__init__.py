"""Quantized modules and the float -> quantized swap table."""
import torch

from .base import QuantizedModule
from .qconv import QConv2d
from .qembedding import QEmbedding
from .qlinear import QLinear

# float class -> quantized class; each quantized class has from_float(module, qweight, method, sqnr_db)
SWAP_TABLE = {torch.nn.Linear: QLinear, torch.nn.Embedding: QEmbedding, torch.nn.Conv2d: QConv2d}
QUANTIZED_CLASSES = {cls.__name__: cls for cls in SWAP_TABLE.values()}

__all__ = ["QConv2d", "QEmbedding", "QLinear", "QuantizedModule", "SWAP_TABLE", "QUANTIZED_CLASSES"]
