"""`lora-yolo train` on the command line: flags, pass-through arguments and their errors."""

from __future__ import annotations

import pytest
from conftest import SHAPES_B1, cli

from lora_yolo import LoraConfig
from lora_yolo.errors import LoraYoloError
from lora_yolo.train import train


# The argument checks need a valid dataset, not real photographs: the committed synthetic one, no skip without COCO8.
def test_misspelled_passthrough_key_suggests_the_right_one(base_pt, cli_here):
    out = cli_here("train", SHAPES_B1, "--model", base_pt, "mosiac=0.5")
    assert out.returncode == 2  # a usage error
    assert "'mosiac' is not an Ultralytics training argument; did you mean 'mosaic'?" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "arg, message",
    [
        ("freeze=10", "'freeze' cannot be passed through"),
        ("cfg=custom.yaml", "'cfg' cannot be passed through; use --config (a lora-yolo YAML holds Ultralytics"),
    ],
)
def test_arguments_lora_yolo_owns_are_refused(base_pt, cli_here, arg, message):
    out = cli_here("train", SHAPES_B1, "--model", base_pt, arg)
    assert out.returncode == 2 and message in out.stderr


def test_passthrough_arguments_go_with_resume(monkeypatch, capsys):
    """With --resume and no DATA, the first key=value is a pass-through argument (Ultralytics lets a resume change
    workers, device, batch...), not a dataset: what the command hands to `train`."""
    import sys

    import lora_yolo.train
    from lora_yolo.cli import run

    seen = {}

    def fake_train(data, **kwargs):
        seen.update(data=data, **kwargs)
        raise LoraYoloError("stopped here")

    monkeypatch.setattr(lora_yolo.train, "train", fake_train)
    monkeypatch.setattr(sys, "argv", ["lora-yolo", "train", "--resume", "last.pt", "workers=0", "device=cpu"])
    with pytest.raises(SystemExit):
        run()
    assert "stopped here" in capsys.readouterr().err
    assert seen["data"] is None and seen["resume"] == "last.pt" and seen["workers"] == 0 and seen["device"] == "cpu"


def test_default_model_offline_says_how_to_pass_a_local_one(tmp_path):
    out = cli("train", SHAPES_B1, cwd=tmp_path)  # yolo11n.pt is not on disk and there is no internet here
    assert out.returncode == 1
    assert "yolo11n.pt" in out.stderr and "--model path/to/model.pt" in out.stderr and "Traceback" not in out.stderr


def test_resume_refuses_lora_options_it_would_ignore(tmp_path, cli_here):
    # A resumed run continues with the adapter it started (Ultralytics keeps its arguments too): a new rank or
    # checkpointing setting would be silently dropped, so it is refused before anything is read.
    out = cli_here("train", "--resume", str(tmp_path / "last.pt"), "--rank", "4", "--gradient-checkpointing")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--rank, --gradient-checkpointing cannot change on --resume" in " ".join(out.stderr.split())


def test_resume_through_the_library_refuses_a_config(tmp_path):
    with pytest.raises(LoraYoloError, match="keeps the LoRA settings it started with"):
        train(None, resume=tmp_path / "last.pt", config=LoraConfig(r=4))


@pytest.mark.slow
def test_cli_train_runs_and_prints_summary(coco8, base_pt, tmp_path):
    out = cli(
        "train",
        str(coco8),
        "--model",
        str(base_pt),
        "--epochs",
        "1",
        "--imgsz",
        "64",
        "--batch",
        "4",
        "--project",
        str(tmp_path),
        "--name",
        "cli",
        "--targets",
        "neck",  # and the head in full (the default's train_head)
        "--rank",
        "4",
        "plots=False",
        "workers=0",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trainable parameters" in out.stdout and (tmp_path / "cli" / "adapter.safetensors").is_file()
