"""Datasets: the IDX and CIFAR readers against files written here, the validation split, normalisation with
training statistics, helpful errors for missing files, and the config's validation and round trip."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.data import (
    DATASETS,
    FASHION_MNIST_DIR,
    DataConfig,
    DataNotFoundError,
    SparseLabelsWarning,
    list_datasets,
    load_dataset,
    read_idx,
    write_idx,
)

# ----------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(5,), (3, 4, 6), (2, 3, 2, 2)])
def test_idx_round_trip(tmp_path, suffix, shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / f"x-idx{suffix}"
    write_idx(path, array)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzip-compressed
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_idx_header_layout(tmp_path):
    """The file is the documented IDX layout: 0, 0, dtype 0x08, ndim, big-endian uint32 sizes, raw bytes."""
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    write_idx(tmp_path / "x", array)
    assert (tmp_path / "x").read_bytes() == bytes([0, 0, 8, 2]) + struct.pack(">II", 2, 3) + bytes(range(6))


def test_idx_reads_big_endian_int32(tmp_path):
    values = np.array([[1, -2, 70000], [3, 4, -5]], dtype=">i4")
    (tmp_path / "x").write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">II", 2, 3) + values.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), values.astype(np.int32))


def _valid_idx_bytes() -> bytes:
    return bytes([0, 0, 8, 2]) + struct.pack(">II", 2, 3) + bytes(6)


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),
        (b"\x00", "bad magic"),
        (b"", "bad magic"),
        (b"\x00\x00\x42\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX dtype code 0x42"),
        (bytes([0, 0, 8, 3]) + struct.pack(">I", 2), "truncated IDX header"),
        (_valid_idx_bytes()[:-1], "expected 6 data bytes for shape \\(2, 3\\), found 5"),
        (_valid_idx_bytes() + b"\x00", "expected 6 data bytes for shape \\(2, 3\\), found 7"),
    ],
    ids=["magic", "one-byte", "empty", "dtype", "header", "truncated", "trailing"],
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_rejects_bad_files(tmp_path, raw, match, suffix):
    path = tmp_path / f"bad{suffix}"
    if suffix:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_idx_truncated_gzip_stream_gives_value_error(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((10, 28, 28), np.uint8))
    raw = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError):
        read_idx(tmp_path / "cut.gz")


def test_idx_non_gzip_data_in_gz_file_gives_value_error(tmp_path):
    (tmp_path / "plain.gz").write_bytes(_valid_idx_bytes())  # an uncompressed IDX file under a .gz name
    with pytest.raises(ValueError):
        read_idx(tmp_path / "plain.gz")


# -------------------------------------------------------------------------------------------- MNIST layout


def _write_mnist(directory: Path, n_train=40, n_test=12, side=28, classes=10, gz=False, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % classes).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % classes).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(directory / (stem + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_directory(tmp_path, gz):
    raw = _write_mnist(tmp_path, gz=gz)
    splits = load_dataset("mnist", data_dir=str(tmp_path))
    assert (splits.in_channels, splits.input_size, splits.num_classes) == (1, 28, 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (36, 4, 12)
    assert splits.train.tensors[0].shape == (36, 1, 28, 28) and splits.train.tensors[0].dtype == torch.float32
    # Oracle: the test split is the raw test images scaled with the raw training set's mean and std.
    train = raw["train-images-idx3-ubyte"].astype(np.float64)
    expected = (raw["t10k-images-idx3-ubyte"].astype(np.float64) - train.mean()) / train.std(ddof=1)
    np.testing.assert_allclose(splits.test.tensors[0][:, 0].numpy(), expected, atol=1e-4)
    assert torch.equal(splits.test.tensors[1], torch.as_tensor(raw["t10k-labels-idx1-ubyte"], dtype=torch.long))


def test_mnist_needs_a_directory():
    with pytest.raises(DataNotFoundError, match="mnist: no default location; pass --data-dir"):
        load_dataset("mnist")


def test_mnist_missing_one_file(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found in " + str(tmp_path)):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_mnist_label_count_mismatch(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(39, np.uint8))
    with pytest.raises(ValueError, match="image and label counts differ"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_fashion_mnist_empty_dir_says_how_to_install(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_fashion_mnist_missing_dir_says_where_it_looked(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError, match=f"directory {missing} does not exist") as info:
        load_dataset("fashion-mnist", data_dir=str(missing))
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason=f"no Fashion-MNIST in {FASHION_MNIST_DIR}")
def test_real_fashion_mnist():
    splits = load_dataset("fashion-mnist")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54_000, 6_000, 10_000)
    assert (splits.in_channels, splits.input_size, splits.num_classes) == (1, 28, 10)
    assert splits.train.tensors[0].shape[1:] == (1, 28, 28)
    assert set(splits.test.tensors[1].tolist()) == set(range(10))
    assert splits.describe() == "fashion-mnist: 54000 train / 6000 val / 10000 test, 1x28x28, 10 classes"


def test_a_stray_label_warns_about_empty_classes(tmp_path):
    raw = _write_mnist(tmp_path, classes=3)
    labels = raw["train-labels-idx1-ubyte"].copy()
    labels[0] = 255  # one corrupted label makes a 256-class problem
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.warns(SparseLabelsWarning, match=r"the labels use 4 of the class ids 0\.\.255 \(largest 255\), so "
                                                  r"the model gets 256 outputs; no example has class 3, 4, 5, 6, 7 and "
                                                  r"247 more"):
        splits = load_dataset("mnist", data_dir=str(tmp_path))
    assert splits.num_classes == 256


def test_dense_labels_do_not_warn(tmp_path):
    _write_mnist(tmp_path, classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("mnist", data_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------- CIFAR


def _cifar_batch(n: int, label_key: bytes, classes: int, rng: np.random.Generator) -> dict:
    return {
        b"batch_label": b"test batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, classes, n)],
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def _dump(path: Path, obj, protocol: int = 2) -> None:
    """Protocol 2, as the real CIFAR files (written by Python 2) use."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _write_cifar10(root: Path, n: int = 6) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": _cifar_batch(n, b"labels", 10, rng) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(n, b"labels", 10, rng)
    for name, batch in batches.items():
        _dump(folder / name, batch)
    return batches


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_python_batches(tmp_path, point_at):
    batches = _write_cifar10(tmp_path)
    data_dir = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    splits = load_dataset("cifar10", data_dir=str(data_dir), val_fraction=0.2)
    assert (splits.in_channels, splits.input_size, splits.num_classes) == (3, 32, 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 6)
    # Oracle: rows are channel-major (R plane, G plane, B plane), scaled per channel with training statistics.
    train = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    mean = train.astype(np.float64).mean(axis=(0, 2, 3), keepdims=True)
    std = train.astype(np.float64).std(axis=(0, 2, 3), ddof=1, keepdims=True)
    test = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32)
    np.testing.assert_allclose(splits.test.tensors[0].numpy(), (test - mean) / std, atol=1e-4)
    assert splits.test.tensors[1].tolist() == batches["test_batch"][b"labels"]


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = _cifar_batch(20, b"fine_labels", 100, rng), _cifar_batch(5, b"fine_labels", 100, rng)
    train[b"coarse_labels"] = [0] * 20  # present in the real files, must be ignored
    test[b"coarse_labels"] = [0] * 5
    _dump(folder / "train", train)
    _dump(folder / "test", test)
    splits = load_dataset("cifar100", data_dir=str(tmp_path))
    assert (splits.in_channels, splits.input_size, splits.num_classes) == (3, 32, 100)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 5)
    assert splits.test.tensors[1].tolist() == test[b"fine_labels"]
    all_train_labels = torch.cat([splits.train.tensors[1], splits.val.tensors[1]]).sort().values
    assert all_train_labels.tolist() == sorted(train[b"fine_labels"])


