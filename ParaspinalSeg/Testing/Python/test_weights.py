"""Weights format: safetensors + JSON config + SHA-256; every broken-file case gives its own message."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ParaspinalSegLib import __version__, weights as weights_mod  # noqa: E402
from ParaspinalSegLib.anatomy import LABEL_TABLE_VERSION  # noqa: E402
from ParaspinalSegLib.errors import ParaspinalSegError, WeightsError  # noqa: E402
from ParaspinalSegLib.network import NetworkConfig, build_network  # noqa: E402
from ParaspinalSegLib.preprocessing import ModelInput, NormalisationConfig  # noqa: E402
from ParaspinalSegLib.weights import (  # noqa: E402
    FORMAT_NAME,
    load_weights,
    read_weights_config,
    save_weights,
)

REPO = Path(__file__).resolve().parents[3]
SMALL = dict(base_width=4, depth=4, prelim_width=8, detector_width=4, detector_hidden=8, detector_pool=2)


def small_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(NetworkConfig.bsesnet(**{**SMALL, **overrides}))


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = small_model()
    path = save_weights(
        model,
        tmp_path / "model",
        model_input=ModelInput(spacing_mm=3.0, size=32),
        normalisation=NormalisationConfig(),
        structures_learned=[1, 4, 5, 6, 7, 8, 9],
        training={"description": "synthetic test", "subjects": 0},
        metrics={"dice_mean": 0.5},
    )
    return model, path


def edit_json(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def error_of(path) -> str:
    with pytest.raises(WeightsError) as info:
        load_weights(path)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------
# Round trip and file content


def test_round_trip_gives_bit_identical_outputs(saved):
    model, path = saved
    model.eval()
    loaded, config = load_weights(path)
    assert not loaded.training
    assert loaded is not model
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = model(x), loaded(x)
    assert set(a) == set(b)
    for key in ("logits", "boxes", "prelim_mask", "sag_key", "attention"):
        assert torch.equal(a[key], b[key]), key
    assert config.network_config() == model.config


def test_config_json_records_everything_and_the_checksum(saved):
    model, path = saved
    assert path.suffix == ".json" and path.with_suffix(".safetensors").is_file()
    d = json.loads(path.read_text())
    assert d["format"] == FORMAT_NAME and d["format_version"] == 1
    assert d["architecture"] == model.config.to_dict()
    assert d["model_input"] == {"spacing_mm": 3.0, "size": 32, "window": "spine"}
    assert d["normalisation"] == NormalisationConfig().to_dict()
    assert d["label_table_version"] == LABEL_TABLE_VERSION
    assert d["structures_learned"] == [1, 4, 5, 6, 7, 8, 9]
    assert d["training"]["description"] == "synthetic test"
    assert d["metrics"] == {"dice_mean": 0.5}
    assert d["library_version"] == __version__
    assert d["created"].startswith("20")
    assert d["weights_file"] == "model.safetensors"
    assert d["weights_sha256"] == hashlib.sha256(path.with_suffix(".safetensors").read_bytes()).hexdigest()
    # No temporary files left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]


@pytest.mark.parametrize("form", ["json", "safetensors", "stem"])
def test_load_accepts_json_safetensors_or_stem(saved, form):
    _, path = saved
    given = {"json": path, "safetensors": path.with_suffix(".safetensors"), "stem": path.with_suffix("")}[form]
    model, config = load_weights(str(given))
    assert config.json_path == path.resolve()
    assert config.model_version.startswith("model (")


def test_read_weights_config_does_not_import_torch(saved):
    _, path = saved
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now fails\n"
        "from ParaspinalSegLib.weights import read_weights_config\n"
        f"c = read_weights_config({str(path)!r})\n"
        "print(c.structures_learned, c.model_input['size'])\n"
        "print(c.summary())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "ParaspinalSeg"), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "[1, 4, 5, 6, 7, 8, 9] 32" in out.stdout
    assert "left psoas major" in out.stdout and "spinal canal" not in out.stdout


# ---------------------------------------------------------------------------------------------------
# Each broken file gives its own message


def test_missing_file(tmp_path):
    msg = error_of(tmp_path / "nothing.json")
    assert "not found" in msg and "nothing.json" in msg


def test_missing_tensor_file(saved):
    _, path = saved
    path.with_suffix(".safetensors").unlink()
    msg = error_of(path)
    assert "not found" in msg and "model.safetensors" in msg


def test_missing_json_next_to_tensors(saved):
    _, path = saved
    path.unlink()
    msg = error_of(path.with_suffix(".safetensors"))
    assert "config missing" in msg and "model.json" in msg


def test_invalid_json(saved):
    _, path = saved
    path.write_text('{"format": "paraspinalseg-weights",')
    assert "not valid JSON" in error_of(path)


def test_json_that_is_not_ours(saved):
    _, path = saved
    path.write_text('{"model_type": "something else"}')
    assert "not a ParaspinalSeg weights config" in error_of(path)


def test_json_missing_fields(saved):
    _, path = saved
    edit_json(path, lambda d: d.pop("weights_sha256"))
    assert "lacks required fields: weights_sha256" in error_of(path)


def test_newer_format_version(saved):
    _, path = saved
    edit_json(path, lambda d: d.update(format_version=99))
    assert "format version 99" in error_of(path)


def test_truncated_safetensors(saved):
    _, path = saved
    st = path.with_suffix(".safetensors")
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    msg = error_of(path)
    assert "truncated" in msg and "checksum" not in msg


def test_truncated_inside_the_header(saved):
    _, path = saved
    st = path.with_suffix(".safetensors")
    st.write_bytes(st.read_bytes()[:100])
    assert "truncated or corrupt" in error_of(path)


def test_empty_tensor_file(saved):
    _, path = saved
    path.with_suffix(".safetensors").write_bytes(b"")
    assert "only 0 bytes" in error_of(path)


def test_defaults_for_model_input_and_normalisation(tmp_path):
    path = save_weights(small_model(), tmp_path / "defaults.safetensors", structures_learned=range(1, 10))
    config = read_weights_config(path)
    assert path == tmp_path / "defaults.json"
    assert config.model_input == ModelInput().to_dict()
    assert config.normalisation == NormalisationConfig().to_dict()
    assert config.structures_learned == list(range(1, 10))


def test_random_bytes(saved):
    _, path = saved
    st = path.with_suffix(".safetensors")
    st.write_bytes(os.urandom(4096))
    msg = error_of(path)
    assert "not a safetensors file" in msg


def test_tampered_byte_gives_checksum_mismatch(saved):
    _, path = saved
    st = path.with_suffix(".safetensors")
    data = bytearray(st.read_bytes())
    data[-10] ^= 0x01  # one bit of one weight: the file is still a valid safetensors file
    st.write_bytes(bytes(data))
    msg = error_of(path)
    assert "checksum mismatch" in msg and "tampered" in msg


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_pickle_checkpoint_renamed_is_refused(saved, zipfile_format):
    model, path = saved
    st = path.with_suffix(".safetensors")
    torch.save(model.state_dict(), st, _use_new_zipfile_serialization=zipfile_format)
    # Even with a config whose checksum matches the pickle, it is refused before deserialising.
    edit_json(path, lambda d: d.update(weights_sha256=hashlib.sha256(st.read_bytes()).hexdigest()))
    msg = error_of(path)
    assert "pickle" in msg and "not a safetensors file" in msg


class _Payload:
    """Unpickling this would create the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_executes_code_from_the_file(saved, tmp_path):
    _, path = saved
    marker = tmp_path / "code_ran"
    st = path.with_suffix(".safetensors")
    torch.save({"x": _Payload(marker)}, st)
    edit_json(path, lambda d: d.update(weights_sha256=hashlib.sha256(st.read_bytes()).hexdigest()))
    with pytest.raises(WeightsError):
        load_weights(path)
    with pytest.raises(WeightsError):
        load_weights(st)
    assert not marker.exists()


