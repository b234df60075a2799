"""Lung masking speed/memory vs a U-Net of the lungmask R231 size, on a 512×512×300 CT.

Run: ``python benchmarks/bench_lungs.py [--unet-slices N | --full]``

The CT is a COVID phantom generated at half resolution (fast) and resampled linearly to
300×512×512 at 0.7×0.7×1.0 mm; its ground truth is resampled with nearest neighbours.
Each method runs in its own forked process (peak RSS is per process). The U-Net
(``UNet2D`` with R231's width: depth 5, 64..1024 channels, ~29 M parameters, random
weights, 256×256 input per slice as R231) costs the same per slice whatever its weights,
so by default it runs on ``--unet-slices`` slices and its time is extrapolated to the
whole scan (marked "extrapolated"); ``--full`` runs every slice.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure, print_table  # noqa: E402

from CovidCTDxLib.volume import CTVolume  # noqa: E402

SHAPE = (300, 512, 512)
SPACING = (0.7, 0.7, 1.0)


def _resample(array: np.ndarray, spacing, shape, out_spacing, linear: bool) -> np.ndarray:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    ref = sitk.Image([shape[2], shape[1], shape[0]], img.GetPixelID())
    ref.SetSpacing(out_spacing)
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), interp, float(array.min())))


def make_ct():
    from CovidCTDxLib.phantom import make_phantom

    half_spacing = tuple(2 * s for s in SPACING)
    p = make_phantom(kind="covid", severity="moderate", shape=tuple(n // 2 for n in SHAPE), spacing=half_spacing, seed=0)
    hu = _resample(p.ct.array.astype(np.float32), half_spacing, SHAPE, SPACING, True).astype(np.int16)
    right = _resample(p.right_lung.astype(np.uint8), half_spacing, SHAPE, SPACING, False).astype(bool)
    left = _resample(p.left_lung.astype(np.uint8), half_spacing, SHAPE, SPACING, False).astype(bool)
    return CTVolume(hu, SPACING, p.ct.origin), right, left


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def run_engine(ct, right, left):
    from CovidCTDxLib.lungs import segment_lungs

    m = segment_lungs(ct)
    return {"dice_right": _dice(m.right, right), "dice_left": _dice(m.left, left)}


def run_unet(ct, n_slices: int, wf: int):
    import torch

    from CovidCTDxLib.lung_model import TorchLungModel, UNet2D

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = UNet2D(wf=wf)
    sub = CTVolume(ct.array[:n_slices], ct.spacing, ct.origin, ct.direction)
    TorchLungModel(net).predict(sub)
    return {"params_M": sum(p.numel() for p in net.parameters()) / 1e6, "slices": n_slices}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--unet-slices", type=int, default=24, help="slices the U-Net runs on (time extrapolated)")
    ap.add_argument("--full", action="store_true", help="run the U-Net on all 300 slices")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t = time.perf_counter()
    ct, right, left = make_ct()
    print(f"CT {ct.shape} at {ct.spacing} mm built in {time.perf_counter() - t:.1f} s")
    n = SHAPE[0] if args.full else min(args.unet_slices, SHAPE[0])

    eng = measure(run_engine, ct, right, left)
    rows = [["classical engine", eng["wall_s"], "measured", eng["peak_rss_gb"], f"{eng['extra']['dice_right']:.4f}", f"{eng['extra']['dice_left']:.4f}"]]
    for wf, name in ((6, "U-Net R231 size (wf 6)"), (4, "U-Net light (wf 4)")):
        res = measure(run_unet, ct, n, wf)
        scale = SHAPE[0] / n
        rows.append([
            f"{name}, {res['extra']['params_M']:.1f} M params", res["wall_s"] * scale,
            "measured" if n == SHAPE[0] else f"extrapolated from {n} slices", res["peak_rss_gb"], "n/a (random weights)", "",
        ])
    print_table(
        "Lung masking on 300×512×512 (2 CPU threads)",
        ["method", "wall_s", "how", "peak_rss_gb", "dice_right", "dice_left"],
        rows,
    )
    for r in rows[1:]:
        print(f"speed-up of the engine over {r[0]}: {r[1] / eng['wall_s']:.1f}×")
    print(f"target: engine ≤ 3 s ({'met' if eng['wall_s'] <= 3 else 'NOT met'}), ≥ 5× faster than R231-size U-Net "
          f"({'met' if rows[1][1] >= 5 * eng['wall_s'] else 'NOT met'}), Dice ≥ 0.97 "
          f"({'met' if min(eng['extra']['dice_right'], eng['extra']['dice_left']) >= 0.97 else 'NOT met'})")


if __name__ == "__main__":
    main()
