"""What a person watching a run sees: one line per stage (what it is, how long it took and, for
training, images seen and the last loss), a live bar while a stage trains or a study runs, and a
record of each stage's time for the summary of where the time went (`cmt-bench summary`).

Bars only on a terminal; the closing line also in a log file; nothing in CI (CI=true), where the
tests read the stages' own output. Imports nothing heavy: every stage process loads it first.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

from . import warm
from .layout import TIMINGS

# stage kinds in pipeline order, with how the summary names them
KINDS = {"code": "code digests", "data": "data", "features": "features", "pretrain": "teacher (pre-training)",
         "trajectories": "trajectories", "midtrain": "mid-training", "starts": "starting weights",
         "posttrain": "post-training", "evaluate": "final evaluation", "studies": "studies",
         "study_index": "study index", "report": "report"}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


NO_BARS = "CMT_BENCH_NO_BARS"  # set where stages run side by side: two bars cannot share a terminal line
# set by a whole `cmt-bench repro`, which ends with the summary: the report stage then prints nothing of
# it, so the table and verdicts are not printed twice
SUMMARY_AT_END = "CMT_BENCH_SUMMARY_AT_END"
_bars = True  # off in a study worker: the study shows one bar for all its trials


def live() -> bool:
    """Bars: on a terminal, outside CI, unless turned off for this process."""
    return _bars and not in_ci() and not os.environ.get(NO_BARS) and sys.stderr.isatty()


def no_bars() -> None:
    global _bars
    _bars = False


def dvc_name(kind: str, *cell) -> str:
    """The DVC stage name of a stage or matrix cell, e.g. posttrain@cmt-ect-0."""
    parts = [str(p) for p in cell if p is not None]
    return f"{kind}@{'-'.join(parts)}" if parts else kind


def count(n: float) -> str:
    """1.00M, 250k, 512."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n:.0f}"


def _clock(seconds: float) -> str:
    return f"{seconds:5.1f} s" if seconds < 100 else f"{seconds / 60:5.1f} min"


class Stage:
    """One stage's closing line; `note` adds what it did (images, loss, trials)."""

    def __init__(self, name: str):
        self.name, self.notes, self.extra = name, [], {}
        self.start = time.time()

    def note(self, text: str, **record) -> None:
        self.notes.append(text)
        self.extra.update(record)

    def close(self, ok: bool) -> None:
        seconds = time.time() - self.start
        if not in_ci():
            mark = "done" if ok else "FAILED"
            print(f"{mark:<6} {self.name:<30} {_clock(seconds)}  {'  '.join(self.notes)}".rstrip(), file=sys.stderr,
                  flush=True)
        if ok:  # the time of its last successful run, for the summary
            TIMINGS.mkdir(parents=True, exist_ok=True)
            record = {"stage": self.name, "kind": self.name.split("@")[0], "seconds": seconds,
                      "finished": time.time(), "warm": warm.forked, **self.extra}
            (TIMINGS / f"{self.name}.json").write_text(json.dumps(record))


_current: Stage | None = None


@contextmanager
def stage(name: str, start: float | None = None, quiet: bool = False):
    """Time a stage from `start` (the process's first line, so imports count) to its end; `quiet`
    (the other ranks of a DDP run) neither prints nor records."""
    global _current
    _current = Stage(name)
    if start is not None:
        _current.start = start
    ok = False
    try:
        yield _current
        ok = True
    finally:
        if not quiet:
            _current.close(ok)
        _current = None


def note(text: str, **record) -> None:
    """Add to the running stage's closing line (no-op outside a stage, e.g. in a study trial)."""
    if _current is not None:
        _current.note(text, **record)


def bar(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True):
    """A tqdm bar on a terminal (elapsed, rate, time left), else one that shows nothing."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True, leave=False,
                dynamic_ncols=True, disable=not (enabled and live()))


def iterate(items, desc: str, unit: str):
    """`items` with a bar on a terminal."""
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not live())


def _busy(records: list[dict]) -> float:
    """Seconds during which at least one of the records' runs ran (their intervals merged)."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted((r["finished"] - r["seconds"], r["finished"]) for r in records):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy


def summary_lines() -> list[str]:
    """Where the time went: each stage kind's seconds in its latest run (the stage processes' own
    time, imports included; DVC's hashing between stages is not in it)."""
    records = [json.loads(p.read_text()) for p in sorted(TIMINGS.glob("*.json"))] if TIMINGS.exists() else []
    if not records:
        return []
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    total, busy = sum(r["seconds"] for r in records), _busy(records)
    overlap = f"; {_clock(busy).strip()} while any ran, as cells ran side by side" if busy < total - 1 else ""
    lines = [f"where the time went (each stage's latest run, {_clock(total).strip()} in all{overlap}):"]
    for kind in [*KINDS, *sorted(set(by_kind) - set(KINDS))]:
        if kind not in by_kind:
            continue
        rs = by_kind[kind]
        seconds = sum(r["seconds"] for r in rs)
        steps = sum(r.get("training_seconds", 0.0) for r in rs)
        detail = f"{len(rs)} cells" if len(rs) > 1 else ""
        if steps:
            detail += (", " if detail else "") + f"training steps {_clock(steps).strip()}"
        lines.append(f"  {KINDS.get(kind, kind):<24} {_clock(seconds)}  {detail}".rstrip())
    return lines
