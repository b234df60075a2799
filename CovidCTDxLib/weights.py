"""Model weights that cannot run code when loaded, with a model card and integrity checks.

Why safetensors: a ``torch.save`` checkpoint is a pickle, and unpickling a file from the
internet can execute arbitrary code. A safetensors file is a JSON header plus raw tensor
bytes, so loading it only ever creates tensors.

File layout produced by :func:`save_weights` for ``name.safetensors``:

- ``name.safetensors``: the tensors; its header metadata holds ``model_card`` (the card as
  a JSON string) and ``tensors_sha256`` (SHA-256 of the raw tensor bytes, so even a lone
  file detects a flipped byte in its weights);
- ``name.safetensors.sha256``: ``sha256sum``-compatible digest of the whole file;
- ``name.json``: the model card (human readable) plus the file's SHA-256.

:func:`load_weights` checks, in this order, that the file exists, is not a pickle/zip
checkpoint, matches the expected SHA-256 (argument, else ``.sha256`` sidecar, else the JSON
card), parses as safetensors, was made for the expected architecture (name and version) and
that its tensor bytes match ``tensors_sha256``. Every failure raises :class:`WeightsError`
with a message that says what to do.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Union

from . import __version__
from .errors import WeightsError
from .result import NOT_FOR_DIAGNOSIS, Provenance

if TYPE_CHECKING:  # torch is imported where tensors are made: reading model cards needs no torch
    import torch

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Keys in the safetensors header metadata (a str -> str mapping).
META_CARD = "model_card"
META_TENSORS_SHA = "tensors_sha256"
META_FORMAT = "format"
FORMAT_TAG = "covidctdx-weights-1"

#: A safetensors header larger than this is certainly not one of our files.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class ModelCard:
    """What a weights file is, what it was trained on, and how well it did.

    ``synthetic=True`` means the model only ever saw synthetic data; every output it
    produces must carry :data:`result.NOT_FOR_DIAGNOSIS`.
    """

    architecture: str
    architecture_version: str
    config: Dict[str, Any]
    training_data: str
    synthetic: bool
    metrics: Dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    project_version: str = __version__
    notes: str = ""

    @property
    def label(self) -> str:
        """The label every output of these weights must show ("" for real-data weights)."""
        return NOT_FOR_DIAGNOSIS if self.synthetic else ""

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelCard":
        try:
            return cls(
                architecture=str(d["architecture"]),
                architecture_version=str(d["architecture_version"]),
                config=dict(d.get("config") or {}),
                training_data=str(d.get("training_data", "")),
                synthetic=bool(d["synthetic"]),
                metrics=dict(d.get("metrics") or {}),
                date=str(d.get("date", "")),
                project_version=str(d.get("project_version", "")),
                notes=str(d.get("notes", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"The model card is incomplete or malformed ({exc}).") from exc


@dataclass
class LoadedWeights:
    """Verified tensors plus the card that describes them."""

    state_dict: Dict[str, torch.Tensor]
    card: ModelCard
    sha256: str
    path: Path

    def provenance(self) -> Provenance:
        """Provenance record shown next to every output of these weights."""
        return Provenance(
            model=self.card.architecture,
            weights_file=self.path.name,
            weights_sha256=self.sha256,
            training_data=self.card.training_data,
            not_for_diagnosis=self.card.synthetic,
            project_version=__version__,
            model_card=self.card.to_dict(),
        )


# ---------------------------------------------------------------------------- paths
def sha256_sidecar(path: PathLike) -> Path:
    """``name.safetensors`` -> ``name.safetensors.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def card_sidecar(path: PathLike) -> Path:
    """``name.safetensors`` -> ``name.json``."""
    return Path(path).with_suffix(".json")


