"""trainrig: train vision models from one YAML file.

Notebook use::

    import trainrig
    cfg = trainrig.load_config("configs/smoke.yaml", ["epochs=2"])
    result = trainrig.fit(cfg, callbacks=[MyCallback()])
    result.history[-1]["test_acc"]

    # your own network and datasets; then label files with the best checkpoint
    result = trainrig.fit(cfg, model=my_net, train_data=train_set, test_data=val_set)
    trainrig.predict(result.run_dir / "checkpoints" / "best.pt", ["photo.png"])
"""
from trainrig.training.callbacks import Callback
from trainrig.config import Config, load as load_config
from trainrig.errors import ConfigError, DataError, TrainrigError
from trainrig.trained.export import export
from trainrig.trained.inference import Prediction, load_trained, predict
from trainrig.trained.inference import evaluate_checkpoint
from trainrig.training.loop import FitResult, fit
from trainrig.models import build_model
from trainrig.preflight.lr_find import LRFindResult, lr_find
from trainrig.preflight.profile import ProfileResult, profile
from trainrig.preflight.summary import Summary, summary

__all__ = ["Callback", "Config", "ConfigError", "DataError", "FitResult", "LRFindResult", "Prediction",
           "ProfileResult", "Summary", "TrainrigError", "build_model", "evaluate_checkpoint", "export", "fit",
           "load_config", "load_trained", "lr_find", "predict", "profile", "summary"]
__version__ = "0.1.0"
