"""train_head: the task head trains in full (BatchNorm statistics included), adapters everywhere else."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import DEMO_BASE, TINY, head_output, random_adapter, saved_merged_attached
from torch import nn
from ultralytics.nn.modules import DFL

from lora_yolo import LoraConfig, LoraYoloError, attach_adapter, load_adapter, load_model, save_adapter
from lora_yolo.presets import resolve_config
from lora_yolo.targets import describe_convs, head_tensors
from lora_yolo.train import train

ROOT = Path(__file__).resolve().parents[1]
B2 = ROOT / "datasets" / "shapes-b2" / "data.yaml"  # star, cross, ring, diamond: the demo base's 3 classes replaced
NEW = {0: "disc", 1: "ring", 2: "cross", 3: "star"}
X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["train_head", "train_bias"])
def test_config_checks_and_add_classes(tmp_path, name):
    # both keep something add_classes needs as the base's: its head, the shifts its class branches read
    with pytest.raises(LoraYoloError, match=f"{name} must be true or false"):
        LoraConfig(**{name: "yes"})
    with pytest.raises(LoraYoloError, match=f"{name} and add_classes exclude each other"):
        LoraConfig(**{name: True, "add_classes": "exact"})
    assert name not in LoraConfig().to_dict()  # older lora-yolo versions still read such adapters
    assert getattr(LoraConfig.from_dict(LoraConfig(**{name: True}).to_dict()), name) is True
    preset = tmp_path / "p.yaml"
    preset.write_text(f"{name}: true\n")
    assert getattr(resolve_config(str(preset))[0], name) is True
    assert getattr(resolve_config(str(preset), add_classes="adapted")[0], name) is False  # the preset's: not applied
    with pytest.raises(LoraYoloError, match="exclude each other"):
        resolve_config(str(preset), add_classes="adapted", **{name: True})  # asked for both: refused
    preset.write_text(f"{name}: true\nadd_classes: adapted\n")
    with pytest.raises(LoraYoloError, match="exclude each other"):
        resolve_config(str(preset))  # a preset holding both: refused, not one of them dropped


def test_head_gets_no_adapter_and_every_head_tensor_but_dfl_trains(base_pt):
    model = load_model(base_pt)
    head = f"model.{len(model.model) - 1}."
    rows = describe_convs(model, LoraConfig(train_head=True))
    in_head = [r for r in rows if r.name.startswith(head)]
    assert in_head and not any(r.selected for r in in_head)
    dfl = [n for n, m in model.named_modules() if isinstance(m, DFL)]
    assert {r.reason for r in in_head if not r.name.startswith(dfl[0])} == {"task head trained in full (train_head)"}
    assert any(r.selected for r in rows if not r.name.startswith(head))  # adapters everywhere else
    names = head_tensors(model)
    norms = [n for n, m in model.model[-1].named_modules() if isinstance(m, nn.BatchNorm2d)]
    trained = [n for n, p in model.model[-1].named_parameters() if not n.startswith("dfl.")]
    assert len(names) == len(trained) + 2 * len(norms)  # parameters, and each BatchNorm's mean and variance
    assert not any(n.startswith(f"{dfl[0]}.") or n.endswith("num_batches_tracked") for n in names)


def test_fixed_buffers_of_a_head_stay_the_bases(tmp_path):
    # YOLO26 pose's flow (its loss) holds constant buffers beside its layers: only parameters and BatchNorm statistics
    # are trained, so only they are stored
    from conftest import make_base

    model = load_model(make_base(tmp_path / "pose.pt", "yolo26n-pose.yaml"))
    names = set(head_tensors(model))
    buffers = {n for n, _ in model.model[-1].named_buffers(prefix=f"model.{len(model.model) - 1}")}
    stats = {n for n in buffers if n.endswith((".running_mean", ".running_var"))}
    assert buffers - stats - {n for n in buffers if n.endswith("num_batches_tracked")}  # the flow's constants
    assert names & buffers == stats


@pytest.fixture(scope="module")
def head_adapter(base_pt):
    return random_adapter(base_pt, LoraConfig(use_dora=True, train_head=True), names=NEW, scale=0.2)


def test_attached_equals_merged_and_the_base_is_untouched(base_pt, head_adapter, tmp_path):
    trained, adapter = head_adapter
    before = hashlib.sha256(Path(base_pt).read_bytes()).hexdigest()
    _, merged = saved_merged_attached(base_pt, trained, adapter, tmp_path, X)
    base = load_model(base_pt).state_dict()
    state = merged.state_dict()
    var = next(k for k in adapter.full if k.endswith("running_var"))
    assert not torch.equal(state[var], base[var])  # the head's statistics are the adapter's
    assert all(torch.equal(state[k], base[k]) for k in base if not k.startswith("model.23.") and "bn." in k)
    assert hashlib.sha256(Path(base_pt).read_bytes()).hexdigest() == before


def crafted(adapter, **change):
    tensors = dict(adapter.tensors)
    full = list(adapter.full)
    for key, value in change.items():
        key = key.replace("__", ".")
        if key not in full:
            full.append(key)
        tensors[key] = value
    return dataclasses.replace(adapter, tensors=tensors, full=full)


def test_crafted_head_tensors_are_refused_in_one_line(base_pt, head_adapter):
    _, adapter = head_adapter
    base = load_model(base_pt)
    var = next(k for k in adapter.full if k.endswith("running_var"))
    cases = {
        "holds a negative variance": crafted(adapter, **{var: -adapter.tensors[var]}),
        "no trained tensor of the base's head": crafted(
            adapter, **{"model.23.dfl.conv.weight": torch.ones(1, 16, 1, 1)}
        ),
        "does not fit the base": crafted(adapter, **{var: torch.ones(3)}),
        "only the task head \\(train_head\\) can be": crafted(
            adapter, **{"model.10.cv1.bn.running_var": torch.ones(64)}
        ),
    }
    for message, bad in cases.items():
        with pytest.raises(LoraYoloError, match=message):
            attach_adapter(base, bad)
    plain = dataclasses.replace(adapter, config=dataclasses.replace(adapter.config, train_head=False))
    with pytest.raises(LoraYoloError, match="only the class layers can be"):
        attach_adapter(base, plain)
    _, lora = random_adapter(base_pt, LoraConfig(use_dora=True, targets=["head"]))  # serving would drop these
    conv = next(iter(lora.layers))
    inside = {k: v for k, v in lora.tensors.items() if k.startswith(f"{conv}.")}
    headed = dataclasses.replace(adapter, tensors={**adapter.tensors, **inside}, layers={conv: lora.layers[conv]})
    with pytest.raises(LoraYoloError, match=f"adapter layer {conv} is in the task head, which train_head trains"):
        attach_adapter(base, headed)


def test_a_weighted_merge_that_makes_a_variance_negative_is_refused(base_pt, head_adapter, tmp_path):
    from lora_yolo.merge import merge_files

    _, adapter = head_adapter
    base = load_model(base_pt).state_dict()
    shrunk = {k: base[k] * 0.4 if k.endswith("running_var") else v for k, v in adapter.tensors.items()}
    path = save_adapter(dataclasses.replace(adapter, tensors=shrunk), tmp_path / "a.safetensors")
    merge_files(base_pt, [f"{path}:0.5", f"{path}:0.5"], tmp_path / "ok.pt")  # weights summing to 1: fine
    with pytest.raises(LoraYoloError, match="merging makes model.23.* negative: give adapters that train the head"):
        merge_files(base_pt, [f"{path}:1", f"{path}:1"], tmp_path / "bad.pt")  # 0.4 + 0.4 - 1 of the base's
    assert not (tmp_path / "bad.pt").exists()


@pytest.mark.slow
def test_training_updates_the_heads_statistics_and_nothing_else(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, train_head=True)
    result = train(B2, model=DEMO_BASE, config=config, project=str(tmp_path), name="t", **{**TINY, "fraction": 0.5})
    adapter = load_adapter(result.adapter)
    base = load_model(DEMO_BASE)
    assert sorted(adapter.full) == sorted(head_tensors(load_model(result.merged)))
    assert not any(n.startswith("model.23.") for n in adapter.layers) and adapter.layers
    state, merged = base.state_dict(), load_model(result.merged).state_dict()
    moved = [k for k in adapter.full if k.endswith("running_mean") and not torch.equal(adapter.tensors[k], state[k])]
    assert len(moved) == sum(k.endswith("running_mean") for k in adapter.full)  # train mode updated every one
    assert all(torch.equal(merged[k], state[k]) for k in state if "running_" in k and not k.startswith("model.23."))
    attached = attach_adapter(base, adapter)
    assert (head_output(load_model(result.merged), X) - head_output(attached, X)).abs().max() < 1e-3


def test_inspect_counts_the_head_and_sizes_the_file_exactly(base_pt, tmp_path):
    from lora_yolo.inspect import inspect_model

    config = LoraConfig(use_dora=True, train_head=True)
    report = inspect_model(base_pt, config)
    head = load_model(base_pt).model[-1]
    assert report.full_params == sum(p.numel() for n, p in head.named_parameters() if not n.startswith("dfl."))
    _, adapter = random_adapter(base_pt, config)
    assert report.adapter_bytes == save_adapter(adapter, tmp_path / "a.safetensors").stat().st_size
