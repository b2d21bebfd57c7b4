"""Target selection: presets from the model YAML, regexes, per-layer ranks, clear errors."""

from __future__ import annotations

import pytest
import torch

from lora_yolo import LoraConfig, LoraYoloError, describe_convs, load_model, select_targets
from lora_yolo.targets import ConvLayer


@pytest.fixture(scope="module")
def yolo11n():
    return load_model("yolo11n.yaml")


def names(rows: list[ConvLayer]) -> set[str]:
    return {r.name for r in rows if r.selected}


def test_default_adapts_every_ungrouped_conv(yolo11n):
    rows = describe_convs(yolo11n, LoraConfig())
    chosen = names(rows)
    assert {"model.0.conv", "model.13.cv1.conv", "model.23.cv2.0.2", "model.10.m.0.attn.qkv.conv"} <= chosen
    assert "model.23.dfl.conv" not in chosen
    depthwise = [r for r in rows if r.kind == "depthwise"]
    assert depthwise and all(not r.selected and "not supported" in r.reason for r in depthwise)
    assert all(r.selected for r in rows if r.groups == 1 and "dfl" not in r.name)


def test_neck_head_preset_leaves_the_backbone_alone(yolo11n):
    from lora_yolo.presets import resolve_config

    config, train_args = resolve_config("neck_head")
    rows = describe_convs(yolo11n, config)
    assert {"model.13.cv1.conv", "model.23.cv2.0.2", "model.10.m.0.attn.qkv.conv"} <= names(rows)
    assert not any(r.section == "backbone" and r.selected and r.kind != "attention" for r in rows)
    assert train_args == {"optimizer": "AdamW", "lr0": 0.02}


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo11s.yaml", "yolov8n.yaml"])
def test_presets_fit_other_scales_and_yolov8(cfg):
    model = load_model(cfg)
    n_backbone = len(model.yaml["backbone"])
    for preset in ("backbone", "neck", "head"):
        rows = [r for r in describe_convs(model, LoraConfig(targets=[preset])) if r.selected]
        assert rows, preset
        for r in rows:
            index = int(r.name.split(".")[1])
            assert {
                "backbone": index < n_backbone,
                "neck": n_backbone <= index < len(model.model) - 1,
                "head": index == len(model.model) - 1,
            }[preset]
    attention = [r for r in describe_convs(model, LoraConfig(targets=["attention"], include=["x^"])) if r.selected]
    assert bool(attention) == cfg.startswith("yolo11")  # YOLOv8 has no C2PSA


def test_include_exclude_and_patterns(yolo11n):
    config = LoraConfig(
        targets=["head"],
        include=[r"^model\.9\."],
        exclude=[r"cv3"],
        rank_pattern={r"cv2\.0": 4},
        alpha_pattern={r"model\.9\.": 3.0},
    )
    rows = {r.name: r for r in describe_convs(yolo11n, config)}
    assert rows["model.9.cv1.conv"].selected and rows["model.9.cv1.conv"].lora_alpha == 3.0
    assert not rows["model.23.cv3.0.2"].selected and rows["model.23.cv3.0.2"].reason == "excluded"
    assert rows["model.23.cv2.0.0.conv"].r == 4 and rows["model.23.cv2.1.0.conv"].r == 8


def test_empty_selection_names_nearest_layers(yolo11n):
    with pytest.raises(LoraYoloError, match=r"matches no .*nearest layer names: .*model\.1"):
        select_targets(yolo11n, LoraConfig(targets=[], include=[r"model\.1\.cnv"]))


def test_rank_above_layer_capacity_is_an_error(yolo11n):
    with pytest.raises(LoraYoloError, match="model.23.cv2.0.2"):
        select_targets(yolo11n, LoraConfig(targets=["head"], rank_pattern={r"cv2\.0\.2": 65}))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 0},
        {"r": -1},
        {"r": 2.5},
        {"lora_alpha": 0},
        {"lora_dropout": 1.0},
        {"lora_dropout": -0.1},
        {"targets": ["neckk"]},
        {"include": ["("]},
    ],
)
def test_bad_config_values_name_the_field(kwargs):
    with pytest.raises(LoraYoloError, match=next(iter(kwargs)).split("_")[0] if "targets" not in kwargs else "preset"):
        LoraConfig(**kwargs)


