"""Fit and calibrate DeepSC-COVID's out-of-distribution statistics on the product path, score
both demo models there, and store the statistics and the numbers in the DeepSC weights file.

Three disjoint sets of labelled phantoms (``synthetic/geometries.product_cases``: half on
the CLI's default grid, half on clinical 512 × 512 grids at 0.6–0.9 mm, 1–5 mm slices,
96–300 slices), each run as ``covidctdx run`` does (``training/product_path.py``: pipeline
lung masks, then DeepSC-COVID and RACNet):

* ``fit`` (seeds 60000+): class means and shrunk tied covariance of the pooled features;
* ``calibrate`` (seeds 70000+): the threshold = their largest distance (``deepsc/ood.py``);
* ``evaluate`` (seeds 80000+): unseen phantoms, the reported flag rate and accuracies.

The network tensors are not changed; the file is re-written with ``ood.*`` tensors and a
card whose metrics hold the product-path numbers, so its SHA-256, sidecar and card change
together (``weights.save_weights``). Features are cached in ``--work`` so a re-run only
re-fits.

Run: ``.venv/bin/python tools/calibrate_deepsc_ood.py [--work /tmp/ood] [--out Resources/weights]``
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CovidCTDxLib.deepsc.ood import PREFIX, calibrate_threshold, fit_statistics  # noqa: E402
from CovidCTDxLib.result import CLASS_KEYS, SEVERITY_KEYS  # noqa: E402
from CovidCTDxLib.synthetic.geometries import product_cases  # noqa: E402
from CovidCTDxLib.training.product_path import run_cases  # noqa: E402
from CovidCTDxLib.weights import ModelCard, load_weights, save_weights  # noqa: E402

log = logging.getLogger("calibrate_deepsc_ood")

#: (split, number of phantoms, first seed). 45 = 15 per class for three means; 30 calibration
#: scans put the expected flag rate of in-distribution scans at 1/31 ≈ 3 %.
SPLITS = (("fit", 45, 60000), ("calibrate", 30, 70000), ("evaluate", 30, 80000))


def split_rows(name: str, count: int, seed0: int, work: Path, deepsc, racnet) -> List[Dict]:
    """Outcomes of one split, from the cache in ``work`` when it is there."""
    cache = work / f"{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    rows = []
    for outcome in run_cases(product_cases(count, seed0), deepsc, racnet):
        row = outcome.to_dict()
        row["feature"] = [float(v) for v in outcome.feature]
        rows.append(row)
    cache.write_text(json.dumps(rows))
    return rows


def macro_f1(truth: List[str], pred: List[str], classes) -> float:
    """Unweighted mean of per-class F1 over the classes present in the truth."""
    scores = []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(truth, pred))
        fp = sum(t != c and p == c for t, p in zip(truth, pred))
        fn = sum(t == c and p != c for t, p in zip(truth, pred))
        if tp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "covidctdx_deepsc_ood")
    ap.add_argument("--out", type=Path, default=REPO / "Resources" / "weights")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # a shared 2-core machine: one core is enough and leaves one free
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = args.out / "deepsc_demo.safetensors"
    deepsc = load_weights(src, "deepsc")
    racnet = load_weights(args.out / "racnet_demo.safetensors", "racnet")
    rows = {name: split_rows(name, n, seed0, args.work, deepsc, racnet) for name, n, seed0 in SPLITS}

    def features(split: str) -> np.ndarray:
        return np.asarray([r["feature"] for r in rows[split]])

    stats = fit_statistics(features("fit"), [CLASS_KEYS.index(r["label"]) for r in rows["fit"]], len(CLASS_KEYS))
    stats.threshold = calibrate_threshold(stats.distance(features("calibrate")))
    d_eval = stats.distance(features("evaluate"))
    flagged = int(np.sum(d_eval > stats.threshold))
    ev = rows["evaluate"]
    accuracy = float(np.mean([r["predicted"] == r["label"] for r in ev]))
    covid = [r for r in ev if r["label"] == "covid19"]
    sev_f1 = macro_f1([r["severity_truth"] for r in covid], [r["racnet_label"] for r in covid], SEVERITY_KEYS)
    confusion = {t: {p: sum(r["label"] == t and r["predicted"] == p for r in ev) for p in CLASS_KEYS} for t in CLASS_KEYS}
    log.info("threshold %.3f; evaluate: %d/%d flagged (distances %.2f..%.2f); accuracy %.3f; RACNet COVID severity macro-F1 %.3f",
             stats.threshold, flagged, len(ev), d_eval.min(), d_eval.max(), accuracy, sev_f1)
    log.info("confusion (truth → predicted): %s", confusion)

    state = {k: v for k, v in deepsc.state_dict.items() if not k.startswith(PREFIX)}
    state.update(stats.to_tensors())
    card = ModelCard.from_dict(deepsc.card.to_dict())
    card.metrics.update({
        "product_path_phantoms": len(ev),
        "product_path_accuracy": round(accuracy, 4),
        "product_path_confusion": confusion,
        "product_path_racnet_severity_macro_f1_covid": round(sev_f1, 4),
        "ood_fit_phantoms": len(rows["fit"]),
        "ood_calibration_phantoms": len(rows["calibrate"]),
        "ood_threshold": round(stats.threshold, 4),
        "ood_flagged_unseen_phantoms": f"{flagged}/{len(ev)}",
    })
    card.notes = (card.notes.split(" OOD:")[0] + " OOD: Mahalanobis distance of the pooled classification features to class "
                  "means fitted on product-path phantoms (tools/calibrate_deepsc_ood.py); threshold = largest distance of "
                  "held-out calibration phantoms. product_path_* metrics: phantoms on the CLI default and clinical grids "
                  "with the pipeline's own lung masks.")
    with tempfile.TemporaryDirectory(prefix=".deepsc_stage_", dir=args.out) as stage:
        staged = Path(stage) / src.name
        save_weights(staged, state, card)
        for f in sorted(Path(stage).iterdir(), key=lambda f: f == staged):  # weights file last
            os.replace(f, args.out / f.name)
    summary = {"threshold": stats.threshold, "evaluate_flagged": flagged, "evaluate_n": len(ev), "accuracy": accuracy,
               "racnet_severity_macro_f1_covid": sev_f1, "confusion": confusion,
               "evaluate_distances": [round(float(d), 3) for d in d_eval], "wall_s": round(time.perf_counter() - t0, 1)}
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("wrote %s; summary in %s", src, args.work / "summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
