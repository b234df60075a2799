"""Run the pipeline outside the GUI process, and bring its outputs back.

Why a separate process (as MONAIAuto3DSeg does): inference in Slicer's main thread freezes
the GUI for the whole run, and a Python thread cannot be stopped safely. A child process
(``PythonSlicer`` inside Slicer, any Python elsewhere) keeps the GUI responsive, and Cancel
simply kills it: the scene is only touched after the child succeeded, so a cancel or a
crash leaves the scene exactly as it was.

Protocol: the child reads ``input.nrrd`` + ``options.json``, runs
:func:`~CovidCTDxLib.pipeline.run_pipeline`, writes the command-line contract's files
(``segmentation.seg.nrrd``, ``evidence.nrrd``, ``results.json``, ``findings.csv``) into the
output folder, and reports on stdout with one JSON object per line::

    {"event": "progress", "fraction": 0.42, "message": "Masking lungs"}
    {"event": "done", "output_dir": "/tmp/.../out"}
    {"event": "error", "type": "LungsNotFoundError", "message": "..."}

Logging goes to stderr (kept in ``worker.log``), so stray prints never break the protocol.
No Qt and no Slicer here: the widget polls :class:`WorkerJob` from a QTimer; tests and
headless scripts call :meth:`WorkerJob.wait`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import CovidCTDxError
from ..io.results import result_from_outputs
from ..result import Result
from ..volume import CTVolume

log = logging.getLogger(__name__)

#: The package's parent folder: put on the child's PYTHONPATH so ``import CovidCTDxLib`` works
#: from an installed extension (qt-scripted-modules) and from a source checkout alike.
PACKAGE_PARENT = Path(__file__).resolve().parents[1]
INPUT_NAME = "input.nrrd"
OPTIONS_NAME = "options.json"
LOG_NAME = "worker.log"

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


# --------------------------------------------------------------------------- options on disk
def options_to_dict(options) -> Dict[str, Any]:
    return {
        "stages": list(options.stages),
        "weights_dir": str(options.weights_dir) if options.weights_dir else None,
        "deepsc_weights": str(options.deepsc_weights) if options.deepsc_weights else None,
        "racnet_weights": str(options.racnet_weights) if options.racnet_weights else None,
        "lung_model": str(options.lung_model) if options.lung_model else None,
        "lesion_source": options.lesion_source,
    }


def options_from_dict(data: Dict[str, Any]):
    from ..pipeline import PipelineOptions

    paths = {k: (Path(data[k]) if data.get(k) else None) for k in ("weights_dir", "deepsc_weights", "racnet_weights", "lung_model")}
    return PipelineOptions(stages=tuple(data.get("stages", ())), lesion_source=data.get("lesion_source", "auto"), **paths)


def write_input(ct: CTVolume, path: Path) -> Path:
    """The CT as an uncompressed NRRD (LPS, like the reader expects); speed over size."""
    import SimpleITK as sitk

    from ..io.segmentation_file import ct_to_image

    sitk.WriteImage(ct_to_image(ct), str(path), useCompression=False)
    return path


# --------------------------------------------------------------------------- child process
def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def run_job(input_path: Path, options_path: Path, output_dir: Path) -> int:
    """The child's work; returns the exit code (0 ok, 2 user-actionable error, 1 bug)."""
    from ..io.readers import read_ct
    from ..io.results import write_outputs
    from ..pipeline import run_pipeline

    try:
        options = options_from_dict(json.loads(Path(options_path).read_text()))
        _emit(event="progress", fraction=0.0, message="Reading the CT")
        ct = read_ct(input_path)
        result = run_pipeline(ct, options, progress=lambda f, m: _emit(event="progress", fraction=round(float(f), 4), message=m))
        _emit(event="progress", fraction=1.0, message="Writing results")
        write_outputs(result, output_dir, source=str(ct.metadata.get("name", input_path)))
    except CovidCTDxError as exc:
        _emit(event="error", type=type(exc).__name__, message=str(exc))
        return 2
    except Exception as exc:  # a bug: keep the traceback in the log, tell the GUI
        log.exception("CovidCTDx worker failed")
        _emit(event="error", type=type(exc).__name__, message=f"Internal error: {exc} (details in {LOG_NAME})")
        return 1
    _emit(event="done", output_dir=str(output_dir))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="CovidCTDx background worker (JSON lines on stdout).")
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--options", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_job(args.input, args.options, args.output)


