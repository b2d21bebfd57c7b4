"""AdapterModel: one fused base, many adapters; switching, disabling, merging and class sets, against plain models."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import SHAPES_B1, head_output, make_base, random_adapter
from ultralytics import YOLO
from ultralytics.nn.modules import RepConv

from lora_yolo import LoraConfig, LoraYoloError, attach_adapter, load_model, merge_lora
from lora_yolo.serve import AdapterModel, SwitchableLayer

NEW = {0: "disc", 1: "ring", 2: "cross", 3: "star"}


@pytest.fixture(scope="module")
def served(base_pt):
    """The base with five adapters: LoRA, DoRA, a LoRA for a 4-class set, one training the head in full for that
    class set (train_head), and one also training the shifts after its adapted convs (train_bias); and the plain
    merged models."""
    model = AdapterModel(base_pt)
    plain = {}
    for name, kwargs in {
        "a": dict(seed=1),
        "dora": dict(seed=2, config=LoraConfig(use_dora=True, targets=["neck", "head"])),
        "classes": dict(seed=3, names=NEW),
        "head": dict(seed=4, config=LoraConfig(train_head=True), names=NEW),  # the head in full, BatchNorms too
        # the default's form: the head in full, DoRA elsewhere with each adapted conv's BatchNorm shift trained
        "bias": dict(seed=5, config=LoraConfig(use_dora=True, train_head=True, train_bias=True), names=NEW),
    }.items():
        trained, adapter = random_adapter(base_pt, **kwargs)
        model.load_adapter(adapter, name)
        plain[name] = merge_lora(trained)
    return model, plain


X = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def test_disabled_is_exactly_the_base_ultralytics_predicts_with(served, base_pt):
    model, _ = served
    model.disable_adapters()
    fused = YOLO(str(base_pt)).model.fuse(verbose=False)  # what YOLO(base).predict runs
    assert torch.equal(head_output(model.model, X), head_output(fused, X))
    assert (head_output(model.model, X) - head_output(load_model(base_pt), X)).abs().max() < 1e-4  # unfused


@pytest.mark.parametrize("name", ["a", "dora", "classes", "head", "bias"])
def test_each_adapter_equals_its_plain_merged_model(served, name):
    model, plain = served
    model.set_adapter(name)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    expected = head_output(plain[name], X)
    got = head_output(model.model, X)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4  # fused vs unfused rounding only
    model.merge_adapter()
    assert not any(isinstance(m, SwitchableLayer) for m in model.model.modules())  # plain convs: the base's cost
    assert (head_output(model.model, X) - got).abs().max() < 1e-5
    model.unmerge_adapter()
    after = model.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # bit-exact
    assert torch.equal(head_output(model.model, X), got)


def test_switching_keeps_the_base_in_place_and_is_repeatable(served):
    model, _ = served
    model.disable_adapters()  # the base's modules (a test before may have left the head adapter's head in place)
    weights = {n: p.data_ptr() for n, p in model.model.named_parameters()}
    model.set_adapter("a")
    first = head_output(model.model, X)
    model.set_adapter("dora")
    model.merge_adapter()
    model.set_adapter("classes")
    model.set_adapter("head")
    model.merge_adapter()
    model.set_adapter("a")
    assert torch.equal(head_output(model.model, X), first)
    same = {n: p.data_ptr() for n, p in model.model.named_parameters() if n in weights}
    assert same == {n: weights[n] for n in same}  # no tensor reallocated: nothing reloaded
    model.disable_adapters()
    assert not any(m.merged or m.active for m in model.model.modules() if isinstance(m, SwitchableLayer))


def test_predict_after_each_switch_uses_the_model_as_switched(served, base_pt):
    """Ultralytics' predictor runs on a copy of the model made when it is set up: after a switch, merge or disable
    the next predict must not reuse it (it did, and kept predicting with the adapter active at the first call)."""
    model, plain = served
    image = sorted((SHAPES_B1.parent / "images" / "val").glob("*.jpg"))[0]

    def scores(yolo_or_served) -> torch.Tensor:
        return yolo_or_served.predict(image, imgsz=96, conf=0.0, max_det=5, verbose=False)[0].boxes.data

    base = scores(YOLO(str(base_pt)))
    model.disable_adapters()
    assert torch.equal(scores(model), base)
    model.set_adapter("a")
    with_a = scores(model)
    assert not torch.equal(with_a, base)
    model.merge_adapter()
    assert torch.allclose(scores(model), with_a, atol=1e-4)
    model.disable_adapters()
    assert torch.equal(scores(model), base)


def test_class_set_switches_with_the_adapter(served):
    model, _ = served
    image = sorted((SHAPES_B1.parent / "images" / "val").glob("*.jpg"))[0]  # any image: the adapters are random
    model.set_adapter("classes")
    assert model.model.names == NEW and model.model.model[-1].nc == 4
    result = model.predict(image, imgsz=96, conf=0.0, max_det=5, verbose=False)[0]
    assert result.names == NEW and len(result.boxes) and set(result.boxes.cls.int().tolist()) <= set(NEW)
    model.set_adapter("a")
    assert len(model.model.names) == 80 and model.model.model[-1].nc == 80
    result = model.predict(image, imgsz=96, conf=0.0, max_det=5, verbose=False)[0]
    assert len(result.names) == 80
    model.disable_adapters()
    assert head_output(model.model, X).shape[1] == 4 + 80


def test_a_model_cast_before_or_after_loading_serves_every_kind_of_adapter_in_its_dtype(base_pt):
    """Adapters load as fp32 files; a model cast to bf16 before or after loading (`.to(torch.bfloat16)`, as a user
    serving in half precision does) takes each part in its dtype: the LoRA updates, the class layers of a new class
    set, a head trained in full, and the class branch copies of an add_classes adapter. Outputs agree with the fp32
    plain merged model within bf16's rounding (5% of the largest output)."""
    names = {**load_model(base_pt).names, **{80 + i: n for i, n in NEW.items()}}  # add_classes: the base's, then more
    for kwargs in (dict(names=NEW), dict(config=LoraConfig(train_head=True), names=NEW),
                   dict(config=LoraConfig(add_classes="exact"), names=names)):  # fmt: skip
        trained, adapter = random_adapter(base_pt, seed=3, **kwargs)
        want = head_output(merge_lora(trained), X)
        model = AdapterModel(base_pt)
        model.model.to(torch.bfloat16)
        model.set_adapter(model.load_adapter(adapter))
        got = head_output(model.model, X.bfloat16()).float()
        assert got.shape == want.shape
        assert (got - want).abs().max() < 0.05 * want.abs().max()
    # cast after loading, with an adapter active: the base's class layers and the other adapter's head were outside
    # the model then, and switching puts them back in its dtype
    plain = {None: load_model(base_pt)}
    model = AdapterModel(base_pt)
    for name, kwargs in {
        "classes": dict(names=NEW),
        "head": dict(config=LoraConfig(train_head=True), names=NEW),
    }.items():
        trained, adapter = random_adapter(base_pt, seed=4, **kwargs)
        plain[name] = merge_lora(trained)
        model.load_adapter(adapter, name)
    model.set_adapter("classes")
    model.model.to(torch.bfloat16)
    for name in "head", None, "classes":
        if name:
            model.set_adapter(name)
        else:
            model.disable_adapters()
        want = head_output(plain[name], X)
        assert (head_output(model.model, X.bfloat16()).float() - want).abs().max() < 0.05 * want.abs().max()


