"""Golden test of the shipped model: the shipped sample, segmented with the shipped weights by
``paraspinalseg segment``, must give the stored label map and measurement table (``golden/``).

Tolerances per structure (``tools/make_golden.py``): at most 1 % of the structure's reference pixels (at
least 3) may change label; CSA, functional CSA and threshold within 1 %; fat % within 0.5 points; found,
method, the canal's stenosis grade and the QC verdict exactly. A change that moves the result on purpose regenerates the reference with
``python tools/make_golden.py`` in the same commit.
"""

from __future__ import annotations


import pytest

def test_shipped_model_on_the_sample_matches_the_golden_reference(tmp_path, load_tool):
    pytest.importorskip("torch")
    pytest.importorskip("slicer")
    golden = load_tool("make_golden")
    if not golden.SAMPLE.is_file():
        pytest.skip("the shipped sample is not in this checkout")
    labels, table = golden.segment_sample(tmp_path)
    problems = golden.compare(labels, golden.read_table(table))
    assert not problems, "the shipped model's result on the sample moved:\n" + "\n".join(problems)


def test_the_comparison_sees_a_moved_result(tmp_path, load_tool):
    """The tolerances are tight enough to catch a one-pixel-wide shift of a muscle's border."""
    import numpy as np

    golden = load_tool("make_golden")
    ref = np.load(golden.GOLDEN_DIR / golden.LABELS_FILE)["labels"]
    table = golden.read_table(golden.GOLDEN_DIR / golden.TABLE_FILE)
    assert golden.compare(ref, table) == []
    moved = ref.copy()
    moved[np.roll(ref == 6, 1, axis=1)] = 6  # left multifidus one pixel wider on one side
    assert any("left multifidus" in p for p in golden.compare(moved, table))
    table[5]["Fat (%)"] = str(float(table[5]["Fat (%)"] or 0) + 1.0)
    assert any("fat %" in p for p in golden.compare(ref, table))
    table = golden.read_table(golden.GOLDEN_DIR / golden.TABLE_FILE)
    canal = next(r for r in table if r["Segment ID"] == "spinal_canal")
    canal["Stenosis grade"], table[0]["QC"] = "relative", "check: implausible area"
    problems = golden.compare(ref, table)
    assert any("spinal_canal Stenosis grade" in p for p in problems) and any(" QC:" in p for p in problems)
