"""Load base models from `.pt` checkpoints or model YAMLs, and write plain Ultralytics checkpoints.

Everything written here is an ordinary Ultralytics checkpoint (a pickled dict with `model`, `train_args`, ...), so
`ultralytics.YOLO(path)` loads it without lora_yolo installed. Pickles can run code when loaded: only load
checkpoints you trust; share adapters (safetensors) instead.
"""

from __future__ import annotations

from copy import deepcopy
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from ultralytics import __version__ as ULTRALYTICS_VERSION
from ultralytics.nn.modules.head import Classify, RTDETRDecoder, WorldDetect, YOLOEDetect
from ultralytics.nn.tasks import (
    ClassificationModel,
    DepthModel,
    DetectionModel,
    OBBModel,
    PoseModel,
    RTDETRDetectionModel,
    SegmentationModel,
    SemanticSegmentationModel,
    guess_model_task,
    load_checkpoint,
    yaml_model_load,
)
from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

from lora_yolo.atomic import atomic_path
from lora_yolo.errors import LoraYoloError, first_line
from lora_yolo.fold import unfold_batchnorm
from lora_yolo.memory import remove_training_forward

# Model kinds, by task: heads that extend Detect, plus classification (a Classify head: conv, pool, linear) and
# YOLO26 semantic segmentation (a SemanticSegment head: convs ending in a class conv) and depth (a Depth head: convs
# and one transposed conv, no classes), so adapters, class layers and merges work the same way. RT-DETR is a kind of
# its own (its task is detect, but its trainer, validator and predictor are Ultralytics' RT-DETR ones): a
# transformer decoder whose projections, MLPs and class layers are linear layers.
MODEL_CLASSES = {
    "detect": DetectionModel,
    "segment": SegmentationModel,
    "pose": PoseModel,
    "obb": OBBModel,
    "classify": ClassificationModel,
    "semantic": SemanticSegmentationModel,
    "depth": DepthModel,
    "rtdetr": RTDETRDetectionModel,
}
RTDETR = "rtdetr"  # the kind whose Ultralytics task is detect
# YOLO-World and YOLOE: class scores from text embeddings (their own training and prompts), not class layers
OPEN_VOCABULARY = "YOLO-World / YOLOE (open-vocabulary)"
ASSETS = Path(__file__).parent / "assets"  # yolo11n-shapes.pt: the offline demo base (scripts/pretrain_base.py)


def is_model_yaml(source: str | Path) -> bool:
    """Whether `source` names an Ultralytics model YAML (a new, randomly initialised model) rather than a checkpoint."""
    return str(source).endswith((".yaml", ".yml"))


def load_model(source: str | Path) -> nn.Module:
    """A model in fp32 from a `.pt` checkpoint or an Ultralytics model YAML (e.g. `yolo11n.yaml`).

    A bare official name such as `yolo11n.pt` downloads the usual Ultralytics way when it is not on disk; offline,
    that fails with a message saying how to pass a local checkpoint. `yolo11n-shapes.pt`, the demo base shipped
    with lora_yolo, loads by name from anywhere.

    Example:
        >>> model = load_model("yolo11n.yaml")
    """
    text = str(source)
    if is_model_yaml(text):
        try:
            cfg = yaml_model_load(text)
            kind = check_task(model_kind(cfg), text)
            model = MODEL_CLASSES[kind](cfg, verbose=False)
        except FileNotFoundError:
            raise LoraYoloError(f"model YAML not found: {text}") from None
        except LoraYoloError:
            raise
        except Exception as e:
            raise LoraYoloError(f"{text} is not an Ultralytics model YAML ({first_line(e)})") from None
        model.args, model.task = {}, task_of(kind)
        return model
    text = resolve_checkpoint(text)
    try:
        model, _ = load_checkpoint(text)
    except Exception as e:
        raise load_error(text, e) from None
    kind = model_kind(model)
    kind = check_task(kind if kind in (RTDETR, OPEN_VOCABULARY) else getattr(model, "task", None) or kind, text)
    model.task = task_of(kind)
    return model


def resolve_checkpoint(source: str | Path) -> str:
    """The checkpoint to load for `source`: a local `.pt`, a checkpoint shipped with lora_yolo (by name), or an
    official Ultralytics name (which Ultralytics downloads); anything else is a clear error."""
    text = str(source)
    if not text.endswith(".pt"):
        raise LoraYoloError(f"model must be a .pt checkpoint or a model .yaml, got {text}")
    if not Path(text).exists() and (ASSETS / text).is_file():
        return str(ASSETS / text)
    if not Path(text).exists() and text not in GITHUB_ASSETS_NAMES:  # only official names download
        raise LoraYoloError(f"model file not found: {text}")
    return text


