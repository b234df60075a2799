"""Bad input and bad output places through the real front doors (``covidctdx run`` and the
background worker): each is refused with one line and exit status 2, and nothing is ever
half-written — a failed or killed run leaves the previous results of the folder as they were.

Disk full is shown twice: on a real, small tmpfs where the machine lets us mount one in a
private user/mount namespace (``unshare``; skipped elsewhere), and everywhere by making the
real write call fail with ENOSPC after it wrote half its bytes, as a full disk does.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import SimpleITK as sitk

from CovidCTDxLib.app.cli import EXIT_USER_ERROR, main
from CovidCTDxLib.io.segmentation_file import write_volume
from CovidCTDxLib.synthetic.phantom import make_phantom

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(shape=(72, 160, 160), spacing=(2.2, 2.2, 4.0))
FAST = ["--stages", "lungs"]  # writes the segmentation and the JSON/CSV/report, in a few seconds


@pytest.fixture(scope="module")
def phantom_path(tmp_path_factory) -> Path:
    ph = make_phantom(kind="covid", severity="moderate", seed=11, **SMALL)
    path = tmp_path_factory.mktemp("bad_input") / "covid.nrrd"
    write_volume(ph.ct, path)
    return path


def _files(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(folder: Path) -> list:
    """Staging folders, temporary files, locks and probes of ours in ``folder`` and beside it."""
    places = [folder, folder.parent] if folder.exists() else [folder.parent]
    return [p.name for d in places for p in d.iterdir() if p.name.startswith(".covidctdx") or ".partial" in p.name]


def _earlier_run(phantom_path: Path, out: Path) -> Dict[str, bytes]:
    assert main(["-q", "run", str(phantom_path), "-o", str(out)] + FAST) == 0
    return _files(out)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("covidctdx: error:") and "\n" not in err and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- disk full (simulated)
def _half_then_enospc(path: Path) -> None:
    """What a full disk does to a write: part of the bytes land, then ENOSPC."""
    size = path.stat().st_size if path.exists() else 0
    if path.exists():
        os.truncate(path, size // 2)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("failing", ["segmentation.seg.nrrd", "report.md"])
def test_disk_full_while_writing_keeps_the_earlier_results(phantom_path, tmp_path, monkeypatch, capsys, failing):
    """The write of the first file (seg.nrrd) or of the last one (report.md, after the others
    were staged) runs out of space: the folder keeps the earlier run's files byte for byte."""
    out = tmp_path / "out"
    before = _earlier_run(phantom_path, out)
    capsys.readouterr()
    if failing == "segmentation.seg.nrrd":
        import nrrd

        real = nrrd.write

        def full_disk(filename, *args, **kwargs):
            real(filename, *args, **kwargs)
            _half_then_enospc(Path(filename))

        monkeypatch.setattr(nrrd, "write", full_disk)
    else:
        real_write_text = Path.write_text

        def full_disk_text(self, data, *args, **kwargs):
            if self.name != failing:
                return real_write_text(self, data, *args, **kwargs)
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

        monkeypatch.setattr(Path, "write_text", full_disk_text)
    # This run would write different results (findings too), so a partial commit would show.
    status = main(["-q", "run", str(phantom_path), "-o", str(out), "--stages", "lungs,findings"])
    assert status == EXIT_USER_ERROR
    err = _one_line_error(capsys)
    assert "No space left on device" in err and failing in err
    assert _files(out) == before
    assert _leftovers(out) == []


def test_disk_full_is_found_before_any_work(phantom_path, tmp_path, monkeypatch, capsys):
    """The probe write of the output folder fails: refused before the CT is even read."""
    out = tmp_path / "out"
    before = _earlier_run(phantom_path, out)
    capsys.readouterr()
    import CovidCTDxLib.io.readers as readers

    read = []
    monkeypatch.setattr(readers, "read_ct", lambda *a, **k: read.append(a) or pytest.fail("CT read before the output check"))

    def fsync_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync_full)
    assert main(["-q", "run", str(phantom_path), "-o", str(out)] + FAST) == EXIT_USER_ERROR
    err = _one_line_error(capsys)
    assert "Cannot write into" in err and "No space left on device" in err
    assert read == [] and _files(out) == before and _leftovers(out) == []


