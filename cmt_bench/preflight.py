"""Checks of the machine against params.yaml that every command runs before any work: a device
this machine lacks, too many CUDA processes, oneDNN products without oneDNN, a missing Inception
weights file, imported teacher or LPIPS weights file."""
from __future__ import annotations

from pathlib import Path

from . import config


def check_device(params: config.Params, source: str) -> None:
    """Refuse a device this machine lacks, or more CUDA processes than it has GPUs (NCCL takes one
    GPU per process), before any work; torch is imported only where CUDA may be in play."""
    compute = params.compute
    if compute.device == "cpu" or (compute.device == "auto" and compute.processes == 1):
        return
    from . import distributed
    try:
        dev = distributed.device(compute.device)
    except RuntimeError as exc:
        raise config.ParamsError(f"{source}: {exc}") from None
    import torch
    gpus = torch.cuda.device_count()
    if dev.type == "cuda" and compute.processes > gpus:
        raise config.ParamsError(f"{source}: compute.processes: {compute.processes} processes on CUDA need one GPU each; "
                                 f"this machine has {gpus}; allowed here: 1 to {gpus}, or compute.device: cpu")


def check_matmul(params: config.Params, source: str) -> None:
    """compute.matmul onednn needs a torch build with oneDNN (auto falls back to torch's products)."""
    if params.compute.matmul == "onednn":
        from . import linear
        try:
            linear.resolve("onednn")
        except ValueError as exc:
            raise config.ParamsError(f"{source}: {exc}") from None


def check_inception_weights(params: config.Params, source: str) -> None:
    """fid_inception reads torch-fidelity's Inception from a local file; it is never downloaded."""
    weights = params.evaluate.inception_weights
    if params.features == "inception" and not Path(weights).is_file():
        raise config.ParamsError(f"{source}: evaluate.inception_weights: no file at {weights!r}; the Inception "
                                 f"weights are never downloaded: copy torch-fidelity's pt_inception-2015-12-05 "
                                 f"file there, or set evaluate.features to 'classifier' or 'raw'")


def check_teacher(params: config.Params, source: str) -> None:
    """An imported teacher (pretrain.source import) must be where pretrain.teacher.path says."""
    pre = params.pretrain
    if pre.source != "import":
        return
    path = pre.teacher.path
    if not path:
        raise config.ParamsError(f"{source}: pretrain.teacher.path: pretrain.source 'import' needs the teacher's "
                                 f"diffusers model folder or its entry point 'module:function[@checkpoint]'")
    if pre.teacher.format == "diffusers" and not (Path(path).expanduser() / "config.json").is_file():
        raise config.ParamsError(f"{source}: pretrain.teacher.path: no diffusers model folder at {path!r} "
                                 f"(config.json missing); nothing is downloaded")
    checkpoint = path.partition("@")[2] if pre.teacher.format == "entrypoint" else ""
    if checkpoint and not Path(checkpoint).expanduser().exists():
        raise config.ParamsError(f"{source}: pretrain.teacher.path: the entry point's checkpoint {checkpoint!r} "
                                 f"does not exist")


LPIPS_FILES = (("vgg_weights", "torchvision's VGG16 state dict (vgg16-397923af.pth)"),
               ("lpips_weights", "the lpips package's lpips/weights/v0.1/vgg.pth"))


def missing_lpips_files(dist) -> list[tuple[str, str]]:
    """(key, what it is) of each LPIPS weights file a distance names that is not on this machine."""
    return [(key, what) for key, what in LPIPS_FILES
            if not getattr(dist, key) or not Path(getattr(dist, key)).expanduser().is_file()]


def check_lpips_weights(params: config.Params, source: str) -> None:
    """An LPIPS distance reads VGG16 and its linear heads from local files; they are never downloaded."""
    for stage in ("midtrain", "posttrain"):
        dist = getattr(params, stage).distance
        for key, what in missing_lpips_files(dist) if dist.kind == "lpips" else []:
            raise config.ParamsError(f"{source}: {stage}.distance.{key}: no file at {getattr(dist, key)!r}; "
                                     f"distance.kind 'lpips' needs {what} on this machine (never downloaded)")


def check(params: config.Params, source: str) -> None:
    check_device(params, source)
    check_matmul(params, source)
    check_inception_weights(params, source)
    check_teacher(params, source)
    check_lpips_weights(params, source)
