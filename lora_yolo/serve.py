"""`AdapterModel`: one base in memory serving many adapters, switched without reloading (PEFT's multi-adapter verbs).

The base is loaded once and fused the way Ultralytics fuses every model it predicts with (conv+BN folded), so with
no adapter active it computes exactly what `YOLO(base).predict` computes. An adapter was trained on the unfused conv
W, before BatchNorm's per-channel scale s; the fused conv holds s * W, so the adapted fused weight is
  LoRA: s * (W + delta W) = W_fused + s * delta W
  DoRA: s * dora(W_fused / s + delta W)
which `SwitchableLayer` computes on the fly (unmerged) or writes into the conv (`merge_adapter`, zero extra cost).

Adapters that change the class set carry their class layers in full: switching to one swaps those layers, the head's
class count and the model's names, so predictions and validation speak the adapter's classes. An add_classes adapter
carries copies of the class branches instead: switching to one puts a `ClassBranch` (the base's own fused branch and
the copy) at each class branch, so the base's classes are scored by the base's branch.

YOLO26's head has two branches, one-to-many (`cv2`/`cv3`, decoded with NMS) and one-to-one (`one2one_cv2`/`cv3`,
NMS-free); training adapts both (the one-to-one branch sees detached features, so its adapters learn from its own
loss only) and merging merges both. Ultralytics' fuse removes the branch inference does not run, chosen by
`end2end` (Ultralytics' predictor sets it from `nms=False`), so the branch is chosen when the base is loaded here
(`end2end`) and the adapters of the removed branch, which change no output, are checked and then left out.

Example:
    >>> model = AdapterModel("yolo11n-shapes.pt")
    >>> model.load_adapter("a.safetensors", "a"); model.load_adapter("b.safetensors", "b")
    >>> model.set_adapter("a"); model.predict("images/", save=True)
    >>> model.set_adapter("b"); model.merge_adapter(); model.val(data="b.yaml")
    >>> model.disable_adapters()  # the base, exactly
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from ultralytics import YOLO
from ultralytics.nn.modules import Conv, RepConv

from lora_yolo.adapter import Adapter, attach_adapter, check_fits, check_layers, fingerprint, load_adapter
from lora_yolo.branch import NEW, ClassBranch, new_branch
from lora_yolo.checkpoint import check_task, is_model_yaml, load_error, load_model, resolve_checkpoint
from lora_yolo.datacheck import check_dataset
from lora_yolo.errors import LoraYoloError, first_line
from lora_yolo.inject import merge_lora, replace_module
from lora_yolo.layer import MergeableLayer, dora_scale, layer_forward, lora_delta, lora_scaling, per_channel
from lora_yolo.passthrough import check_args
from lora_yolo.targets import bias_tensors, branch_paths, class_layers


class _LayerAdapter(nn.Module):
    """One adapter's tensors for one conv, as buffers: they follow `.to()`/`.half()` and are never trained here.
    `shift`: what a train_bias adapter adds to the fused conv's bias (its trained BatchNorm shift minus the base's)."""

    def __init__(self, adapter: Adapter, layer: str, shift: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("shift", shift)
        r, alpha = adapter.layers[layer]
        self.scaling = lora_scaling(r, alpha, adapter.config.use_rslora)
        self.register_buffer("lora_A", adapter.tensors[f"{layer}.lora_A.weight"].float())
        self.register_buffer("lora_B", adapter.tensors[f"{layer}.lora_B.weight"].float())
        magnitude = adapter.tensors.get(f"{layer}.lora_magnitude_vector")
        self.register_buffer("magnitude", None if magnitude is None else magnitude.float())


def adapted_forward(layer: SwitchableLayer | RepConvLayer, x: torch.Tensor) -> torch.Tensor:
    """What a fused conv with its active adapter computes, unmerged: the adapted weight, and the adapted bias where
    the adapter shifts it (train_bias)."""
    base, shifted = layer.base_layer, layer.adapted_bias()
    bias = base.bias if shifted is None else shifted
    return layer_forward(base, x, layer.adapted_weight(base.weight.dtype), bias)


class SwitchableLayer(MergeableLayer):
    """A fused base conv (or a linear layer) with any number of named adapters, at most one active, optionally
    merged into the weight."""

    def __init__(self, base_layer: nn.Conv2d | nn.Linear, bn_scale: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("bn_scale", bn_scale)  # s: the BatchNorm scale folded into base_layer (ones if none)
        self.adapters = nn.ModuleDict()
        self.active: str | None = None

    def add(self, name: str, adapter: Adapter, layer: str, shift: torch.Tensor | None = None) -> None:
        """Hold `adapter`'s tensors for this conv under `name` (their shapes were checked by `check_layers`)."""
        self.adapters[name] = _LayerAdapter(adapter, layer, shift).to(self.base_layer.weight.device)

    def activate(self, name: str | None) -> None:
        """Make `name` the active adapter here; None (or an adapter with nothing here) leaves the base layer."""
        self.active = name if name in self.adapters else None

    def remove(self, name: str) -> None:
        """Forget adapter `name`'s tensors for this layer, if it has any."""
        if name in self.adapters:
            del self.adapters[name]

    def adapted_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fused weight with the active adapter applied, in `dtype`."""
        a = self.adapters[self.active]
        w = self.base_layer.weight.to(dtype)
        s = per_channel(self.bn_scale.to(dtype), w.dim())
        delta = lora_delta(a.lora_A, a.lora_B, a.scaling, dtype)
        if a.magnitude is None:
            return w + s * delta
        v = torch.where(s != 0, w / s, 0) + delta  # the unfused W + delta W (a channel with s = 0 stays zero)
        return s * v * per_channel(dora_scale(v, a.magnitude), w.dim())

    def shift(self) -> torch.Tensor | None:
        """The active adapter's change to the fused bias, if it has one here."""
        return None if self.active is None else self.adapters[self.active].shift

    def adapted_bias(self) -> torch.Tensor | None:
        shift, bias = self.shift(), self.base_layer.bias
        return None if shift is None else bias + shift.to(bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) if self.active is None or self.merged else adapted_forward(self, x)

    def merge(self) -> None:
        """Write the active adapter into the conv weight; nothing to do when no adapter here is active."""
        if self.active is not None:
            super().merge()