def read_model_cards(folder: PathLike) -> List[Dict[str, Any]]:
    """The model cards (JSON sidecars) of every ``*.safetensors`` in ``folder``, without torch.

    Why from the sidecars: the Slicer panel shows what the weights are before torch is even
    installed. A missing or unreadable sidecar gives a card with only the file name, and
    ``synthetic`` unknown (None), never a claim the file does not make.
    """
    cards: List[Dict[str, Any]] = []
    folder = Path(folder)
    if not folder.is_dir():
        return cards
    for weights in sorted(folder.glob("*.safetensors")):
        sidecar = card_sidecar(weights)
        try:
            card = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        except (OSError, ValueError):
            log.warning("Model card %s is unreadable; showing the file name only.", sidecar)
            card = {}
        if not isinstance(card, dict):
            card = {}
        card.setdefault("architecture", weights.stem)
        card.setdefault("synthetic", None)
        card["file"] = weights.name
        cards.append(card)
    return cards


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- save
def _serialise(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _data_section(blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 + n :]


def write_with_sha256_sidecar(path: PathLike, blob: bytes) -> str:
    """Write a weights file atomically plus its ``sha256sum``-style sidecar; return the digest.

    Every weights writer uses it, so every file a loader meets has the sidecar that
    :func:`read_checked_safetensors` verifies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
    digest = hashlib.sha256(blob).hexdigest()
    sha256_sidecar(path).write_text(f"{digest}  {path.name}\n")
    return digest


def save_weights(path: PathLike, state_dict: Mapping[str, torch.Tensor], card: ModelCard) -> str:
    """Write ``state_dict`` + ``card`` as safetensors with sidecars; return the file SHA-256.

    Tensors are detached, moved to CPU and made contiguous copies (safetensors refuses
    shared storage). Non-tensor entries are an error: they would need pickle.
    """
    path = Path(path)
    import torch

    tensors: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict entry {k!r} is {type(v).__name__}, not a tensor")
        tensors[k] = v.detach().cpu().contiguous().clone()
    card_json = json.dumps(card.to_dict(), sort_keys=True)
    # The data section does not depend on the metadata, so hash it from a first pass.
    data_sha = hashlib.sha256(_data_section(_serialise(tensors, {}))).hexdigest()
    blob = _serialise(tensors, {META_FORMAT: FORMAT_TAG, META_CARD: card_json, META_TENSORS_SHA: data_sha})
    digest = write_with_sha256_sidecar(path, blob)
    card_sidecar(path).write_text(json.dumps({**card.to_dict(), "sha256": digest, "file": path.name}, indent=2, sort_keys=True) + "\n")
    log.info("saved %s (%d tensors, %.1f MB, sha256 %s)", path, len(tensors), len(blob) / 1e6, digest[:12])
    return digest


# ---------------------------------------------------------------------------- load
def _sniff(path: Path, head: bytes, size: int) -> None:
    """Refuse pickles / torch zip checkpoints before anything parses them.

    A safetensors file starts with its header length (8 bytes, little-endian) and then
    ``{``; its first byte can be 0x80 (a header of 128 + 256·k bytes), so the pickle test
    only applies to files that do not have that structure.
    """
    looks_like_safetensors = size >= 9 and head[8:9] == b"{"
    is_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if not looks_like_safetensors and (is_pickle or head[:4] == b"PK\x03\x04"):
        raise WeightsError(
            f"{path.name} is a pickle/torch.save checkpoint, not a safetensors weights file. "
            "Pickle files can run code when loaded, so CovidCTDx refuses them; convert the "
            "checkpoint with a trusted script (CovidCTDxLib.weights.save_weights)."
        )
    if size < 8:
        raise WeightsError(f"{path.name} is only {size} bytes: the weights file is truncated. Download or copy it again.")
    (n,) = struct.unpack("<Q", head[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > size or head[8:9] != b"{":
        raise WeightsError(
            f"{path.name} is not a valid safetensors weights file (truncated or corrupt header). "
            "Download or copy it again."
        )


def _digest(text: str, source: str) -> str:
    """A SHA-256 hex digest from ``source``, refused when it is not one (not "does not match")."""
    digest = text.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise WeightsError(
            f"{source} is malformed: expected a SHA-256 digest of 64 hex digits (as `sha256sum FILE > FILE.sha256` "
            f"writes), found {text.strip()[:40]!r}. Recreate it."
        )
    return digest


def _expected_digest(path: Path, expected: Optional[str]) -> Optional[str]:
    if expected:
        return _digest(expected, "The expected SHA-256")
    side = sha256_sidecar(path)
    if side.exists():
        try:
            text = side.read_text().split()
        except (OSError, UnicodeDecodeError):
            text = ["(unreadable)"]
        return _digest(text[0] if text else "", f"The checksum file {side.name}")
    card = card_sidecar(path)
    if card.exists():
        try:
            sha = json.loads(card.read_text()).get("sha256")
        except (ValueError, AttributeError):
            sha = None
        if sha:
            return str(sha).lower()
    return None


@dataclass
class CheckedSafetensors:
    """A safetensors file's bytes after the safety and digest checks, with its header metadata."""

    path: Path
    data: bytes
    sha256: str
    metadata: Dict[str, str]

    @property
    def data_section(self) -> bytes:
        return _data_section(self.data)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The tensors; parsing them never runs code (safetensors holds no pickle)."""
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        try:
            return st_load(self.data)
        except (SafetensorError, RuntimeError, ValueError) as exc:
            raise WeightsError(f"{self.path.name} could not be read as safetensors ({exc}). Restore the original file.") from exc


def check_weights_file(path: PathLike) -> Path:
    """Refuse a weights path that is a folder, missing, or has a malformed ``.sha256`` sidecar.

    Cheap (no read of the weights), so option parsing calls it before any work starts.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a folder, not a weights file; give the .safetensors file inside it.")
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}. Check the path or reinstall the weights.")
    _expected_digest(path, None)
    return path


def describe_mismatch(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> str:
    """One line on why ``state`` does not fit a network whose state dict is ``expected`` ("" if it fits).

    Why not torch's message: for another model's weights it lists every key, 10 KB on one line.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return ""
    if META_CARD in metadata:
        try:
            architecture = json.loads(metadata[META_CARD]).get("architecture", "another model")
        except (ValueError, AttributeError):
            architecture = "another model"
        return f"it is a CovidCTDx '{architecture}' weights file with {len(state)} tensors, made for that model"
    parts = [
        f"{len(keys)} tensor(s) {label}, e.g. {', '.join(keys[:3])}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", wrong))
        if keys
    ]
    return f"of {len(expected)} expected tensors: " + "; ".join(parts)


def read_checked_safetensors(path: PathLike, expected_sha256: Optional[str] = None) -> CheckedSafetensors:
    """Read a user-given safetensors file, refusing it before parsing if it is unsafe.

    Shared by every loader of weights (the model stages and the lung model hook): the file
    must exist, must not be a pickle / torch zip checkpoint, must have a sane safetensors
    header, and must match ``expected_sha256`` (else its ``.sha256`` sidecar, else its JSON
    card) when one of them exists.
    """
    path = check_weights_file(path)
    want = _expected_digest(path, expected_sha256)
    data = path.read_bytes()
    _sniff(path, data[:9], len(data))
    digest = hashlib.sha256(data).hexdigest()
    if want is not None and want != digest:
        raise WeightsError(
            f"{path.name} does not match its SHA-256 (expected {want[:16]}…, file has {digest[:16]}…): "
            "the file is truncated, corrupt or was modified. Do not use it; restore the original."
        )
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a string mapping")
    except (UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise WeightsError(f"{path.name} has a corrupt header ({exc}). Restore the original file.") from exc
    return CheckedSafetensors(path=path, data=data, sha256=digest, metadata={str(k): str(v) for k, v in metadata.items()})


def load_weights(
    path: PathLike,
    expected_architecture: str,
    expected_sha256: Optional[str] = None,
    expected_version: Optional[str] = None,
) -> LoadedWeights:
    """Load and verify a weights file written by :func:`save_weights`.

    Args:
        path: the ``.safetensors`` file.
        expected_architecture: e.g. ``"deepsc"`` or ``"racnet"``; a file for another model is refused.
        expected_sha256: digest to check against; by default the ``.sha256`` sidecar, then
            the JSON card's ``sha256``. Without any of them only the embedded tensor digest
            is checked (still catches truncation and flipped weight bytes).
        expected_version: if given, the card's ``architecture_version`` must equal it.
    """
    path = Path(path)
    checked = read_checked_safetensors(path, expected_sha256)
    metadata = checked.metadata
    if META_CARD not in metadata:
        raise WeightsError(f"{path.name} has no model card: it was not written by CovidCTDx and cannot be verified.")
    try:
        card = ModelCard.from_dict(json.loads(metadata[META_CARD]))
    except ValueError as exc:
        raise WeightsError(f"{path.name}: the model card is not valid JSON ({exc}).") from exc
    if card.architecture != expected_architecture:
        raise WeightsError(
            f"{path.name} holds weights for '{card.architecture}', but '{expected_architecture}' was expected. "
            "Pick the weights file made for this model."
        )
    if expected_version is not None and card.architecture_version != expected_version:
        raise WeightsError(
            f"{path.name} was made for {card.architecture} version {card.architecture_version}, "
            f"but this program needs version {expected_version}. Use weights trained with this version."
        )
    data_sha = hashlib.sha256(checked.data_section).hexdigest()
    if metadata.get(META_TENSORS_SHA) and metadata[META_TENSORS_SHA] != data_sha:
        raise WeightsError(
            f"The tensors in {path.name} do not match their recorded digest: the file was modified or is "
            "corrupt. Restore the original file."
        )
    state_dict = checked.tensors()
    log.info("loaded %s: %s v%s, sha256 %s", path.name, card.architecture, card.architecture_version, checked.sha256[:12])
    return LoadedWeights(state_dict=state_dict, card=card, sha256=checked.sha256, path=path)
