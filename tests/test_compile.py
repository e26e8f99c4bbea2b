"""model.compile: torch.compile in place, so nothing downstream sees a compiled module's names."""
import numpy as np
import torch
from PIL import Image

import trainrig
from trainrig.training import checkpoint
from user_models import TinyNet


class Capture(trainrig.Callback):
    """At the end of fit: the model the loop trained (compiled), its outputs on ``x`` and its state_dict."""

    def __init__(self):
        self.x = torch.randn(64, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # the eval batch's shape

    def on_fit_end(self, run):
        run.model.eval()
        with torch.inference_mode():  # as the validation pass ran it (inference tensors): its graph serves
            self.out = run.model(self.x.clone())
        self.compiled = run.model._compiled_call_impl is not None
        self.state = {k: v.clone() for k, v in run.model.state_dict().items()}


def test_a_compiled_run_checkpoints_plain_names_that_serve_uncompiled(tiny_cfg, tmp_path):
    """A run with model.compile (and EMA) trains compiled, logs what compiling cost once, and writes checkpoints
    whose model and EMA tensors carry the plain names: an uncompiled TinyNet loads them strictly and computes
    what the compiled model computed; predict and TorchScript export read them."""
    capture = Capture()
    # one shape per graph (each new shape compiles again): 576 training images in batches of 32, 64 validation
    # and 64 test images
    cfg = tiny_cfg("model.compile=true", "model.ema.decay=0.9", "epochs=1", "data.synthetic_train=640",
                   "precision=64-true")  # float64: compiled and eager kernels agree to rounding on any build
    result = trainrig.fit(cfg, progress="off", callbacks=[capture])
    assert capture.compiled
    log = (result.run_dir / "log.txt").read_text()
    assert log.count("model.compile (default): the first step took") == 1
    assert "warning: precision" not in log  # only reduced precisions the CPU emulates are warned about
    eager = TinyNet().double()
    eager.load_state_dict(capture.state)  # strict: the same names, no _orig_mod.
    eager.eval()
    with torch.no_grad():
        assert torch.allclose(eager(capture.x), capture.out, rtol=0, atol=1e-10)
    best = result.run_dir / "checkpoints" / "best.pt"
    saved = checkpoint.load(best)
    for key in ("model", "training_weights"):
        assert not [k for k in saved[key] if "_orig_mod" in k]
        TinyNet().load_state_dict(saved[key])
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(images / f"{i}.png")
    averaged = TinyNet()
    averaged.load_state_dict(saved["model"])
    a = trainrig.predict(best, [images], trust_class_path=True)
    b = trainrig.predict(best, [images], model=averaged)  # the uncompiled network given as is
    assert len(a) == 4 and [(p.labels, p.probabilities) for p in a] == [(p.labels, p.probabilities) for p in b]
    exported = trainrig.export(best, "torchscript", tmp_path / "m.ts", trust_class_path=True)
    assert exported.max_abs_diff < 1e-5


def test_compile_is_refused_where_it_is_untested(tiny_cfg):
    import pytest
    for strategy in ("fsdp", "model_parallel"):
        with pytest.raises(trainrig.ConfigError, match=f"model.compile: not with strategy {strategy}"):
            trainrig.fit(tiny_cfg("model.compile=true", f"strategy={strategy}", "devices=[cpu, cpu]"), progress="off")
