"""The file format and safetensors save/load (no pickle)."""
from ..errors import FormatError
from .format import FORMAT_VERSION, WEIGHTS_NAME
from .reader import read_file, read_header, weights_path
from .serialize import load, save

__all__ = ["FORMAT_VERSION", "WEIGHTS_NAME", "FormatError", "load", "read_file", "read_header", "save",
           "weights_path"]
