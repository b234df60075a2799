"""Lesion engine on the real scans: inserted lesions per scan variant, and the real findings.

Run: ``python benchmarks/bench_lesions_real.py [--cases A0001,P001] [--variants native,8mm]
[--cache DIR]``

Why: the density engine must hold on scans it was not tuned on (thick slices, sharp kernels),
and the four shared scans are all we have. So realistic lesions are inserted into their real
lungs (``synthetic.transforms``: textured ground glass with the vessels kept running through
it, dense consolidation blobs, both placed 10-25 mm under the pleura), and every scan is also
re-imaged as 5 mm and 8 mm slabs and with sharp-kernel noise (80 HU of high-pass noise plus
edge enhancement, also on top of the 8 mm slabs: the thick sharp scan of issue 17).

How it counts (table 1):
- The lesions are inserted on the native grid; a variant is then made from the inserted CT
  and, with the same noise seed, from the untouched CT, and the truth mask is resampled with
  the slab profile (``resample_mask_like``). The lung mask is ``segment_lungs`` of the
  native scan, resampled the same way, for both: only the lesion engine is measured.
- ``base`` = the engine on the variant without insertion (pre-existing disease, the
  tumour, and the engine's own false positives on that variant).
- ``found`` = the engine on the inserted variant, minus base detections outside the truth:
  what the engine attributes to the inserted lesions.
- Dice GGO / Dice cons = Dice of the voxels of ``found`` typed ground glass (consolidation)
  by ``split_lesion_types`` against the inserted GGO (consolidation) truth; Dice all =
  ``found`` against both truths; vol err = |found| / |truth| - 1.
- FP % = new detections (``found`` minus truth) as a share of the lung: everything the
  insertion made the engine call outside the inserted lesions, their blurred edges included.
  The base variant's own lesions are listed as base LVR %.

Table 2: the engine on the native real scans: LVR, ground-glass share, left-lung share and
slice AUC against the radiologists' labels (per-slice lesion share of the lung, over slices
containing lung; per side against the side's lobe columns), and the engine's run time.
"""
from __future__ import annotations

import argparse
import logging
import pickle
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import print_table  # noqa: E402

from CovidCTDxLib.evaluation.scan_metrics import dice, slice_auc  # noqa: E402
from CovidCTDxLib.evaluation.shared_scans import SCANS_BY_NAME, read_infected_slices  # noqa: E402
from CovidCTDxLib.lesions.density import detect_lesions, split_lesion_types  # noqa: E402
from CovidCTDxLib.result import LungMasks  # noqa: E402
from CovidCTDxLib.synthetic.transforms import (  # noqa: E402
    insert_consolidation_blobs,
    insert_ground_glass,
    resample_mask_like,
    sharp_kernel_noise,
    thick_slices,
)
from CovidCTDxLib.volume import CTVolume  # noqa: E402

log = logging.getLogger("bench_lesions_real")

VARIANTS = ("native", "5mm", "8mm", "sharp", "8mm sharp")
#: Sharp-kernel noise (HU) added by the sharp variants (B70f-like at 1-2 mm; on 8 mm slabs it
#: is more than a real scanner gives, a stress test).
SHARP_NOISE_HU = 80.0


def load_case(name: str, cache: Optional[Path]) -> Tuple[CTVolume, LungMasks]:
    """The real scan and ``segment_lungs`` of it (pickled in ``cache`` when given)."""
    path = cache / f"{name}.pkl" if cache else None
    if path is not None and path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    from CovidCTDxLib.io.readers import read_ct
    from CovidCTDxLib.lungs.engine import segment_lungs

    ct = read_ct(SCANS_BY_NAME[name].ct_path())
    lungs = segment_lungs(ct)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump((ct, lungs), f)
    return ct, lungs


def _variant(ct: CTVolume, variant: str, seed: int) -> CTVolume:
    out = ct
    for step in variant.split():
        if step.endswith("mm"):
            out = thick_slices(out, float(step[:-2]))
        elif step == "sharp":
            out = sharp_kernel_noise(out, SHARP_NOISE_HU, seed=seed)
    return out


def _masks_like(masks: List[np.ndarray], src: CTVolume, dst: CTVolume) -> List[np.ndarray]:
    if dst.shape == src.shape:
        return masks
    return [resample_mask_like(m, src, dst) for m in masks]


