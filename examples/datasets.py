"""Real datasets for the examples, loaded from packages installed on this machine (no downloads).

Each loader returns a :class:`Dataset` of float32 features scaled to zero mean and unit variance
(one scalar mean and std, taken from the training images) and int64 labels. Both come from
installed packages; nothing is downloaded at run time.

- ``fashion-mnist``: 60,000 train / 10,000 test 28x28 grayscale images, 10 classes, from the Debian
  package ``dataset-fashion-mnist`` (IDX files under ``/usr/share/datasets/fashion-mnist``).
- ``digits``: scikit-learn's ``load_digits()`` (1,797 8x8 images, 10 classes, shipped inside the
  scikit-learn wheel), split 75/25 into train and test with a fixed, stratified split.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "DatasetUnavailable", "DATASETS", "FASHION_MNIST_DIR", "load"]

#: Where the Debian package ``dataset-fashion-mnist`` puts its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_INSTALL = "sudo apt-get install -y dataset-fashion-mnist"


class DatasetUnavailable(RuntimeError):
    """The dataset's files or package are not installed; the message says how to install them."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split of a classification dataset.

    Attributes:
        name: the dataset's name (a key of :data:`DATASETS`).
        x_train, x_test: float32 features, shape ``(n, num_features)``, C-contiguous.
        y_train, y_test: int64 labels in ``[0, num_classes)``.
        num_classes: number of classes.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        """Features per example (784 for Fashion-MNIST, 64 for digits)."""
        return int(self.x_train.shape[1])


def _read_idx(path: Path, magic: int, header_bytes: int) -> np.ndarray:
    """The uint8 payload of a gzipped IDX file, after checking its magic number."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DatasetUnavailable(
            f"Fashion-MNIST file {path} is missing; install the dataset with: "
            f"{_FASHION_INSTALL}") from None
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetUnavailable(f"{path} is not an IDX file of the expected kind (magic "
                                 f"{found:#010x}, expected {magic:#010x})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes)


def _fashion_split(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(directory / f"{prefix}-images-idx3-ubyte.gz", 0x00000803, 16)
    labels = _read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801, 8)
    if images.size != labels.size * 784:
        raise DatasetUnavailable(f"{directory}/{prefix}-*: {images.size} pixels for "
                                 f"{labels.size} labels; the files are truncated or mismatched")
    return images.reshape(-1, 784), labels.astype(np.int64)


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x_train = x_train.astype(np.float32)
    x_test = x_test.astype(np.float32)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std


def load_fashion_mnist(directory: Path | str = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST from the IDX files in ``directory``.

    Raises DatasetUnavailable (naming the apt command) if the files are missing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetUnavailable(f"Fashion-MNIST is not installed ({directory} does not exist); "
                                 f"install it with: {_FASHION_INSTALL}")
    x_train, y_train = _fashion_split(directory, "train")
    x_test, y_test = _fashion_split(directory, "t10k")
    x_train, x_test = _standardize(x_train, x_test)
    return Dataset("fashion-mnist", x_train, y_train, x_test, y_test, 10)


def load_digits(test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's 8x8 digits, split with a fixed stratified split (the same for every run)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DatasetUnavailable("the digits dataset ships with scikit-learn; install it with: "
                                 "pip install scikit-learn") from None
    bunch = sk_load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, bunch.target, test_size=test_fraction, random_state=0, stratify=bunch.target)
    x_train, x_test = _standardize(x_train, x_test)
    return Dataset("digits", x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), 10)


#: Loaders by name, as accepted by the examples' ``--dataset`` flag.
DATASETS = {"fashion-mnist": load_fashion_mnist, "digits": load_digits}


def load(name: str) -> Dataset:
    """The dataset called ``name`` (a key of :data:`DATASETS`)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None
    return loader()