# --------------------------------------------------------------------------- real small file systems
_NAMESPACE_SCRIPT = """
import contextlib, hashlib, io, json, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from CovidCTDxLib.app.cli import main

root = Path({root!r})
subprocess.run(["mount", "-t", "tmpfs", "-o", "size={size}", "tmpfs", str(root)], check=True)
out = root / "out"
report = {{}}

def run(*extra):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["-q", "run", {ct!r}, "-o", str(out), *extra])
    return status, err.getvalue().strip()

def digest():
    return {{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}} if out.exists() else {{}}

{body}
report["entries"] = sorted(p.name for d in (root, out) if d.exists() for p in d.iterdir())
print(json.dumps(report))
"""


def _in_private_tmpfs(tmp_path: Path, phantom_path: Path, size: str, body: str) -> dict:
    """Run ``body`` as root of a private user+mount namespace with a tmpfs of ``size`` at
    ``tmp_path/fs`` (gone with the namespace); skip where such namespaces are not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) on this machine")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user/mount namespaces are not allowed here: " + probe.stderr.decode(errors="replace").strip())
    root = tmp_path / "fs"
    root.mkdir()
    script = _NAMESPACE_SCRIPT.format(repo=str(REPO), root=str(root), size=size, ct=str(phantom_path),
                                      body=textwrap.dedent(body))
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "mount" in proc.stderr and "Traceback" in proc.stderr and "tmpfs" in proc.stderr:
        pytest.skip("cannot mount a tmpfs here: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_real_full_disk_keeps_the_earlier_results(phantom_path, tmp_path):
    """A small tmpfs: the first run fits; the disk then fills up (another program's file)
    until less than the results but more than the probe is free. The second run fails with
    one line while writing, and the first run's files are still there, unchanged."""
    body = """
    report["first"] = run("--stages", "lungs")
    report["before"] = digest()
    st = os.statvfs(root)
    free = st.f_bavail * st.f_frsize
    keep = 96 * 1024  # > the 64 KiB probe, < the second run's files (the full pipeline's)
    with open(root / "other_program.bin", "wb") as f:
        f.write(b"x" * max(0, free - keep))
    report["second"] = run()
    report["after"] = digest()
    """
    r = _in_private_tmpfs(tmp_path, phantom_path, "4m", body)
    assert r["first"][0] == 0, r["first"]
    status, err = r["second"]
    assert status == EXIT_USER_ERROR, r
    assert err.startswith("covidctdx: error:") and "\n" not in err and "No space left on device" in err, err
    assert "Writing " in err, "the probe passed: the disk must fill up while the results are written"
    assert r["after"] == r["before"] and "results.json" in r["before"]
    assert not [e for e in r["entries"] if e.startswith(".covidctdx") or ".partial" in e], r["entries"]


def test_read_only_output_folder_is_refused_before_any_work(phantom_path, tmp_path):
    """An output file system mounted read-only (as root ignores permission bits, this is the
    unwritable folder every user meets): one line, exit 2, the earlier results untouched."""
    body = """
    report["first"] = run("--stages", "lungs")
    report["before"] = digest()
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    import CovidCTDxLib.io.readers as readers
    reads = []
    readers.read_ct = lambda *a, **k: reads.append(a)
    report["second"] = run()
    report["ct_read"] = bool(reads)
    report["after"] = digest()
    """
    r = _in_private_tmpfs(tmp_path, phantom_path, "8m", body)
    assert r["first"][0] == 0, r["first"]
    status, err = r["second"]
    assert status == EXIT_USER_ERROR, r
    assert err.startswith("covidctdx: error:") and "Read-only file system" in err and "Choose" in err, err
    assert r["ct_read"] is False, "the folder must be checked before the CT is read"
    assert r["after"] == r["before"]


# --------------------------------------------------------------------------- SIGKILL
_KILLED_WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import nrrd
from CovidCTDxLib.app.cli import main

real = nrrd.write

def stalls_half_written(filename, *args, **kwargs):
    real(filename, *args, **kwargs)
    path = Path(filename)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    print("HALF-WRITTEN", filename, flush=True)
    time.sleep(600)

nrrd.write = stalls_half_written
main(["-q", "run", {ct!r}, "-o", {out!r}, "--stages", "lungs,findings"])
"""


def test_sigkill_while_writing_leaves_no_half_written_output(phantom_path, tmp_path):
    """A run killed by SIGKILL in the middle of writing its segmentation: the folder keeps
    the earlier results; the next run is not blocked by the dead run's lock and removes its
    staging folder."""
    out = tmp_path / "out"
    before = _earlier_run(phantom_path, out)
    script = _KILLED_WRITER.format(repo=str(REPO), ct=str(phantom_path), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("HALF-WRITTEN"), line
        half = Path(line.split(maxsplit=1)[1].strip())
        assert half.exists() and half.stat().st_size > 0  # really half a file on disk at the kill
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _files(out) == before
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".covidctdx-staging-")]  # the dead run's
    assert main(["-q", "run", str(phantom_path), "-o", str(out)] + FAST) == 0
    assert _files(out).keys() == before.keys() and _leftovers(out) == []


def test_background_worker_killed_mid_run_writes_nothing(phantom_path, tmp_path):
    """The Slicer module's worker process killed by SIGKILL during the pipeline: no output
    file, the job reports failure, and there is no result to put into a scene."""
    from CovidCTDxLib.app.worker import FAILED, WorkerJob
    from CovidCTDxLib.errors import CovidCTDxError
    from CovidCTDxLib.io.readers import read_ct
    from CovidCTDxLib.pipeline import PipelineOptions

    job = WorkerJob(read_ct(phantom_path), PipelineOptions(stages=("lungs", "findings")), work_dir=tmp_path / "job").start()
    try:
        deadline = time.monotonic() + 300
        while job.fraction < 0.2 and not job.finished and time.monotonic() < deadline:
            job.poll()
            time.sleep(0.05)
        assert not job.finished and job.fraction >= 0.2, (job.state, job.fraction, job.error)
        os.killpg(job._proc.pid, signal.SIGKILL)  # from outside, not job.cancel()
        assert job.wait(timeout=60) == FAILED
    finally:
        job.cleanup()
    assert job.returncode == -signal.SIGKILL
    out = job.output_dir
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))
    with pytest.raises(CovidCTDxError):
        job.result()


# --------------------------------------------------------------------------- NaN, corrupt, wrong weights
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_nan_voxels_are_refused(phantom_path, tmp_path, capsys, suffix):
    """One NaN voxel would poison every sum; ITK's NIfTI reader would even turn it into 0."""
    image = sitk.ReadImage(str(phantom_path), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[30, 80, 80] = np.nan
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(image)
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(nan_image, str(path))
    out = tmp_path / "out"
    assert main(["-q", "run", str(path), "-o", str(out)]) == EXIT_USER_ERROR
    assert "1 NaN or infinite value(s)" in _one_line_error(capsys)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_ct_file_is_refused(phantom_path, tmp_path, capsys, damage):
    data = phantom_path.read_bytes()
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:200] + os.urandom(4000))
    out = tmp_path / "out"
    assert main(["-q", "run", str(bad), "-o", str(out)]) == EXIT_USER_ERROR
    _one_line_error(capsys)
    assert not out.exists() or not any(out.iterdir())