def insertion_rows(name: str, ct: CTVolume, lungs: LungMasks, variants: List[str], seed: int = 17) -> List[list]:
    """One row per variant of ``name`` (see the module docstring for how it counts)."""
    lung = lungs.lungs
    ggo = insert_ground_glass(ct, lung, n_blobs=4, radius_mm=(10.0, 22.0), seed=seed)
    cons = insert_consolidation_blobs(ggo.ct, lung, n_blobs=2, radius_mm=(8.0, 14.0), seed=seed + 1)
    truth_ggo = ggo.mask & ~cons.mask
    rows = []
    for variant in variants:
        if variant == "5mm" and ct.spacing[2] >= 5.0 - 1e-3:
            continue  # already a 5 mm scan
        base_ct = _variant(ct, variant.replace("native", ""), seed)
        ins_ct = _variant(cons.ct, variant.replace("native", ""), seed)
        right, left, t_ggo, t_cons = _masks_like([lungs.right, lungs.left, truth_ggo, cons.mask], ct, base_ct)
        z = np.zeros_like(right)
        vlungs = LungMasks(right, left, z, z)
        vlung = right | left
        t0 = time.perf_counter()
        base = detect_lesions(base_ct, vlungs).lesion
        t_base = time.perf_counter() - t0
        det = detect_lesions(ins_ct, vlungs).lesion
        truth = t_ggo | t_cons
        found = det & (truth | ~base)
        found_ggo, found_cons = split_lesion_types(ins_ct, found)
        n_lung = max(1, int(np.count_nonzero(vlung)))
        rows.append([
            name, variant, f"{base_ct.spacing[2]:.2f}",
            round(truth.sum() * base_ct.voxel_volume_ml, 1),
            dice(found_ggo, t_ggo), dice(found_cons, t_cons), dice(found, truth),
            f"{100 * (found.sum() / max(1, truth.sum()) - 1):+.1f}",
            f"{100 * np.count_nonzero(found & ~truth) / n_lung:.3f}",
            f"{100 * np.count_nonzero(base) / n_lung:.3f}",
            t_base,
        ])
        log.info("%s", rows[-1])
    return rows


def slice_scores(lesion: np.ndarray, lung: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-slice lesion share of the slice's lung, and which slices contain lung."""
    per = lung.sum((1, 2))
    return (lesion & lung).sum((1, 2)) / np.maximum(per, 1), per > 0


def real_row(name: str, ct: CTVolume, lungs: LungMasks) -> list:
    t0 = time.perf_counter()
    les = detect_lesions(ct, lungs)
    seconds = time.perf_counter() - t0
    lung = lungs.lungs
    n = max(1, int(np.count_nonzero(les.lesion)))
    row = [name, 100 * np.count_nonzero(les.lesion) / np.count_nonzero(lung),
           round(float(np.count_nonzero(les.lesion) * ct.voxel_volume_ml), 1),
           np.count_nonzero(les.ggo) / n, np.count_nonzero(les.lesion & lungs.left) / n]
    scan = SCANS_BY_NAME[name]
    labels = None
    if scan.infected_slices and (scan.directory() / scan.infected_slices).exists():
        labels = read_infected_slices(scan.directory() / scan.infected_slices, ct.shape[0])
    if labels is None:
        row += ["–", "–", "–"]
    else:
        score, has = slice_scores(les.lesion, lung)
        row.append(slice_auc(score, labels["infected"], has))
        for side, mask in (("right", lungs.right), ("left", lungs.left)):
            cols = [k for k in labels if k.startswith(side)]
            label = np.any([labels[k] for k in cols], axis=0)
            s, h = slice_scores(les.lesion, mask)
            auc = slice_auc(s, label, h)
            row.append("–" if np.isnan(auc) else auc)
    return row + [seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(SCANS_BY_NAME))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cache", type=Path, default=None, help="pickle each scan and its lungs here")
    parser.add_argument("--no-insertion", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    a = parser.parse_args()
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    ins_rows, real_rows = [], []
    for name in a.cases.split(","):
        if not SCANS_BY_NAME[name].ct_path().exists():
            log.warning("skipping %s: %s not found", name, SCANS_BY_NAME[name].ct_path())
            continue
        ct, lungs = load_case(name, a.cache)
        real_rows.append(real_row(name, ct, lungs))
        if not a.no_insertion:
            ins_rows += insertion_rows(name, ct, lungs, a.variants.split(","))
    if ins_rows:
        print_table("Inserted lesions (4 GGO blobs r 10-22 mm, 2 consolidation blobs r 8-14 mm)",
                    ["case", "variant", "slice mm", "truth mL", "Dice GGO", "Dice cons", "Dice all", "vol err %",
                     "FP % lung", "base LVR %", "engine s"], ins_rows)
    print_table("Real scans, native", ["case", "LVR %", "lesion mL", "GGO share", "left share", "slice AUC",
                                       "AUC right", "AUC left", "engine s"], real_rows)


if __name__ == "__main__":
    main()