def test_switch_is_much_faster_than_loading_a_checkpoint(served, base_pt):
    """Medians of 5, side by side; the full number is in scripts/bench_switch.py (README)."""
    model, _ = served

    def median(f):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return sorted(times)[2]

    switch = median(lambda: (model.set_adapter("classes"), model.set_adapter("a")))
    load = median(lambda: YOLO(str(base_pt)))
    assert switch < load / 5, (switch, load)


def test_errors_name_the_problem(served, base_pt, tmp_path):
    model, _ = served
    with pytest.raises(LoraYoloError, match="no adapter named 'zzz'; loaded: a, dora, classes"):
        model.set_adapter("zzz")
    with pytest.raises(LoraYoloError, match="already loaded"):
        model.load_adapter(random_adapter(base_pt)[1], "a")
    other = copy.deepcopy(random_adapter(base_pt)[1])
    other.base = {**other.base, "arch": "0" * 16}
    with pytest.raises(LoraYoloError, match="does not fit this base"):
        model.load_adapter(other, "other")
    model.disable_adapters()
    with pytest.raises(LoraYoloError, match="no active adapter"):
        model.merge_adapter()


def test_load_order_and_merged_state_do_not_matter(served, base_pt):
    """Adapters loaded in reverse order, one loaded while another is merged: each still equals its plain model."""
    _, plain = served
    model = AdapterModel(base_pt)
    model.load_adapter(random_adapter(base_pt, seed=3, names=NEW)[1], "classes")
    model.set_adapter("classes")
    model.merge_adapter()
    model.load_adapter(random_adapter(base_pt, seed=1)[1], "a")  # targets the class layers "classes" replaces
    for name in ("a", "classes", "a"):
        model.set_adapter(name)
        assert (head_output(model.model, X) - head_output(plain[name], X)).abs().max() < 1e-4, name


