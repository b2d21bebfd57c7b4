"""Parallel class branches for `add_classes`: the base's class branch untouched, a trained copy for new classes.

A Detect head scores classes with one small branch per scale (`cv3.i`, and YOLO26's `one2one_cv3.i`; YOLO26
segment's training-only `proto.semseg` is one too): a few Conv blocks ending in a 1x1 conv with one output per
class. Both add_classes modes keep the base's branch as it is and run a copy beside it (`ClassBranch`): the copy
starts from the base's weights, ends in a fresh conv for the new classes only, and trains in full, BatchNorm
statistics included. The head's output is the base's class scores followed by the copy's, so in exact mode (nothing
else trains) every old score (and every box: the box branch is not touched) is the base's, bit for bit, while the
new classes get a whole trainable branch rather than rows on frozen features.

A merged model must be plain Ultralytics, which has no module that runs two branches side by side, so `widen` turns
a `ClassBranch` into one nn.Sequential of the same block types computing the same function: each conv holds both
branches' filters and each BatchNorm both branches' channels. A conv reading the shared input keeps its groups, each
with both branches' filters (YOLO11's first depthwise conv: two filters per channel, interleaved); one reading the
base's channels then the copy's, as many each, gets twice the groups (a dense one: two); a depthwise conv takes both
branches' channels; any other dense conv is block-diagonal, and its zero blocks cost multiply-adds (YOLO11's first
1x1 conv, after the interleaved depthwise one, and the last conv, whose base and copy output counts differ). Its old
scores agree with the base's to float rounding (a wider conv may sum in another order), not bit for bit; serving an
adapter (`lora_yolo.serve`) runs the `ClassBranch` itself and stays exact.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn
from ultralytics.nn.modules.conv import Conv

from lora_yolo.checkpoint import class_count
from lora_yolo.config import LoraConfig
from lora_yolo.errors import LoraYoloError
from lora_yolo.inject import replace_module
from lora_yolo.targets import branch_paths, class_layers, select_targets

NEW = "new"  # the copy's attribute: its tensors are stored as `<branch>.new.<name>`


class ClassBranch(nn.Module):
    """The base's class branch (`base`, never changed) and a copy for the new classes (`new`), outputs concatenated."""

    def __init__(self, base: nn.Module, new: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.new = new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.base(x), self.new(x)], 1)


def new_branch(base: nn.Sequential, n_new: int, bias: torch.Tensor | None = None) -> nn.Sequential:
    """A copy of the class branch `base` whose last conv predicts `n_new` classes: the other layers start from the
    base's weights, the last conv from PyTorch's default init with `bias` (e.g. Ultralytics' class prior) if given."""
    copy = deepcopy(base)
    last = copy[-1]
    conv = nn.Conv2d(last.in_channels, n_new, last.kernel_size, last.stride, last.padding, bias=last.bias is not None)
    if bias is not None and conv.bias is not None:
        conv.bias.data.copy_(bias.detach())
    copy[-1] = conv.to(last.weight.device, last.weight.dtype)
    return copy


def _stored(copy: nn.Sequential, path: str) -> dict[str, torch.Tensor]:
    """What an adapter stores of the copy beside the branch at `path`: its float state, under `<path>.new.`."""
    return {f"{path}.{NEW}.{k}": v for k, v in copy.state_dict().items() if v.is_floating_point()}


