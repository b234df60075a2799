"""RACNet inference on a 300-slice chest CT: wall time and peak RSS, small CNN vs ResNet-50.

Budget (issue 5): ``run_racnet`` ≤ 3 s on CPU for a 300-slice scan. The ResNet-50 row is
the paper-setting backbone (random weights: speed does not depend on them) on the same
prepared slices, for comparison.

Run: .venv/bin/python benchmarks/bench_racnet.py [--shape 300,512,512] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure, print_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "Resources" / "weights" / "racnet_demo.safetensors"
BUDGET_S = 3.0


def _run_demo(ct, lungs, threads, step_mm):
    import torch

    from CovidCTDxLib.racnet.inference import load_racnet, prepare_scan, run_racnet
    from CovidCTDxLib.weights import load_weights

    torch.set_num_threads(threads)
    t = time.perf_counter()
    w = load_weights(DEMO, "racnet")
    bundle = load_racnet(w)
    if step_mm is not None:  # None: the weights' own preprocessing
        bundle.prep.slice_step_mm = step_mm
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    stack, _ = prepare_scan(ct, lungs, bundle.prep)
    prep_s = time.perf_counter() - t
    t = time.perf_counter()
    s = run_racnet(ct, lungs, w, bundle=bundle)
    return {"load_s": load_s, "prep_s": prep_s, "total_s": time.perf_counter() - t + load_s, "slices": s.slices_used}


def _run_backbone(ct, lungs, threads, backbone):
    import torch

    from CovidCTDxLib.models.racnet import RACNet, RACNetConfig
    from CovidCTDxLib.racnet.anchors import compute_anchors
    from CovidCTDxLib.racnet.inference import SlicePrep, predict_stack, prepare_scan

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model = RACNet(RACNetConfig(backbone=backbone, slice_size=96)).eval()
    anchors = compute_anchors(np.random.default_rng(0).normal(size=(60, 64)), np.repeat(np.arange(6), 10), tuple("abcdef"))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    stack, sel = prepare_scan(ct, lungs, SlicePrep(size=96))
    prep_s = time.perf_counter() - t
    pred = predict_stack(model, stack)
    anchors.explain(pred["latent"])
    return {"load_s": load_s, "prep_s": prep_s, "total_s": time.perf_counter() - t + load_s, "slices": len(sel)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="300,512,512")
    ap.add_argument("--spacing", default="0.7,0.7,1.0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-resnet", action="store_true")
    a = ap.parse_args()
    from CovidCTDxLib.result import LungMasks
    from CovidCTDxLib.synthetic.phantom import make_phantom

    shape = tuple(int(v) for v in a.shape.split(","))
    spacing = tuple(float(v) for v in a.spacing.split(","))
    ph = make_phantom(kind="covid", severity="moderate", shape=shape, spacing=spacing, seed=7)
    lungs = LungMasks(ph.right_lung, ph.left_lung, ph.airways, np.zeros(ph.ct.shape, bool))
    rows = []
    cases = [
        ("small (demo weights, their 12 mm slice step), lung mask", _run_demo, (ph.ct, lungs, a.threads, None)),
        ("small (demo weights), lung mask, every slice", _run_demo, (ph.ct, lungs, a.threads, 0.0)),
        ("small (demo weights), no mask: COVID-CTset, every slice", _run_demo, (ph.ct, None, a.threads, 0.0)),
    ]
    if not a.skip_resnet:
        cases.append(("small CNN (random weights), lung mask, every slice", _run_backbone, (ph.ct, lungs, a.threads, "small")))
        cases.append(("ResNet-50 backbone (paper setting), lung mask, every slice", _run_backbone, (ph.ct, lungs, a.threads, "resnet50")))
    small_total = None
    for name, fn, args in cases:
        if fn is _run_demo and not DEMO.exists():
            continue
        m = measure(fn, *args)
        e = m["extra"]
        small_total = small_total or e["total_s"]
        rows.append([name, e["slices"], e["prep_s"], e["total_s"], m["peak_rss_gb"],
                     f"{e['total_s'] / BUDGET_S:.2f} of {BUDGET_S:.0f} s; {e['total_s'] / small_total:.1f}x small"])
    print_table(f"RACNet inference, CT {shape} (z,y,x) at {spacing} mm, {a.threads} threads",
                ["configuration", "slices", "prepare s", "total s", "peak RSS GB (incl. CT)", "ratio"], rows)


if __name__ == "__main__":
    main()