class RepConvLayer(MergeableLayer):
    """The one conv Ultralytics' fuse makes of a `RepConv` (RT-DETR's `RepC3`, YOLOv9's `RepBottleneck`), with
    adapters trained on its two branch convs.

    Fused, the RepConv computes one k x k conv whose weight is s1 · W1 + s2 · W2 (the 1x1 kernel padded to k x k) plus
    the identity branch. Each branch is a `SwitchableLayer` over that branch's own fused conv s · W (kept here, never
    in the model), so its adapted weight is exactly what it is for any other conv (LoRA and DoRA alike); the change it
    makes, padded to k x k, is added to the fused weight.
    """

    def __init__(self, base_layer: nn.Conv2d, branches: dict[str, SwitchableLayer]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.branches = nn.ModuleDict(branches)  # "conv1" (k x k), "conv2" (1x1)

    @property
    def active(self) -> bool:
        return any(branch.active is not None for branch in self.branches.values())

    def activate(self, name: str | None) -> None:
        for branch in self.branches.values():
            branch.activate(name)

    def remove(self, name: str) -> None:
        for branch in self.branches.values():
            branch.remove(name)

    def adapted_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fused weight plus each active branch's adapted minus base weight, in `dtype`."""
        w = self.original_weight.to(dtype)
        for branch in self.branches.values():
            if branch.active is not None:
                change = branch.adapted_weight(dtype) - branch.base_layer.weight.to(dtype)
                pad = (w.shape[-1] - change.shape[-1]) // 2
                w = w + F.pad(change, [pad] * 4)
        return w

    def adapted_bias(self) -> torch.Tensor | None:
        """The fused bias plus each active branch's shift, or None where no branch has one."""
        shifts = [s for s in (branch.shift() for branch in self.branches.values()) if s is not None]
        bias = self.base_layer.bias
        return bias + sum(shifts).to(bias.dtype) if shifts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) if not self.active or self.merged else adapted_forward(self, x)

    def merge(self) -> None:
        """Write the active adapter's branches into the fused conv; nothing to do when none is active here."""
        if self.active:
            super().merge()


