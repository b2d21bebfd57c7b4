"""Class branches of add_classes (`lora_yolo.branch`): the served `ClassBranch` keeps the base's scores bit for bit,
its plain widened form (what merged.pt holds) computes the same, adapters of both modes merge and serve as attached,
and crafted ones fail in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, TINY, make_base, random_adapter, save_base
from torch import nn
from ultralytics.nn.modules import Conv, DWConv
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

from lora_yolo import LoraConfig, LoraYoloError, attach_adapter, load_model
from lora_yolo.adapter import Adapter, check_layers
from lora_yolo.branch import ClassBranch, add_class_branches, new_branch, widen
from lora_yolo.checkpoint import build_for_classes
from lora_yolo.merge import merge_adapters
from lora_yolo.peft_format import to_peft
from lora_yolo.presets import resolve_config
from lora_yolo.serve import AdapterModel
from lora_yolo.targets import branch_paths, class_layers
from lora_yolo.train import train

NEW = {0: "star", 1: "cross", 2: "ring", 3: "diamond"}
SHAPES_B2 = ROOT / "datasets" / "shapes-b2" / "data.yaml"  # none of its classes is a COCO class
X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def randomised(branch: nn.Sequential, n_new: int, seed: int) -> nn.Sequential:
    """A copy as if trained: every float tensor moved, BatchNorm statistics included (variances kept positive)."""
    copy = new_branch(branch, n_new)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in copy.state_dict().items():
            if t.is_floating_point():
                t.mul_(1 + 0.2 * torch.rand(t.shape, generator=g)).add_(0 if "var" in name else 0.1)
    return copy.eval()


def branch_input(branch: nn.Sequential) -> torch.Tensor:
    first = next(m for m in branch.modules() if isinstance(m, nn.Conv2d))
    return torch.randn(2, first.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "model",
    [
        lambda: DetectionModel("yolo11n.yaml", verbose=False),  # DWConv + Conv pairs
        lambda: DetectionModel("yolov8n.yaml", verbose=False),  # dense 3x3 Conv blocks
        lambda: SegmentationModel("yolo26n-seg.yaml", verbose=False),  # both branches and proto.semseg
    ],
    ids=["yolo11n", "yolov8n", "yolo26n-seg"],
)
def test_widened_branch_computes_the_served_branch(model):
    """Every class branch: the served ClassBranch's first columns are the base's own output bit for bit, and the
    plain widened Sequential equals the ClassBranch within 1e-5, relative (old and new classes)."""
    model = model().eval()
    modules = dict(model.named_modules())
    paths = branch_paths(class_layers(model), modules)
    assert len(paths) == (7 if "semseg" in str(model) else 3)
    for i, path in enumerate(paths):
        base = modules[path]
        branch = ClassBranch(base, randomised(base, 4, seed=i)).eval()
        wide = widen(branch).eval()
        assert all(type(m).__module__.startswith(("torch.", "ultralytics.")) for m in wide.modules())
        x = branch_input(base)
        with torch.no_grad():
            served, plain, own = branch(x), wide(x), base(x)
        assert torch.equal(served[:, : own.shape[1]], own), path
        assert served.shape == plain.shape and torch.allclose(served, plain, rtol=1e-5, atol=1e-5), path
        assert (served[:, own.shape[1] :] - own.mean()).abs().max() > 1e-2  # the copy's scores are its own
        if any(isinstance(m, Conv) and m.conv.kernel_size == (3, 3) and m.conv.groups == 1 for m in base.modules()):
            # a dense conv reading the base's channels then the copy's runs as two groups, not block-diagonal
            assert any(m.groups == 2 for m in wide.modules() if isinstance(m, nn.Conv2d)), path


def test_a_widened_branch_widens_again():
    """Adding classes to a merged exact model: its widened branch (a depthwise conv with two filters per channel first)
    is the base of the next copy, and widens the same way."""
    model = DetectionModel("yolo11n.yaml", verbose=False).eval()
    base = model.model[-1].cv3[0]
    once = widen(ClassBranch(base, randomised(base, 4, seed=0))).eval()
    twice = ClassBranch(once, randomised(once, 2, seed=1)).eval()
    x = branch_input(base)
    with torch.no_grad():
        assert torch.allclose(twice(x), widen(twice).eval()(x), rtol=1e-5, atol=1e-5)


def test_a_grouped_conv_inside_a_branch_is_refused_in_one_line():
    base = nn.Sequential(DWConv(8, 8, 3), Conv(8, 8, 1, g=2), nn.Conv2d(8, 3, 1)).eval()  # reads interleaved channels
    with pytest.raises(LoraYoloError, match=r"grouped conv \(2 groups\) reading both branches' channels cannot hold"):
        widen(ClassBranch(base, new_branch(base, 2)))


def crafted(adapter: Adapter, **changes) -> Adapter:
    tensors = dict(adapter.tensors)
    for key, value in changes.pop("tensors", {}).items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return Adapter(**{**vars(adapter), "tensors": tensors, **changes})


def test_crafted_add_classes_adapters_fail_in_one_line(base_pt):
    names = {**load_model(base_pt).names, **{80 + i: n for i, n in NEW.items()}}
    adapter = classes_adapter(base_pt)
    attach_adapter(load_model(base_pt), adapter)  # the adapter as made fits
    var = next(k for k in adapter.full if k.endswith(".running_var"))
    weight = next(k for k in adapter.full if k.endswith(".new.2.weight"))
    cases = {
        "has LoRA layers": crafted(adapter, layers={"model.0.conv": (4, 8.0)}),
        "do not fit the base's class branches": crafted(
            adapter, full=adapter.full[1:], tensors={adapter.full[0]: None}
        ),
        "negative variances": crafted(adapter, tensors={var: -adapter.tensors[var] - 1}),
        "does not fit the base's class branch": crafted(adapter, tensors={weight: adapter.tensors[weight][:3]}),
        "do not start with the base's": crafted(adapter, names={**names, 0: "other"}),
    }
    adapted = classes_adapter(base_pt, "adapted")
    attach_adapter(load_model(base_pt), adapted)  # LoRA layers outside the class branches fit
    inside = crafted(adapted, layers={**adapted.layers, "model.23.cv3.0.1.conv": (4, 8.0)})
    cases["model.23.cv3.0.1.conv is in a class branch, which add_classes keeps as the base's"] = inside
    for message, bad in cases.items():
        with pytest.raises(LoraYoloError, match=message) as e:
            attach_adapter(load_model(base_pt), bad)
        assert "\n" not in str(e.value)


def test_an_add_classes_adapter_needs_class_branches_in_the_base(base_pt):
    """A base whose head has no Detect class branch (Classify here): an add_classes adapter has nothing to add beside,
    and would otherwise widen the head with untrained rows; refused in one line."""
    adapter = crafted(classes_adapter(base_pt, "adapted"), full=[], tensors={})
    classify = load_model("yolo11n-cls.yaml")
    with pytest.raises(LoraYoloError, match=r"^adapter says add_classes=adapted, but the base has no Detect class"):
        check_layers(adapter, dict(classify.named_modules()), class_layers(classify), classify.names)


def classes_adapter(base_pt, mode: str = "exact", seed: int = 3) -> Adapter:
    """An add_classes adapter for base_pt's 80 classes + 4, as if trained."""
    names = {**load_model(base_pt).names, **{80 + i: n for i, n in NEW.items()}}
    return random_adapter(base_pt, LoraConfig(add_classes=mode), seed=seed, scale=0.2, names=names)[1]


