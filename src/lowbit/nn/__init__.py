"""Quantized modules and the registry that maps float modules to them."""
from .base import QuantizedModule
from .qconv import QConv2d
from .qembedding import QEmbedding
from .qlinear import QLinear
from .pq import PQConv2d, PQEmbedding, PQLinear
from .qlinear_a8 import QConv2dA8, QLinearA8
from .registry import class_by_name, float_classes, quantized_class, register

__all__ = ["PQConv2d", "PQEmbedding", "PQLinear", "QConv2d", "QConv2dA8", "QEmbedding", "QLinear", "QLinearA8",
           "QuantizedModule", "class_by_name",
           "float_classes", "quantized_class", "register"]
