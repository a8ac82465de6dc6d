"""End-to-end training: loss goes down, checkpoints resume exactly, exported weights load in SliceSegmenter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.cv import cross_validate
from training.data import load_source_folder
from training.evaluate import evaluate_weights
from training.train import CHECKPOINT, read_cv_reports, train
from training.tests.synthetic import synthetic_slice, tiny_config

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


def _records(n=6):
    return [synthetic_slice(64, seed=i) for i in range(n)]


def test_two_epochs_lower_loss_resume_and_export(tmp_path):
    recs, val = _records(6), [synthetic_slice(64, seed=50)]
    cfg = tiny_config(epochs=3)
    full = train(cfg, recs, tmp_path / "full", val, progress=False)
    assert full.history[1]["loss"] < full.history[0]["loss"]
    assert [h["phase"] for h in full.history] == ["joint"] * 3

    # Interrupted after 2 epochs, resumed for the third: same epoch counter and bit-identical parameters.
    part = train(cfg, recs, tmp_path / "part", val, progress=False, stop_after_epochs=2)
    assert part.epochs_done == 2
    ck = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)
    assert ck["epoch"] == 2
    resumed = train(cfg, recs, tmp_path / "part", val, resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Exported weights: library format, loadable by the segmenter, scored on the original grid.
    meta = json.loads(full.final_weights.read_text())
    assert meta["structures_learned"] == [1, 4, 5, 6, 7, 8, 9]
    assert meta["training"]["train_cases"] == [r.case_id for r in recs]
    from ParaspinalSegLib.segmenter import SliceSegmenter

    seg = SliceSegmenter(full.final_weights)
    res = seg.segment(val[0].image, val[0].slice_ijk_to_ras)
    assert res.labels.shape == val[0].image.shape
    rows = evaluate_weights(full.final_weights, val)
    assert {r["structure"] for r in rows} == {1, 4, 5, 6, 7, 8, 9}
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows if not np.isnan(r["dice"]))


def test_cross_validation_writes_table(tmp_path):
    recs = _records(4)
    res = cross_validate(tiny_config(epochs=1, network={"preset": "unet"}), recs, tmp_path, k=2, progress=False)
    assert len(res["folds"]) == 2 and sorted(sum(res["folds"], [])) == sorted(r.case_id for r in recs)
    text = (tmp_path / "report.md").read_text()
    assert "fold 1" in text and "Dice (%)" in text
    assert (tmp_path / "fold_0" / "final.json").exists() and (tmp_path / "per_slice.csv").exists()

    assert res["metrics"]["mirror_tta"] is True and "(mirror-averaged, as shipped)" in text
    # Re-scoring the finished folds in a single pass trains nothing again and says how it scored.
    before = (tmp_path / "fold_0" / "history.json").read_text()
    single = cross_validate(tiny_config(epochs=1, network={"preset": "unet"}), recs, tmp_path, k=2, progress=False,
                            resume=True, mirror_tta=False)
    assert (tmp_path / "fold_0" / "history.json").read_text() == before
    assert single["metrics"]["mirror_tta"] is False
    assert "(single pass, no mirror averaging)" in (tmp_path / "single_pass" / "report.md").read_text()
    assert (tmp_path / "report.md").read_text() == text  # the shipped-inference report is left as it was
    assert len(single["rows"]) == len(res["rows"])
    # The metrics can be recorded with weights trained elsewhere (the shipped model: training.train --cv-report).
    recorded = read_cv_reports([tmp_path])
    assert recorded[tmp_path.name]["mean_dice"] == pytest.approx(res["metrics"]["mean_dice"])
    with pytest.raises(FileNotFoundError, match="no cv_metrics.json"):
        read_cv_reports([tmp_path / "fold_0"])


def test_cross_validation_subset_of_folds_says_so(tmp_path):
    recs = _records(4)
    res = cross_validate(tiny_config(epochs=1, network={"preset": "unet"}), recs, tmp_path, k=2, progress=False,
                         only_folds=[1])
    assert res["metrics"]["folds_run"] == [1] and set(res["metrics"]["per_fold_mean_dice"]) == {1}
    assert not (tmp_path / "fold_0").exists() and (tmp_path / "fold_1" / "final.json").exists()
    text = (tmp_path / "report.md").read_text()
    assert "fold(s) [1] of a 2-fold" in text and "pooled over all slices (1 fold)" in text
    with pytest.raises(ValueError, match="only_folds"):
        cross_validate(tiny_config(epochs=1), recs, tmp_path, k=2, progress=False, only_folds=[2])


def test_cross_validation_trains_also_on_an_unscored_source(tmp_path):
    recs = _records(4)
    extra = [synthetic_slice(64, seed=20 + i, source="extra", trusted=(6, 7, 8, 9)) for i in range(2)]
    res = cross_validate(tiny_config(epochs=1, network={"preset": "unet"}), recs, tmp_path, k=2, progress=False,
                         train_also=extra)
    for f, held in enumerate(res["folds"]):
        trained = json.loads((tmp_path / f"fold_{f}" / "final.json").read_text())["training"]["train_cases"]
        assert set(trained) == {r.case_id for r in recs if r.case_id not in held} | {r.case_id for r in extra}
    assert {r["case_id"] for r in res["rows"]} == {r.case_id for r in recs}  # the extra source is never scored
    assert res["metrics"]["trained_also_on"] == ["extra"]
    assert "also trained on extra, which is not scored" in (tmp_path / "report.md").read_text()
    # The same subject in both would leak into the fold that scores it.
    leak = [synthetic_slice(64, seed=30, subject=recs[0].subject_id)]
    with pytest.raises(ValueError, match="shares subjects"):
        cross_validate(tiny_config(epochs=1), recs, tmp_path / "leak", k=2, progress=False, train_also=leak)


@pytest.mark.skipif(not (DATA / "sy_lumbar_muscle" / "manifest.csv").exists(), reason=f"shared data not found at {DATA}")
def test_real_slices_two_epochs(tmp_path):
    recs = load_source_folder(DATA / "sy_lumbar_muscle", limit=3) + load_source_folder(DATA / "myosegmentum_lpm", limit=1)
    cfg = tiny_config(model_input={"spacing_mm": 1.6, "size": 96}, batch_size=2, optimizer={"lr_esnet": 1e-2, "lr_bsn": 1e-2})
    res = train(cfg, recs, tmp_path, progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    resumed = train({**cfg, "epochs": 3}, recs, tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    meta = json.loads(res.final_weights.read_text())
    assert meta["structures_learned"] == [1, 4, 5, 6, 7, 8, 9] and meta["model_input"]["size"] == 96
    from ParaspinalSegLib.segmenter import SliceSegmenter

    out = SliceSegmenter(resumed.final_weights).segment(recs[3].image, recs[3].slice_ijk_to_ras)
    assert out.labels.shape == recs[3].image.shape


@pytest.mark.slow
def test_torchrun_two_process_gloo(tmp_path):
    """2-process DDP (gloo, CPU) through the real CLI; both ranks stay in step and rank 0 exports."""
    cfg = tiny_config(epochs=2)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    # Slicer-style pair as data: no shared data needed.
    import SimpleITK as sitk

    recs = _records(4)
    vol = np.stack([r.image.T for r in recs])  # arr[k, j, i]
    lab = np.stack([np.where(r.labels == 255, 0, r.labels).T for r in recs]).astype(np.uint8)
    for arr, name in ((vol, "v.nrrd"), (lab, "v.seg.nrrd")):
        im = sitk.GetImageFromArray(arr)
        if name.endswith("seg.nrrd"):
            for i, key in enumerate(["intervertebral_disc", "psoas_major_left", "psoas_major_right", "multifidus_left",
                                     "multifidus_right", "erector_spinae_left", "erector_spinae_right"]):
                im.SetMetaData(f"Segment{i}_ID", key)
                im.SetMetaData(f"Segment{i}_LabelValue", str([1, 4, 5, 6, 7, 8, 9][i]))
                im.SetMetaData(f"Segment{i}_Layer", "0")
        sitk.WriteImage(im, str(tmp_path / name))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'ParaspinalSeg'}{os.pathsep}{ROOT}"}
    # --standalone: the rendezvous store takes a free port, so two suites on one machine never collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", "--config", str(cfg_path), "--pair", str(tmp_path / "v.nrrd"), str(tmp_path / "v.seg.nrrd"),
           "--out", str(tmp_path / "run"), "--device", "cpu", "--all"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads((tmp_path / "run" / "final.json").read_text())
    assert meta["training"]["world_size"] == 2
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("preset", ["bsesnet", "without_sag", "without_deep_supervision"])
def test_every_phase_runs_and_only_trained_group_moves(tmp_path, preset):
    sched = {"joint_epochs": 1, "esnet_epochs_per_cycle": 1, "bsn_epochs_per_cycle": 1, "final_bsn_epochs": 1}
    cfg = tiny_config(epochs=4, schedule=sched, network={"preset": preset}, val_every=0)
    recs = _records(2)
    snaps = []
    for stop in (1, 2, 3):
        train(cfg, recs, tmp_path, resume=True, progress=False, stop_after_epochs=stop)
        snaps.append(torch.load(tmp_path / CHECKPOINT, weights_only=True))
    res = train(cfg, recs, tmp_path, resume=True, progress=False)
    assert [h["phase"] for h in res.history] == ["joint", "esnet", "bsn", "bsn"]
    moved = lambda a, b, prefix: any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if k.startswith(prefix))
    # epoch 1 (ESNet): BSN frozen; epoch 2 (BSN): encoder frozen
    assert moved(snaps[0], snaps[1], "encoder.") and not moved(snaps[0], snaps[1], "bsn.")
    assert moved(snaps[1], snaps[2], "bsn.") and not moved(snaps[1], snaps[2], "encoder.")


def test_mixed_precision_choice():
    from training.train import cpu_has_native_bf16, mixed_precision

    cpu = torch.device("cpu")
    assert mixed_precision(cpu, False) is None
    assert mixed_precision(cpu, True) == (torch.bfloat16 if cpu_has_native_bf16() else None)


@pytest.mark.skipif(not __import__("training.train", fromlist=["x"]).cpu_has_native_bf16(), reason="this CPU has no native bfloat16 (AVX512-BF16/AMX)")
def test_cpu_bfloat16_run_lowers_loss_and_records_precision(tmp_path):
    recs = _records(6)
    res = train(tiny_config(epochs=2, amp=True), recs, tmp_path / "bf16", progress=False)
    assert res.history[1]["loss"] < res.history[0]["loss"]
    assert all(np.isfinite(h["loss"]) for h in res.history)
    meta = json.loads(res.final_weights.read_text())
    assert meta["training"]["precision"] == "bfloat16"
    # Exported tensors stay float32 (autocast never changes the parameters' dtype).
    from ParaspinalSegLib.weights import load_weights

    model, _ = load_weights(res.final_weights)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_cv_metrics_are_recorded_as_a_measure_only_of_a_matching_model(tmp_path):
    """Bug: --cv-report recorded any CV into any exported model. Now each report is checked against the
    model's configuration and slices, and a mismatch is labelled in the model card."""
    from ParaspinalSegLib.weights import read_weights_config, save_weights
    from training.config import network_config
    from training.provenance import check_cv_reports
    from ParaspinalSegLib.network import build_network

    recs = _records(4)
    config = tiny_config(epochs=1, network={"preset": "unet"})
    cross_validate(config, recs, tmp_path / "cv", k=2, progress=False)
    reports = read_cv_reports([tmp_path / "cv"])
    assert check_cv_reports(reports, config, list(reversed(recs)))["cv"]["matches_model"] is True
    other_config = check_cv_reports(reports, tiny_config(epochs=2, network={"preset": "unet"}), recs)["cv"]
    assert other_config["matches_model"] is False and "configuration" in other_config["mismatch"][0]
    more_data = check_cv_reports(reports, config, recs + _records(5)[4:])["cv"]
    assert more_data["mismatch"] == ["it covers other slices (4 vs the model's 5)"]
    old = check_cv_reports({"old": {"mean_dice": 0.9}}, config, recs)["old"]
    assert "no configuration/data fingerprint" in old["mismatch"][0]

    model = build_network(network_config(config))
    path = save_weights(model, tmp_path / "w", structures_learned=[6, 7, 8, 9],
                        training={"cross_validation": {"cv": other_config}})
    line = next(l for l in read_weights_config(path).summary().splitlines() if l.startswith("cross-validation"))
    assert "NOT a measure of these weights: it was run with a different training configuration" in line