def test_new_branches_start_from_the_base_with_the_class_prior(base_pt):
    base = load_model(base_pt)
    names = {**base.names, **{80 + i: n for i, n in NEW.items()}}
    model = build_for_classes(base, len(names), names)
    prior = model.model[-1].cv3[0][-1].bias[-4:].clone()  # Ultralytics' class prior for 84 classes
    full = add_class_branches(model, base, 4)
    branch = model.model[-1].cv3[0]
    assert isinstance(branch, ClassBranch) and branch.base is not base.model[-1].cv3[0]  # a copy: the base untouched
    assert torch.equal(branch.new[-1].bias, prior) and branch.new[-1].out_channels == 4
    assert torch.equal(branch.new[0][0].conv.weight, base.model[-1].cv3[0][0][0].conv.weight)  # from the base
    assert all(".new." in n for n in full) and any(n.endswith(".bn.running_var") for n in full)


@pytest.mark.parametrize("mode", ["exact", "adapted"])
def test_add_classes_adapter_merges_and_serves_as_attached(base_pt, mode):
    """merge: every ClassBranch widened into plain modules (adapted: LoRA merged first), outputs those of the attached
    adapter (1e-4 relative); served with AdapterModel, unmerged and merged, the same; a weighted merge is refused in
    one line."""
    adapter = classes_adapter(base_pt, mode)
    assert bool(adapter.layers) == (mode == "adapted")
    merged = merge_adapters(load_model(base_pt), [(adapter, 1.0)]).eval()
    assert all(type(m).__module__.startswith(("torch.", "ultralytics.")) for m in merged.modules())
    attached = attach_adapter(load_model(base_pt), adapter).eval()
    copies = {k: v for k, v in attached.state_dict().items() if ".new." in k and v.is_floating_point()}
    assert copies.keys() == set(adapter.full)  # the adapter's copies, loaded as stored
    assert all(torch.equal(v, adapter.tensors[k].float()) for k, v in copies.items())
    served = AdapterModel(base_pt)
    served.set_adapter(served.load_adapter(adapter))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, base = attached(x)[1], load_model(base_pt).eval()(x)[1]
        moved = (want["boxes"] - base["boxes"]).abs().max()  # adapted's LoRA layers change the features, exact nothing
        assert moved > 0.01 if mode == "adapted" else moved == 0
        for got in (merged(x)[1], served.model.eval()(x)[1], (served.merge_adapter(), served.model.eval()(x))[1][1]):
            assert torch.allclose(got["scores"], want["scores"], rtol=1e-4, atol=1e-4)
            assert torch.allclose(got["boxes"], want["boxes"], rtol=1e-4, atol=1e-4)
    with pytest.raises(LoraYoloError, match="add_classes adapter merges alone"):
        merge_adapters(load_model(base_pt), [(adapter, 0.5), (classes_adapter(base_pt, mode, seed=4), 0.5)])


