"""DoRA and LoRA+: DoRA's exact merge into a plain conv, its closed-form size, and LoRA+'s optimizer groups."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SHAPES_B1, head_output, random_adapter
from test_layer import KINDS, randomize, yolo11n  # noqa: F401  (yolo11n is a fixture)
from torch import nn

from lora_yolo import LoraConfig, LoraConv2d, LoraYoloError, add_lora, attach_adapter, load_model, select_targets
from lora_yolo.adapter import load_adapter, save_adapter
from lora_yolo.layer import channel_norm, lora_param_count


def dora_layer(conv: nn.Conv2d, seed: int = 0, **kwargs) -> LoraConv2d:
    """A DoRA layer with random A, B and magnitude, as after training."""
    layer = LoraConv2d(conv, r=4, lora_alpha=8, use_dora=True, **kwargs)
    randomize(layer, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(conv.out_channels, generator=g))
    return layer


def test_fresh_dora_is_identity(yolo11n):  # noqa: F811
    x = torch.rand(2, 3, 64, 64)
    model = add_lora(copy.deepcopy(yolo11n), select_targets(yolo11n, LoraConfig()), use_dora=True)
    assert torch.equal(head_output(model, x), head_output(yolo11n, x))  # m = ||W||_c, so m / ||W||_c is exactly 1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_dora_merges_exactly_into_a_plain_conv(yolo11n, kind):  # noqa: F811
    conv = copy.deepcopy(yolo11n.get_submodule(KINDS[kind]))
    original = conv.weight.detach().clone()
    layer = dora_layer(conv)
    m = layer.lora_magnitude_vector.detach()
    # The closed form, computed here independently: W' = m * (W + s B A) / ||W + s B A||_c.
    v = original + layer.scaling * (layer.lora_B.weight.flatten(1) @ layer.lora_A.weight.flatten(1)).view_as(original)
    expected = v * (m / v.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    x = torch.randn(2, conv.in_channels, 16, 16)
    with torch.no_grad():
        unmerged = layer(x)
        assert (unmerged - conv(x)).abs().max() > 1e-3
        layer.merge()
        merged, plain = layer(x), conv(x)
    assert torch.allclose(conv.weight, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(channel_norm(conv.weight), m, rtol=1e-5)  # every filter's norm is its magnitude
    assert torch.allclose(merged, unmerged, rtol=1e-6, atol=1e-5)
    assert torch.allclose(plain, unmerged, rtol=1e-6, atol=1e-5)
    layer.unmerge()
    assert torch.equal(conv.weight, original)  # the original weight comes back bit-exactly


def test_dora_dropout_form_matches_single_conv_form_and_bias_is_not_rescaled():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=True)
    plain = dora_layer(conv)
    dropped = LoraConv2d(copy.deepcopy(conv), r=4, lora_alpha=8, lora_dropout=0.5, use_dora=True)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(dropped.eval()(x), plain.eval()(x), rtol=1e-6, atol=1e-5)
        plain.merge()
    assert torch.equal(conv.bias, dropped.base_layer.bias)


def test_dora_magnitude_and_b_get_gradients_at_init():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    layer = LoraConv2d(conv, r=2, lora_alpha=4, use_dora=True)
    conv.weight.requires_grad_(False)
    layer(torch.randn(2, 8, 8, 8)).square().sum().backward()
    assert layer.lora_magnitude_vector.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0
    assert layer.lora_A.weight.grad.abs().sum() == 0  # B = 0 at init, as in plain LoRA


def dora_grads_closed_form(layer: LoraConv2d, g: torch.Tensor, norm_is_constant: bool):
    """Gradients of A, B and m for a loss whose gradient with respect to DoRA's weight W' is `g`, by hand.

    W' = m / n * V with V = W + s B A and n = ||V||_c. With n a constant, dL/dV = m / n * g; with n a function of V
    (no detach), the radial part of each channel's gradient is removed: dL/dV = m / n * (g - v (v . g)), v = V / n.
    Then dL/dB = s * dL/dV A^T, dL/dA = s * B^T dL/dV, and in both cases dL/dm = (g . V) / n per channel.
    """
    a, b = layer.lora_A.weight.detach().flatten(1), layer.lora_B.weight.detach().flatten(1)
    m, s = layer.lora_magnitude_vector.detach(), layer.scaling
    v = layer.base_layer.weight.detach().flatten(1) + s * b @ a
    n = v.norm(dim=1, keepdim=True)
    g = g.flatten(1)
    dv = m[:, None] / n * (g if norm_is_constant else g - v / n * (v / n * g).sum(1, keepdim=True))
    return (
        (s * b.T @ dv).view_as(layer.lora_A.weight),
        (s * dv @ a.T).view_as(layer.lora_B.weight),
        (g * v).sum(1) / n[:, 0],
    )


@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["single-conv", "two-path"])
def test_dora_norm_is_a_constant_in_backward(dropout):
    """The gradients of A, B and m are those of DoRA with ||W + s B A||_c held constant (the paper, section 4.3),
    not those of the full derivative: checked in float64 against the closed form, for both forward forms."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True, dtype=torch.float64)
    layer = dora_layer(conv, lora_dropout=dropout).eval()  # eval: dropout off, but the two-path form still runs
    assert isinstance(layer.lora_dropout, nn.Dropout) == (dropout > 0)
    conv.requires_grad_(False)
    x, target = torch.randn(2, 8, 8, 8, dtype=torch.float64), torch.randn(2, 16, 8, 8, dtype=torch.float64)
    (layer(x) * target).sum().backward()
    # g = dL/dW', from a plain conv with DoRA's weight as a leaf: the loss is linear in y, so this is exact.
    w = layer.adapted_weight().to(torch.float64).detach().requires_grad_()
    (conv._conv_forward(x, w, conv.bias) * target).sum().backward()
    got = (layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.lora_magnitude_vector.grad)
    constant = dora_grads_closed_form(layer, w.grad, norm_is_constant=True)
    full = dora_grads_closed_form(layer, w.grad, norm_is_constant=False)
    for name, grad, want, other in zip(("A", "B", "m"), got, constant, full):
        if name != "m":  # the norm does not depend on m: only A's and B's gradients tell the two apart
            assert (want - other).norm() > 0.05 * want.norm(), name  # the check below can tell them apart
        ok = torch.allclose(grad, want, rtol=1e-9, atol=1e-12)
        assert ok, (
            f"d loss / d {name} is not DoRA's with a constant norm: off by {(grad - want).abs().max():.3g} from it, "
            f"{(grad - other).abs().max():.3g} from the gradient through the norm (is the norm still detached?)"
        )


