"""Faults: kills while writing, SIGTERM mid-epoch, NaN losses, full disks: nothing lost, nothing half-written."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, random_adapter

from lora_yolo import LoraYoloError, load_adapter, save_adapter
from lora_yolo.train import train

ROOT = Path(__file__).resolve().parents[1]
B2 = ROOT / "datasets" / "shapes-b2" / "data.yaml"


def test_kill_while_writing_leaves_old_or_new_file(base_pt, tmp_path):
    """A writer alternates two adapters into one path; SIGKILL it at random moments; the file always loads whole."""
    a = save_adapter(random_adapter(base_pt, seed=1)[1], tmp_path / "a.safetensors")
    b = save_adapter(random_adapter(base_pt, seed=2)[1], tmp_path / "b.safetensors")
    target = tmp_path / "target.safetensors"
    target.write_bytes(a.read_bytes())
    writer = textwrap.dedent(f"""
        from lora_yolo import load_adapter, save_adapter
        pair = [load_adapter({str(a)!r}), load_adapter({str(b)!r})]
        print("ready", flush=True)
        i = 0
        while True:
            save_adapter(pair[i % 2], {str(target)!r})
            i += 1
    """)
    valid = [load_adapter(a).tensors, load_adapter(b).tensors]
    for k in range(4):  # each kill costs a process start (torch imported): 4 moments over 0.05-0.25 s of writing
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.065 * k)
        proc.kill()
        proc.wait()
        got = load_adapter(target).tensors  # a half-written file would be refused here
        assert any(all(torch.equal(got[n], t[n]) for n in t) for t in valid), f"kill {k}: neither old nor new"
    for leftover in tmp_path.glob(".target.safetensors.*"):  # a killed writer can leave its temporary file
        leftover.unlink()


def test_disk_full_keeps_the_previous_file(base_pt, tmp_path, monkeypatch):
    first = random_adapter(base_pt, seed=1)[1]
    path = save_adapter(first, tmp_path / "a.safetensors")
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lora_yolo.adapter.save_file", full_disk)
    with pytest.raises(LoraYoloError, match="No space left on device"):
        save_adapter(random_adapter(base_pt, seed=2)[1], path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume(base_pt, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from lora_yolo.cli import run
        sys.argv = ["lora-yolo", "train", {str(B2)!r}, "--model", {str(base_pt)!r}, "--epochs", "2", "--imgsz", "64",
                    "--batch", "2", "--project", {str(tmp_path)!r}, "--name", "t", "workers=0", "plots=False",
                    "fraction=0.3"]
        run()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    saved = tmp_path / "t" / "adapter_last.safetensors"  # written (atomically) right after last.pt
    deadline = time.time() + 240
    while not saved.exists():  # epoch 1 validated and saved
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else "slow"
        time.sleep(0.2)
    time.sleep(0.5)  # into epoch 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = tmp_path / "t" / "weights" / "last.pt"
    assert f"training interrupted; resume with: lora-yolo train --resume {last}" in err
    result = train(None, resume=last)
    assert len((result.save_dir / "results.csv").read_text().splitlines()) == 3  # header + 2 epochs
    load_adapter(result.adapter)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_adapter(base_pt, tmp_path):
    def poison(trainer):
        if trainer.epoch == 1:  # second epoch: the adapters of epoch 1 are already saved
            with torch.no_grad():
                next(p for n, p in trainer.model.named_parameters() if n.endswith("lora_A.weight")).fill_(float("nan"))

    with pytest.raises(
        LoraYoloError, match="training diverged: the loss or the trained tensors became NaN/Inf in epoch 2"
    ):
        train(
            B2,
            model=base_pt,
            project=str(tmp_path),
            name="nan",
            callbacks={"on_train_batch_end": [poison]},
            **{**TINY, "epochs": 3, "fraction": 0.25},
        )
    good = load_adapter(tmp_path / "nan" / "adapter_last.safetensors")  # finite, or load_adapter would refuse
    assert all(torch.isfinite(t).all() for t in good.tensors.values())
    assert not os.path.exists(tmp_path / "nan" / "merged.pt")


@pytest.mark.slow
def test_overflowing_head_statistics_stop_the_run_although_the_loss_is_finite(tmp_path):
    # train_head: a BatchNorm of the head trains in train mode, so its running variance can blow up while the loss
    # (computed with batch statistics) stays finite; the adapter would be written from the EMA holding it.
    from lora_yolo import LoraConfig

    def poison(trainer):
        if trainer.epoch == 1:
            var = next(b for n, b in trainer.model.named_buffers() if n.startswith("model.23.") and "running_var" in n)
            var.fill_(float("inf"))

    with pytest.raises(LoraYoloError, match="the loss or the trained tensors became NaN/Inf in epoch 2"):
        train(
            B2,
            model=ROOT / "lora_yolo" / "assets" / "yolo11n-shapes.pt",
            config=LoraConfig(r=4, lora_alpha=8, train_head=True),
            project=str(tmp_path),
            name="inf",
            callbacks={"on_train_batch_end": [poison]},
            **{**TINY, "epochs": 3, "fraction": 0.25},
        )
    assert load_adapter(tmp_path / "inf" / "adapter_last.safetensors")  # epoch 1's, finite
