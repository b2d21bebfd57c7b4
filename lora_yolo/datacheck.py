"""Check a dataset before training, so a bad dataset is one clear line, not a traceback mid-run.

Ultralytics' own `check_det_dataset` does the resolving (the `path` key, relative folders) and most of the checking;
this adds what it only logs as a warning and then silently skips: labels whose class id is out of range. A
classification dataset is a folder (`train/` and `val/`, one subfolder per class), read by `check_cls_dataset`;
a folder without `train/` is refused here rather than split by Ultralytics into a new folder beside it.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from ultralytics.data.utils import (
    IMG_FORMATS,
    add_polygon_background,
    check_cls_dataset,
    check_det_dataset,
    img2label_paths,
)

from lora_yolo.errors import LoraYoloError, first_line


def split_images(source: str | list) -> list[Path]:
    """Image files of a split, found as Ultralytics' dataset finds them: a folder (searched recursively), or a file
    listing one image per line, where a line starting with `./` is relative to the list file and any other line is
    used as written."""
    files = []
    for item in source if isinstance(source, list) else [source]:
        p = Path(item)
        if p.is_dir():
            files += [f for f in p.rglob("*.*") if f.suffix[1:].lower() in IMG_FORMATS]
        elif p.is_file():
            lines = p.read_text(encoding="utf-8-sig", errors="replace").strip().splitlines()
            lines = [str(p.parent / x[2:]) if x.startswith("./") else x for x in lines]
            files += [Path(x) for x in lines if x.rpartition(".")[-1].lower() in IMG_FORMATS]
    return files


def _class_id(field: str) -> float | None:
    """A label's class id as Ultralytics reads it (a float: `0` and `0.0` are both class 0), or None if not a number."""
    try:
        return float(field)
    except ValueError:
        return None


def _check_dense_targets(data: str | Path, resolved: dict, task: str, split: str, images: list[str]) -> None:
    """A depth or semantic split whose images have no target file at all (depth map, class-map PNG or polygon label)
    is one line here; Ultralytics would skip every image and then fail mid-setup. Missing targets for some images
    it skips with a warning."""
    if task == "depth":  # Ultralytics' DepthDataset: images/<split>/x.jpg -> depth/<split>/x.png (or .npy)
        targets = img2label_paths(images, label_dir="depth", suffix=".png")
        found = [t for t in targets if Path(t).is_file() or Path(t).with_suffix(".npy").is_file()]
        where = f"depth/{split}/NAME.png (or .npy) beside images/"
    elif resolved.get("masks_dir"):  # SemanticDataset: class-map PNGs in masks_dir mirroring images/
        masks = resolved["masks_dir"]
        found = [t for t in img2label_paths(images, label_dir=masks, suffix=".png") if Path(t).is_file()]
        where = f"{masks}/{split}/NAME.png (masks_dir) beside images/"
    else:  # PolygonSemanticDataset: Ultralytics' segment labels, rasterised
        found = [t for t in img2label_paths(images) if Path(t).is_file()]
        where = f"labels/{split}/NAME.txt polygons beside images/, or masks_dir"
    if not found:
        raise LoraYoloError(f"dataset {data}: none of the {len(images)} {split} images has a {task} target ({where})")


def check_classify_dataset(data: str | Path) -> dict:
    """Ultralytics' resolved classification dataset: a folder with `train/` and a validation split (`val/`,
    `validation/`, `valid/` or `test/`), one subfolder of images per class."""
    path = Path(data)
    if not path.is_dir():
        raise LoraYoloError(
            f"a classification dataset is a folder with train/ and val/, one subfolder per class; got {data}"
        )
    if not (path / "train").is_dir():
        raise LoraYoloError(f"classification dataset {data} has no train/ folder")
    if not any((path / split).is_dir() for split in ("val", "validation", "valid", "test")):
        raise LoraYoloError(f"classification dataset {data} has no val/ (or test/) folder")
    try:
        resolved = check_cls_dataset(str(path))
    except Exception as e:
        raise LoraYoloError(f"dataset {data}: {first_line(e)}") from None
    if not resolved["nc"]:
        raise LoraYoloError(f"classification dataset {data} has no class folders in train/")
    return resolved


def check_dataset(data: str | Path, task: str = "detect") -> dict:
    """Ultralytics' resolved dataset dict, or a LoraYoloError naming the file and the problem.

    Example:
        >>> check_dataset("datasets/shapes-b2/data.yaml")["nc"]
        4
    """
    if task == "classify":
        return check_classify_dataset(data)
    path = Path(data)
    if not path.is_file():
        raise LoraYoloError(f"dataset YAML not found: {data}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise LoraYoloError(f"cannot read dataset YAML {data}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LoraYoloError(f"dataset {data} is not valid YAML ({first_line(e)})") from None
    if not isinstance(raw, dict):
        raise LoraYoloError(f"dataset {data} must be a YAML mapping with train, val and names")
    missing = [k for k in ("train", "val") if not raw.get(k)] + ([] if raw.get("names") or raw.get("nc") else ["names"])
    if missing:
        raise LoraYoloError(f"dataset {data} has no '{missing[0]}' key (train, val and names are required)")
    try:
        resolved = check_det_dataset(str(path), autodownload=False)
    except Exception as e:
        raise LoraYoloError(f"dataset {data}: {first_line(e)}") from None
    nc = resolved["nc"]
    for split in ("train", "val"):
        images = [str(f) for f in split_images(resolved[split])]
        if task in ("depth", "semantic") and images:
            _check_dense_targets(data, resolved, task, split, images)
        for label in img2label_paths(images):
            if not Path(label).is_file():
                continue
            for line in Path(label).read_text(encoding="utf-8-sig", errors="replace").splitlines():
                fields = line.split()
                if not fields:
                    continue
                if task == "semantic" and len(fields) == 5:  # Ultralytics would fail mid-setup, with a traceback
                    raise LoraYoloError(
                        f"{label}: a box label; semantic segmentation reads polygons (class x1 y1 x2 y2 x3 y3 ...) "
                        "or class-map PNGs under masks_dir"
                    )
                cls = _class_id(fields[0])
                if cls is None or not cls.is_integer() or cls < 0:
                    raise LoraYoloError(f"{label}: class id {fields[0][:20]!r} is not a class index (0-{nc - 1})")
                if cls >= nc:
                    raise LoraYoloError(
                        f"{label}: label class {fields[0]} exceeds dataset class count {nc}. "
                        f"Possible class labels are 0-{nc - 1}"
                    )
    if task == "semantic":  # polygons rasterised over Ultralytics' background class, as its trainer reads them
        add_polygon_background(resolved)
    return resolved
