"""Where image datasets come from. Each source returns (train, heldout) as uint8 arrays [N, C, H, W].

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


def _split(images: np.ndarray, cfg: DataConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-seed split of one pool: the first `heldout_size` of a permutation are held out, then
    at most `train_size` of the rest train."""
    if cfg.heldout_size >= len(images):
        raise ValueError(f"data.heldout_size={cfg.heldout_size} leaves no training images: "
                         f"the {cfg.dataset} pool has {len(images)}")
    order = rng.permutation(len(images))
    return images[order[cfg.heldout_size:][: cfg.train_size]], images[order[: cfg.heldout_size]]


def _subset(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most n images, drawn without replacement at a fixed seed (all of them, in order, if n >= N)."""
    return images if n >= len(images) else images[np.sort(rng.choice(len(images), n, replace=False))]


def digits(cfg: DataConfig, rng: np.random.Generator):
    """scikit-learn's 1,797 real 8x8 digits; grey levels 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits
    images = load_digits().images  # float 0..16, [N, 8, 8]
    return _split(np.rint(images * 255 / 16).astype(np.uint8)[:, None], cfg, rng)


def _read_idx_images(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, rows, cols)


def fashion(cfg: DataConfig, rng: np.random.Generator):
    """Fashion-MNIST's own split: 60k train, 10k test (held out)."""
    root = Path(cfg.path) if cfg.path else FASHION_DIR
    files = [root / f"{stem}-images-idx3-ubyte.gz" for stem in ("train", "t10k")]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing: {', '.join(missing)}. Install the Debian package "
            f"dataset-fashion-mnist (`make setup` does: apt-get install -y dataset-fashion-mnist), "
            f"or set data.path to a folder holding the idx .gz files.")
    train, heldout = (_read_idx_images(f) for f in files)
    return _subset(train, cfg.train_size, rng), _subset(heldout, cfg.heldout_size, rng)


def _need_path(cfg: DataConfig, what: str) -> Path:
    if cfg.path is None:
        raise ValueError(f"data.path is required for data.dataset={cfg.dataset!r}: {what}")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.path={cfg.path!r} does not exist ({what}); nothing is downloaded")
    return root


def folder(cfg: DataConfig, rng: np.random.Generator):
    """Every image under data.path (recursively), as `data.channels` channels at data.resolution."""
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
    return _split(images, cfg, rng)


def cifar10(cfg: DataConfig, rng: np.random.Generator):
    """CIFAR-10's python batches (data_batch_1..5 train, test_batch held out) under data.path."""
    root = _need_path(cfg, "the folder cifar-10-batches-py holding data_batch_1..5 and test_batch")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 python batches missing under {root}: {', '.join(missing)}")

    def batch(name: str) -> np.ndarray:
        with open(root / name, "rb") as f:  # the official format is a pickle; only local files are read
            return pickle.load(f, encoding="bytes")[b"data"].reshape(-1, 3, 32, 32)
    train = np.concatenate([batch(n) for n in names[:5]])
    return _subset(train, cfg.train_size, rng), _subset(batch("test_batch"), cfg.heldout_size, rng)


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
