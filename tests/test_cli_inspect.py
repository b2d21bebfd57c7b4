"""`lora-yolo inspect`: table and JSON agree with the library; bad options are usage errors."""

from __future__ import annotations

import json

import pytest

from lora_yolo import inspect_model, load_model
from lora_yolo.presets import resolve_config


def test_inspect_json_totals(base_pt, cli_here):
    out = cli_here("inspect", str(base_pt), "--json", "--targets", "head", "--rank", "4", "--no-train-head")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    config = resolve_config("default", targets=["head"], r=4, train_head=False)[0]  # what the CLI builds
    report = inspect_model(base_pt, config)
    assert data["totals"]["lora_params"] == report.lora_params == sum(r["lora_params"] for r in data["layers"])
    assert data["totals"]["adapter_bytes"] == report.adapter_bytes


@pytest.mark.parametrize("flag, params", [("--train-bias", True), ("--no-train-bias", False)])
def test_train_bias_flag_reaches_the_config(base_pt, cli_here, flag, params):
    data = json.loads(cli_here("inspect", str(base_pt), "--json", "--targets", "neck", flag).stdout)
    config = resolve_config("default", targets=["neck"], train_bias=params)[0]  # what the CLI builds
    report = inspect_model(base_pt, config)
    assert data["totals"]["bias_params"] == report.bias_params and (report.bias_params > 0) == params
    assert data["totals"]["adapter_bytes"] == report.adapter_bytes


def test_inspect_table_on_yaml(cli_here):
    out = cli_here("inspect", "yolo11n.yaml")
    assert out.returncode == 0, out.stderr
    assert "model.10.m.0.attn.qkv.conv" in out.stdout and "LoRA params:" in out.stdout


def test_bad_rank_is_usage_error(cli_here):
    out = cli_here("inspect", "yolo11n.yaml", "--rank", "0")
    assert out.returncode == 2 and "r must be a positive integer" in out.stderr and "Traceback" not in out.stderr


def test_missing_model_is_one_line_error(cli_here):
    out = cli_here("inspect", "no/such/model.pt")
    assert out.returncode == 1 and out.stderr.strip() == "error: model file not found: no/such/model.pt"


def test_inspect_dora_adds_one_parameter_per_output_channel(base_pt, cli_here):
    plain = json.loads(cli_here("inspect", str(base_pt), "--json", "--targets", "neck", "--no-dora").stdout)
    dora = json.loads(cli_here("inspect", str(base_pt), "--json", "--targets", "neck", "--dora").stdout)
    model = load_model(base_pt)
    extra = sum(model.get_submodule(r["name"]).out_channels for r in plain["layers"] if r["lora_params"])
    assert extra > 0 and dora["totals"]["lora_params"] == plain["totals"]["lora_params"] + extra


def test_first_layer_option(cli_here):
    out = cli_here("inspect", "yolo11n.yaml", "--json", "--first-layer", "6")
    assert out.returncode == 0, out.stderr
    layers = json.loads(out.stdout)["layers"]
    assert all(int(r["name"].split(".")[1]) >= 6 for r in layers if r["selected"])
    assert any(r["reason"] == "before first_layer 6" for r in layers)
    bad = cli_here("inspect", "yolo11n.yaml", "--first-layer", "-1")
    assert bad.returncode == 2 and "first_layer must be a layer index" in bad.stderr


def test_clamp_rank_option(cli_here):
    rows = {}
    for flag in ("--no-clamp-rank", "--clamp-rank"):
        out = cli_here("inspect", "yolo11n.yaml", "--json", "--no-dora", "--rank", "32", "--alpha", "64", flag)
        assert out.returncode == 0, out.stderr
        rows[flag] = {r["name"]: r for r in json.loads(out.stdout)["layers"]}
    assert not rows["--no-clamp-rank"]["model.0.conv"]["selected"]  # 3 -> 16 channels: limit 16 < rank 32
    stem = rows["--clamp-rank"]["model.0.conv"]
    assert stem["selected"] and (stem["r"], stem["lora_alpha"], stem["lora_params"]) == (16, 32.0, 16 * (27 + 16))


def test_inspect_with_add_classes_shows_what_training_adapts(base_pt):
    """add_classes: the class branches are never adapted (a copy beside each trains), exact mode adapts nothing, and
    the table says the adapter also holds the copies."""
    from lora_yolo import LoraConfig, LoraYoloError
    from lora_yolo.targets import branch_paths, class_layers, select_targets

    model = load_model(base_pt)
    branches = tuple(f"{p}." for p in branch_paths(class_layers(model), dict(model.named_modules())))
    adapted = inspect_model(base_pt, LoraConfig(add_classes="adapted"))
    in_branches = [row for row in adapted.layers if row.name.startswith(branches)]
    assert len(in_branches) == 3 * 5 and not any(row.selected for row in in_branches)  # yolo11n: 5 convs a branch
    assert sum(row.selected for row in adapted.layers) > 50
    exact = inspect_model(base_pt, LoraConfig(add_classes="exact"))
    assert not any(row.selected for row in exact.layers) and exact.lora_params == 0
    assert "plus a copy of each class branch" in exact.table()
    only_classes = LoraConfig(add_classes="adapted", targets=[], include=[r"model\.23\.cv3\."])
    with pytest.raises(LoraYoloError, match=r"left out, e\.g\. model\.23\.cv3\.0\.0\.0\.conv: class branch kept"):
        select_targets(model, only_classes)  # the branch is the reason, before the conv's own (depthwise here)
    with pytest.raises(LoraYoloError, match=r"^add_classes needs a Detect head's class branches to add beside; "):
        inspect_model("yolo11n-cls.yaml", LoraConfig(add_classes="adapted"))
