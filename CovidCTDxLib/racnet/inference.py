"""RACNet on one CT: slice selection → slice preprocessing → network → severity + anchors.

The preprocessing here is the single definition used by both inference and training
(``training/racnet_data.py`` imports :func:`prepare_scan`), so a model always sees at
inference exactly what it saw in training. Its parameters travel in the model card
(``config["preprocessing"]``).

Preprocessing (our choices, documented because the abstract gives none):

* Slices: :func:`racnet.slice_selection.select_slices` — lung-area rule when a lung mask exists, else the
  physical COVID-CTset rule; ordered inferior → superior; optionally thinned to
  ``slice_step_mm`` so thin- and thick-slice scans cover the lungs with similar counts.
* In-plane orientation: every slice is shown in radiological convention (rows anterior →
  posterior, columns patient right → left) whatever the stored direction matrix.
* Crop: a square (in mm) around the lungs of the selected slices plus ``crop_margin_mm``
  (body box when there is no lung mask), resampled to ``size`` × ``size`` with antialiasing.
  Why crop to the lungs: severity is a property of the lungs; a fixed FOV would waste most
  pixels on the table, arms and air.
* Intensities: HU clipped to [−1400, 200] and scaled to [0, 1] as in DeepSC-COVID
  (docs/ARCHITECTURE.md). **Not** multiplied by the lung mask: COV19-CT-DB slices (the paper's data)
  are whole slices, and a mask error (e.g. missed dense consolidation) would otherwise
  erase the very lesions that define severity.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import WeightsError
from ..models.racnet import ARCHITECTURE, ARCHITECTURE_VERSION, RACNet, RACNetConfig
from ..progress import Progress
from ..result import SEVERITY_KEYS, SEVERITY_MIN_COVID_PROBABILITY, SEVERITY_NOT_APPLICABLE, LungMasks, Severity
from ..volume import LPS_LEFT, LPS_POSTERIOR, CTVolume
from .anchors import INPUT_PREFIX, Anchors
from .anchors import PREFIX as ANCHOR_PREFIX
from .slice_selection import SliceSelection, body_mask, select_slices

log = logging.getLogger(__name__)

HU_WINDOW = (-1400.0, 200.0)
#: HU used to pad a crop that extends past the image: outside air.
PAD_HU = -1000.0
#: Slices per CNN call at inference (bounds memory; results do not depend on it).
ENCODE_CHUNK = 64


@dataclass
class SlicePrep:
    """How a CT becomes the (T, size, size) slice stack RACNet reads."""

    size: int = 128
    hu_min: float = HU_WINDOW[0]
    hu_max: float = HU_WINDOW[1]
    selection: str = "auto"
    lung_area_fraction: float = 0.25
    slice_step_mm: float = 0.0
    crop_margin_mm: float = 10.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SlicePrep":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---------------------------------------------------------------------------- preprocessing
def _radiological(ct: CTVolume, axis: int) -> Tuple[int, int, bool, bool]:
    """Array axes shown as rows (anterior→posterior) and columns (patient right→left), and
    whether each must be flipped. Strongly oblique volumes keep their stored order."""
    rest = [a for a in range(3) if a != axis]
    ap_axis, ap_sign = ct.axis_for(LPS_POSTERIOR)
    lr_axis, lr_sign = ct.axis_for(LPS_LEFT)
    if {ap_axis, lr_axis} != set(rest):
        return rest[0], rest[1], False, False
    return ap_axis, lr_axis, ap_sign < 0, lr_sign < 0


def _oriented(stack: np.ndarray, axis: int, rows_axis: int, flip_r: bool, flip_c: bool) -> np.ndarray:
    """(T, a, b) slices taken across ``axis`` → (T, rows, cols) view in display order."""
    rest = [a for a in range(3) if a != axis]
    if rest.index(rows_axis) == 1:
        stack = stack.transpose(0, 2, 1)
    return stack[:, ::-1 if flip_r else 1, ::-1 if flip_c else 1]


def _profile(mask: np.ndarray, ax: int, n: int, stride: int = 1) -> np.ndarray:
    """Which indices along array axis ``ax`` hold any True voxel (mask may be strided)."""
    prof = mask.any(axis=tuple(a for a in range(3) if a != ax))
    return np.repeat(prof, stride)[:n] if stride > 1 else prof


def _selected_profile(lungs: LungMasks, axis: int, ax: int, indices: np.ndarray) -> np.ndarray:
    """Which indices along array axis ``ax`` hold lung in any of the selected slices."""
    other = [a for a in range(3) if a not in (axis, ax)][0]
    prof = np.zeros(lungs.right.shape[ax], bool)
    for m in (lungs.right, lungs.left):
        per_slice = m.any(axis=other)  # 2-D over (axis, ax) in array order
        per_slice = per_slice if axis < ax else per_slice.T
        prof |= per_slice[indices].any(axis=0)
    return prof


def _square_crop(mask_rows: np.ndarray, mask_cols: np.ndarray, sp_rows: float, sp_cols: float,
                 n_rows: int, n_cols: int, margin_mm: float) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Square (in mm) crop around the True extent of two 1-D profiles; may exceed the image."""
    r = np.nonzero(mask_rows)[0]
    c = np.nonzero(mask_cols)[0]
    if r.size == 0 or c.size == 0:
        return (0, n_rows), (0, n_cols)
    cr, cc = 0.5 * (r[0] + r[-1]) * sp_rows, 0.5 * (c[0] + c[-1]) * sp_cols
    half = 0.5 * max((r[-1] - r[0] + 1) * sp_rows, (c[-1] - c[0] + 1) * sp_cols) + margin_mm
    rows = (int(np.floor((cr - half) / sp_rows)), int(np.ceil((cr + half) / sp_rows)))
    cols = (int(np.floor((cc - half) / sp_cols)), int(np.ceil((cc + half) / sp_cols)))
    return rows, cols