def test_architecture_mismatch_names_the_keys(saved):
    _, path = saved
    edit_json(path, lambda d: d["architecture"].update(base_width=8))
    msg = error_of(path)
    assert "architecture mismatch" in msg
    assert "shape differs" in msg and "encoder.0.0.weight" in msg


def test_architecture_mismatch_missing_parts(saved):
    _, path = saved
    edit_json(path, lambda d: d["architecture"].update(use_bsn=False, use_sag=False))
    msg = error_of(path)
    assert "architecture mismatch" in msg and "unexpected in file" in msg and "bsn." in msg


def test_unknown_architecture_key(saved):
    _, path = saved
    edit_json(path, lambda d: d["architecture"].update(transformer_layers=12))
    msg = error_of(path)
    assert "unknown architecture keys" in msg and "transformer_layers" in msg


def test_invalid_architecture_value(saved):
    _, path = saved
    edit_json(path, lambda d: d["architecture"].update(depth=1))
    assert "invalid architecture" in error_of(path)


def test_label_table_version_mismatch(saved):
    _, path = saved
    edit_json(path, lambda d: d.update(label_table_version="0"))
    msg = error_of(path)
    assert "label table version mismatch" in msg and "version 0" in msg
    with pytest.raises(WeightsError, match="label table version mismatch"):
        read_weights_config(path)
    assert read_weights_config(path, check_label_table=False).label_table_version == "0"


