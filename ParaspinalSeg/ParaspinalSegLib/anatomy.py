"""The one table of the nine structures ParaspinalSeg segments.

Every other module (network heads, writers, measurements, trainer, terminology file) reads label
values, names, colours, left/right pairs and terminology codes from here; nothing else hard-codes them.
Left and right are always the *patient's*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: Bumped whenever values, IDs or meanings below change; weights record the version they were trained on.
LABEL_TABLE_VERSION = "1"

BACKGROUND = 0
#: Pixels nobody annotated (training data only): ignored by every loss and metric.
NOT_ANNOTATED = 255

#: Name of the terminology context shipped in Resources/SegmentationCategoryTypeModifier-ParaspinalSeg.term.json
TERMINOLOGY_CONTEXT = "Segmentation category and type - ParaspinalSeg"
REGION_CONTEXT = "Anatomic codes - DICOM master list"

#: (scheme, code, meaning) triples.
Code = tuple[str, str, str]

ANATOMICAL_STRUCTURE: Code = ("SCT", "123037004", "Anatomical Structure")
LEFT: Code = ("SCT", "7771000", "Left")
RIGHT: Code = ("SCT", "24028007", "Right")

# Sources of the type codes (Slicer's own terminology files do not have all of them; details and links in
# Resources/TERMINOLOGY.md):
# - Intervertebral disc 360499006: the TotalSegmentator Python package (ADDITIONAL_SNOMED_TYPES["intervertebral_discs"]).
# - Spinal canal 61853006 "Spinal canal structure": AAPM TG-263 "SpinalCanal" as mapped in HL7's mCODE
#   implementation guide (HL7/fhir-mCODE-ig, input/fsh/CM_TG263.fsh).
# - Lamina 277423002: UBERON:0004662 "vertebral lamina" cross-reference SCTID:277423002 (one source only;
#   worth confirming in a SNOMED CT browser).
# - Psoas major 64038003: SegmentationCategoryTypeModifier-TotalSegmentator.term.json.
# - Multifidus 5709001 "Multifidus muscles": HL7 FHIR body-site value set (SNOMED CT body structure),
#   as listed in Boxfusion Health's FHIR RefListBodySite enum (public GitHub source).
# - Erector spinae 44947003: DICOM master list (Slicer's SegmentationCategoryTypeModifier-DICOM-Master.term.json).
DISC_CODE: Code = ("SCT", "360499006", "Intervertebral disc")
SPINAL_CANAL_CODE: Code = ("SCT", "61853006", "Spinal canal")
LAMINA_CODE: Code = ("SCT", "277423002", "Lamina of vertebra")
PSOAS_MAJOR_CODE: Code = ("SCT", "64038003", "Psoas major muscle")
MULTIFIDUS_CODE: Code = ("SCT", "5709001", "Multifidus muscle")
ERECTOR_SPINAE_CODE: Code = ("SCT", "44947003", "Erector spinae muscle")


@dataclass(frozen=True)
class Structure:
    """One segmented structure: its label value and everything shown or written about it."""

    value: int
    #: Stable segment ID in Slicer segmentations and column value in tables (never translated).
    key: str
    #: Display name, also the Slicer segment name.
    name: str
    #: Display colour, RGB in 0..1.
    color: tuple[float, float, float]
    #: Muscles are measured for fat; disc, canal and lamina only for area.
    is_muscle: bool
    #: Patient side ("left"/"right") or None for midline structures.
    side: Optional[str]
    #: Label value of the same structure on the other side (None for midline structures).
    mirror: Optional[int]
    type_code: Code

    @property
    def modifier_code(self) -> Optional[Code]:
        return {"left": LEFT, "right": RIGHT}.get(self.side or "")

    @property
    def terminology(self) -> str:
        """Slicer terminology entry string (category~type~modifier~region context~region~region modifier)."""
        def fmt(code: Optional[Code]) -> str:
            return "^".join(code) if code else "^^"

        return "~".join(
            [
                TERMINOLOGY_CONTEXT,
                fmt(ANATOMICAL_STRUCTURE),
                fmt(self.type_code),
                fmt(self.modifier_code),
                REGION_CONTEXT,
                "^^",
                "^^",
            ]
        )


def _rgb(r: int, g: int, b: int) -> tuple[float, float, float]:
    return (r / 255.0, g / 255.0, b / 255.0)


STRUCTURES: tuple[Structure, ...] = (
    Structure(1, "intervertebral_disc", "intervertebral disc", _rgb(241, 214, 145), False, None, None, DISC_CODE),
    Structure(2, "spinal_canal", "spinal canal", _rgb(111, 184, 210), False, None, None, SPINAL_CANAL_CODE),
    Structure(3, "lamina", "lamina", _rgb(241, 241, 241), False, None, None, LAMINA_CODE),
    Structure(4, "psoas_major_left", "left psoas major", _rgb(192, 104, 88), True, "left", 5, PSOAS_MAJOR_CODE),
    Structure(5, "psoas_major_right", "right psoas major", _rgb(230, 150, 120), True, "right", 4, PSOAS_MAJOR_CODE),
    Structure(6, "multifidus_left", "left multifidus", _rgb(128, 174, 128), True, "left", 7, MULTIFIDUS_CODE),
    Structure(7, "multifidus_right", "right multifidus", _rgb(170, 220, 110), True, "right", 6, MULTIFIDUS_CODE),
    Structure(8, "erector_spinae_left", "left erector spinae", _rgb(145, 60, 170), True, "left", 9, ERECTOR_SPINAE_CODE),
    Structure(9, "erector_spinae_right", "right erector spinae", _rgb(200, 120, 220), True, "right", 8, ERECTOR_SPINAE_CODE),
)

#: Number of structures (foreground classes); the network predicts NUM_CLASSES = 10 including background.
NUM_STRUCTURES = len(STRUCTURES)
NUM_CLASSES = NUM_STRUCTURES + 1

BY_VALUE: dict[int, Structure] = {s.value: s for s in STRUCTURES}
BY_KEY: dict[str, Structure] = {s.key: s for s in STRUCTURES}
MUSCLE_VALUES: tuple[int, ...] = tuple(s.value for s in STRUCTURES if s.is_muscle)

#: Label value permutation that swaps patient left and right (index = old value, entry = new value).
#: Used by left-right flip augmentation; 0 and 1..3 map to themselves, 255 stays 255.
LEFT_RIGHT_SWAP: tuple[int, ...] = tuple(
    BY_VALUE[v].mirror if v in BY_VALUE and BY_VALUE[v].mirror is not None else v for v in range(NUM_CLASSES)
)

#: Left/right muscle pairs (left value, right value), for asymmetry.
MUSCLE_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (s.value, s.mirror) for s in STRUCTURES if s.is_muscle and s.side == "left" and s.mirror is not None
)


def structure(value_or_key: int | str) -> Structure:
    """Look a structure up by label value or key; raises KeyError with the valid choices."""
    table = BY_VALUE if isinstance(value_or_key, int) else BY_KEY
    try:
        return table[value_or_key]  # type: ignore[index]
    except KeyError:
        raise KeyError(f"unknown structure {value_or_key!r}; known: {sorted(table)}") from None
