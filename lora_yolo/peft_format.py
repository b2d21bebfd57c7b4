"""Convert adapters to and from PEFT's LoRA format: a folder with `adapter_config.json` and `adapter_model.safetensors`.

The layers are the same (PEFT's Conv2d LoRA is also A = conv in -> r with the base kernel, B = 1x1 r -> out, scale
alpha / r or alpha / sqrt(r), DoRA's magnitude per output channel), so conversion only renames tensors:
  ours  `model.16.cv1.conv.lora_A.weight`        PEFT  `base_model.model.model.16.cv1.conv.lora_A.weight`
  ours  `<conv>.lora_magnitude_vector` (out,)   PEFT  `<...>.lora_magnitude_vector` (1, out, 1, 1)
  ours  `<linear>.lora_A.weight` (r, in)         PEFT  the same (its Linear LoRA); DoRA's magnitude (out,) both
  ours  tensors trained in full (class layers,   PEFT  `modules_to_save`, under their own names (a BatchNorm
        with train_head the whole head)                 also with its `num_batches_tracked`, which PEFT loads)
  ours  train_bias BatchNorm shifts              PEFT  under their own names, with `bias: lora_only`
Module names are those of the Ultralytics model itself (`YOLO(...).model`), which is what PEFT wraps:
`PeftModel.from_pretrained(YOLO("base.pt").model, DIR)`. For an adapter with its own class set, PEFT needs the model
built for those classes first (`lora_yolo.checkpoint.build_for_classes`), since its class layers have another shape.

Our metadata (class names, base fingerprint, config) travels in the safetensors header under `lora_yolo`, so a round
trip is exact; an adapter made by PEFT itself converts too, given the base it was trained on. Nothing is unpickled:
PEFT's older `adapter_model.bin` is refused.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lora_yolo.adapter import Adapter, check_tensors, fingerprint, parse_json, parse_metadata, read_safetensors
from lora_yolo.atomic import atomic_dir, refuse_inputs
from lora_yolo.checkpoint import class_count, model_task
from lora_yolo.config import LoraConfig
from lora_yolo.errors import LoraYoloError
from lora_yolo.targets import class_layers, shift_key

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAGNITUDE = ".lora_magnitude_vector"
MAX_CONFIG_BYTES = 1 << 20
STEPS = "num_batches_tracked"  # BatchNorm's step counter, which PEFT saves with a wrapped BatchNorm and we do not


def to_peft(adapter: Adapter, out_dir: str | Path) -> Path:
    """Write `adapter` as a PEFT LoRA folder; returns it.

    The folder must be new or empty: its two files are written into a temporary folder beside it, which then takes
    its place with one rename, so a crash leaves either no adapter or a complete one. Replacing an existing PEFT
    adapter's two files cannot be atomic (two renames), and would delete what the user has there: it is refused.

    Example:
        >>> to_peft(load_adapter("adapter.safetensors"), "peft-adapter/")
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LoraYoloError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise LoraYoloError(f"{out} is not empty; write the PEFT adapter to a new or empty folder")
    if not out.parent.is_dir():
        raise LoraYoloError(f"output folder does not exist: {out.parent}")
    if adapter.config.add_classes:  # PEFT wraps the plain base, which has no module running two branches
        raise LoraYoloError(
            "this adapter adds classes with copies of the class branches running beside the base's (add_classes), "
            "which PEFT's LoRA format cannot hold; use the adapter file as it is, or its merged model"
        )
    if not adapter.layers:
        raise LoraYoloError("this adapter has no LoRA layers: PEFT's LoRA format needs at least one")
    ranks = Counter(r for r, _ in adapter.layers.values())
    alphas = Counter(a for _, a in adapter.layers.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    config = adapter.config
    # train_bias: a BatchNorm shift alone, which PEFT loads under its own name (a module of modules_to_save would need
    # all of the BatchNorm's tensors); PEFT's bias="lora_only" trains the adapted layers' biases
    shifts = {shift_key(layer) for layer in adapter.layers} & set(adapter.full)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base.get("path") or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "target_modules": sorted(adapter.layers),
        "rank_pattern": {re.escape(n): lr for n, (lr, _) in sorted(adapter.layers.items()) if lr != r},
        "alpha_pattern": {re.escape(n): la for n, (_, la) in sorted(adapter.layers.items()) if la != alpha},
        "modules_to_save": _outermost({k.rpartition(".")[0] for k in adapter.full if k not in shifts}) or None,
        "bias": "lora_only" if shifts else "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, t in adapter.tensors.items():
        layer_a = adapter.tensors.get(name.removesuffix(MAGNITUDE) + ".lora_A.weight")
        conv = name.endswith(MAGNITUDE) and layer_a is not None and layer_a.ndim == 4
        tensors[PREFIX + name] = (t.view(1, -1, 1, 1) if conv else t).contiguous()  # PEFT: (1, out, 1, 1) for a conv
    for owner in {k.rpartition(".")[0] for k in adapter.full if k.endswith(".running_var")}:  # PEFT loads a wrapped
        tensors[f"{PREFIX}{owner}.{STEPS}"] = torch.zeros((), dtype=torch.long)  # BatchNorm's whole state
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "lora_yolo": json.dumps(adapter.metadata())})
        (tmp / CONFIG).write_text(json.dumps(peft_config, indent=2), encoding="utf-8")
    return out