def test_delete_adapter_forgets_it_and_restores_the_base_when_active(base_pt):
    model = AdapterModel(base_pt)
    name = model.load_adapter(random_adapter(base_pt, seed=3, names=NEW)[1], "classes")
    model.set_adapter(name)
    model.delete_adapter(name)
    assert model.adapters == [] and model.active_adapter is None and len(model.model.names) == 80
    fused = YOLO(str(base_pt)).model.fuse(verbose=False)
    assert torch.equal(head_output(model.model, X), head_output(fused, X))
    with pytest.raises(LoraYoloError, match="no adapter named 'classes'"):
        model.set_adapter("classes")


@pytest.fixture(scope="module")
def base26(tmp_path_factory):
    """yolo26n with 80 classes, from yolo26n.yaml: a head with a one-to-many and a one-to-one branch."""
    return make_base(tmp_path_factory.mktemp("base26") / "yolo26n-base.pt", "yolo26n.yaml")


def branch_output(model: torch.nn.Module, x: torch.Tensor, end2end: bool) -> torch.Tensor:
    """The raw boxes and class logits of the head branch inference runs (before decoding and top-k)."""
    model.eval()
    with torch.no_grad():
        preds = model(x)[1]
    branch = preds[("one2one" if end2end else "one2many")] if "one2one" in preds else preds  # one branch: flat
    return torch.cat([branch["boxes"], branch["scores"]], 1)


@pytest.mark.parametrize("names", [None, NEW], ids=["same classes", "new classes"])
@pytest.mark.parametrize("end2end", [False, True], ids=["one-to-many (NMS)", "one-to-one (nms=False)"])
def test_yolo26_either_head_branch_equals_the_merged_model(base26, end2end, names):
    # Training adapts both branches; Ultralytics' fuse keeps the one `end2end` selects. Served, the kept branch's
    # adapters apply and the removed branch's are left out; the result is what YOLO(merged.pt) predicts with.
    trained, adapter = random_adapter(base26, names=names, scale=0.3)
    assert any(".one2one_cv2." in n for n in adapter.layers) and any(".cv2." in n for n in adapter.layers)
    merged = merge_lora(trained)
    merged.end2end = end2end
    merged.fuse(verbose=False)
    model = AdapterModel(base26, end2end=end2end)
    model.set_adapter(model.load_adapter(adapter, "a"))
    head = model.model.model[-1]
    assert head.end2end == end2end and (head.cv2 is None) == end2end and (head.one2one_cv2 is None) != end2end
    got, want = branch_output(model.model, X, end2end), branch_output(merged, X, end2end)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4 * want.abs().max()
    boxes = 4 * head.reg_max  # the rows the base shares with every class set
    model.disable_adapters()
    assert (branch_output(model.model, X, end2end)[:, :boxes] - want[:, :boxes]).abs().max() > 1e-2  # it did change


@pytest.mark.parametrize("end2end", [False, True], ids=["one-to-many (NMS)", "one-to-one (nms=False)"])
def test_yolo26_train_head_adapter_serves_the_merged_head(base26, end2end):
    # The adapter's head (both branches, BatchNorm statistics included) is fused as Ultralytics fuses it, keeping the
    # branch `end2end` selects; switching back puts the base's own fused head in place, bit for bit.
    trained, adapter = random_adapter(base26, LoraConfig(train_head=True), names=NEW, scale=0.3)
    assert any(".one2one_cv2." in n and n.endswith("bn.running_var") for n in adapter.full)
    merged = merge_lora(trained)
    merged.end2end = end2end
    merged.fuse(verbose=False)
    model = AdapterModel(base26, end2end=end2end)
    base = branch_output(model.model, X, end2end)
    model.set_adapter(model.load_adapter(adapter, "a"))
    head = model.model.model[-1]
    assert (head.cv2 is None) == end2end and (head.one2one_cv2 is None) != end2end and head.nc == len(NEW)
    got, want = branch_output(model.model, X, end2end), branch_output(merged, X, end2end)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4 * want.abs().max()
    model.disable_adapters()
    assert torch.equal(branch_output(model.model, X, end2end), base)


