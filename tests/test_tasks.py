"""Every task of YOLO11 and YOLO26 beyond YOLO11 detection (test_train.py): train, merge, serve and export with LoRA,
end to end on generated data. YOLO26's heads have two branches (one-to-many and the NMS-free one-to-one), both
adapted and both merged; each is checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import ultralytics
import yaml
from conftest import TINY, all_outputs, make_base
from ultralytics import YOLO

from lora_yolo import LoraYoloError, attach_adapter, load_adapter, load_model
from lora_yolo.export import export_model
from lora_yolo.serve import AdapterModel
from lora_yolo.synth import make_dataset
from lora_yolo.targets import bias_tensors, head_tensors
from lora_yolo.train import train

pytestmark = pytest.mark.slow
CFG = Path(ultralytics.__file__).parent / "cfg" / "models"
SUFFIX = {"detect": "", "segment": "-seg", "obb": "-obb", "pose": "-pose"}
RUNS = ["11-segment", "11-pose", "11-obb", "26-detect", "26-segment", "26-pose", "26-obb"]


def base_for(family: str, task: str, folder: Path) -> Path:
    """A random yolo11n / yolo26n base of the task: 80 classes (the data has 3, so class layers retrain in full); for
    pose, the data's keypoint layout (2 keypoints), as a pose base pretrained on that layout would have."""
    cfg = f"yolo{family}n{SUFFIX[task]}.yaml"
    if task == "pose":
        text = (CFG / family / f"yolo{family}-pose.yaml").read_text().replace("kpt_shape: [17, 3]", "kpt_shape: [2, 3]")
        (folder / cfg).write_text(text)
        cfg = str(folder / cfg)
    return make_base(folder / f"{family}-{task}-base.pt", cfg)


@pytest.fixture(scope="module", params=RUNS)
def task_run(request, tmp_path_factory):
    family, task = request.param.split("-")
    folder = tmp_path_factory.mktemp(request.param)
    data = make_dataset(folder / "data", "A", n_train=8, n_val=4, imgsz=64, seed=0, task=task)
    base = base_for(family, task, folder)
    result = train(data, model=base, project=str(folder / "runs"), name=task, **TINY)
    return task, base, data, result