def test_weights_of_the_wrong_model_are_refused(phantom_path, tmp_path, capsys):
    """RACNet's checkpoint (with its own sidecars) put where DeepSC-COVID's belongs."""
    weights = tmp_path / "weights"
    weights.mkdir()
    src = REPO / "Resources" / "weights"
    for ext in (".safetensors", ".safetensors.sha256", ".json"):
        shutil.copy(src / f"racnet_demo{ext}", weights / f"deepsc_demo{ext}")
    out = tmp_path / "out"
    assert main(["-q", "run", str(phantom_path), "-o", str(out), "--weights", str(weights)]) == EXIT_USER_ERROR
    err = _one_line_error(capsys)
    assert "racnet" in err and "deepsc" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_pickle_checkpoint_as_lung_model_is_refused_unread(phantom_path, tmp_path, capsys):
    import pickle

    model = tmp_path / "lungs.safetensors"
    model.write_bytes(pickle.dumps({"state_dict": [1.0]}))
    out = tmp_path / "out"
    assert main(["-q", "run", str(phantom_path), "-o", str(out), "--lung-model", str(model)]) == EXIT_USER_ERROR
    assert "pickle" in _one_line_error(capsys)
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------- issue 18: every case through the CLI
def _refused(argv, capsys, *needles) -> str:
    assert main(["-q", *argv]) == EXIT_USER_ERROR
    err = _one_line_error(capsys)
    for needle in needles:
        assert needle in err, err
    return err