@pytest.mark.parametrize("end2end", [False, True], ids=["one-to-many", "one-to-one"])
def test_adapted_adapter_on_yolo26_serves_either_branch_as_attached(tmp_path, end2end):
    """YOLO26: an adapted adapter (LoRA outside both branches' class branches, a copy beside each) served for either
    head branch computes what the attached adapter computes (1e-4 relative), and merged.pt does too."""
    base = make_base(tmp_path / "yolo26n.pt", "yolo26n.yaml")
    adapter = classes_adapter(base, "adapted")
    assert any(".one2one_cv3.0.new." in k for k in adapter.full) and any(".cv3.0.new." in k for k in adapter.full)
    plain = load_model(base)
    paths = tuple(f"{p}." for p in branch_paths(class_layers(plain), dict(plain.named_modules())))
    assert len(paths) == 6 and not any(layer.startswith(paths) for layer in adapter.layers)  # none in a branch
    served = AdapterModel(base, end2end=end2end)
    served.set_adapter(served.load_adapter(adapter))
    models = [attach_adapter(load_model(base), adapter), merge_adapters(load_model(base), [(adapter, 1.0)])]
    with torch.no_grad():
        got = served.model.eval()(X)[0]
        for model in models:
            model.end2end = end2end
            want = model.eval()(X)[0]
            assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["exact", "adapted"])
def test_add_classes_adapters_are_refused_by_peft_conversion_in_one_line(base_pt, mode, tmp_path):
    """PEFT wraps the plain base, which has no module running a copy beside a class branch: refused, nothing written."""
    with pytest.raises(LoraYoloError, match=r"^this adapter adds classes with copies of the class branches [^\n]*$"):
        to_peft(classes_adapter(base_pt, mode), tmp_path / "peft")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("mode", ["exact", "adapted"])
