"""Crafted adapters and PEFT folders, one per shape the review found ending in a traceback: each is now one line.

Each case goes through the path a user takes (load, then attach / merge / serve), and the CLI cases check the exit
code and that stderr is one line without a traceback.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from conftest import random_adapter
from safetensors.torch import load_file, save_file

from lora_yolo import AdapterModel, LoraYoloError, attach_adapter, load_adapter, load_model, save_adapter
from lora_yolo.merge import merge_files
from lora_yolo.peft_format import CONFIG, WEIGHTS, from_peft, to_peft


@pytest.fixture(scope="module")
def good(base_pt):
    """A plain LoRA adapter (the base's 80 classes) for base_pt: its tensors and metadata, to be altered."""
    _, adapter = random_adapter(base_pt)
    return adapter


def craft(path: Path, adapter, tensors: dict | None = None, **meta: object) -> Path:
    """Write `adapter` with some tensors and metadata fields replaced (JSON-encoded unless already a string)."""
    metadata = adapter.metadata()
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    save_file(
        {k: v.clone().contiguous() for k, v in (tensors or adapter.tensors).items()}, str(path), metadata=metadata
    )
    return path


def renamed(adapter, old: str, new: str) -> tuple[dict, dict]:
    """Tensors and layers with layer `old` renamed `new` (metadata and tensor names agree)."""
    tensors = {(new + k[len(old) :] if k.startswith(old + ".") else k): v for k, v in adapter.tensors.items()}
    layers = {(new if k == old else k): list(v) for k, v in adapter.layers.items()}
    return tensors, layers


def refused_everywhere(path: Path, base_pt: Path, match: str) -> None:
    """The file loads (it is well-formed), and attach, merge and AdapterModel all refuse it with `match`."""
    adapter = load_adapter(path)  # the file itself is well-formed: the base decides
    with pytest.raises(LoraYoloError, match=match):
        attach_adapter(load_model(base_pt), adapter)
    with pytest.raises(LoraYoloError, match=match):
        merge_files(base_pt, [str(path)], path.with_suffix(".pt"))
    with pytest.raises(LoraYoloError, match=match):
        AdapterModel(base_pt).load_adapter(path)
    assert not path.with_suffix(".pt").exists()


def test_header_nested_fifty_thousand_deep(good, tmp_path):
    path = craft(tmp_path / "a.safetensors", good)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(struct.pack("<Q", 50_000) + b"[" * 50_000 + data[8 + n :])
    with pytest.raises(LoraYoloError, match="not JSON"):
        load_adapter(path)


@pytest.mark.parametrize("key", ["layers", "names", "base", "lora_config", "full"])
def test_metadata_value_nested_fifty_thousand_deep(good, tmp_path, key):
    with pytest.raises(LoraYoloError, match=f"damaged adapter metadata {key!r}"):
        load_adapter(craft(tmp_path / "a.safetensors", good, **{key: "[" * 50_000}))


def test_rank_zero_with_empty_tensors(good, tmp_path):
    layer = next(iter(good.layers))
    tensors = dict(good.tensors)
    a, b = tensors[f"{layer}.lora_A.weight"], tensors[f"{layer}.lora_B.weight"]
    tensors[f"{layer}.lora_A.weight"] = torch.empty(0, *a.shape[1:])
    tensors[f"{layer}.lora_B.weight"] = torch.empty(b.shape[0], 0, 1, 1)
    layers = {k: list(v) for k, v in good.layers.items()}
    layers[layer][0] = 0
    with pytest.raises(LoraYoloError, match="rank >= 1"):
        load_adapter(craft(tmp_path / "a.safetensors", good, tensors, layers=layers))


@pytest.mark.parametrize("alpha", [0, -1, "NaN", "Infinity", "16", 10**400])  # 10**400: JSON, beyond a float
def test_alpha_that_is_no_positive_number(good, tmp_path, alpha):
    layers = {k: list(v) for k, v in good.layers.items()}
    layers[next(iter(layers))][1] = alpha
    text = json.dumps(layers).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
    with pytest.raises(LoraYoloError, match="alpha > 0"):
        load_adapter(craft(tmp_path / "a.safetensors", good, layers=text))


@pytest.mark.parametrize(
    "target, match",
    [
        ("model.0.bn", "is a BatchNorm2d, not a conv|is not in the base"),  # serving: fused, BN gone
        ("model.99.conv", "is not in the base model"),
        ("model.10.m.0.attn.pe.conv", "grouped"),  # C2PSA's depthwise positional conv
        ("model.0", "is a Conv, not a conv or linear"),  # Ultralytics' Conv block (conv + BN + act), not nn.Conv2d
    ],
)
def test_layer_names_pointing_at_other_modules(good, base_pt, tmp_path, target, match):
    tensors, layers = renamed(good, "model.0.conv", target)
    path = craft(tmp_path / "a.safetensors", good, tensors, layers=layers)
    refused_everywhere(path, base_pt, match)


def test_layer_with_shapes_of_another_conv(good, base_pt, tmp_path):
    """Another conv's A (3 input channels) under model.1's name (16): caught before torch sees it."""
    tensors = {**good.tensors, "model.1.conv.lora_A.weight": good.tensors["model.0.conv.lora_A.weight"]}
    refused_everywhere(craft(tmp_path / "a.safetensors", good, tensors), base_pt, "do not fit")


@pytest.mark.parametrize(
    "name, shape, match",
    [
        ("model.99.cv3.weight", (3,), "only the class layers can be"),
        ("model.0.bn.running_mean", (16,), "only the class layers can be"),  # a buffer, not trained
        ("model.0.bn.weight", (16,), "only the class layers can be"),  # fits, but serving has no BN to put it in
        ("model.23.cv3.0.2.weight", (80, 80, 1, 1), "also has a LoRA adapter"),  # the default adapts class convs
    ],
)
def test_full_entries_naming_missing_or_misshapen_tensors(good, base_pt, tmp_path, name, shape, match):
    tensors = {**good.tensors, name: torch.randn(shape)}
    path = craft(tmp_path / "a.safetensors", good, tensors, full=[*good.full, name])
    refused_everywhere(path, base_pt, match)


def test_class_conv_with_rows_for_another_class_count(base_pt, tmp_path):
    _, adapter = random_adapter(base_pt, names={0: "a", 1: "b", 2: "c"})
    key = next(k for k in adapter.full if k.endswith(".bias"))
    tensors = {**adapter.tensors, key: torch.randn(80)}
    refused_everywhere(craft(tmp_path / "a.safetensors", adapter, tensors), base_pt, "does not fit the base")


@pytest.mark.parametrize(
    "nc, names, match",
    [
        (3, {str(i): str(i) for i in range(80)}, "exactly the class ids 0..2"),
        (80, {"0": "a"}, "exactly the class ids 0..79"),
        (0, {}, "nc must be a positive integer"),
        (80, {str(i): i for i in range(80)}, "class names must be strings"),
    ],
)
def test_nc_and_names_cross_checked(good, tmp_path, nc, names, match):
    with pytest.raises(LoraYoloError, match=match):
        load_adapter(craft(tmp_path / "a.safetensors", good, nc=nc, names=names))


def test_other_class_names_without_class_layers(good, base_pt, tmp_path):
    """Same count, other names, no class layers: the base's rows would silently mean other classes."""
    names = {str(i): f"other{i}" for i in range(80)}
    path = craft(tmp_path / "a.safetensors", good, names=names)
    refused_everywhere(path, base_pt, "does not carry the class layer")


def peft_folder(good, tmp_path: Path) -> Path:
    return to_peft(good, tmp_path / "peft")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: [c], "not a PEFT LoRA config"),
        (lambda c: {**c, "alpha_pattern": {"(": 4}}, "not a valid regular expression"),
        (lambda c: {**c, "alpha_pattern": {"(?i)model": 4}}, "uses repetition"),  # a flag, invalid once wrapped
        (lambda c: {**c, "alpha_pattern": {"(a|aa)+": 4}}, "uses repetition"),  # exponential on long names
        (lambda c: {**c, "rank_pattern": {"model": "x"}}, "positive integer"),
        (lambda c: {**c, "lora_alpha": "x"}, "must be a finite number > 0"),
        (lambda c: {**c, "lora_alpha": 1e999}, "must be a finite number > 0"),
        (lambda c: {**c, "lora_alpha": 10**400}, "must be a finite number > 0, got a 1329-bit integer"),
        (lambda c: {**c, "alpha_pattern": {"model": 10**400}}, "must be a finite number > 0"),
        (lambda c: {**c, "r": 0}, "positive integer"),
        (lambda c: {**c, "alpha_pattern": [1]}, "must be a mapping"),
        (lambda c: "[" * 50_000, "not JSON"),
    ],
)
def test_peft_configs_of_the_wrong_shape(good, base_pt, tmp_path, change, match):
    folder = peft_folder(good, tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    changed = change(config)
    (folder / CONFIG).write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(LoraYoloError, match=match):
        from_peft(folder, load_model(base_pt))


@pytest.mark.parametrize("keep", ["nothing", "class layers only"])
def test_empty_peft_adapter(good, base_pt, tmp_path, keep):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    tensors = {} if keep == "nothing" else {"base_model.model.model.23.cv3.0.2.weight": torch.randn(80, 80, 1, 1)}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(LoraYoloError, match="holds no LoRA tensors"):
        from_peft(folder, load_model(base_pt))


def test_peft_made_folder_with_a_rank_zero_layer(good, base_pt, tmp_path):
    """A folder PEFT could not have made (empty 4-D A and B) gets the same checks as our own files."""
    folder = peft_folder(good, tmp_path)
    raw = load_file(folder / WEIGHTS)
    name = next(k for k in raw if k.endswith("lora_A.weight"))
    raw[name] = raw[name][:0].clone()
    b = name.replace("lora_A", "lora_B")
    raw[b] = raw[b][:, :0].clone()
    save_file(raw, str(folder / WEIGHTS), metadata={"format": "pt"})  # no lora_yolo metadata: PEFT-made
    with pytest.raises(LoraYoloError, match="rank >= 1"):
        from_peft(folder, load_model(base_pt))


@pytest.mark.parametrize("key", ["lora_alpha", "loraplus_lr_ratio"])
def test_config_number_beyond_a_float(good, tmp_path, key):
    """An integer too large for a float (valid JSON) is a damaged file, not an OverflowError."""
    config = json.dumps({**good.config.to_dict(), key: 10**400})
    with pytest.raises(LoraYoloError, match=f"damaged adapter metadata .*{key} must be a finite number"):
        load_adapter(craft(tmp_path / "a.safetensors", good, lora_config=config))


def test_huge_nc_is_refused_at_once(good, tmp_path):
    start = time.perf_counter()
    with pytest.raises(LoraYoloError, match="exactly the class ids"):
        load_adapter(craft(tmp_path / "a.safetensors", good, nc=10**10, names={"0": "a"}))
    assert time.perf_counter() - start < 1.0


def test_to_peft_never_overwrites_a_folder_with_files(good, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(LoraYoloError, match="not empty"):
        to_peft(good, folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    to_peft(good, empty)
    assert sorted(p.name for p in empty.iterdir()) == [CONFIG, WEIGHTS]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


@pytest.mark.parametrize("kind", ["bn-layer", "deep-json", "peft-list-config"])
def test_cli_says_one_line(good, base_pt, tmp_path, cli_here, kind):
    if kind == "bn-layer":
        tensors, layers = renamed(good, "model.0.conv", "model.0.bn")
        path = craft(tmp_path / "a.safetensors", good, tensors, layers=layers)
        out = cli_here("merge", "--base", base_pt, "-a", path, "-o", tmp_path / "m.pt")
    elif kind == "deep-json":
        path = craft(tmp_path / "a.safetensors", good, names="[" * 50_000)
        out = cli_here("convert", path, tmp_path / "out", "--to", "peft")
    else:
        folder = peft_folder(good, tmp_path)
        (folder / CONFIG).write_text("[1, 2]")
        out = cli_here("convert", folder, tmp_path / "b.safetensors", "--from", "peft")
    err = out.stderr
    assert out.returncode == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_adapter_name_with_a_dot_is_usable(good, base_pt, tmp_path):
    """A file named `a.v2.safetensors` loads into AdapterModel (torch's ModuleDict refuses '.' in names)."""
    path = save_adapter(good, tmp_path / "a.v2.safetensors")
    model = AdapterModel(base_pt)
    assert model.load_adapter(path) == "a_v2"
    with pytest.raises(LoraYoloError, match="contain no '.'"):
        model.load_adapter(path, name="x.y")