@pytest.mark.parametrize("use_dora, train_bias", [(False, False), (True, False), (True, True)])
def test_adapters_on_repconv_branches_are_served_in_the_conv_fuse_makes(tmp_path, use_dora, train_bias):
    """YOLOv9's RepConv becomes one new conv when fused (s1 W1 + s2 W2, the 1x1 padded): the adapters of its two
    branch convs are applied to that conv, and with train_bias both branches' shifts to its bias, so serving equals
    the merged model, unmerged and merged."""
    base = make_base(tmp_path / "yolov9t.pt", "yolov9t.yaml")
    _, adapter = random_adapter(base, LoraConfig(use_dora=use_dora, train_bias=train_bias), scale=0.3)
    assert train_bias == any(k.endswith(".conv1.bn.bias") for k in adapter.full)
    repconvs = sorted({n.rsplit(".", 2)[0] for n in adapter.layers if n.endswith((".conv1.conv", ".conv2.conv"))})
    assert repconvs == sorted(n for n, m in load_model(base).named_modules() if isinstance(m, RepConv))  # all 42
    x = torch.rand(1, 3, 64, 64)
    merged = merge_lora(attach_adapter(load_model(base), adapter)).fuse(verbose=False).eval()
    model = AdapterModel(base)
    model.set_adapter(model.load_adapter(adapter))
    for merge in (False, True):
        if merge:
            model.merge_adapter()
        assert torch.allclose(head_output(model.model, x), head_output(merged, x), rtol=1e-4, atol=1e-4)
        for path in repconvs:  # each fused RepConv on its own: the whole model's output hardly sees some of them
            ours, theirs = model.model.get_submodule(path), merged.get_submodule(path)
            z = torch.randn(1, theirs.c1, 8, 8)
            with torch.no_grad():
                assert torch.allclose(ours(z), theirs(z), rtol=1e-4, atol=1e-4), path
    model.disable_adapters()
    assert torch.equal(head_output(model.model, x), head_output(load_model(base).fuse(verbose=False), x))


def test_yolo26_branch_mismatches_are_refused(base26):
    """An adapter that only touches the branch fuse removed would change nothing; nms= asking for the removed branch
    would run the other one. Both are one clear error instead."""
    _, adapter = random_adapter(base26, scale=0.3)
    one2one = [n for n in adapter.layers if ".one2one_" in n]
    only = copy.deepcopy(adapter)
    only.layers = {n: adapter.layers[n] for n in one2one}
    only.tensors = {k: t for k, t in adapter.tensors.items() if k.rsplit(".lora_", 1)[0] in one2one}
    with pytest.raises(LoraYoloError, match=r"only changes the head branch this model does not run \(it keeps the "
                                            r"one-to-many \(NMS\) branch\)"):  # fmt: skip
        AdapterModel(base26).load_adapter(only)
    AdapterModel(base26, end2end=True).load_adapter(only)  # the branch it adapts: fine
    image = sorted((SHAPES_B1.parent / "images" / "val").glob("*.jpg"))[0]
    with pytest.raises(LoraYoloError, match=r"nms=False needs the other head branch.*end2end=True"):
        AdapterModel(base26).predict(image, nms=False, verbose=False)
    with pytest.raises(LoraYoloError, match=r"nms=True needs the other head branch.*end2end=False"):
        AdapterModel(base26, end2end=True).val(data=str(SHAPES_B1), nms=True)
    assert len(AdapterModel(base26).predict(image, nms=True, imgsz=64, verbose=False)) == 1  # the branch it keeps


def test_class_set_after_a_merged_adapter_starts_from_the_base(base_pt):
    """An add_classes=exact adapter (served with the base's own class branches) loaded while another adapter with LoRA
    on the class convs is merged must take those convs from the base, not from the merged weights; switching back
    gives the first adapter exactly as before. Compared on the raw class logits (a random base's sigmoid scores are
    all near 0, where differences vanish)."""

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(X)[1]["scores"]

    trained_a, a = random_adapter(base_pt, seed=1, scale=0.5)
    names = {**load_model(base_pt).names, **{80 + i: n for i, n in NEW.items()}}  # the base's classes, then more
    _, c = random_adapter(base_pt, LoraConfig(add_classes="exact"), seed=3, names=names)
    model = AdapterModel(base_pt)
    model.set_adapter(model.load_adapter(a, "a"))
    want_a = logits(model.model)
    model.merge_adapter()
    model.set_adapter(model.load_adapter(c, "c"))
    want_c = logits(merge_lora(attach_adapter(load_model(base_pt), c)).fuse(verbose=False))  # the base's rows
    assert (logits(model.model) - want_c).abs().max() < 1e-4
    model.set_adapter("a")
    assert (logits(model.model) - want_a).abs().max() < 1e-4
