import gzip

import pytest
import torch

from trainrig import data
from trainrig.config import DataConfig
from trainrig.errors import DataError

from conftest import write_idx


def test_read_idx_plain_and_gzip(tmp_path):
    arr = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    plain = write_idx(tmp_path / "a-idx3-ubyte", arr)
    gz = write_idx(tmp_path / "b-idx3-ubyte", arr, gz=True)
    assert torch.equal(data.read_idx(plain), arr)
    assert torch.equal(data.read_idx(gz), arr)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    assert data.read_idx(write_idx(tmp_path / "l-idx1-ubyte", labels)).tolist() == [3, 1, 4, 1, 5]


def test_read_idx_rejects_bad_files(tmp_path):
    arr = torch.zeros(4, 28, 28, dtype=torch.uint8)
    path = write_idx(tmp_path / "x-idx3-ubyte", arr)
    truncated = tmp_path / "t"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"declares shape \(4, 28, 28\).*holds 3126 bytes"):
        data.read_idx(truncated)
    bad_magic = tmp_path / "m"
    bad_magic.write_bytes(b"\x01\x02" + path.read_bytes()[2:])
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(bad_magic)
    wrong_type = tmp_path / "w"
    wrong_type.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01" + b"\x00" * 4))
    with pytest.raises(DataError, match="0x0d is not supported"):
        data.read_idx(wrong_type)


def test_lookup_order_and_verification(tmp_path, fake_fashion, monkeypatch):
    folder, parts = fake_fashion
    monkeypatch.setattr(data.idx, "SYSTEM_DIR", tmp_path / "no-system")
    monkeypatch.setenv("TRAINRIG_DATA", str(folder))
    found = data.idx.find(tmp_path / "empty-root", download=False)
    assert found["train_images"].parent == folder  # root empty -> $TRAINRIG_DATA
    tensors, _ = data.idx.load(tmp_path / "empty-root", download=False)
    assert torch.equal(tensors["train_images"], parts["train-images-idx3-ubyte"].to(torch.uint8))
    assert tensors["test_labels"].tolist() == (torch.arange(32) % 10).tolist()
    # data.root wins over $TRAINRIG_DATA, also in torchvision's FashionMNIST/raw layout
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in folder.iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    assert data.idx.find(tmp_path / "root", download=False)["test_labels"].parent == raw


def test_missing_data_error_lists_places_and_remedies(tmp_path, monkeypatch):
    monkeypatch.setattr(data.idx, "SYSTEM_DIR", tmp_path / "sys")
    monkeypatch.setenv("TRAINRIG_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as exc:
        data.idx.find(tmp_path / "root", download=False)
    msg = str(exc.value)
    for place in ("root", "env", "sys"):
        assert str(tmp_path / place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "TRAINRIG_DATA" in msg


def test_mismatched_counts_rejected(tmp_path, fake_fashion, monkeypatch):
    folder, _ = fake_fashion
    write_idx(folder / "t10k-labels-idx1-ubyte", torch.zeros(31, dtype=torch.uint8))
    (folder / "t10k-labels-idx1-ubyte.gz").unlink(missing_ok=True)
    with pytest.raises(DataError, match="31 labels for 32 images"):
        data.idx.load(folder, download=False)


def test_real_fashion_mnist_when_installed():
    """The Debian package (installed by .ci/run) holds the full, balanced dataset."""
    if data.idx.complete(data.idx.SYSTEM_DIR) is None:
        pytest.skip("dataset-fashion-mnist not installed (.ci/run installs it)")
    splits = data.load_splits(DataConfig(root=str(data.idx.SYSTEM_DIR)))
    assert splits.train_images.shape == (54000, 1, 28, 28) and splits.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(splits.train_labels).tolist() == [5400] * 10  # data.val_fraction 0.1, per class
    assert torch.bincount(splits.val_labels).tolist() == [600] * 10
    assert torch.bincount(splits.test_labels).tolist() == [1000] * 10
    assert abs(splits.mean[0] - 0.2860) < 1e-3 and abs(splits.std[0] - 0.3530) < 1e-3  # the published values
    assert splits.classes[0] == "T-shirt/top" and splits.in_memory


def _batches(cfg: DataConfig, **kw):
    return data.build(cfg, device=torch.device("cpu"), **kw)


def test_batches_cover_epoch_once_and_reshuffle():
    cfg = DataConfig(name="synthetic", synthetic_train=100, synthetic_test=30, batch_size=16, eval_batch_size=7,
                     val_fraction=0)
    train, _, test, splits = _batches(cfg, seed=3)
    assert len(train) == 7 and len(test) == 5
    x, y = next(iter(train))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    labels0 = torch.cat([y for _, y in train])
    assert sorted(labels0.tolist()) == sorted(splits.train_labels.tolist())
    train.set_epoch(1)
    labels1 = torch.cat([y for _, y in train])
    assert not torch.equal(labels0, labels1)
    train.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in train]), labels0)  # same epoch -> same order
    test64 = _batches(cfg, seed=3, dtype=torch.float64).test  # normalisation checked in float64
    xt = next(iter(test64))[0]
    expected = (splits.test_images[:1, 0].double() / 255 - splits.mean[0]) / splits.std[0]
    assert xt.dtype == torch.float64 and torch.allclose(xt[0, 0], expected[0], rtol=0, atol=1e-12)


