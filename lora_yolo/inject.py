"""Put adapters into a model, take them out, and read their weights (minLoRA's verbs, PEFT's names).

A selected conv `model.16.cv1.conv` becomes a `LoraConv2d` at the same path, so its weights are named
`model.16.cv1.conv.base_layer.weight`, `model.16.cv1.conv.lora_A.weight` and `model.16.cv1.conv.lora_B.weight`
(and, for DoRA, `model.16.cv1.conv.lora_magnitude_vector`).
The modules are plain `nn.Module`s (not torch parametrizations), so they survive `copy.deepcopy` (Ultralytics' EMA),
`.half()` and whole-module `torch.save` (Ultralytics' checkpoints), and cloudpickle (Ultralytics' DDP launcher).
"""

from __future__ import annotations

import torch
from torch import nn

from lora_yolo.fold import unfold_batchnorm
from lora_yolo.layer import LoraConv2d, LoraLayer, LoraLinear

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


def lora_tensor_names(layer: str, use_dora: bool) -> list[str]:
    """The adapter tensors of conv `layer`: A and B, plus DoRA's magnitude."""
    return [f"{layer}{s}" for s in LORA_SUFFIXES[: 3 if use_dora else 2]]


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the dotted `path` of `model` (e.g. `model.16.cv1.conv`)."""
    parent_name, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


def add_lora(
    model: nn.Module,
    plan: dict[str, tuple[int, float]],
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> nn.Module:
    """Wrap each conv or linear layer named in `plan` (name -> (r, lora_alpha)) in a `LoraConv2d` / `LoraLinear`, in
    place.

    Example:
        >>> add_lora(model, select_targets(model, LoraConfig()))
    """
    for name, (r, alpha) in plan.items():
        layer = model.get_submodule(name)
        lora = LoraLinear if isinstance(layer, nn.Linear) else LoraConv2d
        replace_module(model, name, lora(layer, r, alpha, lora_dropout, use_rslora, use_dora))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every adapter in the model, by the name of the layer it wraps."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_plan(model: nn.Module) -> dict[str, tuple[int, float]]:
    """The plan that `add_lora` would need to rebuild this model's adapters (name -> (r, lora_alpha))."""
    return {name: (m.r, m.lora_alpha) for name, m in lora_layers(model).items()}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (`<conv>.lora_A.weight`, `<conv>.lora_B.weight`, DoRA's magnitudes), in fp32."""
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k.endswith(LORA_SUFFIXES)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without its adapters, under the base's own names (`.base_layer.` dropped)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not k.endswith(LORA_SUFFIXES)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its conv and put the plain `nn.Conv2d` back, in place.

    Afterwards the model holds no trace of LoRA: Ultralytics' conv+BN fusion, export and pickling work unchanged,
    and inference costs exactly what the base costs.
    """
    return _unwrap(model, merge=True)


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging it (PEFT's `unload`), giving back the base convs, in place."""
    return _unwrap(model, merge=False)


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    for name, layer in lora_layers(model).items():
        layer.merge() if merge else layer.unmerge()
        replace_module(model, name, layer.base_layer)
    return unfold_batchnorm(model)  # a training model's BatchNorms go back to their blocks


def set_trainable(model: nn.Module, names: set[str]) -> None:
    """Let exactly the parameters in `names` require gradients; freeze everything else."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
