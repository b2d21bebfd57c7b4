"""Class branches of add_classes=exact (`lora_yolo.branch`): the served `ClassBranch` keeps the base's scores bit for
bit, its plain widened form (what merged.pt holds) computes the same, and crafted exact adapters fail in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import random_adapter
from torch import nn
from ultralytics.nn.modules import Conv
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

from lora_yolo import LoraConfig, LoraYoloError, attach_adapter, load_model
from lora_yolo.adapter import Adapter
from lora_yolo.branch import ClassBranch, branch_paths, new_branch, widen
from lora_yolo.targets import class_layers

NEW = {0: "star", 1: "cross", 2: "ring", 3: "diamond"}


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
    base = nn.Sequential(Conv(8, 8, 1), Conv(8, 8, 3, g=2), nn.Conv2d(8, 3, 1)).eval()
    with pytest.raises(LoraYoloError, match=r"grouped conv \(2 groups\) after the first cannot hold both branches"):
        widen(ClassBranch(base, new_branch(base, 2)))


def crafted(adapter: Adapter, **changes) -> Adapter:
    tensors = dict(adapter.tensors)
    for key, value in changes.pop("tensors", {}).items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return Adapter(**{**vars(adapter), "tensors": tensors, **changes})


def test_crafted_exact_adapters_fail_in_one_line(base_pt):
    names = {**load_model(base_pt).names, **{80 + i: n for i, n in NEW.items()}}
    _, adapter = random_adapter(base_pt, LoraConfig(add_classes="exact"), names=names)
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
    for message, bad in cases.items():
        with pytest.raises(LoraYoloError, match=message) as e:
            attach_adapter(load_model(base_pt), bad)
        assert "\n" not in str(e.value)
