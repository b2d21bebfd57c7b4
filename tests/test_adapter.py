"""Adapter file: bit-exact roundtrip, metadata, and refusal of a base it does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import head_output, make_base, random_adapter
from safetensors import safe_open

from lora_yolo import (
    LoraYoloError,
    attach_adapter,
    load_adapter,
    load_model,
    save_adapter,
)


def test_save_load_roundtrip_is_bit_exact(base_pt, tmp_path):
    _, adapter = random_adapter(base_pt)
    path = save_adapter(adapter, tmp_path / "a.safetensors", dtype=torch.float32)
    loaded = load_adapter(path)
    assert loaded.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    half = load_adapter(save_adapter(adapter, tmp_path / "h.safetensors"))  # the default: fp16, half the bytes
    assert all(torch.equal(half.tensors[k], adapter.tensors[k].half()) for k in adapter.tensors)
    assert loaded.layers == adapter.layers and loaded.base == adapter.base and loaded.config == adapter.config
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "lora-yolo-adapter" and json.loads(meta["base"])["arch"] == adapter.base["arch"]
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_a_tensor_fp16_cannot_hold_is_written_in_fp32(base_pt, tmp_path):
    # A train_head BatchNorm variance above fp16's 65504 would become inf in fp16: it stays fp32, the rest is fp16.
    from lora_yolo import LoraConfig

    _, adapter = random_adapter(base_pt, LoraConfig(train_head=True))
    var = next(k for k in adapter.full if k.endswith("running_var"))
    adapter.tensors[var] = adapter.tensors[var].clone().fill_(1e6)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes.pop(var) == "F32" and set(dtypes.values()) == {"F16"}
    assert torch.equal(load_adapter(path).tensors[var], adapter.tensors[var])


def test_attached_adapter_reproduces_the_trained_model(base_pt):
    model, adapter = random_adapter(base_pt)
    rebuilt = attach_adapter(load_model(base_pt), adapter)
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(head_output(rebuilt, x), head_output(model, x))


def test_adapter_for_other_architecture_is_refused(base_pt, tmp_path):
    _, adapter = random_adapter(base_pt)
    other = make_base(tmp_path / "yolo11s.pt", "yolo11s.yaml")
    with pytest.raises(LoraYoloError, match=rf"architecture {adapter.base['arch']}.*yolo11n.*yolo11s"):
        attach_adapter(load_model(other), adapter)


def test_adapter_for_other_weights_is_refused_unless_allowed(base_pt, tmp_path):
    _, adapter = random_adapter(base_pt)
    other = load_model(make_base(tmp_path / "other.pt", seed=1))
    with pytest.raises(LoraYoloError, match="other weights"):
        attach_adapter(other, adapter)
    with pytest.warns(UserWarning, match="applying it anyway"):
        assert attach_adapter(other, adapter, allow_other_weights=True) is not None


def test_inconsistent_file_is_refused(base_pt, tmp_path):
    from safetensors.torch import save_file

    _, adapter = random_adapter(base_pt)
    tensors = dict(adapter.tensors)
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=adapter.metadata())
    with pytest.raises(LoraYoloError, match="inconsistent"):
        load_adapter(tmp_path / "bad.safetensors")
