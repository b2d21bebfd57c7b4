"""The adapter file: one `.safetensors` with the trained tensors and, in its metadata, what they fit.

Tensors
  `<conv>.lora_A.weight`  (r, in, kh, kw)   for every adapted conv, e.g. `model.16.cv1.conv.lora_A.weight`
  `<conv>.lora_B.weight`  (out, r, 1, 1)
  `<conv>.lora_magnitude_vector`  (out,)  DoRA only: the trained magnitude per output channel
  `<param>`               any tensor trained in full, under its model name (the class layers when the class count
                          changed, e.g. `model.23.cv3.0.2.weight`; with train_head every tensor of the task head,
                          BatchNorm statistics included, e.g. `model.23.cv2.0.0.bn.running_var`; with add_classes
                          the parallel class branches' tensors, e.g. `model.23.cv3.0.new.0.0.bn.running_mean`)
Metadata (safetensors' string map, values JSON)
  format, format_version, task, lora_config (LoraConfig.to_dict), layers ({conv: [r, lora_alpha]}),
  full (names of tensors trained in full), nc, names, base (fingerprint of the base the adapter fits).

Loading never unpickles: safetensors parses a JSON header and raw tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file
from torch import nn
from ultralytics.nn.modules import DFL

from lora_yolo.atomic import atomic_path
from lora_yolo.branch import add_class_branches, new_tensor_shapes
from lora_yolo.checkpoint import build_for_classes, class_count, model_task
from lora_yolo.config import LoraConfig, positive_number
from lora_yolo.errors import LoraYoloError
from lora_yolo.inject import LORA_SUFFIXES, add_lora, lora_plan, lora_tensor_names
from lora_yolo.targets import bias_tensors, branch_paths, class_layers

FORMAT = "lora-yolo-adapter"
FORMAT_VERSION = 1


def fingerprint(model: nn.Module) -> dict:
    """Identify a base: `arch` hashes parameter names and shapes, `weights` hashes their fp32 values.

    Integer buffers (BatchNorm's `num_batches_tracked`) are left out of `weights`: they never change outputs.
    """
    arch, weights = hashlib.sha256(), hashlib.sha256()
    for name, t in model.state_dict().items():
        arch.update(f"{name}:{tuple(t.shape)};".encode())
        if t.is_floating_point():
            weights.update(name.encode())
            weights.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return {
        "arch": arch.hexdigest()[:16],
        "weights": weights.hexdigest()[:16],
        "yaml": str(getattr(model, "yaml", {}).get("yaml_file", "")),
        "path": str(Path(model.pt_path).resolve()) if getattr(model, "pt_path", None) else "",  # a hint, not checked
        "nc": class_count(model),
    }


@dataclass
class Adapter:
    """An adapter in memory: tensors plus what they fit."""

    tensors: dict[str, torch.Tensor]
    config: LoraConfig
    layers: dict[str, tuple[int, float]]  # conv name -> (r, lora_alpha)
    full: list[str]  # tensors trained in full
    nc: int
    names: dict[int, str]
    base: dict  # fingerprint() of the base
    task: str = "detect"  # the base's Ultralytics task

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (string values only)."""
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "task": self.task,
            "lora_config": json.dumps(self.config.to_dict()),
            "layers": json.dumps({k: list(v) for k, v in self.layers.items()}),
            "full": json.dumps(self.full),
            "nc": str(self.nc),
            "names": json.dumps({str(k): v for k, v in self.names.items()}),
            "base": json.dumps(self.base),
        }


