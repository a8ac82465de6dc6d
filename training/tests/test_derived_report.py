"""Derived labels (training.derive_labels) are kept apart from manual ones in every report figure."""

import csv
import json

import numpy as np
import pytest

from training.compare import compare, main as compare_main, markdown, read_derived_pairs, read_per_slice
from training.data import load_slicer_pair, load_source_folder
from training.report import SLICE_COLUMNS, main as report_main, mean_dice, mean_dice_derived, read_rows, write_report
from training.tests.synthetic import synthetic_slice, tiny_config

MANUAL = (1, 4, 5, 6, 7, 8, 9)


def _rows(derived_dice=0.2, flag=True, cases=6, fold_of=lambda i: i % 2):
    """Evaluator-style rows: 7 manual structures with known Dice, canal and lamina (2, 3) with ``derived_dice``."""
    rows = []
    for i in range(cases):
        for v in MANUAL + (2, 3):
            d = derived_dice if v in (2, 3) else 0.80 + 0.01 * v
            row = {"fold": fold_of(i), "source": "sy_derived", "case_id": f"c{i}", "subject_id": f"s{i}", "structure": v,
                   "dice": d, "hd95_mm": 2.0, "iou": 0.7, "gt_present": True, "pred_present": True, "tp": 1, "fp": 0, "fn": 0}
            if flag:
                row["ground_truth"] = "derived" if v in (2, 3) else "manual"
            rows.append(row)
    return rows


def _write_source(folder, n=2, derived="2;3", trusted="1;2;3;4;5;6;7;8;9", derived_column=True):
    import nibabel as nib

    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        rec = synthetic_slice(32, seed=i)
        case = f"c{i}"
        for kind, arr in (("img", rec.image), ("lbl", rec.labels)):
            nib.save(nib.Nifti1Image(arr[:, :, None], np.diag([-1.0, -1.0, 1.0, 1.0])), str(folder / f"{case}_{kind}.nii.gz"))
        row = {"case_id": case, "subject_id": f"s{i}", "img_file": f"{case}_img.nii.gz", "lbl_file": f"{case}_lbl.nii.gz",
               "trusted_classes": trusted}
        if derived_column:
            row.update(derived="1", derived_classes=derived if i == 0 else "", derived_review="accepted" if i == 0 else "rejected")
        rows.append(row)
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def test_records_know_their_derived_structures(tmp_path):
    recs = load_source_folder(_write_source(tmp_path / "sy_derived"))
    assert recs[0].derived == (2, 3) and recs[1].derived == ()  # the rejected slice derives nothing
    assert recs[0].ground_truth(2) == "derived" and recs[0].ground_truth(6) == "manual"
    assert all(r.derived == () for r in load_source_folder(_write_source(tmp_path / "plain", derived_column=False)))
    with pytest.raises(ValueError, match=r"c0: derived_classes \[2, 3\] are not in trusted_classes"):
        load_source_folder(_write_source(tmp_path / "bad", trusted="1;4;5;6;7;8;9"))


def test_slicer_pairs_derive_nothing(tmp_path):
    from training.tests.test_data import _write_pair

    v, s = _write_pair(tmp_path, [("multifidus_left", "whatever", 1)])
    assert [r.derived for r in load_slicer_pair(v, s)] == [()]


def test_a_poor_derived_structure_leaves_the_manual_headline_unchanged_and_is_labelled(tmp_path):
    rows = _rows(derived_dice=0.2)
    manual_only = [r for r in rows if r["structure"] in MANUAL]
    expected = np.mean([0.80 + 0.01 * v for v in MANUAL])
    assert mean_dice(rows) == pytest.approx(expected) == pytest.approx(mean_dice(manual_only))
    assert mean_dice_derived(rows) == pytest.approx(0.2)

    text = write_report(rows, tmp_path / "r")["report"].read_text()
    assert f"Mean Dice over the 7 manually labelled structures (pooled): **{100 * expected:.1f} %**" in text
    assert "(spinal canal, lamina; pooled): 20.0 %, not part of the headline" in text
    assert "docs/derived-labels.md" in text and "derived by rule" in text
    header = next(l for l in text.splitlines() if l.startswith("| metric"))
    assert "| spinal canal (derived labels) | lamina (derived labels) | mean (derived labels) |" in header
    assert "| mean (manual labels) |" in header and "| intervertebral disc |" in header
    assert f"fold 0: mean Dice {100 * expected:.1f} % (manual labels); 20.0 % (derived labels)" in text
    with open(tmp_path / "r" / "summary.csv", newline="") as f:
        summary = [r for r in csv.DictReader(f) if r["fold"] == "pooled"]
    assert {r["structure"]: r["ground_truth"] for r in summary} == {**{str(v): "manual" for v in MANUAL}, "2": "derived", "3": "derived"}
    back = read_rows(tmp_path / "r")
    assert sum(r["ground_truth"] == "derived" for r in back) == 12 and mean_dice(back) == pytest.approx(expected)


