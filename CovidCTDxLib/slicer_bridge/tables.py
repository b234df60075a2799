"""Table nodes for the classification, severity and findings, each carrying its provenance.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..io.report import classification_summary, severity_summary
from ..io.results import json_safe
from ..result import CLASS_KEYS, CLASS_NAMES, NOT_ASSESSABLE, NOT_FOR_DIAGNOSIS, SEVERITY_KEYS, Provenance
from .geometry import import_vtk
from .segmentation import ATTRIBUTE_PREFIX


# --------------------------------------------------------------------------- tables
def _column(values: Sequence[Any], kind: str, name: str):
    vtk, _ = import_vtk()
    array = vtk.vtkStringArray() if kind == "string" else vtk.vtkDoubleArray()
    array.SetName(name)
    for v in values:
        if kind == "string":
            array.InsertNextValue("" if v is None else str(v))
        else:
            array.InsertNextValue(float("nan") if v is None else float(v))
    return array


def fill_table(table_node, columns: Sequence[Tuple[str, str, str, str]], rows: Sequence[Sequence[Any]]) -> None:
    """Replace a table node's content.

    ``columns``: (name, "string"|"double", unit, description); ``rows``: one value per
    column. Units and descriptions go into the table's schema, so Slicer shows them and
    saves them to the .schema.tsv next to the .tsv.
    """
    table_node.RemoveAllColumns()
    for index, (name, kind, unit, description) in enumerate(columns):
        table_node.AddColumn(_column([row[index] for row in rows], kind, name))
        if unit:
            table_node.SetColumnUnitLabel(name, unit)
        if description:
            table_node.SetColumnDescription(name, description)
    table_node.Modified()


def _table(scene, name: str, columns, rows, attributes: Mapping[str, Any], description: str = ""):
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    fill_table(node, columns, rows)
    for key, value in attributes.items():
        node.SetAttribute(ATTRIBUTE_PREFIX + key, value if isinstance(value, str) else json.dumps(value))
    if description:
        node.SetDescription(description)
    return node


def _provenance_attributes(provenance: Provenance) -> Dict[str, Any]:
    return {f"weights.{k}": v for k, v in provenance.to_dict().items()}


def _provenance_text(provenance: Provenance) -> str:
    text = (
        f"Model {provenance.model}; weights {provenance.weights_file} (SHA-256 {provenance.weights_sha256}); "
        f"trained on {provenance.training_data}; CovidCTDx {provenance.project_version}."
    )
    return f"{text} {NOT_FOR_DIAGNOSIS}." if provenance.not_for_diagnosis else text


def _title(base: str, provenance: Provenance) -> str:
    return f"{base} ({NOT_FOR_DIAGNOSIS})" if provenance.not_for_diagnosis else base


CLASSIFICATION_COLUMNS = (
    ("class", "string", "", "Scan-level class (DeepSC-COVID)"),
    ("key", "string", "", "Machine-readable class key"),
    ("probability", "double", "", "Softmax probability, 0..1"),
    ("predicted", "string", "", "'yes' for the predicted class; 'not assessable' when the scan is out of distribution"),
)
SEVERITY_COLUMNS = (
    ("severity", "string", "", "Severity grade (RACNet)"),
    ("probability", "double", "", "Probability of this grade, 0..1"),
    ("predicted", "string", "", "'yes' for the grade; 'not assessable' when out of distribution; empty when not applicable"),
    ("nearest_anchor_distance", "double", "", "Latent distance to the nearest anchor of this grade (smaller = more typical)"),
)
FINDINGS_COLUMNS = (
    ("name", "string", "", "Metric"),
    ("value", "double", "", "Value (see unit)"),
    ("unit", "string", "", "Unit of the value"),
    ("definition", "string", "", "How the metric is computed"),
)


def _flag(value: Optional[bool]) -> str:
    """Attribute text of a tri-state flag: "true", "false", or "" when the check was not made."""
    return "" if value is None else ("true" if value else "false")


def _assessed(title: str, description: str, ood: Optional[bool], summary: str) -> Tuple[str, str]:
    """Title and description of a model table: an out-of-distribution scan is marked in the
    title and the description starts with the one-line summary, "not assessable" first."""
    if ood:
        title += f" [{NOT_ASSESSABLE.upper()}]"
    return title, f"{summary}. {description}"


def classification_table(scene, classification, name: str):
    mark = "not assessable" if classification.out_of_distribution else "yes"
    rows = [
        (CLASS_NAMES[k], k, classification.probabilities.get(k), mark if k == classification.label else "")
        for k in CLASS_KEYS
    ]
    attributes = {
        "label": classification.label,
        "probabilities": dict(classification.probabilities),
        "out_of_distribution": _flag(classification.out_of_distribution),
        "ood_distance": "" if classification.ood_distance is None else repr(classification.ood_distance),
        "ood_threshold": "" if classification.ood_threshold is None else repr(classification.ood_threshold),
    }
    attributes.update(_provenance_attributes(classification.provenance))
    title, description = _assessed(_title(name, classification.provenance), _provenance_text(classification.provenance),
                                   classification.out_of_distribution, classification_summary(classification.to_dict(), names=True))
    return _table(scene, title, CLASSIFICATION_COLUMNS, rows, attributes, description)


def severity_table(scene, severity, name: str):
    nearest: Dict[str, float] = {}
    for anchor in severity.anchors:
        key = str(anchor.get("class"))
        distance = float(anchor.get("distance", np.nan))
        nearest[key] = min(distance, nearest.get(key, np.inf))
    mark = "not assessable" if severity.out_of_distribution else "yes"
    rows = [
        (k, severity.probabilities.get(k), mark if k == severity.label else "", nearest.get(k))
        for k in SEVERITY_KEYS
    ]
    attributes = {
        "label": severity.label,
        "probabilities": dict(severity.probabilities),
        "covid_probability": severity.covid_probability,
        "out_of_distribution": "true" if severity.out_of_distribution else "false",
        "anchors": list(severity.anchors),
        "slices_used": severity.slices_used,
    }
    attributes.update(_provenance_attributes(severity.provenance))
    title, description = _assessed(_title(name, severity.provenance), _provenance_text(severity.provenance),
                                   severity.out_of_distribution, severity_summary(severity.to_dict(), names=True))
    return _table(scene, title, SEVERITY_COLUMNS, rows, attributes, description)


#: How the panel names the rule-based reading's labels.
READING_NAMES = {
    "covid19_typical": "COVID-19-typical findings",
    "cap_typical": "CAP-typical findings",
    "indeterminate": "indeterminate findings",
    "no_lesions": "no lesions",
}


def findings_rows(findings) -> List[Tuple[str, Optional[float], str, str]]:
    rows = []
    for name, value, unit, definition in findings.rows():
        rows.append((name, None if value is None else float(value), unit or "", definition or ""))
    return rows


def write_findings_table(scene, findings, name: str, table_node=None, reading=None):
    """Fill (or create) a findings table: one row per metric with unit and definition.

    The rule-based reading (``findings.reading.Reading``) rides along as an attribute and in the
    table's description, so the panel shows it next to the neural classification.
    """
    rows = findings_rows(findings)  # evaluated before touching the scene
    reading_dict = reading.to_dict() if reading is not None else None
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    fill_table(table_node, FINDINGS_COLUMNS, rows)
    table_node.SetAttribute(ATTRIBUTE_PREFIX + "findings", json.dumps(json_safe(findings.to_dict())))
    table_node.SetAttribute(ATTRIBUTE_PREFIX + "reading", json.dumps(reading_dict))
    if reading_dict is not None:
        table_node.SetDescription("Rule-based reading: " + reading_text(reading_dict))
    return table_node


def reading_text(reading: Mapping[str, Any]) -> str:
    """One line for a rule-based reading: its label, then the votes behind it."""
    label = READING_NAMES.get(reading["label"], reading["label"])
    reasons = "; ".join(reading.get("reasons") or [])
    return f"{label} — {reasons}" if reasons else label


def reading_from_table(table_node) -> Optional[Dict[str, Any]]:
    """The rule-based reading stored on a findings table, or None."""
    text = table_node.GetAttribute(ATTRIBUTE_PREFIX + "reading") if table_node is not None else None
    return json.loads(text) if text else None


def findings_from_table(table_node) -> Dict[str, Any]:
    """The findings dict stored on a findings table (for summaries)."""
    text = table_node.GetAttribute(ATTRIBUTE_PREFIX + "findings") if table_node is not None else None
    return json.loads(text) if text else {}
