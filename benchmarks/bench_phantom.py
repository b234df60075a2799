"""Phantom generation speed and memory, up to a 512×512×300 chest CT (budget ≤ 10 s).

Run: ``python benchmarks/bench_phantom.py [--quick]``

Each case runs in its own forked process (peak RSS is per process). Reported: wall time,
CPU time of the process (the machine is shared: wall time grows with other people's load,
CPU time much less), the ratio of wall time to the 10 s budget, peak RSS, the achieved vs
requested lesion volume ratio, and the slowest stages. Also lesion insertion into the real
A0001 CT when ``../shared/data`` is present.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure, print_table  # noqa: E402

from CovidCTDxLib.evaluation.shared_scans import SCANS_BY_NAME  # noqa: E402

BUDGET_S = 10.0
CASES = [
    # (kind, lvr %, shape (z, y, x), spacing (x, y, z))
    ("covid", 10.0, (64, 128, 128), (2.5, 2.5, 5.0)),
    ("covid", 10.0, (96, 192, 192), (2.0, 2.0, 3.5)),
    ("normal", None, (300, 512, 512), (0.7, 0.7, 1.0)),
    ("covid", 15.0, (300, 512, 512), (0.7, 0.7, 1.0)),
    ("cap", 4.0, (300, 512, 512), (0.7, 0.7, 1.0)),
    ("covid", 45.0, (300, 512, 512), (0.7, 0.7, 1.0)),
]


def run_phantom(kind, lvr, shape, spacing):
    from CovidCTDxLib.synthetic.phantom import make_phantom

    cpu0 = time.process_time()
    p = make_phantom(kind, lvr_percent=lvr, shape=shape, spacing=spacing, seed=0)
    cpu = time.process_time() - cpu0
    slowest = sorted(p.timings_s.items(), key=lambda kv: -kv[1])[:3]
    return {"cpu_s": cpu, "lvr": p.lvr_percent, "stages": ", ".join(f"{k} {v:.1f}" for k, v in slowest)}


def run_insert(kind, lvr):
    import SimpleITK as sitk

    from CovidCTDxLib.synthetic.phantom import insert_lesions
    from CovidCTDxLib.volume import CTVolume

    a0001 = SCANS_BY_NAME["A0001"]
    img = sitk.ReadImage(str(a0001.ct_path()))
    ct = CTVolume(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(),
                  np.array(img.GetDirection()).reshape(3, 3))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(a0001.directory() / a0001.reference)))
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    out = insert_lesions(ct, labels == 1, labels == 2, kind, lvr, seed=0)
    return {"cpu_s": time.process_time() - cpu0, "insert_s": time.perf_counter() - t0, "lvr": out.lvr_percent,
            "shape": ct.shape}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the small grids and one 512x512x300 case")
    args = ap.parse_args()
    cases = CASES[:2] + CASES[3:4] if args.quick else CASES
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    for kind, lvr, shape, spacing in cases:
        r = measure(run_phantom, kind, lvr, shape, spacing)
        e = r["extra"]
        size = "x".join(str(n) for n in shape[::-1])
        sp = "x".join(f"{s:g}" for s in spacing)
        lvr_s = "-" if lvr is None else f"{e['lvr']:.2f}/{lvr:g}"
        rows.append([f"{kind} {size} @ {sp} mm", r["wall_s"], e["cpu_s"], r["wall_s"] / BUDGET_S,
                     r["peak_rss_gb"], lvr_s, e["stages"]])
    print_table(
        "make_phantom (one forked process per case)",
        ["case", "wall s", "cpu s", "wall/budget", "peak RSS GB", "LVR got/asked %", "slowest stages (s)"],
        rows,
    )
    if SCANS_BY_NAME["A0001"].ct_path().exists():
        rows = []
        for kind, lvr in (("covid", 10.0), ("cap", 4.0)):
            r = measure(run_insert, kind, lvr)
            e = r["extra"]
            rows.append([f"{kind} into A0001 {'x'.join(map(str, e['shape'][::-1]))}", e["insert_s"], e["cpu_s"],
                         r["peak_rss_gb"], f"{e['lvr']:.2f}/{lvr:g}"])
        print_table("insert_lesions into the real CT (reading the file excluded from the times)",
                    ["case", "wall s", "cpu s", "peak RSS GB", "LVR got/asked %"], rows)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
