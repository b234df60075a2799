"""Real-scan scoreboard: run ``covidctdx run`` on every real scan and score what it wrote.

Run: ``python benchmarks/bench_real_scans.py [--scans A0001,P001] [--out DIR] [--json FILE]
[--cli-args="--stages lungs,findings"]``

Why a scoreboard: phantoms can be tuned forever; the four real scans in the shared data
folder (``../shared/data`` beside the repo, or ``$COVIDCTDX_SHARED_DATA``) are where a change
shows whether it helps. Each scan is run through the ``covidctdx`` entry point exactly as a
user would, then the written ``segmentation.seg.nrrd`` and ``results.json`` are scored -- the
files, not in-memory objects, so the table measures what Slicer and users actually get.

The CLI is this checkout's pyproject entry point, started with this checkout's root first on
``PYTHONPATH``, so the package being measured is this working tree's, not whatever the venv's
editable install points at (see :func:`cli_command`; the imported file is logged). One markdown table goes to stdout,
progress goes to the log. Scans that are missing are skipped with a note. The numbers
describe four development scans, not a validation set.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from CovidCTDxLib.evaluation.scan_metrics import (  # noqa: E402
    dice,
    read_segmentation_masks,
    share_inside,
    slice_auc,
    worst_slice_loss,
)

log = logging.getLogger("bench_real_scans")

SHARED_DATA = Path(os.environ.get("COVIDCTDX_SHARED_DATA", REPO.parent / "shared" / "data"))
DASH = "–"


@dataclass(frozen=True)
class Scan:
    """One real scan: where its CT is and which labels come with it."""

    name: str
    folder: str
    ct: str  # relative to the folder: a NIfTI file or a DICOM series folder
    reference: Optional[str] = None  # labelmap 1=right, 2=left, 3=airways (same grid)
    tumour_boxes: Optional[str] = None
    infected_slices: Optional[str] = None


SCANS = (
    Scan("A0001", "lung-pet-ct-dx-A0001", "A0001_chest_ct.nii.gz",
         reference="reference_lungs.nii.gz", tumour_boxes="tumour_boxes.csv"),
    Scan("P001", "covid-ct-md-P001", "dicom", infected_slices="infected_slices.csv"),
    Scan("cap002", "covid-ct-md-cap002", "dicom", infected_slices="infected_slices.csv"),
    Scan("normal001", "covid-ct-md-normal001", "dicom"),
)

COLUMNS = (
    ("scan", "scan"),
    ("right_ml", "right lung mL"),
    ("left_ml", "left lung mL"),
    ("dice", "Dice R / L"),
    ("slice_loss", "worst slice loss R / L (%, slice)"),
    ("airway_share", "airway share in lung"),
    ("tumour_share", "tumour share in left lung"),
    ("lesion_ml", "lesion mL"),
    ("lvr", "LVR %"),
    ("auc", "slice AUC"),
    ("auc_lung", "slice AUC R / L"),
    ("classification", "class"),
    ("severity", "severity"),
    ("run_s", "run s"),
)


# --- reading inputs ---------------------------------------------------------------------

def read_ct(path: Path) -> sitk.Image:
    """The CT as SimpleITK's readers return it: the grid the slice labels are indexed on."""
    if path.is_dir():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise FileNotFoundError(f"no DICOM series in {path}")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0]))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def read_infected_csv(path: Path, n_slices: int) -> dict[str, np.ndarray]:
    """Per-slice 0/1 columns of ``infected_slices.csv`` as arrays indexed by slice k."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c != "k"]
    out = {c: np.zeros(n_slices, dtype=bool) for c in cols}
    for r in rows:
        k = int(r["k"])
        if not 0 <= k < n_slices:
            raise ValueError(f"{path}: slice k={k} outside the CT's {n_slices} slices")
        for c in cols:
            out[c][k] = r[c].strip() == "1"
    if len(rows) != n_slices:
        log.warning("%s has %d rows for %d slices", path.name, len(rows), n_slices)
    return out


def tumour_mask(path: Path, shape_zyx: tuple[int, ...]) -> np.ndarray:
    """Union of the 2D tumour boxes (inclusive pixel bounds) as a (z, y, x) mask."""
    box = np.zeros(shape_zyx, dtype=bool)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    for r in rows:
        k, x0, y0, x1, y1 = int(r[1]), int(r[3]), int(r[4]), int(r[5]), int(r[6])
        box[k, y0:y1 + 1, x0:x1 + 1] = True
    return box


# --- running the CLI --------------------------------------------------------------------

_PYPROJECT_ENTRY = re.compile(r'^covidctdx\s*=\s*"([\w.]+):(\w+)"', re.M)


def checkout_entry_point() -> tuple[str, str]:
    """(module, function) of the ``covidctdx`` script as this checkout's pyproject declares."""
    m = _PYPROJECT_ENTRY.search((REPO / "pyproject.toml").read_text())
    if not m:
        raise RuntimeError(f"no covidctdx entry point in {REPO / 'pyproject.toml'}")
    return m.group(1), m.group(2)