@pytest.mark.parametrize("cin,cout,k", [(16, 32, 1), (16, 32, 3), (3, 16, 5)])
def test_dora_param_count_is_lora_plus_one_per_output_channel(cin, cout, k):
    layer = LoraConv2d(nn.Conv2d(cin, cout, k, bias=False), r=4, lora_alpha=8, use_dora=True)
    count = sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
    assert count == 4 * cin * k * k + cout * 4 + cout == lora_param_count(layer.base_layer, 4, use_dora=True)


def test_dora_adapter_roundtrip_and_checks(base_pt, tmp_path):
    model, adapter = random_adapter(base_pt, LoraConfig(use_dora=True))
    path = save_adapter(adapter, tmp_path / "dora.safetensors", dtype=torch.float32)
    loaded = load_adapter(path)
    assert loaded.config.use_dora and sum(k.endswith(".lora_magnitude_vector") for k in loaded.tensors) == len(
        loaded.layers
    )
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(head_output(attach_adapter(load_model(base_pt), loaded), x), head_output(model, x))
    name = next(k for k in loaded.tensors if k.endswith(".lora_magnitude_vector"))
    loaded.tensors[name] = loaded.tensors[name][:-1]
    save_adapter(loaded, tmp_path / "bad.safetensors")
    with pytest.raises(LoraYoloError, match="magnitude"):
        load_adapter(tmp_path / "bad.safetensors")


def test_loraplus_and_dora_optimizer_groups(base_pt, tmp_path):
    """B at ratio x lr, A and everything else at lr, DoRA magnitudes without weight decay; every tensor once."""
    from lora_yolo.trainer import LoraDetectionTrainer, trainable_names

    config = LoraConfig(use_dora=True, loraplus_lr_ratio=16)
    trainer = LoraDetectionTrainer(
        overrides={"model": str(base_pt), "data": str(SHAPES_B1), "project": str(tmp_path)}, lora=config
    )
    model, _ = random_adapter(base_pt, config)
    model.lora_meta = {"full": [], "config": config.to_dict()}  # as the trainer sets it on the models it builds
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable_names(model))
    optimizer = trainer.build_optimizer(model, name="AdamW", lr=0.01, momentum=0.9, decay=5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())
    for group in optimizer.param_groups:
        kinds = {names[id(p)].rpartition(".lora_")[2] for p in group["params"]}  # A.weight, B.weight, ...
        if "B.weight" in kinds:
            assert kinds == {"B.weight"} and group["lr"] == pytest.approx(0.16)
        else:
            assert group["lr"] == 0.01
        if "magnitude_vector" in kinds:
            assert kinds == {"magnitude_vector"} and group["weight_decay"] == 0.0
    assert any("A.weight" in names[id(p)] for g in optimizer.param_groups if g["lr"] == 0.01 for p in g["params"])
