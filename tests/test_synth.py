"""The synthetic dataset generator: deterministic, valid Ultralytics labels, and loadable by Ultralytics."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lora_yolo import LoraYoloError
from lora_yolo.datacheck import check_dataset
from lora_yolo.synth import DOMAINS, make_dataset

ROOT = Path(__file__).resolve().parents[1]


def digest(root: Path, pattern: str = "*") -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob(pattern)):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = make_dataset(tmp_path / "a", "B1", 4, 2, imgsz=96, seed=3).parent
    b = make_dataset(tmp_path / "b", "B1", 4, 2, imgsz=96, seed=3).parent
    c = make_dataset(tmp_path / "c", "B1", 4, 2, imgsz=96, seed=4).parent
    assert digest(a) == digest(b) != digest(c)


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_labels_are_valid_and_ultralytics_reads_them(tmp_path, domain):
    data = make_dataset(tmp_path / domain, domain, 6, 3, imgsz=96, seed=0)
    resolved = check_dataset(data)
    assert resolved["nc"] == len(DOMAINS[domain].classes)
    lines = [line.split() for f in (tmp_path / domain / "labels").rglob("*.txt") for line in f.read_text().splitlines()]
    assert lines and all(0 <= int(c) < resolved["nc"] for c, *_ in lines)
    assert all(0 <= float(v) <= 1 for _, *box in lines for v in box)
    assert all(float(w) > 0 and float(h) > 0 for *_, w, h in lines)


def test_shipped_datasets_match_the_generator(tmp_path):
    """datasets/ holds exactly what scripts/make_datasets.py generates (so it can be regenerated, not just trusted)."""
    for domain, name in (("B1", "shapes-b1"), ("B2", "shapes-b2")):
        fresh = make_dataset(tmp_path / name, domain, 120, 40, imgsz=160, seed=0).parent
        # Labels and file lists exactly; image bytes depend on the JPEG encoder build, so they are not compared.
        assert digest(fresh, "*.txt") == digest(ROOT / "datasets" / name, "*.txt"), name
        assert [f.name for f in sorted(fresh.rglob("*.jpg"))] == [
            f.name for f in sorted((ROOT / "datasets" / name).rglob("*.jpg"))
        ]


def test_unknown_domain():
    with pytest.raises(LoraYoloError, match="unknown domain"):
        make_dataset("/tmp/x", "C", 1, 1)
