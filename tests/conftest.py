import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["cmt_bench", "dvc.yaml", "experiments", "pyproject.toml", ".gitignore", ".dvcignore"]
SHIPPED_SPECS = sorted(p.stem for p in (ROOT / "experiments/studies").glob("*.yaml"))


def sh(cmd, cwd, env):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, shell=True)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def make_repo(repo: Path, preset: str, overrides: dict | None = None,
              extra: dict[str, Path] | None = None) -> tuple[Path, dict]:
    """A git + DVC repo holding the project (plus `extra` files: repo path -> source) and params.yaml
    from `preset` (deep-merged with `overrides`), committed; returns it and the environment to run
    commands in. The repo's own copy of cmt_bench writes params.yaml, so an extra method or init
    module in it is known there."""
    for name in PROJECT_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    for dest, src in (extra or {}).items():
        shutil.copy(src, repo / dest)
    env = {**os.environ, "CI": "true", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    sh(f"git init -q && git config user.email t@t && git config user.name t && dvc init -q "
       f"&& python -m cmt_bench preset {preset}", repo, env)
    if overrides:
        merge = ("import json, sys, yaml; from pathlib import Path; from cmt_bench.config import deep_merge, to_yaml, "
                 "validate; p = Path('params.yaml'); "
                 "p.write_text(to_yaml(validate(deep_merge(yaml.safe_load(p.read_text()), json.loads(sys.argv[1])))))")
        subprocess.run([sys.executable, "-c", merge, json.dumps(overrides)], cwd=repo, env=env, check=True)
    sh(f"git add -A && git commit -qm {preset}", repo, env)
    return repo, env


def stale_after_editing(repo: Path, env: dict, rel: str) -> set[str]:
    """The stages `dvc status` lists after appending a comment to the file `rel` and rerunning the code
    stage (each stage's digest of its modules), as `cmt-bench repro` does first; restored after."""
    path = repo / rel
    original = path.read_text()
    try:
        path.write_text(original + "# edited\n")
        sh("dvc repro -s code", repo, env)
        return set(json.loads(sh("dvc status --json", repo, env)))
    finally:
        path.write_text(original)
        sh("dvc repro -s code", repo, env)


def require_fashion() -> None:
    """Skip where Fashion-MNIST is not installed; in CI (where `make setup` installs it) fail."""
    from cmt_bench.sources import FASHION_DIR
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI must have dataset-fashion-mnist: `make setup` installs it")
    pytest.skip("dataset-fashion-mnist is not installed (`make setup` installs it)")


PG = os.environ.get("CMT_BENCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def postgres_database():
    """A fresh PostgreSQL database of its own (no state shared with other tests or runs), dropped
    afterwards; yields its SQLAlchemy URL with the psycopg (3) driver. Skips where PostgreSQL is not
    reachable, except in CI, which provides it."""
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(PG, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as err:
        message = f"PostgreSQL at {PG} is not reachable (set CMT_BENCH_TEST_POSTGRES): {err}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)  # CI provides PostgreSQL; missing it there is a broken setup
        pytest.skip(message)
    db = f"cmt_bench_{uuid.uuid4().hex[:12]}"
    conn.execute(f"CREATE DATABASE {db}")
    try:
        yield PG.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0] + f"/{db}"
    finally:
        conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(tmp: Path, backend: str):
    """A real `mlflow server` on 127.0.0.1 over `backend`; yields its URL once healthy."""
    port, log = free_port(), open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "2", "--backend-store-uri", backend,
                             "--artifacts-destination", str(tmp / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def mlflow_runs(repo: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cmt_bench")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def shipped_spec(name: str):
    """(params, spec) of a shipped study spec, on its preset with every method post-trained."""
    from cmt_bench import methods
    from cmt_bench.config import override, preset
    from cmt_bench.study_spec import load_spec
    params = override(preset(name.split("_")[0], ROOT), {"posttrain.methods": list(methods.names())}, "test")
    return params, load_spec(name, params, ROOT)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_unet_config():
    """The small two-level UNet (attention at the lowest level, 4 norm groups) of the JVP and compile tests."""
    from cmt_bench.config import NetConfig
    return NetConfig(kind="unet", channels=16, channel_mult=[1, 2], blocks_per_level=1, attention=True, norm_groups=4)


def small_flow_map_net(seed: int = 0) -> torch.nn.Module:
    """A real two-time MLP in float64 for derivative checks, its gap embedding moved off its zero init
    so that the second time counts too."""
    from cmt_bench import nets
    from cmt_bench.config import NetConfig
    torch.manual_seed(seed)
    net = nets.build((2,), NetConfig(hidden=32, depth=2, time_features=16), two_times=True).double()
    for p in net.time.emb_gap.mlp[-1].parameters():
        torch.nn.init.normal_(p, std=0.3)
    return net


class ExactFlowMap(torch.nn.Module):
    """u(x, s, t) of a Gaussian's exact flow map, optionally scaled by (1 + scale) to step off it."""

    def __init__(self, flow, scale=0.0):
        super().__init__()
        self.flow, self.scale = flow, scale

    def forward(self, x, t, s=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        s = t if s is None else torch.as_tensor(s, dtype=x.dtype).expand(x.shape[0])
        gap = (s - t).reshape(-1, 1)
        safe = torch.where(gap == 0, torch.ones_like(gap), gap)
        u = torch.where(gap == 0, self.flow.velocity(x, t), (self.flow.flow_map(x, t, s) - x) / safe)
        return u * (1 + self.scale)


@pytest.fixture
def gaussian():
    from cmt_bench.paths import GaussianFlow
    return GaussianFlow(torch.tensor([0.7, -0.3], dtype=torch.float64), 0.5)
