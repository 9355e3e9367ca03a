"""Datasets as webdataset shards: 2-D toy points, images (uint8) and teacher trajectories.

Small samples are packed several to a tar member (`samples_per_record`), since each member costs
a 512-byte header. A manifest beside the shards records counts, shape, seed and each shard's
sha256. Images are stored as uint8 and come back as floats in [-1, 1].

Class labels of image datasets that have them (digits, fashion, cifar10) are stored as int64
shards `labels_train-*.tar` / `labels_heldout-*.tar` beside the images (a prefix the image globs
`train-*` / `heldout-*` do not match), under the manifest's `labels` key; `load_labels` reads them.
Toy points (the Gaussian mixture included) and image folders have none: no shards, no `labels` key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from . import sources
from .config import DataConfig
from .gmm import GaussianMixture


def toy(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if name == "checkerboard":  # 8 squares of a 4x4 board on [-2, 2]^2
        x = rng.uniform(-2, 2, n)
        y = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x) % 2
        pts = np.stack([x, y], 1)
    elif name == "eight_gaussians":
        angles = 2 * np.pi * rng.integers(0, 8, n) / 8
        pts = 2 * np.stack([np.cos(angles), np.sin(angles)], 1) + 0.15 * rng.standard_normal((n, 2))
    elif name == "two_moons":
        upper = rng.integers(0, 2, n).astype(bool)
        theta = rng.uniform(0, np.pi, n)
        pts = np.where(upper[:, None], np.stack([np.cos(theta), np.sin(theta)], 1),
                       np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1))
        pts = 1.5 * (pts - [0.5, 0.25]) + 0.05 * rng.standard_normal((n, 2))
    else:
        raise ValueError(f"unknown toy dataset {name!r}; allowed: checkerboard, eight_gaussians, two_moons")
    return pts.astype(np.float32)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shards(out_dir: Path, prefix: str, array: np.ndarray, per_record: int, per_shard: int) -> dict:
    """Write `array` (first axis = samples) as shards `<prefix>-NNNNNN.tar`; return its manifest entry."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # A fixed mtime makes the bytes (and so the sha256 in the manifest) a function of the data only.
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0, mtime=0.0) as sink:
        for i, start in enumerate(range(0, len(array), per_record)):
            sink.write({"__key__": f"{i:08d}", "x.npy": np.ascontiguousarray(array[start:start + per_record])})
    shards = sorted(out_dir.glob(f"{prefix}-*.tar"))
    return {"count": int(len(array)), "shape": list(array.shape[1:]),
            "shards": [{"name": p.name, "sha256": sha256(p)} for p in shards]}


def read_shards(out_dir: Path, prefix: str, verify: dict | None = None) -> torch.Tensor:
    """Read every record of `<prefix>-*.tar` in order; with a manifest entry, check hashes and count."""
    shards = sorted(out_dir.glob(f"{prefix}-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shards {prefix}-*.tar in {out_dir}: run the stage that writes them")
    if verify is not None:
        expected = {s["name"]: s["sha256"] for s in verify["shards"]}
        actual = {p.name: sha256(p) for p in shards}
        if actual != expected:
            raise ValueError(f"shards in {out_dir} do not match their manifest (changed or partial): rerun the stage")
    # Every DDP rank reads the whole split on purpose: training holds it in memory and each rank
    # draws its own batches from a (seed, stage, images seen, rank) generator, which makes a resumed
    # run exact. So no node splitting here, and reading is in order (no shard shuffle to seed).
    records = wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False,
                             nodesplitter=_every_shard).decode()
    array = as_float(np.concatenate([r["x.npy"] for r in records]))
    if verify is not None and len(array) != verify["count"]:
        raise ValueError(f"{out_dir}: read {len(array)} samples, manifest says {verify['count']}")
    return array


def _every_shard(urls):
    return urls


def as_float(array: np.ndarray) -> torch.Tensor:
    """Samples as float tensors: uint8 images map to [-1, 1], toy points stay as they are."""
    return torch.from_numpy(array).float() / 127.5 - 1 if array.dtype == np.uint8 else torch.from_numpy(array)


SPLITS = ("train", "heldout")
LABELS_PREFIX = "labels_"  # labels_train-*.tar: not matched by the image glob train-*.tar


def make_splits(cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """The train and held-out arrays as the data stage stores them (uint8 images, float32 points)."""
    return make_labeled_splits(cfg, seed)[0]


def make_labeled_splits(cfg: DataConfig, seed: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """([train, heldout], [train labels, heldout labels] or None where the data has no labels).
    The arrays are those of `make_splits`: labels take nothing from the seeded generator."""
    rng = np.random.default_rng(seed)
    if cfg.dataset == "gmm":  # the points only: a model is scored against the mixture, not its components
        mixture = GaussianMixture.from_config(cfg.gmm)
        return [mixture.sample(n, rng)[0] for n in (cfg.train_size, cfg.heldout_size)], None
    if not cfg.is_image:
        return [toy(cfg.dataset, n, rng) for n in (cfg.train_size, cfg.heldout_size)], None
    train, heldout, *labels = sources.SOURCES[cfg.dataset](cfg, rng, with_labels=True)
    return [sources.pad(x, cfg.pad_to) for x in (train, heldout)], None if labels[0] is None else labels


def make_dataset(cfg: DataConfig, seed: int, out_dir: Path) -> dict:
    """Write the train and held-out splits (and their labels, if any) as shards; return the
    manifest (also written)."""
    splits, labels = make_labeled_splits(cfg, seed)
    manifest = {"dataset": cfg.dataset, "seed": seed, "shape": list(splits[0].shape[1:]),
                "dtype": str(splits[0].dtype), "splits": {}}
    for split, array in zip(SPLITS, splits):
        manifest["splits"][split] = write_shards(out_dir, split, array, cfg.samples_per_record, cfg.records_per_shard)
    if labels is not None:  # unlabeled data keeps the manifest it always had
        manifest["labels"] = {split: write_shards(out_dir, LABELS_PREFIX + split, y, cfg.samples_per_record,
                                                  cfg.records_per_shard) for split, y in zip(SPLITS, labels)}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def data_shape(data_dir: Path) -> tuple[int, ...]:
    """The shape of one sample: (2,) for toy points, (C, H, W) for images."""
    return tuple(read_json(data_dir / "manifest.json")["shape"])


def load_split(data_dir: Path, split: str) -> torch.Tensor:
    manifest = read_json(data_dir / "manifest.json")
    return read_shards(data_dir, split, manifest["splits"][split])


def load_labels(data_dir: Path, split: str) -> torch.Tensor | None:
    """The class labels (int64, aligned with `load_split`) of `split`, or None if the data has none."""
    manifest = read_json(Path(data_dir) / "manifest.json")
    if "labels" not in manifest:
        return None
    if split not in manifest["labels"]:
        raise KeyError(f"no split {split!r} in {data_dir}; splits: {', '.join(manifest['labels'])}")
    return read_shards(Path(data_dir), LABELS_PREFIX + split, manifest["labels"][split]).long()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())
