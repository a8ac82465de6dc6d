"""Tests of the BS-ESNet network (ParaspinalSegLib.network): shapes, switches, gradients, SAG, boxes."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="the network tests need torch")
import torch.nn.functional as F  # noqa: E402

from ParaspinalSegLib.network import (  # noqa: E402
    SAG_BIAS_INIT,
    SAG_WEIGHT_INIT,
    BSESNet,
    NetworkConfig,
    build_network,
    coordinate_channels,
    count_parameters,
    rasterise_boxes_torch,
)

CONFIGS = {
    "bsesnet": NetworkConfig.bsesnet,
    "unet": NetworkConfig.unet,
    "without_sag": NetworkConfig.without_sag,
    "without_deep_supervision": NetworkConfig.without_deep_supervision,
}
#: Which optional outputs each configuration must (and must not) produce.
EXPECTED_KEYS = {
    "bsesnet": {"prelim_mask", "boxes", "sag_key", "attention"},
    "unet": set(),
    "without_sag": {"prelim_mask", "boxes"},
    "without_deep_supervision": {"prelim_mask", "boxes", "sag_key", "attention"},
}
SMALL = dict(base_width=4)  # same topology (depth 5), narrow, so the tests stay fast on 2 shared cores


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _small(name: str, **kw) -> BSESNet:
    return build_network(CONFIGS[name](**{**SMALL, **kw}))


def _labels(batch: int, h: int, w: int) -> torch.Tensor:
    """Synthetic label map with every class present: vertical stripes 0..9."""
    cols = torch.arange(w) * 10 // w
    return cols.view(1, 1, w).expand(batch, h, w).clone()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch,h,w", [(1, 64, 64), (2, 96, 128), (2, 64, 32)])
def test_output_keys_and_shapes(name: str, batch: int, h: int, w: int) -> None:
    model = _small(name).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 1, h, w))
    cfg = model.config
    assert set(out) == {"logits", "deep_supervision"} | EXPECTED_KEYS[name]
    assert out["logits"].shape == (batch, 10, h, w)
    if cfg.deep_supervision:
        # decoder levels 3, 2, 1 (coarse → fine), each at its own resolution
        assert [tuple(t.shape) for t in out["deep_supervision"]] == [
            (batch, 10, h // 8, w // 8),
            (batch, 10, h // 4, w // 4),
            (batch, 10, h // 2, w // 2),
        ]
    else:
        assert out["deep_supervision"] == []
    if cfg.use_bsn:
        assert out["prelim_mask"].shape == (batch, 10, h // 4, w // 4)
        assert out["boxes"].shape == (batch, 9, 4)
        assert out["boxes"].min() >= 0 and out["boxes"].max() <= 1
    if cfg.use_sag:
        assert out["sag_key"].shape == (batch, 10, h // 4, w // 4)
        assert out["attention"].shape == (batch, 1, h // 4, w // 4)


def test_default_network_at_256() -> None:
    cfg = NetworkConfig()
    assert cfg == NetworkConfig.bsesnet()
    assert (cfg.in_channels, cfg.num_classes, cfg.base_width, cfg.depth) == (1, 10, 16, 5)
    model = build_network().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 256, 256))
    assert out["logits"].shape == (1, 10, 256, 256)
    assert out["prelim_mask"].shape == out["sag_key"].shape == (1, 10, 64, 64)
    assert out["attention"].shape == (1, 1, 64, 64)
    assert out["boxes"].shape == (1, 9, 4)
    assert [t.shape[-1] for t in out["deep_supervision"]] == [32, 64, 128]


def test_architecture_structure() -> None:
    model = build_network()
    assert len(model.encoder) == 5
    widths = [block[0].out_channels for block in model.encoder]
    assert widths == [16, 32, 64, 128, 256]
    assert isinstance(model.bsn.detectors, torch.nn.ModuleList) and len(model.bsn.detectors) == 9
    # detectors are independent modules (no shared parameters) and small
    ids = [{id(p) for p in d.parameters()} for d in model.bsn.detectors]
    assert all(a.isdisjoint(b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    for det in model.bsn.detectors:
        assert det.conv1.in_channels == 3  # structure map + x + y (CoordConv)
        assert count_parameters(det) < 100_000
    assert model.sag.gate.in_channels == 9 and model.sag.gate.out_channels == 1
    assert 1_000_000 < count_parameters(model) < 5_000_000


def test_unet_has_no_bsn_or_sag_modules() -> None:
    model = _small("unet")
    assert model.bsn is None and model.sag is None and model.ds_heads is None
    assert list(model.bsn_parameters()) == []
    full = _small("bsesnet")
    assert count_parameters(model) < count_parameters(full)


def _full_loss(out: dict, labels: torch.Tensor) -> torch.Tensor:
    """CE on logits, deep supervision, both preliminary masks; smooth-L1 + MSE on boxes (as the paper)."""
    loss = F.cross_entropy(out["logits"], labels)
    for t in out["deep_supervision"]:
        loss = loss + F.cross_entropy(t, F.interpolate(labels[:, None].float(), size=t.shape[-2:]).long()[:, 0])
    quarter = labels[:, ::4, ::4]
    for key in ("prelim_mask", "sag_key"):
        if key in out:
            loss = loss + F.cross_entropy(out[key], quarter)
    if "boxes" in out:
        target = torch.rand_like(out["boxes"])
        loss = loss + F.smooth_l1_loss(out["boxes"], target) + F.mse_loss(out["boxes"], target)
    return loss


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradient_reaches_every_parameter(name: str) -> None:
    model = _small(name).train()
    x = torch.randn(2, 1, 64, 64)
    _full_loss(model(x), _labels(2, 64, 64)).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []
    if model.config.use_bsn:
        for k, det in enumerate(model.bsn.detectors):
            for n, p in det.named_parameters():
                assert p.grad is not None and torch.any(p.grad != 0), f"detector {k} {n}"
    if model.config.use_sag:
        for n, p in model.sag.named_parameters():
            assert p.grad is not None and torch.any(p.grad != 0), f"sag {n}"


def test_sag_uses_detached_boxes() -> None:
    # The segmentation loss alone must not train the detectors: the SAG query is rasterised from
    # detached boxes (detection is trained by the box loss only, as the asynchronous schedule expects).
    model = _small("bsesnet").train()
    out = model(torch.randn(1, 1, 64, 64))
    F.cross_entropy(out["logits"], _labels(1, 64, 64)).backward()
    assert all(p.grad is None for p in model.bsn.detectors.parameters())
    assert all(p.grad is not None for p in model.sag.parameters())


def test_box_loss_trains_preliminary_mask_generator() -> None:
    # Segment-then-detect is end to end: the box loss reaches the preliminary mask generator.
    model = _small("without_sag").train()
    out = model(torch.randn(1, 1, 64, 64))
    F.smooth_l1_loss(out["boxes"], torch.full_like(out["boxes"], 0.3)).backward()
    assert all(p.grad is not None and torch.any(p.grad != 0) for p in model.bsn.prelim.parameters())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_groups_partition_the_model(name: str) -> None:
    model = _small(name)
    bsn = [id(p) for p in model.bsn_parameters()]
    esnet = [id(p) for p in model.esnet_parameters()]
    everything = {id(p) for p in model.parameters()}
    assert set(bsn).isdisjoint(esnet)
    assert set(bsn) | set(esnet) == everything
    assert len(bsn) + len(esnet) == len(everything)
    if model.config.use_bsn:
        assert {id(p) for p in model.bsn.detectors.parameters()} <= set(bsn)
        assert {id(p) for p in model.bsn.prelim.parameters()} <= set(bsn)
        assert {id(p) for p in model.encoder.parameters()} <= set(esnet)
    if model.config.use_sag:
        assert {id(p) for p in model.sag.parameters()} <= set(esnet)


def test_rasterise_known_boxes() -> None:
    h, w = 8, 10
    # Box 0: rows 2..4 and columns 3..6 of a mask → (cx, cy, w, h) as in the contract.
    box0 = [(3 + 7) / 2 / w, (2 + 5) / 2 / h, (7 - 3) / w, (5 - 2) / h]
    # Box 1: non-integer edges x 2.4..5.6, y 0.1..1.4 → centres 2.5..5.5 (columns 2..5), 0.5 (row 0).
    box1 = [4.0 / w, 0.75 / h, 3.2 / w, 1.3 / h]
    # Box 2: empty (zero size) → no pixel.
    box2 = [0.5, 0.5, 0.0, 0.0]
    # Box 3: edges exactly on pixel centres x 1.5..4.5, y 3.5..6.5: half-open [x0, x1) like boxes.py
    # → columns 1..3, rows 3..5 (float64: 0.3 is not exact in float32, which would move the edge).
    box3 = [3.0 / w, 5.0 / h, 3.0 / w, 3.0 / h]
    boxes = torch.tensor([[box0, box1, box2, box3]], dtype=torch.float64)
    maps = rasterise_boxes_torch(boxes, h, w)
    assert maps.shape == (1, 4, h, w) and maps.dtype == torch.float64
    expected = torch.zeros(4, h, w)
    expected[0, 2:5, 3:7] = 1
    expected[1, 0:1, 2:6] = 1
    expected[3, 3:6, 1:4] = 1
    assert torch.equal(maps[0], expected)
    assert set(maps.unique().tolist()) <= {0.0, 1.0}


def test_rasterise_full_image_and_batch() -> None:
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0]], [[0.25, 0.75, 0.5, 0.5]]])
    maps = rasterise_boxes_torch(boxes, 4, 4)
    assert maps.dtype == torch.float32
    assert maps[0, 0].sum() == 16
    expected = torch.zeros(4, 4)
    expected[2:4, 0:2] = 1  # cy 0.75 → lower rows, cx 0.25 → first columns
    assert torch.equal(maps[1, 0], expected)
    assert rasterise_boxes_torch(boxes.double(), 4, 4).dtype == torch.float64
    with pytest.raises(ValueError, match=r"\(B, N, 4\)"):
        rasterise_boxes_torch(torch.zeros(3, 4), 4, 4)


def test_rasterise_matches_numpy_boxes_module() -> None:
    boxes_mod = pytest.importorskip("ParaspinalSegLib.boxes", reason="boxes.py not written yet")
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(1)
    h, w = 24, 32
    # Edges on whole, half (pixel centres: the ties) and arbitrary pixel positions, plus masks' own boxes.
    c0 = np.concatenate([rng.integers(0, w - 8, 30) + rng.choice([0.0, 0.5], 30), rng.uniform(0, w - 8, 30)])
    c1 = c0 + np.concatenate([rng.integers(0, 8, 30) + rng.choice([0.0, 0.5], 30), rng.uniform(0, 8, 30)])
    r0 = np.concatenate([rng.integers(0, h - 8, 30) + rng.choice([0.0, 0.5], 30), rng.uniform(0, h - 8, 30)])
    r1 = r0 + np.concatenate([rng.integers(0, 8, 30) + rng.choice([0.0, 0.5], 30), rng.uniform(0, 8, 30)])
    boxes = np.stack([(c0 + c1) / 2 / w, (r0 + r1) / 2 / h, (c1 - c0) / w, (r1 - r0) / h], axis=1).astype(np.float32)
    ours = rasterise_boxes_torch(torch.from_numpy(boxes)[None], h, w)[0].numpy().astype(bool)
    theirs = np.asarray(boxes_mod.rasterise_boxes(boxes, h, w)).astype(bool)
    assert theirs.shape == ours.shape
    assert (ours == theirs).all()
    # and a mask's own box rasterises back to exactly its bounding rectangle in both
    mask = np.zeros((h, w), bool)
    mask[5:11, 7:20] = True
    box = np.asarray(boxes_mod.normalised_box(*boxes_mod.box_from_mask(mask), h, w), np.float32)
    back = rasterise_boxes_torch(torch.from_numpy(box)[None, None], h, w)[0, 0].numpy().astype(bool)
    assert (back == mask).all()


def test_attention_follows_documented_formula() -> None:
    # α = sigmoid(conv1×1(Q⊙K + K)), Q = rasterised (detached) boxes at H/4, K = softmax(sag_key)[1:].
    model = _small("bsesnet").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 96))
        key = torch.softmax(out["sag_key"], dim=1)[:, 1:]
        query = rasterise_boxes_torch(out["boxes"], 16, 24)
        expected = torch.sigmoid(model.sag.gate(query * key + key))
    torch.testing.assert_close(out["attention"], expected)
    # at initialisation α starts between sigmoid(b) and sigmoid(b + 2w): features are not zeroed
    lo = 1 / (1 + math.exp(-SAG_BIAS_INIT))
    hi = 1 / (1 + math.exp(-(SAG_BIAS_INIT + 2 * SAG_WEIGHT_INIT)))
    assert out["attention"].min() >= lo - 1e-6 and out["attention"].max() <= hi + 1e-6


def test_attention_is_larger_inside_boxes() -> None:
    # The gate's initial direction: for the same key, a pixel inside a box gets more attention.
    model = _small("bsesnet")
    feats = torch.randn(1, model.sag.key_head.in_channels, 16, 16)
    inside = torch.tensor([[[0.5, 0.5, 1.0, 1.0]] * 9])
    outside = torch.tensor([[[0.5, 0.5, 0.0, 0.0]] * 9])
    with torch.no_grad():
        _, _, a_in = model.sag(feats, inside)
        _, _, a_out = model.sag(feats, outside)
    assert torch.all(a_in > a_out)


@pytest.mark.parametrize("sag_apply,finer_levels_gated", [("quarter", False), ("all", True)])
def test_sag_apply_says_which_decoder_levels_the_gate_scales(sag_apply: str, finer_levels_gated: bool) -> None:
    # Closing the gate (α → 0) zeroes the gated features. With "all" the final features are gated too, so
    # every logit collapses to the head's bias; with "quarter" the encoder skips still reach the head.
    model = _small("bsesnet", sag_apply=sag_apply).eval()
    with torch.no_grad():
        model.sag.gate.weight.zero_()
        model.sag.gate.bias.fill_(-80.0)
        out = model(torch.randn(1, 1, 64, 64))
    assert float(out["attention"].max()) < 1e-30
    bias = model.head.bias.view(1, -1, 1, 1).expand_as(out["logits"])
    assert torch.allclose(out["logits"], bias, atol=1e-5) is finer_levels_gated
    with pytest.raises(ValueError, match="sag_apply"):
        NetworkConfig(sag_apply="everywhere")


def test_bsn_only_forward_gives_the_same_bsn_outputs() -> None:
    model = _small("bsesnet").eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        full, short = model(x), model(x, bsn_only=True)
    assert set(short) == {"prelim_mask", "boxes"}
    torch.testing.assert_close(short["prelim_mask"], full["prelim_mask"], rtol=0, atol=0)
    torch.testing.assert_close(short["boxes"], full["boxes"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="plain U-Net"):
        _small("unet")(x, bsn_only=True)


def test_coordinate_channels() -> None:
    c = coordinate_channels(2, 4, 8, device=torch.device("cpu"), dtype=torch.float32)
    assert c.shape == (2, 2, 4, 8)
    torch.testing.assert_close(c[0, 0, 0], (torch.arange(8) + 0.5) / 4 - 1)  # x varies along columns
    torch.testing.assert_close(c[0, 1, :, 0], (torch.arange(4) + 0.5) / 2 - 1)  # y varies along rows
    assert c.min() > -1 and c.max() < 1


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 1, 60, 64), "multiples of 2\\*\\*\\(depth-1\\) = 16"),
        ((1, 1, 64, 72), "multiples"),
        ((1, 1, 16, 16), "too small"),
        ((1, 3, 64, 64), "3 channel"),
        ((1, 64, 64), "shape"),
        ((64, 64), "shape"),
    ],
)
def test_invalid_input_raises(shape: tuple, match: str) -> None:
    model = _small("bsesnet")
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_config_round_trip_and_rejects_unknown_keys() -> None:
    for factory in CONFIGS.values():
        cfg = factory(base_width=8, detector_hidden=32)
        d = cfg.to_dict()
        assert NetworkConfig.from_dict(d) == cfg
        import json

        assert NetworkConfig.from_dict(json.loads(json.dumps(d))) == cfg
    # a model rebuilt from the dict accepts the original's weights exactly
    model = _small("bsesnet")
    clone = build_network(model.config.to_dict())
    clone.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(ValueError, match="unknown network config key.*'attention_heads'"):
        NetworkConfig.from_dict({**NetworkConfig().to_dict(), "attention_heads": 8})
    assert NetworkConfig.from_dict({"base_width": 8}) == NetworkConfig(base_width=8)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="use_sag=True requires use_bsn=True"):
        NetworkConfig(use_bsn=False, use_sag=True)
    with pytest.raises(ValueError, match="requires use_bsn"):
        NetworkConfig.unet(use_sag=True)
    with pytest.raises(ValueError, match="depth"):
        NetworkConfig(depth=2)
    with pytest.raises(ValueError, match="requires depth ≥ 4"):
        NetworkConfig(depth=3)  # the SAG would be built but never applied
    NetworkConfig.without_sag(depth=3)  # fine without the gate
    with pytest.raises(ValueError, match="base_width"):
        NetworkConfig(base_width=0)
    with pytest.raises(ValueError, match="use_bsn"):
        NetworkConfig(use_bsn="yes")
    with pytest.raises(TypeError):
        build_network("bsesnet")


def test_other_depth_and_width() -> None:
    model = build_network(NetworkConfig(base_width=4, depth=4))
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 1, 48, 32))
    assert out["logits"].shape == (1, 10, 48, 32)
    assert [tuple(t.shape[-2:]) for t in out["deep_supervision"]] == [(12, 8), (24, 16)]
    assert out["attention"].shape == (1, 1, 12, 8)


def test_eval_forward_is_deterministic() -> None:
    model = _small("bsesnet").eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a, b = model(x), model(x)
    for key in ("logits", "prelim_mask", "sag_key", "boxes", "attention"):
        assert torch.equal(a[key], b[key]), key
    for s, t in zip(a["deep_supervision"], b["deep_supervision"]):
        assert torch.equal(s, t)
    # batch items are independent (InstanceNorm, no batch statistics)
    with torch.no_grad():
        single = model(x[1:])
    torch.testing.assert_close(single["logits"][0], a["logits"][1], rtol=1e-4, atol=1e-5)


def test_count_parameters() -> None:
    model = _small("unet")
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.head.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.head.weight.numel()


def test_sag_boxes_replace_the_detected_query() -> None:
    model = _small("bsesnet").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
        same = model(x, sag_boxes=out["boxes"])
        empty = model(x, sag_boxes=torch.zeros_like(out["boxes"]))
    torch.testing.assert_close(same["logits"], out["logits"], rtol=0, atol=0)
    torch.testing.assert_close(empty["boxes"], out["boxes"])  # the BSN's own output is still reported
    assert not torch.allclose(empty["attention"], out["attention"])  # an empty query lowers α inside boxes
    assert not torch.allclose(empty["logits"], out["logits"])
