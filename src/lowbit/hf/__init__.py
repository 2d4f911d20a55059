"""lowbit inside transformers: ``import lowbit.hf`` registers the quantization method "lowbit".

    import lowbit.hf
    model = AutoModel.from_pretrained(path, quantization_config=lowbit.hf.LowbitConfig("w4g128"))
    model.save_pretrained("out/")            # lowbit's format; config.json names "lowbit"
    model = AutoModel.from_pretrained("out/")  # same outputs as lowbit.load("out/")

Registration happens here, on import of this module only (``import lowbit`` has no side effects).
"""
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)

from ..io.hfconfig import QUANT_METHOD
from .config import LowbitConfig
from .quantizer import LowbitHfQuantizer, LowbitQuantize

# idempotent: a second import (e.g. after importlib.reload) keeps the first registration
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(LowbitConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)

__all__ = ["LowbitConfig", "LowbitHfQuantizer", "LowbitQuantize"]
