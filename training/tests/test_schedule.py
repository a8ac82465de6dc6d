"""The asynchronous schedule switches which parameters train at the right epochs."""

import pytest
import torch

from ParaspinalSegLib.network import NetworkConfig, build_network
from training.config import load_config
from training.schedule import apply_phase, build_optimizer, esnet_training_epochs, phase_for_epoch

SCHED = load_config("bsesnet")["schedule"]


def test_phase_boundaries_of_paper_schedule():
    epochs = SCHED_EPOCHS = load_config("bsesnet")["epochs"]
    final = SCHED["final_bsn_epochs"]
    phases = [phase_for_epoch(e, epochs, SCHED) for e in range(epochs)]
    assert phases[:10] == ["joint"] * 10
    assert phases[10:19] == ["esnet"] * 9 and phases[19] == "bsn" and phases[20] == "esnet"
    assert phases[29] == "bsn" and phases[30] == "esnet"
    assert phases[-final:] == ["bsn"] * final
    # The shipped 60-epoch run: 10 joint + 36 ESNet + 14 BSN epochs (4 in the cycles, the last 10 BSN-only),
    # so the ESNet trains in the first 50 epochs, as long as the plain U-Net's whole run.
    assert (SCHED_EPOCHS, final) == (60, 10)
    assert [phases.count(p) for p in ("joint", "esnet", "bsn")] == [10, 36, 14]
    assert phases[48] == "esnet" and phases[49] == "bsn"  # the fourth cycle ends where the BSN-only tail begins
    assert load_config("unet")["epochs"] == SCHED_EPOCHS - final
    long = [phase_for_epoch(e, 200, {**SCHED, "final_bsn_epochs": 10}) for e in range(200)]
    assert long[-10:] == ["bsn"] * 10 and long[188] == "esnet" and long[179] == "bsn"
    assert phase_for_epoch(5, 200, SCHED, has_bsn=False) == "joint"
    assert phase_for_epoch(19, 200, SCHED, has_bsn=False) == "joint"
    with pytest.raises(ValueError):
        phase_for_epoch(200, 200, SCHED)


def test_requires_grad_and_optimizer_groups_follow_phase():
    model = build_network(NetworkConfig.bsesnet(base_width=4, depth=4, prelim_width=8, detector_width=4, detector_hidden=8))
    opt = build_optimizer(model, {"lr_esnet": 1e-3, "lr_bsn": 2e-3, "weight_decay": 0.0})
    groups = {g["name"]: g for g in opt.param_groups}
    bsn_ids = {id(p) for p in model.bsn_parameters()}
    assert {id(p) for p in groups["bsn"]["params"]} == bsn_ids
    encoder = list(model.encoder.parameters())
    epochs = 40
    expect = {0: "joint", 10: "esnet", 19: "bsn", 20: "esnet", epochs - 1: "bsn"}
    for epoch, phase in expect.items():
        got = phase_for_epoch(epoch, epochs, SCHED)
        assert got == phase, (epoch, got)
        apply_phase(model, opt, got, epoch, epochs)
        bsn_on = all(p.requires_grad for p in model.bsn_parameters())
        bsn_off = not any(p.requires_grad for p in model.bsn_parameters())
        es_on = all(p.requires_grad for p in model.esnet_parameters())
        es_off = not any(p.requires_grad for p in model.esnet_parameters())
        enc_on = all(p.requires_grad for p in encoder)
        if phase == "joint":
            assert bsn_on and es_on and groups["bsn"]["lr"] > 0 and groups["esnet"]["lr"] > 0
        elif phase == "esnet":
            assert es_on and bsn_off and groups["bsn"]["lr"] == 0 and groups["esnet"]["lr"] > 0
        else:
            assert bsn_on and es_off and not enc_on and groups["esnet"]["lr"] == 0 and groups["bsn"]["lr"] > 0


def test_frozen_group_does_not_move_in_a_step():
    model = build_network(NetworkConfig.bsesnet(base_width=4, depth=4, prelim_width=8, detector_width=4, detector_hidden=8))
    opt = build_optimizer(model, {"lr_esnet": 1e-2, "lr_bsn": 1e-2, "weight_decay": 0.1})
    apply_phase(model, opt, "bsn", 19, 40)
    before_enc = [p.detach().clone() for p in model.encoder.parameters()]
    before_bsn = [p.detach().clone() for p in model.bsn_parameters()]
    out = model(torch.randn(2, 1, 32, 32))
    (out["prelim_mask"].square().mean() + out["boxes"].sum()).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before_enc, model.encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_bsn, model.bsn_parameters()))


def test_unet_config_has_only_esnet_group():
    cfg = load_config("unet")
    assert cfg["network"]["preset"] == "unet"
    model = build_network(NetworkConfig.unet(base_width=4, depth=4))
    opt = build_optimizer(model, cfg["optimizer"])
    assert [g["name"] for g in opt.param_groups] == ["esnet"]
    for name in ("bsesnet", "unet", "without_sag", "without_deep_supervision", "tiny_cpu"):
        load_config(name)  # every shipped config is valid
    with pytest.raises(ValueError):
        load_config({"epochz": 3})


def test_esnet_learning_rate_anneals_before_the_final_bsn_epochs():
    model = build_network(NetworkConfig.bsesnet(base_width=4, depth=4, prelim_width=8, detector_width=4, detector_hidden=8))
    opt = build_optimizer(model, {"lr_esnet": 1e-3, "lr_bsn": 1e-3, "weight_decay": 0.0})
    groups = {g["name"]: g for g in opt.param_groups}
    epochs, sched = 60, {**SCHED, "final_bsn_epochs": 10}
    span = esnet_training_epochs(epochs, sched)
    assert span == 50 and esnet_training_epochs(epochs, sched, has_bsn=False) == 60
    apply_phase(model, opt, "esnet", 48, epochs, 0.9, span)
    assert groups["esnet"]["lr"] == pytest.approx(1e-3 * (2 / 50) ** 0.9)  # as a 50-epoch U-Net's at epoch 48
    apply_phase(model, opt, "bsn", 55, epochs, 0.9, span)
    assert groups["bsn"]["lr"] == pytest.approx(1e-3 * (5 / 60) ** 0.9) and groups["esnet"]["lr"] == 0.0


def test_no_hidden_schedule_defaults():
    """The schedule's defaults live in the config only: a missing key is an error, not a second default
    (schedule.py used to fall back to final_bsn_epochs = 0 where the config says 10)."""
    with pytest.raises(KeyError):
        phase_for_epoch(15, 60, {})
    with pytest.raises(KeyError):
        esnet_training_epochs(60, {k: v for k, v in SCHED.items() if k != "final_bsn_epochs"})
    defaults = load_config()["schedule"]
    assert esnet_training_epochs(60, defaults) == 60 - defaults["final_bsn_epochs"]
