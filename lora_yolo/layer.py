"""`LoraConv2d` and `LoraLinear`: a frozen `nn.Conv2d` or `nn.Linear` plus a trainable low-rank update (Hu et al.
2021, arXiv:2106.09685).

For a base conv W (out, in, k, k) the update is delta W = scale * B A, with
  A = `lora_A`: a conv in -> r carrying the base kernel size, stride, padding and dilation,
  B = `lora_B`: a 1x1 conv r -> out,
so conv(x, W) + scale * B(A(x)) = conv(x, W + delta W) exactly, by linearity. A linear layer W (out, in) has
A (r, in) and B (out, r), the same scale, DoRA and merge. A starts Kaiming-uniform and B at
zero, so a freshly injected model computes exactly what the base computes (as in PEFT and loralib).

With `use_dora` the layer is DoRA (Liu et al. 2024, arXiv:2402.09353): a trainable magnitude m per output channel
rescales the direction of W + delta W, giving W' = m / ||W + delta W||_c * (W + delta W), where ||.||_c is the norm of
each output channel's filter. m starts at ||W||_c, so a fresh layer again computes exactly what the base computes.
As in PEFT and the paper (section 4.3), the norm is treated as a constant in backward. W' is a plain conv weight,
so DoRA merges exactly like LoRA; the bias is not rescaled.

Unlike loralib, `train()`/`eval()` never merge: Ultralytics switches modes every epoch and for every validation.
Merging is explicit (`merge`, `unmerge`), done in fp32 whatever the module's dtype, and refuses non-finite weights
(PEFT's safe_merge). `unmerge` puts the original weight back bit-exactly (it is kept while merged).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn import functional as F

from lora_yolo.errors import LoraYoloError
from lora_yolo.fold import fold, folded_output


def lora_param_count(layer: nn.Conv2d | nn.Linear, r: int, use_dora: bool = False) -> int:
    """Closed form of an adapter's size: A has r * fan_in weights (conv: in * kh * kw, linear: in), B has out * r,
    DoRA's magnitude out."""
    out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
    return r * fan_in + out * r + (out if use_dora else 0)


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The update's scale: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_c: the L2 norm of each output channel's filter, shape (out,). DoRA's magnitude starts here."""
    return weight.flatten(1).norm(dim=1)


def no_autocast(device_type: str) -> AbstractContextManager:
    """Autocast switched off for a device type that has one (a meta tensor, or an old torch's device, has none)."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else nullcontext()


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """scale * B A in `dtype`, shaped like the base weight (out, in, kh, kw), from A (r, in, kh, kw) and B (out, r).

    Computed in `dtype` even under autocast (AMP): autocast would run the matmul and its backward in fp16, where the
    backward sums `out` products of the weight's gradient per entry of A (and `in * kh * kw` per entry of B), and at
    a gradient scaler's loss scale those sums overflow long before the weight's own gradient does.
    """
    with no_autocast(lora_A.device.type):
        a = lora_A.to(dtype).flatten(1)  # (r, in * kh * kw)
        b = lora_B.to(dtype).flatten(1)  # (out, r)
        return (b @ a).view(b.shape[0], *lora_A.shape[1:]) * scaling


def dora_scale(adapted: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m / ||V||_c per output channel, for V = W + delta W; the norm is detached (a constant in backward, as in the
    DoRA paper), so DoRA's weight is V * dora_scale(V, m)."""
    norm = channel_norm(adapted.detach()).clamp_min(torch.finfo(adapted.dtype).tiny)  # a zero filter stays zero
    return magnitude.to(adapted.dtype) / norm


def max_rank(layer: nn.Conv2d | nn.Linear) -> int:
    """Largest rank that still adds information: rank(delta W) <= min(out, fan_in) (conv: in * kh * kw)."""
    return min(layer.weight.shape[0], layer.weight[0].numel())