def test_rows_without_the_flag_count_as_manual_and_read_as_before(tmp_path):
    rows = _rows(flag=False)
    nine = np.mean([0.80 + 0.01 * v for v in MANUAL] + [0.2, 0.2])
    assert mean_dice(rows) == pytest.approx(nine) and np.isnan(mean_dice_derived(rows))
    text = write_report(rows, tmp_path / "r")["report"].read_text()
    assert f"Mean Dice over structures (pooled): **{100 * nine:.1f} %**" in text and "derived" not in text
    assert "| intervertebral disc | spinal canal | lamina | left psoas major |" in text and "erector spinae | mean |" in text
    # A per_slice.csv written before the column existed.
    old = tmp_path / "old"
    old.mkdir()
    with open(old / "per_slice.csv", "w", newline="") as f:
        w = csv.DictWriter(f, [c for c in SLICE_COLUMNS if c != "ground_truth"], extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "key": "k"} for r in rows)
    back = read_rows(old)
    assert len(back) == len(rows) and {r["ground_truth"] for r in back} == {"manual"}
    assert mean_dice(back) == pytest.approx(nine) and read_derived_pairs(old) == set()


def test_re_report_marks_derived_rows_from_the_manifest(tmp_path, capsys):
    """A CV scored before the flag existed (the nine-class run) re-reported: headline over the manual structures."""
    from training.splits import SPLITS_FILE

    data = _write_source(tmp_path / "sy_derived", n=2)
    cv = tmp_path / "cv"
    rows = _rows(flag=False, cases=2)  # c0 derives 2 and 3; c1 (rejected) would not be scored on them
    rows = [r for r in rows if not (r["case_id"] == "c1" and r["structure"] in (2, 3))]
    write_report(rows, cv, title="nine-class CV")
    (cv / "cv_metrics.json").write_text(json.dumps({"mean_dice": mean_dice(rows), "k": 2, "folds_run": [0, 1],
                                                    "provenance": {"config_sha256": "x"}}))
    (cv / SPLITS_FILE).write_text("[]")
    assert report_main([str(cv), "--data", str(data), "--out", str(tmp_path / "new")]) == 0
    expected = np.mean([0.80 + 0.01 * v for v in MANUAL])
    assert f"mean Dice {100 * expected:.1f} % over the 7 manually labelled structures" in capsys.readouterr().out
    m = json.loads((tmp_path / "new" / "cv_metrics.json").read_text())
    assert m["mean_dice"] == pytest.approx(expected) and m["mean_dice_derived"] == pytest.approx(0.2)
    assert m["derived_structures"] == [2, 3] and set(m["per_structure"]) == {str(v) for v in MANUAL}
    assert m["provenance"] == {"config_sha256": "x"} and (tmp_path / "new" / SPLITS_FILE).is_file()
    assert "# nine-class CV" in (tmp_path / "new" / "report.md").read_text()
    assert read_derived_pairs(tmp_path / "new") == {("c0", 2), ("c0", 3)}
    assert report_main([str(cv), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "has no manifest.csv" in capsys.readouterr().err


def test_compare_headline_is_over_manual_structures_and_derived_rows_are_marked(tmp_path, capsys):
    rng = np.random.default_rng(0)
    b = {(f"c{i}", v): float(np.clip(0.85 + rng.normal(0, 0.03), 0, 1)) for i in range(30) for v in MANUAL + (2, 3)}
    a = {k: (v - 0.5 if k[1] in (2, 3) else v) for k, v in b.items()}  # A is far worse on the derived structures only
    derived = {k for k in a if k[1] in (2, 3)}
    r = compare(a, b, n_boot=200, derived=derived)
    assert r["difference"] == pytest.approx(0.0) and set(r["structures"]) == set(MANUAL)
    assert r["derived"]["difference"] == pytest.approx(-0.5) and set(r["derived"]["structures"]) == {2, 3}
    assert compare(a, b, n_boot=50)["difference"] == pytest.approx(-1 / 9)  # unflagged: everything counts
    text = markdown(r, "A", "B")
    assert "Mean Dice over the 7 manually labelled structures" in text and "difference +0.0 points" in text
    assert "| spinal canal (derived labels) |" in text and "(spinal canal, lamina), not in the headline" in text

    def write(folder, dice, flag):
        rows = [{"fold": 0, "source": "s", "case_id": c, "subject_id": c, "structure": v, "dice": d, "hd95_mm": 1.0,
                 "iou": 0.5, "gt_present": True, "pred_present": True, "tp": 1, "fp": 0, "fn": 0,
                 **({"ground_truth": "derived" if v in (2, 3) else "manual"} if flag else {})} for (c, v), d in dice.items()]
        return write_report(rows, folder)["per_slice"].parent

    # The flag of either side counts (B's report is from before the column: every row reads manual).
    compare_main([str(write(tmp_path / "cv_a", a, True)), str(write(tmp_path / "cv_b", b, False)), "--boot", "50"])
    out = capsys.readouterr().out
    assert "difference +0.0 points" in out and "| lamina (derived labels) |" in out
    assert read_per_slice(tmp_path / "cv_a")[("c0", 2)] == pytest.approx(a[("c0", 2)])


def _with_canal(rec, derived: bool):
    """A synthetic slice with a bright canal (2) in its not-annotated strip, trusted; derived when asked."""
    n = rec.labels.shape[0]
    ii, jj = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
    canal = ((ii - 0.5) / 0.06) ** 2 + ((jj - 0.56) / 0.04) ** 2 < 1
    rec.labels[canal] = 2
    rec.image[canal] = 260.0
    rec.trusted[2] = True
    rec.derived = (2,) if derived else ()
    return rec


def test_cross_validation_reports_derived_structures_apart(tmp_path):
    from training.cv import cross_validate

    recs = [_with_canal(synthetic_slice(64, seed=i), derived=True) for i in range(4)]
    res = cross_validate(tiny_config(epochs=1, network={"preset": "unet"}), recs, tmp_path, k=2, progress=False)
    assert {r["ground_truth"] for r in res["rows"] if r["structure"] == 2} == {"derived"}
    assert {r["ground_truth"] for r in res["rows"] if r["structure"] != 2} == {"manual"}
    m = json.loads((tmp_path / "cv_metrics.json").read_text())
    assert m["derived_structures"] == [2] and "2" not in m["per_structure"] and set(m["per_structure_derived"]) == {"2"}
    assert m["mean_dice"] == pytest.approx(mean_dice([r for r in res["rows"] if r["structure"] != 2]))
    assert m["manual_structures"] == list(MANUAL)
    assert "spinal canal (derived labels)" in (tmp_path / "report.md").read_text()
    with open(tmp_path / "per_slice.csv", newline="") as f:
        flags = {(r["structure"], r["ground_truth"]) for r in csv.DictReader(f)}
    assert ("2", "derived") in flags and ("6", "manual") in flags

    # The CV block as recorded in exported weights: accepted by the weights check, derived figure labelled.
    from ParaspinalSegLib.network import build_network
    from ParaspinalSegLib.weights import read_weights_config, save_weights
    from training.config import network_config

    model = build_network(network_config(tiny_config(epochs=1, network={"preset": "unet"})))
    path = save_weights(model, tmp_path / "w", structures_learned=[1, 2, 4, 5, 6, 7, 8, 9], training={"cross_validation": m})
    line = next(l for l in read_weights_config(path).summary().splitlines() if l.startswith("cross-validation"))
    assert f"mean Dice {100 * m['mean_dice']:.1f} % over the 7 manually labelled structures" in line
    assert "; against derived labels, not manual outlines: spinal canal " in line
