"""Optional neural lung model hook: a user's trained 2D U-Net instead of the classical engine.

Why a hook and not a bundled network: a lung U-Net worth using (e.g. lungmask's R231) is
trained on thousands of annotated scans we cannot ship; users who have such weights can
plug them in. :func:`CovidCTDxLib.lungs.engine.segment_lungs` accepts any object with
``predict(ct) -> labelmap`` (0 background, 1 right lung, 2 left lung; a 0/1 lung map also
works) and re-decides right/left from patient coordinates, so a model trained on another
orientation convention still gets sides right. An optional ``provenance() -> dict`` (weights
file, SHA-256, training data) is carried to every output that shows the lung masks.

Weights file (safetensors, so loading never unpickles code; checked against its SHA-256
sidecar ``name.safetensors.sha256`` or a digest the caller gives, like every weights file):

- tensors: the ``state_dict`` of :class:`UNet2D` below, key layout
  ``down_path.{0..depth-1}.block.{0,2,3,5}.{weight,bias,running_mean,running_var,
  num_batches_tracked}`` (conv 0, batch-norm 2, conv 3, batch-norm 5),
  ``up_path.{0..depth-2}.up.1.{weight,bias}`` (1×1 conv after bilinear up-sampling),
  ``up_path.{i}.conv_block.block.{0,2,3,5}.*`` and ``last.{weight,bias}``.
  This is the layout of the R231 U-Net (depth 5, wf 6 = 64..1024 channels, ~29 M
  parameters, padding, batch norm, bilinear up-sampling), so its weights convert with ``safetensors.torch.save_file(state_dict)``;
- metadata (optional strings): ``depth`` (5), ``wf`` (6), ``n_classes`` (3),
  ``hu_min`` (-1024), ``hu_max`` (600), ``size`` (256): the input slice size.

Input convention (R231): each axial slice clipped to [hu_min, hu_max], scaled to [0, 1],
resized to size×size; argmax of the logits resized back (nearest) to the slice.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Protocol, Union, runtime_checkable

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import WeightsError
from ..models.lung_unet import UNet2D
from ..volume import LPS_SUPERIOR, CTVolume
from ..weights import describe_mismatch, read_checked_safetensors, write_with_sha256_sidecar

log = logging.getLogger(__name__)


@runtime_checkable
class LungModel(Protocol):
    """Anything that maps a CT to a lung labelmap on its grid (0 bg, 1 right, 2 left)."""

    def predict(self, ct: CTVolume) -> np.ndarray:  # pragma: no cover - protocol
        ...


class TorchLungModel:
    """A :class:`UNet2D` applied slice by slice on CPU (or any torch device)."""

    def __init__(
        self,
        net: UNet2D,
        hu_min: float = -1024.0,
        hu_max: float = 600.0,
        size: int = 256,
        batch_size: int = 8,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        self.net = net.eval().to(device)
        self.hu_min, self.hu_max, self.size = float(hu_min), float(hu_max), int(size)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.weights_file: Optional[str] = None
        self.weights_sha256: Optional[str] = None

    @classmethod
    def from_file(cls, path: Union[str, Path], device: str = "cpu", expected_sha256: Optional[str] = None) -> "TorchLungModel":
        """Load a U-Net from a safetensors file (layout in the module docstring).

        The file goes through the same checks as the model stages' weights
        (:func:`CovidCTDxLib.weights.read_checked_safetensors`): pickles are refused unread,
        and the SHA-256 must match ``expected_sha256``, else the ``.sha256`` sidecar that
        :meth:`save` writes, when one exists. Its file name and SHA-256 are kept and shown
        with every lung mask it makes.

        Raises:
            WeightsError: missing, unsafe, corrupt or modified file, or tensors that do not
                fit the network.
        """
        checked = read_checked_safetensors(path, expected_sha256)
        meta, state = checked.metadata, checked.tensors()
        name = checked.path.name
        try:
            depth, wf = int(meta.get("depth", 5)), int(meta.get("wf", 6))
            n_classes = int(meta.get("n_classes", state["last.weight"].shape[0] if "last.weight" in state else 3))
            net = UNet2D(1, n_classes, depth, wf)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise WeightsError(f"{name} has unusable lung model metadata ({exc}).") from None
        mismatch = describe_mismatch(net.state_dict(), state, meta)
        if mismatch:
            raise WeightsError(
                f"{name} does not hold a UNet2D lung model ({mismatch}); see CovidCTDxLib.lungs.model_hook for the layout."
            )
        net.load_state_dict(state, strict=True)
        log.info("lung model %s: depth %d, wf %d, %d classes, sha256 %s", name, depth, wf, n_classes, checked.sha256[:12])
        model = cls(
            net,
            hu_min=float(meta.get("hu_min", -1024)),
            hu_max=float(meta.get("hu_max", 600)),
            size=int(meta.get("size", 256)),
            device=device,
        )
        model.weights_file, model.weights_sha256 = name, checked.sha256
        return model

    def provenance(self) -> Dict[str, str]:
        """Which weights made the lung masks; shown in results.json, the report and the scene."""
        return {
            "model": "UNet2D lung model",
            "weights_file": self.weights_file or "(in memory, not from a file)",
            "weights_sha256": self.weights_sha256 or "",
            "training_data": "user-supplied; not validated by CovidCTDx",
        }

    def save(self, path: Union[str, Path]) -> str:
        """Write the network as safetensors with the metadata :meth:`from_file` reads.

        Also writes the ``sha256sum``-style sidecar that :meth:`from_file` checks; returns
        the file's SHA-256.
        """
        from safetensors.torch import save

        meta = {
            "depth": str(self.net.depth), "wf": str(int(np.log2(self.net.last.in_channels))),
            "n_classes": str(self.net.last.out_channels), "hu_min": str(self.hu_min),
            "hu_max": str(self.hu_max), "size": str(self.size),
        }
        blob = save({k: v.contiguous() for k, v in self.net.state_dict().items()}, metadata=meta)
        digest = write_with_sha256_sidecar(path, blob)
        self.weights_file, self.weights_sha256 = Path(path).name, digest
        return digest

    @torch.no_grad()
    def predict(self, ct: CTVolume, progress: Optional[object] = None) -> np.ndarray:
        """Label every axial slice; returns uint8 labels on the CT grid."""
        axis, _ = ct.axis_for(LPS_SUPERIOR)
        vol = np.moveaxis(ct.array, axis, 0)
        out = np.zeros(vol.shape, np.uint8)
        h, w = vol.shape[1:]
        for start in range(0, vol.shape[0], self.batch_size):
            chunk = np.clip(vol[start:start + self.batch_size].astype(np.float32), self.hu_min, self.hu_max)
            x = torch.from_numpy((chunk - self.hu_min) / (self.hu_max - self.hu_min))[:, None].to(self.device)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            labels = self.net(x).argmax(1, keepdim=True).to(torch.uint8)
            labels = F.interpolate(labels.float(), size=(h, w), mode="nearest")[:, 0]
            out[start:start + len(chunk)] = labels.cpu().numpy().astype(np.uint8)
            if callable(progress):
                progress(min(1.0, (start + len(chunk)) / vol.shape[0]), "Lung model: slices")
        return np.moveaxis(out, 0, axis)
