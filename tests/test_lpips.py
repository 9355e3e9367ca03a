"""The LPIPS distance (cmt_bench/losses/lpips.py) against the lpips package's own code, with its
shipped linear heads and a VGG16 built here (no torchvision wheel loads beside this torch, so the
test hands lpips a torchvision whose vgg16() returns it); and its refusals."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from cmt_bench import config, preflight
from cmt_bench.losses import lpips as ours
from cmt_bench.losses.distance import distance
from cmt_bench.schema import Distance

# torchvision's VGG16 configuration "D", written out here independently of the module under test
CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _torchvision_vgg16_features(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, c = [], 3
    for v in CFG_D:
        layers += [nn.MaxPool2d(kernel_size=2, stride=2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(True)]
        c = v if v != "M" else c
    features = nn.Sequential(*layers)
    for m in features:  # weights of a trained VGG's scale, so the deep layers are not all zero
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.normal_(m.bias, std=0.1)
    return features


def _lpips_heads() -> Path:
    spec = importlib.util.find_spec("lpips")
    assert spec is not None, "make setup installs lpips (--no-deps)"
    return Path(spec.submodule_search_locations[0]) / "weights" / "v0.1" / "vgg.pth"


@pytest.fixture
def reference(monkeypatch, tmp_path):
    """(the lpips package's LPIPS(net='vgg'), ours) on the same VGG16 weights and linear heads, float64."""
    features = _torchvision_vgg16_features(seed=3)
    vgg_file = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()} | {"classifier.0.weight": torch.zeros(2, 2)},
               vgg_file)
    models = types.ModuleType("torchvision.models")
    models.vgg16 = lambda pretrained=False, **_: types.SimpleNamespace(features=features)
    torchvision = types.ModuleType("torchvision")
    torchvision.models = models
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    import lpips
    theirs = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).double().eval()
    return theirs, ours.LPIPS(str(vgg_file), str(_lpips_heads())).double(), (str(vgg_file), str(_lpips_heads()))


def test_lpips_equals_the_lpips_package(reference):
    theirs, mine, _ = reference
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    with torch.no_grad():
        want, got = theirs(a, b).flatten(), mine(a, b)
    assert got.shape == (4,) and (want > 1e-3).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    assert mine(a, a).abs().max() < 1e-12
    torch.testing.assert_close(mine(b, a), got, rtol=1e-10, atol=0)


def test_the_distance_reaches_lpips_with_gradients(reference):
    _, mine, (vgg, heads) = reference
    cfg = Distance(kind="lpips", vgg_weights=vgg, lpips_weights=heads)
    a = torch.zeros(2, 3, 16, 16).uniform_(-1, 1).requires_grad_(True)
    b = torch.zeros(2, 3, 16, 16).uniform_(-1, 1)
    d = distance(a, b, cfg)
    torch.testing.assert_close(d.double(), mine(a.double(), b.double()).detach(), rtol=1e-4, atol=0)
    d.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in ours.load(vgg, heads, "cpu").parameters())  # VGG stays frozen


def _params(overrides: dict) -> config.Params:
    return config.validate(config.deep_merge(config.Params().model_dump(), overrides), "params.yaml")


IMAGES = {"data": {"dataset": "cifar10"}, "net": {"kind": "unet"}}


def test_lpips_refusals(tmp_path):
    vgg, heads = ours.save_random(tmp_path)
    model = ours.LPIPS(vgg, heads)
    with pytest.raises(ValueError, match="distance.kind: 'lpips' compares RGB images of at least 16x16"):
        model(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="distance.vgg_weights: .* is not torchvision's VGG16 state dict"):
        ours.LPIPS(heads, heads)
    with pytest.raises(ValueError, match="distance.lpips_weights: .* is not the lpips package's vgg.pth"):
        ours.LPIPS(vgg, vgg)
    with pytest.raises(FileNotFoundError, match="distance.vgg_weights: no file at 'nowhere.pth'"):
        ours.LPIPS("nowhere.pth", heads)

    lpips = {"kind": "lpips", "vgg_weights": vgg, "lpips_weights": heads}
    with pytest.raises(config.ParamsError, match="posttrain.distance.kind: 'lpips' compares images, not data.dataset='checkerboard'"):
        _params({"posttrain": {"distance": lpips}})
    with pytest.raises(config.ParamsError, match=r"midtrain.distance.kind: 'lpips' compares images, and CMT-MF \(for meanflow\)"):
        _params(IMAGES | {"midtrain": {"distance": lpips}, "posttrain": {"methods": ["ect", "meanflow"]}})
    params = _params(IMAGES | {"midtrain": {"distance": lpips | {"lpips_weights": str(tmp_path / "gone.pth")}},
                               "posttrain": {"methods": ["ect"]}})
    with pytest.raises(config.ParamsError, match="midtrain.distance.lpips_weights: no file at .*gone.pth"):
        preflight.check_lpips_weights(params, "params.yaml")


def test_the_plan_times_lpips_with_random_weights_when_the_files_are_elsewhere(tmp_path):
    from cmt_bench import plan
    lpips = {"kind": "lpips", "vgg_weights": "/nowhere/vgg16.pth", "lpips_weights": None}
    params = _params(IMAGES | {"midtrain": {"distance": lpips}, "posttrain": {"methods": ["ect"]}})
    timed, stood_in = plan._lpips_stand_in(params, tmp_path)
    assert stood_in == ["midtrain.distance"] and timed.posttrain == params.posttrain
    ours.LPIPS(timed.midtrain.distance.vgg_weights, timed.midtrain.distance.lpips_weights)  # loadable files
    preflight.check_lpips_weights(timed, "plan")
    assert plan._lpips_stand_in(timed, tmp_path / "unused") == (timed, [])  # files present: nothing stood in
