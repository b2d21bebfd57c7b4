"""Add the dataset's classes to a base without forgetting the base's own (`train(..., config.add_classes=...)`).

The combined class set is the base's classes first, under their ids, then the dataset's classes the base does not
have (a name in both is one class). Training reads a copy of the dataset made in the run folder (`add_classes/`):
the images are symbolic links to the user's, the labels are rewritten with the combined ids, and in `adapted` mode
the base's own objects in the training images are added as pseudo-labels, found by the base itself, so training
does not teach the model that they are background. Nothing is written into the user's dataset.

In both modes each class branch of the head runs as the base's, beside a trained copy that scores the new classes
(`lora_yolo.branch`); they differ in what else trains (see `lora_yolo.trainer` for the training side):
- `exact`: nothing else: every box and every old class score is the base's, bit for bit;
- `adapted`: LoRA across the rest of the network as usual, on the pseudo-labelled data, so the features adapt to the
  new classes too (the base's classes keep their own branches but see adapted features).

Either way the adapter is an ordinary adapter with a new class set (its class-branch copies in full, plus adapted
mode's LoRA layers), so merge, export and serving treat it as any other, except that it merges alone (class
branches do not add up with weights).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml
from ultralytics.data.utils import img2label_paths

from lora_yolo.config import LoraConfig
from lora_yolo.datacheck import split_images
from lora_yolo.errors import LoraYoloError

FOLDER = "add_classes"  # in the run folder: the relabelled dataset
PSEUDO_CONF = 0.25  # Ultralytics' own predict default
PSEUDO_KEY = "lora_yolo_pseudo_labels"  # in the relabelled data.yaml: how many pseudo-labels it holds
# Exact mode trains whole copies of the class branches, not adapters, so it has its own optimizer and learning rate:
# AdamW 0.01 had the best seed-0 validation mAP50-95 on the demo base's new classes in the first version of
# scripts/bench_add_classes.py (benchmarks/v1/add_classes.jsonl: 0.395, against 0.380 at 0.003 and 0.317 at
# Ultralytics' optimizer=auto); on scenes mixing old and new objects (benchmarks/add_classes.jsonl) 0.331 at 0.01 and
# at 0.003, 0.272 at auto. It is also the lr with the best worst case for training the Detect head alone on the real
# bases of benchmarks/results.md.
EXACT_TRAIN = {"optimizer": "AdamW", "lr0": 0.01}
# Adapted mode trains adapters at the run's lr0 (its preset's, dora_r32's optimizer=auto without --config) and the
# class-branch copies, whole layers like exact mode's, at exact mode's lr: on the demo base's mixed scenes
# (scripts/bench_add_classes.py, seed 0) the new classes' validation mAP50-95 was 0.388 with the copies at 0.01 and
# 0.336 with them at the adapters' auto lr (AdamW 0.0009), A's 0.767 and 0.761.
BRANCH_LR = EXACT_TRAIN["lr0"]
PRESET_LR = ("optimizer", "lr0")  # what a preset tunes for its adapters, which exact mode does not train


def exact_training(config: LoraConfig | None, args: dict) -> dict:
    """`args` with exact mode's optimizer where the caller chose none: AdamW, at the caller's lr0 or 0.01."""
    if config is None or config.add_classes != "exact" or "optimizer" in args:
        return args
    return {**EXACT_TRAIN, **args}


def combined_names(base: dict[int, str], data: dict[int, str]) -> dict[int, str]:
    """The base's classes under their ids, then the dataset's new ones in the dataset's order."""
    names = dict(base)
    for name in data.values():
        if name not in names.values():
            names[len(names)] = name
    return names