def save_adapter(adapter: Adapter, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the adapter atomically, in fp16 by default (as Ultralytics stores its checkpoints); returns the path.

    Everything downstream (merged.pt, merge, export) is built from the file, so they agree with it exactly.

    Example:
        >>> save_adapter(adapter, "runs/detect/train/adapter.safetensors")
    """
    with atomic_path(path) as tmp:
        save_file(_stored(adapter, dtype), str(tmp), metadata=adapter.metadata())
    return Path(path)


# Bounds checked before safetensors allocates anything: a real adapter has a header of tens of KB and a few hundred
# tensors, so a file claiming more is damaged or hostile.
MAX_HEADER_BYTES = 8 << 20
MAX_TENSORS = 20_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8}  # I64: a BatchNorm step count PEFT saves


def check_header(path: Path) -> None:
    """Validate the safetensors framing with bounded reads: header size, JSON, dtypes, shapes and offsets.

    The format is an 8-byte little-endian header length, a JSON header, then the raw tensor bytes; every tensor's
    `data_offsets` must tile the data region exactly and agree with its dtype and shape.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise LoraYoloError(f"{path} is empty or truncated ({size} bytes)")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES:
            raise LoraYoloError(f"{path} declares a {n:,}-byte header (at most {MAX_HEADER_BYTES:,}): not an adapter")
        if 8 + n > size:
            raise LoraYoloError(f"{path} is truncated: its header needs {8 + n:,} bytes, the file has {size:,}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            raise LoraYoloError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict) or len(header) > MAX_TENSORS + 1:
        raise LoraYoloError(f"{path} has a malformed header")
    spans, data = [], size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
            ok = ok and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data
            ok = ok and math.prod(shape) * DTYPE_BYTES[dtype] == end - begin
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LoraYoloError(f"{path} is damaged: tensor {str(name)[:80]!r} has an inconsistent entry")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise LoraYoloError(f"{path} is damaged: tensor data overlaps or leaves gaps")
        position = end
    if position != data:
        raise LoraYoloError(f"{path} is damaged: {data:,} data bytes, the header accounts for {position:,}")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, header checked first with bounded reads; never unpickles.

    Any damage is a `LoraYoloError` naming the file.
    """
    check_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraYoloError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def load_adapter(path: str | Path) -> Adapter:
    """Read and validate an adapter file; any damage or inconsistency is a `LoraYoloError` naming the file.

    Nothing is unpickled or executed: the header is checked with bounded reads, then safetensors reads raw bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraYoloError(f"adapter file not found: {path}")
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise LoraYoloError(f"{path} is not a lora-yolo adapter (no '{FORMAT}' metadata)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise LoraYoloError(
            f"{path} has adapter format version {meta.get('format_version')!r}, "
            f"this lora-yolo reads version {FORMAT_VERSION}"
        )
    adapter = parse_metadata(tensors, meta, path)
    check_tensors(adapter, path)
    return adapter


def parse_json(text: str, what: str, path: Path) -> object:
    """`json.loads` for text from a file: malformed or absurdly nested JSON is a `LoraYoloError` naming `path`."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise LoraYoloError(f"{path} has damaged {what} (not JSON)") from None


def parse_metadata(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Adapter:
    """The Adapter that `Adapter.metadata()` describes, holding `tensors` (not yet checked against it).

    Every field is checked for type and range here, so later code can trust it: ranks are positive integers, alphas
    finite and positive, `names` are exactly the class ids 0..nc-1. Anything else is a `LoraYoloError` naming `path`.
    """

    def field(key: str) -> object:
        if key not in meta:
            raise LoraYoloError(f"{path} has damaged adapter metadata (no {key!r})")
        return parse_json(meta[key], f"adapter metadata {key!r}", path)

    def bad(what: str) -> LoraYoloError:
        return LoraYoloError(f"{path} has damaged adapter metadata ({what})")

    config, layers, full, nc, names, base = (field(k) for k in ("lora_config", "layers", "full", "nc", "names", "base"))
    if not isinstance(config, dict):
        raise bad("lora_config is not a mapping")
    try:
        config = LoraConfig.from_dict(config)
    except LoraYoloError as e:
        raise bad(f"lora_config: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise bad(f"lora_config: {type(e).__name__}") from None
    if (
        not isinstance(layers, dict)
        or not (layers or full)  # class-branch copies alone: add_classes=exact
        or not all(
            isinstance(v, list) and len(v) == 2 and _positive_int(v[0]) and positive_number(v[1])
            for v in layers.values()
        )
    ):
        raise bad("layers must map convs to [rank >= 1, alpha > 0], at least one unless tensors are trained in full")
    if not isinstance(full, list) or not all(isinstance(n, str) for n in full) or len(set(full)) != len(full):
        raise bad("full must be a list of distinct tensor names")
    if not _positive_int(nc):
        raise bad(f"nc must be a positive integer, got {str(nc)[:20]!r}")
    if not isinstance(names, dict) or len(names) != nc or set(names) != {str(i) for i in range(nc)}:
        raise bad(f"names must give exactly the class ids 0..{nc - 1} (nc={nc})")
    if not all(isinstance(v, str) for v in names.values()):
        raise bad("class names must be strings")
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("arch", "weights")):
        raise bad("base must record the base's arch and weights fingerprints")
    return Adapter(
        tensors=tensors,
        config=config,
        layers={k: (int(r), float(a)) for k, (r, a) in layers.items()},
        full=full,
        nc=nc,
        names={int(k): v for k, v in names.items()},
        base=base,
        task=str(meta.get("task", "detect")),
    )


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_tensors(adapter: Adapter, path: Path) -> None:
    """The tensors must be exactly what the metadata promises, with shapes that agree with the ranks."""
    dora = adapter.config.use_dora
    expected = {n for layer in adapter.layers for n in lora_tensor_names(layer, dora)} | set(adapter.full)
    if set(adapter.tensors) != expected:
        odd = sorted(set(adapter.tensors) ^ expected)[:3]
        raise LoraYoloError(f"{path} is inconsistent: tensors and metadata disagree on {odd}")
    for layer, (r, _) in adapter.layers.items():
        a, b = adapter.tensors[f"{layer}.lora_A.weight"], adapter.tensors[f"{layer}.lora_B.weight"]
        conv = a.ndim == 4 and b.ndim == 4 and b.shape[2:] == (1, 1)
        if not (conv or a.ndim == b.ndim == 2) or a.shape[0] != r or b.shape[1] != r:
            raise LoraYoloError(f"{path} is inconsistent: {layer} has A {tuple(a.shape)}, B {tuple(b.shape)}, r={r}")
        if dora and adapter.tensors[f"{layer}.lora_magnitude_vector"].shape != b.shape[:1]:
            raise LoraYoloError(f"{path} is inconsistent: {layer}'s DoRA magnitude does not fit {b.shape[0]} channels")
    if any(not t.is_floating_point() or not torch.isfinite(t).all() for t in adapter.tensors.values()):
        raise LoraYoloError(f"{path} holds non-float or non-finite tensors")


def check_fits(adapter: Adapter, base: nn.Module | dict, allow_other_weights: bool = False) -> None:
    """Refuse an adapter made for another base (a model, or its `fingerprint`), naming both fingerprints.

    A different architecture is always refused; different weights of the same architecture (another training
    of the same model) only with `allow_other_weights`, since the adapter then runs on weights it never saw.
    """
    have = base if isinstance(base, dict) else fingerprint(base)
    want = adapter.base
    if have["arch"] != want["arch"]:
        raise LoraYoloError(
            f"adapter does not fit this base: it was trained on architecture {want['arch']} ({want.get('yaml')}, "
            f"nc={want.get('nc')}), the base is {have['arch']} ({have['yaml']}, nc={have['nc']})"
        )
    if have["weights"] != want["weights"]:
        text = (
            f"adapter was trained on other weights of this architecture "
            f"(base weights {want['weights']}, given {have['weights']})"
        )
        if not allow_other_weights:
            raise LoraYoloError(f"{text}; pass the original base, or allow a weights mismatch explicitly")
        warnings.warn(f"{text}: applying it anyway, as asked", stacklevel=2)


def check_layers(adapter: Adapter, modules: Mapping[str, nn.Module], classes: list[str], names: dict) -> None:
    """Every tensor of `adapter` must fit the base whose modules (by name, unadapted) are `modules`.

    LoRA layers must be plain ungrouped zero-padded convs with A (r, in, kh, kw) and B (out, r, 1, 1), or plain linear
    layers with A (r, in) and B (out, r). Tensors trained in full must be the weight or bias of a class layer
    (`classes`) without a LoRA adapter, with one row per adapter class: that is all training stores in full, and all
    serving can swap (the class layers have no BatchNorm, so they are the same in the fused model); with train_head
    the head's tensors, with train_bias the BatchNorm shift after each adapted conv (serving adds its change to the
    fused conv's bias). An adapter whose
    class set differs from the base's `names` must carry those class layers: the base's rows would otherwise be used
    for other classes (or be random, for new ones). An add_classes adapter holds copies of the class branches instead
    (`lora_yolo.branch`), checked against the unfused branches in `modules`, and LoRA layers (adapted mode) only
    outside those branches.
    The same checks hold against the base or its fused form, so attach, merge and serving agree. A crafted file
    fails here with one line instead of deep inside torch.
    """
    if adapter.config.add_classes:
        _check_branches(adapter, modules, classes, names)
    for layer, (r, _) in adapter.layers.items():
        conv = modules.get(layer)
        if type(conv) not in (nn.Conv2d, nn.Linear):
            what = "is not in the base model" if conv is None else f"is a {type(conv).__name__}, not a conv or linear"
            raise LoraYoloError(f"adapter layer {layer} {what}")
        if type(conv) is nn.Conv2d and (conv.groups != 1 or conv.padding_mode != "zeros"):
            raise LoraYoloError(f"adapter layer {layer} is a grouped or non-zero-padded conv, which LoRA cannot adapt")
        a, b = adapter.tensors[f"{layer}.lora_A.weight"], adapter.tensors[f"{layer}.lora_B.weight"]
        if type(conv) is nn.Linear:
            want_a, want_b = (r, conv.in_features), (conv.out_features, r)
        else:
            want_a, want_b = (r, conv.in_channels, *conv.kernel_size), (conv.out_channels, r, 1, 1)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise LoraYoloError(
                f"adapter layer {layer}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the base layer "
                f"(expected {want_a}, {want_b})"
            )
    if adapter.config.add_classes:  # its class tensors are the copies _check_branches checked
        return
    head = head_prefix(modules) if adapter.config.train_head else None
    inside = [layer for layer in adapter.layers if head and layer.startswith(head)]
    if inside:  # serving runs the adapter's own head, which holds no adapter: it would be dropped there
        raise LoraYoloError(f"adapter layer {inside[0]} is in the task head, which train_head trains in full")
    biases = set(bias_tensors(modules, adapter.layers)) if adapter.config.train_bias else set()
    for key in adapter.full:  # what training stores in full: the class convs when the class set changes, the head
        owner, _, param = key.rpartition(".")
        if owner in adapter.layers:
            raise LoraYoloError(f"adapter tensor {key} is trained in full, and {owner} also has a LoRA adapter")
        if key in biases:  # train_bias: the BatchNorm shift after an adapted conv
            if tuple(adapter.tensors[key].shape) != tuple(modules[owner].bias.shape):
                raise LoraYoloError(
                    f"adapter tensor {key} {tuple(adapter.tensors[key].shape)} does not fit the base "
                    f"({tuple(modules[owner].bias.shape)})"
                )
            continue
        if owner not in classes and head and key.startswith(head):
            _check_head_tensor(adapter, key, modules)
            continue
        if owner not in classes or param not in dict(modules[owner].named_parameters(recurse=False)):
            what = "the task head (train_head)" if head else "the class layers"
            what += " and the BatchNorm shift after each adapted conv (train_bias)" if adapter.config.train_bias else ""
            raise LoraYoloError(f"adapter tensor {key} is trained in full, but only {what} can be")
        want = (adapter.nc, *getattr(modules[owner], param).shape[1:])
        if tuple(adapter.tensors[key].shape) != want:
            raise LoraYoloError(
                f"adapter tensor {key} {tuple(adapter.tensors[key].shape)} does not fit the base ({want})"
            )
    missing = [c for c in classes if any(f"{c}.{n}" not in adapter.full for n, _ in modules[c].named_parameters())]
    if missing and adapter.names != dict(names):
        raise LoraYoloError(
            f"adapter predicts other classes than the base ({adapter.nc} vs {len(names)}) but does not carry the "
            f"class layer {missing[0]}"
        )


def head_prefix(modules: Mapping[str, nn.Module]) -> str:
    """`model.<i>.` for the task head of the model whose modules (by name) are `modules`: its last layer."""
    return f"model.{max(int(n[6:]) for n in modules if n.startswith('model.') and n[6:].isdigit())}."


def _check_head_tensor(adapter: Adapter, key: str, modules: Mapping[str, nn.Module]) -> None:
    """A head tensor trained in full (train_head, outside the class layers) must be a floating-point parameter or
    buffer of the base's head with the base's shape, never the fixed DFL projection, and a BatchNorm variance is
    never negative (its square root would be NaN)."""
    owner, _, param = key.rpartition(".")
    module = modules.get(owner)
    own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False)) if module else {}
    fixed = any(isinstance(modules.get(owner.rsplit(".", i)[0]), DFL) for i in range(owner.count(".")))
    if param not in own or not own[param].is_floating_point() or fixed:
        raise LoraYoloError(f"adapter tensor {key} is trained in full, but is no trained tensor of the base's head")
    if tuple(adapter.tensors[key].shape) != tuple(own[param].shape):
        raise LoraYoloError(
            f"adapter tensor {key} {tuple(adapter.tensors[key].shape)} does not fit the base "
            f"({tuple(own[param].shape)})"
        )
    if param == "running_var" and bool((adapter.tensors[key] < 0).any()):
        raise LoraYoloError(f"adapter tensor {key} holds a negative variance")


def _check_branches(adapter: Adapter, modules: Mapping[str, nn.Module], classes: list[str], names: dict) -> None:
    """An add_classes adapter: the base's classes lead the adapter's, its tensors trained in full are exactly those
    of a copy of each class branch (unfused, in `modules`) ending in one row per new class, and no LoRA layer is in
    a class branch (which runs as the base's) or, for exact mode, anywhere (it would change the base's outputs)."""
    mode = adapter.config.add_classes
    paths = branch_paths(classes, modules)
    if not paths:  # a Classify or RT-DETR head: nothing would score the new classes
        raise LoraYoloError(f"adapter says add_classes={mode}, but the base has no Detect class branch to add beside")
    base_names = dict(names)
    if adapter.nc <= len(base_names) or {i: adapter.names[i] for i in base_names} != base_names:
        raise LoraYoloError(
            f"adapter says add_classes={mode} but its classes ({adapter.nc}) do not start with the base's "
            f"{len(base_names)} classes in the base's order"
        )
    if mode == "exact" and adapter.layers:
        raise LoraYoloError("adapter says add_classes=exact but has LoRA layers, which would change the base's outputs")
    inside = [layer for layer in adapter.layers if layer.startswith(tuple(f"{p}." for p in paths))]
    if inside:
        raise LoraYoloError(f"adapter layer {inside[0]} is in a class branch, which add_classes keeps as the base's")
    want = {}
    for path in paths:
        want.update(new_tensor_shapes(modules[path], path, adapter.nc - len(base_names)))
    if set(adapter.full) != set(want):
        odd = sorted(set(adapter.full) ^ set(want))[:2]
        raise LoraYoloError(f"adapter's class-branch tensors do not fit the base's class branches (e.g. {odd})")
    for key, shape in want.items():
        if key.endswith(".running_var") and bool((adapter.tensors[key] < 0).any()):
            raise LoraYoloError(f"adapter tensor {key} holds negative variances")
        if tuple(adapter.tensors[key].shape) != shape:
            got = tuple(adapter.tensors[key].shape)
            raise LoraYoloError(f"adapter tensor {key} {got} does not fit the base's class branch ({shape})")


def attach_adapter(base: nn.Module, adapter: Adapter, allow_other_weights: bool = False) -> nn.Module:
    """A new model: `base` rebuilt for the adapter's classes, with the adapter attached (unmerged). `base` is untouched.

    Example:
        >>> model = attach_adapter(load_model("base.pt"), load_adapter("adapter.safetensors"))
    """
    check_fits(adapter, base, allow_other_weights)
    check_layers(adapter, dict(base.named_modules()), class_layers(base), base.names)
    model = build_for_classes(base, adapter.nc, adapter.names)
    config = adapter.config
    add_lora(model, adapter.layers, config.lora_dropout, config.use_rslora, config.use_dora)
    if config.add_classes:  # the base's class branches, bit for bit, and the adapter's copies beside them
        add_class_branches(model, base, adapter.nc - class_count(base))
    model.load_state_dict(adapter.tensors, strict=False)
    return model


def extract_adapter(model: nn.Module, config: LoraConfig, base: dict, full: list[str]) -> Adapter:
    """The adapter of a LoRA model: its LoRA tensors plus the tensors in `full`, for the base fingerprinted `base`."""
    state = model.state_dict()
    tensors = {k: v.detach().float().cpu() for k, v in state.items() if k.endswith(LORA_SUFFIXES)}
    tensors.update({k: state[k].detach().float().cpu() for k in full})
    return Adapter(
        tensors=tensors,
        config=config,
        layers=lora_plan(model),
        full=list(full),
        nc=class_count(model),
        names=dict(model.names),
        base=base,
        task=model_task(model),
    )


def adapter_bytes(adapter: Adapter, dtype: torch.dtype = torch.float16) -> int:
    """Exact size of the adapter's file as save_adapter writes it, computed in memory."""
    return len(save(_stored(adapter, dtype), metadata=adapter.metadata()))


def _stored(adapter: Adapter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors as written: in `dtype`, except a finite one `dtype` cannot hold (a train_head BatchNorm variance
    above fp16's 65504), which stays fp32 rather than becoming inf."""
    out = {}
    for k, v in adapter.tensors.items():
        cast = v.detach().to(dtype)
        overflows = bool(v.isfinite().all()) and not bool(cast.isfinite().all())
        out[k] = (v.detach().float() if overflows else cast).cpu().contiguous()
    return out
