"""Lesion findings a radiologist reads off the result table, from any lesion mask.

Definitions follow DeepSC-COVID's four findings (Wang et al., IEEE TMI 2021, Sec. II-B):
1. lesion count: 3D connected components of the lesion mask (26-connectivity), counting
   only components of at least ``MIN_COUNTED_LESION_ML`` so a stray voxel left by an edit
   is not a lesion;
2. lesion volume ratio (LVR): lesion volume / lung volume, in percent;
3. lesion HU: histogram and percentiles of the lesion voxels' HU (COVID-19 lesions mostly
   -960..-600 HU, CAP lesions also -70..140 HU);
4. peripheral lesion ratio (PLR): share of the lesion volume inside the peripheral shell
   (lung minus its per-slice erosion by the peripheral thickness, see :mod:`zones`).

Also reported: spread (zones and lungs involved, bilateral), the Lung CT Analyzer style
split of the lungs by HU class, and a CT severity score.

HU classes (Slicer/SlicerLungCTAnalyzer, ``LungCTAnalyzer.py`` ``defaultThresholds``):
emphysema -1050..-950, functional (inflated/ventilated) -950..-750, infiltrated (ground
glass) -750..-400, collapsed (consolidation) -400..0 HU; above 0 HU is vessel.

CT severity score: each of the six zones gets 0-5 by the percentage of it involved
(0: none, 1: <5 %, 2: 5-25 %, 3: 26-49 %, 4: 50-75 %, 5: >75 %), as in the lobar score of
Pan et al. (Radiology 2020; 295:715) and Chung et al. (Radiology 2020; 295:202, 0-5 per
lobe with 0 / <5 / 5-25 / 26-50 / 51-75 / >75 %). We have zones, not lobes, so the score
is summed over six zones (upper/middle/lower thirds per lung, total 0-30) instead of
five lobes (0-25); right zones ~ RUL/RML/RLL, left upper+middle ~ LUL, left lower ~ LLL.

Speed: everything is counted on the lung bounding box with integer histograms
(``np.bincount``) over lesion voxels only, so a recompute after an edit takes well under a
second on a 512x512x300 scan when the zones are given.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError, LungsNotFoundError
from ..grid import bbox, components_26
from ..result import LesionMasks, LungMasks, LungZones
from ..volume import CTVolume

#: Components smaller than this (mL) are not counted as lesions (~ a 4.6 mm sphere).
MIN_COUNTED_LESION_ML = 0.05
#: Lung CT Analyzer HU classes (lower bound inclusive, upper bound exclusive).
HU_CLASSES: Tuple[Tuple[str, float, float], ...] = (
    ("emphysema", -1050.0, -950.0),
    ("functional", -950.0, -750.0),
    ("ground_glass", -750.0, -400.0),
    ("consolidation", -400.0, 0.0),
)
#: Lesion HU histogram bins (HU): 50 HU wide from -1000 to +200, plus under/overflow.
HU_BIN_EDGES = tuple(range(-1000, 201, 50))
HU_PERCENTILES = (5, 25, 50, 75, 95)
SIDE_ZONES = {"right": (1, 2, 3), "left": (4, 5, 6)}


@dataclass
class RegionFindings:
    """Counts for one region (whole lungs, one lung or one zone)."""

    lung_ml: float
    lesion_ml: float
    lesion_count: int
    peripheral_lesion_ml: float

    @property
    def lvr_percent(self) -> float:
        return 100.0 * self.lesion_ml / self.lung_ml if self.lung_ml > 0 else 0.0

    @property
    def plr_percent(self) -> Optional[float]:
        return 100.0 * self.peripheral_lesion_ml / self.lesion_ml if self.lesion_ml > 0 else None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "lung_ml": round(self.lung_ml, 2),
            "lesion_ml": round(self.lesion_ml, 3),
            "lesion_count": self.lesion_count,
            "lesion_volume_ratio_percent": round(self.lvr_percent, 3),
            "peripheral_lesion_ratio_percent": None if self.plr_percent is None else round(self.plr_percent, 2),
        }


@dataclass
class Findings:
    """All findings of one scan. ``to_dict`` feeds results.json, ``rows`` findings.csv."""

    whole: RegionFindings
    sides: Dict[str, RegionFindings]
    zones: Dict[str, RegionFindings]
    zone_scores: Dict[str, int]
    hu_histogram: Dict[str, Any]
    hu_stats: Dict[str, Optional[float]]
    hu_classes_ml: Dict[str, float]
    lesion_types_ml: Dict[str, Optional[float]]
    peripheral_thickness_mm: float
    lesions: List[Dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------ headline numbers
    @property
    def lesion_count(self) -> int:
        return self.whole.lesion_count

    @property
    def lesion_volume_ml(self) -> float:
        return self.whole.lesion_ml

    @property
    def lvr_percent(self) -> float:
        return self.whole.lvr_percent

    @property
    def plr_percent(self) -> Optional[float]:
        return self.whole.plr_percent

    @property
    def ct_severity_score(self) -> int:
        return int(sum(self.zone_scores.values()))

    @property
    def zones_involved(self) -> int:
        return sum(1 for z in self.zones.values() if z.lesion_ml > 0)

    @property
    def lungs_involved(self) -> int:
        return sum(1 for s in self.sides.values() if s.lesion_ml > 0)

    @property
    def bilateral(self) -> bool:
        return self.lungs_involved == 2

    def to_dict(self) -> Dict[str, Any]:
        return {
            "lesion_count": self.lesion_count,
            "lesion_volume_ml": round(self.lesion_volume_ml, 3),
            "lesion_volume_ratio_percent": round(self.lvr_percent, 3),
            "peripheral_lesion_ratio_percent": None if self.plr_percent is None else round(self.plr_percent, 2),
            "ct_severity_score": self.ct_severity_score,
            "ct_severity_score_max": 5 * len(self.zones),
            "lung_volume_ml": round(self.whole.lung_ml, 2),
            "peripheral_thickness_mm": self.peripheral_thickness_mm,
            "min_counted_lesion_ml": MIN_COUNTED_LESION_ML,
            "spread": {
                "zones_involved": self.zones_involved,
                "lungs_involved": self.lungs_involved,
                "bilateral": self.bilateral,
            },
            "lesion_hu": {**self.hu_stats, "histogram": self.hu_histogram},
            "lesion_types_ml": dict(self.lesion_types_ml),
            "hu_classes_ml": {k: round(v, 2) for k, v in self.hu_classes_ml.items()},
            "hu_classes_percent": {
                k: round(100.0 * v / self.whole.lung_ml, 3) if self.whole.lung_ml > 0 else 0.0 for k, v in self.hu_classes_ml.items()
            },
            "per_lung": {k: v.to_dict() for k, v in self.sides.items()},
            "per_zone": {k: {**v.to_dict(), "severity_points": self.zone_scores[k]} for k, v in self.zones.items()},
            "lesions": list(self.lesions),
            "definitions": {name: {"unit": unit, "definition": d} for name, _, unit, d in self.rows()},
        }

    def rows(self) -> List[Tuple[str, Any, str, str]]:
        """(name, value, unit, one-line definition) for findings.csv and Slicer tables."""
        plr = self.plr_percent
        t = self.peripheral_thickness_mm
        out: List[Tuple[str, Any, str, str]] = [
            (
                "lesion_count",
                self.lesion_count,
                "count",
                f"3D connected lesion components (26-connected) of at least {MIN_COUNTED_LESION_ML} mL",
            ),
            ("lesion_volume_ml", round(self.lesion_volume_ml, 3), "mL", "Total lesion volume inside the lungs"),
            ("lesion_volume_ratio_percent", round(self.lvr_percent, 3), "%", "Lesion volume / lung volume (DeepSC-COVID LVR)"),
            (
                "peripheral_lesion_ratio_percent",
                None if plr is None else round(plr, 2),
                "%",
                f"Share of lesion volume within {t:g} mm of the pleura, per slice (DeepSC-COVID PLR); empty without lesions",
            ),
            (
                "ct_severity_score",
                self.ct_severity_score,
                "points",
                f"Sum over {len(self.zones)} zones of 0-5 points by % involved "
                "(0, <5, 5-25, 26-50, 51-75, >75 %; Pan/Chung 2020 scale on zones)",
            ),
            ("lung_volume_ml", round(self.whole.lung_ml, 2), "mL", "Right + left lung volume"),
            ("zones_involved", self.zones_involved, "count", "Zones (upper/middle/lower per lung) containing lesion"),
            ("lungs_involved", self.lungs_involved, "count", "Lungs containing lesion"),
            ("bilateral", int(self.bilateral), "yes=1/no=0", "Lesions in both lungs"),
        ]
        for key in ("mean", "std") + tuple(f"p{p}" for p in HU_PERCENTILES):
            v = self.hu_stats.get(key)
            label = "mean" if key == "mean" else ("standard deviation" if key == "std" else f"{key[1:]}th percentile")
            out.append((f"lesion_hu_{key}", None if v is None else round(v, 1), "HU", f"Lesion voxel CT value, {label}"))
        for name, ml in self.lesion_types_ml.items():
            out.append(
                (
                    f"{name}_volume_ml",
                    None if ml is None else round(ml, 3),
                    "mL",
                    f"Lesion volume typed as {name.replace('_', ' ')} (smoothed HU {'< -300' if name == 'ggo' else '>= -300'})",
                )
            )
        for (name, lo, hi), ml in zip(HU_CLASSES, self.hu_classes_ml.values()):
            pct = 100.0 * ml / self.whole.lung_ml if self.whole.lung_ml > 0 else 0.0
            out.append((f"lung_{name}_ml", round(ml, 2), "mL", f"Lung volume with {lo:g} <= HU < {hi:g} (Lung CT Analyzer class)"))
            out.append((f"lung_{name}_percent", round(pct, 3), "%", f"Lung share with {lo:g} <= HU < {hi:g} (Lung CT Analyzer class)"))
        for side, r in self.sides.items():
            out += _region_rows(side, r, t)
        for zone, r in self.zones.items():
            out += _region_rows(zone, r, t)
            out.append(
                (
                    f"{zone}_severity_points",
                    self.zone_scores[zone],
                    "points",
                    f"0-5 points by % of the {zone.replace('_', ' ')} zone involved",
                )
            )
        return out


def _region_rows(name: str, r: RegionFindings, t: float) -> List[Tuple[str, Any, str, str]]:
    where = name.replace("_", " ")
    plr = r.plr_percent
    return [
        (
            f"{name}_lesion_count",
            r.lesion_count,
            "count",
            f"Lesion components (>= {MIN_COUNTED_LESION_ML} mL) whose largest part lies in the {where} "
            f"{'lung' if name in SIDE_ZONES else 'zone'}",
        ),
        (f"{name}_lesion_volume_ml", round(r.lesion_ml, 3), "mL", f"Lesion volume in the {where} region"),
        (f"{name}_lesion_volume_ratio_percent", round(r.lvr_percent, 3), "%", f"Lesion volume / volume of the {where} region"),
        (
            f"{name}_peripheral_lesion_ratio_percent",
            None if plr is None else round(plr, 2),
            "%",
            f"Share of the {where} lesion volume within {t:g} mm of the pleura",
        ),
    ]


# ------------------------------------------------------------------ computation
def compute_findings(
    ct: CTVolume,
    lungs: LungMasks,
    lesions: LesionMasks,
    zones: Optional[LungZones] = None,
) -> Findings:
    """Compute every finding from (CT, lungs, lesion mask[, zones]).

    The lesion mask is clipped to the lungs (a lesion painted outside the lungs in an edit
    does not count). Zones are computed when not given (that costs a distance transform;
    pass them for the sub-second recompute).

    Raises:
        LungsNotFoundError: the lung masks are empty.
        InputError: a mask does not match the CT grid.
    """
    for name, m in (("right lung", lungs.right), ("left lung", lungs.left), ("lesion", lesions.lesion)):
        if m.shape != ct.shape:
            raise InputError(f"The {name} mask has shape {m.shape} but the CT has {ct.shape}; they must share one grid.")
    box = _union_bbox(lungs.right, lungs.left)
    if box is None:
        raise LungsNotFoundError("The lung masks are empty: findings need the right and left lung segments.")
    n_zones = len(LungZones.ZONE_NAMES)
    if zones is None:
        zones = _zones(ct, lungs)
    lung_stats = _lung_stats(ct, zones, box, n_zones)
    n_lung = np.count_nonzero(lungs.right[box]) + np.count_nonzero(lungs.left[box])
    if n_lung != int(lung_stats[0].sum()):
        # Zones from another lung mask (e.g. the lungs were edited): trust the lungs.
        zones = _zones(ct, lungs, zones.peripheral_thickness_mm)
        lung_stats = _lung_stats(ct, zones, box, n_zones)
    lung_voxels, hu_class_voxels = lung_stats
    labels = zones.labels[box]  # 0 outside lungs, 1..6 zones
    ml = ct.voxel_volume_ml

    lesion = np.asarray(lesions.lesion[box], bool) & (labels > 0)
    les_labels = labels[lesion]
    lung_per_zone = lung_voxels * ml
    lesion_per_zone = np.bincount(les_labels, minlength=n_zones + 1)[1:] * ml
    periph = zones.peripheral[box][lesion]
    periph_per_zone = np.bincount(les_labels[periph], minlength=n_zones + 1)[1:] * ml

    components, count_per_zone, lesion_list = _components(lesion, labels, ct, box, n_zones)

    zone_findings = {
        name: RegionFindings(lung_per_zone[z], lesion_per_zone[z], int(count_per_zone[z]), periph_per_zone[z])
        for z, name in enumerate(LungZones.ZONE_NAMES)
    }
    sides = {}
    for side, zs in SIDE_ZONES.items():
        z = [i - 1 for i in zs]
        side_count = sum(1 for c in lesion_list if c["lung"] == side)
        sides[side] = RegionFindings(lung_per_zone[z].sum(), lesion_per_zone[z].sum(), side_count, periph_per_zone[z].sum())
    whole = RegionFindings(lung_per_zone.sum(), lesion_per_zone.sum(), components, periph_per_zone.sum())

    lesion_hu = ct.array[box][lesion].astype(np.float32)
    hu_hist, hu_stats = _hu_summary(lesion_hu)
    hu_classes = {name: float(v * ml) for (name, _, _), v in zip(HU_CLASSES, hu_class_voxels)}
    types = _lesion_types(lesions, box, lesion, ml)
    return Findings(
        whole=whole,
        sides=sides,
        zones=zone_findings,
        zone_scores={name: severity_points(zone_findings[name].lvr_percent) for name in LungZones.ZONE_NAMES},
        hu_histogram=hu_hist,
        hu_stats=hu_stats,
        hu_classes_ml=hu_classes,
        lesion_types_ml=types,
        peripheral_thickness_mm=zones.peripheral_thickness_mm,
        lesions=lesion_list,
    )


def _zones(ct: CTVolume, lungs: LungMasks, thickness: Optional[float] = None) -> LungZones:
    from ..lungs.zones import PERIPHERAL_THICKNESS_MM, compute_zones

    return compute_zones(ct, lungs.right, lungs.left, PERIPHERAL_THICKNESS_MM if thickness is None else thickness)


#: Lung-only statistics (voxels per zone, voxels per HU class) do not change when only the
#: lesion mask is edited, so the last result is kept, keyed by the identity of the CT array
#: and the zone labels (weak references: a new or freed array never matches).
_LUNG_STATS_CACHE: Dict[str, Any] = {}


def _lung_stats(ct: CTVolume, zones: LungZones, box, n_zones: int) -> Tuple[np.ndarray, np.ndarray]:
    key = _LUNG_STATS_CACHE.get("key")
    if key is not None and key[0]() is ct.array and key[1]() is zones.labels and key[2] == box:
        return _LUNG_STATS_CACHE["value"]
    # One joint histogram of (zone, HU class) over the lung voxels (class 0 below the
    # first class, 1..len(HU_CLASSES) the classes, the last one above), accumulated over
    # slabs of slices so no box-sized temporary is made.
    n_cls = len(HU_CLASSES) + 2
    joint = np.zeros((n_zones + 1) * n_cls, np.int64)
    for k0 in range(box[0].start, box[0].stop, 16):
        slab = (slice(k0, min(k0 + 16, box[0].stop)), box[1], box[2])
        labels = zones.labels[slab]
        inside = labels > 0
        code = labels[inside].astype(np.int64) * n_cls + _hu_class(ct.array[slab][inside])
        joint += np.bincount(code, minlength=joint.size)
    joint = joint.reshape(n_zones + 1, n_cls)
    per_zone = joint[1:].sum(axis=1)
    per_class = joint[1:, 1:-1].sum(axis=0)
    value = (per_zone, per_class)
    try:
        _LUNG_STATS_CACHE.update(key=(weakref.ref(ct.array), weakref.ref(zones.labels), box), value=value)
    except TypeError:  # arrays that cannot be weakly referenced: no caching
        _LUNG_STATS_CACHE.clear()
    return value


_HU_EDGES = np.array([HU_CLASSES[0][1]] + [c[2] for c in HU_CLASSES], np.float64)
#: HU class of every int16 value (a lookup is ~5x faster than a search on 10^7 voxels).
_INT16_CLASS = np.searchsorted(_HU_EDGES, np.arange(-32768, 32768), side="right").astype(np.uint8)


def _hu_class(hu: np.ndarray) -> np.ndarray:
    """0 below the first HU class, i for HU_CLASSES[i-1], len(HU_CLASSES)+1 above."""
    if hu.dtype == np.int16:
        return _INT16_CLASS[hu.astype(np.int32) + 32768].astype(np.int64)
    return np.searchsorted(_HU_EDGES, hu, side="right").astype(np.int64)


def severity_points(percent_involved: float) -> int:
    """0-5 points for one zone from its % involvement (Pan / Chung 2020 bands:
    0 none, 1 <5 %, 2 5-25 %, 3 26-50 %, 4 51-75 %, 5 >75 %)."""
    if percent_involved <= 0:
        return 0
    if percent_involved < 5.0:
        return 1
    for upper, points in ((25.0, 2), (50.0, 3), (75.0, 4)):
        if percent_involved <= upper:
            return points
    return 5


def _union_bbox(*masks: np.ndarray) -> Optional[Tuple[slice, slice, slice]]:
    """Bounding box (slices) of the union of masks, without forming their union."""
    boxes = [b for b in (bbox(m) for m in masks) if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))  # type: ignore[return-value]


def _components(lesion: np.ndarray, labels: np.ndarray, ct: CTVolume, box, n_zones: int):
    """Count lesion components >= MIN_COUNTED_LESION_ML; assign each to the zone holding
    most of it. Returns (count, count per zone, per-lesion dicts)."""
    count_per_zone = np.zeros(n_zones, int)
    sub_box = _union_bbox(lesion)
    if sub_box is None:
        return 0, count_per_zone, []
    sub = lesion[sub_box]
    offset = [b.start + s.start for b, s in zip(box, sub_box)]
    cc, n = components_26(sub)
    ml = ct.voxel_volume_ml
    min_vox = int(math.ceil(MIN_COUNTED_LESION_ML / ml - 1e-9))
    flat = cc.ravel()
    idx = np.flatnonzero(flat)
    comp = flat[idx]
    sizes = np.bincount(comp, minlength=n + 1)
    # zone histogram per component: one joint bincount of (component, zone)
    zone_of = labels[sub_box].ravel()[idx].astype(np.int64)
    joint = np.bincount(comp * (n_zones + 1) + zone_of, minlength=(n + 1) * (n_zones + 1)).reshape(n + 1, n_zones + 1)
    kept = [c for c in range(1, n + 1) if sizes[c] >= min_vox]
    objects = ndi.find_objects(cc) if kept else []
    lesion_list = []
    for c in kept:
        z = int(np.argmax(joint[c, 1:]))
        count_per_zone[z] += 1
        sl = objects[c - 1]
        centre = [(s.start + s.stop - 1) / 2.0 + o for s, o in zip(sl, offset)]
        extent = [(s.stop - s.start) * sp for s, sp in zip(sl, ct.spacing_zyx)]
        lesion_list.append(
            {
                "id": len(lesion_list) + 1,
                "volume_ml": round(float(sizes[c] * ml), 3),
                "zone": LungZones.ZONE_NAMES[z],
                "lung": "right" if z < 3 else "left",
                "bbox_centre_lps_mm": [round(float(v), 1) for v in ct.index_to_lps(np.array(centre[::-1]))],
                "bbox_size_mm_zyx": [round(float(v), 1) for v in extent],
            }
        )
    return len(kept), count_per_zone, lesion_list


def _hu_summary(values: np.ndarray) -> Tuple[Dict[str, Any], Dict[str, Optional[float]]]:
    edges = np.array(HU_BIN_EDGES, dtype=np.float32)
    counts = (
        np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
        if values.size
        else np.zeros(len(edges) + 1, int)
    )
    hist = {
        "bin_edges_hu": list(HU_BIN_EDGES),
        "below_first_edge": int(counts[0]),
        "counts": [int(c) for c in counts[1:-1]],
        "above_last_edge": int(counts[-1]),
    }
    if values.size == 0:
        return hist, {"mean": None, "std": None, **{f"p{p}": None for p in HU_PERCENTILES}}
    pct = np.percentile(values, HU_PERCENTILES)
    stats = {"mean": float(values.mean()), "std": float(values.std())}
    stats.update({f"p{p}": float(v) for p, v in zip(HU_PERCENTILES, pct)})
    return hist, stats


def _lesion_types(lesions: LesionMasks, box, lesion: np.ndarray, ml: float) -> Dict[str, Optional[float]]:
    out: Dict[str, Optional[float]] = {}
    for name in ("ggo", "consolidation"):
        m = getattr(lesions, name)
        out[name] = None if m is None else float((np.asarray(m[box], bool) & lesion).sum() * ml)
    return out
