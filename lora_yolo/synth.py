"""Seeded synthetic detection datasets in Ultralytics format, so demos, tests and benchmarks need no download.

Objects are filled shapes of varied size, colour and rotation, partly occluding each other, on textured or plain
backgrounds with distractor blobs. A *domain* fixes the classes and the look:

- `A`: the pretraining domain (circle, square, triangle on light noisy backgrounds);
- `B1`: A's classes in another appearance (dark textured backgrounds, other colours, blur, smaller objects);
- `B2`: classes A never had (star, cross, ring, diamond) on A-like backgrounds.

Every object also knows its outline, so the same images label every task with a Detect-style head: `detect` (boxes),
`segment` (outline polygons), `obb` (the outline's minimum-area rotated rectangle) and `pose` (two keypoints: the
centre and the outline's first vertex, which turns with the shape). For `classify` each image holds one object and
lies in the folder of its class (`train/circle/00000.jpg`), Ultralytics' classification layout. For `depth` each
image gets a depth map (`depth/train/00000.png`, uint16 millimetres, Ultralytics' layout): a floor plane receding
from 2 m at the bottom to 6 m at the top, each object a flat card (1.6-1.8 m) nearer than those drawn before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import yaml

from lora_yolo.errors import LoraYoloError


@dataclass(frozen=True)
class Domain:
    """How a domain looks: its classes and its appearance ranges."""

    classes: tuple[str, ...]
    background: str  # "light" | "dark"
    size: tuple[float, float]  # object size as a fraction of the image side
    blur: float  # max Gaussian blur sigma
    objects: tuple[int, int]  # objects per image
    distractors: int  # max distractor blobs


DOMAINS = {
    "A": Domain(("circle", "square", "triangle"), "light", (0.10, 0.30), 0.0, (1, 5), 2),
    "B1": Domain(("circle", "square", "triangle"), "dark", (0.06, 0.18), 1.5, (3, 8), 6),
    "B2": Domain(("star", "cross", "ring", "diamond"), "light", (0.08, 0.22), 0.5, (2, 6), 4),
    # A's shapes and B2's in the same scenes: what a user adding B2's classes to an A model photographs, where the
    # old classes appear unlabelled beside the new ones (scripts/bench_add_classes.py)
    "AB2": Domain(
        ("circle", "square", "triangle", "star", "cross", "ring", "diamond"), "light", (0.08, 0.26), 0.5, (2, 7), 4
    ),  # fmt: skip
}


@dataclass
class Shape:
    """One drawn object: its class, clipped box (x0, y0, x1, y1) and outline (N, 2), in pixels."""

    cls: int
    box: tuple[float, float, float, float]
    outline: np.ndarray = field(repr=False)

    def label(self, task: str, size: int) -> str:
        """The object's line in an Ultralytics label file for `task`, coordinates normalised by the image size."""
        x0, y0, x1, y1 = self.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if task in ("detect", "pose"):
            values = [cx, cy, x1 - x0, y1 - y0]
        elif task == "segment":
            values = self.outline.flatten()
        elif task == "obb":
            values = cv2.boxPoints(cv2.minAreaRect(self.outline.astype(np.float32))).flatten()
        else:
            raise LoraYoloError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        line = f"{self.cls} " + " ".join(f"{v:.6f}" for v in np.clip(np.asarray(values, float) / size, 0, 1))
        if task == "pose":  # two visible keypoints: the centre and the outline's first vertex
            line += "".join(f" {x / size:.6f} {y / size:.6f} 2" for x, y in ((cx, cy), self.outline[0]))
        return line


TASKS = ("detect", "segment", "obb", "pose", "classify", "depth")
DEPTH_SCALE = 1000  # depth PNG value per metre


