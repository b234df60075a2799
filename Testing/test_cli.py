"""End to end: the command-line contract of docs/ARCHITECTURE.md on phantoms and the real scans."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from CovidCTDxLib.app.cli import EXIT_USER_ERROR, main
from CovidCTDxLib.errors import CancelledError
from CovidCTDxLib.io.readers import read_ct
from CovidCTDxLib.io.segmentation_file import read_segmentation, write_segmentation, write_volume
from CovidCTDxLib.pipeline import PipelineOptions, run_pipeline
from CovidCTDxLib.progress import CancelToken
from CovidCTDxLib.result import (
    CLASS_KEYS,
    NOT_FOR_DIAGNOSIS,
    SEVERITY_KEYS,
    SEVERITY_MIN_COVID_PROBABILITY,
    SEVERITY_NOT_APPLICABLE,
)
from CovidCTDxLib.synthetic.phantom import make_phantom

SMALL = dict(shape=(72, 160, 160), spacing=(2.2, 2.2, 4.0))


@pytest.fixture(scope="module")
def covid_phantom(tmp_path_factory):
    ph = make_phantom(kind="covid", severity="moderate", seed=11, **SMALL)
    path = tmp_path_factory.mktemp("ph") / "covid.nrrd"
    write_volume(ph.ct, path)
    return ph, path


@pytest.fixture(scope="module")
def full_run(covid_phantom, tmp_path_factory):
    ph, path = covid_phantom
    out = tmp_path_factory.mktemp("out")
    assert main(["-q", "run", str(path), "-o", str(out)]) == 0
    return ph, out, json.loads((out / "results.json").read_text())


def test_run_writes_every_contract_file(full_run):
    _, out, _ = full_run
    for name in ("segmentation.seg.nrrd", "evidence.nrrd", "results.json", "findings.csv", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_results_json_follows_the_contract(full_run):
    ph, _, r = full_run
    assert set(r) >= {"input", "lungs", "classification", "severity", "findings", "provenance", "timings_s"}
    truth_right = ph.right_lung.sum() * ph.ct.voxel_volume_ml
    truth_left = ph.left_lung.sum() * ph.ct.voxel_volume_ml
    assert r["lungs"]["right_ml"] == pytest.approx(truth_right, rel=0.05)
    assert r["lungs"]["left_ml"] == pytest.approx(truth_left, rel=0.05)
    cls = r["classification"]
    assert set(cls["probabilities"]) == set(CLASS_KEYS)
    assert sum(cls["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert cls["label"] in CLASS_KEYS
    assert isinstance(cls["out_of_distribution"], bool) and cls["ood_distance"] >= 0 and cls["ood_threshold"] > 0
    assert cls["out_of_distribution"] == (cls["ood_distance"] > cls["ood_threshold"])
    sev = r["severity"]
    assert set(sev["probabilities"]) == set(SEVERITY_KEYS)
    # A grade only where RACNet calls the scan COVID-19 (issue 19), else "not_applicable".
    assert sev["label"] == (max(sev["probabilities"], key=sev["probabilities"].get)
                            if sev["covid_probability"] >= SEVERITY_MIN_COVID_PROBABILITY else SEVERITY_NOT_APPLICABLE)
    for key in ("lesion_count", "lesion_volume_ml", "lesion_volume_ratio_percent", "peripheral_lesion_ratio_percent", "ct_severity_score"):
        assert r["findings"][key] is not None, key
    for model in ("deepsc", "racnet"):
        prov = r["provenance"][model]
        assert len(prov["weights_sha256"]) == 64
        assert "synthetic" in prov["training_data"].lower()
        assert prov["label"] == NOT_FOR_DIAGNOSIS
    assert r["timings_s"]["total"] > 0


def test_report_and_csv_carry_the_synthetic_label(full_run):
    _, out, _ = full_run
    assert NOT_FOR_DIAGNOSIS in (out / "report.md").read_text()
    header, *rows = [line.split(",") for line in (out / "findings.csv").read_text().splitlines()]
    assert header == ["name", "value", "unit", "definition"]
    assert any(row[0] == "lesion_volume_ratio_percent" for row in rows)


def test_segmentation_has_the_public_segment_ids(full_run):
    ph, out, _ = full_run
    seg = read_segmentation(out / "segmentation.seg.nrrd", ph.ct)
    assert {"right_lung", "left_lung", "lesion", "ggo", "consolidation", "deepsc_lesion"} <= set(seg.masks)
    dice = 2 * (seg.masks["right_lung"] & ph.right_lung).sum() / (seg.masks["right_lung"].sum() + ph.right_lung.sum())
    assert dice > 0.95


def test_synthetic_deepsc_lesions_are_shown_but_findings_use_the_density_engine(full_run):
    """Demo weights never saw a real scan: their lesion mask is its own segment, and the
    findings a clinician reads come from the density engine (validated on real scans)."""
    _, _, r = full_run
    assert r["findings"]["lesion_source"] == "density engine"
    assert r["provenance"]["lesions"]["source"] == "density engine"


def test_lesion_source_deepsc_puts_deepsc_lesions_into_the_findings(covid_phantom, tmp_path):
    ph, path = covid_phantom
    assert main(["-q", "run", str(path), "-o", str(tmp_path), "--stages", "lungs,deepsc,findings", "--lesion-source", "deepsc"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["findings"]["lesion_source"].startswith("DeepSC-COVID")
    seg = read_segmentation(tmp_path / "segmentation.seg.nrrd", ph.ct)
    assert "deepsc_lesion" not in seg.masks  # it *is* the lesion segment
    truth = ph.lesion
    dice = 2 * (seg.masks["lesion"] & truth).sum() / (seg.masks["lesion"].sum() + truth.sum())
    assert dice > 0.3  # DeepSC's own quality is tested on held-out phantoms in test_deepsc_demo.py


def test_stages_not_selected_are_null_with_a_reason(covid_phantom, tmp_path):
    _, path = covid_phantom
    assert main(["-q", "run", str(path), "-o", str(tmp_path), "--stages", "lungs,findings"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["classification"] is None and "not selected" in r["not_run"]["classification"]
    assert r["severity"] is None and "not selected" in r["not_run"]["severity"]
    assert r["findings"]["lesion_source"] == "density engine"
    assert not (tmp_path / "evidence.nrrd").exists()


def test_missing_weights_are_reported_not_invented(covid_phantom, tmp_path):
    _, path = covid_phantom
    empty = tmp_path / "no_weights"
    empty.mkdir()
    assert main(["-q", "run", str(path), "-o", str(tmp_path / "o"), "--weights", str(empty)]) == 0
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r["classification"] is None and "No DeepSC-COVID weights" in r["not_run"]["classification"]
    assert r["severity"] is None and "No RACNet weights" in r["not_run"]["severity"]


def test_bad_input_gives_one_line_error_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    assert main(["run", str(bad), "-o", str(out)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("covidctdx: error:") and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("covidctdx")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run([str(exe), "run", str(tmp_path / "missing.nrrd")], capture_output=True, text=True)
    assert proc.returncode == EXIT_USER_ERROR
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_cancel_stops_the_pipeline_and_nothing_is_written(covid_phantom, tmp_path):
    ph, _ = covid_phantom
    token = CancelToken()
    messages = []

    def progress(fraction, message):
        messages.append((fraction, message))
        if fraction > 0.1:
            token.cancel()

    with pytest.raises(CancelledError):
        run_pipeline(ph.ct, PipelineOptions(), progress=progress, cancel=token)
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions), "progress must be monotone"


def test_findings_recompute_after_an_edit_halves_the_lesion(full_run, covid_phantom, tmp_path):
    ph, out, r = full_run
    _, ct_path = covid_phantom
    seg = read_segmentation(out / "segmentation.seg.nrrd", ph.ct)
    lesion = seg.masks["lesion"]
    z = np.nonzero(lesion)[0]
    cut = np.median(z)
    # Erase the lesion voxels of the lower half of the lesion slices (like a Segment Editor erase).
    keep = lesion.copy()
    keep[: int(cut)] = False
    ratio = keep.sum() / lesion.sum()
    masks = dict(seg.masks)
    masks["lesion"] = keep
    masks.pop("ggo"), masks.pop("consolidation")
    write_segmentation(ph.ct, masks, tmp_path / "edited.seg.nrrd")
    assert main(["-q", "findings", str(ct_path), str(tmp_path / "edited.seg.nrrd"), "-o", str(tmp_path / "f")]) == 0
    edited = json.loads((tmp_path / "f" / "results.json").read_text())
    assert edited["findings"]["lesion_volume_ml"] == pytest.approx(r["findings"]["lesion_volume_ml"] * ratio, rel=0.01)
    assert edited["classification"] is None


def test_phantom_command_writes_volume_and_truth(tmp_path):
    assert main(["-q", "phantom", str(tmp_path / "p.nii.gz"), "--kind", "cap", "--severity", "mild", "--seed", "3",
                 "--shape", "128,128,48", "--spacing", "2.5,2.5,5", "--truth", str(tmp_path / "t.seg.nrrd")]) == 0
    ct = read_ct(tmp_path / "p.nii.gz")
    assert ct.shape == (48, 128, 128)
    truth = read_segmentation(tmp_path / "t.seg.nrrd", ct)
    assert truth.masks["lesion"].any() and truth.masks["right_lung"].any()


@pytest.mark.realdata
@pytest.mark.slow
def test_whole_pipeline_on_the_real_covid_scan(covid_dicom_dir, tmp_path):
    """JPEG-lossless real COVID-19 DICOM through every stage."""
    assert main(["-q", "run", str(covid_dicom_dir), "-o", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert 1000 < r["lungs"]["right_ml"] < 5000 and 800 < r["lungs"]["left_ml"] < 4500
    assert r["findings"]["lesion_count"] >= 1
    assert 0 < r["findings"]["lesion_volume_ratio_percent"] < 20  # mild disease
    assert r["classification"]["weights"]["label"] == NOT_FOR_DIAGNOSIS


@pytest.mark.slow
def test_whole_pipeline_on_the_real_lung_cancer_scan(a0001_nii, tmp_path):
    assert main(["-q", "run", str(a0001_nii), "-o", str(tmp_path), "--stages", "lungs,findings"]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["lungs"]["right_ml"] > 1000 and r["lungs"]["left_ml"] > 800


@pytest.fixture(scope="module")
def normal_cli_run(tmp_path_factory):
    """`covidctdx phantom --kind normal` with the CLI's defaults, then `covidctdx run` on it."""
    folder = tmp_path_factory.mktemp("normal")
    ct_path = folder / "normal.nrrd"
    assert main(["-q", "phantom", str(ct_path), "--kind", "normal"]) == 0
    assert main(["-q", "run", str(ct_path), "-o", str(folder / "out")]) == 0
    return json.loads((folder / "out" / "results.json").read_text())


