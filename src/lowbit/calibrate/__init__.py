"""Calibration: observers of activation ranges, the GPTQ input Hessian, and the scoped collection
step that runs a model on data and leaves no hooks behind."""
from .collect import (STATS, CalibrationError, CapturedInputs, LayerStats, call_model, capture_inputs,
                      collect, record_inputs, run_until)
from .hessian import HessianAccumulator, HessianError
from .observers import (OBSERVER_NAMES, OBSERVERS, Observer, ObserverConfig, ObserverError,
                        make_observer, observer_from_dict)

__all__ = ["OBSERVERS", "OBSERVER_NAMES", "STATS", "CalibrationError", "CapturedInputs",
           "HessianAccumulator", "HessianError", "LayerStats", "Observer", "ObserverConfig",
           "ObserverError", "call_model", "capture_inputs", "collect", "make_observer",
           "observer_from_dict", "record_inputs", "run_until"]