def _nifti_without_spacing(phantom_path: Path, path: Path, pixdim) -> Path:
    """The phantom as NIfTI with qform/sform codes 0 and the given pixdim (x, y, z)."""
    import struct

    sitk.WriteImage(sitk.ReadImage(str(phantom_path)), str(path))
    header = bytearray(path.read_bytes())
    for i, value in enumerate(pixdim):
        struct.pack_into("<f", header, 80 + 4 * i, value)
    struct.pack_into("<hh", header, 252, 0, 0)
    path.write_bytes(bytes(header))
    return path


@pytest.mark.parametrize("case", ["nifti_z0", "nifti_y_nan", "nrrd_no_spacing"])
def test_unknown_spacing_is_refused_not_taken_as_1mm(phantom_path, tmp_path, capsys, case):
    import nrrd

    if case == "nrrd_no_spacing":
        path = tmp_path / "raw.nrrd"
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_path))).transpose(2, 1, 0)
        nrrd.write(str(path), array, {"encoding": "raw"})
    else:
        pixdim = (2.2, 2.2, 0.0) if case == "nifti_z0" else (2.2, float("nan"), 4.0)
        path = _nifti_without_spacing(phantom_path, tmp_path / "ct.nii", pixdim)
    out = tmp_path / "out"
    _refused(["run", str(path), "-o", str(out)] + FAST, capsys, "spacing is unknown", "--spacing")
    assert not out.exists() or not any(out.iterdir())
    # The explicit override runs, and says where the spacing came from.
    assert main(["-q", "run", str(path), "-o", str(out), "--spacing", "2.2,2.2,4.0"] + FAST) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["input"]["spacing_mm"] == [2.2, 2.2, 4.0]
    assert any("given by the user" in w for w in r["input"]["warnings"])
    assert 4000 < r["lungs"]["right_ml"] + r["lungs"]["left_ml"] < 9000


