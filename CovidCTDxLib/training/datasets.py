"""Training data for DeepSC-COVID: finding cases on disk, preparing them like inference does,
and sampling lesion-biased patches.

Supported sources (each yields :class:`CaseRecord` s):

- DeepSC-COVID layout: ``ROOT/{covid,cap}/data-nii/<name>.nii.gz`` with lesion labels in
  ``ROOT/{covid,cap}/segment_label/<name>.nii[.gz]``; healthy scans in
  ``ROOT/{normal,healthy,non-pneumonia,non_pneumonia}/data-nii`` (no labels needed);
- MosMedData layout: ``ROOT/studies/CT-{0..4}/study_NNNN.nii.gz`` (CT-0 = normal, CT-1..4 =
  COVID-19) with optional ``ROOT/masks/study_NNNN_mask.nii.gz``;
- a CSV ``path,label[,lesion][,lungs]`` (paths relative to the CSV; NIfTI/NRRD/MHA files
  or DICOM folders; ``label`` one of result.CLASS_KEYS or covid/cap/normal);
- synthetic phantoms (``phantom.make_phantom``) and real CTs with inserted lesions.

Why prepare once: each case is windowed, lung-masked, cropped and resampled to the model
grid with :func:`inference.prepare_scan` (exactly what inference does) and kept in memory;
patches are then cheap crops. Sampling follows the paper: 60 % of patches are centred on a
lesion voxel and must hold ≥ 1 % lesion voxels, the rest are drawn uniformly.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..deepsc.inference import PreparedScan, prepare_scan, slice_stack
from ..errors import InputError
from ..models.deepsc import DeepSCConfig
from ..result import CLASS_KEYS
from ..volume import CTVolume

log = logging.getLogger(__name__)

LESION_PATCH_FRACTION = 0.6
MIN_LESION_FRACTION = 0.01

_LABEL_ALIASES = {
    "covid": "covid19",
    "covid19": "covid19",
    "covid-19": "covid19",
    "cap": "cap",
    "pneumonia": "cap",
    "normal": "non_pneumonia",
    "healthy": "non_pneumonia",
    "non-pneumonia": "non_pneumonia",
    "non_pneumonia": "non_pneumonia",
}


def label_index(label: str) -> int:
    key = _LABEL_ALIASES.get(str(label).strip().lower())
    if key is None:
        raise InputError(f"Unknown class label {label!r}; use one of {', '.join(CLASS_KEYS)} (or covid/cap/normal).")
    return CLASS_KEYS.index(key)


# ============================================================================ discovery
@dataclass
class CaseRecord:
    """One training scan on disk."""

    name: str
    label: int  # index into CLASS_KEYS
    image: Path
    lesion: Optional[Path] = None
    lungs: Optional[Path] = None


def _nii_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.glob("*") if p.name.endswith((".nii", ".nii.gz")))


def _stem(p: Path) -> str:
    return p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem


def deepsc_layout(root: Path) -> List[CaseRecord]:
    """Cases of the DeepSC-COVID database layout (see module docstring)."""
    root = Path(root)
    records: List[CaseRecord] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        key = _LABEL_ALIASES.get(folder.name.lower())
        if key is None or not (folder / "data-nii").is_dir():
            continue
        labels = {_stem(p): p for p in _nii_files(folder / "segment_label")} if (folder / "segment_label").is_dir() else {}
        for img in _nii_files(folder / "data-nii"):
            lesion = labels.get(_stem(img))
            if lesion is None and key != "non_pneumonia":
                log.warning("no lesion label for %s; it is used for classification only", img)
            records.append(CaseRecord(_stem(img), CLASS_KEYS.index(key), img, lesion))
    if not records:
        raise InputError(f"No DeepSC-COVID cases under {root}: expected {{covid,cap}}/data-nii/*.nii.gz.")
    return records


def mosmed_layout(root: Path) -> List[CaseRecord]:
    """Cases of MosMedData (COVID19_1110): CT-0 normal, CT-1..CT-4 COVID-19."""
    root = Path(root)
    masks = {}
    if (root / "masks").is_dir():
        for m in _nii_files(root / "masks"):
            masks[_stem(m).replace("_mask", "")] = m
    records = []
    for grade in sorted((root / "studies").glob("CT-*")):
        label = "non_pneumonia" if grade.name == "CT-0" else "covid19"
        for img in _nii_files(grade):
            records.append(CaseRecord(_stem(img), CLASS_KEYS.index(label), img, masks.get(_stem(img))))
    if not records:
        raise InputError(f"No MosMedData studies under {root}: expected studies/CT-0..CT-4/*.nii.gz.")
    return records


def csv_layout(csv_path: Path) -> List[CaseRecord]:
    """Cases listed in a CSV with columns ``path,label[,lesion][,lungs]``."""
    csv_path = Path(csv_path)
    base = csv_path.parent
    records = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if "path" not in row or "label" not in row:
                raise InputError(f"{csv_path.name} needs columns 'path' and 'label'.")
            img = base / row["path"]
            lesion, lungs = ((base / row[k]) if row.get(k) else None for k in ("lesion", "lungs"))
            records.append(CaseRecord(_stem(img), label_index(row["label"]), img, lesion, lungs))
    return records


def discover(root: Path, layout: str = "auto") -> List[CaseRecord]:
    """Pick the layout by name or by looking at ``root`` (a folder or a CSV file)."""
    root = Path(root)
    if layout == "csv" or (layout == "auto" and root.suffix.lower() == ".csv"):
        return csv_layout(root)
    if layout == "mosmed" or (layout == "auto" and (root / "studies").is_dir()):
        return mosmed_layout(root)
    if layout in ("deepsc", "auto"):
        return deepsc_layout(root)
    raise InputError(f"Unknown dataset layout {layout!r} (auto, deepsc, mosmed, csv).")


# ============================================================================ preparation
@dataclass
class PreparedCase:
    """A case on the model grid, ready for patch sampling and validation."""

    name: str
    label: int
    scan: PreparedScan
    lesion: torch.Tensor  # bool (Z, Y, X) on the padded model grid
    slices: torch.Tensor  # (1, S, c, c)
    has_lesion_labels: bool = True

    @property
    def lesion_voxels(self) -> torch.Tensor:
        """(n, 3) lesion voxel indices, cached for lesion-centred sampling."""
        if not hasattr(self, "_lesion_idx"):
            self._lesion_idx = torch.nonzero(self.lesion)
        return self._lesion_idx


def prepare_case(
    name: str,
    label: int,
    ct: CTVolume,
    lung: np.ndarray,
    lesion: Optional[np.ndarray],
    config: DeepSCConfig,
) -> PreparedCase:
    """Canonicalise orientation and prepare CT + masks exactly like inference."""
    orient = ct.canonical_frame()
    hu = orient.to_canonical(ct.array)
    lung_c = orient.to_canonical(np.asarray(lung, bool))
    extras = {"lesion": orient.to_canonical(np.asarray(lesion, bool))} if lesion is not None else {}
    with torch.no_grad():
        scan = prepare_scan(hu, lung_c, orient.spacing_zyx(ct), config, extras)
        slices = slice_stack(scan.volume, config)
    les = scan.extras.pop("lesion", None)
    if les is None:
        les = torch.zeros_like(scan.lung)
    else:
        les = les & scan.lung
    return PreparedCase(name, int(label), scan, les, slices, lesion is not None or label == CLASS_KEYS.index("non_pneumonia"))


def load_record(record: CaseRecord, config: DeepSCConfig, lung_fn: Optional[Callable[[CTVolume], np.ndarray]] = None) -> PreparedCase:
    """Read a :class:`CaseRecord` (CT, lesion label, lungs) and prepare it.

    Lungs come from ``record.lungs`` when given, else from ``lung_fn`` (default: the
    project's classical lung masking). Lesion labels are read on the CT grid; any
    non-zero value is lesion.
    """
    import SimpleITK as sitk

    from ..io.readers import read_ct

    ct = read_ct(record.image)

    def _mask(path: Path) -> np.ndarray:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
        if arr.shape != ct.shape:
            raise InputError(f"{path.name} has shape {arr.shape} but its CT {record.image.name} has {ct.shape}.")
        return arr

    if record.lungs is not None:
        lung = _mask(record.lungs)
    else:
        if lung_fn is None:
            from ..lungs.engine import segment_lungs

            lung_fn = lambda c: segment_lungs(c).lungs  # noqa: E731
        lung = lung_fn(ct)
    lesion = _mask(record.lesion) if record.lesion is not None else None
    if lesion is not None:
        lung = lung | lesion  # dense consolidation is lung; never crop it away
    return prepare_case(record.name, record.label, ct, lung, lesion, config)


def phantom_case(
    kind: str, severity: Optional[str], seed: int, config: DeepSCConfig, shape=(64, 160, 160), spacing=(2.2, 2.2, 4.0)
) -> PreparedCase:
    """A synthetic phantom as a prepared case (uses the phantom's true lungs)."""
    from ..synthetic.phantom import KIND_LABELS, make_phantom

    p = make_phantom(kind, severity, shape=shape, spacing=spacing, seed=seed)
    label = CLASS_KEYS.index(KIND_LABELS[kind])
    return prepare_case(f"phantom-{kind}-{severity}-{seed}", label, p.ct, p.right_lung | p.left_lung, p.lesion, config)


# ============================================================================ patches
class PatchDataset(Dataset):
    """Random training patches from prepared cases, lesion-biased as in the paper.

    Item ``i`` is drawn from case ``i % len(cases)`` with an RNG seeded by (seed, epoch, i),
    so a run is reproducible and DDP ranks (which see different ``i``) draw different
    patches. Call :meth:`set_epoch` each epoch.
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        config: DeepSCConfig,
        patches_per_case: int = 4,
        lesion_fraction: float = LESION_PATCH_FRACTION,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        if not cases:
            raise InputError("No training cases.")
        self.cases = list(cases)
        self.config = config
        self.patches_per_case = patches_per_case
        self.lesion_fraction = lesion_fraction
        self.seed = seed
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases) * self.patches_per_case

    def _start(self, case: PreparedCase, rng: np.random.Generator) -> Tuple[int, int, int]:
        shape = case.scan.volume.shape
        p = self.config.patch_size
        les = case.lesion_voxels
        if len(les) and rng.random() < self.lesion_fraction:
            need = MIN_LESION_FRACTION * p[0] * p[1] * p[2]
            for _ in range(10):
                centre = les[rng.integers(len(les))].tolist()
                start = tuple(int(np.clip(c - n // 2 + rng.integers(-n // 4, n // 4 + 1), 0, s - n)) for c, n, s in zip(centre, p, shape))
                sl = tuple(slice(a, a + n) for a, n in zip(start, p))
                if float(case.lesion[sl].sum()) >= need:
                    return start  # type: ignore[return-value]
            return start  # type: ignore[return-value]
        return tuple(int(rng.integers(0, s - n + 1)) for n, s in zip(p, shape))  # type: ignore[return-value]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        case = self.cases[index % len(self.cases)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        start = self._start(case, rng)
        sample = crop_sample(case, start, self.config.patch_size)
        if self.augment:
            offsets = torch.from_numpy(rng.uniform(-0.5, 0.5, self.config.cls_slices))
            sample["slices"] = slice_stack(case.scan.volume, self.config, offsets)
            if rng.random() < 0.5:
                sample = flip_x(sample)
        return sample


def flip_x(sample: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Mirror a sample left-right (patch, masks, slice stack and box stay consistent).

    Why: lesion patterns are not side-specific, and mirrored chests double the variety
    the classifier sees from a few training scans.
    """
    out = dict(sample)
    for k in ("patch", "lesion", "lung", "slices"):
        out[k] = torch.flip(sample[k], dims=(-1,))
    b = sample["box"].clone()
    b[4], b[5] = 1 - sample["box"][5], 1 - sample["box"][4]
    out["box"] = b
    return out


def crop_sample(case: PreparedCase, start: Sequence[int], patch_size: Sequence[int]) -> Dict[str, torch.Tensor]:
    """The training sample for the patch at ``start`` of ``case``."""
    sl = tuple(slice(a, a + n) for a, n in zip(start, patch_size))
    shape = case.scan.volume.shape
    box = torch.tensor([v for a, n, s in zip(start, patch_size, shape) for v in (a / s, (a + n) / s)], dtype=torch.float32)
    return {
        "patch": case.scan.volume[sl][None].clone(),
        "slices": case.slices,
        "box": box,
        "lesion": case.lesion[sl].float(),
        "lung": case.scan.lung[sl].float(),
        "label": torch.tensor(case.label, dtype=torch.long),
        "seg_valid": torch.tensor(float(case.has_lesion_labels)),
    }