def test_flip_and_crop_on_whole_batches():
    imgs = torch.arange(2 * 4 * 4, dtype=torch.uint8).reshape(2, 4, 4)
    tf = data.BatchTransform(mean=(0.0,), std=(1.0,), normalize=False, flip=True, channels_last=False)
    gen = torch.Generator().manual_seed(0)
    out = tf(imgs, torch.device("cpu"), gen) * 255
    for i in range(2):
        row = out[i, 0].round().to(torch.uint8)
        assert torch.equal(row, imgs[i]) or torch.equal(row, imgs[i].flip(-1))
    crop = data.BatchTransform(mean=(0.0,), std=(1.0,), normalize=False, crop_padding=1, channels_last=False)
    out = (crop(imgs, torch.device("cpu"), torch.Generator().manual_seed(1)) * 255).round()
    assert out.shape == (2, 1, 4, 4)
    padded = torch.nn.functional.pad(imgs.float(), (1, 1, 1, 1))
    for i in range(2):  # every crop is a 4x4 window of the zero-padded image
        windows = [padded[i, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i, 0], w) for w in windows)


def test_shards_count_each_test_sample_once():
    parts = [data.shard_indices(10, r, 3, None) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    perm = torch.randperm(10)
    train = [data.shard_indices(10, r, 3, perm) for r in range(3)]
    assert all(len(p) == 4 for p in train)  # padded to 12, like DistributedSampler


def test_dataloader_path_matches_memory_path():
    cfg = DataConfig(name="synthetic", synthetic_train=64, synthetic_test=40, batch_size=16, eval_batch_size=16)
    test_mem = _batches(cfg).test
    test_dl = _batches(DataConfig(**{**cfg.__dict__, "loader": "dataloader"})).test
    for (a, ya), (b, yb) in zip(test_mem, test_dl):
        assert torch.equal(ya, yb) and torch.allclose(a, b)
    train_dl, _, _, splits = _batches(DataConfig(**{**cfg.__dict__, "loader": "dataloader"}))
    assert sorted(torch.cat([y for _, y in train_dl]).tolist()) == sorted(splits.train_labels.tolist())


def test_subset():
    cfg = DataConfig(name="synthetic", synthetic_train=100, synthetic_test=50, subset=20, test_subset=10,
                     val_fraction=0)
    train, _, test, _ = _batches(cfg)
    assert train.num_samples == 20 and test.num_samples == 10


def test_each_rank_augments_with_its_own_stream_and_resume_repeats_it():
    """All images equal and left/right asymmetric, so a batch's flip mask can be read off the pixels."""
    n = 256
    image = torch.zeros(28, 28, dtype=torch.uint8)
    image[:, :7] = 255  # bright left edge
    splits = data.Splits(data.TensorSet(image.expand(n, 28, 28).clone(), torch.arange(n) % 10),
                         data.TensorSet(image[None], torch.zeros(1).long()), tuple("0123456789"), (0.0,), (1.0,),
                         1, 28, "test images")
    cfg = DataConfig(batch_size=64, flip=True, normalize=False)

    def masks(rank: int, epoch: int) -> torch.Tensor:
        train = data.build(cfg, device=torch.device("cpu"), seed=5, rank=rank, world=2, channels_last=False,
                           splits=splits)[0]
        train.set_epoch(epoch)
        return torch.cat([x[:, 0, 0, 0] < 0.5 for x, _ in train])  # True where the image was flipped

    rank0, rank1 = masks(0, 3), masks(1, 3)
    assert rank0.shape == rank1.shape == (n // 2,)
    assert 0.3 < rank0.float().mean() < 0.7 and 0.3 < rank1.float().mean() < 0.7
    assert not torch.equal(rank0, rank1)  # rank r's k-th batch is not flipped like rank 0's
    assert torch.equal(masks(0, 3), rank0) and torch.equal(masks(1, 3), rank1)  # a resumed epoch repeats it
    assert not torch.equal(masks(0, 4), rank0)
