"""train_bias: the BatchNorm shift after each adapted conv trains with its adapter; the statistics stay the base's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import DEMO_BASE, TINY, head_output, random_adapter, save_base, saved_merged_attached
from torch import nn
from ultralytics.nn.modules import Conv

from lora_yolo import LoraConfig, LoraYoloError, attach_adapter, load_adapter, load_model, save_adapter
from lora_yolo.targets import bias_tensors, select_targets
from lora_yolo.train import train

ROOT = Path(__file__).resolve().parents[1]
B2 = ROOT / "datasets" / "shapes-b2" / "data.yaml"  # star, cross, ring, diamond: the demo base's 3 classes replaced
X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
CONFIG = LoraConfig(use_dora=True, train_head=True, train_bias=True, clamp_rank=True)  # the default's form


def test_the_shift_of_every_adapted_conv_block_and_nothing_else(base_pt):
    model = load_model(base_pt)
    modules = dict(model.named_modules())
    plan = select_targets(model, CONFIG)
    keys = bias_tensors(modules, plan)
    blocks = [n for n in plan if n.endswith(".conv") and isinstance(modules[n.removesuffix(".conv")], Conv)]
    assert keys == [f"{n.removesuffix('.conv')}.bn.bias" for n in blocks] and len(keys) > 50
    assert all(isinstance(modules[k.removesuffix(".bias")], nn.BatchNorm2d) for k in keys)
    assert not any(k.startswith(f"model.{len(model.model) - 1}.") for k in keys)  # the head: trained in full
    frozen = [n for n in plan if n not in blocks]  # adapted convs outside a Conv block keep their own bias
    assert bias_tensors(modules, frozen) == []
    assert bias_tensors(modules, ["model.2.cv1.conv"]) == ["model.2.cv1.bn.bias"]
    assert bias_tensors(modules, ["model.2.cv1.bn"]) == []  # only a block's conv has the block's shift


@pytest.fixture(scope="module")
def shifted_base(base_pt, tmp_path_factory):
    """base_pt with every BatchNorm's shift and scale away from a fresh model's 0 and 1, as in a trained checkpoint:
    serving adds (trained - base) shift to the fused bias, which a base shift of 0 would not check."""
    model = load_model(base_pt)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
    return save_base(model, tmp_path_factory.mktemp("shifted") / "base.pt")


@pytest.fixture(scope="module")
def bias_adapter(shifted_base):
    return random_adapter(shifted_base, CONFIG, names={0: "disc", 1: "ring"}, scale=0.2)


def test_attached_merged_and_served_agree_and_the_shift_counts(shifted_base, bias_adapter, tmp_path):
    from lora_yolo.serve import AdapterModel

    trained, adapter = bias_adapter
    path, merged = saved_merged_attached(shifted_base, trained, adapter, tmp_path, X)
    want = head_output(trained, X)
    served = AdapterModel(shifted_base)
    served.set_adapter(served.load_adapter(path))
    got = head_output(served.model, X)
    assert (got - head_output(merged, X)).abs().max() < 1e-4  # fused vs unfused rounding only
    served.merge_adapter()
    assert (head_output(served.model, X) - got).abs().max() < 1e-5
    # the shifts matter: without them (the base's) the output is far from the adapter's
    base = load_model(shifted_base).state_dict()
    keys = bias_tensors(dict(load_model(shifted_base).named_modules()), adapter.layers)
    unshifted = dataclasses.replace(adapter, tensors={**adapter.tensors, **{k: base[k] for k in keys}})
    assert (head_output(attach_adapter(load_model(shifted_base), unshifted), X) - want).abs().max() > 1e-2
    state = merged.state_dict()  # merged: the shifts are the adapter's, every statistic the base's
    assert all(torch.allclose(state[k], adapter.tensors[k].float(), atol=1e-3) for k in keys)
    assert all(torch.equal(state[k], base[k]) for k in base if "running_" in k and not k.startswith("model.23."))
    # a file without some shifts (not one training writes): the base's, wherever it is used
    kept = {k: v for k, v in adapter.tensors.items() if k != keys[0]}
    partial = dataclasses.replace(adapter, tensors=kept, full=[k for k in adapter.full if k != keys[0]])
    served.load_adapter(partial, "partial")
    served.set_adapter("partial")
    want = head_output(attach_adapter(load_model(shifted_base), partial), X)
    assert (head_output(served.model, X) - want).abs().max() < 1e-4
    # cast before loading: the adapter's shifts (fp32) follow the fused bias's dtype, and a train_head adapter's head
    # (built in fp32 when it is loaded) the model's dtype
    for head in False, True:
        trained, adapter = random_adapter(shifted_base, LoraConfig(use_dora=True, train_bias=True, train_head=head))
        cast = AdapterModel(shifted_base)
        cast.model.to(torch.bfloat16)
        cast.set_adapter(cast.load_adapter(adapter))
        want = head_output(trained, X)
        assert (head_output(cast.model, X.bfloat16()).float() - want).abs().max() < 0.05 * want.abs().max()


def test_crafted_shifts_are_refused_in_one_line(shifted_base, bias_adapter):
    _, adapter = bias_adapter
    base = load_model(shifted_base)
    key = next(k for k in adapter.full if k.endswith(".bn.bias") and not k.startswith("model.23."))
    layer = f"{key.removesuffix('.bn.bias')}.conv"
    bad_shape = dataclasses.replace(adapter, tensors={**adapter.tensors, key: torch.ones(3)})
    with pytest.raises(LoraYoloError, match=f"adapter tensor {key} \\(3,\\) does not fit the base"):
        attach_adapter(base, bad_shape)
    unadapted = dataclasses.replace(
        adapter,
        layers={k: v for k, v in adapter.layers.items() if k != layer},
        tensors={k: v for k, v in adapter.tensors.items() if not k.startswith(f"{layer}.")},
    )
    with pytest.raises(LoraYoloError, match=f"adapter tensor {key} is trained in full, but only .*\\(train_bias\\)"):
        attach_adapter(base, unadapted)  # a shift without its conv's adapter
    off = dataclasses.replace(adapter, config=dataclasses.replace(adapter.config, train_bias=False))
    with pytest.raises(LoraYoloError, match=f"adapter tensor {key} is trained in full, but only the task head"):
        attach_adapter(base, off)


def test_inspect_counts_the_shifts_and_sizes_the_file_exactly(base_pt, tmp_path):
    from lora_yolo.inspect import inspect_model

    report = inspect_model(base_pt, CONFIG)
    model = load_model(base_pt)
    keys = bias_tensors(dict(model.named_modules()), select_targets(model, CONFIG))
    assert report.bias_params == sum(model.get_parameter(k).numel() for k in keys) > 0
    assert "(train_bias)" in report.table()
    _, adapter = random_adapter(base_pt, CONFIG)
    assert report.adapter_bytes == save_adapter(adapter, tmp_path / "a.safetensors").stat().st_size


@pytest.mark.slow
def test_training_moves_the_shifts_and_keeps_the_statistics(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, train_head=True, train_bias=True)
    result = train(B2, model=DEMO_BASE, config=config, project=str(tmp_path), name="t", **{**TINY, "fraction": 0.5})
    adapter = load_adapter(result.adapter)
    base = load_model(DEMO_BASE)
    keys = bias_tensors(dict(base.named_modules()), adapter.layers)
    assert keys and set(keys) <= set(adapter.full)
    state, merged = base.state_dict(), load_model(result.merged).state_dict()
    moved = [k for k in keys if not torch.equal(adapter.tensors[k].float(), state[k])]
    assert len(moved) == len(keys)  # every shift had a gradient through its folded BatchNorm
    # the statistics after the adapted convs stayed the base's (eval mode), so the merged model is what was trained
    assert all(torch.equal(merged[k], state[k]) for k in state if "running_" in k and not k.startswith("model.23."))
    assert all(torch.allclose(merged[k], adapter.tensors[k].float(), atol=1e-3) for k in keys)
    params = sum(p.numel() for n, p in base.named_parameters() if n in set(keys))
    assert result.trainable >= params + sum(t.numel() for k, t in adapter.tensors.items() if ".lora_" in k)
    attached = attach_adapter(base, adapter)
    assert (head_output(load_model(result.merged), X) - head_output(attached, X)).abs().max() < 1e-3
