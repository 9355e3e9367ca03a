"""What DVC pays per stage to read and write dvc.lock, and what ruamel.yaml's C loader saves of it.

Between two stages `dvc repro` reads dvc.lock several times with ruamel.yaml's plain ("safe") loader
and rewrites it once through a round-trip load and dump (comments and order kept), all in the
repro's one process. ruamel.yaml 0.19 no longer installs its C extension, `ruamel.yaml.clib`; without
it the plain loader runs in pure Python. This times, on the committed dvc.lock: the plain loader in
pure Python and through the C extension, the round-trip load and the dump (which no extension
speeds). Reps alternate the cells (the order rotates each rep); the ratio is the median over reps of
C / pure in the same rep, measured in this one run.

    python benchmarks/dvc_yaml.py [--reps 9] [--lock dvc.lock] [--out FILE]

Writes benchmarks/results/dvc_yaml.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

from dvc.utils.serialize._yaml import dumps_yaml, parse_yaml, parse_yaml_for_update
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_model  # noqa: E402


def has_clib() -> bool:
    return importlib.util.find_spec("_ruamel_yaml") is not None  # ruamel.yaml.clib's module


def cells(text: str, path: str) -> dict:
    """name -> a function doing it once through DVC's own functions (dvc/utils/serialize/_yaml.py),
    and its plain load forced to pure Python as it runs without the C extension."""
    rt = parse_yaml_for_update(text, path)
    out = {"safe load, pure Python": lambda: YAML(typ="safe", pure=True).load(text),
           "round-trip load": lambda: parse_yaml_for_update(text, path),
           "round-trip dump": lambda: dumps_yaml(rt)}
    if has_clib():  # DVC's plain load takes the C loader by itself where it is installed
        out["safe load, C (ruamel.yaml.clib)"] = lambda: parse_yaml(text, path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--lock", type=Path, default=ROOT / "dvc.lock")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dvc_yaml.json")
    args = ap.parse_args()
    text = args.lock.read_text()
    work = cells(text, str(args.lock))
    for fn in work.values():  # warm-up: imports, the first parser
        fn()
    times = {name: [] for name in work}
    names = list(work)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            work[name]()
            times[name].append(time.perf_counter() - start)
    result = {"cpu": cpu_model(), "lock": str(args.lock.relative_to(ROOT)) if args.lock.is_relative_to(ROOT) else
              str(args.lock), "lock_lines": text.count("\n"), "reps": args.reps, "clib": has_clib(),
              "seconds": {name: statistics.median(t) for name, t in times.items()}}
    c_name, pure = "safe load, C (ruamel.yaml.clib)", "safe load, pure Python"
    if c_name in times:
        result["c_over_pure"] = statistics.median(c / p for c, p in zip(times[c_name], times[pure]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, s in result["seconds"].items():
        print(f"{name}: {s * 1e3:.0f} ms")
    if "c_over_pure" in result:
        print(f"C / pure: x{result['c_over_pure']:.2f}")
    print(args.out)


if __name__ == "__main__":
    main()
