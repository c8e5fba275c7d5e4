"""Datasets as in-memory tensors with a validation split carved from the training set.

Every loader returns a :class:`DataSplits`: ``train``/``val``/``test`` :class:`~torch.utils.data.TensorDataset`
of normalised float images ``(N, C, H, W)`` and integer labels. Model selection uses ``val``, never ``test``.

>>> from prunekit.data import load_dataset, list_datasets
>>> "digits" in list_datasets()
True
>>> splits = load_dataset("digits")
>>> tuple(splits.train.tensors[0].shape[1:]), splits.num_classes
((1, 8, 8), 10)
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from prunekit.configs import Config, config_from_dict
from prunekit.registry import Registry

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DataNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are missing; the message says where we looked and how to fix it."""


@dataclass(frozen=True)
class DataConfig(Config):
    """Which dataset and how to split it.

    Args:
        name: Registered dataset name (``prunekit list datasets``).
        data_dir: Directory holding the files; ``None`` uses the dataset's default.
        val_fraction: Fraction of the training set held out for validation (0 < f < 1).
        seed: Seed of the train/validation split.
        limit: Keep only the first ``limit`` training examples (before the split), for quick runs.
    """

    name: str = "digits"
    data_dir: str | None = None
    val_fraction: float = 0.1
    seed: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            DATASETS.get(self.name)
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 10):
            raise ValueError(f"limit must be an int >= 10 or None, got {self.limit!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataConfig:
        return config_from_dict(cls, data)


@dataclass
class DataSplits:
    """Train/validation/test tensors and what a model needs to know about them."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    input_size: int
    config: DataConfig

    def describe(self) -> str:
        return (
            f"{self.config.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test, "
            f"{self.in_channels}x{self.input_size}x{self.input_size}, {self.num_classes} classes"
        )

    # What a pruning method reads of its data (a text task, prunekit.retrieval.RetrievalData, offers the same).

    def example_inputs(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` training images: what the channel engine traces and checks with."""
        return self.train[:n][0]

    def flops_inputs(self) -> tuple[int, ...]:
        """What FLOPs are counted on: the shape of one image, batch included."""
        return (1, self.in_channels, self.input_size, self.input_size)

    def scoring_batches(self, count: int, seed: int):
        """``count`` shuffled training batches of 64 (images, labels) for data-driven criteria and curvature."""
        loader = DataLoader(self.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
        for i, batch in enumerate(loader):
            if i >= count:
                return
            yield batch

    def accuracy(self, model: torch.nn.Module, split: str) -> float:
        """Top-1 accuracy of ``model`` on the ``"val"`` or ``"test"`` split."""
        from prunekit.training import evaluate

        return evaluate(model, {"val": self.val, "test": self.test}[split])["acc"]


# A raw loader returns (train_images, train_labels, test_images, test_labels, num_classes) as uint8/float
# numpy arrays of shape (N, C, H, W) and int labels.
RawLoader = Callable[[Path | None], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]
DATASETS: Registry[RawLoader] = Registry("dataset")


def list_datasets(pattern: str = "*") -> list[str]:
    return DATASETS.list(pattern)


def load_dataset(name: str | DataConfig = "digits", **kwargs) -> DataSplits:
    """Load a registered dataset, normalise it with training-set statistics and carve a validation split.

    Raises:
        ValueError: unknown dataset or bad split settings.
        DataNotFoundError: the files are not where they should be.
    """
    config = name if isinstance(name, DataConfig) else DataConfig(name=name, **kwargs)
    data_dir = Path(config.data_dir).expanduser() if config.data_dir else None
    x_train, y_train, x_test, y_test, num_classes = DATASETS.get(config.name)(data_dir)
    if config.limit is not None:
        x_train, y_train = x_train[: config.limit], y_train[: config.limit]
    x_train_t = torch.tensor(np.asarray(x_train), dtype=torch.float32)
    x_test_t = torch.tensor(np.asarray(x_test), dtype=torch.float32)
    # Per-channel statistics of the whole training set (before the split, so val shares train's scaling).
    mean = x_train_t.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train_t.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x_train_t = (x_train_t - mean) / std
    x_test_t = (x_test_t - mean) / std
    y_train_t = torch.as_tensor(y_train, dtype=torch.long)
    y_test_t = torch.as_tensor(y_test, dtype=torch.long)
    order = torch.randperm(len(x_train_t), generator=torch.Generator().manual_seed(config.seed))
    n_val = max(1, int(round(len(order) * config.val_fraction)))
    if n_val >= len(order):
        raise ValueError(f"val_fraction {config.val_fraction} of {len(order)} training examples leaves none to train "
                         "on; lower --val-fraction or raise --limit")
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    return DataSplits(
        train=TensorDataset(x_train_t[train_idx], y_train_t[train_idx]),
        val=TensorDataset(x_train_t[val_idx], y_train_t[val_idx]),
        test=TensorDataset(x_test_t, y_test_t),
        num_classes=num_classes,
        in_channels=x_train_t.shape[1],
        input_size=x_train_t.shape[2],
        config=config,
    )


# --------------------------------------------------------------------------------------------- IDX (MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST / Fashion-MNIST / KMNIST format), gzip-compressed or not.

    Raises:
        ValueError: the file is not a valid IDX file (bad magic, dtype code, or size).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path} is a damaged gzip file ({exc}); re-install or re-download it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x}; known: {sorted(_IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: expected {expected} data bytes for shape {shape}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file; used by tests and by users converting their own data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: Path, stem: str, dataset: str, how_to_install: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(
        f"{dataset}: {stem}[.gz] not found in {directory}; {how_to_install}"
    )


def load_idx_directory(directory: Path, dataset: str, how_to_install: str):
    """Load the four standard IDX files from ``directory`` (MNIST layout) as (N, 1, 28, 28) uint8 arrays."""
    if not directory.is_dir():
        raise DataNotFoundError(f"{dataset}: directory {directory} does not exist; {how_to_install}")
    arrays = {k: read_idx(_find_idx(directory, stem, dataset, how_to_install)) for k, stem in _IDX_STEMS.items()}
    x_train, x_test = arrays["train_images"], arrays["test_images"]
    if x_train.ndim != 3 or x_test.ndim != 3:
        raise ValueError(f"{dataset}: image files must be 3-D (N, H, W), got {x_train.shape} and {x_test.shape}")
    if len(x_train) != len(arrays["train_labels"]) or len(x_test) != len(arrays["test_labels"]):
        raise ValueError(f"{dataset}: image and label counts differ in {directory}")
    y_train, y_test = arrays["train_labels"].astype(np.int64), arrays["test_labels"].astype(np.int64)
    if y_train.ndim != 1 or y_test.ndim != 1 or (y_train < 0).any() or (y_test < 0).any():
        raise ValueError(f"{dataset}: label files must be 1-D with non-negative class ids in {directory}")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    warn_sparse_classes(dataset, np.concatenate([y_train, y_test]), num_classes)
    return x_train[:, None], y_train, x_test[:, None], y_test, num_classes


class SparseLabelsWarning(UserWarning):
    """Class ids with no example: the model gets an output for each, which usually means a bad label file."""


def warn_sparse_classes(dataset: str, labels: np.ndarray, num_classes: int) -> None:
    """Warn when fewer than all of ``0 .. num_classes - 1`` occur among ``labels`` (e.g. one stray label 255)."""
    used = np.unique(labels)
    if len(used) < num_classes:
        missing = sorted(set(range(num_classes)) - set(used.tolist()))
        shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        warnings.warn(f"{dataset}: the labels use {len(used)} of the class ids 0..{num_classes - 1} (largest "
                      f"{int(used.max())}), so the model gets {num_classes} outputs; no example has class "
                      f"{shown}. Check the label files", SparseLabelsWarning, stacklevel=3)


@DATASETS.register("fashion-mnist", help=f"Fashion-MNIST IDX files (default dir {FASHION_MNIST_DIR})")
def _fashion_mnist(data_dir: Path | None):
    return load_idx_directory(
        data_dir or Path(FASHION_MNIST_DIR),
        "fashion-mnist",
        "install them with `apt-get install dataset-fashion-mnist` "
        "or point --data-dir at a directory with the IDX files",
    )


@DATASETS.register("mnist", help="MNIST / KMNIST IDX files from --data-dir")
def _mnist(data_dir: Path | None):
    if data_dir is None:
        raise DataNotFoundError("mnist: no default location; pass --data-dir DIR holding the four IDX files")
    return load_idx_directory(data_dir, "mnist", "pass --data-dir DIR holding the four IDX files")


# ------------------------------------------------------------------------------------------------ digits


@DATASETS.register("digits", help="scikit-learn's embedded 8x8 digits (no download; the default)")
def _digits(data_dir: Path | None):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    # Fixed stratified 80/20 train/test split (digits ships no test set of its own).
    rng = np.random.default_rng(12345)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test_mask[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
    return images[~test_mask], labels[~test_mask], images[test_mask], labels[test_mask], 10


# ------------------------------------------------------------------------------------------------- CIFAR


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches that refuses anything but containers and numpy arrays (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "list"), ("builtins", "dict"),
        ("_codecs", "encode"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            raise ValueError(f"{path} is not a CIFAR python batch file: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path} lacks the keys b'data' and {label_key!r} of a CIFAR batch")
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: CIFAR data and labels must be numeric arrays ({exc})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: CIFAR data must be (N, 3072), got {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but labels of shape {labels.shape}; a CIFAR batch has one "
                         "label per image")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar(data_dir: Path | None, name: str, folder: str, train_files: list[str], test_file: str,
           label_key: bytes, num_classes: int):
    if data_dir is None:
        raise DataNotFoundError(
            f"{name}: no default location; pass --data-dir DIR (the {folder!r} folder of the python version, "
            "or its parent)"
        )
    directory = data_dir / folder if (data_dir / folder).is_dir() else data_dir
    missing = [f for f in [*train_files, test_file] if not (directory / f).is_file()]
    if missing:
        raise DataNotFoundError(f"{name}: {', '.join(missing)} not found in {directory}")
    parts = [_read_cifar_batch(directory / f, label_key) for f in train_files]
    x_test, y_test = _read_cifar_batch(directory / test_file, label_key)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    for labels, where in ((y_train, ", ".join(train_files)), (y_test, test_file)):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):
            raise ValueError(f"{name}: {where} holds label {int(bad[0])}; {name} labels are 0..{num_classes - 1}")
    return x_train, y_train, x_test, y_test, num_classes


@DATASETS.register("cifar10", help="CIFAR-10 python batches from --data-dir")
def _cifar10(data_dir: Path | None):
    return _cifar(data_dir, "cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                  "test_batch", b"labels", 10)


@DATASETS.register("cifar100", help="CIFAR-100 python files (fine labels) from --data-dir")
def _cifar100(data_dir: Path | None):
    return _cifar(data_dir, "cifar100", "cifar-100-python", ["train"], "test", b"fine_labels", 100)


# --------------------------------------------------------------------------------------------- synthetic


@DATASETS.register("synthetic", help="class-dependent Gaussian blobs, 1x12x12, 4 classes (tests)")
def _synthetic(data_dir: Path | None, n_train: int = 512, n_test: int = 128, classes: int = 4, side: int = 12):
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(classes, 1, side, side)).astype(np.float32)

    def draw(n: int):
        labels = rng.integers(0, classes, size=n)
        return prototypes[labels] + 0.8 * rng.normal(size=(n, 1, side, side)).astype(np.float32), labels

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_test, y_test, classes


# ------------------------------------------------------------------------------------------------- text tasks

TEXT_TASKS = ("wordnet-retrieval",)


@DATASETS.register("wordnet-retrieval", help="WordNet definition -> example sentence retrieval (text; Debian "
                                             "wordnet-base; with --model hf:FOLDER, a sentence encoder)")
def _wordnet_retrieval(data_dir: Path | None):
    raise ValueError("wordnet-retrieval is a text task, read with a sentence encoder's tokenizer: it prunes a "
                     "Hugging Face encoder (prunekit prune METHOD --model hf:FOLDER --data wordnet-retrieval; "
                     "prunekit.hf_job.load_hf_source in Python), and no image model trains or evaluates on it")
