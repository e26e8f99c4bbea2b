"""trainrig: train vision models from one YAML file.

Notebook use::

    import trainrig
    cfg = trainrig.load_config("configs/smoke.yaml", ["epochs=2"])
    result = trainrig.fit(cfg, callbacks=[MyCallback()])
    result.history[-1]["test_acc"]
"""
from .callbacks import Callback
from .config import Config, load as load_config
from .errors import ConfigError, DataError, TrainrigError
from .loop import FitResult, evaluate_checkpoint, fit
from .models import build_model

__all__ = ["Callback", "Config", "ConfigError", "DataError", "FitResult", "TrainrigError", "build_model",
           "evaluate_checkpoint", "fit", "load_config"]
__version__ = "0.1.0"
