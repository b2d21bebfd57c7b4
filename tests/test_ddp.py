"""Real multi-process training: two gloo ranks on CPU running Ultralytics' training loop with the LoRA trainer
(tests/ddp_rank.py says what is replaced to run it without GPUs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, rtdetr_base

from lora_yolo import load_model
from lora_yolo.targets import class_layers

pytestmark = pytest.mark.slow
B2 = ROOT / "datasets" / "shapes-b2" / "data.yaml"  # 4 classes: the demo base's 3 are replaced, class layers in full


def run_ranks(tmp_path: Path, demo_base: Path, lora: dict | None = None, **extra) -> list[subprocess.CompletedProcess]:
    """Both ranks of one run, each its own process; a hang is a failure after 300 s, not a stuck suite."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = dict(model=str(demo_base), data=str(B2), epochs=2, imgsz=64, batch=4, nbs=4, warmup_epochs=0,
                     fraction=0.1, workers=0, plots=False, device="cpu", seed=0, name="ddp", exist_ok=True)  # fmt: skip
    procs = []
    for rank in (0, 1):
        spec = {"overrides": {**overrides, "project": str(tmp_path / "runs")}, "out": str(tmp_path), **extra,
                "lora": {"use_dora": True, "loraplus_lr_ratio": 4, **(lora or {})}}  # fmt: skip
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "ddp_rank.py"), json.dumps(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    return done


def test_two_ranks_train_the_same_adapter_and_only_rank_0_writes(demo_base, tmp_path):
    # train_bias: the BatchNorm shifts train under DDP too (Ultralytics' freeze list must not freeze them before DDP
    # wraps the model, or their gradients are never averaged and the ranks drift apart)
    for p in run_ranks(tmp_path, demo_base, lora={"train_bias": True}):
        assert p.returncode == 0, p.stderr[-3000:]
        assert "drifted" not in p.stderr + p.stdout  # the trainable set held from the first step
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for part in ("adapter", "ema", "full"):  # the ranks started from different adapter inits (ddp_rank.py)
        assert r0[part].keys() == r1[part].keys() and len(r0[part]) >= 6, part  # full: 3 class convs, weight + bias
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), part
    shifts = [k for k in r0["full"] if k.endswith(".bn.bias")]
    base = load_model(demo_base).state_dict()
    assert len(shifts) > 50 and all(not torch.equal(r0["full"][k], base[k]) for k in shifts)  # trained, in step
    assert any(k.endswith("lora_magnitude_vector") for k in r0["adapter"])  # DoRA in the workers
    assert all(k.startswith("model.23.") for k in r0["full"] if k not in shifts)  # the class layers, trained in full
    assert any(t.abs().max() > 0 for k, t in r0["adapter"].items() if k.endswith("lora_B.weight"))  # it trained
    for lrs in (r0["lrs"], r1["lrs"]):  # LoRA+ in every rank: B's initial lr 4x A's
        (a,), (b,) = lrs["A"], lrs["B"]
        assert b == pytest.approx(4 * a)
    run = tmp_path / "runs" / "ddp"  # one run folder, as Ultralytics' launcher gives every rank the same save_dir
    assert (run / "adapter.safetensors").is_file() and (run / "merged.pt").is_file()
    assert r0["writes"] == [] and r1["writes"] == []  # rank 1 wrote nothing there (rank 0 is not watched)


def test_two_ranks_train_rtdetr_the_same_adapter(tmp_path):
    """RT-DETR's trainer (its dataset, loss with denoising queries, validator) under the same two-rank loop."""
    base = rtdetr_base(tmp_path / "base.pt", {0: "x", 1: "y", 2: "z"})  # the data's 4 classes: class layers in full
    for p in run_ranks(tmp_path, base, kind="rtdetr"):
        assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for part in ("adapter", "ema", "full"):
        assert r0[part].keys() == r1[part].keys() and r0[part], part
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), part
    assert {k.rpartition(".")[0] for k in r0["full"]} == set(class_layers(load_model(base)))  # scores and embedding
    assert any(t.abs().max() > 0 for k, t in r0["adapter"].items() if k.endswith("lora_B.weight"))
    assert (tmp_path / "runs" / "ddp" / "merged.pt").is_file()


def test_nan_on_one_rank_stops_both_with_the_message(demo_base, tmp_path):
    procs = run_ranks(tmp_path, demo_base, nan_rank=1)  # rank 1's loss turns NaN in epoch 2; rank 0's never does
    for rank, p in enumerate(procs):
        assert p.returncode == 0, p.stderr[-3000:]  # each process caught the error and said it in rank{r}.err
        assert (
            "training diverged: the loss or the trained tensors became NaN/Inf in epoch 2"
            in (tmp_path / f"rank{rank}.err").read_text()
        )
