"""compute.compile against eager PyTorch: the plain-arithmetic norms the compiled JVP uses, the loss
and gradients of a compiled step for every registered method, and an exact resume of a compiled
run with its draws on the training device."""
import pytest
import torch
import torch.nn.functional as F
from conftest import gen, small_unet_config
from torch._dynamo.utils import counters

from cmt_bench import compiling, config, methods, nets
from cmt_bench.ledger import Ledger
from cmt_bench.losses import flow_matching_loss
from cmt_bench.paths import LinearPath
from cmt_bench.tracking import Tracker
from cmt_bench.train import Job, train

F64 = torch.float64
PATH = LinearPath()
SMALL_UNET = small_unet_config()
# fp32 compiled kernels fuse and reorder sums: measured differences from eager stay below 1e-6 of the
# values here; the bound leaves room for other CPUs' vector widths (and a GPU's TF32 convolutions)
RTOL, ATOL = 1e-4, 1e-6
TOLERANCE = {"cpu": dict(rtol=RTOL, atol=1e-5), "cuda": dict(rtol=1e-3, atol=1e-3)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


def _net(shape=(2,), cfg=config.NetConfig(hidden=32, depth=2, time_features=16), seed=0):
    torch.manual_seed(seed)
    net = nets.build(shape, cfg, two_times=True)
    for p in net.time.emb_gap.parameters():  # off the zero init, so the gap embedding counts too
        torch.nn.init.normal_(p, std=0.3)
    return net


def test_plain_norms_equal_native_norms_and_their_jvp():
    x, dx = torch.randn(6, 8, 5, 5, generator=gen(1), dtype=F64), torch.randn(6, 8, 5, 5, generator=gen(2), dtype=F64)
    w, b = torch.randn(8, generator=gen(3), dtype=F64), torch.randn(8, generator=gen(4), dtype=F64)
    cases = [(lambda a: F.group_norm(a, 4, w, b), "group"), (lambda a: F.layer_norm(a, (5, 5), w[0] * torch.ones(5, 5, dtype=F64)), "layer"),
             (lambda a: F.layer_norm(a, (8, 5, 5)), "layer, no affine")]
    for fn, name in cases:
        native = torch.func.jvp(fn, (x,), (dx,))
        with compiling.PlainNorms():
            plain = torch.func.jvp(fn, (x,), (dx,))
        for n, p in zip(native, plain):
            torch.testing.assert_close(p, n, rtol=1e-10, atol=1e-10, msg=name)
        assert native[1].abs().mean() > 0.1  # not vacuous


def test_padded_size_adds_at_most_a_quarter_and_few_sizes():
    sizes = [compiling.padded_size(n) for n in range(1, 513)]
    assert all(n <= m <= max(n + 1, 1.25 * n) for n, m in zip(range(1, 513), sizes))
    assert len({m for n, m in zip(range(1, 513), sizes) if 64 < n <= 128}) == 4  # four per octave
    assert compiling.padded_size(64) == 64 and compiling.padded_size(65) == 80


def _loss_fn(name: str):
    post = config.PosttrainConfig()
    if name == "flow_matching":
        return lambda net, x, g: flow_matching_loss(lambda z, t: net(z, t), PATH, x, g, config.TimeSampling())
    m = methods.get(name)
    section = getattr(post, name)
    # a curriculum (AlphaFlow) at its end, where the JVP runs; others at their start
    seen = max((m.cost_phases(section) or {0: 0}).values()) if m.cost_phases else 0
    return lambda net, x, g: m.loss(net, PATH, x, g, seen, section, post.distance)


def _loss_and_grads(net, step_model, name, x, seed):
    net.zero_grad(set_to_none=True)
    loss = _loss_fn(name)(step_model, x, gen(seed))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", ["flow_matching", *methods.names()])
def test_compiled_step_gives_eager_loss_and_gradients(name):
    """At one seed, fp32: the loss and every gradient of the step under compile step and jvp equal
    eager's within RTOL, on the two-time MLP (LayerNorm) for every registered method."""
    net, x = _net(), torch.randn(256, 2, generator=gen(5))
    eager_loss, eager_grads = _loss_and_grads(net, net, name, x, seed=7)
    assert eager_loss > 0 and any(g.abs().max() > 0 for g in eager_grads)
    for mode in ("step", "jvp"):
        torch._dynamo.reset()  # else a graph of an earlier, alike network is reused
        graphs = counters["stats"]["unique_graphs"]
        loss, grads = _loss_and_grads(net, compiling.for_step(net, mode), name, x, seed=7)
        assert counters["stats"]["unique_graphs"] > graphs, f"{name} {mode}: nothing was compiled"
        torch.testing.assert_close(loss, eager_loss, rtol=RTOL, atol=ATOL, msg=f"{name} {mode}: loss")
        assert len(grads) == len(eager_grads)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL, msg=f"{name} {mode}: gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_jvp_through_the_unet_equals_eager(device):
    """The UNet's GroupNorms and attention under the compiled JVP (with padding to a bucket size)."""
    net = _net((1, 8, 8), SMALL_UNET).to(device)
    z, v = (torch.randn(7, 1, 8, 8, generator=gen(i)).to(device) for i in (1, 2))
    t = (torch.rand(7, generator=gen(3)) * 0.8 + 0.1).to(device)
    r = t * torch.rand(7, generator=gen(4)).to(device)
    eager = compiling.total_derivative(net, z, t, r, v)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    compiled = compiling.total_derivative(compiling.for_step(net, "jvp"), z, t, r, v)
    assert counters["stats"]["unique_graphs"] > graphs, "the JVP was not compiled"
    assert compiling.padded_size(7) == 7 and eager.abs().mean() > 0.1
    torch.testing.assert_close(compiled, eager, **TOLERANCE[device])
    z9 = torch.cat([z, z[:2]])  # 9 rows: padded to 10 with zeros, the extra row cut off again
    compiled9 = compiling.total_derivative(compiling.for_step(net, "jvp"), z9, torch.cat([t, t[:2]]),
                                           torch.cat([r, r[:2]]), torch.cat([v, v[:2]]))
    torch.testing.assert_close(compiled9[:7], eager, **TOLERANCE[device])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_run_resumes_to_the_same_weights(tmp_path, monkeypatch, device):
    """MeanFlow under compile jvp with the batch, noise and times drawn on the training device:
    stopped after 5 of 10 steps and rerun, it ends with the weights of an uninterrupted run, bit for bit."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = config.Params(tracking=config.TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    meanflow, post = methods.get("meanflow"), config.PosttrainConfig()
    job = Job("toy", data=torch.randn(512, 2, generator=gen(0)),
              loss=lambda n, x, g, seen: meanflow.loss(n, PATH, x, g, seen, post.meanflow, post.distance))

    def run(ckpt, budget):
        cfg = config.TrainConfig(batch_size=64, budget_images=budget, log_every_images=320, checkpoint_every_images=320)
        result, tracker = train(_net().to(device), job, cfg, seed=0, ckpt_path=ckpt, fingerprint="fp", ledger=Ledger(device=device),
                                open_tracker=lambda run_id: Tracker.open(params, "toy", run_id=run_id),
                                compile="jvp", draws="device")
        tracker.finish()
        return result

    whole = run(tmp_path / "a/last.pt", 640)
    run(tmp_path / "b/last.pt", 320)  # the "kill": stopped at the step-5 checkpoint
    resumed = run(tmp_path / "b/last.pt", 640)
    assert resumed.steps == whole.steps == 10 and len(resumed.history) == 1  # it resumed, then logged step 10
    for a, b in zip(whole.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
