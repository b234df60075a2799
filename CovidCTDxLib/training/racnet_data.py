"""RACNet training data: COV19-CT-DB JPG folders, NIfTI/NRRD folders + CSV, and phantoms.

Every source becomes a list of :class:`ScanItem` — one prepared slice stack (T, H, W) in
[0, 1] with one scan-level label — so the trainer never knows where scans came from.

Sources:

* **COV19-CT-DB** (Kollias et al.): ``ROOT/{train,validation}/{covid,non-covid}/ct_scan_N/<k>.jpg``,
  one JPG per slice, variable count; severity CSV rows ``ct_scan_N;1..4`` (1 mild …
  4 critical; an optional header line is skipped). The JPGs are already windowed 8-bit
  images without HU or geometry, so: slices are ordered by the numeric file stem (the
  dataset's own order, assumed inferior → superior), grey levels 0..255 map to [0, 1] and
  every slice is used (no HU-based selection is possible). A model trained on JPGs
  therefore expects JPG-like input; its card records ``input: "jpg"``.
* **NIfTI/NRRD/MHA or DICOM folders + CSV**: columns ``path,label[,severity][,lungs][,domain]``
  (``label`` covid/non-covid or 1/0; ``severity`` mild..critical or 1..4, empty if
  unknown; ``lungs`` an optional lung label map, else lungs are segmented with
  ``lungs.segment_lungs``). Paths are relative to the CSV. Prepared exactly like inference
  (:func:`racnet_inference.prepare_scan`).
* **Phantoms** (``phantom.make_phantom``): COVID phantoms of every severity plus CAP and
  normal phantoms as non-COVID; the severity label is recomputed from the achieved lesion
  volume ratio with ``phantom.severity_from_lvr`` (the product's definition), the lung mask
  is the phantom's ground truth.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import InputError
from ..racnet.inference import SlicePrep, prepare_scan
from ..result import SEVERITY_KEYS, LungMasks

log = logging.getLogger(__name__)

#: Class names used for anchors: non-COVID, each severity, and COVID without a severity label.
ANCHOR_CLASSES = ("non_covid",) + tuple(SEVERITY_KEYS) + ("covid_unknown_severity",)


@dataclass
class ScanItem:
    """One prepared scan with its scan-level labels."""

    stack: np.ndarray  # (T, H, W) float32 in [0, 1], inferior → superior
    covid: int  # 1 COVID-19, 0 non-COVID
    severity: int  # 0..3 (mild..critical), -1 unknown / not applicable
    domain: int = 0  # source dataset id (for the CORAL alignment loss)
    name: str = ""

    @property
    def anchor_class(self) -> int:
        """Index into :data:`ANCHOR_CLASSES`."""
        if not self.covid:
            return 0
        return 1 + self.severity if self.severity >= 0 else len(ANCHOR_CLASSES) - 1


def collate(items: Sequence[ScanItem], flip_lr: Optional[Sequence[bool]] = None) -> Dict[str, torch.Tensor]:
    """Pad stacks to the longest scan: slices (B,T,1,H,W), lengths, covid, severity, domain.

    ``flip_lr`` optionally mirrors scans left–right (training augmentation: COVID-19 is
    bilateral, so the label does not depend on the side).
    """
    t = max(it.stack.shape[0] for it in items)
    h, w = items[0].stack.shape[1:]
    x = torch.zeros(len(items), t, 1, h, w)
    for i, it in enumerate(items):
        s = torch.from_numpy(it.stack)
        if flip_lr is not None and flip_lr[i]:
            s = s.flip(-1)
        x[i, : s.shape[0], 0] = s
    return {
        "slices": x,
        "lengths": torch.tensor([it.stack.shape[0] for it in items], dtype=torch.long),
        "covid": torch.tensor([it.covid for it in items], dtype=torch.long),
        "severity": torch.tensor([it.severity for it in items], dtype=torch.long),
        "domain": torch.tensor([it.domain for it in items], dtype=torch.long),
    }


# ---------------------------------------------------------------------------- labels
def parse_covid_label(value: str) -> int:
    v = str(value).strip().lower().replace("_", "-")
    if v in ("covid", "covid19", "covid-19", "1", "positive"):
        return 1
    if v in ("non-covid", "noncovid", "non-covid-19", "0", "negative", "normal", "cap"):
        return 0
    raise InputError(f"Unknown COVID label {value!r}: use covid / non-covid (or 1 / 0).")


def parse_severity(value: Optional[str]) -> int:
    """'mild'..'critical' or 1..4 → 0..3; empty → -1."""
    if value is None or str(value).strip() == "":
        return -1
    v = str(value).strip().lower()
    if v in SEVERITY_KEYS:
        return SEVERITY_KEYS.index(v)
    try:
        n = int(float(v))
    except ValueError as exc:
        raise InputError(f"Unknown severity {value!r}: use mild/moderate/severe/critical or 1..4.") from exc
    if not 1 <= n <= 4:
        raise InputError(f"Severity {value!r} is outside 1..4 (1 mild … 4 critical).")
    return n - 1


def read_severity_csv(path: Path) -> Dict[str, int]:
    """COV19-CT-DB severity file: ``ct_scan_N;1..4`` per line (``,`` also accepted) → {name: 0..3}."""
    out: Dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        parts = [p.strip() for p in re.split(r"[;,]", line) if p.strip()]
        if len(parts) < 2:
            continue
        try:
            out[parts[0]] = parse_severity(parts[1])
        except InputError:
            continue  # header line such as "Name;Category"
    return out


# ---------------------------------------------------------------------------- COV19-CT-DB
def _numeric_key(p: Path) -> Tuple[int, str]:
    m = re.search(r"\d+", p.stem)
    return (int(m.group()) if m else 0, p.name)


def read_jpg_scan(folder: Path, size: int) -> np.ndarray:
    """All slices of a COV19-CT-DB scan folder as (T, size, size) float32 in [0, 1]."""
    from skimage.io import imread

    files = sorted([p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")], key=_numeric_key)
    if not files:
        raise InputError(f"No slice images (*.jpg) in {folder}.")
    imgs = []
    for f in files:
        a = imread(str(f))
        if a.ndim == 3:
            a = a[..., :3].mean(axis=-1)
        imgs.append(torch.from_numpy(np.asarray(a, dtype=np.float32) / 255.0))
    x = torch.stack(imgs)[:, None] if len({i.shape for i in imgs}) == 1 else None
    if x is None:  # slices of different sizes: resize one by one
        x = torch.cat([torch.nn.functional.interpolate(i[None, None], size=(size, size), mode="bilinear", antialias=True) for i in imgs])
    else:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[:, 0].clamp(0, 1).numpy()


def load_cov19_ct_db(
    root: Path,
    split: str,
    severity_csv: Optional[Path] = None,
    size: int = 128,
    domain: int = 0,
    max_scans: Optional[int] = None,
) -> List[ScanItem]:
    """Scans of one split (``train`` or ``validation``) of a COV19-CT-DB tree."""
    root = Path(root)
    sev = read_severity_csv(severity_csv) if severity_csv else {}
    items: List[ScanItem] = []
    for cls_dir, covid in (("covid", 1), ("non-covid", 0)):
        d = root / split / cls_dir
        if not d.is_dir():
            raise InputError(f"{d} does not exist: expected the COV19-CT-DB layout {{train,validation}}/{{covid,non-covid}}/ct_scan_N/.")
        for scan in sorted((p for p in d.iterdir() if p.is_dir()), key=_numeric_key):
            if max_scans is not None and len(items) >= max_scans:
                break
            items.append(
                ScanItem(
                    read_jpg_scan(scan, size), covid, sev.get(scan.name, -1) if covid else -1, domain, f"{split}/{cls_dir}/{scan.name}"
                )
            )
    log.info("COV19-CT-DB %s: %d scans (%d COVID)", split, len(items), sum(i.covid for i in items))
    return items


# ---------------------------------------------------------------------------- NIfTI + CSV
def _lungs_from_labelmap(path: Path, like) -> LungMasks:
    """Lung masks from a label map on the CT grid (1 right, 2 left, 3 airways)."""
    import SimpleITK as sitk

    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if lab.shape != like.shape:
        raise InputError(f"Lung label map {path.name} has shape {lab.shape}, the CT has {like.shape}.")
    return LungMasks(right=lab == 1, left=lab == 2, airways=lab == 3, body=np.zeros(lab.shape, bool), method="file")


def load_csv_scans(csv_path: Path, prep: SlicePrep, domain: int = 0) -> List[ScanItem]:
    """Scans listed in a CSV (``path,label[,severity][,lungs][,domain]``), prepared like inference."""
    from ..io.readers import read_ct
    from ..lungs.engine import segment_lungs

    csv_path = Path(csv_path)
    items: List[ScanItem] = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            p = csv_path.parent / row["path"]
            ct = read_ct(p)
            lungs = _lungs_from_labelmap(csv_path.parent / row["lungs"], ct) if row.get("lungs") else segment_lungs(ct)
            stack, _ = prepare_scan(ct, lungs, prep)
            covid = parse_covid_label(row["label"])
            items.append(
                ScanItem(stack, covid, parse_severity(row.get("severity")) if covid else -1, int(row.get("domain") or domain), row["path"])
            )
    log.info("%s: %d scans", csv_path.name, len(items))
    return items


# ---------------------------------------------------------------------------- phantoms
#: Phantom mix per block of six: four COVID severities, then CAP and normal (non-COVID).
PHANTOM_CYCLE: Tuple[Tuple[str, Optional[str]], ...] = (
    ("covid", "mild"),
    ("covid", "moderate"),
    ("covid", "severe"),
    ("covid", "critical"),
    ("cap", None),
    ("normal", None),
)
PHANTOM_SHAPE = (48, 112, 112)
PHANTOM_SPACING = (3.2, 3.2, 6.0)
#: Geometries cycled block by block (six phantoms each) when training: the small fast one
#: and the product's default phantom grid (``phantom.DEFAULT_SHAPE``/``DEFAULT_SPACING``), so
#: the weights see more than one resolution and slice thickness.
PHANTOM_GEOMETRIES = ((PHANTOM_SHAPE, PHANTOM_SPACING), ((96, 192, 192), (2.0, 2.0, 3.5)))


def phantom_item(index: int, seed: int, prep: SlicePrep, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING, domain: int = 0) -> ScanItem:
    """The ``index``-th phantom of the training mix, generated with ``seed``."""
    from ..synthetic.phantom import make_phantom, severity_from_lvr

    kind, severity = PHANTOM_CYCLE[index % len(PHANTOM_CYCLE)]
    ph = make_phantom(kind=kind, severity=severity, shape=shape, spacing=spacing, seed=seed)
    lungs = LungMasks(right=ph.right_lung, left=ph.left_lung, airways=ph.airways, body=np.zeros(ph.ct.shape, bool), method="phantom")
    stack, _ = prepare_scan(ph.ct, lungs, prep)
    covid = int(ph.label == "covid19")
    sev = SEVERITY_KEYS.index(severity_from_lvr(ph.lvr_percent)) if covid else -1
    return ScanItem(stack, covid, sev, domain, f"phantom-{kind}-{severity or 'none'}-seed{seed}")


def _phantom_code_digest() -> str:
    """Digest of the phantom generator's source: a changed generator invalidates the cache."""
    from ..synthetic import lesions as phantom_lesions
    from ..synthetic import phantom

    h = hashlib.sha1()
    for mod in (phantom, phantom_lesions):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


