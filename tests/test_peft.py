"""PEFT interoperability: our adapters load in PEFT with the same outputs, PEFT's own adapters convert back."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import RTDETR_TINY, all_outputs, head_output, make_base, random_adapter
from safetensors.torch import load_file, save_file

from lora_yolo import LoraConfig, LoraYoloError, attach_adapter, load_adapter, load_model, save_adapter
from lora_yolo.checkpoint import build_for_classes
from lora_yolo.peft_format import CONFIG, WEIGHTS, from_peft, to_peft

peft = pytest.importorskip("peft", reason="peft is a test-only dependency (pip install -e .[dev])")
NEW = {0: "disc", 1: "ring", 2: "cross", 3: "star"}
X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def peft_model(model, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that a YOLO model is not a transformers model
        return peft.PeftModel.from_pretrained(model, str(folder)).eval()


def ours_and_peft(base_pt, adapter, folder, double: bool = False):
    """Head outputs of base + adapter in lora-yolo and in PEFT (same class set, fp32 or fp64)."""
    ours = attach_adapter(load_model(base_pt), adapter)
    theirs = peft_model(build_for_classes(load_model(base_pt), adapter.nc, adapter.names), to_peft(adapter, folder))
    x = X.double() if double else X
    if double:
        ours, theirs = ours.double(), theirs.double()
    return head_output(ours, x), head_output(theirs, x)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("lora", {}),
        ("rank-and-alpha-patterns", {"config": LoraConfig(rank_pattern={r"model\.23\.": 4}, alpha_pattern={"cv2": 4})}),
        ("rslora", {"config": LoraConfig(use_rslora=True)}),
        ("dora", {"config": LoraConfig(use_dora=True)}),
        ("new-classes", {"names": NEW}),
        ("train-head", {"config": LoraConfig(use_dora=True, train_head=True), "names": NEW}),  # modules_to_save
        ("train-bias", {"config": LoraConfig(use_dora=True, train_head=True, train_bias=True), "names": NEW}),
    ],
)
def test_peft_loads_our_adapter_with_the_same_outputs(base_pt, tmp_path, kind, kwargs):
    _, adapter = random_adapter(base_pt, **kwargs)
    ours, theirs = ours_and_peft(base_pt, adapter, tmp_path / "fp32")
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-5  # PEFT runs a second conv path, we fold it into the conv: rounding
    ours64, theirs64 = ours_and_peft(base_pt, adapter, tmp_path / "fp64", double=True)
    assert (ours64 - theirs64).abs().max() < 1e-12  # in fp64: the same function
    config = json.loads((tmp_path / "fp32" / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == len(adapter.layers)


@pytest.mark.parametrize(
    "dora, train_head, train_bias",
    [(False, False, False), (True, False, False), (True, True, False), (True, True, True)],
)
def test_round_trip_is_exact(base_pt, tmp_path, dora, train_head, train_bias):
    patterns = {"rank_pattern": {r"model\.2[02]\.": 4}, "alpha_pattern": {"cv2": 4}}  # train_head: none in the head
    config = LoraConfig(use_dora=dora, train_head=train_head, train_bias=train_bias, **patterns)
    _, adapter = random_adapter(base_pt, config=config, names=NEW)
    stored = load_adapter(save_adapter(adapter, tmp_path / "a.safetensors"))
    back = from_peft(to_peft(stored, tmp_path / "peft"))
    assert back.tensors.keys() == stored.tensors.keys()
    assert all(torch.equal(back.tensors[k], stored.tensors[k]) for k in stored.tensors)
    for field in ("config", "layers", "full", "nc", "names", "base"):
        assert getattr(back, field) == getattr(stored, field), field


@pytest.mark.parametrize("new_classes", [False, True])
def test_adapter_made_by_peft_converts_with_its_base(base_pt, tmp_path, new_classes):
    from lora_yolo.targets import class_layers

    model = load_model(base_pt)
    saved = None
    if new_classes:  # PEFT trained a 4-class model built from the base, its class layers in modules_to_save
        model = build_for_classes(model, 4, {i: f"class{i}" for i in range(4)})
        saved = class_layers(model)
    targets = ["model.13.cv1.conv", "model.16.m.0.cv1.conv", "model.23.cv2.1.2", "model.10.m.0.attn.qkv.conv"]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, rank_pattern={"cv2.1.2": 2}, use_dora=True, modules_to_save=saved
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name or "magnitude" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    made.save_pretrained(str(tmp_path / "peft"))
    with pytest.raises(LoraYoloError, match="pass the base"):
        from_peft(tmp_path / "peft")
    adapter = from_peft(tmp_path / "peft", load_model(base_pt))
    assert sorted(adapter.layers) == sorted(targets) and adapter.layers["model.23.cv2.1.2"] == (2, 8.0)
    assert adapter.nc == (4 if new_classes else 80)
    ours = head_output(attach_adapter(load_model(base_pt), adapter), X)
    assert (ours - head_output(made.eval(), X)).abs().max() < 1e-5


def test_cli_convert_both_ways_and_refusals(base_pt, tmp_path, cli_here):
    _, adapter = random_adapter(base_pt)
    src = save_adapter(adapter, tmp_path / "a.safetensors")

    out = cli_here("convert", src, tmp_path / "peft", "--to", "peft")
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {CONFIG, WEIGHTS}
    out = cli_here("convert", tmp_path / "peft", tmp_path / "back.safetensors", "--from", "peft")
    assert out.returncode == 0, out.stderr
    back, original = load_adapter(tmp_path / "back.safetensors"), load_adapter(src)
    assert back.metadata() == original.metadata()
    assert all(torch.equal(back.tensors[k], original.tensors[k]) for k in original.tensors)
    inside = cli_here("convert", tmp_path / "peft", tmp_path / "peft" / "back.safetensors", "--from", "peft")
    assert inside.returncode == 0, inside.stderr  # a new file in the PEFT folder overwrites nothing
    assert cli_here("convert", src, tmp_path / "x", "--to", "lora").returncode == 2
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    out = cli_here("convert", tmp_path / "bin", tmp_path / "y.safetensors", "--from", "peft")
    assert out.returncode == 1 and "a pickle" in out.stderr and "Traceback" not in out.stderr
    config = json.loads((tmp_path / "peft" / CONFIG).read_text())
    (tmp_path / "peft" / CONFIG).write_text(json.dumps({**config, "fan_in_fan_out": True}))
    out = cli_here("convert", tmp_path / "peft", tmp_path / "z.safetensors", "--from", "peft")
    assert out.returncode == 1 and "fan_in_fan_out=True is not supported" in out.stderr
    # PEFT's own bias="all" / "lora_only" files hold every bias the model has: only ours (train_bias) are read
    (tmp_path / "peft" / CONFIG).write_text(json.dumps({**config, "bias": "all"}))
    out = cli_here("convert", tmp_path / "peft", tmp_path / "z.safetensors", "--from", "peft", "--base", base_pt)
    assert out.returncode == 1 and "bias='all' is not supported" in out.stderr
    (tmp_path / "peft" / CONFIG).write_text(json.dumps({**config, "bias": "lora_only"}))  # what ours say, but
    save_file(load_file(tmp_path / "peft" / WEIGHTS), str(tmp_path / "peft" / WEIGHTS))  # without our metadata
    out = cli_here("convert", tmp_path / "peft", tmp_path / "z.safetensors", "--from", "peft", "--base", base_pt)
    assert out.returncode == 1 and "bias='lora_only' is not supported in a folder lora-yolo did not" in out.stderr
    # the output may not be one of the inputs: the base, or a file of the PEFT folder (both would be destroyed)
    base_bytes, weights_bytes = base_pt.read_bytes(), (tmp_path / "peft" / WEIGHTS).read_bytes()
    for output in (base_pt, tmp_path / "peft" / WEIGHTS):
        out = cli_here("convert", tmp_path / "peft", output, "--from", "peft", "--base", base_pt)
        assert out.returncode == 1 and "would overwrite an input" in out.stderr
    assert base_pt.read_bytes() == base_bytes and (tmp_path / "peft" / WEIGHTS).read_bytes() == weights_bytes


def test_yolo26_adapter_loads_in_peft_with_every_output_equal(tmp_path):
    # YOLO26's head: both branches carry adapters and, for a new class set, class convs in full; PEFT must
    # reproduce each branch's raw predictions, not only the decoded one-to-many output.
    base = make_base(tmp_path / "yolo26n.pt", "yolo26n.yaml")
    adapter = load_adapter(save_adapter(random_adapter(base, names=NEW)[1], tmp_path / "a.safetensors"))
    assert any(".one2one_cv3." in n for n in adapter.layers)
    ours = attach_adapter(load_model(base), adapter)
    folder = to_peft(adapter, tmp_path / "p")
    theirs = peft_model(build_for_classes(load_model(base), adapter.nc, adapter.names), folder)
    got, want = all_outputs(theirs, X), all_outputs(ours, X)
    assert len(got) == len(want) > 4 and all((a - b).abs().max() < 1e-4 for a, b in zip(got, want))
    back = from_peft(folder)
    assert back.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(back.tensors[k], adapter.tensors[k]) for k in adapter.tensors)


@pytest.mark.parametrize("cfg", ["yolo26n-pose.yaml", str(RTDETR_TINY)], ids=["yolo26-pose", "rtdetr"])
def test_train_head_adapter_with_nested_head_modules_loads_in_peft(tmp_path, cfg):
    # PEFT wraps each module of modules_to_save whole: a module inside another (RT-DETR's attention and its out_proj,
    # YOLO26 pose's flow layers) is saved under its outermost wrapped module only, or PEFT could not load it.
    base = make_base(tmp_path / "b.pt", cfg)
    _, adapter = random_adapter(base, LoraConfig(train_head=True))
    theirs = peft_model(load_model(base), to_peft(adapter, tmp_path / "peft")).double()
    ours = attach_adapter(load_model(base), adapter).eval().double()
    with torch.no_grad():
        got, want = all_outputs(theirs, X.double()), all_outputs(ours, X.double())
    assert len(got) == len(want) and all((a - b).abs().max() < 1e-9 for a, b in zip(got, want))
