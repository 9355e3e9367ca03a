"""The code each DVC stage runs: the package modules its entry module imports, found by reading the
sources (`ast`), top-level and function-level imports alike, transitively.

The `code` stage (the first in dvc.yaml) depends on the whole package folder and writes one file per
stage, `artifacts/code/<stage>.json`, with the sha256 of each module that stage runs; each stage
depends on its own file. So editing any module a stage runs makes DVC rerun it, and editing one it
does not (a report-only module, say) leaves it alone: DVC compares a dependency by content, and that
stage's file comes out the same. One file per stage instead of its modules listed in dvc.yaml keeps
dvc.lock small, which DVC parses and rewrites around every stage it runs (1,850 module entries of 10k
lines took ~1.6 s per stage). The imports are read when the pipeline runs, so they cannot go stale;
`cmt-bench deps` checks that each stage in dvc.yaml depends on its file.

Two rules beyond plain imports:
- the registries (`cmt_bench/methods/`, `cmt_bench/inits/`) import every module of their package;
  `config` imports the registries to validate each method's parameter section, which cannot change
  what a stage computes unless the stage runs that method. So a registry counts only its own
  `__init__`, except where a stage uses its members: post-training cells depend on their own
  method's and init's module directly in dvc.yaml (`${item.method}`, `${item.init}`: DVC cannot give
  matrix cells different files) and on what every registered member imports; the studies and the
  report hash the whole registry folders, so a new member reruns them too, and the starts stage
  (every cell's starting weights) the whole inits folder.
- a pipeline stage enters through `python -m cmt_bench.stages` (`stages/__main__`, `stages/run`); the
  studies and the report through `python -m cmt_bench` (`__main__`, `cli`), of which only the
  top-level imports count: its function-level ones belong to other commands.

    python -m cmt_bench.codedeps artifacts/code   # the code stage's command
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "cmt_bench"
SOURCE = Path(__file__).resolve().parent  # the package folder
REGISTRIES = ("cmt_bench.methods", "cmt_bench.inits")
RUNNER = ("cmt_bench.stages.__main__", "cmt_bench.stages.run")  # `python -m cmt_bench.stages STAGE`
CLI = ("cmt_bench.__main__", "cmt_bench.cli")  # `python -m cmt_bench COMMAND`: top-level imports only

# stage -> (entry modules, registry members it runs: None, "item" (its matrix item's), "all", or the
# registries whose every member it runs)
STAGES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "data": ((*RUNNER, "cmt_bench.stages.data"), None),
    "features": ((*RUNNER, "cmt_bench.stages.features"), None),
    "pretrain": ((*RUNNER, "cmt_bench.stages.pretrain"), None),
    "trajectories": ((*RUNNER, "cmt_bench.stages.trajectories"), None),
    "midtrain": ((*RUNNER, "cmt_bench.stages.midtrain"), None),
    "starts": ((*RUNNER, "cmt_bench.stages.starts"), ("cmt_bench.inits",)),
    "posttrain": ((*RUNNER, "cmt_bench.stages.posttrain"), "item"),
    "evaluate": ((*RUNNER, "cmt_bench.stages.evaluate"), None),
    "studies": ((*CLI, "cmt_bench.study", "cmt_bench.sensitivity"), "all"),
    "study_index": ((*CLI, "cmt_bench.study"), None),
    "report": ((*CLI, "cmt_bench.report"), "all"),
}
ITEM_DEPS = {"cmt_bench.methods": "cmt_bench/methods/${item.method}.py",
             "cmt_bench.inits": "cmt_bench/inits/${item.init}.py"}


def module_file(name: str) -> Path | None:
    """cmt_bench.a.b -> cmt_bench/a/b.py or cmt_bench/a/b/__init__.py (None: not a package module)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = SOURCE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@lru_cache(maxsize=None)
