"""Whole pipeline on a 512×512×300 chest CT phantom: wall time and peak RSS per stage.

Budget (docs/ARCHITECTURE.md): ≤ 20 s wall, ≤ 4 GB peak RSS on 2 CPU cores.
Run: .venv/bin/python benchmarks/bench_pipeline.py [--shape 300,512,512]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure, print_table  # noqa: E402


def _run(shape, spacing):
    from CovidCTDxLib.pipeline import run_pipeline
    from CovidCTDxLib.synthetic.phantom import make_phantom

    ph = make_phantom(kind="covid", severity="moderate", shape=shape, spacing=spacing, seed=5)
    start = time.perf_counter()
    result = run_pipeline(ph.ct)
    timings = dict(result.timings_s)
    timings["pipeline_wall"] = time.perf_counter() - start
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="300,512,512")
    parser.add_argument("--spacing", default="0.7,0.7,1.0")
    a = parser.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    spacing = tuple(float(v) for v in a.spacing.split(","))
    m = measure(_run, shape, spacing)
    t = m["extra"]
    rows = [[k, v, ""] for k, v in t.items() if k not in ("pipeline_wall",)]
    rows.append(["pipeline wall", t["pipeline_wall"], f"{t['pipeline_wall'] / 20.0:.2f} of 20 s budget"])
    rows.append(["peak RSS (GB, incl. phantom)", m["peak_rss_gb"], f"{m['peak_rss_gb'] / 4.0:.2f} of 4 GB budget"])
    print_table(f"Whole pipeline, {shape} voxels at {spacing} mm", ["stage", "seconds / GB", "ratio"], rows)


if __name__ == "__main__":
    main()
