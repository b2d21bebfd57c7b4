"""Mixed precision on CPU: the LoRA and DoRA layers in the form the trainer runs them (BatchNorms folded, lean
activations) under torch.autocast, fp16 and bf16, with Ultralytics' loss at a gradient scaler's loss scales: outputs
close to fp32, gradients as finite as full fine-tuning's, lean activations bit-identical to plain ones, merges
exact."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPES_B1, head_output, image_batch, make_base
from torch import nn
from ultralytics.cfg import get_cfg

from lora_yolo import LoraConfig, load_model, merge_lora
from lora_yolo.fold import fold_batchnorm
from lora_yolo.inject import add_lora, set_trainable
from lora_yolo.memory import add_training_forward, remove_training_forward
from lora_yolo.targets import select_targets

IMGSZ = 160


@pytest.fixture(scope="module")
def batch() -> dict:
    """Two real images of domain B1 with 3 boxes each (random places and classes), as the loss reads a batch."""
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.rand(6, 2, generator=g) * 0.5 + 0.25, torch.rand(6, 2, generator=g) * 0.2 + 0.1], 1)
    return {
        "img": image_batch(SHAPES_B1, IMGSZ)[:2],
        "batch_idx": torch.tensor([0.0, 0, 0, 1, 1, 1]),
        "cls": torch.randint(0, 3, (6, 1), generator=g).float(),
        "bboxes": boxes,
    }


def training_model(base, kind: str, lean: bool = True) -> nn.Module:
    """The model as each recipe trains it: full (every tensor, BatchNorm in train mode) or adapters on every conv
    with the base frozen, BatchNorms folded and (`lean`) lean activations, as the trainer runs it (B random, as after
    some training, so every tensor has a gradient)."""
    torch.manual_seed(0)
    model = load_model(base)
    model.args = get_cfg()  # the loss reads Ultralytics' default hyper-parameters
    if kind == "full":
        model.requires_grad_(True)
    else:
        config = LoraConfig(use_dora=kind == "dora")
        add_lora(model, select_targets(model, config), use_dora=config.use_dora)
        set_trainable(model, {n for n, _ in model.named_parameters() if ".lora_" in n})
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B.weight"):
                    p.normal_(0, 0.01)
        fold_batchnorm(model)
        if lean:
            add_training_forward(model)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    return model


def autocast_gradients(model: nn.Module, batch: dict, scale: float, dtype: torch.dtype) -> list[torch.Tensor]:
    """Gradients of the trainable tensors after backward of loss * scale under autocast (Ultralytics' DFL conv,
    which never has one, left out)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        loss, _ = model.loss(batch)
    (loss.sum() * scale).backward()
    return [p.grad for p in model.parameters() if p.grad is not None]


def non_finite_share(model: nn.Module, batch: dict, scale: float, dtype: torch.dtype) -> float:
    """Share of trainable tensors whose gradient is not finite after backward of loss * scale under autocast."""
    grads = autocast_gradients(model, batch, scale, dtype)
    assert len(grads) > 100
    return sum(not torch.isfinite(g).all() for g in grads) / len(grads)


def test_adapter_gradients_are_as_finite_as_full_fine_tuning(demo_base, batch):
    # Measured (fp16, demo base, this batch): full fine-tuning's first non-finite gradient appears at scale 2**12;
    # LoRA and DoRA had 2 there (8 at 2**13, full 1) before their B A product was taken out of autocast, none
    # after. bf16 has fp32's range: nothing overflows even at GradScaler's starting scale 2**16.
    models = {kind: training_model(demo_base, kind) for kind in ("full", "lora", "dora")}
    for scale in (2.0**10, 2.0**12):
        full = non_finite_share(models["full"], batch, scale, torch.float16)
        for kind in ("lora", "dora"):
            share = non_finite_share(models[kind], batch, scale, torch.float16)
            assert share <= full and (share == 0.0 or scale > 2.0**10), (kind, scale, share, full)
    for kind in ("lora", "dora"):
        assert non_finite_share(models[kind], batch, 2.0**16, torch.bfloat16) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lean_activations_under_autocast_give_the_same_gradients(demo_base, batch, dtype):
    # the SiLU outputs are rebuilt in backward from their half-precision inputs by the same kernel: bit-identical
    lean, plain = (
        autocast_gradients(training_model(demo_base, "dora", lean), batch, 2.0**10, dtype) for lean in (1, 0)
    )
    assert len(lean) == len(plain) > 100 and all(torch.equal(a, b) for a, b in zip(lean, plain))


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo26n.yaml"])
def test_training_step_under_autocast_is_finite_and_close_to_fp32(cfg, batch, tmp_path):
    model = training_model(make_base(tmp_path / "base.pt", cfg), "dora")  # DoRA: LoRA's path plus its norm
    loss32, _ = model.loss(batch)
    assert non_finite_share(model, batch, 2.0**10, torch.float16) == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = model.loss(batch)
    assert torch.isfinite(loss16).all() and torch.allclose(loss16.float(), loss32, rtol=0.05), (loss16, loss32)


def test_adapter_trained_under_autocast_merges_exactly(demo_base, batch):
    model = training_model(demo_base, "dora")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.loss(batch)
        loss.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    x = batch["img"]
    unmerged = head_output(model, x)
    assert (unmerged - head_output(load_model(demo_base), x)).abs().max() > 1e-3  # the steps changed the model
    assert (head_output(merge_lora(remove_training_forward(model)), x) - unmerged).abs().max() < 1e-4
