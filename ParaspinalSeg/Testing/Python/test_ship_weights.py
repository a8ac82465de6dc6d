"""``tools/ship_weights.py``: trained weights become the shipped pair, byte for byte, or nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

def test_shipped_pair_keeps_the_tensors_and_the_checksum(tmp_path, save_tiny_weights, load_tool):
    pytest.importorskip("torch")
    from ParaspinalSegLib.weights import read_weights_config

    source = save_tiny_weights(tmp_path / "trained" / "final")
    shipped = load_tool("ship_weights").ship_weights(source, tmp_path / "models", description="two sources; canal and lamina derived")
    src, dst = read_weights_config(source), read_weights_config(shipped)
    assert shipped == tmp_path / "models" / "bsesnet_default.json"
    assert dst.name == "bsesnet_default" and dst.weights_file == "bsesnet_default.safetensors"
    assert dst.weights_path.read_bytes() == src.weights_path.read_bytes()
    assert dst.weights_sha256 == src.weights_sha256
    # Everything else in the config is the trainer's.
    a, b = (json.loads(Path(p).read_text()) for p in (source, shipped))
    for key in ("name", "weights_file"):
        a.pop(key), b.pop(key)
    assert b["training"].pop("description") == "two sources; canal and lamina derived"
    assert a == b
    assert "training data: two sources; canal and lamina derived" in dst.summary()
    assert not list((tmp_path / "models").glob("*.tmp"))


def test_damaged_source_is_refused_and_nothing_is_written(tmp_path, save_tiny_weights, tampered_weights, load_tool):
    pytest.importorskip("torch")
    from ParaspinalSegLib.errors import ParaspinalSegError

    bad = tampered_weights(save_tiny_weights(tmp_path / "trained" / "tiny"))  # the fixture keeps the stem "tiny"
    with pytest.raises(ParaspinalSegError, match="(?i)sha-?256|checksum"):
        load_tool("ship_weights").ship_weights(bad, tmp_path / "models")
    assert not (tmp_path / "models").exists()
