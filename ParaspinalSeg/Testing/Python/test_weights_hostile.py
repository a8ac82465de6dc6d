"""Weights configs that attack: each field is checked for type, range and nesting before anything is
built; each problem gives one message naming the field; nothing is allocated for a config that does not
fit its tensors; the command line exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ParaspinalSegLib import cli  # noqa: E402
from ParaspinalSegLib.errors import WeightsError  # noqa: E402
from ParaspinalSegLib.weights import load_weights, read_weights_config  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def original(tmp_path_factory, save_tiny_weights) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture
def weights(tmp_path, original) -> Path:
    """A private copy of the tiny weights (JSON + tensors) to edit."""
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"tiny{suffix}").write_bytes(original.with_suffix(suffix).read_bytes())
    return tmp_path / "tiny.json"


def edit(path: Path, change) -> Path:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(WeightsError) as err:
        read_weights_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"weights config {path}")
    return message


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("base_width", 100000, "invalid architecture: architecture.base_width must be an integer in 1..64, got 100000"),
        ("depth", True, "architecture.depth must be an integer in 3..6, got true"),
        ("depth", 4.0, "architecture.depth must be an integer in 3..6, got 4.0"),
        ("detector_hidden", -1, "architecture.detector_hidden must be an integer in 1..4096, got -1"),
        ("negative_slope", "0.01", "architecture.negative_slope must be a number in 0..1, got \"0.01\""),
        ("use_sag", 1, "architecture.use_sag must be true or false, got 1"),
        ("num_classes", 5, "architecture.num_classes must be 10"),
        ("sag_apply", ["all"], "architecture.sag_apply must be a string"),
    ],
)
def test_architecture_fields(weights, field, value, message):
    assert message in refusal(edit(weights, lambda d: d["architecture"].update({field: value})))


def test_oversized_architecture_is_refused_before_anything_is_built(weights):
    # Every field within its range, together about 10 G parameters (the detectors' FC layers).
    edit(weights, lambda d: d["architecture"].update(detector_width=256, detector_pool=32, detector_hidden=4096))
    assert "M parameters" in refusal(weights)
    # And without importing torch at all: the check needs the standard library only.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ParaspinalSegLib.weights import read_weights_config\n"
            f"read_weights_config({str(weights)!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "ParaspinalSeg"), str(REPO)])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode != 0 and "WeightsError" in res.stderr and "M parameters" in res.stderr


def test_architecture_that_does_not_fit_its_tensors_allocates_nothing(weights, monkeypatch):
    """A larger network than the file holds: found by comparing shapes on the meta device."""
    from ParaspinalSegLib import network

    edit(weights, lambda d: d["architecture"].update(base_width=32))
    devices = []
    real = network.build_network

    def spy(config=None):
        model = real(config)
        devices.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(network, "build_network", spy)
    with pytest.raises(WeightsError, match="architecture mismatch.*shape differs"):
        load_weights(weights)
    assert devices == [{"meta"}]  # built once, as shapes only


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["normalisation"].update(low="a"), "normalisation.low must be a number in 0..100, got \"a\""),
        (lambda d: d["normalisation"].update(low=80, high=20), "normalisation.low (80) must be below normalisation.high (20)"),
        (lambda d: d["normalisation"].update(method="zscore"), "normalisation.method must be \"percentile\""),
        (lambda d: d["normalisation"].update(mean=3), "unknown normalisation keys: mean"),
        (lambda d: d["normalisation"].pop("high"), "normalisation lacks high"),
        (lambda d: d.update(normalisation=[0.5, 99.5]), "normalisation must be a JSON object"),
        (lambda d: d["model_input"].update(size=10 ** 9), "model_input.size must be an integer in 16..1024"),
        (lambda d: d["model_input"].update(size=100), "model_input.size 100 is not a multiple of 8"),
        (lambda d: d["model_input"].update(spacing_mm=-1), "model_input.spacing_mm must be a number in 0.05..10"),
        (lambda d: d.update(structures_learned=[True, 4]), "structures_learned"),
        (lambda d: d.update(format_version="1"), "format_version must be an integer"),
        (lambda d: d.update(training=[1, 2]), "training must be a JSON object"),
        (lambda d: d.update(name={"a": 1}), "name must be a string"),
    ],
)
def test_other_fields(weights, change, message):
    assert message in refusal(edit(weights, change))


def test_nan_literals_duplicate_keys_deep_nesting_and_huge_files(weights):
    text = weights.read_text()
    weights.write_text(text.replace('"low": 0.5', '"low": NaN'))
    assert "NaN, which is not a JSON number" in refusal(weights)
    weights.write_text(text.replace('"low": 0.5', '"low": 0.5, "low": 0.6'))
    assert "the key 'low' appears twice" in refusal(weights)
    weights.write_text(text[:-2] + ', "training2": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert "nests lists/objects more than 24 deep" in refusal(weights)
    weights.write_text(text[:-2] + ', "pad": "' + "x" * (9 * 1024 * 1024) + '"}\n')
    assert "a weights config is at most" in refusal(weights)


def test_strange_training_record_is_left_out_of_the_model_card(weights, capsys):
    edit(weights, lambda d: d["training"].update(cross_validation={"mean_dice": 0.9, "k": 5, "folds_run": 3,
                                                                   "per_structure": [1, 2]}))
    code = cli.main(["info", "--weights", str(weights)])
    out = capsys.readouterr()
    assert code == 0 and "mean Dice 90.0 %" in out.out and out.err == ""


def test_cli_refuses_hostile_weights_with_one_line_and_writes_nothing(tmp_path, weights, capsys):
    import numpy as np
    sitk = pytest.importorskip("SimpleITK")

    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(200, 20, (1, 48, 40)).astype(np.int16))
    img.SetSpacing((1.5, 1.5, 4.0))
    sitk.WriteImage(img, str(tmp_path / "v.nrrd"))
    edit(weights, lambda d: d["architecture"].update(base_width=10 ** 6))
    for argv in (["info", "--weights", str(weights)],
                 ["segment", str(tmp_path / "v.nrrd"), "--weights", str(weights), "--device", "cpu", "--out", str(tmp_path / "out")]):
        code = cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == cli.EXIT_INPUT_ERROR and len(err) == 1 and "architecture.base_width" in err[0], err
    assert not (tmp_path / "out").exists()


def test_tensor_file_larger_than_the_architecture_can_need_is_not_read(weights):
    st = weights.with_suffix(".safetensors")
    with open(st, "ab") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: 200 MB for a network of a few thousand parameters
    with pytest.raises(WeightsError, match="more than the architecture .* can need"):
        load_weights(weights)


def test_an_integer_too_long_to_convert_is_one_clear_refusal(tmp_path, save_tiny_weights):
    import json

    from ParaspinalSegLib.weights import WeightsError, load_weights

    path = save_tiny_weights(tmp_path / "w")
    text = path.read_text().replace('"size": 64', '"size": 1' + "0" * 5000, 1)
    assert "0" * 5000 in text
    path.write_text(text)
    with pytest.raises(WeightsError, match="cannot be read as a number"):
        load_weights(path)
