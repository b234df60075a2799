"""DeepSC-COVID inference on a 512×512×300 chest CT: wall time and peak RSS.

Budget (issue 4): ≤ 10 s and ≤ 4 GB peak RSS on this 2-core CPU with the demo config.
Rows:
- demo config, patch-sized windows (``window_scale=1``, the paper's sliding window; the
  pipeline default), with 2 threads and with 1 thread;
- demo config, larger windows (``window_scale=2``);
- the paper's full-size config (width 32, 24×256×256 patches, 48 slices at 256², model
  grid 0.75×0.75×1.5 mm): one window timed, then extrapolated to the windows this scan
  needs (running it whole would take far longer than the budget on CPU).

Each measured row runs in a fresh process (peak RSS is per process); the CT and its lung
masks are generated once and cached in the temp folder.

Run: .venv/bin/python benchmarks/bench_deepsc.py [--shape 300,512,512] [--spacing 0.7,0.7,1.0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure, print_table  # noqa: E402

DEMO_WEIGHTS = REPO / "Resources" / "weights" / "deepsc_demo.safetensors"
BUDGET_S, BUDGET_GB = 10.0, 4.0


def _make_ct(shape, spacing, path: Path) -> None:
    from CovidCTDxLib.synthetic.phantom import make_phantom

    ph = make_phantom(kind="covid", severity="moderate", shape=shape, spacing=spacing, seed=5)
    np.savez(path, hu=ph.ct.array, right=ph.right_lung, left=ph.left_lung, spacing=np.array(spacing))


def _load(path: Path):
    from CovidCTDxLib.result import LungMasks
    from CovidCTDxLib.volume import CTVolume

    d = np.load(path)
    ct = CTVolume(d["hu"], tuple(d["spacing"]))
    z = np.zeros_like(d["right"])
    return ct, LungMasks(d["right"], d["left"], z, z)


def _weights(tmp: Path) -> Path:
    if DEMO_WEIGHTS.exists():
        return DEMO_WEIGHTS
    import torch

    from CovidCTDxLib.models.deepsc import ARCHITECTURE, ARCHITECTURE_VERSION, DeepSCConfig, DeepSCCovid
    from CovidCTDxLib.weights import ModelCard, save_weights

    torch.manual_seed(0)
    cfg = DeepSCConfig.cpu()
    path = tmp / "deepsc_random.safetensors"
    save_weights(path, DeepSCCovid(cfg).state_dict(), ModelCard(ARCHITECTURE, ARCHITECTURE_VERSION, cfg.to_dict(), "random", True))
    return path


def _run(ct_path: Path, weights: Path, window_scale: float, threads: int):
    from CovidCTDxLib.deepsc.inference import run_deepsc

    ct, lungs = _load(ct_path)
    t = time.perf_counter()
    out = run_deepsc(ct, lungs, weights, window_scale=window_scale, threads=threads)
    return {"seconds": time.perf_counter() - t, "windows": out.windows}


def _paper_window(ct_path: Path):
    """Time one paper-size window and count how many this scan needs."""
    import torch

    from CovidCTDxLib.deepsc.inference import Orientation, lung_box, model_grid_shape, plan_axis
    from CovidCTDxLib.models.deepsc import DeepSCConfig, DeepSCCovid

    cfg = DeepSCConfig.paper()
    ct, lungs = _load(ct_path)
    o = Orientation.of(ct)
    crop = lung_box(o.to_canonical(lungs.lungs), o.spacing_zyx(ct))
    grid = model_grid_shape([s.stop - s.start for s in crop], o.spacing_zyx(ct), cfg)
    n = int(np.prod([len(plan_axis(g, p, 0.25, 1.0)[1]) for g, p in zip(grid, cfg.patch_size)]))
    torch.set_num_threads(2)
    model = DeepSCCovid(cfg).eval()
    with torch.inference_mode():
        feats = model.encode_slices(torch.rand(1, 1, cfg.cls_slices, cfg.cls_size, cfg.cls_size))
        patch = torch.rand(1, 1, *cfg.patch_size)
        t = time.perf_counter()
        model(patch, slice_features=feats)
        one = time.perf_counter() - t
    return {"seconds_per_window": one, "windows": n, "grid": grid}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="300,512,512")
    ap.add_argument("--spacing", default="0.7,0.7,1.0")
    ap.add_argument("--skip-paper", action="store_true")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]  # other users of the CPU slow every row; report it
    shape = tuple(int(v) for v in a.shape.split(","))
    spacing = tuple(float(v) for v in a.spacing.split(","))
    tmp = Path(tempfile.gettempdir())
    ct_path = tmp / f"covidctdx_bench_deepsc_{'x'.join(map(str, shape))}_{'x'.join(map(str, spacing))}.npz"
    if not ct_path.exists():
        t = time.perf_counter()
        measure(_make_ct, shape, spacing, ct_path)
        print(f"generated phantom {shape} in {time.perf_counter() - t:.0f} s -> {ct_path}")
    weights = _weights(tmp)

    rows = []
    for label, scale, threads in (
        ("demo config, patch windows, 2 threads (default on idle CPU)", 1.0, 2),
        ("demo config, patch windows, 1 thread", 1.0, 1),
        ("demo config, 2x windows, 2 threads", 2.0, 2),
    ):
        m = measure(_run, ct_path, weights, scale, threads)
        s = m["extra"]["seconds"]
        rows.append([label, m["extra"]["windows"], s, f"{s / BUDGET_S:.2f}", m["peak_rss_gb"], f"{m['peak_rss_gb'] / BUDGET_GB:.2f}"])
    if not a.skip_paper:
        m = measure(_paper_window, ct_path)
        e = m["extra"]
        total = e["seconds_per_window"] * e["windows"]
        rows.append(
            [
                f"paper config, extrapolated from 1 window (grid {e['grid']})",
                e["windows"],
                total,
                f"{total / BUDGET_S:.1f}",
                m["peak_rss_gb"],
                "(1 window)",
            ]
        )
    print_table(
        f"DeepSC-COVID inference, CT {shape} at {spacing} mm, weights {weights.name}, load average at start {load0:.1f}",
        ["configuration", "windows", "wall s", "/ 10 s", "peak RSS GB", "/ 4 GB"],
        rows,
    )


if __name__ == "__main__":
    main()