def raw(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's inference outputs, as its ONNX export has them: boxes, classes and the task's extra channels
    (mask coefficients, keypoints, angle), plus the mask prototypes for segmentation."""
    model.eval()
    with torch.no_grad():
        y = model(x)[0]
    return list(y) if isinstance(y, (list, tuple)) else [y]


def close(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        np.allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-4) for u, v in zip(a, b)
    )


def test_trains_with_the_tasks_own_trainer_and_merges_exactly(task_run):
    task, base, _, result = task_run
    adapter = load_adapter(result.adapter)
    assert adapter.task == task and adapter.nc == 3 and adapter.full  # 80 -> 3 classes: class layers in full
    assert any(t.abs().sum() > 0 for k, t in adapter.tensors.items() if k.endswith("lora_B.weight"))
    merged = YOLO(str(result.merged))  # plain Ultralytics
    assert merged.task == task and len(merged.names) == 3
    x = torch.rand(2, 3, 64, 64)
    unmerged = all_outputs(attach_adapter(load_model(base), adapter), x)
    assert close(all_outputs(load_model(result.merged), x), unmerged)
    extra = {"detect": 0, "segment": 32, "pose": 2 * 3, "obb": 1}[task]  # mask coeffs, 2 keypoints x (x, y, v), angle
    assert unmerged[0].shape[1] == 4 + 3 + extra
    plain = load_model(base)
    two = getattr(plain.model[-1], "one2one_cv2", None) is not None  # YOLO26
    # the default trains the head in full (train_head; YOLO26: both branches, BatchNorm statistics included) and
    # adapts every other layer, training the BatchNorm shift after each (train_bias)
    shifts = bias_tensors(dict(plain.named_modules()), adapter.layers)
    assert len(shifts) > 50 and sorted(adapter.full) == sorted([*head_tensors(plain), *shifts])  # names only
    assert not any(n.startswith(f"model.{len(plain.model) - 1}.") for n in adapter.layers)
    assert two == any(".one2one_cv2." in k and k.endswith(".running_var") for k in adapter.full)
    # merged.pt validated by the task's own validator, its mask / keypoint mAP in the summary too
    kind = {"segment": "mask", "pose": "pose"}.get(task)
    if kind:
        assert f"{kind} mAP50-95" in result.metrics and f"{kind} mAP50 / mAP50-95, fine-tuned" in result.table()


def test_served_with_adapter_gives_the_tasks_results(task_run):
    task, base, data, result = task_run
    model = AdapterModel(base)
    model.set_adapter(model.load_adapter(result.adapter))
    image = sorted((data.parent / "images" / "val").glob("*.jpg"))[0]
    out = model.predict(image, imgsz=64, conf=0.0, max_det=3, verbose=False)[0]
    extra = {"detect": out.boxes, "segment": out.masks, "pose": out.keypoints, "obb": out.obb}[task]
    assert extra is not None and len(extra) > 0 and out.names == load_adapter(result.adapter).names


def test_exports_to_onnx_matching_pytorch(task_run, tmp_path):
    import onnxruntime as ort

    _, _, _, result = task_run
    onnx = export_model(result.merged, "onnx", output=tmp_path / "m.onnx", imgsz=64)
    x = torch.rand(1, 3, 64, 64)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert close(got, raw(load_model(result.merged).fuse(verbose=False), x))


def test_pose_data_with_another_keypoint_layout_is_refused(tmp_path):
    data = make_dataset(tmp_path / "data", "A", n_train=2, n_val=2, imgsz=64, seed=0, task="pose")  # 2 keypoints
    base = make_base(tmp_path / "pose17.pt", "yolo11n-pose.yaml")  # 17 keypoints
    with pytest.raises(LoraYoloError, match=r"kpt_shape \[2, 3\] differs from the base's \[17, 3\]"):
        train(data, model=base, project=str(tmp_path / "runs"), **TINY)
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_pose_from_a_model_yaml_takes_the_data_keypoints_and_needs_them(tmp_path):
    """A base built from a model YAML (`.yml` too) takes the dataset's keypoint layout, so a 17-keypoint YAML trains
    on 2-keypoint data and its base is kept for merge; a pose dataset without kpt_shape is one line, before a run
    folder is made."""
    data = make_dataset(tmp_path / "data", "A", n_train=2, n_val=2, imgsz=64, seed=0, task="pose")  # 2 keypoints
    model = tmp_path / "yolo11n-pose.yml"
    model.write_text((CFG / "11" / "yolo11-pose.yaml").read_text())  # kpt_shape: [17, 3]
    result = train(data, model=model, project=str(tmp_path / "runs"), name="yml", **{**TINY, "epochs": 1})
    assert load_adapter(result.adapter).base["path"] == str((result.save_dir / "weights" / "base.pt").resolve())
    assert tuple(load_model(result.merged).model[-1].kpt_shape) == (2, 3)
    spec = yaml.safe_load(data.read_text())
    data.write_text(yaml.safe_dump({k: v for k, v in spec.items() if k not in ("kpt_shape", "flip_idx")}))
    with pytest.raises(LoraYoloError, match=r"a pose dataset needs kpt_shape"):
        train(data, model=model, project=str(tmp_path / "refused"), **TINY)
    assert not (tmp_path / "refused").exists()


def same_rows(got: np.ndarray, want: np.ndarray) -> bool:
    """Top-k detections (max_det, 6 + extra) equal as sets of rows: near-tied scores may come out in another order,
    so each row is matched to any equal row; rows tied with the k-th score are left out (either may be picked)."""
    cut = want[:, 4].min() + 1e-5
    rows = [r for r in got if r[4] > cut]
    return len(rows) > 0 and all(np.isclose(r, want, rtol=1e-4, atol=1e-4).all(1).any() for r in rows)


@pytest.mark.parametrize("task_run", [r for r in RUNS if r.startswith("26")], indirect=True)
def test_yolo26_nms_free_export_matches_pytorch(task_run, tmp_path):
    import onnxruntime as ort

    _, _, _, result = task_run
    onnx = export_model(result.merged, "onnx", output=tmp_path / "e2e.onnx", imgsz=64, nms=False)
    x = torch.rand(1, 3, 64, 64)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model = load_model(result.merged)
    model.end2end = True  # the one-to-one branch, as Ultralytics' predictor with nms=False
    want = raw(model.fuse(verbose=False), x)
    assert got[0].shape == tuple(want[0].shape) and got[0].shape[-1] >= 6  # (1, max_det, box + score + class + ...)
    assert same_rows(got[0][0], want[0][0].numpy()) and close(got[1:], want[1:])  # segment: the prototypes too