def test_cifar_batch_with_numpy_labels_and_default_protocol(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 10), ("test", 4)):
        batch = _cifar_batch(n, b"fine_labels", 100, rng)
        batch[b"fine_labels"] = np.asarray(batch[b"fine_labels"], dtype=np.int64)
        _dump(folder / name, batch, protocol=pickle.DEFAULT_PROTOCOL)
    assert len(load_dataset("cifar100", data_dir=str(tmp_path)).test) == 4


class _Exploit:
    """Unpickling this would run a shell command (creating ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_code_in_pickles(tmp_path):
    batches = _write_cifar10(tmp_path, n=2)
    marker = tmp_path / "pwned"
    evil = dict(batches["data_batch_3"])
    evil[b"batch_label"] = _Exploit(marker)
    _dump(tmp_path / "cifar-10-batches-py" / "data_batch_3", evil)
    with pytest.raises(ValueError, match=r"data_batch_3 is not a CIFAR python batch file: refusing to load "
                                         r"(posix|nt|os)\.system"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "batch,match",
    [
        ({b"data": np.zeros((2, 3072), np.uint8)}, r"lacks the keys b'data' and b'labels'"),
        ([1, 2, 3], r"lacks the keys"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"must be \(N, 3072\), got \(2, 100\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"test_batch holds label 10; cifar10 labels "
                                                                         r"are 0\.\.9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 0]}, r"holds label -1"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"2 images but labels of shape \(1,\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, r"must be numeric arrays"),
    ],
    ids=["no-labels", "not-a-dict", "wrong-width", "label-too-large", "label-negative", "label-count",
         "label-text"],
)
def test_cifar_rejects_malformed_batches(tmp_path, batch, match):
    _write_cifar10(tmp_path, n=2)
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", batch)
    with pytest.raises(ValueError, match=match):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_rejects_garbage_file(tmp_path):
    _write_cifar10(tmp_path, n=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR python batch file"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_missing_files_are_named(tmp_path):
    _write_cifar10(tmp_path, n=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataNotFoundError, match="cifar10: data_batch_4, test_batch not found in"):
        load_dataset("cifar10", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_needs_a_directory(name):
    with pytest.raises(DataNotFoundError, match=f"{name}: no default location; pass --data-dir"):
        load_dataset(name)


# ----------------------------------------------------------------------------------- split and normalisation


def _rows(t: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in t}


def test_validation_split_is_disjoint_and_complete(synthetic):
    train, val = synthetic.train.tensors[0], synthetic.val.tensors[0]
    assert (len(train), len(val)) == (461, 51)  # round(512 * 0.1) = 51
    assert not _rows(train) & _rows(val)
    assert len(_rows(torch.cat([train, val]))) == 512  # nothing lost, nothing duplicated


@pytest.mark.parametrize("fraction,n_val", [(0.1, 51), (0.25, 128), (0.5, 256), (0.001, 1)])
def test_validation_split_sizes(fraction, n_val):
    splits = load_dataset("synthetic", val_fraction=fraction)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (512 - n_val, n_val, 128)


def test_validation_split_is_deterministic_for_a_seed():
    a, b = load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=3)
    c = load_dataset("synthetic", seed=4)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0]) and torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert _rows(a.val.tensors[0]) != _rows(c.val.tensors[0])
    assert torch.equal(a.test.tensors[0], c.test.tensors[0])  # the test set never depends on the split seed


def test_limit_keeps_the_first_examples():
    splits = load_dataset("synthetic", limit=100)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 128)
    x_train, *_ = DATASETS.get("synthetic")(None)
    first = torch.tensor(x_train[:100])
    pool = torch.cat([splits.train.tensors[0], splits.val.tensors[0]])
    mean, std = first.mean(dim=(0, 2, 3), keepdim=True), first.std(dim=(0, 2, 3), keepdim=True)
    assert _rows(pool) == _rows((first - mean) / std)


def test_split_never_leaves_training_empty():
    try:
        splits = load_dataset("synthetic", limit=10, val_fraction=0.96)
    except ValueError:
        return
    assert len(splits.train) > 0


def test_normalisation_uses_training_statistics(synthetic):
    """Train+val (the training pool) is standardised per channel; test is scaled with the *pool's* statistics."""
    pool = torch.cat([synthetic.train.tensors[0], synthetic.val.tensors[0]]).double()
    assert pool.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (pool.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-5
    x_train, _, x_test, _, _ = DATASETS.get("synthetic")(None)
    mean, std = x_train.astype(np.float64).mean(), x_train.astype(np.float64).std(ddof=1)
    np.testing.assert_allclose(synthetic.test.tensors[0].numpy(), (x_test - mean) / std, atol=1e-4)


# --------------------------------------------------------------------------------------- digits, synthetic


def test_digits_is_the_embedded_default(digits):
    assert DataConfig().name == "digits" and load_dataset().config.name == "digits"
    assert (digits.in_channels, digits.input_size, digits.num_classes) == (1, 8, 10)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert set(digits.test.tensors[1].tolist()) == set(range(10))
    assert digits.describe().startswith("digits: ")


def test_registered_datasets():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion-mnist", "mnist", "synthetic",
                               "wordnet-retrieval"]
    assert list_datasets("cifar*") == ["cifar10", "cifar100"]


# ------------------------------------------------------------------------------------------------ DataConfig


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "imagenet"}, r"unknown dataset 'imagenet'; known datasets: cifar10, cifar100, digits"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\), got 0.0"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\), got 1.0"),
        ({"val_fraction": -0.2}, r"val_fraction must be in \(0, 1\), got -0.2"),
        ({"limit": 5}, r"limit must be an int >= 10 or None, got 5"),
        ({"limit": 100.0}, r"limit must be an int >= 10 or None, got 100.0"),
    ],
)
def test_data_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_data_config_round_trips_through_dict_and_json():
    config = DataConfig(name="mnist", data_dir="/data/mnist", val_fraction=0.2, seed=7, limit=1000)
    assert DataConfig.from_dict(config.to_dict()) == config
    assert DataConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert load_dataset("synthetic", seed=5).config == DataConfig(name="synthetic", seed=5)
