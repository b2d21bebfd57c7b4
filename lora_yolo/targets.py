"""Which conv and linear layers get an adapter, and why the others do not.

Presets come from the model's own YAML rather than hard-coded layer indices, so they fit every YOLO11 scale and
YOLOv8 alike: layers listed under `backbone:` are the backbone, the last layer is the head (Detect), the rest of the
`head:` section is the neck, and `attention` is every conv or linear layer inside an attention module: Ultralytics'
`Attention` (C2PSA), and RT-DETR's `nn.MultiheadAttention` (AIFI, the decoder's self-attention; only `out_proj` is a
layer, and it is skipped) and deformable cross-attention (`MSDeformAttn`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from torch import nn
from ultralytics.nn.modules.block import DFL, Attention, RealNVP
from ultralytics.nn.modules.conv import Conv, DWConv
from ultralytics.nn.modules.head import Classify, RTDETRDecoder, SemanticSegment
from ultralytics.nn.modules.transformer import MSDeformAttn

from lora_yolo.config import LoraConfig
from lora_yolo.errors import LoraYoloError
from lora_yolo.layer import LoraLayer, lora_param_count, max_rank


@dataclass
class ConvLayer:
    """One conv of the model as `inspect` shows it, with the selection decision."""

    name: str
    kind: str  # pointwise | kxk | strided | depthwise | grouped | attention | linear | transposed
    section: str  # backbone | neck | head
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    groups: int
    params: int
    selected: bool = False
    reason: str = ""  # why it is not selected
    r: int = 0
    lora_alpha: float = 0.0
    lora_params: int = 0

    def to_dict(self) -> dict:
        """JSON form for `inspect --json`."""
        return asdict(self)


def _section(name: str, n_backbone: int, n_layers: int) -> str:
    index = int(name.split(".")[1])  # "model.16.cv1.conv" -> 16
    return "backbone" if index < n_backbone else "head" if index == n_layers - 1 else "neck"


def _kind(conv: nn.Conv2d | nn.Linear | nn.ConvTranspose2d, attention: bool) -> str:
    if isinstance(conv, nn.Linear):
        return "linear"
    if isinstance(conv, nn.ConvTranspose2d):
        return "transposed"
    if conv.groups > 1:
        return "depthwise" if conv.groups == conv.in_channels == conv.out_channels else "grouped"
    if attention:
        return "attention"
    if max(conv.stride) > 1:
        return "strided"
    return "pointwise" if conv.kernel_size == (1, 1) else "kxk"


def _presets(layer: ConvLayer, in_attention: bool) -> set[str]:
    return {"all", layer.section} | ({"attention"} if in_attention else set())


def class_layers(model: nn.Module) -> list[str]:
    """Names of the head's class-prediction layers: the last conv of each `cv3` / `one2one_cv3` branch of a Detect
    head and of YOLO26 segment's training-only semantic branch (`proto.semseg`, as Ultralytics remaps it), the linear
    layer of a Classify head, the last conv of a SemanticSegment head's classifier and of its auxiliary head (used in
    training only, trained like the rest), and RT-DETR's linear score layers (the encoder's and each decoder layer's)
    plus its class embedding for denoising queries (one row per class, training only)."""
    index = len(model.model) - 1
    head = model.model[index]
    if isinstance(head, Classify):
        return [f"model.{index}.linear"]
    if isinstance(head, RTDETRDecoder):
        scores = [f"model.{index}.dec_score_head.{i}" for i in range(len(head.dec_score_head))]
        return [f"model.{index}.enc_score_head", *scores, f"model.{index}.denoising_class_embed"]
    if isinstance(head, SemanticSegment):
        return [f"model.{index}.{attr}.1" for attr in ("classifier", "aux_head") if getattr(head, attr) is not None]
    semseg = getattr(getattr(head, "proto", None), "semseg", None)  # YOLO26 segment's training-only semantic branch
    return [
        f"model.{index}.{attr}.{i}.{len(branch) - 1}"
        for attr in ("cv3", "one2one_cv3")
        for i, branch in enumerate(getattr(head, attr, None) or [])
        if isinstance(branch[-1], nn.Conv2d)
    ] + ([f"model.{index}.proto.semseg.{len(semseg) - 1}"] if semseg is not None else [])


STATISTICS = (".running_mean", ".running_var")  # what a trained BatchNorm stores beside its parameters


def head_tensors(model: nn.Module) -> list[str]:
    """What `train_head` trains and stores in full: every parameter of the task head (the model's last layer) but
    the fixed DFL projection, which Ultralytics never trains, and its BatchNorms' running statistics. Other buffers
    (YOLO26 pose's flow constants, a depth head's calibration) are fixed: the base's stay."""
    prefix = f"model.{len(model.model) - 1}."
    fixed = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, DFL))
    statistics = [n for n, _ in model.named_buffers() if n.endswith(STATISTICS)]
    kept = [n for n, _ in model.named_parameters()] + statistics
    return [k for k in kept if k.startswith(prefix) and not k.startswith(fixed)]


