"""End-to-end LoRA training inside Ultralytics' trainer: outputs, a frozen base, exact merges, resume."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SHAPES_B1, TINY, plain_ultralytics, sha256

from lora_yolo import LoraConfig, load_adapter, load_model
from lora_yolo.errors import TrainingInterrupted
from lora_yolo.inject import LORA_SUFFIXES, base_state_dict
from lora_yolo.targets import bias_tensors
from lora_yolo.train import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (no state shared with this test process)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT)


class GradRecorder:
    """Callbacks recording which parameters received a gradient in each epoch (tensor hooks on every parameter)."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, set[str]] = {}
        self.reported = 0

    def on_train_start(self, trainer) -> None:
        model = trainer.model
        self.reported = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for name, p in model.named_parameters():
            if p.requires_grad:  # a frozen tensor cannot take a hook, nor receive a gradient
                p.register_hook(lambda g, n=name, t=trainer: self.by_epoch.setdefault(t.epoch, set()).add(n))


@pytest.fixture(scope="module")
def coco8_run(base_pt, coco8, tmp_path_factory):
    before = sha256(base_pt)
    recorder = GradRecorder()
    project = tmp_path_factory.mktemp("runs")
    result = train(
        coco8,
        model=base_pt,
        project=str(project),
        name="coco8",
        callbacks={"on_train_start": [recorder.on_train_start]},
        **{**TINY, "optimizer": "AdamW", "lr0": 0.01},  # at 0.003 one B of the best adapter was still exactly
    )  # zero after these two single-step epochs (seen in CI); at 0.01 every B has moved
    return result, before, recorder


def test_run_folder_holds_every_output(coco8_run):
    result, _, _ = coco8_run
    for name in (
        "adapter.safetensors",
        "adapter_last.safetensors",
        "merged.pt",
        "lora.yaml",
        "results.csv",
        "weights/best.pt",
        "weights/last.pt",
    ):
        assert (result.save_dir / name).is_file(), name
    table = result.table()
    assert "trainable parameters" in table and str(result.merged) in table


def test_adapters_trained_and_base_untouched(coco8_run, base_pt):
    result, before, _ = coco8_run
    assert sha256(base_pt) == before  # the base checkpoint file is never written
    adapter = load_adapter(result.adapter)
    b = [t for k, t in adapter.tensors.items() if k.endswith("lora_B.weight")]
    assert b and all(t.abs().max() > 0 for t in b)  # B left zero
    base = load_model(base_pt).state_dict()
    head = [k for k in base if k.startswith("model.23.")]  # the default trains the head in full (train_head)
    shifts = bias_tensors(dict(load_model(base_pt).named_modules()), adapter.layers)  # and the shifts (train_bias)
    want = [k for k in head if base[k].is_floating_point() and ".dfl." not in k]
    assert len(shifts) > 50 and sorted(adapter.full) == sorted([*want, *shifts])
    for ckpt, stored in (("best.pt", result.adapter), ("last.pt", result.save_dir / "adapter_last.safetensors")):
        trained = torch.load(result.save_dir / "weights" / ckpt, weights_only=False)["model"].float()
        frozen = base_state_dict(trained)  # what Ultralytics validated and saved (EMA, fp16 on disk)
        assert frozen.keys() == base.keys()
        kept = load_adapter(stored)
        for k, v in frozen.items():
            if k in kept.full:  # the head: the adapter written beside the checkpoint holds the same values
                assert torch.equal(v.half(), kept.tensors[k].half()), f"{ckpt}: {k} differs from its adapter's"
            else:
                assert torch.equal(v, base[k]), f"{ckpt}: {k} changed"


def test_trainable_count_equals_parameters_with_gradients(coco8_run):
    result, _, recorder = coco8_run
    model_params = dict(
        torch.load(result.save_dir / "weights" / "last.pt", weights_only=False)["model"].named_parameters()
    )
    assert set(recorder.by_epoch) == {0, 1}
    full = set(load_adapter(result.adapter).full)  # the head, trained in full (train_head)
    for epoch, names in recorder.by_epoch.items():
        assert sum(model_params[n].numel() for n in names) == result.trainable == recorder.reported, epoch
        assert names == {n for n in model_params if n.endswith(LORA_SUFFIXES) or n in full}


def plain_val(merged: Path, data: Path, imgsz: int, batch: int) -> dict:
    """Validate a merged checkpoint with plain Ultralytics in a fresh process where lora_yolo cannot be imported."""
    return plain_ultralytics(f"""
        import json
        from ultralytics import YOLO
        m = YOLO({str(merged)!r})
        r = m.val(data={str(data)!r}, imgsz={imgsz}, batch={batch}, device="cpu", plots=False, workers=0)
        print(json.dumps({{"mAP50": r.box.map50, "mAP50-95": r.box.map, "nc": len(m.names)}}))
    """)


def test_merged_loads_in_plain_ultralytics_with_same_map(coco8_run, coco8):
    result, _, _ = coco8_run
    got = plain_val(result.merged, coco8, imgsz=64, batch=4)
    assert abs(got["mAP50"] - result.metrics["mAP50"]) <= 1e-3
    assert abs(got["mAP50-95"] - result.metrics["mAP50-95"]) <= 1e-3
    assert got["nc"] == 80


