"""LoraConv2d math: identity at init, exact merge and unmerge for every conv kind in yolo11n, closed-form sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import head_output
from torch import nn

from lora_yolo import LoraConfig, LoraConv2d, LoraYoloError, add_lora, load_model, merge_lora, select_targets
from lora_yolo.layer import lora_param_count


def randomize(layer: LoraConv2d, seed: int = 0) -> None:
    """Non-zero A and B, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def yolo11n():
    torch.manual_seed(0)
    return load_model("yolo11n.yaml").eval()


# One conv of each kind found in yolo11n: 1x1, 3x3, stride 2, attention qkv / proj, Detect's 1x1 with bias.
KINDS = {
    "pointwise": "model.13.cv1.conv",
    "kxk": "model.13.m.0.cv1.conv",
    "strided": "model.17.conv",
    "attention_qkv": "model.10.m.0.attn.qkv.conv",
    "attention_proj": "model.10.m.0.attn.proj.conv",
    "detect_bias": "model.23.cv3.0.2",
}


def test_fresh_adapter_is_identity(yolo11n):
    x = torch.rand(2, 3, 64, 64)
    before = head_output(yolo11n, x)
    model = add_lora(copy.deepcopy(yolo11n), select_targets(yolo11n, LoraConfig(targets=["all"])))
    assert len([m for m in model.modules() if isinstance(m, LoraConv2d)]) > 60
    assert torch.equal(head_output(model, x), before)  # B = 0, so the output is bit-identical


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_merge_matches_unmerged(yolo11n, kind):
    conv = copy.deepcopy(yolo11n.get_submodule(KINDS[kind]))
    layer = LoraConv2d(conv, r=4, lora_alpha=8)
    randomize(layer)
    original = conv.weight.detach().clone()
    x = torch.randn(2, conv.in_channels, 16, 16)
    with torch.no_grad():
        unmerged = layer(x)
        assert (unmerged - conv(x)).abs().max() > 1e-3  # the adapter really changes the output
        layer.merge()
        merged = layer(x)
        plain = conv(x)  # the base conv alone now carries the update
        layer.unmerge()
    # 1e-5 absolute plus fp32 rounding of the output's own magnitude (Detect's class biases sit near -11).
    assert torch.allclose(merged, unmerged, rtol=1e-6, atol=1e-5)
    assert torch.allclose(plain, unmerged, rtol=1e-6, atol=1e-5)
    assert torch.equal(conv.weight, original)  # unmerge puts the kept original back bit-exactly


def test_whole_model_merge_gives_plain_convs_and_same_outputs(yolo11n):
    model = add_lora(copy.deepcopy(yolo11n), select_targets(yolo11n, LoraConfig()))
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, LoraConv2d)):
        randomize(layer, seed=i)
    x = torch.rand(1, 3, 64, 64)
    unmerged = head_output(model, x)
    merge_lora(model)
    assert not any(isinstance(m, LoraConv2d) for m in model.modules())
    assert all(type(m) is nn.Conv2d for n, m in model.named_modules() if n.endswith(".conv"))
    assert (head_output(model, x) - unmerged).abs().max() < 1e-4
    fused = copy.deepcopy(model).fuse(verbose=False)  # Ultralytics' conv+BN fusion works on the merged model
    assert (head_output(fused, x) - head_output(model, x)).abs().max() < 1e-4


def test_merge_is_done_in_fp32_for_fp16_weights():
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False).half()
    layer = LoraConv2d(conv, r=2, lora_alpha=4)
    randomize(layer)
    expected = conv.weight.float() + layer.delta_weight()
    layer.merge()
    assert conv.weight.dtype == torch.float16
    assert torch.equal(conv.weight, expected.half())  # one rounding, from the exact fp32 sum


def test_merge_refuses_non_finite():
    layer = LoraConv2d(nn.Conv2d(4, 4, 1, bias=False), r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
        layer.lora_A.weight.fill_(1.0)
    with pytest.raises(LoraYoloError, match="non-finite"):
        layer.merge()


@pytest.mark.parametrize("shape", [(16, 32, 1, 1), (16, 32, 3, 1), (64, 16, 3, 2), (3, 16, 5, 1)])
def test_param_count_matches_closed_form(shape):
    cin, cout, k, s = shape
    r = 4
    layer = LoraConv2d(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), r=r, lora_alpha=8)
    count = sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
    assert count == r * cin * k * k + cout * r == lora_param_count(layer.base_layer, r)


def test_rslora_scaling():
    layer = LoraConv2d(nn.Conv2d(8, 8, 1), r=16, lora_alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / 4)


def test_grouped_conv_is_refused_by_the_layer():
    with pytest.raises(LoraYoloError, match="groups"):
        LoraConv2d(nn.Conv2d(8, 8, 3, groups=8), r=2, lora_alpha=2)


def test_injected_model_survives_deepcopy_save_half(yolo11n, tmp_path):
    model = add_lora(copy.deepcopy(yolo11n), select_targets(yolo11n, LoraConfig()))
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, LoraConv2d)):
        randomize(layer, seed=i)
    x = torch.rand(1, 3, 64, 64)
    expected = head_output(model, x)
    assert torch.equal(head_output(copy.deepcopy(model), x), expected)
    torch.save(model, tmp_path / "whole.pt")  # Ultralytics pickles whole modules in its checkpoints
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(head_output(loaded, x), expected)
    half = copy.deepcopy(model).half()
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert (head_output(half.float(), x) - expected).abs().max() < 0.05  # only fp16 rounding of the weights


def test_dropout_two_path_form_matches_the_single_conv_form():
    """With dropout the adapter runs as a second conv path; in eval (dropout off) it equals the one-conv form."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
    plain, dropped = (
        LoraConv2d(conv, r=4, lora_alpha=8),
        LoraConv2d(copy.deepcopy(conv), r=4, lora_alpha=8, lora_dropout=0.5),
    )
    randomize(plain)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(dropped.eval()(x), plain.eval()(x), rtol=1e-6, atol=1e-5)
        assert not torch.allclose(dropped.train()(x), plain(x), atol=1e-3)  # dropout acts in training
