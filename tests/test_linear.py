"""`LoraLinear`: the conv layer's math for `nn.Linear` (A (r, in), B (out, r)), checked against the closed form, its
own two-path form and PEFT's Linear LoRA / DoRA on the same tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_yolo.layer import LoraLinear, lora_param_count, max_rank

IN, OUT, R = 48, 20, 4


def trained(base: nn.Linear, seed: int = 0, **kwargs) -> LoraLinear:
    """A LoraLinear with random A, B (and DoRA magnitude), as after training."""
    layer = LoraLinear(base, r=R, lora_alpha=8, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(R, IN, generator=g) * 0.2)
        layer.lora_B.weight.copy_(torch.randn(OUT, R, generator=g) * 0.2)
        if layer.use_dora:
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(OUT, generator=g))
    return layer


@pytest.fixture
def base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fresh_adapter_is_the_base_exactly(base, dora):
    x = torch.randn(3, 7, IN)  # tokens (RT-DETR) as well as a batch of vectors (Classify)
    layer = LoraLinear(copy.deepcopy(base), r=R, lora_alpha=8, use_dora=dora)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A.weight.shape == (R, IN) and layer.lora_B.weight.shape == (OUT, R)  # PEFT's shapes


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_is_the_closed_form_and_equals_unmerged(base, dora):
    original = base.weight.detach().clone()
    layer = trained(base, use_dora=dora)
    a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    v = original + layer.scaling * b @ a  # computed here independently of the layer
    expected = v * (layer.lora_magnitude_vector.detach() / v.norm(dim=1)).view(-1, 1) if dora else v
    x = torch.randn(5, IN)
    with torch.no_grad():
        unmerged = layer(x)
        assert (unmerged - torch.nn.functional.linear(x, original, base.bias)).abs().max() > 1e-2  # it changes
        layer.merge()
        merged = layer(x)
    assert torch.allclose(base.weight, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(base.weight, original)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_two_path_form_gives_the_same_outputs_and_gradients(base, dora):
    """Dropout needs the form layer(x) + s B(A(x)); in eval (dropout off) it is the single-op form's function."""
    one = trained(copy.deepcopy(base), use_dora=dora)
    two = trained(copy.deepcopy(base), use_dora=dora, lora_dropout=0.1).eval()
    x = torch.randn(2, 6, IN)
    y1, y2 = one(x), two(x)
    assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    for name in ["lora_A.weight", "lora_B.weight", *(["lora_magnitude_vector"] if dora else [])]:
        g1, g2 = one.get_parameter(name).grad, two.get_parameter(name).grad
        assert g1.abs().max() > 0 and torch.allclose(g1, g2, rtol=1e-4, atol=1e-6 * g1.abs().max()), name


def test_param_count_and_rank_limit_are_the_closed_form(base):
    layer = LoraLinear(base, r=R, lora_alpha=8, use_dora=True)
    count = sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
    assert count == R * IN + OUT * R + OUT == lora_param_count(base, R, use_dora=True)
    assert max_rank(base) == min(OUT, IN)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_computes_the_same_with_our_tensors(base, dora):
    """PEFT's Linear LoRA (its scaling, DoRA and names) on the same module, given our tensors: the same outputs."""
    peft = pytest.importorskip("peft")
    ours = trained(copy.deepcopy(base), use_dora=dora)
    net = nn.Sequential()
    net.add_module("fc", copy.deepcopy(base))
    wrapped = peft.get_peft_model(
        net, peft.LoraConfig(r=R, lora_alpha=8, target_modules=["fc"], use_dora=dora, init_lora_weights=False)
    )
    state = {f"base_model.model.fc.{k}": v for k, v in ours.state_dict().items() if "lora_" in k}
    result = peft.set_peft_model_state_dict(wrapped, state)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    wrapped.eval()
    x = torch.randn(4, IN)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), ours(x), rtol=1e-5, atol=1e-5)
