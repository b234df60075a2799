"""Segment definitions shared by the seg.nrrd writer and the Slicer bridge.

Why one table: a segment must carry the same ID, name, colour and terminology whether it
was written by the CLI or created in a Slicer scene, so that a seg.nrrd saved from Slicer
reads back into the CLI (``covidctdx findings``) and vice versa. Codes (SNOMED CT) are those of
the terminology file ``Resources/Terminology/CovidCTDx.term.json``.

Colours: the lungs use the colour Slicer's General Anatomy list gives "Lung"
(197, 165, 145). Slicer has no entries for COVID-19 infiltrate, ground glass or
consolidation, so we chose colours that stand out against lung tissue and against each
other in both 2D overlays and 3D: lesion red (216, 101, 79, Slicer's "tumor"-like red),
ground glass yellow (241, 214, 145) and consolidation dark magenta (144, 33, 99).
DeepSC-COVID's own lesion mask, written beside ``lesion`` when the findings use another
lesion source (see pipeline.py), is orange (255, 128, 0).

Consolidation has no SNOMED CT code we could verify here, so it is coded as Infiltrate
(SCT 47351003) without the COVID-19 modifier; its segment name tells it apart. The
terminology file in ``Resources/Terminology`` documents the same choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
COVIDCTDX_CONTEXT = "Segmentation category and type - CovidCTDx"
REGION_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str

    def term(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"


EMPTY_CODE = Code("", "", "")
ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = Code("SCT", "49755003", "Morphologically Altered Structure")
LUNG = Code("SCT", "39607008", "Lung")
TRACHEA_BRONCHUS = Code("SCT", "110726009", "Trachea and bronchus")
INFILTRATE = Code("SCT", "47351003", "Infiltrate")
GROUND_GLASS = Code("SCT", "1217294009", "Ground glass opacity")
RIGHT = Code("SCT", "24028007", "Right")
LEFT = Code("SCT", "7771000", "Left")
COVID19 = Code("SCT", "840539006", "COVID-19")


@dataclass(frozen=True)
class SegmentSpec:
    """One output segment: stable ID, display name, colour (0-255) and terminology."""

    segment_id: str
    name: str
    color: Tuple[int, int, int]
    context: str
    category: Code
    type: Code
    modifier: Code = EMPTY_CODE

    @property
    def color_float(self) -> Tuple[float, float, float]:
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]

    def terminology_entry(self) -> str:
        """Slicer's terminology string (as stored in a segment's TerminologyEntry tag)."""
        return "~".join(
            [
                self.context,
                self.category.term(),
                self.type.term(),
                self.modifier.term(),
                REGION_CONTEXT,
                EMPTY_CODE.term(),
                EMPTY_CODE.term(),
            ]
        )


SEGMENTS: Dict[str, SegmentSpec] = {
    s.segment_id: s
    for s in (
        SegmentSpec("right_lung", "Right lung", (197, 165, 145), ANATOMY_CONTEXT, ANATOMICAL_STRUCTURE, LUNG, RIGHT),
        SegmentSpec("left_lung", "Left lung", (197, 165, 145), ANATOMY_CONTEXT, ANATOMICAL_STRUCTURE, LUNG, LEFT),
        SegmentSpec("airways", "Airways", (178, 222, 248), ANATOMY_CONTEXT, ANATOMICAL_STRUCTURE, TRACHEA_BRONCHUS),
        SegmentSpec("lesion", "Lesion", (216, 101, 79), COVIDCTDX_CONTEXT, ALTERED_STRUCTURE, INFILTRATE, COVID19),
        SegmentSpec("ggo", "Ground glass opacity", (241, 214, 145), COVIDCTDX_CONTEXT, ALTERED_STRUCTURE, GROUND_GLASS),
        SegmentSpec("consolidation", "Consolidation", (144, 33, 99), COVIDCTDX_CONTEXT, ALTERED_STRUCTURE, INFILTRATE),
        SegmentSpec("deepsc_lesion", "DeepSC-COVID lesion", (255, 128, 0), COVIDCTDX_CONTEXT, ALTERED_STRUCTURE, INFILTRATE, COVID19),
    )
}

#: Display order of the output segments.
SEGMENT_ORDER = ("right_lung", "left_lung", "airways", "lesion", "ggo", "consolidation", "deepsc_lesion")