def repconv_branches(model: nn.Module, scales: dict[str, torch.Tensor]) -> dict[str, tuple[str, str, SwitchableLayer]]:
    """For every unfused `RepConv` of `model`, by the name of each branch conv (`<path>.conv1.conv`,
    `<path>.conv2.conv`): the path of the conv fusing makes of the RepConv (`<path>.conv`), the branch, and a
    `SwitchableLayer` over the conv fusing makes of that branch alone (weight s · W for its BatchNorm's scale s; the
    bias does not matter here)."""
    branches = {}
    for path, m in model.named_modules():
        if isinstance(m, RepConv) and hasattr(m, "conv1"):
            for branch in ("conv1", "conv2"):
                name = f"{path}.{branch}.conv"
                conv = deepcopy(getattr(m, branch).conv)
                conv.weight = nn.Parameter(conv.weight.detach() * per_channel(scales[name], 4), requires_grad=False)
                branches[name] = (f"{path}.conv", branch, SwitchableLayer(conv, scales[name]))
    return branches


def bn_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """For every Conv+BN block, the per-channel scale gamma / sqrt(var + eps) that fusing folds into its conv."""
    return {
        f"{name}.conv": (m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)).detach().float()
        for name, m in model.named_modules()
        if isinstance(m, Conv) and hasattr(m, "bn")
    }


