"""The streamed Frechet distance (cmt_bench/fid_stream.py): blocks seeded by index, running
moments in float64, equal to torch-fidelity's in-memory statistics of the same samples."""
import numpy as np
import pytest
import torch

from cmt_bench import classifier, data, fid_stream, fidelity, nets, sampling
from cmt_bench.paths import noise as sampler_noise
from torch_fidelity.metric_fid import fid_features_to_statistics  # isort: skip (after fidelity's torchvision stand-in)
from cmt_bench.config import DataConfig
from cmt_bench.distributed import World
from cmt_bench.paths import LinearPath
from cmt_bench.schema import NetConfig

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A digits classifier (the fd_digits features), the held-out reference cached as the features
    stage caches it, and a small random flow-map UNet to sample from."""
    (train, heldout), (labels, _) = data.make_labeled_splits(DataConfig(dataset="digits", heldout_size=500,
                                                                        train_size=1000), 0)
    root = tmp_path_factory.mktemp("fid")
    weights = root / "classifier.pt"
    classifier.save(classifier.train_classifier(data.as_float(train), torch.from_numpy(labels), epochs=2, seed=0),
                    weights)
    cache = root / "reference"
    fidelity.frechet_distance(torch.from_numpy(heldout), extractor="classifier", weights_path=weights,
                              reference_cache=cache, reference_name="heldout", reference_images=torch.from_numpy(heldout))
    torch.manual_seed(0)
    net = nets.build(SHAPE, NetConfig(kind="unet", channels=8, channel_mult=[1, 2], norm_groups=4, time_features=8)).eval()
    return weights, cache, net


def test_blocks_cover_every_sample_once_for_any_number_of_ranks():
    for size in (1, 2, 3, 7):
        taken = sorted(b for r in range(size) for b, _ in fid_stream.blocks(2500, World(rank=r, size=size)))
        assert taken == [0, 1, 2]
    assert [n for _, n in fid_stream.blocks(2500, World())] == [1000, 1000, 500]


def test_streamed_statistics_and_fid_equal_the_in_memory_ones(setup):
    weights, cache, net = setup
    n, seed, t_mid, path = 2500, 7, 0.5, LinearPath()
    features = fidelity.feature_function("classifier", weights, torch.device("cpu"))
    reference = fidelity.reference_statistics(cache, "heldout", "classifier", weights)
    moments = fid_stream.streamed_moments(net, path, n, SHAPE, seed, t_mid, features, reference["mu"], batch_size=300)
    # in memory: every block's samples at once, through torch-fidelity's own statistics and FID
    noise = [fid_stream.block_noise(b, size, SHAPE, seed) for b, size in fid_stream.blocks(n, World())]
    two_step = torch.cat([sampling.two_step(net, path, e, m, t_mid) for e, m in noise])
    stats = fid_features_to_statistics(features(two_step))
    streamed = moments["2step"].statistics()
    assert moments["2step"].n == n
    np.testing.assert_allclose(streamed["mu"], stats["mu"], rtol=1e-5, atol=1e-6)  # torch-fidelity's mean is float32
    np.testing.assert_allclose(streamed["sigma"], stats["sigma"], rtol=1e-6, atol=1e-9)
    in_memory = fidelity.frechet_distance(fidelity.to_uint8(two_step), extractor="classifier", weights_path=weights,
                                          reference_cache=cache, reference_name="heldout")["fd"]
    assert fidelity.frechet_of_statistics(streamed, reference) == pytest.approx(in_memory, rel=1e-5)
    # blocks are their own draws, not slices of the in-memory sampler's one generator
    assert not torch.equal(noise[0][0], sampler_noise(1000, SHAPE, seed)[0])


def test_moments_do_not_lose_a_covariance_far_from_the_origin():
    """Features with a mean 1e4 times their spread: the shift keeps float64 sums exact enough."""
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(5000, 3, generator=g, dtype=torch.float64)
    m = fid_stream.Moments(shift=np.full(3, 1e4))
    for chunk in x.split(700):
        m.add(chunk)
    np.testing.assert_allclose(m.statistics()["sigma"], np.cov(x.numpy(), rowvar=False), rtol=1e-10)


def test_the_streamed_score_against_the_training_split(tmp_path, monkeypatch):
    """evaluate.fid_reference: train (EDM's protocol) scores the same samples against the training
    split's statistics, heldout against the held-out split's (raw features: exact, in float64)."""
    from cmt_bench import config, metrics
    from cmt_bench.layout import out_dir
    monkeypatch.chdir(tmp_path)
    params = config.validate(config.deep_merge(config.Params().model_dump(), {
        "data": {"train_size": 3000, "heldout_size": 1000}, "evaluate": {"fid_samples": 2500}}))
    data.make_dataset(params.data, params.seed, out_dir("data"))
    torch.manual_seed(0)
    net = nets.build((2,), NetConfig(kind="mlp", hidden=16, depth=1)).eval()
    n, path, t_mid = 2500, LinearPath(), params.sampling.t_mid
    noise = [fid_stream.block_noise(b, size, (2,), params.evaluate.seed) for b, size in fid_stream.blocks(n, World())]
    samples = {"1step": torch.cat([sampling.one_step(net, e) for e, _ in noise]),
               "2step": torch.cat([sampling.two_step(net, path, e, m, t_mid) for e, m in noise])}
    for split in ("train", "heldout"):
        p = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"fid_reference": split})})
        with torch.no_grad():
            got = fid_stream.score(p, net, path, n, (2,), World(), torch.device("cpu"))
        reference = data.load_split(out_dir("data"), split).numpy()
        for name, x in samples.items():
            assert got[f"fd_raw_{name}_n2500"] == pytest.approx(metrics.fd_raw(x.detach().numpy(), reference), rel=1e-9)
    with pytest.raises(config.ParamsError, match="evaluate.fid_reference: 'train' is the reference of the streamed"):
        config.validate(config.deep_merge(config.Params().model_dump(), {"evaluate": {"fid_reference": "train"}}))


def test_the_features_stage_caches_the_training_split_for_the_streamed_score(setup, tmp_path, monkeypatch):
    """With fd_digits features: the features stage's floor (held-out against train) caches the training
    split's statistics under its name, and the streamed score reads exactly those."""
    from cmt_bench import config
    from cmt_bench.layout import CLASSIFIER, REFERENCE_CACHE
    from cmt_bench.stages import features as features_stage
    weights, _, net = setup
    monkeypatch.chdir(tmp_path)
    CLASSIFIER.parent.mkdir(parents=True)
    CLASSIFIER.write_bytes(weights.read_bytes())
    params = config.validate(config.deep_merge(config.Params().model_dump(), {
        "data": {"dataset": "digits", "heldout_size": 500, "train_size": 1000}, "net": {"kind": "unet"},
        "evaluate": {"features": "classifier", "fid_samples": 2500, "fid_reference": "train"}}))
    train, heldout = (data.as_float(x) for x in data.make_splits(params.data, 0))
    floor = features_stage._reference_floor(params, heldout, train)
    extract = fidelity.feature_function("classifier", CLASSIFIER, torch.device("cpu"))
    want = fid_features_to_statistics(extract(train))
    cached = fidelity.reference_statistics(REFERENCE_CACHE, "train", "classifier", CLASSIFIER)
    np.testing.assert_allclose(cached["mu"], want["mu"], rtol=1e-6)
    np.testing.assert_allclose(cached["sigma"], want["sigma"], rtol=1e-6, atol=1e-9)
    assert floor == pytest.approx(fidelity.frechet_of_statistics(fid_features_to_statistics(extract(heldout)), want),
                                  rel=1e-5)
    with torch.no_grad():
        got = fid_stream.score(params, net, LinearPath(), 2500, SHAPE, World(), torch.device("cpu"))
    moments = fid_stream.streamed_moments(net, LinearPath(), 2500, SHAPE, params.evaluate.seed, params.sampling.t_mid,
                                          extract, want["mu"])
    assert got["fd_digits_2step_n2500"] == pytest.approx(fidelity.frechet_of_statistics(moments["2step"].statistics(),
                                                                                         cached), rel=1e-9)