def test_lora_adapter_loads_and_switches_while_an_add_classes_one_is_active(base_pt, mode):
    """The default selection adapts the convs inside the class branches: loading such an adapter while an add_classes
    adapter's copies run beside those branches must reach them, and either adapter then computes what it computes
    alone in a fresh model."""

    def scores(model: AdapterModel) -> torch.Tensor:
        with torch.no_grad():
            return model.model.eval()(X)[1]["scores"]

    exact, lora = classes_adapter(base_pt, mode), random_adapter(base_pt, seed=1, scale=0.5)[1]
    assert any(".cv3.0.0." in layer for layer in lora.layers)
    model = AdapterModel(base_pt)
    model.set_adapter(model.load_adapter(exact, "e"))
    served = {f"{p}.new.{k}": v for p, m in model.model.named_modules() if isinstance(m, ClassBranch)
              for k, v in m.new.state_dict().items() if v.is_floating_point()}  # fmt: skip
    assert served.keys() == set(exact.full) and all(torch.equal(v, exact.tensors[k].float()) for k, v in served.items())
    model.load_adapter(lora, "l")
    assert model.adapters == ["e", "l"]
    for name, adapter in [("l", lora), ("e", exact), ("l", lora)]:
        model.set_adapter(name)
        model.merge_adapter()
        alone = AdapterModel(base_pt)
        alone.set_adapter(alone.load_adapter(adapter, name))
        assert torch.allclose(scores(model), scores(alone), atol=1e-4), name
        model.unmerge_adapter()
    model.disable_adapters()
    assert torch.equal(scores(model), scores(AdapterModel(base_pt)))


@pytest.mark.parametrize("mode", ["exact", "adapted"])
def test_a_base_whose_class_branch_cannot_widen_is_refused_before_training(base_pt, tmp_path, mode):
    model = load_model(base_pt)
    branch = model.model[-1].cv3[0]
    branch[0][1] = Conv(branch[0][1].conv.in_channels, branch[0][1].conv.out_channels, 1, g=2)  # after a depthwise
    odd = save_base(model, tmp_path / "odd.pt")
    with pytest.raises(LoraYoloError, match=r"cannot add a class branch beside model.23.cv3.0: a grouped conv"):
        train(SHAPES_B2, model=odd, config=LoraConfig(add_classes=mode), project=str(tmp_path / "runs"), **TINY)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "library", "want"),
    [
        ((), {}, {"optimizer": "AdamW", "lr0": 0.01}),  # the default preset's optimizer=auto is for adapters
        (("--lr0", "0.003"), {"lr0": 0.003}, {"optimizer": "AdamW", "lr0": 0.003}),  # lr0 alone: AdamW at that lr
        (("optimizer=auto",), {"optimizer": "auto"}, {"optimizer": "auto"}),  # kept, with no lr0 it would ignore
        (("optimizer=SGD", "--lr0", "0.02"), {"optimizer": "SGD", "lr0": 0.02}, {"optimizer": "SGD", "lr0": 0.02}),
        (("--config", "head_only"), None, {"optimizer": "AdamW", "lr0": 0.01}),  # not the preset's AdamW 0.02
    ],
)
def test_exact_mode_optimizer_from_the_cli_and_the_library(cli_here, monkeypatch, demo_base, args, library, want):
    """What reaches Ultralytics' trainer in exact mode: AdamW 0.01 unless an optimizer is given, from the CLI (through
    a preset) and from `train()` alike; adapted mode keeps its preset's (dora_r32) optimizer=auto."""
    import lora_yolo.train

    seen = []

    def no_trainer(kind, overrides, lora=None):  # the run stops where the trainer would be built
        seen.append({k: overrides[k] for k in ("optimizer", "lr0") if k in overrides})
        raise LoraYoloError("stop")

    monkeypatch.setattr(lora_yolo.train, "_trainer", no_trainer)
    assert cli_here("train", SHAPES_B2, "--model", demo_base, "--add-classes", "exact", *args).returncode == 1
    if library is not None:  # the same call from Python, without a preset
        with pytest.raises(LoraYoloError, match="stop"):
            train(SHAPES_B2, model=demo_base, config=LoraConfig(add_classes="exact"), **library)
    assert seen == [want] * (1 if library is None else 2)
    config, train_args = resolve_config(None, add_classes="adapted")  # no --config: the recipe it was measured with
    assert train_args == {"optimizer": "auto"} and (config.r, config.train_head) == (32, False)