class AdapterModel:
    """An Ultralytics `YOLO` whose base stays loaded while adapters are added, switched, merged and removed.

    `predict`, `val` and `__call__` are Ultralytics' own (same arguments, same `Results`), run with the active
    adapter. The wrapped `YOLO` is `self.yolo`; train with `lora_yolo.train`, not `self.yolo.train`.
    """

    def __init__(self, base: str | Path, end2end: bool | None = None) -> None:
        """Load and fuse `base`; `end2end` picks a YOLO26 head's branch to keep (True: the NMS-free one-to-one, as
        Ultralytics' `nms=False`; default: the base's own choice, the one-to-many branch for Ultralytics' models)."""
        if is_model_yaml(base):
            raise LoraYoloError(
                f"serving needs the base checkpoint, not a model YAML ({base}); a run trained from a YAML keeps its "
                "base as weights/base.pt"
            )
        path = self._path = resolve_checkpoint(base)
        try:
            self.yolo = YOLO(path)
        except Exception as e:
            raise load_error(path, e) from None
        model = self.yolo.model.float()
        check_task(self.yolo.task, path)
        self.base = fingerprint(model)  # of the unfused base: what adapters record
        self._scales = bn_scales(model)
        two_branches = getattr(model.model[-1], "one2one_cv2", None) is not None
        if end2end is not None and two_branches:
            model.end2end = end2end
        self._kept = ("one-to-one (NMS-free)" if model.end2end else "one-to-many (NMS)") if two_branches else None
        unfused, self._class_convs = dict(model.named_modules()), class_layers(model)  # both YOLO26 branches
        # the class branches as loaded (add_classes adapters hold copies of them), before fuse changes them
        self._branches = {p: deepcopy(unfused[p]) for p in branch_paths(self._class_convs, unfused)}
        self._repconv = repconv_branches(model, self._scales)  # adapters there go to the conv fuse makes of both
        self._head = f"model.{len(model.model) - 1}"  # a train_head adapter's head, fused, replaces the base's
        unfused_head = deepcopy(model.model[-1])  # what its tensors are checked against (fuse changes the model's)
        model.fuse(verbose=False)
        # the fused base's own modules, before any adapter replaces one: layers are found and put back through these
        # (their parents stay the same objects, also inside a class branch an adapter's copy runs beside)
        fused = self._fused = dict(model.named_modules())
        # What fuse set to None (YOLO26's unused head branch), not what it rebuilt (BatchNorms, RepConv branches):
        # adapters there change no output, so they are checked against the base and then left out.
        dropped = tuple(
            f"{p}.{k}." if p else f"{k}." for p, m in fused.items() for k, v in m._modules.items() if v is None
        )
        self._unused = {n for n in unfused if f"{n}.".startswith(dropped)}
        head = {f"{self._head}.{n}".rstrip("."): m for n, m in unfused_head.named_modules()}  # BatchNorms too
        self._checked_modules = {
            # what train_bias changes, and the blocks holding it (fuse drops a RepConv's)
            **{n: m for n, m in unfused.items() if isinstance(m, (nn.BatchNorm2d, Conv))},
            **{n: unfused[n] for n in [*self._unused, *self._repconv]},
            **fused,
            **head,
            **self._branches,
        }
        # names, and the base's class layers as loaded: a class set's rows start from these, never from a layer
        # an adapter was merged into later; the class branches first, so the class layers go back into them
        layers = [*self._branches, *self._class_convs]
        self._base_classes = (dict(model.names), {c: fused[c] for c in [self._head, *layers] if c in fused})
        self._adapters: dict[str, Adapter] = {}
        self._classes: dict[str, tuple[dict[int, str], dict[str, nn.Module]]] = {}
        # by layer path, whether or not in the model right now (a RepConv's: by the path of the conv fuse made)
        self._switchables: dict[str, SwitchableLayer | RepConvLayer] = {}
        self.active_adapter: str | None = None

    @property
    def model(self) -> nn.Module:
        return self.yolo.model

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return list(self._adapters)

    def load_adapter(
        self, source: str | Path | Adapter, name: str | None = None, allow_other_weights: bool = False
    ) -> str:
        """Add an adapter (a file or an `Adapter`) under `name` (default: the file's stem); it is not activated."""
        adapter = source if isinstance(source, Adapter) else load_adapter(source)
        name = name or (
            Path(source).stem.replace(".", "_") if not isinstance(source, Adapter) else f"adapter{len(self._adapters)}"
        )
        if not name or "." in name:
            raise LoraYoloError(f"adapter name {name!r} must be non-empty and contain no '.'")
        if name in self._adapters:
            raise LoraYoloError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")
        check_fits(adapter, self.base, allow_other_weights)
        check_layers(adapter, self._checked_modules, self._class_convs, self._base_classes[0])
        owners = [*adapter.layers, *(k.rpartition(".")[0] for k in adapter.full)]
        if owners and all(o in self._unused for o in owners):  # it would change nothing this model computes
            raise LoraYoloError(
                f"the adapter only changes the head branch this model does not run (it keeps the {self._kept} "
                f"branch); load the base with the other branch (AdapterModel(base, end2end=...), or nms= on the CLI)"
            )
        classes = self._class_layers(adapter, allow_other_weights)
        shifts = self._shifts(adapter)
        for layer in adapter.layers:
            if layer not in self._unused:
                self._switchable(layer).add(name, adapter, layer, shifts.get(layer))
        self._classes[name], self._adapters[name] = classes, adapter
        return name

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter (any merged adapter is unmerged first); its classes come with it."""
        if name not in self._adapters:
            raise LoraYoloError(f"no adapter named {name!r}; loaded: {', '.join(self._adapters) or 'none'}")
        self._activate(name)

    def disable_adapters(self) -> None:
        """No adapter active: the base, with its own classes, exactly as loaded."""
        self._activate(None)

    def delete_adapter(self, name: str) -> None:
        """Forget an adapter (disabling it first if it is active)."""
        if name not in self._adapters:
            raise LoraYoloError(f"no adapter named {name!r}")
        if self.active_adapter == name:
            self.disable_adapters()
        for layer in self._switchables.values():
            layer.remove(name)
        del self._adapters[name], self._classes[name]

    def merge_adapter(self) -> None:
        """Fold the active adapter into the weights, and put the plain convs back in the model: inference then runs
        exactly the base's modules. `unmerge_adapter` undoes it."""
        if self.active_adapter is None:
            raise LoraYoloError("no active adapter to merge; call set_adapter first")
        for path, layer in self._switchables.items():
            layer.merge()
            self._replace(path, layer, layer.base_layer)
        self.yolo.predictor = None

    def unmerge_adapter(self) -> None:
        """Restore the base weights bit-exactly; the adapter stays active, computed on the fly."""
        for path, layer in self._switchables.items():
            self._replace(path, layer.base_layer, layer)
            layer.unmerge()
        self.yolo.predictor = None

    def predict(self, *args: Any, **kwargs: Any) -> list:
        """Ultralytics' `YOLO.predict` with the active adapter.

        Ultralytics' predictor runs on a deep copy of the model taken when it is set up, so every switch, merge or
        unmerge drops it (`self.yolo.predictor = None`) and the next call sets up a new one from the model as it is.
        """
        self._check_branch(kwargs.get("nms"))
        return self.yolo.predict(*args, **kwargs)

    def val(self, *args: Any, **kwargs: Any) -> Any:
        """Ultralytics' `YOLO.val` with the active adapter."""
        self._check_branch(kwargs.get("nms"))
        return self.yolo.val(*args, **kwargs)

    def _check_branch(self, nms: bool | None) -> None:
        """A YOLO26 model keeps one head branch (chosen when loaded): `nms` asking for the other is refused, where
        Ultralytics would only warn and run the branch there is."""
        if self._kept is not None and nms is not None and nms != self._kept.startswith("one-to-many"):
            raise LoraYoloError(
                f"nms={nms} needs the other head branch: this model keeps the {self._kept} one; load it with "
                f"AdapterModel(base, end2end={not nms})"
            )

    __call__ = predict

    def _activate(self, name: str | None) -> None:
        self.unmerge_adapter()
        for layer in self._switchables.values():
            layer.activate(name)
        self._set_classes(*(self._classes[name] if name else self._base_classes))
        self.active_adapter = name

    def _replace(self, path: str, old: nn.Module, new: nn.Module) -> None:
        """Put `new` at `path` if `old` is there (a class set of the active adapter may hold that place instead). The
        parent is the base's own module, so this works inside a class branch that runs beside an adapter's copy."""
        parent, _, attr = path.rpartition(".")
        if getattr(self._fused[parent], attr) is old:
            setattr(self._fused[parent], attr, new)

    def _switchable(self, layer: str) -> SwitchableLayer:
        """The switchable layer at `layer`, made from the base's fused conv (or linear layer) there on first use; for
        a RepConv branch, that branch of the `RepConvLayer` put in place of the conv fuse made of the RepConv."""
        if layer in self._repconv:
            fused, branch, _ = self._repconv[layer]
            if fused not in self._switchables:
                conv = self._fused[fused]
                branches = {b: switchable for f, b, switchable in self._repconv.values() if f == fused}
                self._switchables[fused] = RepConvLayer(conv, branches).to(conv.weight.device)
                self._replace(fused, conv, self._switchables[fused])
            return self._switchables[fused].branches[branch]
        if layer in self._switchables:
            return self._switchables[layer]
        base_modules = self._base_classes[1]
        module = base_modules.get(layer) or self._fused[layer]  # conv or linear: check_layers made sure
        scale = self._scales.get(layer, torch.ones(module.weight.shape[0]))
        switchable = self._switchables[layer] = SwitchableLayer(module, scale.to(module.weight.device))
        if layer in base_modules:  # a class layer: other adapters' class sets may replace it
            base_modules[layer] = switchable
        self._replace(layer, module, switchable)
        return switchable

    def _shifts(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """By adapted conv, what a train_bias adapter adds to its fused bias: the trained BatchNorm shift minus the
        base's (fused, the bias is beta - mean * s, so only beta's change carries over)."""
        modules = self._checked_modules
        return {
            layer: adapter.tensors[key].float() - modules[key.removesuffix(".bias")].bias.detach().float()
            for layer, key in self._shift_keys(adapter).items()
        }

    def _shift_keys(self, adapter: Adapter) -> dict[str, str]:
        """By adapted conv, the name of the BatchNorm shift a train_bias adapter stores for it (one it lacks stays the
        base's, as attaching and merging leave it)."""
        if not adapter.config.train_bias:
            return {}
        keys = {layer: key for layer in adapter.layers for key in bias_tensors(self._checked_modules, [layer])}
        return {layer: key for layer, key in keys.items() if key in adapter.tensors}

    def _class_layers(self, adapter: Adapter, allow_other_weights: bool) -> tuple[dict[int, str], dict[str, nn.Module]]:
        """The adapter's class names and, for tensors trained in full, replacement modules built from the base's."""
        if adapter.config.add_classes:  # the base's branches run as they are, the copies beside them
            return dict(adapter.names), {
                path: ClassBranch(self._base_classes[1][path], self._branch_copy(adapter, path))
                for path in self._branches
                if path not in self._unused
            }
        if adapter.config.train_head:  # its class layers are in its head
            return dict(adapter.names), {self._head: self._head_copy(adapter, allow_other_weights)}
        modules: dict[str, nn.Module] = {}
        shifts = set(self._shift_keys(adapter).values())  # in the convs' biases (_shifts), not modules of their own
        for key in adapter.full:
            owner, _, param = key.rpartition(".")
            if owner in self._unused or key in shifts:
                continue
            if owner not in modules:
                modules[owner] = self._base_copy(owner)
            setattr(modules[owner], param, nn.Parameter(adapter.tensors[key].float(), requires_grad=False))
        for m in modules.values():
            if isinstance(m, nn.Conv2d):
                m.out_channels = m.weight.shape[0]
            elif isinstance(m, nn.Linear):
                m.out_features = m.weight.shape[0]
            elif isinstance(m, nn.Embedding):  # RT-DETR's class embedding (denoising queries, training only)
                m.num_embeddings = m.weight.shape[0]
        return dict(adapter.names), modules

    def _head_copy(self, adapter: Adapter, allow_other_weights: bool) -> nn.Module:
        """The head of the base with a train_head `adapter` attached and merged, fused as Ultralytics fuses a model
        (YOLO26: keeping the branch this model runs), in eval mode."""
        merged = merge_lora(attach_adapter(load_model(self._path), adapter, allow_other_weights))
        if self._kept is not None:
            merged.end2end = self.model.end2end
        head = merged.fuse(verbose=False).model[-1]
        return head.eval().requires_grad_(False)

    def _branch_copy(self, adapter: Adapter, path: str) -> nn.Module:
        """The adapter's copy of the class branch at `path` (check_layers made sure its tensors fit), in eval mode."""
        copy = new_branch(self._branches[path], adapter.nc - len(self._base_classes[0]))
        prefix = f"{path}.{NEW}."
        copy.load_state_dict({k.removeprefix(prefix): v for k, v in adapter.tensors.items() if k.startswith(prefix)})
        return copy.eval().requires_grad_(False)

    def _base_copy(self, path: str) -> nn.Module:
        """A copy of the base's own module at `path` (remembered, before any adapter replaces it), unadapted."""
        module = self._base_classes[1][path]  # every class layer is recorded when the base is loaded
        if not isinstance(module, SwitchableLayer):
            return deepcopy(module)
        copy = deepcopy(module.base_layer)
        copy.weight.data = module.original_weight.clone()
        return copy

    def _set_classes(self, names: dict[int, str], modules: dict[str, nn.Module]) -> None:
        """Install a class set: names, head class count, and the class layers (the base's where none is given): the
        base's class branches back first, the class layers into them, then any branch the class set replaces."""
        # Modules kept outside the model (an adapter's class layers, built in fp32 on the CPU; the base's while they
        # are replaced) miss a `.to()` or `.half()` of the model: each goes where the model is now as it goes in
        where = next(p for p in self.model.parameters() if p.is_floating_point())

        def install(path: str, module: nn.Module) -> None:
            replace_module(self.model, path, module.to(where.device, where.dtype))

        base = self._base_classes[1]
        head = modules.get(self._head, base[self._head])
        install(self._head, head)
        if head is not base[self._head]:  # a train_head adapter's head holds its own layers
            base = {}
        for path in self._branches:
            if path in base:
                install(path, base[path])
        for path, base_module in base.items():
            if path not in self._branches and path != self._head:
                install(path, modules.get(path, base_module))
        for path in self._branches:
            if path in modules:
                install(path, modules[path])
        head = self.model.model[-1]
        if hasattr(head, "reg_max"):  # a Detect head counts its outputs; a Classify head's are its linear layer's
            head.nc, head.no = len(names), len(names) + head.reg_max * 4
        elif hasattr(head, "nc"):  # SemanticSegment: its export reduces over nc classes
            head.nc = len(names)
        if self.model.names != names:
            self.model.names = dict(names)


# Arguments the predict/val commands own.
RESERVED = {"model": "--model", "source": "SOURCE", "data": "DATA", "mode": "(the command)", "task": "(the model's)"}


def serving_model(
    base: str | Path, adapter: str | Path | None, allow_other_weights: bool = False, nms: bool | None = None
) -> AdapterModel:
    """The base with `adapter` active and merged (so it runs at the base's speed), or the base alone; `nms` is
    Ultralytics' argument, whose False selects a YOLO26 head's NMS-free branch."""
    model = AdapterModel(base, end2end=nms is False)
    if adapter is not None:
        model.set_adapter(model.load_adapter(adapter, allow_other_weights=allow_other_weights))
        model.merge_adapter()
    return model


@contextmanager
def ultralytics_refusals() -> Iterator[None]:
    """Ultralytics refuses what a user gives it (a value out of range, a device that is not there, a split or a
    folder with no images, an output folder that cannot be written, a URL offline) with plain Python exceptions:
    each is one line here."""
    try:
        yield
    except (ValueError, TypeError, OSError) as e:
        raise LoraYoloError(first_line(e)) from e  # the cause kept for --debug


def predict(
    source: str | Path,
    base: str | Path,
    adapter: str | Path | None = None,
    allow_other_weights: bool = False,
    **overrides: Any,
) -> tuple[Path, int, int | None]:
    """Ultralytics prediction on `source` with `base` + `adapter`, no merged file; returns (save_dir, images, boxes),
    boxes None for a classification, semantic segmentation or depth model (one label, class map or depth map per
    image).

    `overrides` are Ultralytics predict arguments (imgsz, conf, save, ...); results are streamed, so any source
    size works.

    Example:
        >>> predict("images/", "yolo11n.pt", "runs/detect/train/adapter.safetensors", save=True)
    """
    check_args(overrides, RESERVED, "predict")
    if not Path(source).exists() and "://" not in str(source):
        raise LoraYoloError(f"source not found: {source}")
    model = serving_model(base, adapter, allow_other_weights, overrides.get("nms"))
    # Ultralytics' predictor itself, with YOLO.predict's defaults: YOLO.predict takes any program whose name ends in
    # "yolo" (lora-yolo does) for its own CLI, and then returns nothing.
    args = {**model.yolo.overrides, "conf": 0.25, "batch": 1, "rect": True, **overrides, "mode": "predict"}
    images = boxes = 0
    with ultralytics_refusals():
        predictor = model.yolo.task_map[model.yolo.task]["predictor"](overrides=args)
        predictor.setup_model(model=model.model, verbose=False)
        for result in predictor(source=str(source), stream=True):
            images += 1
            boxes += 0 if result.probs is not None else len(result)  # detections (boxes, masks, keypoints or obb)
    if not images:  # Ultralytics skips an image it cannot read with a warning, and finishes with nothing
        raise LoraYoloError(f"no image or video frame was read from {source}")
    return Path(predictor.save_dir), images, None if model.yolo.task in ("classify", "semantic", "depth") else boxes


def validate(
    data: str | Path,
    base: str | Path,
    adapter: str | Path | None = None,
    allow_other_weights: bool = False,
    **overrides: Any,
) -> Any:
    """Ultralytics validation of `base` + `adapter` on the dataset YAML `data` (a classification model: the dataset
    folder); returns Ultralytics' metrics.

    Example:
        >>> metrics = validate("data.yaml", "yolo11n.pt", "adapter.safetensors", imgsz=640)
        >>> metrics.box.map
    """
    check_args(overrides, RESERVED, "val")
    model = serving_model(base, adapter, allow_other_weights, overrides.get("nms"))
    nc = check_dataset(data, model.yolo.task)["nc"]
    if nc != len(model.model.names):
        raise LoraYoloError(f"{data} has {nc} classes, the model with this adapter predicts {len(model.model.names)}")
    with ultralytics_refusals():
        return model.val(data=str(data), **overrides)
