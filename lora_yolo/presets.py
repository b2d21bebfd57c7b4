"""Read LoRA presets: `configs/*.yaml` by name or any YAML file by path, with command-line values on top.

A preset file holds LoraConfig fields at the top level and, optionally, a `train:` mapping of Ultralytics training
arguments (lr0, epochs, ...) that pass through to the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lora_yolo.classes import PRESET_LR
from lora_yolo.config import LoraConfig, positive_number
from lora_yolo.errors import LoraYoloError

CONFIG_DIR = Path(__file__).parent / "configs"
ADD_CLASSES_PRESET = "dora_r32"  # what add_classes trains with unless a preset is given


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_preset(source: str | Path) -> dict[str, Any]:
    """The raw mapping of a preset name (`default`) or a YAML path; errors name the file and the problem."""
    path = Path(source)
    if not path.suffix:
        if str(source) not in preset_names():
            raise LoraYoloError(f"unknown preset {str(source)!r}; presets: {', '.join(preset_names())}")
        path = CONFIG_DIR / f"{source}.yaml"
    if not path.is_file():
        raise LoraYoloError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LoraYoloError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LoraYoloError(f"{path} must hold a mapping of LoRA settings, got {type(data).__name__}")
    return data


def resolve_config(source: str | Path | None, **overrides: Any) -> tuple[LoraConfig, dict[str, Any]]:
    """LoraConfig and Ultralytics train arguments from a preset, with non-None `overrides` taking precedence.

    Example:
        >>> config, train_args = resolve_config("head_only", r=4)
    """
    if source is None and overrides.get("add_classes"):  # the default's gain is its head trained in full, which
        source = ADD_CLASSES_PRESET  # add_classes keeps as the base's: its adapters use the recipe it was measured with
    data = read_preset(source or "default")
    train_args = data.pop("train", None) or {}
    if not isinstance(train_args, dict):
        raise LoraYoloError(f"'train' in {source} must be a mapping of Ultralytics arguments")
    for kept in ("train_head", "train_bias"):  # add_classes keeps the base's head and biases, so a preset's
        if overrides.get("add_classes") and overrides.get(kept) is None:  # train_head / train_bias does not apply;
            data.pop(kept, None)  # asked for with it, both are refused
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = LoraConfig.from_dict(data)
    if config.add_classes == "exact":  # no adapter to train: the preset's optimizer and lr0 do not apply (train()
        train_args = {k: v for k, v in train_args.items() if k not in PRESET_LR}  # sets exact mode's own)
    return config, train_args


# Optimizers whose learning rates are on one scale: Ultralytics' Adam variants, and SGD with MuSGD (its SGD-based
# hybrid, which optimizer=auto picks for long runs at SGD's 0.01)
FAMILIES = {"adam": "adam", "adamw": "adam", "nadam": "adam", "radam": "adam", "adamax": "adam", "musgd": "sgd"}
# The rule never lowers lr0 below the lowest lr the benchmark measured it at: a base trained at a far smaller lr (as
# Ultralytics' optimizer=auto picks for many classes, 0.002 x 5 / (4 + nc)) is outside what was measured
LR0_FLOOR = 1e-3


def optimizer_family(name: str) -> str:
    """The family an optimizer's learning rate is comparable within (`FAMILIES`), else its own lowercase name."""
    return FAMILIES.get(name.lower(), name.lower())


def base_lr0(base_args: dict[str, Any]) -> tuple[str, float] | None:
    """The optimizer and lr0 a checkpoint was trained with, from its recorded training arguments, where it names its
    optimizer. Ultralytics 8.4 records the optimizer and lr that `optimizer=auto` chose; earlier versions record
    `auto` and an lr0 that auto ignored, which says nothing; a YAML-built model records nothing."""
    optimizer, lr0 = base_args.get("optimizer"), base_args.get("lr0")
    if not isinstance(optimizer, str) or optimizer.lower() in ("", "auto") or not positive_number(lr0):
        return None
    return optimizer, float(lr0)


def capped_lr0(lr0: float, optimizer: str, base_args: dict[str, Any], ratio: float) -> tuple[float, str | None]:
    """`lr0` for `optimizer`, at most `ratio` times the lr0 the base was trained with (`base_lr0`) where it used an
    optimizer of the same family, but not below `LR0_FLOOR`; and why it was lowered (None when it was not). Ratio 0
    is off.

    A checkpoint trained at a small lr sits where a larger one throws it out: the benchmark's YOLOv8s, trained with
    AdamW at 0.0005, diverged under rank 16 at 0.003 (6x) where 0.001 fine-tuned it as well as full fine-tuning did;
    the demo base (AdamW 0.0014) took 2x its own lr0 well (benchmarks/results.md). An SGD lr is not on AdamW's scale,
    so a base trained with SGD caps nothing for AdamW.

    Example:
        >>> capped_lr0(0.003, "AdamW", {"optimizer": "AdamW", "lr0": 0.0005}, 2)[0]
        0.001
    """
    own = base_lr0(base_args)
    if not ratio or own is None or optimizer_family(own[0]) != optimizer_family(optimizer):
        return lr0, None
    cap = max(ratio * own[1], LR0_FLOOR)
    if lr0 <= cap:
        return lr0, None
    why = (
        f"lr0 {lr0:g} lowered to {cap:g}: {ratio:g}x the lr0 {own[1]:g} the base was trained with ({own[0]}), "
        f"at least {LR0_FLOOR:g}; --lr0 (or lr0_base_ratio: 0 in a preset) trains at the lr0 as given"
    )
    return cap, why
