"""Class labels through the data shards, and the feature classifier of fd_digits / fd_fashion."""
import pickle
import time

import numpy as np
import pytest
import torch
from conftest import require_fashion

from cmt_bench import classifier, data
from cmt_bench.config import DataConfig

DIGITS = DataConfig(dataset="digits", heldout_size=500, train_size=2000)  # the digits preset's split


# --- labels -----------------------------------------------------------------------------------

def test_digit_labels_round_trip_through_shards_and_match_sklearn(tmp_path):
    from sklearn.datasets import load_digits
    manifest = data.make_dataset(DIGITS.model_copy(update={"samples_per_record": 200}), seed=0, out_dir=tmp_path)
    assert set(manifest["labels"]) == {"train", "heldout"} and len(manifest["labels"]["train"]["shards"]) == 1
    pool = load_digits()
    truth: dict[bytes, set] = {}  # image bytes -> its label(s) in scikit-learn (a few images repeat)
    for image, label in zip(np.rint(pool.images * 255 / 16).astype(np.uint8), pool.target):
        truth.setdefault(image.tobytes(), set()).add(int(label))
    for split, n in (("train", 1297), ("heldout", 500)):
        images, labels = data.load_split(tmp_path, split), data.load_labels(tmp_path, split)
        assert labels.dtype == torch.int64 and labels.shape == (n,) and len(images) == n  # image globs skip labels_*
        raw = ((images + 1) * 127.5).round().to(torch.uint8).numpy()
        assert all(int(y) in truth[x[0].tobytes()] for x, y in zip(raw, labels))
    assert sorted(p.name for p in tmp_path.glob("labels_*")) == ["labels_heldout-000000.tar", "labels_train-000000.tar"]
    with pytest.raises(KeyError, match="no split 'test'"):
        data.load_labels(tmp_path, "test")


def test_toy_and_folder_data_have_no_labels(tmp_path):
    from PIL import Image
    toy = data.make_dataset(DataConfig(train_size=100, heldout_size=20), seed=0, out_dir=tmp_path / "toy")
    assert "labels" not in toy and data.load_labels(tmp_path / "toy", "train") is None
    assert not list((tmp_path / "toy").glob("labels_*"))
    for i in range(6):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    cfg = DataConfig(dataset="folder", path=str(tmp_path / "imgs"), heldout_size=2)
    data.make_dataset(cfg, seed=0, out_dir=tmp_path / "folder")
    assert data.load_labels(tmp_path / "folder", "heldout") is None
    assert data.make_labeled_splits(cfg, 0)[1] is None


def test_cifar10_labels_stay_with_their_images(tmp_path):
    """Fake python batches whose every pixel is its label: any misalignment shows."""
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 20)
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": np.repeat(labels[:, None], 3 * 32 * 32, 1).astype(np.uint8),
                         b"labels": labels.tolist()}, f)
    cfg = DataConfig(dataset="cifar10", path=str(tmp_path), train_size=60, heldout_size=15)
    plain = data.make_splits(cfg, 3)
    (train, heldout), (y_train, y_heldout) = data.make_labeled_splits(cfg, 3)
    assert np.array_equal(plain[0], train) and np.array_equal(plain[1], heldout)  # labels draw nothing
    for x, y in ((train, y_train), (heldout, y_heldout)):
        assert len(x) == len(y) and np.array_equal(x[:, 0, 0, 0], y) and np.array_equal(x.max((1, 2, 3)), y)


def test_fashion_labels_from_the_debian_package(tmp_path):
    require_fashion()
    cfg = DataConfig(dataset="fashion", train_size=3000, heldout_size=1000, pad_to=32)
    data.make_dataset(cfg, seed=0, out_dir=tmp_path)
    labels = data.load_labels(tmp_path, "train")
    assert labels.shape == (3000,) and set(labels.tolist()) == set(range(10))
    assert np.bincount(labels).min() > 200  # Fashion-MNIST is balanced: 10% per class
    assert data.load_split(tmp_path, "train").shape == (3000, 1, 32, 32)


# --- classifier -------------------------------------------------------------------------------

def _digits():
    (train, heldout), (y_train, y_heldout) = data.make_labeled_splits(DIGITS, 0)
    return data.as_float(train), torch.from_numpy(y_train), data.as_float(heldout), torch.from_numpy(y_heldout)


def test_digits_classifier_reaches_95_percent_held_out():
    x, y, x_held, y_held = _digits()
    assert len(x) == 1297 and len(x_held) == 500
    start = time.perf_counter()
    model = classifier.train_classifier(x, y, seed=0)
    seconds = time.perf_counter() - start
    acc = classifier.accuracy(model, x_held, y_held)
    print(f"digits classifier: {acc:.1%} held-out accuracy, trained in {seconds:.1f}s")
    assert acc >= 0.95 and seconds < 30


def test_training_is_deterministic_given_the_seed():
    x, y, _, _ = _digits()
    torch.manual_seed(123)
    a, b = (classifier.train_classifier(x[:300], y[:300], epochs=1, seed=7) for _ in range(2))
    after = torch.rand(1)
    c = classifier.train_classifier(x[:300], y[:300], epochs=1, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.weight, c.head.weight)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # the caller's global RNG is left as it was


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 32, 32), (3, 32, 32)])
def test_any_preset_size_and_save_load_in_one_file(tmp_path, shape):
    x, y = torch.rand(16, *shape) * 2 - 1, torch.arange(16) % 10
    model = classifier.train_classifier(x, y, epochs=1, batch_size=8, feature_dim=16, seed=0)
    assert model.features(x).shape == (16, 16) and model(x).shape == (16, 10)
    classifier.save(model, tmp_path / "clf.pt")
    raw = torch.load(tmp_path / "clf.pt", weights_only=True)
    assert raw["kwargs"] == {"channels": shape[0], "classes": 10, "feature_dim": 16, "widths": [32, 64, 128]}
    loaded = classifier.load(tmp_path / "clf.pt")
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="train the classifier first"):
        classifier.load(tmp_path / "none.pt")
    with pytest.raises(ValueError, match="need images"):
        classifier.train_classifier(x[0], y, epochs=1)