def test_bad_structures_learned(saved):
    _, path = saved
    edit_json(path, lambda d: d.update(structures_learned=[0, 12]))
    assert "structures_learned" in error_of(path)


def test_weights_file_may_not_point_elsewhere(saved):
    _, path = saved
    edit_json(path, lambda d: d.update(weights_file="../elsewhere.safetensors"))
    assert "must be a file name next to the JSON" in error_of(path)


def test_no_shipped_weights_message(monkeypatch, tmp_path):
    monkeypatch.setattr(weights_mod, "DEFAULT_WEIGHTS", tmp_path / "Models" / "bsesnet_default.json")
    with pytest.raises(WeightsError, match=r"no shipped weights found at .*bsesnet_default.json; pass --weights"):
        load_weights(None)


def test_weights_error_is_a_value_error():
    assert issubclass(WeightsError, ValueError) and issubclass(WeightsError, ParaspinalSegError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(saved):
    _, path = saved
    with pytest.raises(ParaspinalSegError, match="CUDA is not available"):
        load_weights(path, device="cuda")
    model, _ = load_weights(path, device="auto")
    assert next(model.parameters()).device.type == "cpu"


def _cv_metrics(mean: float, folds_run: list[int]) -> dict:
    return {"mean_dice": mean, "k": 5, "folds_run": folds_run, "slices": 27 * len(folds_run),
            "per_structure": {"1": {"dice": 0.968}, "6": {"dice": 0.823}, "255": {"dice": 0.1}}}


def test_summary_shows_the_recorded_cross_validation(tmp_path):
    by_folder = {"cv_bsesnet": {**_cv_metrics(0.8957, [0, 1, 2, 3, 4]), "matches_model": True},
                 "cv_unet": _cv_metrics(0.8937, [0])}
    path = save_weights(small_model(), tmp_path / "cv", structures_learned=[1, 6], training={"cross_validation": by_folder},
                        metrics={"val_dice_model_grid": None, "final_loss": 0.25})
    text = read_weights_config(path).summary()
    lines = [l for l in text.splitlines() if l.startswith("cross-validation")]
    assert lines == [
        "cross-validation cv_bsesnet (5-fold, 135 slices): mean Dice 89.6 % (intervertebral disc 96.8, left multifidus 82.3)",
        "cross-validation cv_unet (folds [0] of 5, 27 slices): mean Dice 89.4 % (intervertebral disc 96.8, left multifidus 82.3)"
        " — not checked against these weights' data and configuration",
    ]
    # A metric that was never measured is left out rather than printed as "None".
    assert "final_loss=0.250" in text and "None" not in text
    # The window the weights were trained on (saved by default: the spine window).
    assert "px at 0.8 mm, spine window" in text


def test_summary_shows_a_single_flat_cross_validation(tmp_path):
    path = save_weights(small_model(), tmp_path / "flat", structures_learned=[1, 6],
                        training={"cross_validation": _cv_metrics(0.9012, [0, 1, 2, 3, 4])})
    assert "cross-validation (5-fold, 135 slices): mean Dice 90.1 %" in read_weights_config(path).summary()
    plain = save_weights(small_model(), tmp_path / "plain", structures_learned=[1, 6])
    assert "cross-validation" not in read_weights_config(plain).summary()


def test_weights_window_is_validated(tmp_path, save_tiny_weights):
    import json

    from ParaspinalSegLib.weights import WeightsError, load_weights

    path = save_tiny_weights(tmp_path / "w")
    raw = json.loads(path.read_text())
    assert raw["model_input"]["window"] == "spine"
    raw["model_input"]["window"] = "whole body"
    path.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match="model_input.window"):
        load_weights(path)