def load_error(text: str, e: Exception) -> LoraYoloError:
    """One line for a checkpoint that would not load: offline download, or not a checkpoint at all."""
    if not Path(text).exists():
        return LoraYoloError(
            f"{text} is not on disk and could not be downloaded ({first_line(e)}); "
            "pass a local checkpoint with --model path/to/model.pt or a model YAML such as yolo11n.yaml"
        )
    return LoraYoloError(f"{text} is not an Ultralytics checkpoint ({first_line(e)})")


def check_task(task: str | None, source: str) -> str:
    """The model's task or kind, if LoRA supports it (a Detect, Classify, SemanticSegment, Depth or RT-DETR head: see
    MODEL_CLASSES)."""
    if task not in MODEL_CLASSES:
        what = f"is a {task} model" if task else "has a head lora-yolo does not know"
        raise LoraYoloError(f"{source} {what}; supported: {', '.join(MODEL_CLASSES)}")
    return task


def model_kind(model: nn.Module | dict) -> str | None:
    """`rtdetr` for a model (or model YAML dict) whose head is RT-DETR's decoder, `OPEN_VOCABULARY` for YOLO-World
    and YOLOE heads, else its task (None if unknown).

    Ultralytics' own guess has no task for RT-DETR (its `RTDETR` class sets detect) and calls the open-vocabulary
    heads detect or segment; both are read here from the head.
    """
    if isinstance(model, dict):
        head = str(model.get("head", [[None] * 3])[-1][2])
        if head.endswith("RTDETRDecoder"):
            return RTDETR
        return OPEN_VOCABULARY if head.startswith(("WorldDetect", "YOLOE")) else guess_model_task(model)
    head = getattr(model, "model", [None])[-1]
    if isinstance(head, RTDETRDecoder):
        return RTDETR
    if isinstance(head, (WorldDetect, YOLOEDetect)):
        return OPEN_VOCABULARY
    return guess_model_task(getattr(model, "yaml", None) or model)


def task_of(kind: str | None) -> str | None:
    """The Ultralytics task of a model kind: its own name, detect for RT-DETR."""
    return "detect" if kind == RTDETR else kind


def model_task(model: nn.Module) -> str:
    """The model's Ultralytics task from its own head (its YAML), not from `model.args`: a checkpoint written without
    training arguments loads with Ultralytics' defaults there, whose task is always `detect`."""
    return task_of(model_kind(model))


def class_count(model: nn.Module) -> int:
    """Number of classes the model's head predicts (a Depth head: its one output, named `depth`)."""
    head = model.model[-1]
    return int(head.linear.out_features if isinstance(head, Classify) else getattr(head, "nc", 1))


def build_for_classes(base: nn.Module, nc: int, names: dict[int, str]) -> nn.Module:
    """A fresh model of `base`'s architecture with `nc` classes, holding every base weight that fits.

    This is exactly how Ultralytics' DetectionTrainer.get_model builds a fine-tuning model (YAML, then
    `model.load(base)`, which rebuilds the class branch at the base's width when nc changes), so the trainer and
    `merge` reconstruct the same module tree.
    """
    model = type(base)(deepcopy(base.yaml), nc=nc, ch=base.yaml.get("channels", 3), verbose=False)
    model.names = dict(names)  # before load(), which remaps class rows by name
    model.load(base, verbose=False)
    model.args = dict(getattr(base, "args", {}) or {})
    return model


def save_checkpoint(model: nn.Module, path: str | Path, train_args: dict | None = None) -> Path:
    """Write `model` (fp32) as a plain Ultralytics checkpoint, atomically.

    fp32 rather than Ultralytics' usual fp16, so base + adapter reproduce the file's weights exactly; in the standard
    memory format, as Ultralytics writes its own (a model training channels-last may be passed).
    """
    snapshot = remove_training_forward(unfold_batchnorm(deepcopy(model))).float().eval()
    snapshot.to(memory_format=torch.contiguous_format)
    for p in snapshot.parameters():
        p.requires_grad_(False)
    snapshot.criterion = None  # training-only state
    if hasattr(snapshot, "lora_meta"):
        del snapshot.lora_meta  # a plain checkpoint carries nothing of lora_yolo
    args = dict(train_args if train_args is not None else getattr(model, "args", {}) or {})
    args.setdefault("task", model_task(model))  # what Ultralytics' YOLO() reads the task from
    ckpt = {
        "date": datetime.now().astimezone().isoformat(),
        "version": ULTRALYTICS_VERSION,
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": snapshot,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": args,
    }
    with atomic_path(path) as tmp:
        try:
            torch.save(ckpt, tmp)
        except RuntimeError as e:  # torch reports a failed write (a full disk) as "enforce fail ... unexpected pos"
            raise LoraYoloError(f"cannot write {path}: {first_line(e)}") from None
    return Path(path)