def _cache_path(cache_dir: Path, index: int, seed: int, prep: SlicePrep, shape, spacing) -> Path:
    key = json.dumps([index % len(PHANTOM_CYCLE), seed, prep.to_dict(), list(shape), list(spacing), _phantom_code_digest()], sort_keys=True)
    return Path(cache_dir) / f"phantom_{seed}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"


def make_phantom_items(
    n: int,
    seed: int,
    prep: SlicePrep,
    shape=None,
    spacing=None,
    rank: int = 0,
    world: int = 1,
    progress_every: int = 20,
    cache_dir: Optional[Path] = None,
) -> List[ScanItem]:
    """``n`` phantoms with seeds ``seed, seed+1, …`` (this rank's share when distributed).

    Without ``shape``/``spacing`` the geometry cycles through :data:`PHANTOM_GEOMETRIES`
    block by block of six (so every geometry gets every kind and severity).

    ``cache_dir`` keeps each prepared stack as ``.npz`` (keyed by kind, seed, preprocessing
    and geometry), so a resumed or repeated run does not regenerate phantoms.
    """
    items = []
    for i in range(rank, n, world):
        g_shape, g_spacing = (
            (shape, spacing) if shape is not None else PHANTOM_GEOMETRIES[(i // len(PHANTOM_CYCLE)) % len(PHANTOM_GEOMETRIES)]
        )
        g_spacing = g_spacing if g_spacing is not None else PHANTOM_SPACING
        path = _cache_path(cache_dir, i, seed + i, prep, g_shape, g_spacing) if cache_dir else None
        if path is not None and path.exists():
            with np.load(path) as z:
                items.append(ScanItem(z["stack"], int(z["covid"]), int(z["severity"]), 0, str(z["name"])))
        else:
            it = phantom_item(i, seed + i, prep, g_shape, g_spacing)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, stack=it.stack, covid=it.covid, severity=it.severity, name=it.name)
            items.append(it)
        if progress_every and len(items) % progress_every == 0:
            log.info("phantoms: %d/%d", len(items) * world, n)
    return items


def iterate_batches(items: Sequence[ScanItem], batch_size: int, order: Iterable[int]) -> Iterable[List[ScanItem]]:
    """Group ``items`` in ``order`` into lists of ``batch_size`` (last one may be shorter)."""
    batch: List[ScanItem] = []
    for i in order:
        batch.append(items[i])
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