@pytest.mark.parametrize("fill", ["inf", "all_nan"])
def test_inf_and_all_nan_nifti_are_refused(phantom_path, tmp_path, capsys, fill):
    image = sitk.ReadImage(str(phantom_path), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    if fill == "inf":
        array[30, 80, 80] = -np.inf
    else:
        array[:] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    path = tmp_path / "bad.nii.gz"
    sitk.WriteImage(bad, str(path))
    err = _refused(["run", str(path), "-o", str(tmp_path / "out")] + FAST, capsys, "NaN or infinite value(s)")
    assert ("1 NaN" in err) if fill == "inf" else (f"{array.size} NaN" in err)


def _dicom_series(tmp_path: Path) -> list:
    """A small CT series, its files sorted along the slice normal."""
    import pydicom
    from dicom_factory import write_series
    from test_io import tiny_chest

    folder = tmp_path / "dicom"
    write_series(tiny_chest(shape=(30, 96, 96)), folder)
    return sorted(folder.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def test_dicom_gap_is_refused_by_position_or_resampled_and_recorded(tmp_path):
    from CovidCTDxLib.errors import InputError
    from CovidCTDxLib.io.readers import read_ct

    files = _dicom_series(tmp_path)
    for f in files[12:16]:
        f.unlink()
    with pytest.raises(InputError, match=r"slices are missing: 1 gap.*15\.0 mm") as info:
        read_ct(files[0].parent)
    assert files[11].name in str(info.value) and files[16].name in str(info.value)
    ct = read_ct(files[0].parent, resample_gaps=True)
    assert ct.shape[0] == 30 and ct.spacing[2] == pytest.approx(3.0)
    (gap,) = ct.metadata["resampled_gaps"]
    assert gap["gap_mm"] == pytest.approx(15.0) and gap["files"] == [files[11].name, files[16].name]


@pytest.mark.parametrize("damage", ["garbage_header", "truncated_pixels", "truncated_data_set_at_the_edge"])
def test_damaged_dicom_slice_is_named_before_decoding(tmp_path, caplog, damage):
    """A damaged slice is named; one at the end of the series leaves no gap to give it away."""
    from CovidCTDxLib.errors import InputError
    from CovidCTDxLib.io.readers import read_ct

    files = _dicom_series(tmp_path)
    victim = files[-1] if damage == "truncated_data_set_at_the_edge" else files[15]
    data = victim.read_bytes()
    if damage == "garbage_header":
        victim.write_bytes(os.urandom(400) + data[400:])
    elif damage == "truncated_pixels":
        victim.write_bytes(data[: len(data) * 2 // 3])
    else:
        import struct

        meta_end = 144 + struct.unpack_from("<I", data, 140)[0]  # preamble, DICM, (0002,0000) UL = meta length
        victim.write_bytes(data[: meta_end + 6])  # the file meta survives, the data set is cut off in its first element
    start = time.monotonic()
    with pytest.raises(InputError, match="cannot be read|not readable DICOM") as info:
        read_ct(files[0].parent)
    assert victim.name in str(info.value)
    assert time.monotonic() - start < 5
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]  # the one line names it, no log noise


def test_findings_into_the_runs_own_folder_keeps_the_other_stages(phantom_path, tmp_path):
    out = tmp_path / "run"
    assert main(["-q", "run", str(phantom_path), "-o", str(out)]) == 0
    before = json.loads((out / "results.json").read_text())
    evidence = (out / "evidence.nrrd").read_bytes()
    assert main(["-q", "findings", str(phantom_path), str(out / "segmentation.seg.nrrd"), "-o", str(out)]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["classification"] == before["classification"] and after["severity"] == before["severity"]
    assert after["classification"] is not None and (out / "evidence.nrrd").read_bytes() == evidence
    import nrrd

    names = {v for k, v in nrrd.read_header(str(out / "segmentation.seg.nrrd")).items() if k.endswith("_Name")}
    assert "DeepSC-COVID lesion" in names


def test_segmentation_of_another_scan_is_refused_or_flagged(phantom_path, tmp_path, capsys):
    import nrrd

    out = tmp_path / "run"
    assert main(["-q", "run", str(phantom_path), "-o", str(out), "--stages", "lungs,findings"]) == 0
    data, header = nrrd.read(str(out / "segmentation.seg.nrrd"))
    origin = np.asarray(header["space origin"], dtype=float)
    for name, shift in (("away", (0.0, 0.0, 2000.0)), ("beside", (120.0, 0.0, 0.0))):
        header["space origin"] = origin + np.array(shift)
        nrrd.write(str(tmp_path / f"{name}.seg.nrrd"), data, header)
    capsys.readouterr()
    _refused(["findings", str(phantom_path), str(tmp_path / "away.seg.nrrd"), "-o", str(tmp_path / "f1")], capsys,
             "does not overlap the CT")
    assert main(["-q", "findings", str(phantom_path), str(tmp_path / "beside.seg.nrrd"), "-o", str(tmp_path / "f2")]) == 0
    warned = " ".join(json.loads((tmp_path / "f2" / "results.json").read_text())["input"]["warnings"])
    assert "resampled onto the CT grid" in warned and "aerated lung on this CT" in warned, warned


def test_output_that_is_an_existing_file_is_refused(phantom_path, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    _refused(["run", str(phantom_path), "-o", str(target)] + FAST, capsys, "is a file", "Choose another -o")
    assert target.read_text() == "keep me"


def test_weights_and_lung_model_mistakes_are_refused_in_one_short_line(phantom_path, tmp_path, capsys):
    src = REPO / "Resources" / "weights"
    out = str(tmp_path / "out")
    _refused(["run", str(phantom_path), "-o", out, "--weights", str(tmp_path / "nowhere")], capsys, "Weights folder not found")
    weights = tmp_path / "weights"
    shutil.copytree(src, weights)
    (weights / "deepsc_demo.safetensors.sha256").write_text("not a digest\n")
    _refused(["run", str(phantom_path), "-o", out, "--weights", str(weights)], capsys, "is malformed", "deepsc_demo.safetensors.sha256")
    _refused(["run", str(phantom_path), "-o", out, "--lung-model", str(weights)], capsys, "is a folder, not a weights file")
    err = _refused(["run", str(phantom_path), "-o", out, "--lung-model", str(src / "deepsc_demo.safetensors")], capsys,
                   "does not hold a UNet2D lung model", "deepsc")
    assert len(err) < 400, err
    assert not Path(out).exists() or not any(Path(out).iterdir())


def test_volume_too_coarse_for_lungs_is_refused_and_thick_slices_are_flagged(phantom_path, tmp_path, capsys):
    image = sitk.ReadImage(str(phantom_path))
    coarse = sitk.Resample(image, [8, 8, 8], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [25.0] * 3,
                           image.GetDirection(), -1000)
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nrrd"))
    _refused(["run", str(tmp_path / "coarse.nrrd"), "-o", str(tmp_path / "o1")], capsys, "too coarse to hold lungs")
    thick = sitk.Resample(image, [352, 352, 14], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [1.0, 1.0, 20.0],
                          image.GetDirection(), -1000)
    sitk.WriteImage(sitk.Cast(thick, sitk.sitkInt16), str(tmp_path / "thick.nrrd"))
    assert main(["-q", "run", str(tmp_path / "thick.nrrd"), "-o", str(tmp_path / "o2")] + FAST) == 0
    warnings_ = json.loads((tmp_path / "o2" / "results.json").read_text())["input"]["warnings"]
    assert any("20.0 mm apart" in w for w in warnings_), warnings_


def test_command_line_details(phantom_path, tmp_path, capsys):
    _refused(["run", str(phantom_path), "-o", str(tmp_path / "o"), "--stages", ""], capsys, "No stage given")
    # -q after the subcommand silences the progress; stage names as users type them.
    assert main(["run", str(phantom_path), "-o", str(tmp_path / "o"), "-q", "--stages", "Lungs, DeepSC"]) == 0
    err = capsys.readouterr().err
    assert "%" not in err, err
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r["classification"] is not None and r["findings"] is None
    for argv in (["train", "--help"], ["run", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--lesion-source" in help_text and "(default: auto)" in " ".join(help_text.split())
    # The phantom's --shape is x,y,z like --spacing.
    assert main(["phantom", str(tmp_path / "p.nrrd"), "--shape", "100,120,40", "--spacing", "2,2,5"]) == 0
    image = sitk.ReadImage(str(tmp_path / "p.nrrd"))
    assert image.GetSize() == (100, 120, 40) and image.GetSpacing() == (2.0, 2.0, 5.0)


def test_second_run_into_a_locked_folder_is_refused(phantom_path, tmp_path, capsys):
    out = tmp_path / "out"
    holder = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from CovidCTDxLib.io.output_folder import OutputFolder
        with OutputFolder({str(out)!r}):
            print("LOCKED", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "LOCKED"
        _refused(["run", str(phantom_path), "-o", str(out)] + FAST, capsys, "being written by another covidctdx run",
                 f"PID {proc.pid}")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert main(["-q", "run", str(phantom_path), "-o", str(out)] + FAST) == 0  # the lock died with its holder
