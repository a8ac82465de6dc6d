"""Configs: one place for defaults, ablations on a shared base."""

import json

import pytest

from training import config as cfg
from training.config import load_config


def test_ablations_are_the_main_recipe_but_for_the_network():
    main = load_config("bsesnet")
    for name in ("without_sag", "without_deep_supervision", "unet"):
        ablation = load_config(name)
        assert ablation["name"] == name and ablation["network"]["preset"] == name
        differ = {k for k in main if main[k] != ablation[k]}
        assert differ <= {"name", "network", "epochs"}, (name, differ)
        raw = json.loads((cfg.CONFIG_DIR / f"{name}.json").read_text())
        assert raw["base"] == "bsesnet" and "schedule" not in raw and "model_input" not in raw
    # The U-Net's network is its own: no BSN options carried over from the base.
    assert "detector_pool" not in load_config("unet")["network"]


def test_base_is_resolved_recursively_and_cycles_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(cfg, "CONFIG_DIR", tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"base": "b", "epochs": 3, "schedule": {"joint_epochs": 2}}))
    (tmp_path / "b.json").write_text(json.dumps({"epochs": 7, "batch_size": 2, "schedule": {"final_bsn_epochs": 1}}))
    c = load_config(tmp_path / "a.json")
    assert (c["epochs"], c["batch_size"]) == (3, 2)
    assert c["schedule"] == {**cfg.DEFAULTS["schedule"], "joint_epochs": 2, "final_bsn_epochs": 1}
    (tmp_path / "b.json").write_text(json.dumps({"base": "a"}))
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.json")
