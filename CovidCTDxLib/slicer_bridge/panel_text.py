"""The texts the module panel shows, built from the output nodes and the model cards.

Why in the library and not in the Qt widget: the widget is only checked statically, while this
code runs against real MRML in the test suite, so what a reader sees is tested here.
"""
from __future__ import annotations

import html
import json
from typing import Any, Dict, List, Mapping

from ..io.report import classification_summary, severity_summary
from .segmentation import ATTRIBUTE_PREFIX
from .tables import findings_from_table, reading_from_table, reading_text

#: Findings shown in the one-line summary: (key, label, unit).
SUMMARY_FINDINGS = (
    ("lesion_count", "lesions", ""),
    ("lesion_volume_ml", "lesion volume", " mL"),
    ("lesion_volume_ratio_percent", "LVR", " %"),
    ("peripheral_lesion_ratio_percent", "peripheral", " %"),
)


def _block(table_node) -> Dict[str, Any]:
    """A results.json-style model block from a model table's attributes, so the panel words
    the output with the same functions as the CLI and the report."""
    prefix = ATTRIBUTE_PREFIX

    def number(key: str) -> Any:
        value = table_node.GetAttribute(prefix + key)
        return float(value) if value else None

    flag = table_node.GetAttribute(prefix + "out_of_distribution") or ""
    return {
        "label": table_node.GetAttribute(prefix + "label"),
        "probabilities": json.loads(table_node.GetAttribute(prefix + "probabilities") or "{}"),
        "out_of_distribution": None if not flag else flag == "true",
        "ood_distance": number("ood_distance"),
        "ood_threshold": number("ood_threshold"),
        "covid_probability": number("covid_probability"),
    }


def summary_texts(classification_table, severity_table, findings_table) -> Dict[str, str]:
    """One-line texts for the result panel (keys: classification, severity, metrics, reading,
    provenance), read back from the output nodes; "–" where a stage did not run."""
    text = {"classification": "–", "severity": "–", "metrics": "–", "reading": "–", "provenance": ""}
    prefix = ATTRIBUTE_PREFIX
    if classification_table is not None and classification_table.GetAttribute(prefix + "label"):
        text["classification"] = classification_summary(_block(classification_table), names=True)
        if classification_table.GetAttribute(prefix + "weights.label"):
            text["provenance"] = classification_table.GetAttribute(prefix + "weights.label")
    if severity_table is not None and severity_table.GetAttribute(prefix + "label"):
        text["severity"] = severity_summary(_block(severity_table), names=True)
    findings = findings_from_table(findings_table)
    if findings:
        shown = [f"{label} {findings[key]:.4g}{unit}" for key, label, unit in SUMMARY_FINDINGS
                 if isinstance(findings.get(key), (int, float))]
        text["metrics"] = ", ".join(shown) or "–"
    reading = reading_from_table(findings_table)
    if reading:
        text["reading"] = reading_text(reading)
    return text


def model_cards_html(cards: List[Mapping[str, Any]]) -> str:
    """The model cards as the panel's HTML: architecture, file, training data, metrics, label."""
    parts = []
    for card in cards:
        metrics = ", ".join(f"{k}: {v}" for k, v in (card.get("metrics") or {}).items())
        parts.append(
            f"<p><b>{html.escape(str(card.get('architecture')))}</b> ({html.escape(str(card.get('file')))})<br>"
            f"Trained on: {html.escape(str(card.get('training_data', 'unknown')))}<br>"
            + (f"Metrics: {html.escape(metrics)}<br>" if metrics else "")
            + (f"<span style='color:#c00'>{html.escape(str(card['label']))}</span>" if card.get("label") else "")
            + "</p>"
        )
    return "".join(parts)
