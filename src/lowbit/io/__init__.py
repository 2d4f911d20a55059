"""The file format and safetensors save/load (no pickle)."""
from .format import FORMAT_VERSION, WEIGHTS_NAME, FormatError
from .serialize import load, read_file, save

__all__ = ["FORMAT_VERSION", "WEIGHTS_NAME", "FormatError", "load", "read_file", "save"]