def direct_imports(name: str, top_level_only: bool = False) -> frozenset[str]:
    """The package modules `name` imports (and their parent packages)."""
    path = module_file(name)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from . import x`: x may be a module
    out = {m for m in found if module_file(m) is not None}
    out.update(p for m in list(out) for p in _parents(m))
    out.update(_parents(name))
    return frozenset(m for m in out if m != name and module_file(m) is not None)


def members(registry: str) -> list[str]:
    """The modules of a registry package (what its `__init__` imports by discovery)."""
    folder = module_file(registry).parent
    return sorted(f"{registry}.{p.stem}" for p in folder.glob("*.py") if not p.stem.startswith("_"))


def _whole(registries) -> tuple[str, ...]:
    """The registries whose every member a stage runs."""
    return REGISTRIES if registries == "all" else registries if isinstance(registries, tuple) else ()


def closure(entries, registries: str | tuple[str, ...] | None = None,
            skip: frozenset[str] = frozenset()) -> set[str]:
    """Every package module the entries import, transitively, except `skip`. Registry members are
    followed only for the registries named whole ('all': both) or where named (see the module docstring)."""
    whole = _whole(registries)
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen or name in skip:
            continue
        seen.add(name)
        todo.extend(direct_imports(name, top_level_only=name in CLI))
        if name in whole:
            todo.extend(members(name))
    return seen


def files(modules) -> list[str]:
    """Repo-relative paths of modules, sorted."""
    return sorted(module_file(m).relative_to(SOURCE.parent).as_posix() for m in modules)


def _folder_files(registry: str) -> list[str]:
    """Every source file of a registry's folder: a new member changes the list."""
    folder = module_file(registry).parent
    return sorted(p.relative_to(SOURCE.parent).as_posix() for p in folder.glob("*.py"))


def stage_code(stage: str) -> list[str]:
    """The package files whose bytes a dvc.yaml stage's digest holds (registry folders in full where
    the stage runs every member; a matrix stage's `${item...}` modules are in `item_code`)."""
    entries, registries = STAGES[stage]
    modules = closure(entries, registries)
    if _whole(registries):
        folders = [r for r in _whole(registries) if r in modules]
        modules -= {m for r in folders for m in [r, *members(r)]}
        return sorted(set(files(modules)).union(*(_folder_files(r) for r in folders)))
    if registries == "item":  # what any member imports (the cell's own member is in item_code)
        for registry in REGISTRIES:
            if registry in modules:
                for member in members(registry):
                    modules |= closure(direct_imports(member), "item") - {member}
    return files(modules)


def item_code(stage: str) -> list[str]:
    """A matrix stage's own registry members, as dvc.yaml names them (`${item.method}`...)."""
    entries, registries = STAGES[stage]
    if registries != "item":
        return []
    modules = closure(entries, registries)
    return [ITEM_DEPS[r] for r in REGISTRIES if r in modules]


def code_hash(modules) -> str:
    """A short hash of the sources of these modules (what a study's trials ran)."""
    digest = hashlib.sha256()
    for path in files(modules):
        digest.update(path.encode())
        digest.update((SOURCE.parent / path).read_bytes())
    return digest.hexdigest()[:12]


# --- the code stage and dvc.yaml -------------------------------------------------------------------

CODE_STAGE = "code"
DIGESTS = "artifacts/code"  # the code stage's output: one <stage>.json per stage


def digest_file(stage: str) -> str:
    return f"{DIGESTS}/{stage}.json"


def write_digests(folder: Path) -> None:
    """The code stage: for each stage, {file: sha256} of the code it runs (sorted, so the bytes change
    only when that code does)."""
    import json
    folder.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        sources = {path: hashlib.sha256((SOURCE.parent / path).read_bytes()).hexdigest()
                   for path in stage_code(stage)}
        (folder / f"{stage}.json").write_text(json.dumps(sources, indent=1, sort_keys=True) + "\n")


def dvc_code(stage: str) -> list[str]:
    """A stage's code dependencies as dvc.yaml lists them: the package folder for the code stage, else
    the stage's digest file and its matrix item's own modules."""
    if stage == CODE_STAGE:
        return [PACKAGE]
    return [digest_file(stage), *item_code(stage)]


def _is_code(dep: str) -> bool:
    return dep == PACKAGE or dep.startswith((f"{PACKAGE}/", f"{DIGESTS}/"))


def mismatches(dvc_yaml: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per stage of dvc.yaml: (code dependencies it lacks, ones it should not list); empty where right."""
    import yaml
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = {}
    for name in [n for n in (CODE_STAGE, *STAGES) if n not in stages]:
        out[name] = ([f"<no stage {name!r} in dvc.yaml>"], [])
    for name, stage in stages.items():
        if name != CODE_STAGE and name not in STAGES:
            out[name] = ([f"<no entry for stage {name!r} in cmt_bench/codedeps.py STAGES>"], [])
            continue
        listed = {d for d in stage.get("deps") or [] if isinstance(d, str) and _is_code(d)}
        expected = set(dvc_code(name))
        if listed != expected:
            out[name] = (sorted(expected - listed), sorted(listed - expected))
    return out


def write(dvc_yaml: Path) -> list[str]:
    """Rewrite each stage's code dependencies in dvc.yaml (comments and everything else kept);
    returns the stages that changed."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq
    rt = YAML()
    rt.width = 120
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(dvc_yaml.read_text())
    changed = []
    for name, stage in doc["stages"].items():
        if name != CODE_STAGE and name not in STAGES:
            raise KeyError(f"dvc.yaml stage {name!r} has no entry in cmt_bench/codedeps.py STAGES")
        old = list(stage.get("deps") or [])
        new = [d for d in old if not (isinstance(d, str) and _is_code(d))] + dvc_code(name)
        if new != old:
            seq = CommentedSeq(new)
            seq.fa.set_block_style()
            stage["deps"] = seq
            changed.append(name)
    if changed:
        with dvc_yaml.open("w") as f:
            rt.dump(doc, f)
    return changed


if __name__ == "__main__":
    import sys
    import time

    from . import progress
    started = time.time()
    with progress.stage(CODE_STAGE, started):
        write_digests(Path(sys.argv[1]))
        progress.note(f"the modules of {len(STAGES)} stages hashed")
