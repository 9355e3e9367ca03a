"""fd_digits scoring speed: 10k generated-like digit samples (uint8, 1x8x8) against the cached
held-out reference, through torch-fidelity with our digits classifier as the feature extractor.

Target: 10k samples scored in <= 10 s on 2 CPU cores. The samples are held-out digits with pixel
noise (generated-like: near the data, not on it). A classifier is trained once (few epochs: speed
does not depend on its accuracy) and the reference statistics are cached by one untimed call, as
the evaluate stage finds them; each timed rep is one whole `frechet_distance` call (classifier
load, 10k forward passes, statistics, the Frechet distance). `--batch-sizes` times other batch
sizes too (the default is fidelity.BATCH_SIZE's).

    python benchmarks/eval_speed.py [--samples N] [--reps R] [--threads T] [--batch-sizes 64,1000]

Writes benchmarks/results/eval_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without needing `pip install -e`

from cmt_bench import classifier, data, fidelity  # noqa: E402
from cmt_bench.config import DataConfig  # noqa: E402

TARGET_SECONDS = 10.0  # for 10k samples
DIGITS = DataConfig(dataset="digits", heldout_size=500, train_size=2000)  # the digits preset's split


def generated_like(heldout: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = heldout[torch.randint(len(heldout), (n,), generator=gen)].float()
    return (base + 20 * torch.randn(base.shape, generator=gen)).round().clamp(0, 255).to(torch.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=5, help="timed calls per batch size, after one warm-up")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target is for 2 cores)")
    ap.add_argument("--batch-sizes", default="", help="comma-separated batch sizes to time besides the default")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"warning: load average {load:.1f} before starting; timings will be noisy", file=sys.stderr)

    (train, heldout), (labels, _) = data.make_labeled_splits(DIGITS, seed=0)
    samples = generated_like(torch.from_numpy(heldout), args.samples)
    batch_sizes = [None] + [int(b) for b in args.batch_sizes.split(",") if b]
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="cmt_eval_speed_") as tmp:
        weights, cache = Path(tmp) / "classifier.pt", Path(tmp) / "reference"
        classifier.save(classifier.train_classifier(data.as_float(train), torch.from_numpy(labels), epochs=2), weights)

        def score(batch_size):
            return fidelity.frechet_distance(samples, extractor="classifier", weights_path=weights,
                                             reference_cache=cache, reference_name="digits_heldout",
                                             batch_size=batch_size)["fd"]
        fidelity.frechet_distance(samples[:10], extractor="classifier", weights_path=weights, reference_cache=cache,
                                  reference_name="digits_heldout", reference_images=torch.from_numpy(heldout))
        for batch_size in batch_sizes:
            key = str(batch_size or fidelity.BATCH_SIZE[fidelity.CLASSIFIER])
            fd = score(batch_size)  # warm-up
            seconds[key] = []
            for _ in range(args.reps):
                start = time.perf_counter()
                score(batch_size)
                seconds[key].append(time.perf_counter() - start)
            print(f"batch {key}: median {statistics.median(seconds[key]):.2f}s  {seconds[key]}", file=sys.stderr)

    default = str(fidelity.BATCH_SIZE[fidelity.CLASSIFIER])
    median = statistics.median(seconds[default]) * 10_000 / args.samples  # per 10k samples
    result = {
        "seconds_per_10k": median, "target_seconds": TARGET_SECONDS, "ratio_to_target": median / TARGET_SECONDS,
        "within_target": median <= TARGET_SECONDS, "fd": fd, "samples": args.samples, "reps": args.reps,
        "median_seconds_by_batch_size": {k: statistics.median(v) for k, v in seconds.items()},
        "per_rep_seconds": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_start": load,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"fd_digits on {args.samples} samples (1x8x8 uint8) vs cached held-out reference: "
          f"{median:.2f}s per 10k = {median / TARGET_SECONDS:.2f} x the {TARGET_SECONDS:.0f}s target "
          f"(median of {args.reps}, {torch.get_num_threads()} threads) | {args.out}")


if __name__ == "__main__":
    main()