@pytest.mark.xfail(strict=True, reason=(
    "measured 2026-12-07: the demo DeepSC-COVID calls this phantom covid19 0.53 (cap 0.46, non_pneumonia 0.01) with the "
    "pipeline's lung masks, but non_pneumonia 0.997 with the phantom's true lungs; the pipeline mask holds ~7100 more "
    "voxels (median HU 35) than the masks the demo weights were trained on, and eroding it does not help, so the demo "
    "classifier needs retraining on pipeline masks (issue 19 item 1)"))
def test_a_cli_default_normal_phantom_is_called_non_pneumonia(normal_cli_run):
    assert normal_cli_run["classification"]["label"] == "non_pneumonia"


def test_a_cli_default_normal_phantom_gets_no_severity_grade_and_no_lesion_reading(normal_cli_run):
    """What does hold for the same run: RACNet does not call it COVID-19, so no grade is shown,
    and the density findings that lead the report read neither a COVID-19 nor a CAP pattern
    (measured: 2 small lesions, 4 mL, "indeterminate")."""
    sev = normal_cli_run["severity"]
    assert sev["covid_probability"] < SEVERITY_MIN_COVID_PROBABILITY and sev["label"] == SEVERITY_NOT_APPLICABLE
    assert normal_cli_run["findings"]["rule_based_reading"]["label"] in ("no_lesions", "indeterminate")