def bias_tensors(modules: Mapping[str, nn.Module], layers: Iterable[str]) -> list[str]:
    """What `train_bias` trains and stores in full: the bias of each adapted conv in `layers`, which for the conv of
    an Ultralytics `Conv` or `DWConv` block (bias-free, followed by a BatchNorm) is that BatchNorm's shift,
    `<block>.bn.bias`. Those are the blocks `lora_yolo.fold` folds for training, so the shift trains on the base's
    statistics, which never change there. Adapted convs elsewhere (a head's last conv, a linear layer) keep their
    own bias frozen."""
    keys = []
    for layer in layers:
        block, _, leaf = layer.rpartition(".")
        bn = modules.get(f"{block}.bn")  # by name: a fused model's blocks no longer hold theirs
        if leaf == "conv" and type(modules.get(block)) in (Conv, DWConv) and isinstance(bn, nn.BatchNorm2d):
            keys.append(shift_key(layer))
    return keys


def shift_key(layer: str) -> str:
    """The name of the BatchNorm shift `train_bias` trains for the adapted conv `layer` of a Conv block."""
    return f"{layer.removesuffix('.conv')}.bn.bias"


def branch_paths(classes: list[str], modules: Mapping[str, nn.Module]) -> list[str]:
    """Paths of the Sequentials (in `modules`, by name) that end in one of the class convs `classes`: in a
    Detect-family head both YOLO26 branches and YOLO26 segment's semantic branch; what add_classes runs a trained
    copy of (`lora_yolo.branch`), and what its adapters leave alone."""
    paths = [layer.rpartition(".")[0] for layer in classes]
    return [p for p in paths if isinstance(modules.get(p), nn.Sequential) and isinstance(modules[p][-1], nn.Conv2d)]


