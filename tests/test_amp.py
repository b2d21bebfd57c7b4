"""Mixed precision on CPU: the LoRA and DoRA layers in the form the trainer runs them (BatchNorms folded, lean
activations) under torch.autocast, fp16 and bf16, with Ultralytics' loss at a gradient scaler's loss scales: outputs
close to fp32, gradients as finite as full fine-tuning's, lean activations bit-identical to plain ones, merges
exact."""

from __future__ import annotations

import re

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


def layer_of(name: str) -> str:
    """The conv a trainable tensor belongs to, named alike for both recipes: full fine-tuning's `model.0.conv.weight`
    and `model.0.bn.bias` and the adapter's `model.0.conv.lora_A.weight` are all layer `model.0`."""
    name = re.sub(r"\.(lora_\w+)(\.weight)?$", "", name)
    name = re.sub(r"\.(bn\.)?(weight|bias)$", "", name)
    return re.sub(r"\.conv$", "", name)


def non_finite_layers(model: nn.Module, batch: dict, scale: float, dtype: torch.dtype) -> tuple[set, set]:
    """(layers with a trainable tensor, those with a non-finite gradient) after backward of loss * scale."""
    autocast_gradients(model, batch, scale, dtype)
    layers, bad = set(), set()
    for name, p in model.named_parameters():
        if p.grad is not None:
            layers.add(layer_of(name))
            if not torch.isfinite(p.grad).all():
                bad.add(layer_of(name))
    return layers, bad


def test_adapter_gradients_are_as_finite_as_full_fine_tuning(demo_base, batch):
    # Compared layer by layer over the same convs: a share of tensors would weigh full fine-tuning's BatchNorm tensors
    # and the 10 convs the adapters leave alone (Detect's 6 depthwise class-branch convs and 3 class convs, C2PSA's
    # `pe`) against the adapters' A, B and magnitudes. Measured (fp16, demo base, this batch; of the 77 adapted
    # convs): full fine-tuning 0 / 0 / 1 / 58 / 59 at scale 2**10 / 2**12 / 2**13 / 2**14 / 2**16, LoRA and DoRA
    # 0 / 0 / 0 / 55 / 58, each inside full fine-tuning's set: from 2**14 the activations' own fp16 gradients
    # overflow, for both recipes alike. Before the adapters' B A was taken out of autocast, LoRA and DoRA had 2 at
    # 2**12 and 8 at 2**13, where full fine-tuning had 0 and 1. bf16 has fp32's range: nothing overflows even at
    # GradScaler's starting scale 2**16.
    models = {kind: training_model(demo_base, kind) for kind in ("full", "lora", "dora")}
    for scale in (2.0**13, 2.0**14, 2.0**16):
        _, full = non_finite_layers(models["full"], batch, scale, torch.float16)
        for kind in ("lora", "dora"):
            layers, bad = non_finite_layers(models[kind], batch, scale, torch.float16)
            assert len(layers) == 77, len(layers)
            assert bad <= full, (kind, scale, sorted(bad - full))  # 2**13 tells: fp16 B A had 8 there, full 1
            assert bad or scale < 2.0**14, (kind, scale)  # the overflow this measures still happens
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


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_one_adapted_conv_under_autocast_at_gradscalers_scale(use_dora, monkeypatch):
    # One Ultralytics Conv block as the trainer runs it (adapter beside the conv, frozen BatchNorm folded), fp16
    # and bf16 autocast against fp32, backward at GradScaler's starting scale 2**16. Tolerance: the half-precision
    # conv rounds inputs and weights to 11 (fp16) or 8 (bf16) mantissa bits, so within 1% / 4% of the output's
    # largest magnitude.
    from ultralytics.nn.modules import Conv

    from lora_yolo import layer
    from lora_yolo.layer import LoraConv2d

    torch.manual_seed(0)
    block = Conv(16, 32, 3).eval()
    with torch.no_grad():
        block.bn.running_mean.normal_(0, 0.1), block.bn.running_var.uniform_(0.5, 2.0)
    block.requires_grad_(False)
    block.conv = LoraConv2d(block.conv, r=8, lora_alpha=16, use_dora=use_dora)
    with torch.no_grad():
        block.conv.lora_B.weight.normal_(0, 0.05)  # as after some training
    fold_batchnorm(block)
    x = torch.randn(2, 16, 20, 20)
    want = block(x)
    norms = []  # dtypes DoRA's channel norm is taken in
    monkeypatch.setattr(layer, "channel_norm", lambda w: norms.append(w.dtype) or w.flatten(1).norm(dim=1))
    for dtype, tol in ((torch.float16, 0.01), (torch.bfloat16, 0.04)):
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            y = block(x)
        assert y.dtype == dtype and (y.float() - want).abs().max() <= tol * want.abs().max(), dtype
        (y.float().square().mean() * 2.0**16).backward()
        grads = [p.grad for p in block.parameters() if p.requires_grad]
        assert len(grads) == 2 + use_dora and all(g is not None and torch.isfinite(g).all() for g in grads), dtype
    assert norms == ([torch.float32] * 2 if use_dora else [])
