import numpy as np
import pytest
import torch

from cmt_bench import data, metrics
from cmt_bench.config import DataConfig


@pytest.mark.parametrize("name", ["checkerboard", "eight_gaussians", "two_moons"])
def test_toy_datasets_are_seeded_and_bounded(name):
    a, b = data.toy(name, 5000, np.random.default_rng(1)), data.toy(name, 5000, np.random.default_rng(1))
    assert a.shape == (5000, 2) and a.dtype == np.float32 and np.array_equal(a, b)
    assert np.abs(a).max() < 3.5 and a.std() > 0.5


def test_checkerboard_fills_alternate_squares():
    x = data.toy("checkerboard", 20000, np.random.default_rng(0))
    cells = (np.floor(x[:, 0]) + np.floor(x[:, 1])) % 2
    assert np.all(cells == cells[0]) and len(np.unique(np.floor(x), axis=0)) == 8


def test_shards_round_trip_with_manifest(tmp_path):
    cfg = DataConfig(train_size=2500, heldout_size=300, samples_per_record=100, records_per_shard=4)
    manifest = data.make_dataset(cfg, seed=3, out_dir=tmp_path)
    train = data.load_split(tmp_path, "train")
    assert train.shape == (2500, 2) and manifest["splits"]["train"]["count"] == 2500
    assert len(manifest["splits"]["train"]["shards"]) == 7  # 25 records, 4 per shard
    assert torch.equal(train, torch.from_numpy(data.toy("checkerboard", 2500, np.random.default_rng(3))))
    again = data.make_dataset(cfg, seed=3, out_dir=tmp_path / "again")
    assert again == manifest  # same seed, same bytes


def test_changed_shard_is_refused(tmp_path):
    data.make_dataset(DataConfig(train_size=500, heldout_size=100, samples_per_record=100), 0, tmp_path)
    shard = sorted(tmp_path.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-1024])
    with pytest.raises(ValueError, match="do not match their manifest"):
        data.load_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="run the stage"):
        data.read_shards(tmp_path, "nothing")


def test_fd_raw_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal([0, 0], [1.0, 2.0], size=(200_000, 2))
    b = rng.normal([1, -1], [0.5, 2.0], size=(200_000, 2))
    exact = 1 + 1 + (1.0 - 0.5) ** 2 + (2.0 - 2.0) ** 2  # |mu_a - mu_b|^2 + sum (s_a - s_b)^2, diagonal covs
    assert metrics.fd_raw(a, b) == pytest.approx(exact, rel=0.02)
    assert metrics.fd_raw(a, a) == pytest.approx(0, abs=1e-9)


def test_sliced_wasserstein_of_a_shift():
    """Shifting a set by d moves every projection by d.theta, so SW_2 = |d| / sqrt(dim) on average."""
    x = np.random.default_rng(1).standard_normal((4000, 2))
    d = np.array([0.3, -0.4])
    assert metrics.sliced_wasserstein(x, x) == 0
    assert metrics.sliced_wasserstein(x, x + d, projections=2000) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_sliced_wasserstein_equal_and_unequal_sizes_agree():
    """The sorted fast path (equal sizes) and the quantile path (unequal) are one definition:
    repeating every point of a set leaves its empirical distribution, and so SW, unchanged."""
    x = np.random.default_rng(2).standard_normal((3000, 2))
    a, b = x[:1000], x[1000:2000]
    assert metrics.sliced_wasserstein(np.repeat(a, 3, 0), b) == pytest.approx(metrics.sliced_wasserstein(a, b), rel=1e-12)
    assert metrics.sliced_wasserstein(a, b) > 0.01
    for m in (1000, 1001, 2000, 2999, 3000):  # the quantile index against numpy's definition
        q = (np.arange(1000) + 0.5) / 1000
        assert np.array_equal(metrics._quantiles(np.sort(x[:m].T, axis=1), 1000),
                              np.quantile(x[:m], q, axis=0, method="inverted_cdf").T)


def test_sliced_wasserstein_to_a_fixed_reference_sorts_it_once_for_the_same_number():
    """In-loop scoring keeps the held-out projections sorted: each call equals SW computed afresh
    (projections and sorts of both sets), exactly, for fewer, as many and more samples."""
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((5000, 2))
    sw = metrics.SlicedWasserstein(reference, projections=64, seed=7)
    dirs = np.random.default_rng(7).standard_normal((2, 64))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    for n in (1000, 5000, 7000):
        a = rng.standard_normal((n, 2)) + 0.1
        m = min(n, 5000)
        q = (np.arange(m) + 0.5) / m
        fresh = np.sqrt(((np.quantile(a @ dirs, q, axis=0, method="inverted_cdf")
                          - np.quantile(reference @ dirs, q, axis=0, method="inverted_cdf")) ** 2).mean())
        assert sw(a) == pytest.approx(fresh, rel=1e-15) and sw(a) == metrics.sliced_wasserstein(a, reference, 64, 7)


def test_scorers_of_one_held_out_split_share_its_sorted_projections():
    """A study worker builds a Scorer per trial: the second one over an equal split (another array with
    the same values) reuses the first's sorted projections and scores exactly as a fresh SW does; another
    split, or other projections, gets its own."""
    from cmt_bench import scoring
    from cmt_bench.config import Params
    rng = np.random.default_rng(5)
    held, samples = rng.standard_normal((3000, 2)).astype(np.float32), rng.standard_normal((1000, 2)) + 0.2
    params = Params.model_validate({"evaluate": {"sw_projections": 32, "seed": 4}})
    first = scoring.Scorer(params, held).sliced_wasserstein
    again = scoring.Scorer(params, held.copy())
    assert again.sliced_wasserstein is first
    assert again({"1step": samples})["sw_1step_n1000"] == metrics.sliced_wasserstein(samples, held, 32, 4)
    assert scoring.Scorer(params, held + 1).sliced_wasserstein is not first
    other = Params.model_validate({"evaluate": {"sw_projections": 16, "seed": 4}})
    assert scoring.Scorer(other, held).sliced_wasserstein.dirs.shape == (2, 16)
