"""Derived canal/lamina labels: phantom areas, the derived source folder and its manifest, the review file, sheets."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from training.canal_lamina import CANAL, LAMINA, DerivationParams, burn_in, derive_slice
from training.derive_labels import EXIT_BAD_INPUT, main as derive_main
from training.derived_review import ReviewEntry, read_review, write_review
from training.derived_sheets import main as sheets_main
from training.spine_frame import FrameError, spine_frame
from training.tests.canal_phantom import canal_phantom

SHARED_SY = Path(__file__).resolve().parents[3] / "shared" / "data" / "sy_lumbar_muscle"


@pytest.mark.parametrize("angle", [0.0, 12.0, -15.0])
@pytest.mark.parametrize("axes", [(9.0, 6.0), (7.0, 4.5), (11.0, 7.5)])
def test_phantom_canal_and_arch_areas_within_5_percent(angle, axes):
    p = canal_phantom(seed=1, angle_deg=angle, canal_axes=axes)
    d = derive_slice(p.image, p.labels, p.spacing)
    assert d.canal.sum() == pytest.approx(p.canal.sum(), rel=0.05)
    assert d.lamina.sum() == pytest.approx(p.lamina.sum(), rel=0.05)
    # Right place, not only the right size.
    assert 2 * (d.canal & p.canal).sum() / (d.canal.sum() + p.canal.sum()) > 0.93
    assert 2 * (d.lamina & p.lamina).sum() / (d.lamina.sum() + p.lamina.sum()) > 0.93
    f = d.figures()
    assert f["lamina_behind_canal_mm"] > 3 and f["lamina_symmetry"] > 0.9
    assert f["canal_mm2"] == pytest.approx(np.pi * axes[0] * axes[1], rel=0.05)


def test_posterior_epidural_fat_joined_to_the_sac_is_cut_off():
    p = canal_phantom(seed=5, fat_triangle=True)
    d = derive_slice(p.image, p.labels, p.spacing)
    assert d.canal.sum() == pytest.approx(p.canal.sum(), rel=0.05)
    assert d.lamina.sum() == pytest.approx(p.lamina.sum(), rel=0.05)


@pytest.mark.parametrize("layer", [1.5, 2.5])
def test_grey_root_layer_on_the_back_wall_is_inside_the_sac(layer):
    p = canal_phantom(seed=6, root_layer_mm=layer)
    d = derive_slice(p.image, p.labels, p.spacing)
    assert d.canal.sum() == pytest.approx(p.canal.sum(), rel=0.05)
    assert d.lamina.sum() == pytest.approx(p.lamina.sum(), rel=0.05)
    off = derive_slice(p.image, p.labels, p.spacing, DerivationParams(root_layer_mm=0.0))
    assert off.canal.sum() < 0.95 * p.canal.sum()  # without the rule the layer is lost


def test_derivation_stays_inside_the_band_and_burn_in_touches_only_it():
    p = canal_phantom(seed=2)
    d = derive_slice(p.image, p.labels, p.spacing)
    band = p.labels == 255
    assert not (d.canal & ~band).any() and not (d.lamina & ~band).any() and not (d.canal & d.lamina).any()
    out = burn_in(p.labels, d)
    assert np.array_equal(out[~band], p.labels[~band])
    assert (out == CANAL).sum() == d.canal.sum() and (out == LAMINA).sum() == d.lamina.sum()


def test_frame_left_is_the_patients_left_and_missing_multifidus_is_refused():
    p = canal_phantom(seed=3)
    f = spine_frame(p.labels, p.spacing)
    assert f.u[p.labels == 6].mean() > 0 > f.u[p.labels == 7].mean()  # 6 = multifidus_left, i → patient left
    assert abs(f.v[p.labels == 1].max()) < 1.0  # v = 0 on the disc's posterior border
    no_mf = np.where(p.labels == 6, 255, p.labels).astype(np.uint8)
    with pytest.raises(FrameError, match="multifidus_left"):
        derive_slice(p.image, no_mf, p.spacing)


def test_seed_override_moves_the_canal():
    p = canal_phantom(seed=4)
    far = np.argwhere((p.labels == 255) & ~p.canal & (p.image > 200))[0]
    d = derive_slice(p.image, p.labels, p.spacing, DerivationParams().with_overrides({"seed_i": str(far[0]), "seed_j": str(far[1])}))
    assert d.seed == (int(far[0]), int(far[1]))
    assert (d.canal & p.canal).sum() < 0.5 * p.canal.sum()
    with pytest.raises(ValueError, match="unknown derivation parameter"):
        DerivationParams().with_overrides({"seed": "1"})


def _write_source(folder: Path, n: int = 3) -> None:
    import nibabel as nib

    folder.mkdir(parents=True)
    affine = np.diag([-0.4, -0.4, 1.0, 1.0])
    rows = []
    for k in range(n):
        p = canal_phantom(seed=10 + k, angle_deg=4.0 * k)
        case = f"PH{k:03d}_s0"
        nib.save(nib.Nifti1Image(p.image.astype(np.int16)[:, :, None], affine), str(folder / f"{case}_img.nii.gz"))
        nib.save(nib.Nifti1Image(p.labels[:, :, None], affine), str(folder / f"{case}_lbl.nii.gz"))
        rows.append({"case_id": case, "subject_id": f"PH{k:03d}", "slice_id": "s0", "img_file": f"{case}_img.nii.gz",
                     "lbl_file": f"{case}_lbl.nii.gz", "extra_files": "", "classes_present": "1;4;5;6;7;8;9",
                     "trusted_classes": "1;4;5;6;7;8;9", "spacing_x_mm": "0.4", "spacing_y_mm": "0.4",
                     "n_pixels_255": str(int((p.labels == 255).sum()))})
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_manifest_trusts_2_and_3_only_on_reviewed_accepted_slices(tmp_path):
    from training.data import load_source_folder

    src, out = tmp_path / "src", tmp_path / "derived"
    _write_source(src)
    review = tmp_path / "review.csv"
    write_review(review, {"PH000_s0": ReviewEntry("accepted"), "PH001_s0": ReviewEntry("rejected", "canal leaks into fat")})
    assert derive_main(["--data", str(src), "--out", str(out), "--review", str(review)]) == 0
    with open(out / "manifest.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert rows["PH000_s0"]["trusted_classes"] == "1;2;3;4;5;6;7;8;9" and rows["PH000_s0"]["derived_classes"] == "2;3"
    assert all(r["derived"] == "1" for r in rows.values())
    for case, decision in (("PH001_s0", "rejected"), ("PH002_s0", "unreviewed")):
        assert rows[case]["trusted_classes"] == "1;4;5;6;7;8;9" and rows[case]["derived_classes"] == ""
        assert rows[case]["derived_review"] == decision
    records = {r.case_id: r for r in load_source_folder(out)}
    assert records["PH000_s0"].trusted[[CANAL, LAMINA]].all()
    assert (records["PH000_s0"].labels == CANAL).any() and (records["PH000_s0"].labels == LAMINA).any()
    for case in ("PH001_s0", "PH002_s0"):  # labels as in the source: no 2/3 burnt in
        assert not records[case].trusted[[CANAL, LAMINA]].any()
        assert not np.isin(records[case].labels, [CANAL, LAMINA]).any()
    # The raw derivation of every slice is kept for the sheets, trusted or not.
    import nibabel as nib

    raw = np.asanyarray(nib.load(str(out / rows["PH001_s0"]["derived_file"])).dataobj)
    assert (raw == CANAL).any()
    assert "DERIVED" in (out / "README.md").read_text()


def test_report_counts_trusted_slices_and_lists_every_slice(tmp_path):
    from training.derived_report import main as report_main, plausibility

    src, out = tmp_path / "src", tmp_path / "derived"
    _write_source(src)
    review = tmp_path / "review.csv"
    write_review(review, {"PH000_s0": ReviewEntry("accepted"), "PH001_s0": ReviewEntry("corrected", "seed", {"opening_mm": "3"}),
                          "PH002_s0": ReviewEntry("rejected", "leak")})
    assert derive_main(["--data", str(src), "--out", str(out), "--review", str(review)]) == 0
    with open(out / "derived_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    p = plausibility(rows)
    assert p["trusted"] == 2 and p["decisions"] == {"accepted": 1, "corrected": 1, "rejected": 1}
    assert p["canal_found"] == 3 and p["lamina_behind_all"] == 2
    assert np.all(p["canal_mm2"] == pytest.approx(np.pi * 9 * 6, rel=0.05))
    md = tmp_path / "r.md"
    assert report_main(["--derived", str(out), "--out", str(md)]) == 0
    text = md.read_text()
    assert all(f"| PH00{k}_s0 |" in text for k in range(3)) and "`opening_mm=3`" in text and "leak" in text
    assert report_main(["--derived", str(tmp_path / "none")]) == 2


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    assert derive_main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "manifest.csv" in capsys.readouterr().err
    src = tmp_path / "src"
    _write_source(src, n=1)
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,decision,reason,overrides\nPH000_s0,rejected,,\n")
    assert derive_main(["--data", str(src), "--out", str(tmp_path / "o"), "--review", str(bad)]) == EXIT_BAD_INPUT
    assert "needs a reason" in capsys.readouterr().err
    bad.write_text("case_id,decision,reason,overrides\nXX_s0,accepted,,\n")
    assert derive_main(["--data", str(src), "--out", str(tmp_path / "o"), "--review", str(bad)]) == EXIT_BAD_INPUT
    assert not (tmp_path / "o").exists()


def test_review_file_round_trip(tmp_path):
    entries = {"A": ReviewEntry("corrected", "seed on the sac", {"seed_i": "3", "seed_j": "4"}), "B": ReviewEntry("accepted")}
    path = tmp_path / "r.csv"
    write_review(path, entries)
    assert read_review(path) == entries


def test_contact_sheets_command(tmp_path):
    from PIL import Image

    src, out, sheets = tmp_path / "src", tmp_path / "derived", tmp_path / "sheets"
    _write_source(src, n=3)
    assert derive_main(["--data", str(src), "--out", str(out)]) == 0
    assert sheets_main(["--derived", str(out), "--out", str(sheets), "--per-sheet", "2", "--columns", "2", "--tile", "200"]) == 0
    pngs = sorted(sheets.glob("*.png"))
    assert len(pngs) == 2
    a = np.asarray(Image.open(pngs[0]))
    assert a.shape[1] == 400 and a.shape[2] == 3
    # Canal (cyan) and lamina (yellow) outlines are drawn.
    assert ((a[..., 0] == 0) & (a[..., 1] == 255) & (a[..., 2] == 255)).any()
    assert ((a[..., 0] == 255) & (a[..., 1] == 230) & (a[..., 2] == 0)).any()
    assert sheets_main(["--derived", str(tmp_path / "none"), "--out", str(sheets)]) == EXIT_BAD_INPUT


@pytest.mark.skipif(not (SHARED_SY / "manifest.csv").exists(), reason="../shared/data/sy_lumbar_muscle is not here (license: not in the repo)")
def test_review_file_covers_every_shared_slice():
    review = Path(__file__).resolve().parents[2] / "docs" / "derived-labels.csv"
    if not review.exists():
        pytest.skip("docs/derived-labels.csv not written yet")
    with open(SHARED_SY / "manifest.csv", newline="") as f:
        cases = {r["case_id"] for r in csv.DictReader(f)}
    assert set(read_review(review)) == cases


@pytest.mark.skipif(not (SHARED_SY / "manifest.csv").exists(), reason="../shared/data/sy_lumbar_muscle is not here (license: not in the repo)")
def test_review_table_is_of_the_rules_in_this_code():
    """The reviewed areas in docs/derived-labels.md are what the code derives now (a rule change needs a new review)."""
    import nibabel as nib

    docs = Path(__file__).resolve().parents[2] / "docs"
    review = read_review(docs / "derived-labels.csv")
    table = {}
    for line in (docs / "derived-labels.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("SY"):
            table[cells[0]] = (cells[1], float(cells[2]), float(cells[4]))
    assert set(table) == set(review)
    for case in ("SY002_s0", "SY006_s0", "SY063_s0", "SY096_s0", "SY165_s0", "SY185_s0"):
        assert table[case][0] == review[case].decision
        img = nib.load(str(SHARED_SY / f"{case}_img.nii.gz"))
        lbl = np.asanyarray(nib.load(str(SHARED_SY / f"{case}_lbl.nii.gz")).dataobj)[:, :, 0]
        d = derive_slice(np.asanyarray(img.dataobj)[:, :, 0], lbl, (0.37, 0.37), DerivationParams().with_overrides(review[case].overrides))
        assert d.canal_area_mm2() == pytest.approx(table[case][1], abs=1.0)
        assert d.lamina_area_mm2() == pytest.approx(table[case][2], abs=1.0)