def per_channel(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-output-channel vector (out,) shaped to scale a weight of `ndim` dimensions row by row."""
    return values.view(-1, *[1] * (ndim - 1))


def layer_forward(
    layer: nn.Conv2d | nn.Linear, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """What `layer` computes, with `weight` and `bias` in place of its own."""
    return layer._conv_forward(x, weight, bias) if isinstance(layer, nn.Conv2d) else F.linear(x, weight, bias)


def on_outputs(values: torch.Tensor, layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """A per-output-channel vector (out,) shaped to broadcast over `layer`'s output: (1, out, 1, 1) for a conv's
    (N, out, H, W), (out,) for a linear layer's (..., out)."""
    return values.view(1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else values


class MergeableLayer(nn.Module):
    """A module around a conv or linear layer (`base_layer`) whose adapted weight can be written into that layer and
    taken back out.

    Subclasses say what the adapted weight is (`adapted_weight`); merging computes it in fp32, refuses non-finite
    values (PEFT's safe_merge) and keeps the original weight, so `unmerge` restores it bit-exactly.
    """

    base_layer: nn.Conv2d | nn.Linear
    _unmerged: torch.Tensor | None = None  # the base weight, kept while merged
    _unmerged_bias: torch.Tensor | None = None  # the base bias, kept while merged where the adapter changes it

    @property
    def merged(self) -> bool:
        return self._unmerged is not None

    @property
    def original_weight(self) -> torch.Tensor:
        """The base layer's own weight, merged or not."""
        return self._unmerged if self.merged else self.base_layer.weight.detach()

    def adapted_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def adapted_bias(self) -> torch.Tensor | None:
        """The adapted bias, or None where the adapter leaves the base layer's bias as it is (only a fused conv
        serving a train_bias adapter has one: its BatchNorm's trained shift)."""
        return None

    def merge(self) -> None:
        """Write the adapted weight (and bias) into the base layer: the module then costs the plain layer."""
        if self.merged:
            return
        w, b = self.base_layer.weight, self.base_layer.bias
        new, bias = self.adapted_weight().to(w.device), self.adapted_bias()
        if not torch.isfinite(new).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise LoraYoloError("merging would make the weights non-finite (NaN or Inf in the adapter)")
        self._unmerged = w.detach().clone()
        with torch.no_grad():
            w.copy_(new.to(w.dtype))
            if bias is not None:  # a fused conv, which always has a bias
                self._unmerged_bias = b.detach().clone()
                b.copy_(bias.to(b.device, b.dtype))

    def unmerge(self) -> None:
        """Put the original base weight (and bias) back, exactly."""
        if self.merged:
            with torch.no_grad():
                self.base_layer.weight.copy_(self._unmerged)
                if self._unmerged_bias is not None:
                    self.base_layer.bias.copy_(self._unmerged_bias)
            self._unmerged = self._unmerged_bias = None


class LoraLayer(MergeableLayer):
    """A conv or linear layer with a low-rank adapter beside it; `base_layer` keeps the original module, untouched
    until merge. `LoraConv2d` and `LoraLinear` only build A and B; the math is the same for both.

    A conv may also apply its block's frozen BatchNorm during training (`_folded_bn`, set by `lora_yolo.fold`).
    """

    _folded_bn: nn.BatchNorm2d | None = None  # the block's frozen BatchNorm, applied here (lora_yolo.fold)
    lora_A: nn.Conv2d | nn.Linear
    lora_B: nn.Conv2d | nn.Linear

    def __init__(
        self,
        base_layer: nn.Conv2d | nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        # Dropout on A's input only, so the base path sees the clean input (as in PEFT).
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        w = base_layer.weight
        self.lora_A, self.lora_B = self._build_a_b(base_layer, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # the layer type's own init, as in PEFT
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the fresh adapter changes nothing
        self.use_dora = use_dora
        if use_dora:  # PEFT's name; stored (out,) here, PEFT keeps (1, out, 1, 1) for a conv
            self.lora_magnitude_vector = nn.Parameter(channel_norm(w.detach().float()).to(w.dtype))

    @staticmethod
    def _build_a_b(base_layer: nn.Module, r: int) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """layer(x, W) + scale * B(A(x)), computed as one layer with W + delta W when there is no dropout.

        The single op is the same function, and cheaper than a second path: delta W costs one small matmul, the
        input is read once (a k x k conv A re-reads it at full resolution), and no r-channel activations are kept
        for backward. Measured on CPU, 3x3 layers at high resolution: about 1.5x faster per training step.
        Dropout on A's input needs the two-path form; for DoRA that is m / ||W + delta W||_c * (layer(x, W) + update).
        With a folded BatchNorm (`lora_yolo.fold`) the same conv also applies it: conv(x, s * W') + b.
        """
        base, bn = self.base_layer, self._folded_bn
        if self.merged or isinstance(self.lora_dropout, nn.Identity):
            weight = base.weight if self.merged else self._adapted(base.weight.dtype)
            bias = base.bias
            if bn is not None:
                weight, bias = fold(weight, bias, bn)
            return layer_forward(base, x, weight, bias)
        update = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        w = base.weight
        y = layer_forward(base, x, w, None) + update
        if self.use_dora:
            y = y * on_outputs(dora_scale(w + self._delta(w.dtype), self.lora_magnitude_vector), base)
        if base.bias is not None:
            y = y + on_outputs(base.bias, base)
        return y if bn is None else folded_output(y, bn)

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling, dtype)

    def _adapted(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight this layer computes with: W + delta W, or DoRA's rescaled form, in `dtype`."""
        w = self.base_layer.weight.to(dtype) + self._delta(dtype)
        return w * per_channel(dora_scale(w, self.lora_magnitude_vector), w.dim()) if self.use_dora else w

    def adapted_weight(self) -> torch.Tensor:
        """The adapted weight in fp32, shaped like the base weight: what `merge` writes."""
        return self._adapted(torch.float32)

    def delta_weight(self) -> torch.Tensor:
        """The change this adapter makes to the base weight, in fp32 (scale * B A for LoRA)."""
        if self.use_dora:
            return self.adapted_weight() - self.base_layer.weight.float()
        return self._delta(torch.float32)

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}{dora}, merged={self.merged}"


class LoraConv2d(LoraLayer):
    """A conv with a low-rank adapter: A a conv in -> r with the base's kernel, stride, padding and dilation, B a
    1x1 conv r -> out.

    Example:
        >>> layer = LoraConv2d(nn.Conv2d(16, 32, 3, padding=1, bias=False), r=4, lora_alpha=8)
        >>> layer(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 8, 8])
    """

    @staticmethod
    def _build_a_b(base_layer: nn.Conv2d, r: int) -> tuple[nn.Conv2d, nn.Conv2d]:
        if base_layer.groups != 1:
            raise LoraYoloError(f"LoRA supports ungrouped convs only, this one has groups={base_layer.groups}")
        if base_layer.padding_mode != "zeros":
            raise LoraYoloError(f"LoRA supports zero padding only, this conv uses {base_layer.padding_mode!r}")
        w = base_layer.weight
        lora_a = nn.Conv2d(
            base_layer.in_channels,
            r,
            base_layer.kernel_size,
            base_layer.stride,
            base_layer.padding,
            base_layer.dilation,
            bias=False,
            device=w.device,
            dtype=w.dtype,
        )
        return lora_a, nn.Conv2d(r, base_layer.out_channels, 1, bias=False, device=w.device, dtype=w.dtype)


class LoraLinear(LoraLayer):
    """A linear layer with a low-rank adapter: A (r, in), B (out, r), as PEFT's `Linear` LoRA. In Ultralytics models
    these are classification heads (`Classify.linear`) and transformer projections (RT-DETR).

    Example:
        >>> layer = LoraLinear(nn.Linear(1280, 10), r=8, lora_alpha=16)
        >>> layer(torch.zeros(2, 1280)).shape
        torch.Size([2, 10])
    """

    @property
    def in_features(self) -> int:  # read by Ultralytics (ClassificationModel.reshape_outputs), as PEFT's layer has
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @staticmethod
    def _build_a_b(base_layer: nn.Linear, r: int) -> tuple[nn.Linear, nn.Linear]:
        w = base_layer.weight
        lora_a = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        return lora_a, nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
