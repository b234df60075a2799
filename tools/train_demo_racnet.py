"""Train the demo RACNet weights on phantoms and score them on held-out phantoms.

Writes ``Resources/weights/racnet_demo.safetensors`` (+ ``.json`` card, ``.sha256``).
The card records the validation metrics of the best epoch and the held-out figures
(phantoms with seeds never used in training or validation, run through ``run_racnet``
exactly as the pipeline does). Synthetic training data — not for diagnosis.

Run: ``.venv/bin/python tools/train_demo_racnet.py [--minutes 10] [--work DIR]``
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "Resources" / "weights" / "racnet_demo.safetensors"
HELD_OUT_SEED = 900_000

log = logging.getLogger("train_demo_racnet")


def held_out_metrics(path: Path, n: int) -> dict:
    """COVID accuracy and severity macro-F1 of ``run_racnet`` on ``n`` unseen phantoms."""
    from CovidCTDxLib.racnet.inference import load_racnet, run_racnet
    from CovidCTDxLib.result import SEVERITY_KEYS, LungMasks
    from CovidCTDxLib.synthetic.phantom import make_phantom, severity_from_lvr
    from CovidCTDxLib.training.common import accuracy, confusion_matrix, macro_f1
    from CovidCTDxLib.training.racnet_data import PHANTOM_CYCLE, PHANTOM_GEOMETRIES
    from CovidCTDxLib.weights import load_weights

    w = load_weights(path, "racnet")
    bundle = load_racnet(w)
    ct_, cp, st, sp, ood, secs = [], [], [], [], [], []
    for i in range(n):
        kind, sev = PHANTOM_CYCLE[i % len(PHANTOM_CYCLE)]
        geo = PHANTOM_GEOMETRIES[(i // len(PHANTOM_CYCLE)) % len(PHANTOM_GEOMETRIES)]
        ph = make_phantom(kind=kind, severity=sev, shape=geo[0], spacing=geo[1], seed=HELD_OUT_SEED + i)
        lungs = LungMasks(ph.right_lung, ph.left_lung, ph.airways, np.zeros(ph.ct.shape, bool))
        t = time.perf_counter()
        s = run_racnet(ph.ct, lungs, w, bundle=bundle)
        secs.append(time.perf_counter() - t)
        ct_.append(int(ph.label == "covid19"))
        cp.append(int(s.covid_probability >= 0.5))
        ood.append(bool(s.out_of_distribution))
        if kind == "covid":
            st.append(SEVERITY_KEYS.index(severity_from_lvr(ph.lvr_percent)))
            sp.append(SEVERITY_KEYS.index(s.label))
    return {
        "phantoms": n,
        "seeds": f"{HELD_OUT_SEED}..{HELD_OUT_SEED + n - 1}",
        "covid_accuracy": accuracy(ct_, cp),
        "covid_macro_f1": macro_f1(ct_, cp, 2),
        "severity_macro_f1": macro_f1(st, sp, 4),
        "severity_accuracy": accuracy(st, sp),
        "severity_confusion": confusion_matrix(st, sp, 4).tolist(),
        "ood_fraction": float(np.mean(ood)),
        "run_racnet_mean_s": float(np.mean(secs)),
    }


def refresh_anchors(a: argparse.Namespace) -> None:
    """Recompute latent + input anchors of the weights at ``a.out`` from the training phantoms."""
    import torch

    from CovidCTDxLib.racnet.inference import load_racnet, save_racnet_weights
    from CovidCTDxLib.training.racnet_data import make_phantom_items
    from CovidCTDxLib.training.train_racnet import anchor_tensors
    from CovidCTDxLib.weights import load_weights

    torch.set_num_threads(a.threads)
    w = load_weights(a.out, "racnet")
    bundle = load_racnet(w)
    items = make_phantom_items(a.phantoms, 1000, bundle.prep, cache_dir=a.cache)
    state = {k: v for k, v in w.state_dict.items() if not k.startswith(("anchors.", "input_anchors."))}
    state.update(anchor_tensors(bundle.model, items, 3, 0))
    save_racnet_weights(a.out, state, w.card)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("CovidCTDxLib.synthetic.lesions").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall-time cap (phantom generation excluded)")
    ap.add_argument("--phantoms", type=int, default=144)
    ap.add_argument("--val-phantoms", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--slice-size", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--slice-step-mm", type=float, default=12.0)
    ap.add_argument("--cache", type=Path, default=None, help="phantom stack cache (reruns skip generation)")
    ap.add_argument("--held-out", type=int, default=36)
    ap.add_argument("--work", type=Path, default=None, help="checkpoint folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--anchors-only", action="store_true",
                    help="do not train: recompute the anchors of the weights at --out from the training phantoms, re-score")
    a = ap.parse_args()

    from CovidCTDxLib.racnet.inference import save_racnet_weights
    from CovidCTDxLib.training import train_racnet
    from CovidCTDxLib.weights import load_weights

    t0 = time.perf_counter()
    if a.anchors_only:
        refresh_anchors(a)
    else:
        work = a.work or Path(tempfile.mkdtemp(prefix="racnet_demo_"))
        args = train_racnet.build_parser().parse_args([
            "--data", "phantoms", "--phantoms", str(a.phantoms), "--val-phantoms", str(a.val_phantoms),
            "--epochs", str(a.epochs), "--slice-size", str(a.slice_size), "--slice-step-mm", str(a.slice_step_mm),
            "--batch-size", "8", "--lr", "2e-3", "--threads", str(a.threads), *(["--cache", str(a.cache)] if a.cache else []),
            "--time-limit-min", str(a.minutes), "--out", str(work), "--weights-out", str(a.out),
            "--training-data", f"synthetic phantoms (CovidCTDxLib.synthetic.phantom; {a.phantoms} training + {a.val_phantoms} validation; "
                               "severity from lesion volume ratio) — not for diagnosis",
        ])
        train_racnet.run(args)
    total = time.perf_counter() - t0
    metrics = held_out_metrics(a.out, a.held_out)
    w = load_weights(a.out, "racnet")
    w.card.metrics["held_out"] = metrics
    if not a.anchors_only:
        w.card.metrics["wall_seconds_total"] = round(total, 1)
    save_racnet_weights(a.out, w.state_dict, w.card)
    log.info("total wall %.0f s; held-out: %s", total, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
