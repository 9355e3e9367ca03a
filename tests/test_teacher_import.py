"""A teacher from a file (cmt_bench/teacher_import.py): a diffusers model folder made here, loaded
offline; an entry point only on opt-in; the flow map built on it starts as the teacher's velocity
for every target time, and its JVP (what MeanFlow trains through) matches central differences."""
import sys

import diffusers
import pytest
import torch

from cmt_bench import compiling
from cmt_bench.teacher_conversion import SCHEDULES, ForeignVelocity
from cmt_bench.teacher_import import GapConditioned, flow_map_network, load_network


def _unet(dtype=torch.float32, attention=False):
    """A small UNet2DModel, with attention blocks (and a mid-block attention) or without."""
    torch.manual_seed(0)
    blocks = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=8) if attention else dict(
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, **blocks).to(dtype)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    _unet().save_pretrained(path)
    return path


def _inputs(n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.tensor([0.2, 0.5, 0.9], dtype=dtype)[:n]


def test_a_diffusers_folder_loads_offline_as_its_own_prediction(folder):
    net = load_network(folder, "diffusers")
    x, _ = _inputs()
    time = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, time), _unet()(x, time).sample, rtol=0, atol=0)
    assert any(folder.glob("*.safetensors"))


def test_bad_teacher_sources_are_refused_by_name(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_network(tmp_path / "nowhere", "diffusers")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="no safetensors weights"):
        load_network(tmp_path / "pickled", "diffusers")
    with pytest.raises(ValueError, match="teacher format: 'edm'; allowed: diffusers, entrypoint"):
        load_network(folder, "edm")
    with pytest.raises(PermissionError, match="allow_code"):
        load_network("my_edm:load", "entrypoint")
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_network("my_edm", "entrypoint", allow_code=True)


