"""The CUDA path against the CPU path and against math. Skipped where torch sees no GPU (CI has
none); `benchmarks/gpu_check.sh` runs them on a GPU machine and reports/gpu/ holds what it saw.

What a first run on a GPU tends to break: forward-mode AD through cuDNN and the attention's
matmuls, bf16 autocast around a JVP, noise drawn on the wrong device (a seed must give the same
numbers on both), and checkpoints of CUDA tensors read back on a CPU."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from cmt_bench import checkpoint, config, methods, nets, sampling
from cmt_bench.distributed import autocast
from cmt_bench.losses import flow_matching_loss
from cmt_bench.paths import LinearPath

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA, F64 = torch.device("cuda"), torch.float64
PATH = LinearPath()
# the fashion preset's network, at a smaller width so the tests stay quick
UNET = config.NetConfig(kind="unet", channels=32, channel_mult=[1, 2, 2], blocks_per_level=1, attention=True)
SHAPE = (1, 32, 32)
LOSSES = ("flow_matching", *methods.names())  # the teacher's loss and every registered method's


def _net(seed=0):
    torch.manual_seed(seed)
    net = nets.build(SHAPE, UNET, two_times=True)
    for p in net.time.emb_gap.parameters():  # leave the zero init, so the gap embedding counts too
        torch.nn.init.normal_(p, std=0.1)
    return net


def _loss(method: str):
    """loss(net, x, generator) of flow matching or of a registered method, at its defaults and at
    the start of training (a curriculum's first phase)."""
    if method == "flow_matching":
        return lambda net, x, g: flow_matching_loss(lambda z, t: net(z, t), PATH, x, g, config.TimeSampling())
    post = config.PosttrainConfig()
    return lambda net, x, g: methods.get(method).loss(net, PATH, x, g, 0, getattr(post, method), post.distance)


def _loss_and_grad(net, method, x, seed=0, precision="fp32"):
    net.zero_grad(set_to_none=True)
    with autocast(precision, x.device):
        loss = _loss(method)(net, x, torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float().cpu() for p in net.parameters() if p.grad is not None])


def test_unet_jvp_matches_central_differences_on_cuda():
    """MeanFlow's JVP through cuDNN convolutions and the attention on the GPU, in float64."""
    net = _net().double().to(CUDA)
    gen = torch.Generator().manual_seed(1)
    x, v = (torch.randn(4, *SHAPE, generator=gen, dtype=F64).to(CUDA) for _ in range(2))
    t = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=F64, device=CUDA)
    r = torch.tensor([0.1, 0.2, 0.0, 0.3], dtype=F64, device=CUDA)
    _, jvp = torch.func.jvp(lambda a, b, c: net(a, b, c), (x, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    errors = []
    for h in (1e-3, 1e-4, 1e-5):
        with torch.no_grad():
            fd = (net(x + h * v, t + h, r) - net(x - h * v, t - h, r)) / (2 * h)
        errors.append((fd - jvp).abs().max().item())
    assert jvp.abs().mean() > 1e-2, "vacuous: the derivative is ~0"
    # central differences converge as h^2; float64 round-off is far below the last error
    assert all(a / b > 50 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-6, errors


@pytest.mark.parametrize("method", LOSSES)
def test_fp32_loss_and_gradient_on_cuda_match_the_cpu(method):
    """Same weights, batch and seed: the noise and times come from the CPU generator on both
    devices, so the GPU computes the CPU's loss (to TF32 convolution precision)."""
    cpu_net = _net()
    gpu_net = copy.deepcopy(cpu_net).to(CUDA)
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(2))
    loss_cpu, grad_cpu = _loss_and_grad(cpu_net, method, x)
    loss_gpu, grad_gpu = _loss_and_grad(gpu_net, method, x.to(CUDA))
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(grad_cpu, grad_gpu, dim=0) > 0.99


@pytest.mark.parametrize("method", LOSSES)
def test_bf16_autocast_tracks_fp32(method):
    """bf16 autocast of the whole step (MeanFlow's JVP included) gives a finite loss near fp32's
    and a gradient pointing the same way; the weights and their gradients stay fp32."""
    net = _net().to(CUDA)
    x = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(3)).to(CUDA)
    loss32, grad32 = _loss_and_grad(net, method, x)
    loss16, grad16 = _loss_and_grad(net, method, x, precision="bf16")
    assert torch.isfinite(torch.tensor(loss16)) and torch.isfinite(grad16).all()
    assert loss16 == pytest.approx(loss32, rel=0.05)
    assert torch.nn.functional.cosine_similarity(grad32, grad16, dim=0) > 0.95
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters() if p.grad is not None)


def test_bf16_training_lowers_the_loss_on_cuda():
    """A few hundred bf16 Adam steps of flow matching on one image (whose velocity field is
    learnable almost exactly): the loss falls to a fraction of where it started."""
    net = _net().to(CUDA)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=True)
    x = torch.linspace(-1, 1, SHAPE[-1]).expand(128, *SHAPE).to(CUDA)  # a horizontal gradient, 128 times
    losses = []
    for step in range(200):
        with autocast("bf16", CUDA):
            loss = _loss("flow_matching")(net, x, torch.Generator().manual_seed(step % 4))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))  # no NaN
    assert sum(losses[-20:]) / 20 < 0.3 * sum(losses[:20]) / 20, (losses[:5], losses[-5:])


def test_samples_on_cuda_match_the_cpu_at_a_seed():
    """Noise for sampling is drawn on the CPU: a sample seed gives the same images on either device."""
    net = _net()
    on_cpu = sampling.sample(net, PATH, 32, SHAPE, seed=7, t_mid=0.5, batch_size=16)
    on_gpu = sampling.sample(copy.deepcopy(net).to(CUDA), PATH, 32, SHAPE, seed=7, t_mid=0.5, batch_size=16)
    for k in ("1step", "2step"):
        assert on_gpu[k].device.type == "cpu"
        assert torch.allclose(on_gpu[k], on_cpu[k], atol=1e-2), (k, (on_gpu[k] - on_cpu[k]).abs().max())


def test_cuda_checkpoint_loads_on_the_cpu(tmp_path):
    """A checkpoint written from GPU weights reads back (weights_only) on a machine without one."""
    net = _net().to(CUDA)
    checkpoint.save(tmp_path / "last.pt", {"net": net.state_dict(), "step": 3})
    state = checkpoint.load(tmp_path / "last.pt")
    cpu_net = _net(seed=1)
    cpu_net.load_state_dict(state["net"])
    assert state["step"] == 3
    assert all(torch.equal(a.cpu(), b) for a, b in zip(net.state_dict().values(), cpu_net.state_dict().values()))


def test_more_cuda_processes_than_gpus_are_refused_before_any_work(tmp_path):
    """NCCL takes one GPU per process: asking for more is refused up front, naming the key."""
    gpus = torch.cuda.device_count()
    (tmp_path / "gpu.yaml").write_text(f"compute: {{device: auto, processes: {gpus + 1}}}\n")
    result = subprocess.run([sys.executable, "-m", "cmt_bench", "--params", "gpu.yaml", "pretrain"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"compute.processes: {gpus + 1} processes on CUDA need one GPU each" in result.stderr
    assert f"allowed here: 1 to {gpus}" in result.stderr and not (tmp_path / "artifacts").exists()