def cli_command() -> list[str]:
    """How to start ``covidctdx``: this checkout's entry point (from its pyproject), run by
    this interpreter with this checkout first on ``PYTHONPATH`` (see :func:`_child_env`).

    Why not the console script beside the interpreter: it is generated by whichever checkout
    was last installed into the venv, so from another worktree it would run that checkout's
    code, or a mix of both trees.
    """
    module, func = checkout_entry_point()
    code = (f"import sys; from {module} import {func}; sys.argv[0] = 'covidctdx'; "
            f"sys.exit({func}())")
    return [sys.executable, "-c", code]


def _child_env() -> dict[str, str]:
    """Environment for the CLI: this checkout first on PYTHONPATH, so its code runs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def entry_module_path() -> str:
    """The file the CLI subprocess imports its entry point from: logged as evidence that the
    table measures this checkout."""
    module, _ = checkout_entry_point()
    code = f"import {module} as m; print(m.__file__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_child_env(), cwd=tempfile.gettempdir())
    return res.stdout.strip() or res.stderr.strip().splitlines()[-1]


def run_cli(cli: list[str], ct: Path, out: Path, cli_args: list[str]) -> tuple[float, int]:
    """Run ``covidctdx run`` on one scan; returns (wall seconds, exit code).

    Output goes to ``out/run.log`` rather than the terminal: the table must stay readable.
    """
    cmd = [*cli, "run", str(ct), "-o", str(out), *cli_args]
    out.mkdir(parents=True, exist_ok=True)
    log.info("running covidctdx run %s -o %s %s", ct, out, " ".join(cli_args))
    t0 = time.perf_counter()
    with open(out / "run.log", "w") as logf:
        rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT,
                            env=_child_env()).returncode
    return time.perf_counter() - t0, rc


# --- scoring ----------------------------------------------------------------------------

def _f(x: Optional[float], digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    return f"{x:.{digits}f}"


def _loss_text(loss: float, index: Optional[int]) -> str:
    if index is None:
        return DASH
    return f"{100 * loss:.0f} (k={index})"


def _label_text(block: Any) -> str:
    """'label p' (+ ' OOD' if the block says out_of_distribution) from a results.json block."""
    if not isinstance(block, dict) or "label" not in block:
        return DASH
    text = str(block["label"])
    p = (block.get("probabilities") or {}).get(block["label"])
    if p is not None:
        text += f" {p:.2f}"
    if block.get("out_of_distribution"):
        text += " OOD"
    return text


def score_scan(scan: Scan, folder: Path, out: Path, run_s: float) -> dict[str, Any]:
    """All scoreboard numbers for one scan from the files the CLI wrote."""
    ct = read_ct(folder / scan.ct)
    results = json.loads((out / "results.json").read_text())
    masks = read_segmentation_masks(out / "segmentation.seg.nrrd", ct)
    sx, sy, _ = ct.GetSpacing()
    pixel_mm2 = sx * sy
    empty = np.zeros(tuple(reversed(ct.GetSize())), dtype=bool)
    right = masks.get("right_lung", empty)
    left = masks.get("left_lung", empty)
    lungs = right | left
    row: dict[str, Any] = {"scan": scan.name, "run_s": round(run_s, 1),
                           "seg_ids": sorted(masks)}

    lung_block = results.get("lungs") or {}
    row["right_ml"] = lung_block.get("right_ml")
    row["left_ml"] = lung_block.get("left_ml")
    # the file's volumes, recomputed from the mask: a disagreement means a grid mismatch
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    row["right_ml_mask"] = float(np.count_nonzero(right)) * voxel_ml
    row["left_ml_mask"] = float(np.count_nonzero(left)) * voxel_ml

    r_loss = worst_slice_loss(right, axis=0, pixel_area_mm2=pixel_mm2)
    l_loss = worst_slice_loss(left, axis=0, pixel_area_mm2=pixel_mm2)
    row["slice_loss_right"] = r_loss._asdict()
    row["slice_loss_left"] = l_loss._asdict()

    if scan.reference:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / scan.reference)))
        if ref.shape != lungs.shape:
            raise ValueError(f"{scan.name}: reference {ref.shape} vs CT {lungs.shape}")
        row["dice_right"] = dice(right, ref == 1)
        row["dice_left"] = dice(left, ref == 2)
        row["airway_share"] = share_inside(ref == 3, lungs)  # reference airway inside our lung
        if scan.tumour_boxes:
            tumour = tumour_mask(folder / scan.tumour_boxes, ref.shape) & (ref == 2)
            row["tumour_share"] = share_inside(tumour, left)
    elif "airways" in masks:
        row["airway_share"] = share_inside(masks["airways"], lungs)

    findings = results.get("findings") or {}
    row["lesion_ml"] = findings.get("lesion_volume_ml")
    row["lvr"] = findings.get("lesion_volume_ratio_percent")

    if scan.infected_slices and "lesion" in masks:
        labels = read_infected_csv(folder / scan.infected_slices, lungs.shape[0])
        lesion = masks["lesion"]
        has_lung = np.count_nonzero(lungs, axis=(1, 2)) > 0
        per_slice = np.count_nonzero(lesion, axis=(1, 2))
        row["auc"] = slice_auc(per_slice, labels["infected"], include=has_lung)
        row["n_infected_slices"] = int(np.count_nonzero(labels["infected"] & has_lung))
        # per-lung agreement: lesion voxels in one lung vs that lung's lobes labelled
        for side, mask in (("right", right), ("left", left)):
            lobes = [c for c in labels if c.startswith(side + "_")]
            if lobes:
                y = np.any([labels[c] for c in lobes], axis=0)
                s = np.count_nonzero(lesion & mask, axis=(1, 2))
                row[f"auc_{side}"] = slice_auc(s, y, include=has_lung)

    row["classification"] = _label_text(results.get("classification"))
    row["severity"] = _label_text(results.get("severity"))
    row["timings_s"] = results.get("timings_s")
    row["not_run"] = results.get("not_run")
    return row


def format_row(row: dict[str, Any]) -> list[str]:
    """One table row of strings; missing numbers print as a dash."""
    if "error" in row:
        return [row["scan"], f"**{row['error']}**"] + [DASH] * (len(COLUMNS) - 3) + [
            _f(row.get("run_s"))]
    cells = {
        "scan": row["scan"],
        "right_ml": _f(row.get("right_ml"), 0),
        "left_ml": _f(row.get("left_ml"), 0),
        "dice": (f"{row['dice_right']:.4f} / {row['dice_left']:.4f}"
                 if "dice_right" in row else DASH),
        "slice_loss": " / ".join(_loss_text(**row[f"slice_loss_{s}"]) for s in ("right", "left")),
        "airway_share": _f(row.get("airway_share"), 3),
        "tumour_share": _f(row.get("tumour_share"), 3),
        "lesion_ml": _f(row.get("lesion_ml"), 1),
        "lvr": _f(row.get("lvr"), 2),
        "auc": _f(row.get("auc"), 3),
        "auc_lung": (f"{_f(row.get('auc_right'), 3)} / {_f(row.get('auc_left'), 3)}"
                     if "auc_right" in row or "auc_left" in row else DASH),
        "classification": row.get("classification", DASH),
        "severity": row.get("severity", DASH),
        "run_s": _f(row.get("run_s"), 1),
    }
    return [cells[key] for key, _ in COLUMNS]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The scoreboard as one markdown table."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(format_row(r)) + " |" for r in rows]
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    """Rows as strict JSON: NaN becomes null, numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", default=",".join(s.name for s in SCANS),
                    help="comma-separated subset of " + ",".join(s.name for s in SCANS))
    ap.add_argument("--out", type=Path, help="keep outputs in DIR/<scan> (default: temp dir)")
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    ap.add_argument("--cli-args", default="",
                    help='extra arguments for covidctdx run, e.g. --cli-args="--stages lungs"')
    ap.add_argument("--data", type=Path, default=SHARED_DATA, help="shared data folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    wanted = [s.strip() for s in args.scans.split(",") if s.strip()]
    unknown = set(wanted) - {s.name for s in SCANS}
    if unknown:
        ap.error(f"unknown scans: {', '.join(sorted(unknown))}")
    cli_args = shlex.split(args.cli_args)
    cli = cli_command()
    log.info("CLI: %s (entry point from %s)", shlex.join(cli), entry_module_path())

    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="covidctdx-scoreboard-")
        out_root = Path(tmp.name)
    else:
        out_root = args.out
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        for scan in SCANS:
            if scan.name not in wanted:
                continue
            folder = args.data / scan.folder
            if not (folder / scan.ct).exists():
                notes.append(f"{scan.name}: skipped, {folder / scan.ct} not found")
                log.warning(notes[-1])
                continue
            out = out_root / scan.name
            run_s, rc = run_cli(cli, folder / scan.ct, out, cli_args)
            log.info("%s: exit %d in %.1f s", scan.name, rc, run_s)
            if rc != 0:
                rows.append({"scan": scan.name, "error": f"exit {rc}, see {out}/run.log",
                             "run_s": run_s})
                continue
            try:
                rows.append(score_scan(scan, folder, out, run_s))
            except Exception as exc:  # one broken output must not hide the other scans
                log.exception("%s: scoring failed", scan.name)
                rows.append({"scan": scan.name, "error": f"scoring failed: {exc}",
                             "run_s": run_s})
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(markdown_table(rows))
    for note in notes:
        print(f"\n_{note}_")
    if cli_args:
        print(f"\n_covidctdx run {' '.join(cli_args)}_")
    if args.json:
        args.json.write_text(json.dumps(_jsonable(rows), indent=2))
        log.info("rows written to %s", args.json)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
