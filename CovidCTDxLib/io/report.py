"""A short human-readable report (Markdown) of one run, built from results.json content.

Why from the JSON and not the Result: the report then shows exactly what scripts see,
including every "not run" reason and every model's provenance label.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

from ..result import CLASS_NAMES, NOT_ASSESSABLE, SEVERITY_MIN_COVID_PROBABILITY, SEVERITY_NOT_APPLICABLE


def _pct(p: float) -> str:
    return f"{100.0 * p:.1f}%"


def _probabilities(probabilities: Mapping[str, float], names: bool) -> str:
    if names:
        return ", ".join(f"{CLASS_NAMES.get(k, k)} {_pct(v)}" for k, v in probabilities.items())
    return ", ".join(f"{k} {v:.2f}" for k, v in probabilities.items())


def classification_summary(block: Mapping[str, Any], names: bool = False) -> str:
    """One line for a results.json ``classification`` block, used by every front door.

    Why one function: when the scan is out of distribution, "not assessable" must come
    first and the class only as a secondary detail, the same way in the CLI, the report
    and the Slicer panel. ``names`` gives display names and percentages instead of keys.
    """
    label = CLASS_NAMES.get(block["label"], block["label"]) if names else block["label"]
    output = f"{label} ({_probabilities(block['probabilities'], names)})"
    distance, threshold = block.get("ood_distance"), block.get("ood_threshold")
    if block.get("out_of_distribution"):
        return (f"{NOT_ASSESSABLE}: feature distance {distance:.1f} > threshold {threshold:.1f}; "
                f"model output, not a finding: {output}")
    if block.get("out_of_distribution") is None:
        return f"{output}; out-of-distribution check not made (these weights carry no feature statistics)"
    return f"{output}; in distribution (feature distance {distance:.1f} ≤ {threshold:.1f})"


def severity_summary(block: Mapping[str, Any], names: bool = False) -> str:
    """One line for a results.json ``severity`` block: "not assessable" first when RACNet
    flags the scan, "not applicable" when RACNet does not call it COVID-19, else the grade."""
    def number(p: float) -> str:
        return _pct(p) if names else f"{p:.2f}"

    covid_text = f"RACNet COVID-19 probability {number(block.get('covid_probability'))}"
    if block["label"] == SEVERITY_NOT_APPLICABLE:
        output = f"not applicable ({covid_text} < {number(SEVERITY_MIN_COVID_PROBABILITY)})"
    else:
        output = f"{block['label']} ({_probabilities(block['probabilities'], names)}; {covid_text})"
    if block.get("out_of_distribution"):
        return f"{NOT_ASSESSABLE}: far from every training anchor; model output, not a finding: {output}"
    return output


def _weights_line(w: Dict[str, Any]) -> str:
    label = f" **{w['label']}**" if w.get("label") else ""
    return f"Weights: {w['weights_file']} (SHA-256 {w['weights_sha256'][:12]}…), trained on {w['training_data']}.{label}"


def render_report(results: Dict[str, Any]) -> str:
    lines: List[str] = ["# CovidCTDx report", ""]
    src = results["input"]
    lines.append(f"Input: `{src['source']}` — {' × '.join(str(s) for s in src['shape_zyx'])} voxels (z, y, x), "
                 f"spacing {', '.join(f'{s:.2f}' for s in src['spacing_mm'])} mm")
    lines.append("")
    for warning in src.get("warnings", []):
        lines.append(f"> **Input warning:** {warning}")
        lines.append("")
    for gap in src.get("resampled_gaps", []):
        lines.append(f"- slice gap of {gap['gap_mm']:.1f} mm between {gap['from_mm']:.1f} and {gap['to_mm']:.1f} mm "
                     f"({', '.join(gap['files'])}) interpolated")
    if src.get("resampled_gaps"):
        lines.append("")
    labels = {p.get("label") for p in results["provenance"].values() if isinstance(p, dict) and p.get("label")}
    for label in sorted(labels):
        lines.append(f"> **WARNING: model outputs below come from weights trained on {label}.**")
        lines.append("")
    lungs = results.get("lungs")
    lines.append("## Lungs")
    if lungs:
        lines.append(f"Right {lungs['right_ml']:.0f} mL, left {lungs['left_ml']:.0f} mL (method: {lungs['method']}).")
        if lungs.get("weights"):
            lines.append(_weights_line(lungs["weights"]))
    else:
        lines.append("Not run.")
    lines.append("")
    _findings_section(results, lines)
    lines.append("## Neural models (secondary to the findings above)")
    lines.append("")
    lines.append("### Classification (DeepSC-COVID)")
    cls = results.get("classification")
    if cls:
        lines.append(classification_summary(cls, names=True))
        lines.append("")
        lines.append(_weights_line(cls["weights"]))
    else:
        lines.append(f"Not run: {results['not_run'].get('classification', 'no reason recorded')}")
    lines.append("")
    lines.append("### Severity (RACNet)")
    sev = results.get("severity")
    if sev:
        lines.append(severity_summary(sev, names=True))
        lines.append("")
        lines.append(_weights_line(sev["weights"]))
    else:
        lines.append(f"Not run: {results['not_run'].get('severity', 'no reason recorded')}")
    lines.append("")
    lines.append("## Timings (s)")
    lines.append(", ".join(f"{k} {v:.2f}" for k, v in results["timings_s"].items()))
    lines.append("")
    return "\n".join(lines)


def _findings_section(results: Dict[str, Any], lines: List[str]) -> None:
    """The lesion findings and their rule-based reading. They lead the report because a reader
    can check them against the lesion mask (by default from the density engine, validated on
    real scans), while the neural outputs may not be assessable for the scan at all."""
    lines.append("## Findings")
    f = results.get("findings")
    if f:
        lines.append(f"Lesions from: {f.get('lesion_source')}")
        lines.append("")
        lines.append("| metric | value |")
        lines.append("|---|---|")
        for key, unit in (("lesion_count", ""), ("lesion_volume_ml", " mL"), ("lesion_volume_ratio_percent", " %"),
                          ("peripheral_lesion_ratio_percent", " %"), ("ct_severity_score", "")):
            value = f.get(key)
            lines.append(f"| {key} | {'–' if value is None else (f'{value:.2f}' if isinstance(value, float) else value)}{unit} |")
        reading = f.get("rule_based_reading")
        if reading:
            lines.append("")
            lines.append(f"Rule-based reading of the findings: **{reading['label']}** — {'; '.join(reading['reasons'])}")
    else:
        lines.append(f"Not run: {results['not_run'].get('findings', 'no reason recorded')}")
    lines.append("")
