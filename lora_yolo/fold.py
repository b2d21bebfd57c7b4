"""Frozen BatchNorm folded into the conv before it, during training: the same function, fewer saved activations.

A frozen BatchNorm in eval mode is the per-channel affine map y = s * x + b with s = gamma / sqrt(var + eps) and
b = beta - mean * s. Folded into its conv, the block computes conv(x, s * W) + (b + s * bias) in one op: autograd
then keeps no copy of the conv's output for BatchNorm's backward (the largest tensor a Conv block saves), and a
frozen conv whose input needs no gradient keeps nothing at all. For an adapted conv the folded weight is
s * (W + delta W) (DoRA: s * m / ||W + delta W||_c * (W + delta W)), which `LoraConv2d` computes when it holds a
folded BatchNorm; the adapter's tensors and their gradients are those of the unfolded form.

Names and tensors stay where they were, so state dicts, the base fingerprint, Ultralytics' freeze list, EMA,
checkpoints and DDP pickles see the same model: the BatchNorm module keeps its parameters and buffers but its class
becomes `FoldedBatchNorm2d` (identity in forward), and a frozen plain conv becomes a `FoldedConv2d`. Each conv holds
its BatchNorm as a plain attribute (not a submodule, so nothing is registered twice); copies and pickles keep the
pair together. `unfold_batchnorm` turns both back into Ultralytics' own classes, e.g. before a plain checkpoint is
written.

Only Ultralytics `Conv` and `DWConv` blocks are folded, whose forward is act(bn(conv(x))); `Conv2` adds a second
branch before its BatchNorm and is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from ultralytics.nn.modules.conv import Conv, DWConv

FOLD_ATTR = "_folded_bn"  # the BatchNorm a conv applies in its own forward


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A frozen BatchNorm whose affine map its conv applies: identity here, its tensors kept under their names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FoldedConv2d(nn.Conv2d):
    """A frozen conv computing conv(x, s * W) + (b + s * bias) for the BatchNorm it holds."""

    _folded_bn: nn.BatchNorm2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = fold(self.weight, self.bias, getattr(self, FOLD_ATTR))
        return self._conv_forward(x, weight, bias)


def bn_affine(bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, b) of a BatchNorm in eval mode, y = s * x + b per channel, computed in fp32 and returned in `dtype`."""
    scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
    shift = bn.bias.float() - bn.running_mean.float() * scale
    return scale.to(dtype), shift.to(dtype)


def fold(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv weight and bias with `bn` folded in: (s * W, b + s * bias)."""
    scale, shift = bn_affine(bn, weight.dtype)
    return weight * scale.view(-1, 1, 1, 1), shift if bias is None else shift + scale * bias


def folded_output(y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """`bn` applied to a conv output (without bias) that could not be folded into one conv: s * y + b."""
    scale, shift = bn_affine(bn, y.dtype)
    return y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def fold_batchnorm(model: nn.Module, skip: Sequence[nn.Module] = ()) -> int:
    """Fold every frozen BatchNorm of a `Conv`/`DWConv` block into its conv, in place; returns how many.

    Call it on a model whose BatchNorms are all frozen except those under the modules in `skip` (LoRA training: the
    base is frozen, the class convs trained in full have no BatchNorm, and the class-branch copies of add_classes
    train their BatchNorms). Adapted convs must already be in place: a conv module that can apply a folded BatchNorm
    itself (`LoraConv2d`) declares the `_folded_bn` attribute.
    """
    count = 0
    trained = {id(m) for module in skip for m in module.modules()}
    for block in model.modules():
        if id(block) in trained:
            continue
        bn = getattr(block, "bn", None)
        if type(block) not in (Conv, DWConv) or type(bn) is not nn.BatchNorm2d:
            continue
        conv = block.conv
        if type(conv) is nn.Conv2d:
            conv.__class__ = FoldedConv2d
        elif not hasattr(type(conv), FOLD_ATTR):
            continue
        object.__setattr__(conv, FOLD_ATTR, bn)  # a plain attribute: state_dict and children stay as they were
        bn.__class__ = FoldedBatchNorm2d
        count += 1
    return count


def unfold_batchnorm(model: nn.Module) -> nn.Module:
    """Undo `fold_batchnorm` in place: Ultralytics' own classes again, the BatchNorm applied by its block."""
    for module in model.modules():
        if FOLD_ATTR in vars(module):
            object.__delattr__(module, FOLD_ATTR)
        if type(module) is FoldedConv2d:
            module.__class__ = nn.Conv2d
        elif type(module) is FoldedBatchNorm2d:
            module.__class__ = nn.BatchNorm2d
    return model