def _crop_pad(stack: np.ndarray, rows: Tuple[int, int], cols: Tuple[int, int], fill: float) -> np.ndarray:
    """stack[:, r0:r1, c0:c1] with out-of-image parts filled with ``fill``."""
    t, nr, nc = stack.shape
    out = np.full((t, rows[1] - rows[0], cols[1] - cols[0]), fill, dtype=np.float32)
    r0, r1 = max(rows[0], 0), min(rows[1], nr)
    c0, c1 = max(cols[0], 0), min(cols[1], nc)
    if r1 > r0 and c1 > c0:
        out[:, r0 - rows[0] : r1 - rows[0], c0 - cols[0] : c1 - cols[0]] = stack[:, r0:r1, c0:c1]
    return out


def window(hu: torch.Tensor, prep: SlicePrep) -> torch.Tensor:
    """Clip HU to the window and scale to [0, 1]."""
    return ((hu.clamp(prep.hu_min, prep.hu_max) - prep.hu_min) / (prep.hu_max - prep.hu_min)).to(torch.float32)


def prepare_scan(ct: CTVolume, lungs: Optional[LungMasks], prep: SlicePrep) -> Tuple[np.ndarray, SliceSelection]:
    """Selected, oriented, cropped, windowed and resized slices: (T, size, size) float32 in [0, 1]."""
    sel = select_slices(ct, lungs, prep.selection, prep.lung_area_fraction).thin(prep.slice_step_mm)
    axis = sel.axis
    r_ax, c_ax, flip_r, flip_c = _radiological(ct, axis)
    stack = _oriented(np.take(ct.array, sel.indices, axis=axis), axis, r_ax, flip_r, flip_c)
    n_r, n_c = ct.shape[r_ax], ct.shape[c_ax]
    if sel.method == "lungs":
        rows_prof = _selected_profile(lungs, axis, r_ax, sel.indices)
        cols_prof = _selected_profile(lungs, axis, c_ax, sel.indices)
    else:
        small, strides = body_mask(ct)
        rows_prof, cols_prof = _profile(small, r_ax, n_r, strides[r_ax]), _profile(small, c_ax, n_c, strides[c_ax])
    rows_prof = rows_prof[::-1] if flip_r else rows_prof
    cols_prof = cols_prof[::-1] if flip_c else cols_prof
    sp_r, sp_c = ct.spacing_zyx[r_ax], ct.spacing_zyx[c_ax]
    rows, cols = _square_crop(rows_prof, cols_prof, sp_r, sp_c, n_r, n_c, prep.crop_margin_mm)
    out = np.empty((stack.shape[0], prep.size, prep.size), dtype=np.float32)
    for i in range(0, stack.shape[0], ENCODE_CHUNK):
        chunk = _crop_pad(stack[i : i + ENCODE_CHUNK], rows, cols, PAD_HU)
        x = window(torch.from_numpy(chunk)[:, None], prep)
        x = F.interpolate(x, size=(prep.size, prep.size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + ENCODE_CHUNK] = x[:, 0].clamp_(0.0, 1.0).numpy()  # antialiasing may overshoot by 1e-7
    return out, sel


# ---------------------------------------------------------------------------- model loading
@dataclass
class RACNetBundle:
    """A ready-to-run RACNet: network in eval mode, anchors and preprocessing."""

    model: RACNet
    anchors: Anchors
    prep: SlicePrep
    weights: Any  # weights.LoadedWeights
    input_anchors: Optional[Anchors] = None  # on the mean slice feature (see anchors.py)

    def out_of_distribution(self, pred: Mapping[str, np.ndarray]) -> bool:
        """Far from every class's anchors in the latent space or in the input-feature space."""
        ood = bool(self.anchors.is_out_of_distribution(pred["latent"]))
        if self.input_anchors is not None:
            ood = ood or bool(self.input_anchors.is_out_of_distribution(pred["feature"]))
        return ood


def model_card_config(cfg: RACNetConfig, prep: SlicePrep, anchor_classes) -> Dict[str, Any]:
    """The card ``config`` that :func:`load_racnet` needs to rebuild the model."""
    return {"network": cfg.to_dict(), "preprocessing": prep.to_dict(), "anchor_classes": list(anchor_classes)}


def save_racnet_weights(path: Path, state: Mapping[str, torch.Tensor], card: Any) -> str:
    """``weights.save_weights`` plus a workaround: return the file's SHA-256.

    ``weights._sniff`` treats a file whose first byte is 0x80 (or first bytes "PK") as a
    pickle/zip checkpoint, but that first byte is the low byte of the safetensors header
    length, so ~1 in 256 valid files would be refused. Until that check is fixed we pad the
    card's notes (which changes the header length) until the file starts differently.
    """
    from ..weights import save_weights

    digest = save_weights(path, state, card)
    while Path(path).read_bytes()[:2] == b"PK" or Path(path).read_bytes()[:1] == b"\x80":
        card.notes += " "
        digest = save_weights(path, state, card)
    return digest


def load_racnet(weights: Any) -> RACNetBundle:
    """Build RACNet from verified weights (``weights.LoadedWeights``); raise WeightsError if they do not fit."""
    conf = weights.card.config
    if weights.card.architecture != ARCHITECTURE:
        raise WeightsError(f"{weights.path.name} is a {weights.card.architecture} model, not RACNet.")
    if str(weights.card.architecture_version) != ARCHITECTURE_VERSION:
        raise WeightsError(
            f"{weights.path.name} was made for RACNet version {weights.card.architecture_version}; this program "
            f"runs version {ARCHITECTURE_VERSION}. Use weights trained with this version."
        )
    try:
        cfg = RACNetConfig.from_dict(conf["network"])
        prep = SlicePrep.from_dict(conf.get("preprocessing", {}))
        classes = conf["anchor_classes"]
    except (KeyError, TypeError) as exc:
        raise WeightsError(f"The model card of {weights.path.name} lacks the RACNet configuration ({exc}).") from exc
    model = RACNet(cfg)
    state = {k: v for k, v in weights.state_dict.items() if not k.startswith((ANCHOR_PREFIX, INPUT_PREFIX))}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"{weights.path.name} does not fit the RACNet described by its card ({exc}).") from exc
    model.eval()
    has_input = INPUT_PREFIX + "centres" in weights.state_dict
    return RACNetBundle(model, Anchors.from_tensors(weights.state_dict, classes), prep, weights,
                        Anchors.from_tensors(weights.state_dict, classes, INPUT_PREFIX) if has_input else None)


