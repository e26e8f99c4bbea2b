"""Bring your own data and model; use the trained model (predict, export).

Datasets are written here from real FashionMNIST images (installed by .ci/run), so "it learns" means
learning real clothes, whichever file format carries them.
"""
import csv
import json
import multiprocessing
import pickle

import pytest
import torch
import torchvision.io as tio
from typer.testing import CliRunner

import trainrig
from trainrig import data
from trainrig.cli import app
from trainrig.config import DataConfig
from trainrig.errors import ConfigError, DataError

from conftest import assert_exit_2, write_idx
from user_models import Pairs, TinyNet

runner = CliRunner()
CLASSES = data.idx.FAMILY["fashion_mnist"].classes
SMALL = ["model.class_path=user_models.TinyNet", "model.init_args={in_channels: 3}"]  # a test about a file
# format of colour images: a two-conv network learns it too
FOLDERS = [c.replace("/", "-") for c in CLASSES]  # "T-shirt/top" cannot be a folder name


@pytest.fixture(scope="session")
def fashion():
    """The first 1000 training and 300 test images of the real FashionMNIST."""
    if data.idx.complete(data.idx.SYSTEM_DIR) is None:
        pytest.skip("dataset-fashion-mnist not installed (.ci/run installs it)")
    t, _ = data.idx.load(data.idx.SYSTEM_DIR, download=False)
    return t["train_images"][:1000], t["train_labels"][:1000], t["test_images"][:300], t["test_labels"][:300]


def _fit(*overrides, **kw):
    base = ["epochs=1", "threads=2", "data.batch_size=32", "optim.name=adam", "optim.lr=2e-3", "name=own",
            "data.eval_batch_size=256"]
    return trainrig.fit(trainrig.load_config(None, [*base, *overrides]), progress="off", **kw)


def _write_pngs(folder, images, labels):
    for i, (x, y) in enumerate(zip(images, labels.tolist())):
        (folder / FOLDERS[y]).mkdir(parents=True, exist_ok=True)
        tio.write_png(x.unsqueeze(0), str(folder / FOLDERS[y] / f"{i:04d}.png"))


@pytest.fixture(scope="module")
def png_run(fashion, tmp_path_factory):
    """An ImageFolder of grey PNGs (train/ + test/: the validation split is held out of train/) and one epoch
    trained on it."""
    root = tmp_path_factory.mktemp("pngs")
    tx, ty, vx, vy = fashion
    _write_pngs(root / "train", tx, ty)
    _write_pngs(root / "test", vx, vy)
    lines = []
    result = _fit("data.name=imagefolder", f"data.root={root}", f"out_dir={root / 'runs'}",
                  callbacks=[Lines(lines)])
    return root, result, lines


class Lines(trainrig.Callback):
    def __init__(self, lines):
        self.lines = lines

    def on_message(self, run, text):
        self.lines.append(text)


