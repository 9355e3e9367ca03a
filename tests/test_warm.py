"""The warm server (cmt_bench/warm.py) as `cmt-bench repro` starts it: the environment comes at once,
a command launched while the server still imports waits for it and runs there, and commands run in
fresh interpreters when the server died. (tests/test_pipeline.py runs the pipeline's stages in it.)"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cmt_bench import warm

ROOT = Path(__file__).resolve().parents[1]  # the server serves the repository its package is in


def test_a_command_launched_while_the_server_imports_waits_and_runs_in_it(monkeypatch, capfd):
    monkeypatch.chdir(ROOT)
    with warm.server(cwd=ROOT) as env:
        assert not os.path.exists(env[warm.ENV])  # given at once: the server takes seconds to import
        monkeypatch.setenv(warm.ENV, env[warm.ENV])
        assert warm.run("cmt_bench", ["check"], time.time()) == 0  # None would mean a fresh interpreter
    assert "params.yaml: valid (preset toy)" in capfd.readouterr().out


def test_commands_run_in_fresh_interpreters_when_the_server_dies(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a server that exits before it listens
    with warm.server() as env:
        monkeypatch.setenv(warm.ENV, env[warm.ENV])
        started = time.monotonic()
        assert warm.run("cmt_bench", ["check"], time.time()) is None
        assert time.monotonic() - started < 10


def test_a_warm_command_that_exits_with_a_message_prints_it(tmp_path, monkeypatch, capsys):
    """As in a fresh interpreter, SystemExit('...') in a command the warm server runs reaches stderr, exit 1."""
    (tmp_path / "exits_with_message.py").write_text(
        "def main(argv, started):\n    raise SystemExit('error: a clear message')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(warm.ENTRY, "exits", "exits_with_message")
    assert warm._main("exits", [], 0.0) == 1
    assert "error: a clear message" in capsys.readouterr().err
