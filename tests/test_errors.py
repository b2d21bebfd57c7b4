"""Errors a user can cause: one clear line on stderr, exit 2 for usage errors and 1 for the rest, no traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lora_yolo.cli import run

ROOT = Path(__file__).resolve().parents[1]
B2 = ROOT / "datasets" / "shapes-b2" / "data.yaml"


def invoke(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in-process (fast) exactly as the console script does; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lora-yolo", *args])
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.fixture
def bad_data(tmp_path):
    """Dataset YAMLs broken in each way a user can break one."""
    images = tmp_path / "ds" / "images" / "train"
    images.mkdir(parents=True)
    (tmp_path / "ds" / "labels" / "train").mkdir(parents=True)
    import shutil

    for f in sorted((B2.parent / "images" / "train").glob("*.jpg"))[:2]:
        shutil.copy(f, images / f.name)
        write(tmp_path / "ds" / "labels" / "train" / f"{f.stem}.txt", "7 0.5 0.5 0.1 0.1\n")
    return {
        "not found": (tmp_path / "nope.yaml", "dataset YAML not found"),
        "not yaml": (write(tmp_path / "a.yaml", "train: [images\nval: x: y"), "is not valid YAML"),
        "binary": (write(tmp_path / "b.yaml", b"\xff\xfe\x00garbage"), "is not valid YAML"),
        "a list": (write(tmp_path / "c.yaml", "- train\n- val\n"), "must be a YAML mapping"),
        "no val": (write(tmp_path / "d.yaml", "train: images\nnames: [a]\n"), "no 'val' key"),
        "no names": (write(tmp_path / "e.yaml", "train: images\nval: images\n"), "no 'names' key"),
        "missing folder": (
            write(tmp_path / "f.yaml", "path: nowhere\ntrain: images\nval: images\nnames: [a]\n"),
            "not found",
        ),
        "class out of range": (
            write(tmp_path / "ds" / "g.yaml", "train: images/train\nval: images/train\nnames: [a, b, c]\n"),
            "label class 7 exceeds dataset class count 3",
        ),
    }


@pytest.mark.parametrize(
    "case", ["not found", "not yaml", "binary", "a list", "no val", "no names", "missing folder", "class out of range"]
)
def test_bad_dataset(monkeypatch, capsys, bad_data, base_pt, case):
    path, message = bad_data[case]
    code, err = invoke(monkeypatch, capsys, "train", str(path), "--model", str(base_pt))
    assert code == 1 and message in err and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "model, message",
    [
        ("no/such.pt", "model file not found"),
        ("README.md", "must be a .pt checkpoint or a model .yaml"),
        ("yolov8s-worldv2.yaml", "is a YOLO-World / YOLOE (open-vocabulary) model; supported: detect,"),
        ("yoloe-11s-seg.yaml", "is a YOLO-World / YOLOE (open-vocabulary) model; supported: detect,"),
    ],
)
def test_bad_model(monkeypatch, capsys, model, message):
    code, err = invoke(monkeypatch, capsys, "inspect", model)
    assert code == 1 and message in err


def test_model_with_an_unknown_head(monkeypatch, capsys, tmp_path):
    """A YAML whose last layer is no head Ultralytics or lora-yolo knows: one line naming what is supported."""
    layers = "backbone:\n  - [-1, 1, Conv, [16, 3, 2]]\nhead:\n  - [-1, 1, Conv, [8, 1, 1]]\n"
    cfg = write(tmp_path / "headless.yaml", layers)
    code, err = invoke(monkeypatch, capsys, "inspect", str(cfg))
    assert code == 1 and "has a head lora-yolo does not know; supported: detect, segment" in err and ", rtdetr" in err
    assert err.count("\n") == 1


def test_not_a_checkpoint(monkeypatch, capsys, tmp_path):
    code, err = invoke(monkeypatch, capsys, "inspect", str(write(tmp_path / "x.pt", "just text")))
    assert code == 1 and "is not an Ultralytics checkpoint" in err
    code, err = invoke(monkeypatch, capsys, "export", str(tmp_path / "x.pt"), "--format", "onnx")
    assert code == 1 and err.startswith("error: onnx export failed") and err.count("\n") == 1  # no traceback


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "r must be a positive integer"),
        (["--rank", "-3"], "r must be a positive integer"),
        (["--rank", "1.5"], "valid integer"),
        (["--alpha", "0"], "lora_alpha must be a finite number > 0"),
        (["--dropout", "1"], "lora_dropout must be in [0, 1)"),
        (["--dropout", "-0.1"], "lora_dropout must be in"),
        (["--config", "nosuch"], "unknown preset 'nosuch'"),
        (["--targets", "neck,heads"], "unknown target preset"),
        (["--include", "("], "not a valid regular expression"),
        (["--rank-pattern", "cv2=x"], "REGEX=VALUE"),
    ],
)
def test_bad_options_are_usage_errors(monkeypatch, capsys, args, message):
    code, err = invoke(monkeypatch, capsys, "inspect", "yolo11n.yaml", *args)
    assert code == 2 and message in err


def test_rank_above_layer_channels(monkeypatch, capsys):
    # the default preset clamps a rank above a layer's limit to that limit; without clamping nothing would remain
    code, err = invoke(monkeypatch, capsys, "inspect", "yolo11n.yaml", "--rank", "999", "--no-clamp-rank")
    assert code == 1 and "rank 999 is larger than every selected layer can use" in err


def test_selection_matching_nothing_names_nearby_layers(monkeypatch, capsys):
    code, err = invoke(monkeypatch, capsys, "inspect", "yolo11n.yaml", "--targets", "", "--include", r"model\.23\.cv9")
    assert code == 1 and "matches no trainable conv layer" in err and "model.23.cv" in err


def test_gpu_that_is_not_there(monkeypatch, capsys, base_pt):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, even on one with a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code, err = invoke(monkeypatch, capsys, "train", str(B2), "--model", str(base_pt), "--device", "0")
    assert code == 1 and "Invalid CUDA 'device=0' requested" in err


@pytest.mark.parametrize(
    "output, message", [("/no/such/dir/m.pt", "output folder does not exist"), ("/proc/m.pt", "cannot write to /proc")]
)
def test_merge_output_that_cannot_be_written(monkeypatch, capsys, base_pt, tmp_path, output, message):
    from conftest import random_adapter

    from lora_yolo import save_adapter

    adapter = save_adapter(random_adapter(base_pt)[1], tmp_path / "a.safetensors")
    code, err = invoke(monkeypatch, capsys, "merge", "--base", str(base_pt), "--adapter", str(adapter), "-o", output)
    assert code == 1 and message in err


def test_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lora-yolo", "--debug", "inspect", "no/such.pt"])
    from lora_yolo import LoraYoloError

    with pytest.raises(LoraYoloError):
        run()