def test_imagefolder_of_pngs_learns_and_keeps_class_names(png_run):
    root, result, lines = png_run
    assert result.history[0]["val_acc"] > 0.3  # 10 classes: chance is 0.1
    cfg = trainrig.load_config(result.run_dir / "config.yaml")
    assert cfg.data.classes == sorted(FOLDERS) and cfg.model.num_classes == 10 and cfg.model.in_channels == 1
    assert cfg.data.image_size == 28 and len(cfg.data.mean) == 1
    saved = torch.load(result.run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert saved["config"]["data"]["classes"] == sorted(FOLDERS)
    assert lines[0].startswith(f"data: imagefolder {root}") and "decoded once into memory" in lines[0]
    assert "899 train / 101 val / 300 test images, 1x28x28" in lines[0]  # val: 10% of train/, per class


def test_rgb_jpegs_of_another_size_in_one_folder(fashion, tmp_path):
    """RGB JPEGs, 40x48, randomly tinted (colour says nothing about the class), one folder split into train,
    validation (20%) and test (10%)."""
    tx, ty, _, _ = fashion
    gen = torch.Generator().manual_seed(0)
    big = torch.nn.functional.interpolate(tx[:600, None].float(), size=(40, 48), mode="bilinear")
    tint = torch.rand(600, 3, 1, 1, generator=gen) * 0.6 + 0.4
    rgb = (big * tint).round().clamp(0, 255).to(torch.uint8)
    for i, (x, y) in enumerate(zip(rgb, ty[:600].tolist())):
        (tmp_path / "photos" / FOLDERS[y]).mkdir(parents=True, exist_ok=True)
        tio.write_jpeg(x, str(tmp_path / "photos" / FOLDERS[y] / f"{i}.jpg"), quality=95)
    splits = data.load_splits(DataConfig(name="imagefolder", root=str(tmp_path / "photos"), val_fraction=0.2,
                                         image_size=32))
    assert splits.channels == 3 and splits.train_images.shape[1:] == (3, 32, 32)
    per_class = [dict(zip(FOLDERS, torch.bincount(ty[:600], minlength=10).tolist()))[c] for c in splits.classes]
    tested = [round(n * 0.1) for n in per_class]  # data.test_fraction first, then val_fraction of the rest
    assert torch.bincount(splits.test_labels, minlength=10).tolist() == tested  # stratified
    assert torch.bincount(splits.val_labels, minlength=10).tolist() == [round((n - t) * 0.2)
                                                                         for n, t in zip(per_class, tested)]
    again = data.load_splits(DataConfig(name="imagefolder", root=str(tmp_path / "photos"), val_fraction=0.2,
                                        image_size=32))
    assert torch.equal(again.test_images, splits.test_images)  # the split is seeded
    result = _fit("data.name=imagefolder", f"data.root={tmp_path / 'photos'}", "data.val_fraction=0.2",
                  "data.image_size=32", f"out_dir={tmp_path / 'runs'}", "data.batch_size=16", *SMALL)
    assert result.history[0]["val_acc"] > 0.3
    assert trainrig.load_config(result.run_dir / "config.yaml").model.in_channels == 3


def test_streamed_path_gives_the_cached_pixels(png_run):
    root = png_run[0]
    cfg = DataConfig(name="imagefolder", root=str(root), test_subset=64, subset=64)
    cached = data.load_splits(cfg)
    streamed = data.load_splits(DataConfig(**{**cfg.__dict__, "cache_mb": 0}))
    assert cached.in_memory and not streamed.in_memory
    assert "decoded per batch by a DataLoader" in streamed.description and "> data.cache_mb 0" in streamed.description
    for i in (0, 17, 63):
        assert torch.equal(streamed.test[i][0], cached.test_images[i])
    assert streamed.mean == cached.mean  # 64 images: the sample is the whole set


def test_cifar_python_and_binary_formats(fashion, tmp_path):
    tx, ty, vx, vy = fashion

    def as_cifar(x):  # 28x28 grey -> 32x32 RGB rows of 3072 bytes, CIFAR's channel-major order
        return torch.nn.functional.pad(x, (2, 2, 2, 2)).unsqueeze(1).expand(-1, 3, -1, -1).reshape(len(x), -1)

    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    chunks = torch.arange(1000).chunk(5)
    for i, idx in enumerate(chunks, 1):
        (py / f"data_batch_{i}").write_bytes(pickle.dumps(
            {"data": as_cifar(tx[idx]).numpy(), "labels": ty[idx].tolist(), "batch_label": f"batch {i}"}))
    (py / "test_batch").write_bytes(pickle.dumps({"data": as_cifar(vx).numpy(), "labels": vy.tolist()}))
    (py / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CLASSES)}))
    binary = tmp_path / "bin" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for i, idx in enumerate(chunks, 1):
        rows = torch.cat([ty[idx, None].to(torch.uint8), as_cifar(tx[idx])], 1)
        (binary / f"data_batch_{i}.bin").write_bytes(rows.numpy().tobytes())
    (binary / "test_batch.bin").write_bytes(torch.cat([vy[:, None].to(torch.uint8), as_cifar(vx)], 1).numpy().tobytes())
    (binary / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n")
    a = data.load_splits(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0))
    b = data.load_splits(DataConfig(name="cifar10", root=str(tmp_path / "bin"), val_fraction=0))
    assert a.classes == b.classes == CLASSES and a.channels == 3 and a.size == 32
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, vy)
    assert torch.equal(a.train_images[5, 0, 2:30, 2:30], tx[5])
    result = _fit("data.name=cifar10", f"data.root={tmp_path}", f"out_dir={tmp_path / 'runs'}", *SMALL)
    assert result.history[0]["val_acc"] > 0.3
    (py / "test_batch").write_bytes(pickle.dumps({"data": __import__("os").system}))  # code, not data
    data.cifar._read.cache_clear()
    with pytest.raises(DataError, match="refusing to load posix.system"):
        data.load_splits(DataConfig(name="cifar10", root=str(tmp_path)))