# ---------------------------------------------------------------------------- inference
def predict_stack(model: RACNet, stack: np.ndarray) -> Dict[str, np.ndarray]:
    """Run RACNet on one prepared (T, H, W) stack; return numpy probabilities and latent."""
    x = torch.from_numpy(np.ascontiguousarray(stack))[None, :, None]
    with torch.inference_mode():
        out = model(x, chunk=ENCODE_CHUNK)
    return {
        "covid": torch.softmax(out["covid_logits"], dim=1)[0].numpy(),
        "severity": torch.softmax(out["severity_logits"], dim=1)[0].numpy(),
        "latent": out["latent"][0].numpy(),
        "feature": out["slice_feature_mean"][0].numpy(),
    }


def run_racnet(
    ct: CTVolume,
    lungs: Optional[LungMasks],
    weights: Any,
    progress: Optional[Union[Progress, Callable[[float, str], None]]] = None,
    bundle: Optional[RACNetBundle] = None,
) -> Severity:
    """Severity, COVID probability, nearest anchors and OOD flag for one CT.

    Args:
        ct: validated CT in HU.
        lungs: lung masks (selects slices and the crop); None → COVID-CTset selection and
            body crop.
        weights: ``weights.LoadedWeights`` from ``load_weights(path, "racnet")``.
        progress: Progress or plain ``(fraction, message)`` callback.
        bundle: an already built model for these weights (saves rebuilding in loops).
    """
    report = progress if isinstance(progress, Progress) else Progress(progress)
    report(0.0, "RACNet: building model")
    bundle = bundle or load_racnet(weights)
    report(0.1, "RACNet: selecting and preparing slices")
    stack, sel = prepare_scan(ct, lungs, bundle.prep)
    report(0.4, f"RACNet: reading {len(sel)} slices")
    pred = predict_stack(bundle.model, stack)
    report(0.9, "RACNet: anchors")
    match = bundle.anchors.explain(pred["latent"], k=3)
    ood = bundle.out_of_distribution(pred)
    probs = {k: float(p) for k, p in zip(SEVERITY_KEYS, pred["severity"])}
    grade = SEVERITY_KEYS[int(np.argmax(pred["severity"]))]
    covid = float(pred["covid"][1])
    label = grade if covid >= SEVERITY_MIN_COVID_PROBABILITY else SEVERITY_NOT_APPLICABLE
    log.info(
        "RACNet: %s (grade head %s p=%.2f), COVID p=%.2f, %d slices (%s), nearest anchor %s, OOD=%s",
        label, grade, probs[grade], covid, len(sel), sel.method, match.nearest[0] if match.nearest else None, ood,
    )
    report(1.0, "RACNet: done")
    return Severity(
        label=label,
        probabilities=probs,
        covid_probability=covid,
        anchors=match.nearest,
        out_of_distribution=ood,
        provenance=weights.provenance(),
        slices_used=len(sel),
    )
