"""A warm interpreter for the stage commands DVC runs: `cmt-bench repro` starts one for the length
of the run, and each `python -m cmt_bench[.stages] ...` it launches hands its arguments, working
directory, environment and terminal to it and exits with its exit code. The server has imported
torch, MLflow, Optuna and the package once; each command runs in a fork of it, so a stage pays its
work, not ~3 s of imports (measured: an evaluate stage of the toy took 3.2 s, of which its work 0.1 s).

A fork runs the code the server imported: if a module of the package changed on disk since, or an
environment variable read at import time (threads, devices) differs, the command runs in a fresh
interpreter as without the server. Without $CMT_BENCH_WARM (or with the server gone) nothing changes.
This module is stdlib-only: the client side runs before any heavy import.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

ENV = "CMT_BENCH_WARM"  # the server's socket path
# read when torch, numpy or the CUDA runtime load, so a fork cannot take a new value
IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                   "PYTHONHASHSEED", "PYTHONPATH")
COLD = -1  # the server's answer when the command must run in a fresh interpreter
forked = False  # True in a command the server runs
# torch._dynamo: a process's first optimizer imports it, which took ~1 s of every training stage; MLflow's
# SQL store, its SQLite dialect, the FLOP counter and the JVP decompositions load lazily on first use,
# which took 0.9 s of every evaluate stage and 1.5 s of a MeanFlow cell (python -X importtime)
WARM_MODULES = ("torch", "torch._dynamo", "torch._decomp.decompositions_for_jvp", "torch.utils.flop_counter",
                "numpy", "pandas", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
                "sqlalchemy.dialects.sqlite", "optuna", "cmt_bench.cli",
                "cmt_bench.study", "cmt_bench.report", *(f"cmt_bench.stages.{s}" for s in
                                      ("data", "features", "pretrain", "trajectories", "midtrain", "starts",
                                       "posttrain", "evaluate")))


# --- client ------------------------------------------------------------------------------------

def run(module: str, argv: list[str], started: float) -> int | None:
    """Run `python -m module argv` in the warm server; None if there is none or it declines."""
    path = os.environ.get(ENV)
    if not path:
        return None
    while not os.path.exists(path):  # the server is still importing (server() removes the folder if it died)
        if not os.path.isdir(os.path.dirname(path)):
            return None
        time.sleep(0.05)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = json.dumps({"module": module, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "started": started}).encode()
        # its length first: the connection stays open both ways, so the fork sees this process go away
        socket.send_fds(conn, [len(request).to_bytes(8, "little") + request], [0, 1, 2])
        answer = b""
        while chunk := conn.recv(64):
            answer += chunk
    except OSError:
        return None
    finally:
        conn.close()
    if not answer:  # the fork died without an answer (killed)
        print(f"{module} {' '.join(argv)}: the warm process running it died", file=sys.stderr)
        return 1
    code = int(answer)
    return None if code == COLD else code


# --- server ------------------------------------------------------------------------------------

@contextmanager
def server(cwd: str | Path | None = None):
    """A warm server for the commands run inside the block; yields the environment to give them at
    once: while the server imports (a few seconds), the block goes on (DVC starts, the first stages'
    dependencies are hashed) and a command waits for it; if the server dies, its folder goes and the
    commands run in fresh interpreters."""
    folder = tempfile.mkdtemp(prefix="cmt_bench_warm_")
    path = os.path.join(folder, "socket")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from cmt_bench.warm import serve; serve(sys.argv[1])",
                             path], stdin=subprocess.DEVNULL, cwd=cwd)

    def remove_when_gone() -> None:
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
    threading.Thread(target=remove_when_gone, daemon=True).start()
    try:
        yield {**os.environ, ENV: path}
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _sources() -> dict[str, int]:
    """{file: mtime} of the package's modules loaded in this process."""
    out = {}
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if file and name.split(".")[0] == "cmt_bench":
            try:
                out[file] = os.stat(file).st_mtime_ns
            except OSError:
                out[file] = -1
    return out


def serve(path: str) -> None:
    """Import the heavy modules once, then fork a child per connection (until killed)."""
    import importlib
    for name in WARM_MODULES:
        importlib.import_module(name)
    sources, env = _sources(), {k: os.environ.get(k) for k in IMPORT_TIME_ENV}
    root = str(Path(sys.modules["cmt_bench"].__file__).resolve().parents[1])
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".new")
    server.listen(16)
    os.rename(path + ".new", path)  # the path appears once it listens
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forks reap themselves
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a stage waits for its own children
            os._exit(_child(conn, sources, env, root))
        conn.close()


def _child(conn: socket.socket, sources: dict[str, int], env: dict, root: str) -> int:
    global forked
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while len(msg) < 8 + int.from_bytes(msg[:8], "little"):
        msg += conn.recv(1 << 20)
    request = json.loads(msg[8:])
    code = COLD
    try:
        same_env = all(request["env"].get(k) == v for k, v in env.items())
        here = str(Path(request["cwd"]).resolve())
        if same_env and here == root and _sources() == sources:  # the code and settings it was started with
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = [request["module"], *request["argv"]]
            forked = True
            threading.Thread(target=_die_with_client, args=(conn,), daemon=True).start()
            code = _main(request["module"], request["argv"], request["started"])
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        conn.sendall(str(code).encode())
        conn.close()
    return max(code, 0)


ENTRY = {"cmt_bench.stages": "cmt_bench.stages.run", "cmt_bench": "cmt_bench.cli"}  # what each __main__ calls


def _main(module: str, argv: list[str], started: float) -> int:
    import importlib  # by name: a stage runs (and depends on) its own entry point only
    try:
        return importlib.import_module(ENTRY[module]).main(argv, started=started)
    except SystemExit as exc:  # as a fresh interpreter: a message goes to stderr and exits 1
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what a fresh interpreter would print, and its exit code
        traceback.print_exc()
        return 1


def _die_with_client(conn: socket.socket) -> None:
    """The client (what DVC started) went away, e.g. DVC was stopped: stop this stage too."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)
