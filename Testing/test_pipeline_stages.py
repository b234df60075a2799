"""The pipeline owns its stages: one stage list, declared dependencies, the reading on Result."""
from __future__ import annotations

import json

import numpy as np
import pytest

from CovidCTDxLib.errors import CovidCTDxError
from CovidCTDxLib.findings.reading import read_findings
from CovidCTDxLib.io.results import results_dict
from CovidCTDxLib.pipeline import PipelineOptions, parse_stages, resolve_stages, run_pipeline
from CovidCTDxLib.result import STAGES
from CovidCTDxLib.synthetic.phantom import make_phantom


def test_stage_names_are_parsed_as_users_type_them():
    assert parse_stages("Lungs, DeepSC") == ("lungs", "deepsc")
    assert parse_stages("findings,lungs") == ("lungs", "findings")  # run order, not typed order
    for bad in ("", " , ", "lungs,lesion"):
        with pytest.raises(CovidCTDxError):
            parse_stages(bad)
    with pytest.raises(CovidCTDxError):
        PipelineOptions(stages=())


def test_dependencies_are_declared_not_silent():
    assert resolve_stages(("findings",)) == (("lungs", "findings"), {"lungs": ["findings"]})
    assert resolve_stages(("deepsc", "racnet")) == (("lungs", "deepsc", "racnet"), {"lungs": ["deepsc", "racnet"]})
    assert resolve_stages(STAGES) == (STAGES, {})


@pytest.fixture(scope="module")
def findings_only_run():
    phantom = make_phantom(kind="covid", severity="moderate", seed=11, shape=(48, 112, 112), spacing=(2.5, 2.5, 5.0))
    return run_pipeline(phantom.ct, PipelineOptions(stages=("findings",)))


def test_findings_without_lungs_runs_lungs_and_says_so(findings_only_run):
    result = findings_only_run
    assert result.lungs is not None and result.findings is not None
    assert result.stages == ["lungs", "findings"]
    payload = json.loads(json.dumps(results_dict(result)))
    assert payload["stages"] == {"run": ["lungs", "findings"], "added_as_dependency": {"lungs": ["findings"]}}


def test_the_reading_is_computed_by_the_pipeline_and_carried_on_result(findings_only_run):
    result = findings_only_run
    assert result.reading is not None
    expected = read_findings(result.findings)
    assert (result.reading.label, result.reading.reasons) == (expected.label, expected.reasons)
    payload = results_dict(result)
    assert payload["findings"]["rule_based_reading"] == result.reading.to_dict()
    result.reading = None  # the writer reports what the pipeline computed, it does not compute it
    assert results_dict(result)["findings"]["rule_based_reading"] is None
    assert np.any(result.lesions.lesion)
