"""Lung masks on transformed real scans vs the same scans untouched: per-lung Dice.

Run: ``python benchmarks/bench_lung_transforms.py [--data DIR] [--out table.md]``

For each real scan present (A0001, P001, cap002, normal001 under ``../shared/data``), the
lungs are segmented on the original and on each transformation of
:mod:`CovidCTDxLib.synthetic.transforms`: 8 mm slices, sharp-kernel noise, both, inserted
emphysema, consolidation against the mediastinum (both lungs), a posterior pleural
effusion. The reference is the engine's own mask on the untouched scan (moved onto the
thick grid with ``resample_mask_like``; minus the fluid for the effusion), so a drop in
Dice measures what the transformation did to the engine, not the engine's error on the
original. Target: Dice >= 0.97 per lung. Missed / added mL, the airway volume (a trachea
that vanishes from the airways has usually been swallowed by a lung) and the number of
lung slices the engine lost say how a row failed.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from CovidCTDxLib.errors import InputError, LungsNotFoundError  # noqa: E402
from CovidCTDxLib.evaluation.scan_metrics import dice  # noqa: E402
from CovidCTDxLib.evaluation.shared_scans import SCANS_BY_NAME, shared_data_dir  # noqa: E402
from CovidCTDxLib.io.readers import read_ct  # noqa: E402
from CovidCTDxLib.lungs.engine import segment_lungs  # noqa: E402
from CovidCTDxLib.result import LungMasks  # noqa: E402
from CovidCTDxLib.synthetic import transforms as T  # noqa: E402
from CovidCTDxLib.volume import CTVolume  # noqa: E402

log = logging.getLogger("bench_lung_transforms")

#: The product's target per lung.
TARGET_DICE = 0.97
#: A slice counts as lost when the reference has at least this much lung on it (mm^2) and
#: the engine none: 1 cm^2 is a small apex or costophrenic cross-section, larger than the
#: few-voxel slivers a mask can gain or lose at its tips without anything being wrong.
LOST_SLICE_MM2 = 100.0
#: Transformation settings: 8 mm is a common thick reconstruction (5-10 mm); 80 HU is the
#: middle of the 60-120 HU sharp-kernel range; emphysema over 35 % of the upper 40 % of the
#: lungs is severe centrilobular disease (LAA-950 > 25 %); 200 mL per lung is an airless
#: segment or lingula/middle lobe against the heart; 30 mm is a moderate effusion.
SLICE_MM = 8.0
NOISE_HU = 80.0
EMPHYSEMA_FRACTION = 0.35
EMPHYSEMA_UPPER = 0.4
CONSOLIDATION_ML = 200.0
EFFUSION_MM = 30.0

Truth = Tuple[np.ndarray, np.ndarray]
Case = Tuple[CTVolume, Truth]


def _lost_slices(ct: CTVolume, truth: np.ndarray, seg: np.ndarray) -> int:
    """Axial slices (array axis 0 here: all our scans are axial) where the truth has lung
    and the engine has none: a dropped slice, the typical thick-slice failure."""
    pixel_mm2 = ct.spacing[0] * ct.spacing[1]
    present = truth.sum(axis=(1, 2)) * pixel_mm2 >= LOST_SLICE_MM2
    return int((present & ~seg.any(axis=(1, 2))).sum())


def _cases(ct: CTVolume, ref: LungMasks, seed: int) -> Dict[str, Callable[[], Case]]:
    """Each transformation as a thunk (built only when its row runs, to bound memory)."""
    lungs = ref.right | ref.left
    truth = (ref.right, ref.left)

    def thick() -> Case:
        t = T.thick_slices(ct, SLICE_MM)
        return t, (T.resample_mask_like(ref.right, ct, t), T.resample_mask_like(ref.left, ct, t))

    def thick_sharp() -> Case:
        t, tr = thick()
        return T.sharp_kernel_noise(t, NOISE_HU, seed), tr

    def consolidation() -> Case:
        left = T.insert_consolidation(ct, lungs, side="left", volume_ml=CONSOLIDATION_ML,
                                      seed=seed)
        both = T.insert_consolidation(left.ct, lungs, side="right", volume_ml=CONSOLIDATION_ML,
                                      seed=seed + 1)
        return both.ct, truth

    def effusion() -> Case:
        e = T.pleural_effusion(ct, lungs, EFFUSION_MM, seed)
        return e.ct, (ref.right & e.lung, ref.left & e.lung)

    return {
        f"{SLICE_MM:g} mm slices": thick,
        f"sharp kernel {NOISE_HU:g} HU": lambda: (T.sharp_kernel_noise(ct, NOISE_HU, seed), truth),
        f"{SLICE_MM:g} mm + sharp": thick_sharp,
        "emphysema": lambda: (T.insert_emphysema(ct, lungs, EMPHYSEMA_FRACTION, EMPHYSEMA_UPPER,
                                                 seed=seed).ct, truth),
        f"consolidation vs mediastinum {CONSOLIDATION_ML:g} mL/lung": consolidation,
        f"pleural effusion {EFFUSION_MM:g} mm": effusion,
    }


def _segment(ct: CTVolume) -> Tuple[Optional[LungMasks], float, str]:
    start = time.perf_counter()
    try:
        masks = segment_lungs(ct)
    except LungsNotFoundError as exc:
        return None, time.perf_counter() - start, str(exc).splitlines()[0]
    return masks, time.perf_counter() - start, ""


def _row(scan: str, name: str, ct: CTVolume, truth: Truth, airways_ml: float) -> List[str]:
    seg, seconds, error = _segment(ct)
    ml = ct.voxel_volume_ml
    if seg is None:
        vols = [f"{t.sum() * ml:.0f} / -" for t in truth]
        return [scan, name, "-", "-", *vols, "-", "-", f"{airways_ml:.0f} / -", f"{seconds:.1f}",
                f"FAIL: {error}"]
    cells, ok = [], True
    for t, s in zip(truth, (seg.right, seg.left)):
        d = dice(t, s, empty=0.0)  # an empty lung on both sides is a failure here
        ok &= d >= TARGET_DICE
        cells.append((d, t, s))
    dice_cells = [f"{d:.4f}" for d, _, _ in cells]
    vols = [f"{t.sum() * ml:.0f} / {s.sum() * ml:.0f}" for _, t, s in cells]
    errs = [f"{(t & ~s).sum() * ml:.0f} / {(s & ~t).sum() * ml:.0f}" for _, t, s in cells]
    lost = sum(_lost_slices(ct, t, s) for _, t, s in cells)
    verdict = "pass" if ok else "FAIL"
    if lost:
        verdict += f" ({lost} lung slices lost)"
    airways = f"{airways_ml:.0f} / {seg.airways.sum() * ml:.0f}"
    return [scan, name, *dice_cells, *vols, *errs, airways, f"{seconds:.1f}", verdict]


HEADER = ["scan", "transformation", "Dice R", "Dice L", "R mL ref / seg", "L mL ref / seg",
          "R missed / added mL", "L missed / added mL", "airways mL orig / this", "seg s",
          "Dice >= 0.97"]


def _markdown(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=shared_data_dir(), help="folder of the real scans")
    ap.add_argument("--scans", nargs="*", default=list(SCANS_BY_NAME), help="subset of " + ", ".join(SCANS_BY_NAME))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    rows: List[List[str]] = []
    for scan in args.scans:
        path = SCANS_BY_NAME[scan].ct_path(args.data)
        if not path.exists():
            log.info("%s: absent (%s), skipped", scan, path)
            continue
        try:
            ct = read_ct(path)
        except InputError as exc:
            log.info("%s: unreadable (%s), skipped", scan, exc)
            continue
        ref, seconds, error = _segment(ct)
        if ref is None:
            log.info("%s: no lungs on the original (%s), skipped", scan, error)
            continue
        ml = ct.voxel_volume_ml
        airways_ml = float(ref.airways.sum() * ml)
        rows.append([scan, "original", "1", "1", f"{ref.right.sum() * ml:.0f}",
                     f"{ref.left.sum() * ml:.0f}", "-", "-", f"{airways_ml:.0f}",
                     f"{seconds:.1f}", "reference"])
        for name, build in _cases(ct, ref, args.seed).items():
            log.info("%s: %s", scan, name)
            rows.append(_row(scan, name, *build(), airways_ml))
    table = _markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
