"""fd_digits / fid_inception through the real torch-fidelity (no mocks of it): our registered
classifier extractor against a closed-form Frechet distance, the reference cache, and the clear
errors where Inception weights are missing."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.linalg
import torch

from cmt_bench import classifier, data, fidelity
from cmt_bench.config import DataConfig


@pytest.fixture(scope="module")
def digits():
    """The digits preset's split as stored (uint8), with their labels."""
    (train, heldout), (y_train, _) = data.make_labeled_splits(DataConfig(dataset="digits", heldout_size=500,
                                                                         train_size=2000), 0)
    return torch.from_numpy(train), torch.from_numpy(heldout), torch.from_numpy(y_train)


@pytest.fixture(scope="module")
def weights(digits, tmp_path_factory):
    train, _, labels = digits
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    classifier.save(classifier.train_classifier(data.as_float(train.numpy()), labels, epochs=5, seed=0), path)
    return path


def _fd(samples, weights, cache, reference=None, name="heldout", **kw):
    return fidelity.frechet_distance(samples, extractor="classifier", weights_path=weights, reference_cache=cache,
                                     reference_name=name, reference_images=reference, **kw)


def _noised(images, sigma, seed=0):
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def test_torch_fidelity_fd_equals_closed_form_on_classifier_features(digits, weights, tmp_path):
    train, heldout, _ = digits
    got = _fd(train, weights, tmp_path, heldout)["fd"]
    model = classifier.load(weights)
    with torch.no_grad():  # independent: our network on the stored bytes, scipy's matrix square root
        a, b = (model.features(data.as_float(x.numpy())).double().numpy() for x in (train, heldout))
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cross)
    assert a.shape == (1297, 64) and expected > 0.01
    assert got == pytest.approx(expected, rel=1e-3)


def test_identical_sets_score_zero_and_noise_scores_monotonically_higher(digits, weights, tmp_path):
    _, heldout, _ = digits
    assert abs(_fd(heldout, weights, tmp_path, heldout)["fd"]) < 1e-6 * _fd(_noised(heldout, 80), weights, tmp_path)["fd"]
    scores = [_fd(_noised(heldout, sigma), weights, tmp_path)["fd"] for sigma in (5, 20, 40, 80)]
    shifted = [_fd((heldout.int() + shift).clamp(0, 255).to(torch.uint8), weights, tmp_path)["fd"] for shift in (20, 60)]
    assert all(x < y for x, y in zip(scores, scores[1:])) and scores[0] > 0
    assert 0 < shifted[0] < shifted[1]


def test_reference_statistics_are_cached_once_and_reused(digits, weights, tmp_path):
    train, heldout, _ = digits
    cache = tmp_path / "reference"
    first = _fd(train, weights, cache, heldout, kid=True)
    files = fidelity.reference_files(cache, "heldout", "classifier", weights)
    assert sorted(p.name for p in cache.iterdir()) == sorted(files[k].name for k in ("info", "features", "stats"))
    assert files["stats"].name.endswith("-cmt-classifier-stat-fid-penultimate.pt")
    assert json.loads(files["info"].read_text())["count"] == 500
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix == ".pt"}
    again = _fd(train, weights, cache, None, kid=True)  # from the cache alone: no images given
    assert again == first and set(first) == {"fd", "kd", "kd_std"} and np.isfinite(first["kd"])
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # read, not recomputed
    with pytest.raises(ValueError, match="computed from other reference images"):
        _fd(train, weights, cache, train)
    with pytest.raises(FileNotFoundError, match="pass reference_images once"):
        _fd(train, weights, cache, None, name="never_computed")


def test_other_classifier_weights_never_reuse_a_cache(digits, weights, tmp_path):
    train, heldout, labels = digits
    other = tmp_path / "other.pt"
    classifier.save(classifier.train_classifier(data.as_float(train.numpy()), labels, epochs=1, seed=1), other)
    a, b = _fd(train, weights, tmp_path, heldout), _fd(train, other, tmp_path, heldout)
    assert a != b and len(list(tmp_path.glob("heldout-*-stat-fid-*.pt"))) == 2
    with pytest.raises(FileNotFoundError, match="train the classifier first"):
        _fd(train, tmp_path / "missing.pt", tmp_path, heldout)


def test_fid_inception_without_local_weights_fails_at_once_and_offline(digits, tmp_path, monkeypatch):
    connects = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: connects.append(a) or 1 / 0)
    _, heldout, _ = digits
    for path in (None, tmp_path / "weights-inception.pth"):
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match=r"evaluate\.inception_weights.*never downloaded"):
            fidelity.frechet_distance(heldout, extractor="inception", weights_path=path, reference_cache=tmp_path,
                                      reference_name="heldout", reference_images=heldout)
        assert time.perf_counter() - start < 1
    assert not connects and not list(tmp_path.iterdir())


def test_inception_weights_must_be_plain_tensors(digits, tmp_path):
    """torch-fidelity loads the file with weights_only=False; we refuse anything but tensors first."""
    _, heldout, _ = digits
    torch.save({"not": np.arange(3)}, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        fidelity.frechet_distance(heldout, extractor="inception", weights_path=tmp_path / "bad.pth",
                                  reference_cache=tmp_path, reference_name="r", reference_images=heldout)


def test_fid_inception_from_a_local_file_on_grey_images(digits, tmp_path, monkeypatch):
    """torch-fidelity's own Inception (random weights here: the real ones cannot be fetched), fed
    1-channel 8x8 digits: we repeat them to RGB, it resizes to 299x299 itself."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception
    with monkeypatch.context() as m:  # only to make a weights file of the right layout
        m.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        m.setattr(inception, "load_state_dict_from_url", lambda *a, **k: None)
        torch.manual_seed(0)
        torch.save(inception.FeatureExtractorInceptionV3("x", ["2048"]).state_dict(), tmp_path / "inception.pth")
    _, heldout, _ = digits
    out = fidelity.frechet_distance(heldout[:4], extractor="inception", weights_path=tmp_path / "inception.pth",
                                    reference_cache=tmp_path / "cache", reference_name="heldout",
                                    reference_images=heldout[4:8])
    assert np.isfinite(out["fd"])
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(n.endswith("-inception-v3-compat-stat-fid-2048.pt") for n in names) and len(names) == 3


def test_to_uint8_inverts_as_float_and_clamps():
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(fidelity.to_uint8(data.as_float(every.numpy())), every)
    assert fidelity.to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0])).tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="NaN"):
        fidelity.to_uint8(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="uint8 tensor"):
        fidelity.frechet_distance(torch.zeros(2, 1, 8, 8), extractor="classifier", weights_path=None,
                                  reference_cache="x", reference_name="r")


def test_torch_fidelity_imports_without_torchvision():
    """A fresh interpreter: torchvision is absent, so placeholders stand in and torch-fidelity imports."""
    code = ("import importlib.util, sys\n"
            "assert importlib.util.find_spec('torchvision') is None, 'torchvision is installed'\n"
            "import cmt_bench.fidelity, torch_fidelity\n"
            "from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY as r\n"
            "assert r['cmt-classifier'] is cmt_bench.fidelity.ClassifierFeatures\n"
            "import torchvision.datasets\n"
            "try:\n    torchvision.datasets.CIFAR10('root')\nexcept ImportError as e:\n    print(e)\n"
            "print(torch_fidelity.__version__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(data.Path(__file__).resolve().parents[1])})
    if "torchvision is installed" in out.stderr:
        pytest.skip("the real torchvision is installed here")
    assert out.returncode == 0, out.stderr
    assert "torchvision is not installed" in out.stdout and out.stdout.strip().endswith("0.4.0")
