"""YOLO26's per-pixel tasks end to end on generated data: semantic segmentation (`-sem`: the SemanticSegment head's
class convs adapted or, for a new class set, trained in full; polygon labels, Ultralytics adds its background class)
and depth (`-depth`: no classes, every conv adapted). Train, merge, plain-Ultralytics loading, ONNX, serving with
`--adapter`, PEFT and the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, all_outputs, make_base, peft_and_ours, plain_ultralytics, save_base
from torch.nn import functional as F
from ultralytics import YOLO
from ultralytics.nn.tasks import SemanticSegmentationModel

from lora_yolo import LoraConfig, LoraYoloError, attach_adapter, load_adapter, load_model
from lora_yolo.checkpoint import build_for_classes
from lora_yolo.export import export_model
from lora_yolo.serve import AdapterModel, validate
from lora_yolo.synth import DOMAINS, make_dataset
from lora_yolo.targets import class_layers, describe_convs
from lora_yolo.train import train

pytestmark = pytest.mark.slow
NAMES = {**dict(enumerate(DOMAINS["A"].classes)), 3: "background"}  # the data's classes as Ultralytics reads them
# run -> (task, the base already has the data's classes). Semantic, same classes: the class convs get adapters
# (rank 2 fits their 4 outputs); other classes (the YAML's 19): in full. Depth has no classes.
RUNS = {"semantic-same-classes": ("semantic", True), "semantic-new-classes": ("semantic", False), "depth": ("depth", 1)}
# task -> (score key, the summary's row label, the CLI's val line start, shape of the eval output for X)
TASK = {
    "semantic": ("mIoU", "mIoU / pixel accuracy", "mIoU", (2, 4, 8, 8)),  # logits at stride 8
    "depth": ("delta1", "delta1 / abs_rel", "delta1", (2, 1, 16, 16)),  # metres at stride 4
}
X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def semantic_base(path: Path, names: dict | None) -> Path:
    """A random yolo26n-sem base; with `names`, built for exactly those classes."""
    torch.manual_seed(0)
    model = SemanticSegmentationModel("yolo26n-sem.yaml", nc=len(names) if names else None, verbose=False)
    model.names = dict(names) if names else {i: f"class{i}" for i in range(model.model[-1].nc)}
    model.args, model.task = {}, "semantic"
    return save_base(model, path)


@pytest.fixture(scope="module", params=sorted(RUNS))
def dense_run(request, tmp_path_factory):
    task, same = RUNS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    data = make_dataset(
        folder / "data", "A", n_train=8, n_val=4, imgsz=64, seed=0, task=task.replace("semantic", "segment")
    )
    if task == "semantic":
        base = semantic_base(folder / "base.pt", NAMES if same else None)
    else:
        base = make_base(folder / "base.pt", "yolo26n-depth.yaml")
    result = train(data, model=base, config=LoraConfig(r=2, lora_alpha=4), project=str(folder / "runs"), name="d",
                   **TINY)  # fmt: skip
    return task, same, base, data, result


def output(model: torch.nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    """The eval output: semantic logits (the auxiliary head is idle in eval) or calibrated depth."""
    (y,) = all_outputs(model, x)
    return y


def test_trains_and_merges_exactly(dense_run):
    task, same, base, _, result = dense_run
    score, label, _, shape = TASK[task]
    adapter = load_adapter(result.adapter)
    assert adapter.task == task and adapter.names == (NAMES if task == "semantic" else {0: "depth"})
    heads = class_layers(load_model(base))
    if task == "depth":
        assert heads == [] and not adapter.full  # nothing to train in full
        transposed = [row for row in describe_convs(load_model(base), LoraConfig()) if row.kind == "transposed"]
        assert transposed and all(not row.selected and "transposed conv" in row.reason for row in transposed)
    else:
        assert sorted(h.split(".", 2)[2] for h in heads) == ["aux_head.1", "classifier.1"]
    if task == "semantic" and same:  # the class convs adapted like any other conv, nothing in full
        assert not adapter.full and set(heads) <= set(adapter.layers)
    elif task == "semantic":  # 19 -> 4 classes: both class convs trained in full
        assert set(adapter.full) == {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    assert any(t.abs().sum() > 0 for k, t in adapter.tensors.items() if k.endswith("lora_B.weight"))
    merged, unmerged = output(load_model(result.merged)), output(attach_adapter(load_model(base), adapter))
    assert merged.shape == shape and torch.allclose(merged, unmerged, rtol=1e-4, atol=1e-4)
    before = build_for_classes(load_model(base), adapter.nc, adapter.names)
    assert (unmerged - output(before)).abs().max() > 1e-4  # training did move it
    assert score in result.metrics and f"{label}, fine-tuned" in result.table()
    assert (f"{label}, base zero-shot  n/a" in result.table()) != bool(same)  # zero-shot for the base's own outputs


def test_merged_validates_the_same_in_plain_ultralytics(dense_run):
    task, _, _, data, result = dense_run
    got = plain_ultralytics(f"""
        import json
        from ultralytics import YOLO
        m = YOLO({str(result.merged)!r})
        r = m.val(data={str(data)!r}, imgsz=64, batch=4, device="cpu", plots=False, workers=0)
        p = m.predict({str(data.parent / "images" / "val")!r}, imgsz=64, verbose=False)
        maps = [list((x.semantic_mask if x.semantic_mask is not None else x.depth).data.shape) for x in p]
        print(json.dumps({{"score": r.fitness, "task": m.task, "nc": len(m.names), "maps": maps}}))
    """)
    assert got["task"] == task and got["nc"] == len(load_adapter(result.adapter).names)
    assert got["score"] == pytest.approx(result.metrics[TASK[task][0]]) and got["maps"] == [[64, 64]] * 4


def test_exports_to_onnx_matching_pytorch(dense_run, tmp_path):
    import onnxruntime as ort

    task, _, _, _, result = dense_run
    onnx = export_model(result.merged, "onnx", output=tmp_path / "m.onnx", imgsz=64)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X[:1].numpy()})
    y = output(load_model(result.merged).fuse(verbose=False), X[:1])
    if task == "depth":  # exported as Ultralytics' export mode computes it: depth upsampled to the input size
        want = F.interpolate(y, scale_factor=4.0, mode="bilinear", align_corners=True).numpy()
        assert got.shape == want.shape == (1, 1, 64, 64) and np.allclose(got, want, rtol=1e-4, atol=1e-4)
        return
    y = F.interpolate(y, scale_factor=8, mode="bilinear")  # Ultralytics bakes the argmax into the graph
    want = y.argmax(1).numpy()
    assert got.shape == want.shape == (1, 64, 64) and got.dtype == np.uint8
    top2 = y.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1] < 1e-4).numpy()  # float rounding may pick the other of two equal logits
    assert np.array_equal(got[~near_tie], want[~near_tie]) and near_tie.mean() < 0.01


def test_served_with_adapter_equals_the_merged_checkpoint(dense_run):
    task, _, base, data, result = dense_run
    images = sorted((data.parent / "images" / "val").glob("*.jpg"))
    model = AdapterModel(base)
    head_nc = getattr(model.model.model[-1], "nc", None)  # semantic: what the exported argmax reduces over
    model.set_adapter(model.load_adapter(result.adapter))
    assert getattr(model.model.model[-1], "nc", None) == (None if task == "depth" else 4)
    merged = YOLO(str(result.merged))
    assert torch.allclose(output(model.model), output(load_model(result.merged)), rtol=1e-4, atol=1e-4)
    served, want = model.predict(images, imgsz=64, verbose=False), merged.predict(images, imgsz=64, verbose=False)
    if task == "depth":
        assert all(torch.allclose(a.depth.data, b.depth.data, rtol=1e-4, atol=1e-4) for a, b in zip(served, want))
    else:
        same = [(a.semantic_mask.data == b.semantic_mask.data).float().mean() for a, b in zip(served, want)]
        assert min(same) > 0.99 and served[0].names == NAMES
    model.disable_adapters()
    assert getattr(model.model.model[-1], "nc", None) == head_nc  # the base's class count back
    plain = YOLO(str(base)).model.fuse(verbose=False)  # what Ultralytics predicts the base with
    assert torch.equal(output(model.model), output(plain))  # the base exactly, its own class set back
    metrics = validate(data, base, result.adapter, imgsz=64, batch=4, plots=False)
    assert metrics.fitness == pytest.approx(result.metrics[TASK[task][0]], abs=1e-3)


def test_peft_loads_the_adapter_with_the_same_outputs(dense_run, tmp_path):
    _, _, base, _, result = dense_run
    theirs, ours = peft_and_ours(base, result.adapter, tmp_path / "peft")
    assert torch.allclose(output(theirs), output(ours), rtol=1e-4, atol=1e-5)


def test_cli_val_and_predict_speak_the_task(dense_run, cli_here, tmp_path):
    task, _, base, data, result = dense_run
    key, _, line, _ = TASK[task]
    val = cli_here("val", data, "--model", base, "--adapter", result.adapter, "--imgsz", 64, f"project={tmp_path}")
    assert val.returncode == 0 and f"{line} {result.metrics[key]:.4f}" in val.stdout, val.stderr[-2000:]
    source = data.parent / "images" / "val"
    images = cli_here(
        "predict", source, "--model", base, "--adapter", result.adapter, "--imgsz", 64, f"project={tmp_path}"
    )
    assert images.returncode == 0 and "4 images; results in" in images.stdout  # a map per image, no boxes


def test_add_classes_is_refused(dense_run, tmp_path):
    task, _, base, data, _ = dense_run
    with pytest.raises(LoraYoloError, match=f"not {task} ones"):
        train(data, model=base, config=LoraConfig(add_classes="exact"), project=str(tmp_path), **TINY)
    assert not any(tmp_path.iterdir())  # refused before a run folder was made


@pytest.mark.parametrize(
    "task, data_task, message",
    [
        ("depth", "segment", "none of the 2 train images has a depth target (depth/train/NAME.png"),
        ("semantic", "depth", "none of the 2 train images has a semantic target (labels/train/NAME.txt polygons"),
        ("semantic", "detect", "a box label; semantic segmentation reads polygons"),
    ],
)
def test_data_for_another_task_is_one_clear_line(tmp_path, task, data_task, message):
    data = make_dataset(tmp_path / "data", "A", n_train=2, n_val=2, imgsz=64, seed=0, task=data_task)
    base = (
        semantic_base(tmp_path / "b.pt", NAMES)
        if task == "semantic"
        else make_base(tmp_path / "b.pt", "yolo26n-depth.yaml")
    )
    with pytest.raises(LoraYoloError, match=re.escape(message)):
        train(data, model=base, project=str(tmp_path / "runs"), **TINY)
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made
