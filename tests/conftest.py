"""Shared fixtures: tiny offline base checkpoints built from Ultralytics model YAMLs, and the shared COCO8 data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT reads adapters from local folders only

from lora_yolo.checkpoint import load_model, save_checkpoint  # noqa: E402

COCO8 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "coco8" / "coco8.yaml"


def make_base(path: Path, cfg: str = "yolo11n.yaml", seed: int = 0) -> Path:
    """A base checkpoint built from a model YAML (random weights, fixed seed): no download needed."""
    torch.manual_seed(seed)
    model = load_model(cfg)
    # Non-trivial BatchNorm statistics, so tests notice if anything touches them.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.half().float()  # on the fp16 grid, like every released Ultralytics checkpoint
    return save_checkpoint(model, path, train_args={})


@pytest.fixture(scope="session")
def base_pt(tmp_path_factory) -> Path:
    """yolo11n with 80 classes, from yolo11n.yaml."""
    return make_base(tmp_path_factory.mktemp("base") / "yolo11n-base.pt")


@pytest.fixture(scope="session")
def coco8() -> Path:
    """The real COCO8 images beside the project (../shared); tests that need them skip when it is absent."""
    if not COCO8.is_file():
        pytest.skip(f"COCO8 not found at {COCO8} (the shared/ folder beside the project root)")
    return COCO8


def head_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Raw Detect output (boxes and class scores before NMS) in eval mode.

    Box rows come out in pixels; they are divided by the image size here so that one absolute tolerance means the
    same for boxes (a fraction of the image) and for class scores (probabilities).
    """
    model.eval()
    with torch.no_grad():
        y = model(x)
    y = (y[0] if isinstance(y, (list, tuple)) else y).clone()
    y[:, :4] /= x.shape[-1]
    return y


def image_batch(data_yaml: Path, imgsz: int, split: str = "val") -> torch.Tensor:
    """The split's images, letterboxed to imgsz as Ultralytics' predictor does, as an RGB float batch in [0, 1]."""
    import cv2
    import numpy as np
    from ultralytics.data.augment import LetterBox

    files = sorted((data_yaml.parent / "images" / split).glob("*.jpg"))
    boxed = [LetterBox(new_shape=(imgsz, imgsz), auto=False)(image=cv2.imread(str(f))) for f in files]
    return torch.from_numpy(np.stack(boxed)[..., ::-1].transpose(0, 3, 1, 2).copy()).float() / 255


def random_adapter(base_pt: Path, config=None, seed: int = 1, scale: float = 0.05, names: dict | None = None):
    """A model with adapters whose B (and DoRA magnitude) is random, as if trained, and its Adapter, for base_pt.

    With `names` (a class set other than the base's) the class layers are rebuilt, randomised and stored in full.
    """
    from lora_yolo import LoraConfig, LoraConv2d, add_lora, extract_adapter, fingerprint, select_targets
    from lora_yolo.checkpoint import build_for_classes
    from lora_yolo.targets import class_layers

    config = config or LoraConfig()
    torch.manual_seed(seed)  # A's Kaiming init: the same seed gives the same adapter
    model = load_model(base_pt)
    base = fingerprint(model)
    owners = frozenset()
    if names is not None:
        model = build_for_classes(model, len(names), names)
        owners = frozenset(class_layers(model))
    full = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in owners]
    with torch.no_grad():
        for n in full:
            model.get_parameter(n).normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    add_lora(model, select_targets(model, config, full=owners), use_dora=config.use_dora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraConv2d):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)
                if m.use_dora:
                    m.lora_magnitude_vector.mul_(1 + torch.randn(m.lora_magnitude_vector.shape, generator=g) * scale)
    return model, extract_adapter(model, config, base, full=full)


DEMO_BASE = Path(__file__).resolve().parents[1] / "lora_yolo" / "assets" / "yolo11n-shapes.pt"
SHAPES_B1 = Path(__file__).resolve().parents[1] / "datasets" / "shapes-b1" / "data.yaml"


@pytest.fixture(scope="session")
def demo_base() -> Path:
    """The shipped demo base (pretrained on synthetic domain A): a model whose detections mean something."""
    if not DEMO_BASE.is_file():
        pytest.skip(f"demo base not found at {DEMO_BASE} (made by scripts/pretrain_base.py)")
    return DEMO_BASE


def detections(raw: torch.Tensor, imgsz: int) -> list[torch.Tensor]:
    """Ultralytics' NMS on a raw head output as head_output returns it: per image, rows (x1, y1, x2, y2, conf, cls)."""
    from ultralytics.utils.nms import non_max_suppression

    raw = raw.clone()
    raw[:, :4] *= imgsz
    return non_max_suppression(raw, conf_thres=0.25, iou_thres=0.7)


def same_detections(a: list[torch.Tensor], b: list[torch.Tensor], box_tol: float = 0.05) -> bool:
    """The same boxes (within box_tol pixels) and classes, image by image."""
    return all(
        len(x) == len(y) and torch.equal(x[:, 5], y[:, 5]) and bool(((x[:, :4] - y[:, :4]).abs() <= box_tol).all())
        for x, y in zip(a, b)
    )
