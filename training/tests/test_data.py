"""Data sources: shared-data folders, Slicer-style volume + .seg.nrrd pairs, subject folds, model-grid cache."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ParaspinalSegLib.anatomy import NOT_ANNOTATED
from ParaspinalSegLib.preprocessing import anatomy_centre_ras, prepare_slice
from training.data import load_slicer_pair, load_source_folder, prepare_records, subject_folds
from training.tests.synthetic import synthetic_slice

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_prepared_image_is_inference_image_and_labels_follow_it():
    rec = synthetic_slice(64, seed=1)
    data = prepare_records([rec], {"spacing_mm": 1.3, "size": 64}, {"low": 0.5, "high": 99.5})
    # Inference's own function, on a window centred on the labelled structures.
    centre = anatomy_centre_ras(rec.labels, rec.slice_ijk_to_ras, rec.trusted_structures)
    ref = prepare_slice(rec.image, rec.slice_ijk_to_ras, {"spacing_mm": 1.3, "size": 64}, {"low": 0.5, "high": 99.5},
                        centre_ras=centre)
    assert np.array_equal(data.images[0, 0].numpy(), ref.image)
    assert np.allclose(data.grids[0].centre_ras, ref.grid.centre_ras)
    assert np.linalg.norm(ref.grid.centre_ras[:2] - centre[:2]) <= 1.3 * 16 / 2 * np.sqrt(2) + 1e-6
    lab = data.labels[0].numpy()
    # patient axes: patient left (psoas left, value 4) right of patient right, anterior (disc) above the muscles
    cols4 = np.nonzero(lab == 4)[1].mean()
    cols5 = np.nonzero(lab == 5)[1].mean()
    assert cols4 > cols5 + 10
    assert np.nonzero(lab == 1)[0].mean() < np.nonzero(lab == 6)[0].mean()
    assert (lab == NOT_ANNOTATED).any() and data.trusted[0].tolist() == [True, True, False, False] + [True] * 6


def test_subject_folds_are_disjoint_and_by_subject():
    recs = [synthetic_slice(16, seed=i, subject=f"P{i % 7}") for i in range(20)]
    folds = subject_folds(recs, 5, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(20))
    for f in folds:
        others = {recs[i].group for g in folds if g is not f for i in g}
        assert not {recs[i].group for i in f} & others
    with pytest.raises(ValueError):
        subject_folds(recs, 8)


def _write_pair(tmp_path, segments):
    vol = np.random.default_rng(0).normal(100, 10, (3, 24, 20)).astype(np.float32)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((1.0, 1.0, 4.0))
    sitk.WriteImage(img, str(tmp_path / "vol.nrrd"))
    lab = np.zeros((3, 24, 20), np.uint8)
    lab[1, 5:10, 12:16] = 1  # layer value 1
    lab[1, 15:20, 2:6] = 2
    lab[2, 0:3, 0:3] = 3  # an unknown segment
    seg = sitk.GetImageFromArray(lab)
    seg.SetSpacing((1.0, 1.0, 4.0))
    for i, (sid, name, value) in enumerate(segments):
        seg.SetMetaData(f"Segment{i}_ID", sid)
        seg.SetMetaData(f"Segment{i}_Name", name)
        seg.SetMetaData(f"Segment{i}_LabelValue", str(value))
        seg.SetMetaData(f"Segment{i}_Layer", "0")
    sitk.WriteImage(seg, str(tmp_path / "vol.seg.nrrd"))
    return tmp_path / "vol.nrrd", tmp_path / "vol.seg.nrrd"


def test_slicer_pair_by_id_and_name(tmp_path):
    v, s = _write_pair(tmp_path, [("multifidus_left", "whatever", 1), ("Segment_2", "Right Erector Spinae", 2), ("Segment_3", "kidney", 3)])
    recs = load_slicer_pair(v, s)
    assert [r.info["k"] for r in recs] == [1]  # every slice with a recognised segment
    r = recs[0]
    assert (r.labels[5:10, 12:16] == 6).all() and (r.labels[15:20, 2:6] == 9).all()
    assert r.trusted_structures == [6, 9] and not r.trusted[0]  # missing segments: 0 is ambiguous
    assert r.image.shape == (24, 20)
    both = load_slicer_pair(v, s, slices=[2])
    assert (both[0].labels[0:3, 0:3] == NOT_ANNOTATED).all()  # unknown segment → not annotated
    prepare_records(recs, {"spacing_mm": 1.0, "size": 32}, {"low": 0.5, "high": 99.5})


@pytest.mark.skipif(not (DATA / "sy_lumbar_muscle" / "manifest.csv").exists(), reason=f"shared data not found at {DATA}")
def test_shared_data_folder():
    recs = load_source_folder(DATA / "sy_lumbar_muscle", limit=2) + load_source_folder(DATA / "myosegmentum_lpm", limit=1)
    assert recs[0].trusted_structures == [1, 4, 5, 6, 7, 8, 9] and recs[2].trusted_structures == [6, 7, 8, 9]
    assert all(r.trusted[0] for r in recs)
    data = prepare_records(recs, {"spacing_mm": 1.6, "size": 128}, {"low": 0.5, "high": 99.5})
    lab = data.labels.numpy()
    for i in range(3):  # the left multifidus lies on the canonical image's right half (patient left)
        assert np.nonzero(lab[i] == 6)[1].mean() > np.nonzero(lab[i] == 7)[1].mean()


@pytest.mark.skipif(not (DATA / "myosegmentum_lpm" / "manifest.csv").exists(), reason=f"shared data not found at {DATA}")
def test_dixon_in_phase_copy_is_water_plus_fat_of_the_same_subject():
    import nibabel as nib

    plain = load_source_folder(DATA / "myosegmentum_lpm", limit=2)
    both = load_source_folder(DATA / "myosegmentum_lpm", limit=2, dixon_in_phase=True)
    assert len(plain) == 2 and len(both) == 4
    water, in_phase = both[0], both[1]
    assert in_phase.case_id == water.case_id + "_inphase" and in_phase.group == water.group
    fat = np.asanyarray(nib.load(str(DATA / "myosegmentum_lpm" / f"{water.case_id}_fat.nii.gz")).dataobj)[:, :, 0]
    np.testing.assert_allclose(in_phase.image, water.image.astype(np.float32) + fat.astype(np.float32))
    np.testing.assert_array_equal(in_phase.labels, water.labels)
    np.testing.assert_array_equal(in_phase.slice_ijk_to_ras, water.slice_ijk_to_ras)
    # Splits stay by subject: the two contrasts of a slice never land in different folds.
    assert {r.group for r in both} == {r.group for r in plain}