def test_mnist_format_files_train(fashion, tmp_path):
    """MNIST's IDX layout as torchvision leaves it (root/MNIST/raw), holding real clothes; 3-channel input."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    tx, ty, vx, vy = fashion
    for name, t in zip(data.idx.FILES.values(), (tx, ty, vx, vy)):
        write_idx(raw / name, t)
    result = _fit("data.name=mnist", f"data.root={tmp_path}", f"out_dir={tmp_path / 'runs'}", "model.in_channels=3")
    assert result.history[0]["val_acc"] > 0.3
    cfg = trainrig.load_config(result.run_dir / "config.yaml")
    assert cfg.data.classes == [str(d) for d in range(10)] and cfg.model.in_channels == 3 and len(cfg.data.std) == 3


def test_bad_images_and_classes_are_one_line_errors(png_run, tmp_path):
    root = tmp_path / "bad"
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        (root / "val" / cls).mkdir(parents=True)
        for i in range(3):
            tio.write_png(torch.full((1, 8, 8), 40 * i, dtype=torch.uint8), str(root / "train" / cls / f"{i}.png"))
        tio.write_png(torch.zeros(1, 8, 8, dtype=torch.uint8), str(root / "val" / cls / "0.png"))
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = DataConfig(name="imagefolder", root=str(root))
    for cache in (None, 0):  # decoded up front, or only headers read before a streamed run
        with pytest.raises(DataError, match=r"train/a/broken.png: not a readable image"):
            data.load_splits(DataConfig(**{**cfg.__dict__, "cache_mb": cache}))
    (root / "train" / "a" / "broken.png").unlink()
    (root / "val" / "c").mkdir()
    tio.write_png(torch.zeros(1, 8, 8, dtype=torch.uint8), str(root / "val" / "c" / "0.png"))
    with pytest.raises(DataError, match="class 'c' is in val/ but not in"):
        data.load_splits(cfg)
    (root / "train" / "c").mkdir()
    with pytest.raises(DataError, match="train/c: class 'c' has no images"):
        data.load_splits(cfg)
    result = runner.invoke(app, ["fit", "--set", "data.name=imagefolder", "--set", f"data.root={root}"])
    assert_exit_2(result, "train/c: class 'c' has no images")


def test_own_network_by_class_path(tmp_path):
    base = ["fit", "-c", "configs/smoke.yaml", "--quiet", "--set", f"out_dir={tmp_path}", "--set", "epochs=1",
            "--set", "data.synthetic_train=128"]
    ok = runner.invoke(app, [*base, "--set", "model.class_path=user_models.TinyNet",
                             "--set", "model.init_args={width: 8}"])
    assert ok.exit_code == 0, ok.output
    saved = torch.load(tmp_path / "smoke" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["model"]["head.weight"].shape == (10, 16)
    assert_exit_2(runner.invoke(app, [*base, "--set", "model.class_path=user_modelz.TinyNet"]),
                  "model.class_path: cannot import user_modelz.TinyNet (No module named 'user_modelz')")
    assert_exit_2(runner.invoke(app, [*base, "--set", "model.class_path=user_models.TinyNet",
                                      "--set", "model.init_args={depth: 3}"]),
                  "model.init_args: TinyNet.__init__() got an unexpected keyword argument 'depth'")
    assert_exit_2(runner.invoke(app, [*base, "--set", "model.class_path=user_models.WrongOutput"]),
                  "model: WrongOutput returns (2, 3) for a (2, 1, 28, 28) batch; expected logits of shape (2, 10)")
    assert_exit_2(runner.invoke(app, [*base, "--set", "model.arch=mobilenet_v2", "--set", "strategy=model_parallel",
                                      "--set", "devices=[cpu, cpu]"]),
                  "strategy=model_parallel splits torchvision ResNets")


@pytest.mark.parametrize("strategy", ["single", "ddp"])
def test_notebook_fit_with_own_module_and_datasets(fashion, tmp_path, strategy):
    tx, ty, vx, vy = fashion
    train, test = Pairs(tx, ty, list(CLASSES)), Pairs(vx, vy, list(CLASSES))
    loader = torch.utils.data.DataLoader(train, batch_size=64)  # contributes its dataset
    before = set(multiprocessing.active_children())
    result = _fit(f"out_dir={tmp_path}", f"strategy={strategy}", "devices=2", "threads=1", "epochs=2",
                  model=TinyNet(width=16), train_data=loader, test_data=test)
    assert result.history[-1]["val_acc"] > 0.3
    # the loaders' workers ended with the run (left to the garbage collector, a loader in a reference cycle
    # kept each worker 5 s, then had it killed: 15 s at the end of every spawned rank)
    assert set(multiprocessing.active_children()) <= before
    cfg = trainrig.load_config(result.run_dir / "config.yaml")
    assert cfg.model.class_path == "user_models.TinyNet" and cfg.data.classes == list(CLASSES)
    with pytest.raises(ConfigError, match="give both train_data and test_data"):
        trainrig.fit(trainrig.load_config(None), train_data=train)


def test_predict_gives_the_label_eval_gives(png_run, tmp_path):
    root, result, _ = png_run
    best = result.run_dir / "checkpoints" / "best.pt"
    preds = trainrig.predict(best, [root / "test"], top_k=3)
    assert len(preds) == 300 and all(len(p.classes) == 3 for p in preds)
    trained = trainrig.load_trained(best)
    splits = data.load_splits(trained.cfg.data, channels=1)
    test = data.build(trained.cfg.data, device=torch.device("cpu"), splits=splits).test
    with torch.no_grad():
        eval_labels = torch.cat([trained.model(x).argmax(1) for x, _ in test]).tolist()
    files = data.imagefolder.load(root)[2].paths  # the test files in the order eval saw them
    order = {str(f): i for i, f in enumerate(files)}
    assert [p.labels[0] for p in sorted(preds, key=lambda p: order[p.path])] == eval_labels
    assert all(p.classes[0] == trained.classes[p.labels[0]] and p.probabilities[0] >= p.probabilities[1]
               for p in preds)
    out = tmp_path / "pred.csv"
    res = runner.invoke(app, ["predict", "--checkpoint", str(best), str(files[0]), str(files[1]), "--out", str(out),
                              "--top-k", "2"])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2"] and len(rows) == 3
    assert rows[1][1] == trained.classes[eval_labels[0]] and float(rows[1][2]) >= float(rows[1][4])
    assert_exit_2(runner.invoke(app, ["predict", "--checkpoint", str(best), str(tmp_path / "nope.png")]),
                  f"{tmp_path / 'nope.png'}: no such file or folder")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2", "safetensors"])
def test_export_matches_the_checkpoint(png_run, tmp_path, fmt):
    root, result, _ = png_run
    best = result.run_dir / "checkpoints" / "best.pt"
    out = tmp_path / f"model.{fmt}"
    res = runner.invoke(app, ["export", "--checkpoint", str(best), "--format", fmt, "--out", str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["classes"] == sorted(FOLDERS) and meta["input"]["height"] == 28 and len(meta["input"]["mean"]) == 1
    trained = trainrig.load_trained(best)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained.model(x.contiguous(memory_format=torch.channels_last))
    if fmt == "onnx":
        import onnxruntime

        got = torch.from_numpy(onnxruntime.InferenceSession(str(out)).run(None, {"images": x.numpy()})[0])
    elif fmt == "torchscript":
        got = torch.jit.load(str(out))(x)
    elif fmt == "pt2":
        got = torch.export.load(str(out)).module()(x)
    else:
        net = trainrig.build_model(trained.cfg.model)
        net.load_state_dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out)))
        got = net.eval()(x)
    scale = expected.abs().max()
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * scale)  # float32 kernels differ by backend
    assert torch.equal(got.argmax(1), expected.argmax(1)) or fmt == "onnx"
    assert_exit_2(runner.invoke(app, ["export", "--checkpoint", str(best), "--format", fmt, "--out", str(out)]),
                  f"{out} exists; choose --out or pass --force")


def test_shipped_imagefolder_config_runs(png_run, tmp_path):
    res = runner.invoke(app, ["fit", "-c", "configs/imagefolder.yaml", "--quiet", "--set", f"data.root={png_run[0]}",
                              "--set", "model.weights=null", "--set", "epochs=1", "--set", "data.image_size=32",
                              "--set", "data.subset=256", "--set", "data.test_subset=128", "--set", f"out_dir={tmp_path}"])
    assert res.exit_code == 0, res.output
    cfg = trainrig.load_config(tmp_path / "imagefolder" / "config.yaml")
    assert cfg.data.image_size == 32 and cfg.data.classes == sorted(FOLDERS)


def test_cifar100_fine_labels_in_both_formats(tmp_path):
    """CIFAR-100 keeps coarse and fine labels: the fine ones (100 classes) are the labels, in both formats."""
    gen = torch.Generator().manual_seed(0)
    images = {s: torch.randint(0, 256, (n, 3072), generator=gen, dtype=torch.uint8) for s, n in (("train", 40), ("test", 20))}
    fine = {s: torch.randint(0, 100, (len(x),), generator=gen) for s, x in images.items()}
    names = [f"fine{i}" for i in range(100)]
    py, binary = tmp_path / "cifar-100-python", tmp_path / "b" / "cifar-100-binary"
    py.mkdir()
    binary.mkdir(parents=True)
    for split, x in images.items():
        (py / split).write_bytes(pickle.dumps({"data": x.numpy(), "fine_labels": fine[split].tolist(),
                                               "coarse_labels": (fine[split] // 5).tolist()}))
        rows = torch.cat([(fine[split] // 5)[:, None].to(torch.uint8), fine[split][:, None].to(torch.uint8), x], 1)
        (binary / f"{split}.bin").write_bytes(rows.numpy().tobytes())
    (py / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["c"] * 20}))
    (binary / "fine_label_names.txt").write_text("\n".join(names))
    a = data.load_splits(DataConfig(name="cifar100", root=str(tmp_path), val_fraction=0))
    b = data.load_splits(DataConfig(name="cifar100", root=str(tmp_path / "b"), val_fraction=0))
    assert a.classes == b.classes == tuple(names)
    assert torch.equal(a.train_labels, fine["train"]) and torch.equal(b.test_labels, fine["test"])
    assert torch.equal(a.train_images, images["train"].reshape(-1, 3, 32, 32))
    assert torch.equal(a.train_images, b.train_images)


def test_image_modes_become_uint8_grey_or_rgb(tmp_path):
    """Palette, 16-bit, 1-bit, RGBA, CMYK and BMP/TIFF files all come out as 8-bit grey or RGB pixels."""
    import numpy as np
    from PIL import Image

    from trainrig.data import images

    a = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)
    rgb = Image.fromarray(np.stack([a, 255 - a, a // 2], -1), "RGB")
    files = {"p.png": Image.fromarray(a, "L").convert("P"), "g16.png": Image.fromarray(a.astype(np.uint16) * 257),
             "rgba.png": rgb.convert("RGBA"), "c.bmp": rgb, "i.tif": Image.fromarray(a, "L").convert("I"),
             "cmyk.jpg": rgb.convert("CMYK"), "bw.png": Image.fromarray(a, "L").convert("1")}
    for name, img in files.items():
        img.save(tmp_path / name)
    grey = {name: images.load(tmp_path / name, 1, None) for name in files}
    for name in ("p.png", "g16.png", "i.tif"):
        assert torch.equal(grey[name][0], torch.from_numpy(a)), name
    assert set(grey["bw.png"].unique().tolist()) <= {0, 255}
    assert images.load(tmp_path / "c.bmp", 3, None).permute(1, 2, 0).numpy().tolist() == np.asarray(rgb).tolist()
    assert images.decode(tmp_path / "rgba.png").shape[0] == 4 and images.load(tmp_path / "rgba.png", 3, 32).shape == (3, 32, 32)
    cmyk = images.decode(tmp_path / "cmyk.jpg").int()  # converted by libjpeg: close to the RGB it came from
    assert cmyk.shape[0] == 3 and (cmyk - torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1).int()).abs().float().mean() < 8
