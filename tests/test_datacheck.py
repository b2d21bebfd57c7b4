"""The dataset check reads labels and image lists the way Ultralytics' dataset does, so it refuses exactly what would
go wrong in training and passes what Ultralytics accepts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_yolo import LoraYoloError
from lora_yolo.datacheck import check_dataset

B2 = Path(__file__).resolve().parents[1] / "datasets" / "shapes-b2" / "data.yaml"


def dataset(root: Path, labels: list[str], listed: bool, line_prefix: str = "./") -> Path:
    """Two images with the given label lines; the splits given as folders, or as list files of `./` lines."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for f, label in zip(sorted((B2.parent / "images" / "train").glob("*.jpg"))[:2], labels):
        shutil.copy(f, root / "images" / f.name)
        (root / "labels" / f"{f.stem}.txt").write_text(label)
    split = "images"
    if listed:
        (root / "train.txt").write_text("".join(f"{line_prefix}images/{f.name}\n" for f in (root / "images").iterdir()))
        split = "train.txt"
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: {split}\nval: {split}\nnames: [a, b, c]\n")
    return data


@pytest.mark.parametrize("cls", ["0", "0.0", "2.000"])
def test_integer_valued_class_ids_pass(tmp_path, cls):
    """Ultralytics parses class ids as floats: `0.0` is class 0."""
    assert check_dataset(dataset(tmp_path, [f"{cls} 0.5 0.5 0.1 0.1\n"] * 2, listed=False))["nc"] == 3


@pytest.mark.parametrize(
    "cls, match",
    [
        ("0.5", "is not a class index"),
        ("-1", "is not a class index"),
        ("cat", "is not a class index"),
        ("nan", "is not a class index"),
        ("3", "label class 3 exceeds dataset class count 3"),
        ("7.0", "label class 7.0 exceeds dataset class count 3"),
    ],
)
def test_bad_class_ids_name_the_problem(tmp_path, cls, match):
    with pytest.raises(LoraYoloError, match=match):
        check_dataset(dataset(tmp_path, ["0 0.5 0.5 0.1 0.1\n", f"{cls} 0.5 0.5 0.1 0.1\n"], listed=False))


def test_image_lists_resolve_dot_lines_from_the_list_file(tmp_path, monkeypatch):
    """A `./images/x.jpg` line is relative to the list file, not to the working directory: the bad label is found
    wherever the command runs."""
    data = dataset(tmp_path / "ds", ["0 0.5 0.5 0.1 0.1\n", "5 0.5 0.5 0.1 0.1\n"], listed=True)
    monkeypatch.chdir(tmp_path)  # not the dataset folder
    with pytest.raises(LoraYoloError, match="label class 5 exceeds"):
        check_dataset(data)
