"""Image data (digits, Fashion-MNIST, folders, CIFAR-10 batches) and the UNet flow-map network."""
import numpy as np
import pytest
import torch
from conftest import require_fashion

from cmt_bench import data, nets, sources
from cmt_bench.config import DataConfig, NetConfig

F64 = torch.float64
SMALL = NetConfig(kind="unet", channels=8, channel_mult=[1, 2], norm_groups=4, time_features=8)


def _unet(two_times=True, attention=True, seed=0):
    torch.manual_seed(seed)
    return nets.build((1, 8, 8), SMALL.model_copy(update={"attention": attention}), two_times).double()


# --- data -------------------------------------------------------------------------------------

def test_digits_shards_are_uint8_seeded_and_split(tmp_path):
    cfg = DataConfig(dataset="digits", heldout_size=300, train_size=10_000, samples_per_record=500)
    manifest = data.make_dataset(cfg, seed=5, out_dir=tmp_path)
    assert manifest["dtype"] == "uint8" and manifest["shape"] == [1, 8, 8]
    train, heldout = data.load_split(tmp_path, "train"), data.load_split(tmp_path, "heldout")
    assert train.shape == (1497, 1, 8, 8) and heldout.shape == (300, 1, 8, 8)  # 1,797 in all, none twice
    assert train.min() == -1 and train.max() == 1 and train.dtype == torch.float32
    both = torch.cat([train, heldout]).flatten(1)
    assert len(torch.unique(both, dim=0)) > 1700  # a split of the pool (a few digits repeat exactly)
    assert data.make_dataset(cfg, seed=5, out_dir=tmp_path / "again") == manifest  # same bytes
    assert data.make_dataset(cfg, seed=6, out_dir=tmp_path / "other") != manifest
    with pytest.raises(ValueError, match="heldout_size=1797 leaves no training images"):
        data.make_dataset(cfg.model_copy(update={"heldout_size": 1797}), 0, tmp_path / "none")


def test_fashion_from_the_debian_package_padded_to_32(tmp_path):
    require_fashion()
    cfg = DataConfig(dataset="fashion", train_size=3000, heldout_size=1000, pad_to=32)
    train, heldout = sources.fashion(cfg, np.random.default_rng(0))
    assert train.shape == (3000, 1, 28, 28) and heldout.shape == (1000, 1, 28, 28) and train.dtype == np.uint8
    assert train.mean() > 40  # real clothes, not an empty array
    padded = sources.pad(train, 32)
    assert padded.shape == (3000, 1, 32, 32) and padded[:, :, :2].max() == 0 and np.array_equal(padded[:, :, 2:30, 2:30], train)


def test_missing_image_files_name_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        sources.fashion(DataConfig(dataset="fashion", path=str(tmp_path)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="data.path is required"):
        sources.folder(DataConfig(dataset="folder"), np.random.default_rng(0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.cifar10(DataConfig(dataset="cifar10", path=str(tmp_path / "nowhere")), np.random.default_rng(0))
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        sources.cifar10(DataConfig(dataset="cifar10", path=str(tmp_path)), np.random.default_rng(0))


def test_image_folder_is_read_resized_and_split(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(12):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    cfg = DataConfig(dataset="folder", path=str(tmp_path / "imgs"), resolution=16, heldout_size=2)
    manifest = data.make_dataset(cfg, seed=0, out_dir=tmp_path / "shards")
    assert manifest["shape"] == [3, 16, 16]
    assert manifest["splits"]["train"]["count"] == 10 and manifest["splits"]["heldout"]["count"] == 2
    grey = sources.folder(cfg.model_copy(update={"channels": 1}), np.random.default_rng(0))[0]
    assert grey.shape == (10, 1, 16, 16)


# --- UNet -------------------------------------------------------------------------------------

def test_unet_jvp_matches_central_differences():
    """The MeanFlow target differentiates the UNet (attention included) along (v, dt=1, dr=0)."""
    net = _unet()
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 1, 8, 8, generator=gen, dtype=F64), torch.randn(4, 1, 8, 8, generator=gen, dtype=F64)
    t, r = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=F64), torch.tensor([0.1, 0.2, 0.0, 0.3], dtype=F64)
    _, jvp = torch.func.jvp(lambda a, b, c: net(a, b, c), (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    h = 1e-5
    fd = (net(x + h * v, t + h, r) - net(x - h * v, t - h, r)) / (2 * h)
    assert jvp.abs().mean() > 1e-2  # not trivially zero
    assert torch.allclose(jvp, fd, rtol=1e-6, atol=1e-8)


def test_teacher_weights_load_into_the_unet_flow_map_unchanged():
    """The gap embedding starts at zero: the flow-map UNet equals the teacher for every s."""
    teacher, student = _unet(two_times=False), _unet(seed=1)
    torch.nn.init.normal_(teacher.out[-1].weight)  # a non-trivial output
    nets.load_teacher_into(student, teacher.state_dict())
    x, t = torch.randn(3, 1, 8, 8, dtype=F64), torch.tensor([0.9, 0.5, 0.2], dtype=F64)
    for s in (torch.zeros(3, dtype=F64), t / 2):
        assert torch.equal(student(x, t, s), teacher(x, t))
    extra = set(student.state_dict()) - set(teacher.state_dict())
    assert extra and all(k.startswith("time.emb_gap.") for k in extra)


def test_unet_shapes_and_clear_errors():
    assert _unet(attention=False)(torch.randn(2, 1, 8, 8, dtype=F64), 0.5, 0.1).shape == (2, 1, 8, 8)
    rgb = nets.build((3, 16, 16), SMALL.model_copy(update={"channel_mult": [1, 2, 2]}))
    assert rgb(torch.randn(2, 3, 16, 16), torch.rand(2), torch.zeros(2)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="must divide by 8"):
        nets.build((1, 28, 28), SMALL.model_copy(update={"channel_mult": [1, 2, 2, 2]}))
    with pytest.raises(ValueError, match="use net.kind='unet'"):
        nets.build((1, 8, 8), NetConfig())