def _circle(cx: float, cy: float, r: float, angle: float, n: int = 24) -> np.ndarray:
    """Outline points of a circle, starting at `angle`."""
    thetas = angle + np.arange(n) * 2 * math.pi / n
    return np.stack([cx + r * np.cos(thetas), cy + r * np.sin(thetas)], 1)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Outline points of a shape centred at (cx, cy) with circumradius r, rotated by angle."""
    if kind == "star":
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        thetas = [angle + i * math.pi / 5 for i in range(10)]
    elif kind == "cross":
        w = r * 0.35
        pts = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        c, s = math.cos(angle), math.sin(angle)
        return np.array([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], np.int32)
    else:
        n = {"square": 4, "triangle": 3, "diamond": 4}[kind]
        stretch = 0.6 if kind == "diamond" else 1.0
        radii = [r * (stretch if i % 2 else 1.0) for i in range(n)] if kind == "diamond" else [r] * n
        thetas = [angle + i * 2 * math.pi / n for i in range(n)]
    return np.array([(cx + q * math.cos(t), cy + q * math.sin(t)) for q, t in zip(radii, thetas)], np.int32)


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    base = rng.uniform(150, 230) if kind == "light" else rng.uniform(20, 80)
    img = np.full((size, size, 3), base, np.float32) + rng.normal(0, 12, (1, 1, 3))
    # Low-frequency texture: upsampled noise, so the background is never flat.
    coarse = rng.normal(0, 25 if kind == "dark" else 15, (8, 8, 3)).astype(np.float32)
    img += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 8, img.shape)
    return img


def render(rng: np.random.Generator, domain: Domain, size: int) -> tuple[np.ndarray, list[Shape]]:
    """One image (uint8 BGR) and the shapes drawn on it."""
    img = _background(rng, size, domain.background)
    for _ in range(rng.integers(0, domain.distractors + 1)):  # blobs that look a little like objects
        c = tuple(float(v) for v in rng.uniform(0, 255, 3))
        center = tuple(int(v) for v in rng.uniform(0, size, 2))
        axes = tuple(int(v) for v in rng.uniform(0.02, 0.08, 2) * size)
        cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, c, -1)
    labels = []
    for _ in range(rng.integers(domain.objects[0], domain.objects[1] + 1)):
        cls = int(rng.integers(len(domain.classes)))
        kind = domain.classes[cls]
        r = rng.uniform(*domain.size) * size / 2
        cx, cy = rng.uniform(r, size - r, 2)
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        angle = float(rng.uniform(0, 2 * math.pi))
        if kind == "circle":
            cv2.circle(img, (int(cx), int(cy)), int(r), colour, -1)
            box, outline = (cx - r, cy - r, cx + r, cy + r), _circle(cx, cy, r, angle)
        elif kind == "ring":
            cv2.circle(img, (int(cx), int(cy)), int(r), colour, max(2, int(r * 0.3)))
            box, outline = (cx - r, cy - r, cx + r, cy + r), _circle(cx, cy, r, angle)
        else:
            pts = _polygon(kind, cx, cy, r, angle)
            cv2.fillPoly(img, [pts], colour)
            box, outline = (*pts.min(0), *pts.max(0)), pts.astype(float)
        box = tuple(float(min(max(v, 0), size - 1)) for v in box)
        labels.append(Shape(cls, box, np.clip(outline, 0, size - 1)))
    if domain.blur:
        sigma = rng.uniform(0, domain.blur)
        if sigma > 0.3:
            img = cv2.GaussianBlur(img, (0, 0), sigma)
    return np.clip(img, 0, 255).astype(np.uint8), labels


def make_dataset(
    root: str | Path, domain: str, n_train: int, n_val: int, imgsz: int = 160, seed: int = 0, task: str = "detect"
) -> Path:
    """Write a dataset (images/, labels/, data.yaml) for `task` under `root`; returns the data.yaml path (for
    `classify`: the dataset folder, which is what Ultralytics takes as `data`).

    The images depend only on the domain and seed, not on the task (classification draws one object per image).

    Example:
        >>> make_dataset("datasets/shapes-b2", "B2", n_train=120, n_val=40)
    """
    if domain not in DOMAINS:
        raise LoraYoloError(f"unknown domain {domain!r}; domains: {', '.join(DOMAINS)}")
    if task not in TASKS:
        raise LoraYoloError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    spec, root = DOMAINS[domain], Path(root)
    rng = np.random.default_rng([seed, list(DOMAINS).index(domain)])
    if task == "classify":
        return _classify_dataset(root, replace(spec, objects=(1, 1)), n_train, n_val, imgsz, rng)
    targets = "depth" if task == "depth" else "labels"
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / targets / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = render(rng, spec, imgsz)
            cv2.imwrite(str(root / "images" / split / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 80])
            if task == "depth":
                cv2.imwrite(str(root / targets / split / f"{i:05d}.png"), _depth_map(labels, imgsz))
                continue
            lines = [shape.label(task, imgsz) for shape in labels]
            (root / targets / split / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")
    data = {"train": "images/train", "val": "images/val", "names": dict(enumerate(spec.classes))}
    if task == "pose":
        data.update(kpt_shape=[2, 3], flip_idx=[0, 1])
    if task == "depth":
        data.update(names={0: "depth"}, depth_scale=DEPTH_SCALE)
    path = root / "data.yaml"
    header = f"# Synthetic domain {domain} from lora_yolo.synth (seed {seed}, {imgsz} px). No 'path': root is here.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def _depth_map(shapes: list[Shape], size: int) -> np.ndarray:
    """uint16 depth in millimetres: the floor plane (6 m at the top row to 2 m at the bottom), then each shape's
    outline filled as a flat card between 1.8 and 1.6 m, each one drawn later nearer (and occluding the earlier)."""
    rows = np.linspace(6.0, 2.0, size, dtype=np.float32)[:, None]
    depth = np.repeat(rows, size, axis=1)
    for k, shape in enumerate(shapes):
        card = np.zeros((size, size), np.uint8)
        cv2.fillPoly(card, [np.round(shape.outline).astype(np.int32)], 1)
        depth[card > 0] = 1.8 - 0.2 * k / max(len(shapes), 1)
    return np.round(depth * DEPTH_SCALE).astype(np.uint16)


def _classify_dataset(root: Path, spec: Domain, n_train: int, n_val: int, imgsz: int, rng: np.random.Generator) -> Path:
    """`root/{train,val}/<class>/<i>.jpg`, one object per image; every class has a folder in both splits, empty or not,
    so Ultralytics reads the same class list from either."""
    for split, n in (("train", n_train), ("val", n_val)):
        for name in spec.classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, (shape,) = render(rng, spec, imgsz)
            cv2.imwrite(
                str(root / split / spec.classes[shape.cls] / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 80]
            )
    return root
