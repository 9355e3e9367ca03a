"""Where image datasets come from. Each source returns (train, heldout) as uint8 arrays [N, C, H, W];
with `with_labels=True` it also returns their class labels (int64 [N], or None where the source has
none: image folders), so (train, heldout, train_labels, heldout_labels). Labels go through the
same permutation / subset as the images, and asking for them draws nothing more from `rng`, so the
images are the same either way.

Nothing here downloads: digits ship inside scikit-learn, Fashion-MNIST comes from the Debian
package `dataset-fashion-mnist` (the project's setup installs it), and image folders and CIFAR-10
are read from a local path given in params.
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from .config import DataConfig

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _split(images: np.ndarray, labels: np.ndarray | None, cfg: DataConfig, rng: np.random.Generator,
           with_labels: bool) -> tuple:
    """A fixed-seed split of one pool: the first `heldout_size` of a permutation are held out, then
    at most `train_size` of the rest train."""
    if cfg.heldout_size >= len(images):
        raise ValueError(f"data.heldout_size={cfg.heldout_size} leaves no training images: "
                         f"the {cfg.dataset} pool has {len(images)}")
    order = rng.permutation(len(images))
    train, heldout = order[cfg.heldout_size:][: cfg.train_size], order[: cfg.heldout_size]
    return _pick((images, images), (labels, labels), (train, heldout), with_labels)


def _subset_index(n_pool: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most n indices, drawn without replacement at a fixed seed (all of them, in order, if n >= N)."""
    return np.arange(n_pool) if n >= n_pool else np.sort(rng.choice(n_pool, n, replace=False))


def _pick(images: tuple, labels: tuple, index: tuple, with_labels: bool) -> tuple:
    """(train, heldout) images from their pools at their indices, then, if asked, their labels
    (None where a pool has none)."""
    out = tuple(x[i] for x, i in zip(images, index))
    return out + tuple(None if y is None else y[i] for y, i in zip(labels, index)) if with_labels else out


def digits(cfg: DataConfig, rng: np.random.Generator, with_labels: bool = False):
    """scikit-learn's 1,797 real 8x8 digits; grey levels 0..16 scaled to 0..255; labels 0..9."""
    from sklearn.datasets import load_digits
    pool = load_digits()  # images: float 0..16, [N, 8, 8]
    images = np.rint(pool.images * 255 / 16).astype(np.uint8)[:, None]
    return _split(images, pool.target.astype(np.int64), cfg, rng, with_labels)


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """An idx .gz file: a 4-byte magic, `dims` 4-byte big-endian sizes, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    shape = [int.from_bytes(raw[i:i + 4], "big") for i in range(4, 4 + 4 * dims, 4)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _read_idx_images(path: Path) -> np.ndarray:
    return _read_idx(path, 3)[:, None]


def fashion(cfg: DataConfig, rng: np.random.Generator, with_labels: bool = False):
    """Fashion-MNIST's own split: 60k train, 10k test (held out); labels 0..9 from its idx files."""
    root = Path(cfg.path) if cfg.path else FASHION_DIR
    kinds = ("images-idx3", "labels-idx1") if with_labels else ("images-idx3",)
    files = {(stem, kind): root / f"{stem}-{kind}-ubyte.gz" for kind in kinds for stem in ("train", "t10k")}
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing: {', '.join(missing)}. Install the Debian package "
            f"dataset-fashion-mnist (`make setup` does: apt-get install -y dataset-fashion-mnist), "
            f"or set data.path to a folder holding the idx .gz files.")
    images = tuple(_read_idx_images(files[stem, "images-idx3"]) for stem in ("train", "t10k"))
    labels = tuple(_read_idx(files[stem, "labels-idx1"], 1).astype(np.int64) if with_labels else None
                   for stem in ("train", "t10k"))
    index = (_subset_index(len(images[0]), cfg.train_size, rng), _subset_index(len(images[1]), cfg.heldout_size, rng))
    return _pick(images, labels, index, with_labels)


def _need_path(cfg: DataConfig, what: str) -> Path:
    if cfg.path is None:
        raise ValueError(f"data.path is required for data.dataset={cfg.dataset!r}: {what}")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.path={cfg.path!r} does not exist ({what}); nothing is downloaded")
    return root


def folder(cfg: DataConfig, rng: np.random.Generator, with_labels: bool = False):
    """Every image under data.path (recursively), as `data.channels` channels at data.resolution.
    No labels (None): sub-folder names are not taken to be classes."""
    from PIL import Image
    root = _need_path(cfg, "a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under data.path={cfg.path!r}")
    size = cfg.resolution or Image.open(files[0]).size[0]
    mode = {1: "L", 3: "RGB"}[cfg.channels]
    images = np.stack([np.asarray(Image.open(p).convert(mode).resize((size, size), Image.BICUBIC))
                       for p in files])
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return _split(images, None, cfg, rng, with_labels)


def cifar10(cfg: DataConfig, rng: np.random.Generator, with_labels: bool = False):
    """CIFAR-10's python batches (data_batch_1..5 train, test_batch held out) under data.path;
    labels 0..9 from the same batches."""
    root = _need_path(cfg, "the folder cifar-10-batches-py holding data_batch_1..5 and test_batch")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 python batches missing under {root}: {', '.join(missing)}")

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(root / name, "rb") as f:  # the official format is a pickle; only local files are read
            d = pickle.load(f, encoding="bytes")
        return d[b"data"].reshape(-1, 3, 32, 32), np.asarray(d[b"labels"], np.int64)
    train = [batch(n) for n in names[:5]]
    test = batch("test_batch")
    images = (np.concatenate([x for x, _ in train]), test[0])
    labels = (np.concatenate([y for _, y in train]), test[1])
    index = (_subset_index(len(images[0]), cfg.train_size, rng), _subset_index(len(images[1]), cfg.heldout_size, rng))
    return _pick(images, labels, index, with_labels)


def pad(images: np.ndarray, size: int | None) -> np.ndarray:
    """Zero-pad (black border) to size x size, e.g. 28 -> 32 for power-of-two UNet levels."""
    if size is None or size == images.shape[-1]:
        return images
    extra = size - images.shape[-1]
    if extra < 0:
        raise ValueError(f"data.pad_to={size} is smaller than the images ({images.shape[-1]} px)")
    lo = extra // 2
    return np.pad(images, ((0, 0), (0, 0), (lo, extra - lo), (lo, extra - lo)))


SOURCES = {"digits": digits, "fashion": fashion, "folder": folder, "cifar10": cifar10}
