"""Names, colours and standard codes of the segmentation classes, in 3D Slicer's terminology format.

A class key is "<dataset>/<class>" (e.g. "ACDC/LV"). Each known class has a human-readable name, a
display colour and DICOM/SNOMED-CT codes, so a segment carries a machine-readable meaning that
survives export to DICOM SEG, not just a free-text name.

Codes come from DICOM PS3.16 context groups as shipped with 3D Slicer's terminology files: anatomy
from CID 7152/7154 (SegmentationCategoryTypeModifier-DICOM-Master.json), brain tumour sub-regions
from CID 7168/7169 (Brain Lesion Segmentation Types: necrosis, edema, non-enhancing and enhancing
lesion), anatomic regions from AnatomicRegionAndModifier-DICOM-Master.json. Two classes have no
exact concept there: left-ventricular myocardium is coded as Myocardium in the region Left Ventricle,
and COVID-19 infection (ground-glass opacity + consolidation) as Lesion in the region Lung.

Myocardium and the tumour sub-regions are not in Slicer's built-in lists, so the extension ships
`Resources/Terminology/VLDUN.term.json` (the content of `terminology_context()`); the Slicer module
loads it with `slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(TERMINOLOGY_FILE))`
so the Segment Editor's terminology selector knows every class. To regenerate the file after editing
the table: `json.dump(terminology_context(), open(TERMINOLOGY_FILE, "w"), indent=2)`.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTEXT_NAME = "Segmentation category and type - VLDUN"
ANATOMIC_CONTEXT_NAME = "Anatomic codes - DICOM master list"
TERMINOLOGY_FILE = Path(__file__).resolve().parent.parent / "Resources" / "Terminology" / "VLDUN.term.json"
SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"

DEFAULT_ENTRY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^"
)
"""Slicer's own default for a new segment (generic "Tissue"): used for classes the table lacks."""


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM "code sequence" triple)."""

    scheme: str
    value: str
    meaning: str

    def serialized(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    def as_json(self) -> dict[str, str]:
        return {"CodingSchemeDesignator": self.scheme, "CodeValue": self.value, "CodeMeaning": self.meaning}


def sct(value: str, meaning: str) -> Code:
    """A SNOMED-CT concept."""
    return Code("SCT", value, meaning)


ANATOMY = sct("123037004", "Anatomical Structure")
ALTERED = sct("49755003", "Morphologically Altered Structure")
BRAIN = sct("12738006", "Brain")
LUNG = sct("39607008", "Lung")
LEFT_VENTRICLE = sct("87878005", "Left Ventricle")


@dataclass(frozen=True)
class ClassTerminology:
    """What a segment of one class looks like and means."""

    name: str
    rgb: tuple[int, int, int]
    """0-255, as in Slicer's terminology files."""
    category: Code
    type: Code
    region: Code | None = None
    """Anatomic region, for concepts that need a location (a lesion in the lung)."""

    @property
    def color(self) -> tuple[float, float, float]:
        """0-1, as vtkSegment.SetColor takes it."""
        return (self.rgb[0] / 255, self.rgb[1] / 255, self.rgb[2] / 255)

    @property
    def entry(self) -> str:
        """The terminology entry string Slicer stores in the segment's "TerminologyEntry" tag.

        Format of vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry: context~category~type~
        type modifier~anatomic context~region~region modifier, each code as scheme^value^meaning.
        """
        no_code = "^^"
        region = self.region.serialized() if self.region else no_code
        return "~".join(
            [CONTEXT_NAME, self.category.serialized(), self.type.serialized(), no_code]
            + [ANATOMIC_CONTEXT_NAME, region, no_code]
        )


