"""`lora-yolo predict` and `lora-yolo val` with an adapter: the same results as the merged checkpoint gives."""

from __future__ import annotations

import re

import pytest
from conftest import SHAPES_B1, cli, random_adapter
from ultralytics import YOLO

from lora_yolo.adapter import save_adapter
from lora_yolo.merge import merge_files

IMAGES = SHAPES_B1.parent / "images" / "val"


def lora_yolo(*args):
    """The installed console script, as users run it: its name ends in "yolo", so Ultralytics applies its CLI's
    defaults (conftest.cli). This file checks the entry point, so the script missing fails, it does not skip."""
    return cli(*args, console_script=True)


@pytest.fixture(scope="module")
def files(demo_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    adapter = save_adapter(random_adapter(demo_base, scale=0.02)[1], tmp / "a.safetensors")
    merged = merge_files(demo_base, [str(adapter)], tmp / "merged.pt")
    return tmp, adapter, merged


def test_predict_with_adapter_matches_merged_checkpoint(files, demo_base):
    tmp, adapter, merged = files
    out = lora_yolo(
        "predict", IMAGES, "--model", demo_base, "--adapter", adapter, "--imgsz", 160, f"project={tmp}", "name=p"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    images, boxes = map(int, re.search(r"(\d+) images, (\d+) detections", out.stdout).groups())
    expected = YOLO(str(merged)).predict(str(IMAGES), imgsz=160, conf=0.25, verbose=False)
    assert images == len(expected) == 40
    assert boxes == sum(len(r) for r in expected) > 0
    assert len(list((tmp / "p").glob("*.jpg"))) == 40  # Ultralytics' annotated images, saved as `yolo predict` does


def test_val_with_adapter_matches_merged_checkpoint(files, demo_base, cli_here):
    tmp, adapter, merged = files
    out = cli_here("val", SHAPES_B1, "--model", demo_base, "--adapter", adapter, "--imgsz", 160, f"project={tmp}")
    assert out.returncode == 0, out.stderr[-2000:]
    map50, map50_95 = map(float, re.search(r"mAP50 ([\d.]+)  mAP50-95 ([\d.]+)", out.stdout).groups())
    metrics = YOLO(str(merged)).val(data=str(SHAPES_B1), imgsz=160, project=str(tmp), plots=False, verbose=False)
    assert map50 == pytest.approx(metrics.box.map50, abs=1e-3) and map50_95 == pytest.approx(metrics.box.map, abs=1e-3)
    base = cli_here("val", SHAPES_B1, "--model", demo_base, "--imgsz", 160, f"project={tmp}")  # no adapter: the base
    assert base.returncode == 0 and f"mAP50 {map50:.4f}" not in base.stdout


def test_errors_are_one_line(files, demo_base, tmp_path, cli_here):
    tmp, adapter, _ = files
    missing = cli_here("predict", IMAGES, "--model", demo_base, "--adapter", tmp_path / "none.safetensors")
    assert missing.returncode == 1 and "adapter file not found" in missing.stderr and "Traceback" not in missing.stderr
    b2 = SHAPES_B1.parents[1] / "shapes-b2" / "data.yaml"  # 4 classes; the adapter keeps the base's 3
    wrong = cli_here("val", b2, "--model", demo_base, "--adapter", adapter)
    assert wrong.returncode == 1 and "has 4 classes, the model with this adapter predicts 3" in wrong.stderr
    typo = cli_here("predict", IMAGES, "--model", demo_base, "cnf=0.5")
    assert typo.returncode == 2 and "did you mean 'conf'?" in typo.stderr
    nosource = cli_here("predict", tmp_path / "nothing", "--model", demo_base)
    assert nosource.returncode == 1 and "source not found" in nosource.stderr
    yaml_base = cli_here("predict", IMAGES, "--model", "yolo11n.yaml")
    assert yaml_base.returncode == 1 and "keeps its base as weights/base.pt" in yaml_base.stderr
    # what Ultralytics' predictor and validator refuse, each with a plain Python exception
    conf = cli_here("predict", IMAGES, "--model", demo_base, "--conf", "7", f"project={tmp_path}")
    assert conf.returncode == 1 and "'conf=7.0' is an invalid value" in conf.stderr and "Traceback" not in conf.stderr
    (tmp_path / "bad.jpg").write_bytes(b"not an image")  # Ultralytics warns, skips it and finishes with nothing
    unread = cli_here("predict", tmp_path / "bad.jpg", "--model", demo_base, f"project={tmp_path}")
    assert unread.returncode == 1 and "no image or video frame was read from" in unread.stderr
    batch = cli_here("val", SHAPES_B1, "--model", demo_base, "--batch", "-3", f"project={tmp_path}")
    assert batch.returncode == 1 and "Traceback" not in batch.stderr and len(batch.stderr.strip().splitlines()) == 1