def _write_dixon_folder(folder: Path, with_fat: dict[str, int], without_fat: dict[str, int]) -> None:
    """A manifest source folder: subjects with (Dixon water + fat) and without a fat image, n slices each."""
    import csv

    import nibabel as nib

    folder.mkdir(parents=True)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    rows, seed = [], 0
    for subjects, fat in ((with_fat, True), (without_fat, False)):
        for subject, n in subjects.items():
            for s in range(n):
                rec = synthetic_slice(64, seed=seed)
                seed += 1
                case = f"{subject}_s{s}"
                nib.save(nib.Nifti1Image(rec.image[:, :, None], affine), str(folder / f"{case}_img.nii.gz"))
                nib.save(nib.Nifti1Image(rec.labels[:, :, None], affine), str(folder / f"{case}_lbl.nii.gz"))
                extra = ""
                if fat:
                    nib.save(nib.Nifti1Image((0.3 * rec.image)[:, :, None], affine), str(folder / f"{case}_fat.nii.gz"))
                    extra = f"{case}_fat.nii.gz"
                rows.append({"case_id": case, "subject_id": subject, "img_file": f"{case}_img.nii.gz",
                             "lbl_file": f"{case}_lbl.nii.gz", "extra_files": extra, "trusted_classes": "1;4;5;6;7;8;9"})
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_the_fold_split_is_saved_once_and_sag_check_scores_exactly_the_held_out_slices(tmp_path, capsys):
    """Bug: sag_check rebuilt the folds from data loaded without the Dixon in-phase slices, so its
    'held-out' set was not the fold's (training slices could be scored). Now the split is saved
    (splits_final.json) and every tool reads the held-out slices from it or from the weights' record."""
    pytest.importorskip("nibabel")
    from training import sag_check
    from training.data import load_sources
    from training.splits import SPLITS_FILE, cv_folds, read_splits

    data = tmp_path / "dixon"
    _write_dixon_folder(data, {"A": 3, "B": 1}, {"C": 2, "D": 2})
    config = tiny_config(epochs=1, dixon_in_phase=True)
    records = load_sources([data], dixon_in_phase=True)
    res = cross_validate(config, records, tmp_path / "cv", k=2, progress=False)
    splits = read_splits(tmp_path / "cv" / SPLITS_FILE)
    assert [sorted(s["val"]) for s in splits] == [sorted(f) for f in res["folds"]]
    # Read back, not rebuilt: another seed with the saved split gives the saved folds.
    assert cv_folds(tmp_path / "cv", records, 2, seed=123) == [sorted(records.index(r) for r in records if r.case_id in s["val"])
                                                               for s in splits]
    meta = json.loads((tmp_path / "cv" / "fold_0" / "final.json").read_text())
    assert meta["training"]["folds"]["held_out_cases"] == res["folds"][0]

    assert sag_check.main(["--weights", str(tmp_path / "cv" / "fold_0" / "final.json"), "--data", str(data)]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["slices"] == len(res["folds"][0]) and scored["scope"] == "held-out fold 0 of 2"


def test_resumed_fp16_run_keeps_the_loss_scaler(tmp_path, monkeypatch):
    """Bug: the checkpoint lacked the mixed-precision scaler, so a resumed fp16 run restarted its loss scale
    and growth counter. fp16 is forced on the CPU here (the trainer picks it on GPUs without bf16)."""
    from training import train as trainer

    monkeypatch.setattr(trainer, "mixed_precision", lambda dev, enabled: torch.float16 if enabled else None)
    recs = _records(4)
    cfg = tiny_config(epochs=3, amp=True)
    train(cfg, recs, tmp_path / "full", progress=False)
    train(cfg, recs, tmp_path / "part", progress=False, stop_after_epochs=2)
    train(cfg, recs, tmp_path / "part", resume=True, progress=False)
    full = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    part = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)
    assert full["scaler"] and full["scaler"] == part["scaler"]
    assert all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])
