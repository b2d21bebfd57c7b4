"""Fold adapters into their base: one adapter exactly, or several with weights (sum of w_i * delta W_i).

The result is a plain Ultralytics model (no LoRA modules, no lora_yolo attributes): `ultralytics.YOLO`,
`yolo val`, `yolo predict` and `yolo export` take it with lora_yolo not installed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora_yolo.adapter import Adapter, attach_adapter, check_fits, load_adapter
from lora_yolo.atomic import refuse_inputs
from lora_yolo.branch import widen_branches
from lora_yolo.checkpoint import build_for_classes, load_model, save_checkpoint
from lora_yolo.errors import LoraYoloError
from lora_yolo.inject import lora_layers, merge_lora


def merge_adapters(
    base: nn.Module, adapters: list[tuple[Adapter, float]], allow_other_weights: bool = False
) -> nn.Module:
    """A new plain model: `base` plus the weighted adapters, merged in fp32. `base` itself is not modified.

    A single adapter with weight 1 is the exact merge of training; several must fit the same base and class set.
    Each adapter contributes w_i times its change to a tensor: delta W for a LoRA layer, (trained - base) for a
    tensor trained in full, nothing where it changes nothing. So the result does not depend on the order, and with
    weights summing to 1 the class convs are the weighted average of the adapters' (the base's where one keeps it).

    Example:
        >>> a, b = load_adapter("a.safetensors"), load_adapter("b.safetensors")
        >>> merged = merge_adapters(load_model("base.pt"), [(a, 0.5), (b, 0.5)])
    """
    if not adapters:
        raise LoraYoloError("no adapter given")
    first = adapters[0][0]
    for adapter, _ in adapters:
        check_fits(adapter, base, allow_other_weights)
        if adapter.names != first.names:
            raise LoraYoloError(
                f"adapters disagree on the class set ({len(first.names)} vs {len(adapter.names)} classes)"
            )
    if len(adapters) == 1 and adapters[0][1] == 1.0:  # class branches of add_classes: their plain form
        return widen_branches(merge_lora(attach_adapter(base, first, allow_other_weights)))
    if any(adapter.config.add_classes for adapter, _ in adapters):
        raise LoraYoloError("an add_classes adapter merges alone, with weight 1: class branches do not add up")
    model = build_for_classes(base, first.nc, first.names)
    state = model.state_dict()
    change = {}  # name -> sum of w_i * (what adapter i does to that tensor), fp32
    for adapter, weight in adapters:
        attached = attach_adapter(base, adapter, allow_other_weights)
        updates = {f"{name}.weight": layer.delta_weight() for name, layer in lora_layers(attached).items()}
        updates.update({key: adapter.tensors[key].float() - state[key].float() for key in adapter.full})
        for key, update in updates.items():
            change[key] = change.get(key, 0) + weight * update
    with torch.no_grad():
        for key, value in change.items():
            new = state[key].float() + value
            if not torch.isfinite(new).all():
                raise LoraYoloError(f"merging makes {key} non-finite")
            if key.endswith(".running_var") and bool((new < 0).any()):  # weights outside [0, 1] can, with train_head
                raise LoraYoloError(
                    f"merging makes {key} negative: give adapters that train the head weights in [0, 1] summing to 1"
                )
            state[key].copy_(new.to(state[key].dtype))
    return model


def parse_adapter_spec(spec: str) -> tuple[Path, float]:
    """`a.safetensors` or `a.safetensors:0.5` -> (path, weight)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(spec), 1.0


def merge_files(
    base: str | Path,
    adapters: list[str],
    output: str | Path,
    allow_other_weights: bool = False,
    train_args: dict | None = None,
) -> Path:
    """Read a base checkpoint and adapter files (`path[:weight]`), write the merged checkpoint atomically.

    The checkpoint keeps the class names and `train_args` (default: the base's own arguments).

    Example:
        >>> merge_files("yolo11n.pt", ["run/adapter.safetensors"], "merged.pt")
    """
    specs = [parse_adapter_spec(s) for s in adapters]
    output = Path(output)
    refuse_inputs(output, [base, *(p for p, _ in specs)])
    base_model = load_model(base)
    model = merge_adapters(base_model, [(load_adapter(p), w) for p, w in specs], allow_other_weights)
    args = dict(train_args if train_args is not None else getattr(base_model, "args", None) or {})
    args.update(freeze=None, resume=False)  # LoRA's freeze list and a resume path mean nothing to a plain model
    return save_checkpoint(model, output, train_args=args)