def test_demo_run_reports_the_map_plain_ultralytics_measures(demo_base, tmp_path):
    """The same check with a pretrained base, where the mAP is far from zero. 3 epochs: after 2 the default (rank 16)
    scored 0.111 against the base's zero-shot 0.129, after 3 0.159, so the run has trained past the base."""
    args = {**TINY, "imgsz": 160, "batch": 8, "epochs": 3}
    result = train(SHAPES_B1, model=demo_base, project=str(tmp_path), name="b1", **args, fraction=0.3)
    assert result.metrics["mAP50-95"] > 0.05 and result.base_metrics is not None  # same classes: zero-shot shown
    assert result.warnings == [] and "WARNING" not in result.table()  # a run that trained: nothing to warn about
    got = plain_val(result.merged, SHAPES_B1, imgsz=160, batch=8)
    assert abs(got["mAP50"] - result.metrics["mAP50"]) <= 1e-3
    assert abs(got["mAP50-95"] - result.metrics["mAP50-95"]) <= 1e-3


def test_fresh_merge_of_base_and_adapter_equals_merged(coco8_run, base_pt, tmp_path):
    result, _, _ = coco8_run
    out = run_python(f"""
        import torch
        from lora_yolo import attach_adapter, load_adapter, load_model, merge_lora
        m = merge_lora(attach_adapter(load_model({str(base_pt)!r}), load_adapter({str(result.adapter)!r})))
        torch.save(m.state_dict(), {str(tmp_path / "fresh.pt")!r})
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = torch.load(tmp_path / "fresh.pt")
    merged = torch.load(result.merged, weights_only=False)["model"].state_dict()
    assert fresh.keys() == merged.keys()
    assert max((fresh[k].float() - merged[k].float()).abs().max().item() for k in fresh) <= 1e-6


SHAPES_B2 = ROOT / "datasets" / "shapes-b2" / "data.yaml"  # 4 classes: the 80-class base must grow a new head


def test_new_class_count_trains_class_layers_in_full(base_pt, tmp_path):
    config = LoraConfig(train_head=False)  # without train_head (the default's), the class layers alone
    result = train(SHAPES_B2, model=base_pt, config=config, project=str(tmp_path), name="b2", fraction=0.1, **TINY)
    adapter = load_adapter(result.adapter)
    assert adapter.nc == 4 and adapter.base["nc"] == 80
    assert adapter.full and all(".cv3." in k for k in adapter.full)  # the class convs, weight and bias
    assert all(adapter.tensors[k].shape[0] == 4 for k in adapter.full)
    merged = load_model(result.merged)
    assert merged.model[-1].nc == 4 and len(merged.names) == 4
    with torch.no_grad():
        out = merged.eval()(torch.rand(1, 3, 64, 64))[0]
    assert out.shape[1] == 4 + 4  # 4 box coordinates + 4 class scores per anchor


def test_resume_continues_an_interrupted_run(base_pt, coco8, tmp_path):
    def crash_after_first_save(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after epoch 1 was saved

    with pytest.raises(TrainingInterrupted, match="resume with: lora-yolo train --resume"):
        train(
            coco8,
            model=base_pt,
            project=str(tmp_path),
            name="r",
            callbacks={"on_model_save": [crash_after_first_save]},
            **TINY,
        )
    last = tmp_path / "r" / "weights" / "last.pt"
    assert torch.load(last, weights_only=False)["optimizer"] is not None
    result = train(None, resume=last)
    assert result.save_dir == tmp_path / "r"
    assert len((result.save_dir / "results.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    adapter = load_adapter(result.adapter)
    assert adapter.base["weights"] == load_adapter(result.adapter_last).base["weights"]
    assert load_model(result.merged).model[-1].nc == 80


def test_yolov8_from_yaml_trains(coco8, tmp_path):
    result = train(coco8, model="yolov8n.yaml", project=str(tmp_path), name="v8", **{**TINY, "epochs": 1})
    base = result.save_dir / "weights" / "base.pt"  # a YAML base is random: it is kept so merge can find it
    assert base.is_file()
    adapter = load_adapter(result.adapter)
    assert adapter.base["path"] == str(base.resolve()) and "yolov8n" in adapter.base["yaml"]
    assert not any("attn" in k for k in adapter.layers)  # YOLOv8 has no attention; the default still works


def test_dora_with_loraplus_trains_and_merges_exactly(base_pt, coco8, tmp_path):
    """DoRA magnitudes train (and are stored), LoRA+ keeps its groups through Ultralytics' schedule, merge is exact."""
    from conftest import head_output

    from lora_yolo import LoraConfig, attach_adapter
    from lora_yolo.layer import channel_norm

    config = LoraConfig(use_dora=True, loraplus_lr_ratio=4)
    lrs = []
    result = train(
        coco8,
        model=base_pt,
        config=config,
        project=str(tmp_path),
        name="dora",
        optimizer="AdamW",
        lr0=0.01,
        callbacks={"on_train_epoch_end": [lambda t: lrs.append(sorted({g["lr"] for g in t.optimizer.param_groups}))]},
        **TINY,
    )
    adapter = load_adapter(result.adapter)
    assert adapter.config.use_dora and adapter.config.loraplus_lr_ratio == 4
    base = load_model(base_pt)
    moved = [
        k
        for k in adapter.layers
        if not torch.allclose(
            adapter.tensors[f"{k}.lora_magnitude_vector"].float(),
            channel_norm(base.get_submodule(k).weight.float()).half().float(),
        )
    ]
    still = sorted(set(adapter.layers) - set(moved))
    # Every magnitude trained, except in the stride-32 box branch, which gets exactly zero gradient at 64 px even in
    # plain Ultralytics training (see test_training_settings.py's DDP worker test).
    assert len(moved) > 70 and all(k.startswith("model.23.cv2.2.") for k in still), still
    assert all(len(x) == 2 and x[1] == pytest.approx(4 * x[0]) for x in lrs)  # B's lr is 4x A's, every epoch
    x = torch.rand(2, 3, 64, 64)
    unmerged = head_output(attach_adapter(base, adapter), x)
    assert (head_output(load_model(result.merged), x) - unmerged).abs().max() < 1e-4