# --------------------------------------------------------------------------- parent side
@dataclass
class WorkerJob:
    """One background run: start, poll (non-blocking), cancel, wait, load the result.

    Attributes after :meth:`poll`: ``state`` (running/succeeded/failed/cancelled),
    ``fraction`` and ``message`` (last progress), ``error_type``/``error`` on failure.
    """

    ct: CTVolume
    options: Any
    python: str = sys.executable
    work_dir: Optional[Path] = None
    state: str = "not started"
    fraction: float = 0.0
    message: str = ""
    error_type: str = ""
    error: str = ""
    returncode: Optional[int] = None
    _proc: Optional[subprocess.Popen] = field(default=None, repr=False)
    _events: "queue.Queue[Dict[str, Any]]" = field(default_factory=queue.Queue, repr=False)
    _reader: Optional[threading.Thread] = field(default=None, repr=False)
    _owns_work_dir: bool = field(default=False, repr=False)

    @property
    def output_dir(self) -> Path:
        assert self.work_dir is not None
        return self.work_dir / "out"

    @property
    def log_path(self) -> Path:
        assert self.work_dir is not None
        return self.work_dir / LOG_NAME

    def start(self) -> "WorkerJob":
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="CovidCTDx-"))
            self._owns_work_dir = True
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_input(self.ct, self.work_dir / INPUT_NAME)
        (self.work_dir / OPTIONS_NAME).write_text(json.dumps(options_to_dict(self.options)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [self.python, "-m", "CovidCTDxLib.app.worker", "--input", str(self.work_dir / INPUT_NAME),
               "--options", str(self.work_dir / OPTIONS_NAME), "--output", str(self.output_dir)]
        log.info("Starting CovidCTDx worker: %s", " ".join(cmd))
        group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
        with open(self.log_path, "wb") as stderr:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                          env=env, cwd=str(self.work_dir), **group)
        self.state = RUNNING
        self._reader = threading.Thread(target=self._read_stdout, name="CovidCTDx-worker-reader", daemon=True)
        self._reader.start()
        return self

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", errors="replace").strip()
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                self._events.put(event)
            elif line:
                log.info("worker: %s", line)
        self._events.put({"event": "exit", "returncode": self._proc.wait()})

    def poll(self) -> List[Dict[str, Any]]:
        """Apply and return the events that arrived since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        for event in events:
            self._apply(event)
        return events

    def _apply(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.fraction = float(event.get("fraction", self.fraction))
            self.message = str(event.get("message", ""))
        elif kind == "error":
            self.error_type = str(event.get("type", "Error"))
            self.error = str(event.get("message", ""))
        elif kind == "exit":
            self.returncode = int(event["returncode"])
            if self.state == RUNNING:
                ok = self.returncode == 0 and (self.output_dir / "results.json").exists()
                self.state = SUCCEEDED if ok else FAILED
                if not ok and not self.error:
                    self.error = f"The worker stopped with exit code {self.returncode}; see {self.log_path}."

    @property
    def finished(self) -> bool:
        return self.state in (SUCCEEDED, FAILED, CANCELLED)

    def cancel(self) -> None:
        """Kill the worker and everything it started (PythonSlicer is a launcher)."""
        if self._proc is None or self._proc.poll() is not None:
            if self.state == RUNNING:
                self.state = CANCELLED
            return
        self.state = CANCELLED
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._proc.pid)], capture_output=True, check=False)
            else:
                os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._proc.wait()

    def wait(self, timeout: Optional[float] = None) -> str:
        """Block until the worker ends (headless use and tests); returns the final state."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.cancel()
        if self._reader is not None:
            self._reader.join(timeout=10)
        self.poll()
        return self.state

    def result(self) -> Result:
        if self.state != SUCCEEDED:
            raise CovidCTDxError(self.error or f"The background run did not succeed (state: {self.state}).")
        return result_from_outputs(self.output_dir, self.ct)

    def cleanup(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.cancel()
        if self._owns_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)


# --------------------------------------------------------------------------- headless batch
def find_ct_inputs(folder: Path) -> List[Path]:
    """CT files (NIfTI/NRRD/MHA) and DICOM series folders directly inside ``folder``."""
    from ..io.readers import VOLUME_SUFFIXES

    inputs = []
    for path in sorted(Path(folder).iterdir()):
        name = path.name.lower()
        if path.is_file() and any(name.endswith(s) for s in VOLUME_SUFFIXES) and not name.endswith(".seg.nrrd"):
            inputs.append(path)
        elif path.is_dir() and any(p.is_file() for p in path.iterdir()):
            inputs.append(path)
    return inputs


def case_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def process_folder(folder: Path, out_dir: Path, options=None, progress=None) -> Dict[str, str]:
    """Run every CT in ``folder``; one output folder per case. Returns case → "ok" or the error.

    A case that fails (not a CT, no lungs...) is reported and skipped; the batch goes on.
    """
    from ..io.readers import read_ct
    from ..io.results import write_outputs
    from ..pipeline import run_pipeline

    inputs = find_ct_inputs(Path(folder))
    status: Dict[str, str] = {}
    for index, path in enumerate(inputs):
        name = case_name(path)
        if progress is not None:
            progress(index / max(1, len(inputs)), f"{name} ({index + 1}/{len(inputs)})")
        try:
            ct = read_ct(path)
            result = run_pipeline(ct, options)
            write_outputs(result, Path(out_dir) / name, source=str(path))
            status[name] = "ok"
        except CovidCTDxError as exc:
            log.warning("%s: %s", path, exc)
            status[name] = str(exc)
    if progress is not None:
        progress(1.0, f"{len(inputs)} case(s) done")
    return status


if __name__ == "__main__":
    sys.exit(main())
