"""Ship a trained model: ONNX, TorchScript or safetensors, with its preprocessing written beside it.

Every export is checked before it is reported: the written file is read back with its own runtime
(onnxruntime, torch.jit.load, safetensors) and its outputs compared with the checkpoint's on a batch.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainrig.training import checkpoint
from trainrig.errors import ConfigError
from trainrig.trained.inference import Trained, load_trained


@dataclass(frozen=True)
class Exported:
    path: Path
    sidecar: Path
    max_abs_diff: float  # exported vs checkpoint outputs on a batch of test-like inputs
    max_abs_logit: float


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"export needs the '{module}' package: pip install 'trainrig[{extra}]'")


def _plain(model: nn.Module) -> nn.Module:
    """Float32, contiguous memory format, CPU: what every runtime reads."""
    return model.to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    _require("onnxscript", "export")
    _require("onnxruntime", "export")
    import onnxruntime

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                          input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A traced TorchScript module: torch 2.14 deprecates tracing (its warning is silenced here), but
    C++ and older runtimes still read these files; pt2 is the successor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda x: loaded(x)


def _pt2(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.export's ExportedProgram (any batch size), read back by torch.export.load."""
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda x: loaded(x)


def _safetensors(model: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    _require("safetensors", "export")
    from safetensors.torch import load_file, save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    import copy

    rebuilt = copy.deepcopy(model)
    rebuilt.load_state_dict(load_file(str(path)))
    return lambda x: rebuilt(x)


FORMATS = {"onnx": (".onnx", _onnx), "torchscript": (".ts", _torchscript), "pt2": (".pt2", _pt2),
           "safetensors": (".safetensors", _safetensors)}


def preprocessing(trained: Trained) -> dict:
    """What a consumer of the exported file must do to an image, and what the outputs mean."""
    cfg = trained.cfg
    return {"arch": cfg.model.class_path or cfg.model.arch, "classes": trained.classes,
            "input": {"layout": "NCHW", "dtype": "float32", "channels": cfg.model.in_channels,
                      "height": cfg.data.image_size, "width": cfg.data.image_size,
                      "resize": "shorter side to image size (antialiased), then centre crop",
                      "scale": "pixels / 255", "mean": cfg.data.mean, "std": cfg.data.std,
                      "normalize": cfg.data.normalize},
            "output": "logits (N, num_classes); softmax gives probabilities", "epoch": trained.epoch}


def export(checkpoint_path: str | Path, fmt: str, out: str | Path | None = None, *, force: bool = False,
           model: nn.Module | None = None, trust_class_path: bool = False) -> Exported:
    """Write ``fmt`` beside the checkpoint (``RUN/export/<name>.<ext>``) or to ``out``, plus ``.json``;
    ``trust_class_path``: see inference.load_trained."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    ext, write = FORMATS[fmt]
    checkpoint_path = Path(checkpoint_path)
    path = Path(out) if out else checkpoint_path.parent.parent / "export" / (checkpoint_path.stem + ext)
    sidecar = path.with_suffix(".json")
    checkpoint.check_writable(path, "--out")
    for p in (path, sidecar):
        if p.exists() and not force:
            raise ConfigError(f"{p} exists; choose --out or pass --force to replace it")
    trained = load_trained(checkpoint_path, model=model, trust_class_path=trust_class_path)
    cfg = trained.cfg
    net = _plain(trained.model)
    gen = torch.Generator().manual_seed(0)
    size, c = cfg.data.image_size, cfg.model.in_channels
    example = torch.randn(2, c, size, size, generator=gen)
    batch = torch.randn(5, c, size, size, generator=gen)  # another batch size than the example: dynamic axes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{ext}")
    try:
        with torch.no_grad():
            run = write(net, example, tmp)
            expected, got = net(batch), run(batch)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    checkpoint.atomic_write_text(sidecar, json.dumps(preprocessing(trained), indent=2) + "\n")
    return Exported(path, sidecar, float((expected - got).abs().max()), float(expected.abs().max()))
