"""Frozen BatchNorm folded into its conv during training: the same outputs and adapter gradients, the same state,
fewer bytes saved for backward."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import head_output, random_adapter
from torch import nn

from lora_yolo import LoraConfig, LoraConv2d, load_model
from lora_yolo.fold import FoldedBatchNorm2d, FoldedConv2d, fold_batchnorm, unfold_batchnorm
from lora_yolo.inject import merge_lora

CONFIGS = {
    "lora": LoraConfig(use_dora=False),
    "dora": LoraConfig(use_dora=True),
    "dora, dropout": LoraConfig(use_dora=True, lora_dropout=0.2),  # the two-path form, masks drawn alike
    "neck_head": LoraConfig(use_dora=True, targets=["neck", "head"]),  # frozen plain convs folded too
}


def folded_pair(base_pt, config: LoraConfig):
    """(unfolded, folded) copies of one LoRA model with random B (and DoRA magnitudes); BatchNorms frozen, eval."""
    model, _ = random_adapter(base_pt, config)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) > 80
    return model, folded


def adapter_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of every adapter tensor for a loss on all raw outputs, in train mode with BatchNorm frozen (eval)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in the folded and the plain model
    out = model(x)  # Detect in train mode: {"boxes", "scores", "feats"}
    (out["boxes"].square().mean() + out["scores"].square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", CONFIGS)
def test_same_outputs_and_adapter_gradients(base_pt, kind):
    plain, folded = folded_pair(base_pt, CONFIGS[kind])
    x = torch.rand(2, 3, 96, 96)
    assert (head_output(folded, x) - head_output(plain, x)).abs().max() < 1e-5
    want, got = adapter_grads(plain, x), adapter_grads(folded, x)
    assert set(got) == set(want) and len(got) > 100
    for name in want:  # relative to the largest gradient of that tensor
        scale = want[name].abs().max().clamp_min(1e-12)
        assert (got[name] - want[name]).abs().max() / scale < 1e-4, name


def test_dropout_two_path_form_folds_too(base_pt):
    config = LoraConfig(use_dora=True, lora_dropout=0.1)
    plain, folded = folded_pair(base_pt, config)
    x = torch.rand(1, 3, 64, 64)
    assert (head_output(folded, x) - head_output(plain, x)).abs().max() < 1e-5  # eval: dropout off, two paths


def test_state_names_and_values_unchanged(base_pt):
    plain, folded = folded_pair(base_pt, CONFIGS["neck_head"])
    a, b = plain.state_dict(), folded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    kinds = {type(m) for m in folded.modules()}
    assert FoldedBatchNorm2d in kinds and FoldedConv2d in kinds and nn.BatchNorm2d not in kinds


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_each_conv_with_its_own_batchnorm(base_pt, how):
    """EMA deep-copies the model, checkpoints and DDP pickle it: each copy's convs apply the copy's BatchNorms."""
    _, folded = folded_pair(base_pt, CONFIGS["dora"])
    if how == "deepcopy":
        copied = copy.deepcopy(folded)
    else:
        buffer = io.BytesIO()
        torch.save(folded, buffer, pickle_module=pickle)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    bns = {id(m) for m in copied.modules() if isinstance(m, FoldedBatchNorm2d)}
    convs = [m for m in copied.modules() if isinstance(m, (FoldedConv2d, LoraConv2d)) and m._folded_bn is not None]
    assert len(convs) == len(bns) and {id(m._folded_bn) for m in convs} == bns
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(head_output(copied, x), head_output(folded, x))


def test_unfold_and_merge_give_plain_ultralytics_modules(base_pt):
    plain, folded = folded_pair(base_pt, CONFIGS["neck_head"])
    x = torch.rand(1, 3, 64, 64)
    expected = head_output(plain, x)
    unfolded = unfold_batchnorm(copy.deepcopy(folded))
    assert not any(type(m) in (FoldedBatchNorm2d, FoldedConv2d) for m in unfolded.modules())
    assert not any(m._folded_bn is not None for m in unfolded.modules() if isinstance(m, LoraConv2d))
    assert torch.equal(head_output(unfolded, x), head_output(plain, x))
    merged = merge_lora(folded)
    assert {type(m) for m in merged.modules()}.isdisjoint({FoldedBatchNorm2d, FoldedConv2d, LoraConv2d})
    assert (head_output(merged, x) - expected).abs().max() < 1e-4


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward over one forward: unique storages packed by saved_tensors_hooks."""
    seen = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_folding_saves_fewer_activation_bytes(base_pt):
    """Deterministic: the default recipe on yolo11n, 4 images at 256 px, keeps 0.745x the bytes (0.72x at 320 px,
    batch 8, where activations outweigh the weights more)."""
    plain, folded = folded_pair(base_pt, CONFIGS["dora"])
    x = torch.rand(4, 3, 256, 256)
    ratio = saved_bytes(folded, x) / saved_bytes(plain, x)
    assert ratio < 0.76, ratio


def test_training_model_is_folded_and_its_base_file_plain(base_pt, coco8, tmp_path):
    """The trainer folds every Conv block of yolo11n; a plain checkpoint written from it has no trace of it."""
    from lora_yolo.checkpoint import save_checkpoint
    from lora_yolo.inject import unload_lora
    from lora_yolo.trainer import LoraDetectionTrainer

    overrides = {"model": str(base_pt), "data": str(coco8), "project": str(tmp_path / "runs")}
    trainer = LoraDetectionTrainer(overrides=overrides, lora=LoraConfig())
    base = load_model(base_pt)
    model = trainer.get_model(cfg=base.yaml, weights=base)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in base.modules())
    assert sum(isinstance(m, FoldedBatchNorm2d) for m in model.modules()) == n_bn
    saved = load_model(save_checkpoint(unload_lora(copy.deepcopy(model)), tmp_path / "b.pt", train_args={}))
    assert sum(type(m) is nn.BatchNorm2d for m in saved.modules()) == n_bn
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(head_output(saved, x), head_output(base, x))


def test_adapters_from_a_later_layer_save_fewer_bytes(base_pt):
    """No adapter before layer 6: nothing before it needs a gradient, so backward keeps nothing there."""
    x = torch.rand(4, 3, 256, 256)
    saved = {}
    for first in (0, 6):
        model, _ = random_adapter(base_pt, LoraConfig(use_dora=True, first_layer=first))
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name)
        fold_batchnorm(model)
        saved[first] = saved_bytes(model, x)
    assert saved[6] / saved[0] < 0.85, saved


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_channels_last_training_form_is_the_same_function(base_pt, kind):
    # Ultralytics' trainer turns the model channels-last on CUDA (its default there), lora-yolo's also on an x86 CPU
    # (lora_yolo.trainer.channels_last_on_cpu), so the folded adapter layers must compute the same in that format.
    _, folded = folded_pair(base_pt, CONFIGS[kind])
    nhwc = copy.deepcopy(folded).to(memory_format=torch.channels_last)
    assert nhwc.model[0].conv.base_layer.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 96, 96)
    assert (head_output(nhwc, x.to(memory_format=torch.channels_last)) - head_output(folded, x)).abs().max() < 1e-5
    want, got = adapter_grads(folded, x), adapter_grads(nhwc, x.to(memory_format=torch.channels_last))
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-12)
        assert (got[name] - want[name]).abs().max() / scale < 1e-4, name
