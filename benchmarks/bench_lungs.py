"""Lung masking speed/memory vs a U-Net of the lungmask R231 size, on a 512×512×300 CT.

Run: ``python benchmarks/bench_lungs.py [--unet-slices N | --full]``

The CT is a COVID phantom generated directly at 300×512×512, 0.7×0.7×1.0 mm (~11 s), with
its own ground truth lungs.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure, print_table  # noqa: E402

from CovidCTDxLib.evaluation.scan_metrics import dice  # noqa: E402
from CovidCTDxLib.lungs.engine import segment_lungs  # noqa: E402  (imported once: time the engine, not imports)
from CovidCTDxLib.volume import CTVolume  # noqa: E402

SHAPE = (300, 512, 512)
SPACING = (0.7, 0.7, 1.0)


def make_ct():
    from CovidCTDxLib.synthetic.phantom import make_phantom

    p = make_phantom(kind="covid", severity="moderate", shape=SHAPE, spacing=SPACING, seed=0)
    return p.ct, p.right_lung, p.left_lung


def run_engine(ct, right, left):
    m = segment_lungs(ct)
    return {"dice_right": dice(m.right, right, empty=0.0), "dice_left": dice(m.left, left, empty=0.0)}


def run_unet(ct, n_slices: int, wf: int):
    import torch

    from CovidCTDxLib.lungs.model_hook import TorchLungModel
    from CovidCTDxLib.models.lung_unet import UNet2D

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
    ap.add_argument("--repeat", type=int, default=3, help="engine runs (the machine is shared: report best and median)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t = time.perf_counter()
    ct, right, left = make_ct()
    print(f"CT {ct.shape} at {ct.spacing} mm built in {time.perf_counter() - t:.1f} s")
    n = SHAPE[0] if args.full else min(args.unet_slices, SHAPE[0])

    runs = sorted((measure(run_engine, ct, right, left) for _ in range(max(1, args.repeat))), key=lambda r: r["wall_s"])
    eng = runs[0]
    median = runs[len(runs) // 2]["wall_s"]
    rows = [[
        "classical engine", eng["wall_s"], f"best of {len(runs)} (median {median:.2f} s)", eng["peak_rss_gb"],
        f"{eng['extra']['dice_right']:.4f}", f"{eng['extra']['dice_left']:.4f}",
    ]]
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