CLASS_TERMINOLOGY: dict[str, ClassTerminology] = {
    "ACDC/RV": ClassTerminology("right ventricle cavity", (65, 105, 225), ANATOMY, sct("53085002", "Right ventricle")),
    "ACDC/MYO": ClassTerminology(
        "left ventricle myocardium", (60, 179, 113), ANATOMY, sct("74281007", "Myocardium"), LEFT_VENTRICLE
    ),
    "ACDC/LV": ClassTerminology("left ventricle cavity", (220, 60, 60), ANATOMY, sct("87878005", "Left ventricle")),
    "BraTS2015/necrosis": ClassTerminology("necrosis", (216, 191, 216), ALTERED, sct("6574001", "Necrosis"), BRAIN),
    "BraTS2015/edema": ClassTerminology("edema", (140, 224, 228), ALTERED, sct("79654002", "Edema"), BRAIN),
    "BraTS2015/non_enhancing": ClassTerminology(
        "non-enhancing tumour", (144, 238, 144), ALTERED, Code("NCIt", "C81175", "Non-Enhancing Lesion"), BRAIN
    ),
    "BraTS2015/enhancing": ClassTerminology(
        "enhancing tumour", (255, 215, 0), ALTERED, Code("NCIt", "C113842", "Enhancing Lesion"), BRAIN
    ),
    "BraTS2018/whole_tumor": ClassTerminology(
        "tumour, sub-region not distinguished", (205, 92, 92), ALTERED, sct("108369006", "Neoplasm"), BRAIN
    ),
    "COVID19CT/infection": ClassTerminology(
        "COVID-19 lung infection", (255, 140, 0), ALTERED, sct("52988006", "Lesion"), LUNG
    ),
    "AbdomenCT/liver": ClassTerminology("liver", (221, 130, 101), ANATOMY, sct("10200004", "Liver")),
    "AbdomenCT/spleen": ClassTerminology("spleen", (157, 108, 162), ANATOMY, sct("78961009", "Spleen")),
    "AbdomenCT/kidney": ClassTerminology("kidney", (185, 102, 83), ANATOMY, sct("64033007", "Kidney")),
}
"""Colours: Slicer's GenericAnatomyColors (liver, spleen, kidney, necrosis, edema; the non-enhancing
tumour takes its Neoplasm green) where they keep a dataset's classes apart. BraTS 2018's labels mark the whole
tumour without sub-regions; in the brain-tumour task that class sits beside BraTS 2015's four, so it is named
for what it is there: tumour whose sub-region the model did not tell. The ACDC structures, three
near-identical browns in Slicer, are blue, green and red; the enhancing tumour is gold."""

_BY_CLASS_NAME = {key.split("/")[-1].lower(): term for key, term in CLASS_TERMINOLOGY.items()}


def _known(key: str) -> ClassTerminology | None:
    """Exact key first, then the class part alone, so "FLARE22/liver" is still a liver."""
    return CLASS_TERMINOLOGY.get(key) or _BY_CLASS_NAME.get(key.split("/")[-1].lower())


def display_name(key: str) -> str:
    """Human-readable class name; unknown keys read as their class part ("X/left_lung" -> "left lung")."""
    known = _known(key)
    return known.name if known else key.split("/")[-1].replace("_", " ")


def fallback_color(index: int) -> tuple[float, float, float]:
    """Golden-ratio hue steps: consecutive indices get far-apart hues, so unknown classes stay distinguishable."""
    return colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.65, 0.95)


def segment_style(key: str, index: int) -> tuple[str, tuple[float, float, float], str]:
    """(name, colour 0-1, terminology entry) of a class; `index` picks the colour of an unknown class."""
    known = _known(key)
    if known:
        return known.name, known.color, known.entry
    return display_name(key), fallback_color(index), DEFAULT_ENTRY


def _type_json(term: ClassTerminology) -> dict[str, Any]:
    return {**term.type.as_json(), "recommendedDisplayRGBValue": list(term.rgb), "3dSlicerLabel": term.name}


def terminology_context() -> dict[str, Any]:
    """The table as a Slicer terminology context (dcmqi segment-context schema), i.e. VLDUN.term.json."""
    categories: dict[Code, list[ClassTerminology]] = {}
    for term in CLASS_TERMINOLOGY.values():
        categories.setdefault(term.category, []).append(term)
    return {
        "SegmentationCategoryTypeContextName": CONTEXT_NAME,
        "@schema": SCHEMA,
        "SegmentationCodes": {
            "Category": [
                {
                    **category.as_json(),
                    "showAnatomy": any(term.region for term in terms),
                    "Type": [_type_json(term) for term in terms],
                }
                for category, terms in categories.items()
            ]
        },
    }
