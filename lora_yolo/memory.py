"""Activation checkpointing of a model's layers during training: memory for time, the same function and gradients.

With `gradient_checkpointing` each top-level layer of the model (`model.model[i]`, one Ultralytics block: a Conv,
C3k2, SPPF, C2PSA, Concat, ...) runs under `torch.utils.checkpoint` while it trains: autograd keeps only the layer's
inputs, and backward runs the layer's forward a second time to rebuild what it needs. That trades a second forward
of the network for its activations, which is what high resolutions on small GPUs need. Everything trained is
recomputed exactly: the BatchNorms are frozen in eval mode (folded, `lora_yolo.fold`) and dropout replays its random
state (`preserve_rng_state`), so outputs and gradients are the ones without checkpointing.

The Detect head (the last layer) is left out: its outputs go straight to the loss, so checkpointing it would keep
the same tensors and only add the second forward. In eval mode or under `no_grad` (validation, the EMA) a layer
runs as it always does.

The wrapper is an instance attribute `forward` (the class stays Ultralytics' own, names and state dicts unchanged),
which deep copies (the EMA) and DDP's cloudpickle carry; `remove_checkpointing` takes it off, e.g. before a
checkpoint is pickled, so what Ultralytics writes holds the plain layers.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(layer: nn.Module, *args: Any) -> Any:
    forward = type(layer).forward
    if layer.training and torch.is_grad_enabled():
        return checkpoint(forward, layer, *args, use_reentrant=False)
    return forward(layer, *args)


def add_checkpointing(model: nn.Module) -> int:
    """Checkpoint every top-level layer of an Ultralytics model but its head, in place; returns how many."""
    layers = list(model.model)[:-1]
    for layer in layers:
        layer.forward = partial(_checkpointed_forward, layer)
    return len(layers)


def remove_checkpointing(model: nn.Module) -> nn.Module:
    """Undo `add_checkpointing` in place (a no-op on a model without it)."""
    for layer in model.model:
        if isinstance(vars(layer).get("forward"), partial):
            del layer.forward
    return model