def describe_convs(model: nn.Module, config: LoraConfig, full: frozenset[str] = frozenset()) -> list[ConvLayer]:
    """Every conv (transposed too) and linear layer of an Ultralytics model with what `config` does to it; `full`
    names the layers trained in full instead.

    Example:
        >>> rows = describe_convs(DetectionModel("yolo11n.yaml"), LoraConfig())
        >>> sum(row.lora_params for row in rows)
    """
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise LoraYoloError("this model already carries LoRA adapters; start from a plain base model")
    yaml = getattr(model, "yaml", None)
    if not isinstance(yaml, dict) or "backbone" not in yaml:
        raise LoraYoloError("the model has no Ultralytics YAML (backbone/head), so LoRA presets cannot be derived")
    n_backbone, n_layers = len(yaml["backbone"]), len(model.model)
    attention = [n for n, m in model.named_modules() if isinstance(m, (Attention, nn.MultiheadAttention, MSDeformAttn))]
    fixed = [n for n, m in model.named_modules() if isinstance(m, DFL)]
    flows = [n for n, m in model.named_modules() if isinstance(m, RealNVP)]
    read_directly = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    # add_classes: the base's class branches stay as they are (a trained copy beside each scores the new classes)
    paths = branch_paths(class_layers(model), dict(model.named_modules())) if config.add_classes else []
    branches = tuple(f"{p}." for p in paths)
    head = f"model.{n_layers - 1}." if config.train_head else None
    rows = []
    for name, conv in model.named_modules():
        if not isinstance(conv, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            continue
        in_attention = any(name.startswith(a + ".") for a in attention)
        linear = isinstance(conv, nn.Linear)
        row = ConvLayer(
            name=name,
            kind=_kind(conv, in_attention),
            section=_section(name, n_backbone, n_layers),
            in_channels=conv.in_features if linear else conv.in_channels,
            out_channels=conv.out_features if linear else conv.out_channels,
            kernel=1 if linear else conv.kernel_size[0],
            stride=1 if linear else conv.stride[0],
            groups=1 if linear else conv.groups,
            params=sum(p.numel() for p in conv.parameters()),
        )
        wanted = bool(set(config.targets) & _presets(row, in_attention)) or any(
            re.search(p, name) for p in config.include
        )
        if not wanted:
            row.reason = "not in targets"
        elif int(name.split(".")[1]) < config.first_layer:
            row.reason = f"before first_layer {config.first_layer}"
        elif any(re.search(p, name) for p in config.exclude):
            row.reason = "excluded"
        elif any(name.startswith(f + ".") for f in fixed):
            row.reason = "fixed DFL projection, never trained"
        elif any(name.startswith(f + ".") for f in flows):  # YOLO26 pose: its loss reads these layers' weights
            row.reason = "RealNVP flow of the pose loss (training only), which reads its layers' weights itself"
        elif head and name.startswith(head):
            row.reason = "task head trained in full (train_head)"
        elif name.startswith(branches):
            row.reason = "class branch kept as the base's (add_classes: a trained copy beside it scores the new ones)"
        elif config.add_classes == "exact":
            row.reason = "add_classes=exact adapts nothing: only the class-branch copies train"
        elif name in full:
            row.reason = "trained in full (new classes)"
        elif name.rpartition(".")[0] in read_directly:
            row.reason = (
                "nn.MultiheadAttention reads this weight itself (never calls the layer): an adapter would not apply"
            )
        elif row.kind == "transposed":  # YOLO26's Depth head upsamples with one
            row.reason = "transposed conv: no adapter form for it here, it stays frozen"
        elif row.groups > 1:
            row.reason = (
                f"{row.kind} (groups={conv.groups}) not supported: a per-group adapter would hold "
                f"{lora_param_count(conv, config.rank_for(name))} params vs the layer's {row.params}"
            )
        elif config.rank_for(name) > max_rank(conv) and not config.clamp_rank:
            r = config.rank_for(name)
            if any(re.search(p, name) for p in [*config.rank_pattern, *config.include]):  # asked for by name
                raise LoraYoloError(
                    f"rank {r} is larger than layer {name} can use (at most {max_rank(conv)} for a "
                    f"{conv.in_channels}->{conv.out_channels} conv, kernel {row.kernel}); lower it with rank_pattern"
                )
            # A preset swept it in: with r > min(out, in*k*k) the adapter is no smaller than the layer and no more
            # expressive than training it in full (typically a Detect class conv with few classes).
            row.reason = f"rank {r} > its limit {max_rank(conv)} = min(out, in*k*k): adapter no smaller than the layer"
        else:
            row.selected = True
            r = config.rank_for(name)
            row.r = min(r, max_rank(conv))  # clamp_rank: at the limit, the adapter spans every weight the layer can
            ratio = row.r / r  # 1 unless clamped; the scale stays alpha / r (alpha / sqrt(r) with rsLoRA)
            row.lora_alpha = config.alpha_for(name) * (math.sqrt(ratio) if config.use_rslora else ratio)
            row.lora_params = lora_param_count(conv, row.r, config.use_dora)
        rows.append(row)
    return rows


def select_targets(model: nn.Module, config: LoraConfig, full: frozenset[str] = frozenset()) -> dict[str, tuple]:
    """Map each selected conv name to its (r, lora_alpha); an empty selection is an error naming nearby layers."""
    return plan_of(describe_convs(model, config, full), config)


def plan_of(rows: list[ConvLayer], config: LoraConfig) -> dict[str, tuple]:
    """The plan for `add_lora` from `describe_convs` rows already computed."""
    plan = {row.name: (row.r, row.lora_alpha) for row in rows if row.selected}
    if not plan:
        names = [row.name for row in rows]
        hints = sorted({n for p in config.include for n in difflib.get_close_matches(p, names, n=3, cutoff=0.3)})
        hint = (
            f"; nearest layer names: {', '.join(hints)}" if hints else f"; layers look like: {names[len(names) // 2]}"
        )
        skipped = [row for row in rows if row.reason not in ("", "not in targets")]  # matched, then left out
        unmatched = [p for p in config.include if not any(re.search(p, n) for n in names)]  # a typo: the names help
        if skipped and not unmatched:
            hint = f"; every layer it matches is left out, e.g. {skipped[0].name}: {skipped[0].reason}"
        too_big = [row for row in rows if row.reason.startswith("rank ")]
        if too_big:
            hint = f"; rank {config.r} is larger than every selected layer can use ({too_big[0].reason.split(': ')[0]})"
        raise LoraYoloError(
            f"the selection (targets={config.targets}, include={config.include}, exclude={config.exclude}) "
            f"matches no trainable conv layer{hint}"
        )
    return plan
