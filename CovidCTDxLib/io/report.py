"""A short human-readable report (Markdown) of one run, built from results.json content.

Why from the JSON and not the Result: the report then shows exactly what scripts see,
including every "not run" reason and every model's provenance label.
"""
from __future__ import annotations

from typing import Any, Dict, List

from ..result import CLASS_NAMES


def _pct(p: float) -> str:
    return f"{100.0 * p:.1f}%"


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
    lines.append("## Classification (DeepSC-COVID)")
    cls = results.get("classification")
    if cls:
        lines.append(f"**{CLASS_NAMES.get(cls['label'], cls['label'])}** — " + ", ".join(
            f"{CLASS_NAMES.get(k, k)} {_pct(v)}" for k, v in cls["probabilities"].items()))
        lines.append(_weights_line(cls["weights"]))
    else:
        lines.append(f"Not run: {results['not_run'].get('classification', 'no reason recorded')}")
    lines.append("")
    lines.append("## Severity (RACNet)")
    sev = results.get("severity")
    if sev:
        lines.append(f"**{sev['label']}** — " + ", ".join(f"{k} {_pct(v)}" for k, v in sev["probabilities"].items()))
        ood = "yes" if sev["out_of_distribution"] else "no"
        lines.append(f"COVID-19 probability {_pct(sev['covid_probability'])}; out of distribution: {ood}.")
        lines.append(_weights_line(sev["weights"]))
    else:
        lines.append(f"Not run: {results['not_run'].get('severity', 'no reason recorded')}")
    lines.append("")
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
            lines.append(f"Rule-based reading of the findings (shown beside, not instead of, the neural classification): "
                         f"**{reading['label']}** — {'; '.join(reading['reasons'])}")
    else:
        lines.append(f"Not run: {results['not_run'].get('findings', 'no reason recorded')}")
    lines.append("")
    lines.append("## Timings (s)")
    lines.append(", ".join(f"{k} {v:.2f}" for k, v in results["timings_s"].items()))
    lines.append("")
    return "\n".join(lines)
