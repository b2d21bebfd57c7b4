"""A preset's lr0 follows the base: at most `lr0_base_ratio` times the lr0 the base was trained with, where the base
records an optimizer of the same family, not below 0.001; an lr0 the user gives is used as given."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, SHAPES_B1, TINY
from safetensors import safe_open
from ultralytics.utils import YAML

import lora_yolo.train
from lora_yolo.config import LoraConfig
from lora_yolo.errors import LoraYoloError
from lora_yolo.inspect import inspect_model
from lora_yolo.presets import capped_lr0, resolve_config
from lora_yolo.train import train

SHAPES_B2 = ROOT / "datasets" / "shapes-b2" / "data.yaml"  # classes the demo base has not: add_classes applies
DEMO_LR0 = 0.001429  # the demo base's own: AdamW, recorded in its train_args


@pytest.mark.parametrize(
    ("optimizer", "base_args", "ratio", "want"),
    [
        ("AdamW", {"optimizer": "AdamW", "lr0": 0.0005}, 2, 0.001),  # the benchmark's YOLOv8s: 0.003 would be 6x
        ("AdamW", {"optimizer": "Adam", "lr0": 0.0005}, 2, 0.001),  # Adam's variants share one lr scale
        ("AdamW", {"optimizer": "AdamW", "lr0": 0.001429}, 2, 0.002858),  # the demo base (what auto chose for it)
        ("AdamW", {"optimizer": "AdamW", "lr0": 0.000119}, 2, 0.001),  # auto's pick for 80 classes: the floor
        ("AdamW", {"optimizer": "AdamW", "lr0": 0.0005}, 0, 0.003),  # off
        ("AdamW", {"optimizer": "SGD", "lr0": 0.001}, 2, 0.003),  # an SGD lr says nothing about AdamW's
        ("SGD", {"optimizer": "AdamW", "lr0": 0.0005}, 2, 0.003),  # nor the other way round
        ("SGD", {"optimizer": "MuSGD", "lr0": 0.0008}, 2, 0.0016),  # MuSGD's lr is on SGD's scale
        ("AdamW", {"optimizer": "auto", "lr0": 0.0001}, 2, 0.003),  # auto chose its own lr and ignored lr0
        ("AdamW", {}, 2, 0.003),  # a YAML-built model records nothing
        ("AdamW", {"optimizer": "AdamW", "lr0": "high"}, 2, 0.003),  # a value that is not an lr
        ("AdamW", {"optimizer": "AdamW", "lr0": 0.0}, 2, 0.003),
    ],
)
def test_capped_lr0(optimizer, base_args, ratio, want):
    lr0, why = capped_lr0(0.003, optimizer, base_args, ratio)
    assert lr0 == pytest.approx(want, rel=1e-12)
    assert (why is None) == (want == 0.003)
    if want == 0.001:
        assert why == (
            f"lr0 0.003 lowered to 0.001: 2x the lr0 {base_args['lr0']:g} the base was trained with "
            f"({base_args['optimizer']}), at least 0.001; --lr0 (or lr0_base_ratio: 0 in a preset) trains at the lr0 "
            "as given"
        )


@pytest.mark.parametrize("bad", [-1, True, "2", float("inf")])
def test_lr0_base_ratio_is_checked(bad):
    with pytest.raises(LoraYoloError, match="lr0_base_ratio must be 0 \\(off\\) or a finite number > 0"):
        LoraConfig(lr0_base_ratio=bad)


def test_lr0_base_ratio_is_never_stored():
    """It only chose a run's lr0: adapters and lora.yaml (`to_dict`) leave it out, so versions before it read them."""
    assert LoraConfig(lr0_base_ratio=2).to_dict() == LoraConfig().to_dict()


@pytest.fixture
def reaching_trainer(monkeypatch):
    """The Ultralytics arguments that would reach the trainer: the run stops where the trainer would be built."""
    seen: list[dict] = []

    def no_trainer(kind, overrides, lora=None):
        seen.append({k: overrides[k] for k in ("optimizer", "lr0") if k in overrides})
        raise LoraYoloError("stop")

    monkeypatch.setattr(lora_yolo.train, "_trainer", no_trainer)
    return seen