def _outermost(owners: set[str]) -> list[str]:
    """The owners not inside another: PEFT wraps each module of `modules_to_save` whole, so a module inside a wrapped
    one (RT-DETR's attention and its `out_proj`) would be wrapped twice and not load."""
    return sorted(o for o in owners if not any(o.startswith(f"{p}.") for p in owners))


def from_peft(peft_dir: str | Path, base: nn.Module | None = None) -> Adapter:
    """Read a PEFT LoRA folder as an `Adapter`; `base` (the model it was trained on) is needed unless we wrote it.

    Example:
        >>> adapter = from_peft("peft-adapter/", base=load_model("base.pt"))
    """
    folder = Path(peft_dir)
    config_file, weights = folder / CONFIG, folder / WEIGHTS
    if not folder.is_dir():
        raise LoraYoloError(f"PEFT adapter folder not found: {folder}")
    if not weights.is_file():
        pickled = " (only adapter_model.bin, a pickle: save it with safe_serialization=True)"
        raise LoraYoloError(f"{folder} has no {WEIGHTS}{pickled if (folder / 'adapter_model.bin').exists() else ''}")
    config = _read_config(config_file)
    raw, meta = read_safetensors(weights)
    if config.get("bias", "none") != "none" and (config["bias"] != "lora_only" or "lora_yolo" not in meta):
        # PEFT's own files would hold every bias the model has; ours hold the train_bias shifts, with our metadata
        raise LoraYoloError(
            f"{config_file}: bias={config['bias']!r} is not supported in a folder lora-yolo did not write (PEFT saves "
            "no BatchNorm shifts back: convert the lora-yolo adapter it was made from)"
        )
    raw = {k: v for k, v in raw.items() if not k.endswith(f".{STEPS}")}  # a BatchNorm's step count: no output uses it
    if any(not k.startswith(PREFIX) for k in raw):
        raise LoraYoloError(f"{weights} has tensors outside '{PREFIX}': not a PEFT adapter of a whole model")
    if any(v.ndim == 0 for v in raw.values()):
        raise LoraYoloError(f"{weights} holds a scalar tensor: not a LoRA adapter")
    tensors = {k[len(PREFIX) :]: v for k, v in raw.items()}
    tensors = {k: v.flatten() if k.endswith(MAGNITUDE) else v for k, v in tensors.items()}
    layers = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    if not layers:
        raise LoraYoloError(f"{weights} holds no LoRA tensors (no '.lora_A.weight')")
    plan = {n: (int(tensors[f"{n}.lora_A.weight"].shape[0]), _alpha(config, n)) for n in sorted(layers)}
    full = sorted(k for k in tensors if ".lora_" not in k)
    if "lora_yolo" in meta:  # written by to_peft: everything else is in our own metadata
        ours = parse_json(meta["lora_yolo"], "lora_yolo metadata", weights)
        if not isinstance(ours, dict) or not all(isinstance(v, str) for v in ours.values()):
            raise LoraYoloError(f"{weights} has damaged lora_yolo metadata (not a mapping of strings)")
        adapter = parse_metadata(tensors, ours, weights)
    else:
        if base is None:
            raise LoraYoloError(f"{folder} was not written by lora-yolo: pass the base it was trained on (--base)")
        foreign = _foreign(tensors, plan, full, config, base)
        adapter = parse_metadata(tensors, foreign.metadata(), weights)  # the checks our own files get
    if adapter.layers != plan or sorted(adapter.full) != full:
        raise LoraYoloError(f"{folder}: {CONFIG} and the lora_yolo metadata disagree on the layers")
    check_tensors(adapter, weights)
    return adapter


