"""The features stage: the Frechet distance's feature space, reference statistics and noise floors."""
from __future__ import annotations

import shutil
import time

from .. import data as datasets
from .. import metrics, scoring
from ..config import Params
from ..data import write_json
from ..layout import CLASSIFIER, FEATURES_METRICS, REFERENCE_CACHE, out_dir
from ..tracking import Tracker


def _reference_floor(params: Params, heldout, reference) -> float:
    """The Frechet distance of the held-out split against evaluate.fid_reference's split (e.g. train,
    EDM's protocol): what real images score there. Caches that split's features for evaluate."""
    if params.features == "raw":
        return metrics.fd_raw(heldout.numpy(), reference.numpy())
    from .. import fidelity  # torch-fidelity only where images are scored
    return fidelity.frechet_distance(fidelity.to_uint8(heldout), extractor=params.features,
                                     weights_path=scoring.feature_weights(params),
                                     reference_cache=REFERENCE_CACHE, reference_name=params.evaluate.fid_reference,
                                     reference_images=fidelity.to_uint8(reference))["fd"]


def run(params: Params) -> None:
    """The metric's feature space: for `fd_<dataset>` a classifier trained on the training split
    (held-out accuracy logged), then the held-out reference statistics cached once, and the
    metric's noise floor: training samples (never the reference) scored as if they were generated.
    With evaluate.fid_reference train, the streamed score's reference too (see _reference_floor)."""
    data_dir, out = out_dir("data"), out_dir("features")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train_x, heldout = datasets.load_split(data_dir, "train"), datasets.load_split(data_dir, "heldout")
    tracker = Tracker.open(params, "features", method=params.fd_name,
                           stage_params={"features": params.features, "metric": params.fd_name,
                                         "evaluate": params.evaluate.model_dump()})
    result: dict = {"features": params.features, "metric": params.fd_name}
    if params.features == "classifier":
        from .. import classifier
        cfg = params.evaluate.classifier
        labels = {split: datasets.load_labels(data_dir, split) for split in ("train", "heldout")}
        start = time.perf_counter()
        model = classifier.train_classifier(train_x, labels["train"], epochs=cfg.epochs, batch_size=cfg.batch_size,
                                            lr=cfg.lr, feature_dim=cfg.feature_dim, seed=params.seed)
        result["train_seconds"] = time.perf_counter() - start
        result["heldout_accuracy"] = classifier.accuracy(model, heldout, labels["heldout"])
        classifier.save(model, CLASSIFIER)
    score = scoring.Scorer(params, heldout.numpy())
    floors = {}
    for n in sorted({params.evaluate.inloop_samples, params.evaluate.samples}):
        floors.update(score({"floor": train_x[:n].numpy()}))  # at most n: a small training split gives fewer
    result["floor"] = floors
    if params.evaluate.fid_reference != "heldout":  # the streamed score's reference, and its floor
        result["fid_reference_floor"] = _reference_floor(params, heldout, datasets.load_split(data_dir,
                                                                                              params.evaluate.fid_reference))
    if score.mixture is not None:  # data with a known flow map: its samples, solved once for every stage
        for n in sorted({params.evaluate.inloop_samples, params.evaluate.samples}):
            score.save_exact(n)
    tracker.log_metrics(0, {**{k: v for k, v in result.items() if isinstance(v, float)}, **floors})
    tracker.finish()
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": "features", **result})
    # DVC metrics (`dvc metrics show`): numbers only
    write_json(FEATURES_METRICS, {k: v for k, v in result.items() if k not in ("features", "metric")})