@pytest.mark.parametrize(
    ("args", "want"),
    [
        ((), {"optimizer": "AdamW", "lr0": 2 * DEMO_LR0}),  # the preset's 0.003, lowered to twice the base's own
        (("--lr0", "0.003"), {"optimizer": "AdamW", "lr0": 0.003}),  # given: used as given
        (("lr0=0.004",), {"optimizer": "AdamW", "lr0": 0.004}),  # given as Ultralytics' key=value too
        (("optimizer=auto",), {"optimizer": "auto", "lr0": 0.003}),  # auto picks its own lr: nothing to lower
        (("optimizer=SGD",), {"optimizer": "SGD", "lr0": 0.003}),  # the base's AdamW lr says nothing about SGD's
    ],
)
def test_the_cli_lowers_only_the_presets_lr0(cli_here, tmp_path, demo_base, reaching_trainer, args, want):
    preset = tmp_path / "rule.yaml"
    preset.write_text("lr0_base_ratio: 2\ntrain:\n  optimizer: AdamW\n  lr0: 0.003\n")
    out = cli_here("train", SHAPES_B1, "--model", demo_base, "--config", preset, *args)
    assert out.returncode == 1 and reaching_trainer == [want]
    assert ("lr0 0.003 lowered to 0.002858: 2x the lr0 0.001429 the base" in out.stdout) == (not args)


def test_an_lr0_that_is_not_a_number_is_one_line_from_ultralytics(cli_here, tmp_path, demo_base):
    """The rule leaves a preset's bad lr0 alone, so Ultralytics' own argument check reports it: one line, no
    traceback."""
    preset = tmp_path / "bad.yaml"
    preset.write_text("lr0_base_ratio: 2\ntrain:\n  optimizer: AdamW\n  lr0: high\n")
    out = cli_here("train", SHAPES_B1, "--model", demo_base, "--config", preset)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: 'lr0=high' is of invalid type str")


def test_exact_add_classes_keeps_its_own_lr0(cli_here, tmp_path, demo_base, reaching_trainer):
    """Exact mode trains class-branch copies in full with its own AdamW 0.01: a preset's lr0, and its rule, do not
    apply (docs/training.md)."""
    preset = tmp_path / "rule.yaml"
    preset.write_text("lr0_base_ratio: 2\ntrain:\n  optimizer: AdamW\n  lr0: 0.003\n")
    out = cli_here("train", SHAPES_B2, "--model", demo_base, "--config", preset, "--add-classes", "exact")
    assert out.returncode == 1 and reaching_trainer == [{"optimizer": "AdamW", "lr0": 0.01}]
    assert "lowered" not in out.stdout


def test_the_library_lowers_lr0_by_the_config(demo_base, base_pt, reaching_trainer):
    """`train()` applies a config's ratio to the lr0 it is given; ratio 0, a base that records no optimizer (built
    from a YAML) or Ultralytics' default optimizer=auto (which ignores lr0) leave it as given. Without a config (the
    default preset) it lowers the preset's lr0 and uses the caller's as given, as the command line does."""
    for model, ratio in ((demo_base, 2), (demo_base, 0), (base_pt, 2)):
        with pytest.raises(LoraYoloError, match="stop"):
            train(SHAPES_B1, model=model, config=LoraConfig(lr0_base_ratio=ratio), optimizer="AdamW", lr0=0.003)
    for config, given in ((LoraConfig(lr0_base_ratio=2), {"lr0": 0.003}), (None, {}), (None, {"lr0": 0.003})):
        with pytest.raises(LoraYoloError, match="stop"):
            train(SHAPES_B1, model=demo_base, config=config, **given)
    lowered = pytest.approx(2 * DEMO_LR0)
    assert [s["lr0"] for s in reaching_trainer] == [lowered, 0.003, 0.003, 0.003, lowered, 0.003]
    assert "optimizer" not in reaching_trainer[3]  # auto: Ultralytics' default


def test_a_run_trains_at_the_lowered_lr0_and_its_adapter_leaves_the_rule_out(demo_base, tmp_path):
    """End to end through Ultralytics' trainer: the optimizer starts at the lowered lr0 (args.yaml records it), and
    the adapter and lora.yaml carry no lr0_base_ratio, which only chose that lr0: lora-yolo versions before it read
    them."""
    result = train(SHAPES_B1, model=demo_base, project=str(tmp_path), name="r", **{**TINY, "epochs": 1}, fraction=0.1)
    assert YAML.load(result.save_dir / "args.yaml")["lr0"] == pytest.approx(2 * DEMO_LR0)
    assert "lr0_base_ratio" not in YAML.load(result.save_dir / "lora.yaml")
    with safe_open(result.adapter, "pt") as f:
        assert "lr0_base_ratio" not in json.loads(f.metadata()["lora_config"])
    assert inspect_model(demo_base, resolve_config("default")[0]).adapter_bytes == result.adapter.stat().st_size