def _read_config(path: Path) -> dict:
    """PEFT's adapter_config.json, with every field lora-yolo reads checked for type and range."""
    if not path.is_file():
        raise LoraYoloError(f"{path.parent} has no {CONFIG}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise LoraYoloError(f"{path} is too large to be an adapter config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LoraYoloError(f"{path} is not JSON") from None
    config = parse_json(text, "adapter config", path)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise LoraYoloError(f"{path} is not a PEFT LoRA config (peft_type {found!r})")
    unsupported = {
        "fan_in_fan_out": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layer_replication": None,
    }
    for key, ok in unsupported.items():
        if config.get(key, ok) != ok:
            raise LoraYoloError(f"{path}: {key}={config[key]!r} is not supported (lora-yolo supports {key}={ok!r})")
    for key in [*_mapping(config, "rank_pattern", path), *_mapping(config, "alpha_pattern", path)]:
        try:
            _pattern(key)
        except LoraYoloError as e:
            raise LoraYoloError(f"{path}: {e}") from None
    try:  # the same checks as our own config: PEFT's field names are ours
        LoraConfig(
            r=config.get("r", 8),
            lora_alpha=config.get("lora_alpha", 8),
            lora_dropout=config.get("lora_dropout") or 0.0,
            use_rslora=config.get("use_rslora", False),
            use_dora=config.get("use_dora", False) or False,
            rank_pattern=_mapping(config, "rank_pattern", path),
            alpha_pattern=_mapping(config, "alpha_pattern", path),
        )
    except LoraYoloError as e:
        raise LoraYoloError(f"{path}: {e}") from None
    return config


def _mapping(config: dict, key: str, path: Path) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise LoraYoloError(f"{path}: {key} must be a mapping of regex -> value")
    return value


def _alpha(config: dict, layer: str) -> float:
    """A layer's alpha as PEFT resolves it: the first alpha_pattern key matching the end of the name."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if _pattern(key).match(layer):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def _pattern(key: str) -> re.Pattern:
    """PEFT's match for a rank/alpha_pattern key: the key, after any dotted prefix, at the end of the module name.

    Keys with repetition (`*`, `+`, `?`, `{}`) are refused: the file chooses the regex, and a repeated group can take
    exponential time on a long name. Layer names, `.`, `|`, `^`, `$` and character classes cover what PEFT configs
    hold (to_peft writes escaped names).
    """
    if not isinstance(key, str) or len(key) > 512 or any(c in re.sub(r"\\.", "", key) for c in "*+?{"):
        raise LoraYoloError(
            f"pattern {str(key)[:60]!r} uses repetition (*, +, ?, {{}}) or is too long; lora-yolo reads PEFT "
            "rank/alpha patterns made of layer names, '.', '|' and character classes"
        )
    try:
        return re.compile(rf"(.*\.)?({key})$")
    except re.error as e:
        raise LoraYoloError(f"pattern {key!r} is not a valid regular expression: {e}") from None


def _foreign(tensors: dict, plan: dict, full: list[str], config: dict, base: nn.Module) -> Adapter:
    """An Adapter for a PEFT folder made by PEFT itself: the base fingerprint and class set come from `base`."""
    classes = {f"{layer}.weight" for layer in class_layers(base)} & set(full)  # class layers saved in full
    nc = int(tensors[min(classes)].shape[0]) if classes else class_count(base)
    names = dict(base.names) if nc == class_count(base) else {i: f"class{i}" for i in range(nc)}
    lora = LoraConfig(
        r=Counter(r for r, _ in plan.values()).most_common(1)[0][0] if plan else int(config.get("r", 8)),
        lora_alpha=float(config.get("lora_alpha", 8)),
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        targets=[],
        include=[f"^{re.escape(n)}$" for n in plan],
    )
    return Adapter(tensors, lora, plan, full, nc, names, fingerprint(base), model_task(base))


def convert(source: str | Path, output: str | Path, to_format: str | None, base: str | Path | None = None) -> Path:
    """`to_format="peft"`: our adapter file -> a PEFT folder. `to_format=None`: a PEFT folder -> our adapter file.

    Example:
        >>> convert("adapter.safetensors", "peft-adapter/", "peft")
        >>> convert("peft-adapter/", "adapter.safetensors", None, base="yolo11n.pt")
    """
    from lora_yolo.adapter import load_adapter, save_adapter
    from lora_yolo.checkpoint import load_model

    if to_format == "peft":
        return to_peft(load_adapter(source), output)
    refuse_inputs(output, [source, Path(source) / CONFIG, Path(source) / WEIGHTS, *([base] if base else [])])
    adapter = from_peft(source, load_model(base) if base is not None else None)
    return save_adapter(adapter, output, dtype=next(iter(adapter.tensors.values())).dtype)
