"""training.sag_check: held-out Dice with detected, ground-truth and no boxes as the SAG query."""

import pytest
import torch

from ParaspinalSegLib.network import build_network
from training.config import network_config
from training.data import prepare_records
from training.evaluate import canonical_dice
from training.sag_check import sag_dependence
from training.tests.synthetic import synthetic_slice, tiny_config


def _data(cfg):
    return prepare_records([synthetic_slice(64, seed=s) for s in range(3)], cfg["model_input"], cfg["normalisation"])


def test_three_queries_scored_and_detected_is_the_plain_validation_dice():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_network(network_config(cfg)).eval()
    data = _data(cfg)
    with torch.no_grad():  # a gate that follows its query strongly, so the three scores can differ
        model.sag.gate.weight.fill_(40.0)
        model.sag.gate.bias.fill_(-30.0)
    res = sag_dependence(model, data)
    assert set(res) == {"detected_boxes", "ground_truth_boxes", "no_boxes"}
    assert all(0.0 <= v <= 1.0 for v in res.values())
    assert res["detected_boxes"] == canonical_dice(model, data)
    assert len(set(res.values())) > 1


def test_refuses_a_network_without_gate():
    cfg = tiny_config(network={"preset": "unet"})
    with pytest.raises(ValueError, match="no spatial attention gate"):
        sag_dependence(build_network(network_config(cfg)), _data(cfg))
