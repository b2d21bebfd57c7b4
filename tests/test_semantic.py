"""YOLO26 semantic segmentation (`-sem`): the SemanticSegment head's class convs adapted or, for a new class set,
trained in full; train, merge, plain-Ultralytics loading, ONNX, serving with `--adapter` and PEFT, end to end on
generated polygon data (Ultralytics adds its background class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, all_outputs, peft_and_ours, plain_ultralytics, save_base
from torch.nn import functional as F
from ultralytics import YOLO
from ultralytics.nn.tasks import SemanticSegmentationModel

from lora_yolo import LoraConfig, LoraYoloError, attach_adapter, load_adapter, load_model
from lora_yolo.checkpoint import build_for_classes
from lora_yolo.export import export_model
from lora_yolo.serve import AdapterModel, validate
from lora_yolo.synth import DOMAINS, make_dataset
from lora_yolo.targets import class_layers
from lora_yolo.train import train

pytestmark = pytest.mark.slow
NAMES = {**dict(enumerate(DOMAINS["A"].classes)), 3: "background"}  # the data's classes as Ultralytics reads them
# Same classes: the class convs get adapters (rank 2 fits their 4 outputs); other classes (the YAML's 19): in full.
RUNS = {"same-classes": True, "new-classes": False}
X = torch.rand(2, 3, 64, 64)


def semantic_base(path: Path, names: dict | None) -> Path:
    """A random yolo26n-sem base; with `names`, built for exactly those classes."""
    torch.manual_seed(0)
    model = SemanticSegmentationModel("yolo26n-sem.yaml", nc=len(names) if names else None, verbose=False)
    model.names = dict(names) if names else {i: f"class{i}" for i in range(model.model[-1].nc)}
    model.args, model.task = {}, "semantic"
    return save_base(model, path)


@pytest.fixture(scope="module", params=sorted(RUNS))
def sem_run(request, tmp_path_factory):
    same = RUNS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    data = make_dataset(folder / "data", "A", n_train=8, n_val=4, imgsz=64, seed=0, task="segment")
    base = semantic_base(folder / "base.pt", NAMES if same else None)
    result = train(data, model=base, config=LoraConfig(r=2, lora_alpha=4), project=str(folder / "runs"), name="s",
                   **TINY)  # fmt: skip
    return same, base, data, result


def logits(model: torch.nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    (y,) = all_outputs(model, x)  # eval mode: the main classifier's logits at stride 8 (the auxiliary head is idle)
    return y


def test_trains_the_class_convs_and_merges_exactly(sem_run):
    same, base, _, result = sem_run
    adapter = load_adapter(result.adapter)
    assert adapter.task == "semantic" and adapter.names == NAMES
    heads = class_layers(load_model(base))
    assert [h.rpartition(".")[2] for h in heads] == ["1", "1"] and {h.split(".")[2] for h in heads} == {
        "classifier",
        "aux_head",
    }
    if same:  # the class convs adapted like any other conv, nothing in full
        assert not adapter.full and set(heads) <= set(adapter.layers)
    else:  # 19 -> 4 classes: both class convs trained in full
        assert set(adapter.full) == {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    assert any(t.abs().sum() > 0 for k, t in adapter.tensors.items() if k.endswith("lora_B.weight"))
    merged, unmerged = logits(load_model(result.merged)), logits(attach_adapter(load_model(base), adapter))
    assert merged.shape == (2, 4, 8, 8) and torch.allclose(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert (unmerged - logits(build_for_classes(load_model(base), 4, NAMES))).abs().max() > 1e-4  # training did move
    assert "mIoU" in result.metrics and "mIoU / pixel accuracy, fine-tuned" in result.table()
    assert ("mIoU / pixel accuracy, base zero-shot  n/a" in result.table()) != same  # zero-shot only for its classes


def test_merged_validates_the_same_in_plain_ultralytics(sem_run):
    _, _, data, result = sem_run
    got = plain_ultralytics(f"""
        import json
        from ultralytics import YOLO
        m = YOLO({str(result.merged)!r})
        r = m.val(data={str(data)!r}, imgsz=64, batch=4, device="cpu", plots=False, workers=0)
        p = m.predict({str(data.parent / "images" / "val")!r}, imgsz=64, verbose=False)
        print(json.dumps({{"miou": r.miou, "task": m.task, "names": m.names, "maps": [list(x.semantic_mask.data.shape)
                                                                                  for x in p]}}))
    """)
    assert got["task"] == "semantic" and got["names"] == {str(k): v for k, v in NAMES.items()}
    assert got["miou"] == pytest.approx(result.metrics["mIoU"]) and got["maps"] == [[64, 64]] * 4


def test_exports_to_onnx_matching_pytorch(sem_run, tmp_path):
    import onnxruntime as ort

    _, _, _, result = sem_run
    onnx = export_model(result.merged, "onnx", output=tmp_path / "m.onnx", imgsz=64)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X[:1].numpy()})  # Ultralytics bakes the argmax in
    y = F.interpolate(logits(load_model(result.merged).fuse(verbose=False), X[:1]), scale_factor=8, mode="bilinear")
    want = y.argmax(1).numpy()
    assert got.shape == want.shape == (1, 64, 64) and got.dtype == np.uint8
    top2 = y.topk(2, dim=1).values
    near_tie = (top2[:, 0] - top2[:, 1] < 1e-4).numpy()  # float rounding may pick the other of two equal logits
    assert np.array_equal(got[~near_tie], want[~near_tie]) and near_tie.mean() < 0.01


def test_served_with_adapter_equals_the_merged_checkpoint(sem_run):
    _, base, data, result = sem_run
    images = sorted((data.parent / "images" / "val").glob("*.jpg"))
    model = AdapterModel(base)
    model.set_adapter(model.load_adapter(result.adapter))
    merged = YOLO(str(result.merged))
    assert torch.allclose(logits(model.model), logits(load_model(result.merged)), rtol=1e-4, atol=1e-4)
    served, want = model.predict(images, imgsz=64, verbose=False), merged.predict(images, imgsz=64, verbose=False)
    same = [(a.semantic_mask.data == b.semantic_mask.data).float().mean() for a, b in zip(served, want)]
    assert min(same) > 0.99 and served[0].names == NAMES
    model.disable_adapters()
    plain = YOLO(str(base)).model.fuse(verbose=False)  # what Ultralytics predicts the base with
    assert torch.equal(logits(model.model), logits(plain))  # the base exactly, its own class set back
    metrics = validate(data, base, result.adapter, imgsz=64, batch=4, plots=False)
    assert metrics.miou == pytest.approx(result.metrics["mIoU"], abs=1e-3)


def test_peft_loads_the_adapter_with_the_same_outputs(sem_run, tmp_path):
    _, base, _, result = sem_run
    theirs, ours = peft_and_ours(base, result.adapter, tmp_path / "peft")
    assert torch.allclose(logits(theirs), logits(ours), rtol=1e-4, atol=1e-5)


def test_cli_val_and_predict_speak_semantic_segmentation(sem_run, cli_here, tmp_path):
    _, base, data, result = sem_run
    val = cli_here("val", data, "--model", base, "--adapter", result.adapter, "--imgsz", 64, f"project={tmp_path}")
    assert val.returncode == 0 and f"mIoU {result.metrics['mIoU']:.4f}" in val.stdout, val.stderr[-2000:]
    source = data.parent / "images" / "val"
    images = cli_here(
        "predict", source, "--model", base, "--adapter", result.adapter, "--imgsz", 64, f"project={tmp_path}"
    )
    assert images.returncode == 0 and "4 images; results in" in images.stdout  # a class map per image, no boxes


def test_add_classes_is_refused_for_semantic_segmentation(sem_run, tmp_path):
    _, base, data, _ = sem_run
    with pytest.raises(LoraYoloError, match="not semantic ones"):
        train(data, model=base, config=LoraConfig(add_classes="exact"), project=str(tmp_path), **TINY)
    assert not any(tmp_path.iterdir())  # refused before a run folder was made
