"""The one place that knows the order of the stages.

lungs → zones → DeepSC-COVID (lesions, classification, evidence) → density lesions (when
the findings do not use DeepSC's lesions, and for the GGO/consolidation split) → RACNet
(severity) → findings. Each stage is a pure function of arrays + geometry, so this runs the same in
Slicer's worker process, in the CLI and in tests. A stage that cannot run (not selected,
no weights, depends on a stage that did not run) is recorded in ``Result.skipped`` with the
reason; nothing is invented in its place.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import CovidCTDxError, WeightsError
from .progress import CancelToken, Progress, ProgressCallback
from .result import STAGE_DEPENDENCIES, STAGES, Classification, LesionMasks, Result
from .volume import CTVolume

log = logging.getLogger(__name__)

DEEPSC_WEIGHTS = "deepsc_demo.safetensors"
RACNET_WEIGHTS = "racnet_demo.safetensors"

#: Share of the progress bar each stage gets (sums to 1).
_PROGRESS_SPAN = {"lungs": (0.0, 0.2), "deepsc": (0.2, 0.6), "lesions": (0.6, 0.7), "racnet": (0.7, 0.85), "findings": (0.85, 1.0)}


def parse_stages(text: str) -> Tuple[str, ...]:
    """Stage names from a comma-separated list as users type it ("Lungs, DeepSC"), in run order.

    Case and spaces do not matter; an empty list or an unknown name is refused (an empty
    ``--stages ""`` used to run everything, which is not what anyone typing it meant).
    """
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise CovidCTDxError(f"No stage given; choose one or more of {', '.join(STAGES)}.")
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise CovidCTDxError(f"Unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}.")
    return tuple(s for s in STAGES if s in names)


def resolve_stages(requested: Sequence[str]) -> Tuple[Tuple[str, ...], Dict[str, List[str]]]:
    """The stages to run (requested + their declared dependencies, in run order), and which
    dependencies were added for which requested stages, so the run can say so."""
    added: Dict[str, List[str]] = {}
    chosen = set(requested)
    for stage in requested:
        for needed in STAGE_DEPENDENCIES[stage]:
            if needed not in requested:
                added.setdefault(needed, []).append(stage)
                chosen.add(needed)
    return tuple(s for s in STAGES if s in chosen), added


def default_weights_dir() -> Path:
    """Bundled demo weights: ``$COVIDCTDX_WEIGHTS`` or ``<repo or extension>/Resources/weights``."""
    env = os.environ.get("COVIDCTDX_WEIGHTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "Resources" / "weights"


@dataclass
class PipelineOptions:
    """What to run and with which weights.

    Attributes:
        stages: subset of STAGES. Findings need lungs; the neural stages need lungs too.
        weights_dir: folder holding ``deepsc_*.safetensors`` / ``racnet_*.safetensors``.
        deepsc_weights / racnet_weights: explicit files, overriding ``weights_dir``.
        lung_model: a user's lung U-Net weights (:mod:`CovidCTDxLib.lungs.model_hook`) to use
            instead of the classical lung engine; None keeps the classical engine.
        lesion_source: where the findings' lesion mask comes from. "auto": DeepSC-COVID's
            lesions when it ran with weights trained on real data, else the density engine
            (synthetic-trained demo weights over-segment real scans, while the density
            engine is validated on them; DeepSC's mask is still written as its own
            ``deepsc_lesion`` segment). "deepsc" or "density" force one source.
    """

    stages: Sequence[str] = STAGES
    weights_dir: Optional[Path] = None
    deepsc_weights: Optional[Path] = None
    racnet_weights: Optional[Path] = None
    lung_model: Optional[Path] = None
    lesion_source: str = "auto"

    def __post_init__(self) -> None:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise CovidCTDxError(f"Unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}.")
        if not self.stages:
            raise CovidCTDxError(f"No stage selected; choose one or more of {', '.join(STAGES)}.")
        if self.lesion_source not in ("auto", "deepsc", "density"):
            raise CovidCTDxError(f"lesion_source must be auto, deepsc or density, not {self.lesion_source!r}.")
        # Checked here, before any work: a mistyped path must not run everything and then report "not run".
        if self.weights_dir is not None and not Path(self.weights_dir).is_dir():
            raise WeightsError(f"Weights folder not found: {self.weights_dir} (it is not an existing folder).")
        if self.lung_model is not None:
            from .weights import check_weights_file

            check_weights_file(self.lung_model)

    def weights_path(self, model: str) -> Path:
        explicit = self.deepsc_weights if model == "deepsc" else self.racnet_weights
        if explicit is not None:
            return Path(explicit)
        folder = Path(self.weights_dir) if self.weights_dir else default_weights_dir()
        name = DEEPSC_WEIGHTS if model == "deepsc" else RACNET_WEIGHTS
        candidates = sorted(folder.glob(f"{model}_*.safetensors"))
        preferred = folder / name
        if preferred.exists() or not candidates:
            return preferred
        return candidates[0]


class _Timer:
    def __init__(self, result: Result) -> None:
        self.result = result

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.result.timings_s[stage] = round(time.perf_counter() - start, 3)


def run_pipeline(
    ct: CTVolume,
    options: Optional[PipelineOptions] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> Result:
    """Run the selected stages on a validated CT and return everything they produced.

    Raises CovidCTDxError subclasses for problems the user can act on (no lungs, bad
    weights) and CancelledError when ``cancel`` is set; in both cases no partial Result
    is returned.
    """
    options = options or PipelineOptions()
    ct.validate()
    reporter = Progress(progress, cancel)
    result = Result(ct=ct)
    timer = _Timer(result)
    run_order, result.added_stages = resolve_stages(options.stages)
    result.stages = list(run_order)
    for stage, needed_by in result.added_stages.items():
        log.info("Running %s as a dependency of %s.", stage, ", ".join(needed_by))
    stages = set(run_order)
    start = time.perf_counter()

    # ---------------------------------------------------------------- lungs
    if "lungs" in stages:
        from .lungs.engine import segment_lungs
        from .lungs.zones import compute_zones

        step = reporter.sub(*_PROGRESS_SPAN["lungs"])
        with timer("lungs"):
            model = None
            if options.lung_model is not None:
                from .lungs.model_hook import TorchLungModel

                step(0.0, f"Loading lung model {Path(options.lung_model).name}")
                model = TorchLungModel.from_file(options.lung_model)
            step(0.0, "Masking lungs")
            result.lungs = segment_lungs(ct, progress=step.sub(0.0, 0.85), model=model)
            step(0.85, "Computing lung zones")
            result.zones = compute_zones(ct, result.lungs.right, result.lungs.left)
            step(1.0, "Lungs done")

    # ---------------------------------------------------------------- DeepSC-COVID
    if "deepsc" in stages:
        _run_deepsc(result, options, reporter.sub(*_PROGRESS_SPAN["deepsc"]), timer)
    else:
        result.skipped["classification"] = "DeepSC-COVID stage not selected."

    # ---------------------------------------------------------------- lesions
    if "findings" in stages or result.lesions is not None:
        _finish_lesions(result, options, reporter.sub(*_PROGRESS_SPAN["lesions"]), timer)

    # ---------------------------------------------------------------- RACNet
    if "racnet" in stages:
        _run_racnet(result, options, reporter.sub(*_PROGRESS_SPAN["racnet"]), timer)
    else:
        result.skipped["severity"] = "RACNet stage not selected."

    # ---------------------------------------------------------------- findings
    if "findings" in stages and result.lesions is not None:
        step = reporter.sub(*_PROGRESS_SPAN["findings"])
        from .findings.reading import run_findings_stage

        with timer("findings"):
            step(0.0, "Computing lesion findings")
            run_findings_stage(result)
            step(1.0, "Findings done")
    elif "findings" not in stages:
        result.skipped["findings"] = "Findings stage not selected."
    else:
        result.skipped["findings"] = "No lesion mask: " + result.skipped.get("lesions", "lesions were not computed.")

    result.timings_s["total"] = round(time.perf_counter() - start, 3)
    reporter(1.0, "Done")
    return result


def _load_stage_weights(result: Result, options: PipelineOptions, model: str, output_key: str, title: str, step: Progress):
    """The verified weights of a model stage, or None (with the reason) when there are none."""
    path = options.weights_path(model)
    if not path.exists():
        result.skipped[output_key] = f"No {title} weights at {path}; {output_key} not run."
        return None
    from .weights import load_weights

    step(0.0, f"Loading {title} weights {path.name}")
    return load_weights(path, expected_architecture=model)


def _run_deepsc(result: Result, options: PipelineOptions, step: Progress, timer: _Timer) -> None:
    from .deepsc.inference import run_deepsc

    weights = _load_stage_weights(result, options, "deepsc", "classification", "DeepSC-COVID", step)
    if weights is None:
        return
    with timer("deepsc"):
        output = run_deepsc(result.ct, result.lungs, weights, progress=step.sub(0.05, 1.0))
    probabilities = output.probabilities
    label = max(probabilities, key=probabilities.get)
    result.classification = Classification(label=label, probabilities=probabilities, provenance=output.provenance,
                                           out_of_distribution=output.out_of_distribution,
                                           ood_distance=output.ood_distance, ood_threshold=output.ood_threshold)
    result.lesion_probability = output.lesion_probability
    result.evidence = output.evidence
    result.deepsc_lesion = output.lesion_mask
    use_deepsc = options.lesion_source == "deepsc" or (options.lesion_source == "auto" and not weights.card.synthetic)
    if use_deepsc:
        result.lesions = LesionMasks(lesion=output.lesion_mask, source=f"DeepSC-COVID ({weights.path.name})")


def _finish_lesions(result: Result, options: PipelineOptions, step: Progress, timer: _Timer) -> None:
    """Density lesions when no neural mask; the GGO/consolidation split in any case."""
    from .lesions.density import detect_lesions, split_lesion_types

    with timer("lesions"):
        if result.lesions is None:
            if options.lesion_source == "deepsc":
                result.skipped["lesions"] = "lesion_source=deepsc but DeepSC-COVID did not run."
                return
            step(0.0, "Detecting lesions by density")
            result.lesions = detect_lesions(result.ct, result.lungs, progress=step.sub(0.0, 0.9))
        if result.lesions.ggo is None or result.lesions.consolidation is None:
            step(0.9, "Splitting ground glass and consolidation")
            result.lesions.ggo, result.lesions.consolidation = split_lesion_types(result.ct, result.lesions.lesion)
        step(1.0, "Lesions done")


def _run_racnet(result: Result, options: PipelineOptions, step: Progress, timer: _Timer) -> None:
    from .racnet.inference import run_racnet

    weights = _load_stage_weights(result, options, "racnet", "severity", "RACNet", step)
    if weights is None:
        return
    with timer("racnet"):
        result.severity = run_racnet(result.ct, result.lungs, weights, progress=step.sub(0.05, 1.0))