def check_add_classes(resolved: dict, base_names: dict[int, str], kind: str, adapted: bool) -> None:
    """What `prepare_dataset` needs, checked before a run folder exists: a Detect head (`kind`: the model's task, or
    rtdetr), boxes for pseudo-labels, and at least one class the base lacks."""
    # A softmax over more classes changes every old probability; RT-DETR picks its queries by their best class score,
    # so new classes change which objects the old classes see.
    if kind in ("classify", "semantic", "depth", "rtdetr"):
        raise LoraYoloError(f"add_classes supports models with a Detect head, not {kind} ones")
    if adapted and kind != "detect":
        raise LoraYoloError(f"add_classes=adapted pseudo-labels boxes, so it supports detection only (this is {kind})")
    if len(combined_names(base_names, resolved["names"])) == len(base_names):
        raise LoraYoloError(
            f"every class of {resolved['yaml_file']} is already one of the base's: there is no class to add"
        )


def prepare_dataset(
    resolved: dict, base: str | Path, base_names: dict[int, str], out: Path, pseudo_conf: float | None, task: str
) -> tuple[Path, int]:
    """The relabelled copy under `out` of the dataset `resolved` (`check_dataset`'s result, its labels already
    checked, and by `check_add_classes`) and its data.yaml; returns (yaml path, pseudo-labels added).

    `pseudo_conf` None: no pseudo-labels (exact mode); otherwise the base labels its own classes in the training
    images at that confidence (only classes the dataset does not label itself: where a name is in both, the
    dataset's labels are the truth).
    """
    data = resolved["yaml_file"]
    names = combined_names(base_names, resolved["names"])
    if out.exists():  # an earlier attempt of this run (exist_ok): its links and labels are ours, rebuilt here
        shutil.rmtree(out)
    remap = {i: next(k for k, v in names.items() if v == name) for i, name in resolved["names"].items()}
    pseudo_ids = [i for i, name in base_names.items() if name not in resolved["names"].values()]
    added = 0
    for split in ("train", "val"):
        images = split_images(resolved[split])
        if not images:
            raise LoraYoloError(f"dataset {data} has no {split} images")
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        boxes = _pseudo_labels(base, images, pseudo_conf, pseudo_ids) if pseudo_conf and split == "train" else {}
        for i, (image, label) in enumerate(zip(images, img2label_paths([str(f) for f in images]))):
            link = out / "images" / split / f"{i:06d}_{image.name}"
            os.symlink(image.resolve(), link)
            lines = []
            if Path(label).is_file():
                for line in Path(label).read_text(encoding="utf-8-sig", errors="replace").splitlines():
                    fields = line.split()
                    if fields:
                        lines.append(" ".join([str(remap[int(float(fields[0]))]), *fields[1:]]))
            lines += boxes.get(image, [])
            added += len(boxes.get(image, []))
            (out / "labels" / split / f"{i:06d}_{Path(label).name}").write_text("\n".join(lines) + "\n")
    spec = {"path": str(out.resolve()), "train": "images/train", "val": "images/val", "names": names}
    if pseudo_conf:  # read back when the run is resumed (`recorded_pseudo_labels`), for its summary
        spec[PSEUDO_KEY] = added
    for key in ("kpt_shape", "flip_idx", "channels"):
        if key in resolved:
            spec[key] = resolved[key]
    path = out / "data.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path, added


def recorded_pseudo_labels(data: str | Path) -> int | None:
    """How many pseudo-labels the relabelled dataset `data` of an adapted run holds (None: no such record)."""
    try:
        count = yaml.safe_load(Path(data).read_text(encoding="utf-8")).get(PSEUDO_KEY)
    except (OSError, ValueError, yaml.YAMLError, AttributeError):  # ValueError: bytes that are not UTF-8
        return None
    return count if type(count) is int and count >= 0 else None


def _pseudo_labels(base: str | Path, images: list[Path], conf: float, classes: list[int]) -> dict[Path, list[str]]:
    """Label lines (`cls cx cy w h`, normalised) of the base's own detections of `classes` in each image."""
    from ultralytics import YOLO

    if not classes:
        return {}
    model = YOLO(str(base))
    lines: dict[Path, list[str]] = {}
    for image in images:
        (result,) = model.predict(str(image), conf=conf, classes=classes, verbose=False, save=False)
        lines[image] = [
            f"{int(c)} " + " ".join(f"{v:.6f}" for v in box)
            for c, box in zip(result.boxes.cls.tolist(), result.boxes.xywhn.tolist())
        ]
    return lines
