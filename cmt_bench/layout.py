"""Where everything lives, relative to the repo root: stage outputs, resumable checkpoints, specs and
reports. The one place that knows the layout; it imports nothing of the package, so any layer
(stages, studies, the report) can read it without pulling in another layer's code.
"""
from __future__ import annotations

from pathlib import Path

ART = Path("artifacts")  # DVC outputs of the stages
CKPT = Path("checkpoints")  # resumable state; not a DVC output, so a rerun after a kill finds it
TIMINGS = Path("logs/stages")  # each stage's time in its latest run (progress.py), for the summary
EXPERIMENTS = Path("experiments")  # presets: experiments/<preset>.yaml
STUDY_SPECS = EXPERIMENTS / "studies"
ABLATION_SPECS = EXPERIMENTS / "ablations"
REPORTS = Path("reports")

FEATURES = ART / "features"
FEATURES_METRICS = ART / "features.json"  # DVC metrics of the features stage (numbers only)
CLASSIFIER = FEATURES / "classifier.pt"  # the feature network of fd_<dataset>
REFERENCE_CACHE = FEATURES / "reference"  # torch-fidelity's cached reference statistics, one per split
EXACT_SAMPLES = FEATURES / "exact"  # the exact flow map's samples per sample count (data with a known map)
STUDIES = ART / "studies"  # one folder per study, and index.json (the studies the report shows)
STUDY_INDEX = STUDIES / "index.json"
ABLATION_REPORTS = REPORTS / "ablations"


def seed_part(seed: int | None) -> str | None:
    return None if seed is None else f"seed{seed}"


def out_dir(stage: str, init: str | None = None, method: str | None = None, seed: int | None = None) -> Path:
    """artifacts/<stage>[/<method>][/<init>][/seed<N>]: post-training and evaluation have one per cell."""
    return ART.joinpath(stage, *(part for part in (method, init, seed_part(seed)) if part))


def cell(stage: str, init: str | None, method: str | None, seed: int | None = None) -> str:
    """A stage's name for one matrix cell, e.g. posttrain-meanflow-cmt-seed1 (run names, checkpoints)."""
    return "-".join(part for part in (stage, method, init, seed_part(seed)) if part)


def start_digest(init: str, method: str, seed: int) -> Path:
    """The digest of one post-training cell's starting weights (the starts stage), which the cell depends on."""
    return out_dir("starts", init, method) / f"{seed_part(seed)}.json"


def checkpoint(stage: str, init: str | None = None, method: str | None = None, seed: int | None = None) -> Path:
    """The resumable checkpoint folder of one stage or matrix cell."""
    return CKPT / cell(stage, init, method, seed)


def study_checkpoint(study_name: str, trial: int) -> Path:
    return CKPT / "studies" / study_name / f"trial{trial}"


def report_dir(preset: str) -> Path:
    return REPORTS / preset