def test_inspect_totals_equal_sum_of_layers_and_real_params(yolo11n):
    from lora_yolo import add_lora, inspect_model

    report = inspect_model("yolo11n.yaml", LoraConfig())
    assert report.lora_params == sum(r.lora_params for r in report.layers)
    assert report.base_params == sum(p.numel() for p in yolo11n.parameters())
    torch.manual_seed(0)
    model = load_model("yolo11n.yaml")
    add_lora(model, select_targets(model, LoraConfig()))
    real = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert real == report.lora_params
    for r in report.layers:
        if r.selected:
            assert r.lora_params == r.r * r.in_channels * r.kernel**2 + r.out_channels * r.r


@pytest.mark.parametrize("first", [4, 6])
def test_first_layer_leaves_the_layers_before_it_without_adapters(yolo11n, first):
    every = names(describe_convs(yolo11n, LoraConfig()))
    rows = describe_convs(yolo11n, LoraConfig(first_layer=first))
    index = {r.name: int(r.name.split(".")[1]) for r in rows}
    assert names(rows) == {n for n in every if index[n] >= first}
    assert all(r.reason == f"before first_layer {first}" for r in rows if index[r.name] < first and r.name in every)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "4"])
def test_first_layer_must_be_an_index(bad):
    with pytest.raises(LoraYoloError, match="first_layer must be a layer index"):
        LoraConfig(first_layer=bad)


def test_first_layer_is_stored_only_when_used():
    """Left out at 0, so adapters that do not use it stay readable by lora-yolo versions that refuse unknown keys."""
    assert "first_layer" not in LoraConfig().to_dict()
    assert LoraConfig.from_dict(LoraConfig(first_layer=4).to_dict()).first_layer == 4


@pytest.mark.parametrize("rslora", [False, True])
def test_clamp_rank_adapts_small_layers_at_their_limit_with_the_same_scale(yolo11n, rslora):
    """Rank 32 leaves YOLO11n's stem and small C3k2 convs frozen (limit min(out, in*k*k) below 32); clamp_rank adapts
    them at that limit, with alpha scaled so alpha / r (alpha / sqrt(r) with rsLoRA) is the layer's usual scale."""
    from lora_yolo.layer import lora_param_count, lora_scaling, max_rank

    plain = describe_convs(yolo11n, LoraConfig(r=32, lora_alpha=64, use_rslora=rslora))
    small = {r.name for r in plain if r.reason.startswith("rank 32 > its limit")}
    assert "model.0.conv" in small and len(small) >= 5
    clamped = {r.name: r for r in describe_convs(yolo11n, LoraConfig(r=32, lora_alpha=64, use_rslora=rslora,
                                                                      clamp_rank=True))}  # fmt: skip
    modules = dict(yolo11n.named_modules())
    for name in small:
        row, conv = clamped[name], modules[name]
        assert row.selected and row.r == max_rank(conv) < 32
        assert lora_scaling(row.r, row.lora_alpha, rslora) == pytest.approx(lora_scaling(32, 64, rslora))
        assert row.lora_params == lora_param_count(conv, row.r)
    assert all(clamped[r.name].r == 32 and clamped[r.name].lora_alpha == 64 for r in plain if r.selected)
    assert "clamp_rank" not in LoraConfig().to_dict() and LoraConfig(clamp_rank=True).to_dict()["clamp_rank"]


def test_clamped_adapters_merge_exactly(base_pt):
    from conftest import head_output, random_adapter

    from lora_yolo import attach_adapter, merge_lora

    _, adapter = random_adapter(base_pt, LoraConfig(r=32, lora_alpha=64, use_dora=True, clamp_rank=True))
    assert adapter.layers["model.0.conv"] == (16, 32.0)  # the stem: 3 -> 16 channels, limit 16
    x = torch.rand(1, 3, 64, 64)
    unmerged = head_output(attach_adapter(load_model(base_pt), adapter), x)
    merged = head_output(merge_lora(attach_adapter(load_model(base_pt), adapter)), x)
    assert torch.allclose(unmerged, merged, rtol=1e-4, atol=1e-4)
    assert (unmerged - head_output(load_model(base_pt), x)).abs().max() > 1e-3
