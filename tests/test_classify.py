"""Classification (YOLO11 and YOLO26 `-cls`): the Classify head's linear layer adapted by `LoraLinear` or, for a new
class set, trained in full; train, merge, plain-Ultralytics loading, ONNX, serving with `--adapter` and PEFT, end to
end on generated data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, all_outputs, peft_and_ours, plain_ultralytics, save_base
from ultralytics import YOLO
from ultralytics.nn.tasks import ClassificationModel

from lora_yolo import LoraConfig, attach_adapter, load_adapter, load_model
from lora_yolo.export import export_model
from lora_yolo.serve import AdapterModel, validate
from lora_yolo.synth import DOMAINS, make_dataset
from lora_yolo.targets import describe_convs
from lora_yolo.train import train

pytestmark = pytest.mark.slow
NAMES = dict(enumerate(DOMAINS["A"].classes))
# family -> (model YAML, the base already has the data's classes). Same classes: the linear layer gets an adapter
# (rank 2 fits its 3 outputs); other classes (the YAML's 1000 placeholders): it is trained in full.
RUNS = {"11-same-classes": ("yolo11n-cls.yaml", True), "26-new-classes": ("yolo26n-cls.yaml", False)}
X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def classify_base(path: Path, cfg: str, names: dict | None) -> Path:
    """A random classification base from `cfg`; with `names`, built for exactly those classes."""
    torch.manual_seed(0)
    model = ClassificationModel(cfg, nc=len(names), verbose=False) if names else load_model(cfg)
    if names:
        model.names, model.args, model.task = dict(names), {}, "classify"
    return save_base(model, path)


@pytest.fixture(scope="module", params=sorted(RUNS))
def cls_run(request, tmp_path_factory):
    cfg, same = RUNS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    data = make_dataset(folder / "data", "A", n_train=12, n_val=6, imgsz=64, seed=0, task="classify")
    base = classify_base(folder / "base.pt", cfg, NAMES if same else None)
    result = train(data, model=base, config=LoraConfig(r=2, lora_alpha=4), project=str(folder / "runs"), name="c",
                   **TINY)  # fmt: skip
    return same, base, data, result


def linear_of(model: torch.nn.Module) -> str:
    return f"model.{len(model.model) - 1}.linear"


def test_trains_the_linear_head_and_merges_exactly(cls_run):
    same, base, _, result = cls_run
    adapter = load_adapter(result.adapter)
    linear = linear_of(load_model(base))
    assert adapter.task == "classify" and adapter.nc == 3 and adapter.names == NAMES
    if same:  # an adapter on the linear layer, A (r, in) and B (out, r), nothing in full
        assert linear in adapter.layers and not adapter.full
        assert adapter.tensors[f"{linear}.lora_A.weight"].shape == (2, 1280)
        assert adapter.tensors[f"{linear}.lora_B.weight"].shape == (3, 2)
    else:  # a new class set: the linear layer in full, one row per class
        assert linear not in adapter.layers and sorted(adapter.full) == [f"{linear}.bias", f"{linear}.weight"]
        assert adapter.tensors[f"{linear}.weight"].shape == (3, 1280)
    assert any(t.abs().sum() > 0 for k, t in adapter.tensors.items() if k.endswith("lora_B.weight"))  # it trained
    assert set(result.metrics) == {"top1", "top5"} and "top-1 / top-5 accuracy, fine-tuned" in result.table()
    unmerged = all_outputs(attach_adapter(load_model(base), adapter), X)  # probabilities and logits
    merged = all_outputs(load_model(result.merged), X)
    assert len(merged) == 2 and merged[0].shape == (2, 3)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(merged, unmerged))
    assert (unmerged[1] - all_outputs(load_model(base), X)[1][:, :3]).abs().max() > 1e-4  # the adapter changes it


def test_merged_validates_the_same_in_plain_ultralytics(cls_run):
    _, _, data, result = cls_run
    got = plain_ultralytics(f"""
        import json
        from ultralytics import YOLO
        m = YOLO({str(result.merged)!r})
        r = m.val(data={str(data)!r}, imgsz=64, batch=4, device="cpu", plots=False, workers=0)
        print(json.dumps({{"top1": r.top1, "task": m.task, "nc": len(m.names)}}))
    """)
    assert got["task"] == "classify" and got["nc"] == 3 and got["top1"] == pytest.approx(result.metrics["top1"])


def test_exports_to_onnx_matching_pytorch(cls_run, tmp_path):
    import onnxruntime as ort

    _, _, _, result = cls_run
    onnx = export_model(result.merged, "onnx", output=tmp_path / "m.onnx", imgsz=64)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X[:1].numpy()})  # exported for batch 1
    want = all_outputs(load_model(result.merged).fuse(verbose=False), X[:1])[0]  # Classify's probabilities
    assert np.allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_served_with_adapter_equals_the_merged_checkpoint(cls_run):
    _, base, data, result = cls_run
    images = sorted((data / "val").rglob("*.jpg"))
    model = AdapterModel(base)
    model.set_adapter(model.load_adapter(result.adapter))
    merged = YOLO(str(result.merged))
    for served in (model.predict(images, imgsz=64, verbose=False), None):
        if served is None:  # the same once merged into the weights
            model.merge_adapter()
            served = model.predict(images, imgsz=64, verbose=False)
        want = merged.predict(images, imgsz=64, verbose=False)
        assert all(torch.allclose(a.probs.data, b.probs.data, atol=1e-5) for a, b in zip(served, want))
        assert served[0].names == NAMES
    model.disable_adapters()
    plain = YOLO(str(base)).predict(images[:2], imgsz=64, verbose=False)
    assert all(
        torch.equal(a.probs.data, b.probs.data)
        for a, b in zip(model.predict(images[:2], imgsz=64, verbose=False), plain)
    )
    metrics = validate(data, base, result.adapter, imgsz=64, batch=4, plots=False)
    assert metrics.top1 == pytest.approx(result.metrics["top1"])


def test_peft_loads_the_adapter_with_the_same_outputs(cls_run, tmp_path):
    _, base, _, result = cls_run
    theirs, ours = peft_and_ours(base, result.adapter, tmp_path / "peft")
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(all_outputs(theirs, X), all_outputs(ours, X)))


def test_multihead_attention_out_proj_is_skipped_with_the_reason():
    """RT-DETR's AIFI layer is an nn.MultiheadAttention, whose forward reads out_proj.weight itself."""
    from ultralytics.nn.tasks import RTDETRDetectionModel

    rows = describe_convs(RTDETRDetectionModel("rtdetr-l.yaml", verbose=False), LoraConfig())
    out_proj = [row for row in rows if row.name.endswith(".ma.out_proj")]
    assert out_proj and all(not row.selected and "MultiheadAttention" in row.reason for row in out_proj)
    linear = [row for row in rows if row.kind == "linear" and row.selected]
    assert linear and all(row.lora_params == row.r * (row.in_channels + row.out_channels) for row in linear)


def test_cli_val_and_predict_speak_classification(cls_run, cli_here, tmp_path):
    _, base, data, result = cls_run
    val = cli_here("val", data, "--model", base, "--adapter", result.adapter, "--imgsz", 64, f"project={tmp_path}")
    assert val.returncode == 0 and f"top-1 {result.metrics['top1']:.4f}" in val.stdout, val.stderr[-2000:]
    folder = cli_here("predict", data / "val", "--model", base, "--adapter", result.adapter, f"project={tmp_path}")
    assert folder.returncode == 1 and "No images or videos found" in folder.stderr  # class subfolders: one line
    images = cli_here("predict", data / "val" / "circle", "--model", base, "--adapter", result.adapter, "--imgsz", 64,
                      f"project={tmp_path}")  # fmt: skip
    n = len(list((data / "val" / "circle").glob("*.jpg")))
    assert images.returncode == 0 and f"{n} images; results in" in images.stdout  # one label per image, no boxes
