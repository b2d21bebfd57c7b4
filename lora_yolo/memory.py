"""What a training step keeps for backward: activations recomputed instead of stored, the same function and gradients.

Two mechanisms, both installed by `add_training_forward` on each top-level layer (`model.model[i]`, one Ultralytics
block: a Conv, C3k2, SPPF, C2PSA, Concat, ..., Detect):

**Lean activations (always).** Ultralytics' blocks compute a = SiLU(z) after every conv, and the next conv saves a
for its weight's gradient (the adapters' gradient flows through it) while SiLU's own backward saves z: two tensors of
the same size per block. A saved tensor that is a SiLU output (or a view of one, such as C2f's `chunk` halves) is
stored as its SiLU's saved input instead and recomputed in backward: `torch.autograd.graph.saved_tensors_hooks`
packs it as z, which autograd keeps anyway until SiLU's backward, and unpacks it as SiLU(z), the same kernel on the
same tensor, so the value is bit-identical and so are all gradients. The recomputation is one elementwise op per
block, small beside the conv it feeds. Whether a tensor is a SiLU output is read from autograd itself (its `grad_fn`
is SiLU's, which records the latest in-place change autograd tracks), never guessed from shapes or pointers.
Autograd does not check tensors that went through hooks for in-place changes after they were saved, so
`unpack_saved` does (the saved tensor's, or the SiLU input's, version counter). What no check can see: a SiLU
output changed outside autograd (under `no_grad` or through `.data`) before it is saved would be rebuilt without
that change; no Ultralytics block does that. On yolo11n (320 px, batch 8, the default DoRA) this takes the bytes
held for backward from 0.76x to 0.50x those of full fine-tuning, within the noise of CPU step times
(docs/benchmarks.md).

**Gradient checkpointing (`gradient_checkpointing`).** Each layer but the head runs under `torch.utils.checkpoint`:
autograd keeps only the layer's inputs, and backward runs the layer's forward a second time to rebuild what it
needs. That trades a second forward of the network for its activations, which is what high resolutions on small
GPUs need. Everything trained is recomputed exactly: the BatchNorms are frozen in eval mode (folded,
`lora_yolo.fold`) and dropout replays its random state (`preserve_rng_state`). The Detect head is left out: its
outputs go straight to the loss, so checkpointing it would keep the same tensors and only add the second forward.

In eval mode or under `no_grad` (validation, the EMA) a layer runs as it always does. The wrapper is an instance
attribute `forward` (the class stays Ultralytics' own, names and state dicts unchanged), which deep copies (the EMA)
and DDP's cloudpickle carry; `remove_training_forward` takes it off, e.g. before a checkpoint is pickled, so what
Ultralytics writes holds the plain layers.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

_SILU = "SiluBackward0"  # autograd's node for F.silu / nn.SiLU, whose saved input is `_saved_self`


class Kept(NamedTuple):
    """A saved tensor kept as it is, with its version when saved: autograd skips its own check that a saved tensor
    was not changed in place afterwards for tensors that went through hooks, so `unpack_saved` makes it."""

    t: torch.Tensor
    version: int


class SiluOutput(NamedTuple):
    """A saved tensor stored as the SiLU input it was computed from (and that input's version when saved), and where
    it lies in SiLU's output."""

    z: torch.Tensor
    version: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def pack_saved(t: torch.Tensor) -> Kept | SiluOutput:
    """What autograd keeps for a tensor it saves: the tensor, or for a SiLU output (or a view of one) its input."""
    base = t if t._base is None else t._base
    node = base.grad_fn
    if node is None or type(node).__name__ != _SILU:
        return Kept(t, t._version)
    try:
        z = node._saved_self
    except RuntimeError:  # that SiLU's graph was already run backward and freed: keep the tensor itself
        return Kept(t, t._version)
    if z.stride() != base.stride() or z.dtype != base.dtype:  # SiLU(z) must rebuild the storage `t` views
        return Kept(t, t._version)
    return SiluOutput(z, z._version, t.size(), t.stride(), t.storage_offset())


def unpack_saved(packed: Kept | SiluOutput) -> torch.Tensor:
    """The saved tensor back, in backward: SiLU recomputed from its input where it was stored as that. A tensor (or
    SiLU input) changed in place since it was saved is autograd's own error, as without the hooks."""
    kept = packed.t if isinstance(packed, Kept) else packed.z
    if kept._version != packed.version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation "
            f"(a saved {tuple(kept.shape)} tensor, version {packed.version} when saved, now {kept._version})"
        )
    if isinstance(packed, Kept):
        return packed.t
    return F.silu(packed.z).as_strided(packed.size, packed.stride, packed.offset)


def lean_activations() -> torch.autograd.graph.saved_tensors_hooks:
    """Within this context, autograd stores SiLU outputs as their inputs and recomputes them in backward."""
    return torch.autograd.graph.saved_tensors_hooks(pack_saved, unpack_saved)


def _training_forward(layer: nn.Module, checkpointed: bool, *args: Any) -> Any:
    forward = type(layer).forward
    if not (layer.training and torch.is_grad_enabled()):
        return forward(layer, *args)
    if checkpointed:
        return checkpoint(forward, layer, *args, use_reentrant=False)
    with lean_activations():
        return forward(layer, *args)


def add_training_forward(model: nn.Module, checkpointing: bool = False) -> None:
    """Lean activations on every top-level layer of an Ultralytics model, in place; with `checkpointing` every layer
    but the head is checkpointed instead, and the head runs plain: its inputs are checkpointed layers' outputs, whose
    SiLU inputs checkpointing does not keep, so storing them as those inputs would recompute the layer to get them."""
    layers = list(model.model)
    for layer in layers[:-1] if checkpointing else layers:
        layer.forward = partial(_training_forward, layer, checkpointing)


def remove_training_forward(model: nn.Module) -> nn.Module:
    """Undo `add_training_forward` in place (a no-op on a model without it)."""
    for layer in model.model:
        if isinstance(vars(layer).get("forward"), partial):
            del layer.forward
    return model