def test_an_entry_point_is_called_with_the_checkpoint_path_on_opt_in(tmp_path, monkeypatch):
    (tmp_path / "user_teacher.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, path):\n"
        "        super().__init__(); self.path = path; self.scale = torch.nn.Parameter(torch.tensor(2.0))\n"
        "    def forward(self, x, time): return self.scale * x\n"
        "def load(path): return Net(path)\n"
        "def not_a_module(path): return 3\n"
        "def fitted(path):\n"
        "    m = torch.nn.Module(); m.lin = torch.nn.Linear(2, 2)\n"
        "    torch.nn.init.constant_(m.lin.weight, 5.0); torch.nn.init.constant_(m.lin.bias, 5.0); return m\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = load_network("user_teacher:load@/data/edm.pkl", "entrypoint", allow_code=True)
    assert net.path == "/data/edm.pkl" and torch.equal(net(torch.ones(2), None), 2 * torch.ones(2))
    # a random init redraws every weight through reset_parameters(), and refuses what it cannot redraw
    torch.manual_seed(0)
    fresh = load_network("user_teacher:fitted@x", "entrypoint", allow_code=True, weights=False)
    assert not torch.equal(fresh.lin.weight, torch.full((2, 2), 5.0)) and torch.all(fresh.lin.bias.abs() <= 1)
    with pytest.raises(ValueError, match=r"parameters scale belong to modules without reset_parameters"):
        load_network("user_teacher:load@x", "entrypoint", allow_code=True, weights=False)
    with pytest.raises(TypeError, match="returned int, not a torch.nn.Module"):
        load_network("user_teacher:not_a_module@x", "entrypoint", allow_code=True)
    sys.modules.pop("user_teacher", None)


def test_the_flow_map_starts_as_the_teachers_velocity_for_every_target_time(folder):
    """Zero-initialised gap embedding: u(x, s, t) = v(x, t) for any s at the start; one optimizer
    step on a loss that depends on s makes u depend on s (the embedding is trained, not inert)."""
    schedule = SCHEDULES["vp_ddpm"]()
    velocity = ForeignVelocity(load_network(folder, "diffusers"), schedule, "eps")
    flow = flow_map_network(load_network(folder, "diffusers"), schedule, "eps")
    x, t = _inputs()
    with torch.no_grad():
        v = velocity(x, t)
        for s in (t * 0, t / 2, t):
            torch.testing.assert_close(flow(x, t, s), v, rtol=0, atol=0)
    opt = torch.optim.SGD(flow.parameters(), lr=0.1)
    loss = (flow(x, t, t * 0) - 1).pow(2).mean()
    loss.backward()
    gap_grad = flow.net.emb_gap.mlp[-1].weight.grad
    assert gap_grad is not None and gap_grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert (flow(x, t, t * 0) - flow(x, t, t)).abs().max() > 1e-4
        torch.testing.assert_close(flow(x, t), flow(x, t, t), rtol=0, atol=0)  # no target time: s = t, gap 0


def test_the_bare_teacher_stays_the_teacher_once_wrapped(folder):
    """The gap hook sits on the teacher's own module: called directly, it must still be the teacher."""
    net = load_network(folder, "diffusers")
    x, _ = _inputs()
    time = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        before = net(x, time)
        flow = flow_map_network(net, SCHEDULES["vp_ddpm"](), "eps")
        torch.nn.init.normal_(flow.net.emb_gap.mlp[-1].weight)  # a gap embedding that adds something
        torch.testing.assert_close(net(x, time), before, rtol=0, atol=0)


def test_a_missing_time_embedding_is_refused_with_candidates(folder):
    with pytest.raises(ValueError, match="time embedding module 'unet.time_emb' not found.*unet.time_embedding"):
        GapConditioned(load_network(folder, "diffusers"), "unet.time_emb")


def test_the_jvp_through_an_imported_unet_matches_central_differences(folder):
    """MeanFlow's du/dt along (dz, dt, ds) = (v, 1, 0) through the converted diffusers UNet, in float64."""
    net = load_network(folder, "diffusers").double()
    # time_scale 1: diffusers embeds the time in float32, whose rounding at times near 1000 would
    # swamp a central difference; the JVP itself does not depend on the scale
    flow = flow_map_network(net, SCHEDULES["vp_cosine"](time_scale=1.0), "v").double()
    torch.manual_seed(3)
    for p in flow.net.emb_gap.mlp[-1].parameters():  # a trained-looking gap embedding, not zero
        p.data.normal_(0, 0.1)
    z, t = _inputs(dtype=torch.float64)
    r, v = t * 0.3, torch.randn_like(z)
    jvp = compiling.total_derivative(flow, z, t, r, v)
    errors = []
    for h in (1e-3, 5e-4):
        fd = (flow(z + h * v, t + h, r) - flow(z - h * v, t - h, r)) / (2 * h)
        errors.append((fd - jvp).abs().max().item())
    assert jvp.abs().mean() > 1
    # second order: halving h quarters the error (measured 6.7e-3 -> 1.7e-3; a wrong JVP plateaus)
    assert errors[1] < 1e-2 and 3 < errors[0] / errors[1] < 5


def test_the_jvp_runs_through_diffusers_attention(tmp_path):
    """The default attention has no forward-mode AD on a CPU; the flow map's processor does, and it
    changes nothing but rounding: at start it still equals the teacher's velocity (default attention),
    and its JVP converges to central differences at second order."""
    from diffusers.models.attention_processor import Attention
    _unet(attention=True).save_pretrained(tmp_path)
    schedule = SCHEDULES["vp_cosine"](time_scale=1.0)
    velocity = ForeignVelocity(load_network(tmp_path, "diffusers").double(), schedule, "eps")
    flow = flow_map_network(load_network(tmp_path, "diffusers"), schedule, "eps").double()
    for m in flow.modules():  # diffusers computes the softmax in float32 unless told otherwise,
        if isinstance(m, Attention):  # which would swamp the differences below with rounding
            m.upcast_softmax = m.upcast_attention = False
    z, t = _inputs(dtype=torch.float64)
    r, v = t * 0.3, torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(flow(z, t, r), velocity(z, t), rtol=1e-6, atol=1e-6)
    jvp = compiling.total_derivative(flow, z, t, r, v)
    errors = [((flow(z + h * v, t + h, r) - flow(z - h * v, t - h, r)) / (2 * h) - jvp).abs().max().item()
              for h in (1e-3, 5e-4)]
    assert jvp.abs().mean() > 1e-2 and errors[1] < 1e-2 and 3 < errors[0] / errors[1] < 5