def new_tensor_shapes(base: nn.Sequential, path: str, n_new: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of what an adapter stores for the copy of the branch at `path`."""
    return {k: tuple(v.shape) for k, v in _stored(new_branch(base, n_new), path).items()}


def add_class_branches(model: nn.Module, base: nn.Module, n_new: int) -> list[str]:
    """Put a `ClassBranch` at every class branch of `model` (built for the combined classes), in place: a copy of
    `base`'s own branch, and beside it a fresh copy for `n_new` classes whose last conv's bias is `model`'s
    (Ultralytics' class prior). Returns the names of the copies' float tensors: what an adapter stores and training
    trains."""
    ours, theirs = dict(model.named_modules()), dict(base.named_modules())
    names = []
    for path in branch_paths(class_layers(base), theirs):
        new = new_branch(theirs[path], n_new, bias=ours[path][-1].bias[-n_new:])
        replace_module(model, path, ClassBranch(deepcopy(theirs[path]), new))
        names += list(_stored(new, path))
    return names


def add_classes_layers(model: nn.Module, base: nn.Module, config: LoraConfig) -> tuple[dict[str, tuple], list[str]]:
    """What add_classes trains in `model` (built from `base` for the combined classes), set up in place: a copy beside
    each class branch (`add_class_branches`, whose tensor names come second) and the plan of LoRA layers to add,
    first: adapted mode's, chosen as usual but outside the class branches (the base's run as they are); exact none."""
    plan = select_targets(model, config) if config.add_classes == "adapted" else {}  # before the copies are in
    return plan, add_class_branches(model, base, class_count(model) - class_count(base))


def check_widenable(model: nn.Module) -> None:
    """Refuse, before training (or in `inspect`), a base add_classes cannot add to: one without Detect class branches,
    or whose class branches `widen` could not turn into a plain merged model."""
    modules = dict(model.named_modules())
    paths = branch_paths(class_layers(model), modules)
    if not paths:
        raise LoraYoloError("add_classes needs a Detect head's class branches to add beside; this model has none")
    for path in paths:
        try:
            widen(ClassBranch(modules[path], new_branch(modules[path], 1)))
        except LoraYoloError as e:
            raise LoraYoloError(f"add_classes cannot add a class branch beside {path}: {e}") from None


def widen_branches(model: nn.Module) -> nn.Module:
    """Every `ClassBranch` of `model` replaced by its plain widened form (`widen`), in place."""
    for path, module in list(model.named_modules()):
        if isinstance(module, ClassBranch):
            replace_module(model, path, widen(module))
    return model


Layout = list[tuple[int, int]]  # for each channel of a widened tensor: (0 base / 1 copy, that branch's channel)


def widen(branch: ClassBranch) -> nn.Sequential:
    """One plain Sequential computing `branch`: the base's block structure with each conv and BatchNorm holding both
    branches' channels. The last conv's outputs are the base's classes, then the copy's."""
    out = deepcopy(branch.base)
    steps = zip(_steps(out), _steps(branch.base), _steps(branch.new))
    layout: Layout | None = None  # None: the input, which both branches read
    for target, b, n in steps:
        conv, layout = _widen_conv(_conv(b), _conv(n), layout)
        if isinstance(target, Conv):
            target.conv = conv
            target.bn = _widen_bn(b.bn, n.bn, layout)
        else:
            parent, index = target
            parent[index] = conv
    return out


Step = Conv | tuple[nn.Sequential, int]  # a Conv block, or a plain conv as (its Sequential, its index)


def _steps(module: nn.Module) -> list[Step]:
    """The branch's Conv blocks and plain convs in the order they run (the last conv as (its Sequential, index),
    so it can be replaced)."""
    steps = []
    for i, m in enumerate(module):
        if isinstance(m, Conv) and type(m.conv) is nn.Conv2d and isinstance(getattr(m, "bn", None), nn.BatchNorm2d):
            if not (m.bn.affine and m.bn.track_running_stats):
                raise LoraYoloError("a class branch's BatchNorm has no affine parameters or running statistics")
            steps.append(m)
        elif isinstance(m, nn.Sequential):
            steps += _steps(m)
        elif type(m) is nn.Conv2d:
            steps.append((module, i))
        else:
            raise LoraYoloError(f"a class branch holds a {type(m).__name__}, which add_classes cannot widen")
    return steps


def _conv(step: Step) -> nn.Conv2d:
    return step.conv if isinstance(step, Conv) else step[0][step[1]]


def _widen_conv(b: nn.Conv2d, n: nn.Conv2d, layout: Layout | None) -> tuple[nn.Conv2d, Layout]:
    """Both convs in one. Reading the shared input, each group holds both branches' filters for that group (a
    depthwise conv: each channel's two filters). Reading widened channels, a dense conv is block-diagonal (each output
    reads its own branch's channels only) and a depthwise conv has one filter per widened channel."""
    depthwise = b.groups == b.in_channels == b.out_channels and n.groups == n.in_channels == n.out_channels
    if layout is None and b.groups == n.groups and not (b.out_channels % b.groups or n.out_channels % n.groups):
        groups, per_b, per_n = b.groups, b.out_channels // b.groups, n.out_channels // n.groups
        weight = torch.cat([b.weight.unflatten(0, (groups, per_b)), n.weight.unflatten(0, (groups, per_n))], 1)
        weight = weight.flatten(0, 1)
        sizes = ((0, per_b), (1, per_n))
        out: Layout = [(s, k * per + i) for k in range(groups) for s, per in sizes for i in range(per)]
    elif layout is not None and depthwise and b.groups > 1:
        weight = torch.stack([(b, n)[s].weight[j] for s, j in layout])
        out, groups = layout, len(layout)
    elif layout is not None and b.groups == n.groups and _halves(layout, b, n):  # twice the groups, no zero blocks
        weight, groups = torch.cat([b.weight, n.weight]), 2 * b.groups
        out = [(0, j) for j in range(b.out_channels)] + [(1, j) for j in range(n.out_channels)]
    elif layout is not None and b.groups == n.groups == 1:
        weight = b.weight.new_zeros(b.out_channels + n.out_channels, len(layout), *b.kernel_size)
        for column, (s, j) in enumerate(layout):
            rows = slice(0, b.out_channels) if s == 0 else slice(b.out_channels, None)
            weight[rows, column] = (b, n)[s].weight[:, j]
        out, groups = [(0, j) for j in range(b.out_channels)] + [(1, j) for j in range(n.out_channels)], 1
    else:
        raise LoraYoloError(f"a grouped conv ({b.groups} groups) reading both branches' channels cannot hold both")
    conv = nn.Conv2d(
        weight.shape[1] * groups, weight.shape[0], b.kernel_size, b.stride, b.padding, b.dilation, groups,
        b.bias is not None, b.padding_mode,
    )  # fmt: skip
    conv = conv.to(weight.device, weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if b.bias is not None:
            conv.bias.copy_(torch.stack([(b, n)[s].bias[j] for s, j in out]))
    return conv.requires_grad_(False), out


def _halves(layout: Layout, b: nn.Conv2d, n: nn.Conv2d) -> bool:
    """Whether the input is the base's channels then the copy's, as many each, and so is the output: then one conv
    with twice the groups computes both, at the cost of the two convs (a block-diagonal dense conv costs twice that)."""
    contiguous = layout == [(0, j) for j in range(b.in_channels)] + [(1, j) for j in range(n.in_channels)]
    return contiguous and b.in_channels == n.in_channels and b.out_channels == n.out_channels


def _widen_bn(b: nn.BatchNorm2d, n: nn.BatchNorm2d, layout: Layout) -> nn.BatchNorm2d:
    bn = deepcopy(b)
    bn.num_features = len(layout)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = torch.stack([getattr((b, n)[s], name)[j] for s, j in layout])
            if name in ("weight", "bias"):
                setattr(bn, name, nn.Parameter(value, requires_grad=False))
            else:
                setattr(bn, name, value)
    return bn
