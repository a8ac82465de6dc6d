"""The anatomy table: the label values of DESIGN.md, consistent pairs and sides, codes for all nine."""

import json
from pathlib import Path

from ParaspinalSegLib import anatomy

TERM_FILE = Path(__file__).parents[2] / "Resources" / "SegmentationCategoryTypeModifier-ParaspinalSeg.term.json"


def test_values_names_and_muscles_match_design() -> None:
    expected = {
        1: ("intervertebral disc", False), 2: ("spinal canal", False), 3: ("lamina", False),
        4: ("left psoas major", True), 5: ("right psoas major", True),
        6: ("left multifidus", True), 7: ("right multifidus", True),
        8: ("left erector spinae", True), 9: ("right erector spinae", True),
    }
    assert {s.value: (s.name, s.is_muscle) for s in anatomy.STRUCTURES} == expected
    assert anatomy.NUM_CLASSES == 10 and anatomy.NOT_ANNOTATED == 255 and anatomy.BACKGROUND == 0
    assert anatomy.MUSCLE_VALUES == (4, 5, 6, 7, 8, 9)
    assert len({s.key for s in anatomy.STRUCTURES}) == 9
    assert len({s.color for s in anatomy.STRUCTURES}) == 9  # every segment is told apart on screen
    assert all(0 <= c <= 1 for s in anatomy.STRUCTURES for c in s.color)


def test_left_right_pairs_are_mutual_and_named_by_side() -> None:
    for s in anatomy.STRUCTURES:
        if s.side is None:
            assert s.mirror is None and s.modifier_code is None
            continue
        partner = anatomy.BY_VALUE[s.mirror]
        assert partner.mirror == s.value and partner.type_code == s.type_code
        assert {s.side, partner.side} == {"left", "right"}
        assert s.name.startswith(s.side)
        assert s.modifier_code == (anatomy.LEFT if s.side == "left" else anatomy.RIGHT)
    assert anatomy.MUSCLE_PAIRS == ((4, 5), (6, 7), (8, 9))
    swap = anatomy.LEFT_RIGHT_SWAP
    assert swap == (0, 1, 2, 3, 5, 4, 7, 6, 9, 8)
    assert all(swap[swap[v]] == v for v in range(anatomy.NUM_CLASSES))


def test_codes_present_for_all_nine_and_in_the_shipped_terminology() -> None:
    doc = json.loads(TERM_FILE.read_text())
    types = {t["CodeValue"]: t for t in doc["SegmentationCodes"]["Category"][0]["Type"]}
    for s in anatomy.STRUCTURES:
        scheme, code, meaning = s.type_code
        assert scheme == "SCT" and code.isdigit() and meaning
        assert types[code]["CodeMeaning"] == meaning
        parts = s.terminology.split("~")
        assert parts[0] == anatomy.TERMINOLOGY_CONTEXT and parts[2] == f"SCT^{code}^{meaning}"
        assert parts[3] == ("^^" if s.side is None else "^".join(s.modifier_code))


def test_lookup_by_value_and_key() -> None:
    assert anatomy.structure(6).key == "multifidus_left"
    assert anatomy.structure("erector_spinae_right").value == 9
    try:
        anatomy.structure(10)
    except KeyError as err:
        assert "known" in str(err)
    else:
        raise AssertionError("value 10 must not resolve")
