"""Training settings that must hold wherever Ultralytics rebuilds or resumes the trainer: DDP workers, NaN on one rank,
class sets decided by names, optimizers LoRA cannot share (MuSGD's Muon, distillation), resume of the EMA."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, make_base

from lora_yolo import LoraConfig, LoraYoloError, load_adapter, load_model, save_checkpoint
from lora_yolo.errors import TrainingInterrupted
from lora_yolo.fold import FoldedBatchNorm2d
from lora_yolo.synth import make_dataset
from lora_yolo.targets import bias_tensors
from lora_yolo.train import train
from lora_yolo.trainer import LoraDetectionTrainer, check_ddp_launcher, trainable_names


def names_of(data_yaml: Path) -> dict[int, str]:
    names = yaml.safe_load(data_yaml.read_text())["names"]
    return dict(enumerate(names)) if isinstance(names, list) else {int(k): v for k, v in names.items()}


def base_with_names(path: Path, names: dict[int, str]) -> Path:
    """base_pt's recipe (yolo11n from its YAML, seed 0, fp16 grid) with the given class names."""
    model = load_model(make_base(path))
    model.names = dict(names)
    return save_checkpoint(model, path, train_args={})


def built_model(base: Path, data: Path, lora: LoraConfig | None = None):
    overrides = {"model": str(base), "data": str(data), "project": str(base.parent / "runs")}  # not Ultralytics' runs
    trainer = LoraDetectionTrainer(overrides=overrides, lora=lora or LoraConfig(r=4))
    weights = load_model(base)
    return trainer, trainer.get_model(cfg=weights.yaml, weights=weights)


@pytest.mark.parametrize("rename", [0, 1, 80], ids=["same names", "one name differs", "all differ"])
def test_class_layers_train_whenever_names_differ(coco8, tmp_path, rename):
    """coco8 has 80 classes; a base with the same count but other names (or one other name) gets its class convs
    trained in full, since Ultralytics re-initialises the rows of names it does not know."""
    names = names_of(coco8)
    names.update({i: f"other{i}" for i in range(rename)})
    _, model = built_model(base_with_names(tmp_path / "b.pt", names), coco8)
    full = model.lora_meta["full"]
    if rename == 0:
        assert full == []
    else:
        assert full and all(".cv3." in n for n in full)
        assert {n for n in full if n.endswith(".weight")} <= trainable_names(model)


def test_ddp_worker_keeps_loraplus_dora_and_class_layers(demo_base, coco8, tmp_path):
    """Ultralytics' DDP launcher rebuilds the trainer in the worker from its arguments, without `lora=`: the worker
    must still put B at the LoRA+ ratio, train DoRA magnitudes and the class layers. Runs the launcher's very file
    (one process on CPU); a callback, pickled with the trainer, records the worker's optimizer groups."""
    from ultralytics.utils.dist import generate_ddp_file

    from lora_yolo.checkpoint import load_model as load

    record = tmp_path / "groups.json"

    def record_groups(trainer):  # runs in the worker
        kind = {".lora_A.": "A", ".lora_B.": "B", ".lora_magnitude_vector": "m"}
        names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
        groups = [
            {
                "lr": g["lr"],
                "kinds": sorted(
                    {
                        next((v for k, v in kind.items() if k in names[id(p)]), "full")
                        for p in g["params"]
                        if id(p) in names
                    }
                ),
            }
            for g in trainer.optimizer.param_groups
        ]
        Path(record).write_text(json.dumps({"groups": groups, "ratio": trainer.lora_config.loraplus_lr_ratio}))

    args = {**TINY, "imgsz": 128, "epochs": 1}
    lora = LoraConfig(targets=["head"], r=4, use_dora=True, loraplus_lr_ratio=4)
    trainer = LoraDetectionTrainer(
        overrides={"model": str(demo_base), "data": str(coco8), "project": str(tmp_path), "name": "ddp", **args},
        lora=lora,
    )
    trainer.add_callback("on_train_epoch_end", record_groups)
    base = load(demo_base)
    trainer.model = trainer.get_model(cfg=base.yaml, weights=base)
    script = generate_ddp_file(trainer)
    try:
        out = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=tmp_path)
    finally:
        Path(script).unlink(missing_ok=True)
        Path(script).with_suffix(".pt").unlink(missing_ok=True)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(record.read_text())
    assert seen["ratio"] == 1.0  # the worker's trainer was built without lora=: the ratio must not come from there
    lr = {}
    for group in seen["groups"]:
        for kind in group["kinds"]:
            lr.setdefault(kind, set()).add(group["lr"])
    assert set(lr) == {"A", "B", "m", "full"}, lr  # adapters, DoRA magnitudes and class layers all train there
    (a,), (b,) = lr["A"], lr["B"]
    assert b == pytest.approx(4 * a, rel=1e-9)  # LoRA+ in the worker
    adapter = load_adapter(tmp_path / "ddp" / "adapter.safetensors")
    assert adapter.config.use_dora and adapter.config.loraplus_lr_ratio == 4
    assert adapter.full and adapter.nc == 80  # demo base has 3 classes, coco8 80: class layers trained in full
    assert sum(k.endswith("lora_magnitude_vector") for k in adapter.tensors) == len(adapter.layers)
    # Every B moves except the stride-32 box branch: at 128 px Ultralytics' task-aligned assigner takes its top-10
    # anchors per object from the finer levels, so that branch gets exactly zero gradient in plain Ultralytics
    # training too (checked by hand: model.23.cv2.2.2.weight.grad == 0 with every parameter trainable).
    still = {k for k, t in adapter.tensors.items() if k.endswith("lora_B.weight") and not t.abs().max() > 0}
    assert all(k.startswith("model.23.cv2.2.") for k in still)
    assert (tmp_path / "ddp" / "merged.pt").is_file()
    # Checkpoints hold Ultralytics' own BatchNorms (folded only while training): fusing one applies each BN once.
    for name in ("last.pt", "best.pt"):
        ema = torch.load(tmp_path / "ddp" / "weights" / name, weights_only=False)["model"]
        kinds = {type(m).__name__ for m in ema.modules()}
        assert "BatchNorm2d" in kinds and not {"FoldedBatchNorm2d", "FoldedConv2d"} & kinds, name


@pytest.mark.parametrize("name", ["MuSGD", "auto"])
def test_musgd_keeps_adapters_out_of_muon(coco8, tmp_path, name):
    """Ultralytics picks MuSGD for optimizer=auto on long runs; adapter tensors (A, B, DoRA magnitudes, 1-D) take
    its SGD part, class layers trained in full keep Muon, and a step runs."""
    base = base_with_names(tmp_path / "b.pt", {i: f"x{i}" for i in range(80)})  # class layers trained in full
    trainer, model = built_model(base, coco8, LoraConfig(r=4, use_dora=True, loraplus_lr_ratio=2))
    keep = trainable_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    optimizer = trainer.build_optimizer(model, name=name, lr=0.01, iterations=20_000)
    assert type(optimizer).__name__ == "MuSGD"
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if ".lora_" in names[id(p)]:
                assert not group["use_muon"], names[id(p)]
    full = [n for n in model.lora_meta["full"] if n.endswith(".weight")]
    assert full and all(g["use_muon"] for g in optimizer.param_groups for p in g["params"] if names[id(p)] in full)
    b_lr = {g["lr"] for g in optimizer.param_groups for p in g["params"] if names[id(p)].endswith("lora_B.weight")}
    a_lr = {g["lr"] for g in optimizer.param_groups for p in g["params"] if names[id(p)].endswith("lora_A.weight")}
    assert b_lr == {2 * lr for lr in a_lr}
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    for p in trainable:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(trainable, before))


def test_distillation_is_refused_with_one_line(base_pt, coco8, tmp_path):
    with pytest.raises(LoraYoloError, match="distill_model is not supported"):
        train(coco8, model=base_pt, project=str(tmp_path), distill_model=str(base_pt), **TINY)
    assert not any(tmp_path.iterdir())  # refused before a run folder was made


def test_a_selection_refused_while_building_the_run_leaves_no_run_folder(base_pt, coco8, tmp_path):
    """Refused after Ultralytics has made the run folder (the selection is made on the model the trainer builds): the
    folder is this call's own, and is removed; a folder that holds anything else (an earlier run's, reached with
    exist_ok or through a name like `x/..`) keeps it."""
    config = LoraConfig(targets=[], include=[r"model\.23\.cv9"])
    with pytest.raises(LoraYoloError, match="matches no trainable conv layer"):
        train(coco8, model=base_pt, config=config, project=str(tmp_path / "new"), **TINY)
    assert not any((tmp_path / "new").iterdir())  # the project folder stays: it may be the user's
    earlier = tmp_path / "old" / "run"
    (earlier / "weights").mkdir(parents=True)
    (earlier / "weights" / "last.pt").write_bytes(b"an earlier run's")
    with pytest.raises(LoraYoloError, match="matches no trainable conv layer"):
        train(coco8, model=base_pt, config=config, project=str(earlier.parent), name="run", exist_ok=True, **TINY)
    assert (earlier / "weights" / "last.pt").read_bytes() == b"an earlier run's"
    with pytest.raises(LoraYoloError, match="matches no trainable conv layer"):
        train(coco8, model=base_pt, config=config, project=str(earlier.parent), name="nothing/..", **TINY)
    assert (earlier / "weights" / "last.pt").read_bytes() == b"an earlier run's"


def test_data_ultralytics_refuses_in_its_setup_is_one_line_and_leaves_no_run_folder(base_pt, tmp_path):
    """Ultralytics finds a dataset's missing labels in its own setup, inside `trainer.train()`, with a ValueError."""
    data = make_dataset(tmp_path / "data", "A", n_train=2, n_val=2, imgsz=64, seed=0)
    for label in (tmp_path / "data" / "labels").rglob("*.txt"):
        label.unlink()
    with pytest.raises(LoraYoloError, match=r"^train: No labels found in "):
        train(data, model=base_pt, project=str(tmp_path / "runs"), **TINY)
    assert not any((tmp_path / "runs").iterdir())


def test_an_error_once_training_has_started_keeps_its_type_and_the_run_folder(base_pt, coco8, tmp_path):
    """Only what Ultralytics' setup refuses becomes one line: an error from an on_train_start callback (training has
    started) is raised as it is, and the run folder stays."""

    def broken(trainer):
        raise ValueError("a callback's own error")

    with pytest.raises(ValueError, match="a callback's own error"):
        train(coco8, model=base_pt, project=str(tmp_path), callbacks={"on_train_start": [broken]}, **TINY)
    assert (tmp_path / "train" / "args.yaml").is_file()


@pytest.mark.parametrize("quantize", [8, "int8", "W8A8"])
def test_quantization_aware_training_is_refused_with_one_line(base_pt, coco8, tmp_path, quantize):
    """Ultralytics' QAT swaps every conv for a quantized one (ModelOpt), adapted ones included: untested with
    adapters, so refused before a run folder is made."""
    with pytest.raises(LoraYoloError, match=r"^quantize=8 \(quantization-aware training\) is not supported"):
        train(coco8, model=base_pt, project=str(tmp_path), quantize=quantize, **TINY)
    assert not any(tmp_path.iterdir())


def test_an_optimizer_ultralytics_does_not_know_is_one_line(base_pt, coco8, tmp_path):
    with pytest.raises(LoraYoloError, match=r"^Optimizer 'Adagrad' not found in list of available optimizers"):
        train(coco8, model=base_pt, project=str(tmp_path), optimizer="Adagrad", **TINY)


def test_resume_keeps_a_base_off_the_fp16_grid_exact(coco8, tmp_path):
    """last.pt stores the EMA in fp16; resuming must not round the base inside the EMA (the model validated)."""
    torch.manual_seed(0)
    model = load_model("yolo11n.yaml")
    model.names = names_of(coco8)
    base = save_checkpoint(model, tmp_path / "fp32-base.pt", train_args={})
    frozen = load_model(base).state_dict()
    assert any(not torch.equal(t, t.half().float()) for t in frozen.values() if t.is_floating_point())

    def stop_after_first_save(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt

    run = dict(project=str(tmp_path), name="r", **TINY)
    with pytest.raises(TrainingInterrupted):
        train(coco8, model=base, callbacks={"on_model_save": [stop_after_first_save]}, **run)
    seen = {}

    def ema_at_start(trainer):
        seen.update({k: v.clone() for k, v in trainer.ema.ema.state_dict().items()})
        seen["folded"] = sum(isinstance(m, FoldedBatchNorm2d) for m in trainer.model.modules())

    train(None, resume=tmp_path / "r" / "weights" / "last.pt", callbacks={"on_train_epoch_start": [ema_at_start]})
    head = f"model.{len(model.model) - 1}."  # the default trains it in full (train_head): its BatchNorms unfolded
    norms = [n for n, m in load_model(base).named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert seen.pop("folded") == sum(not n.startswith(head) for n in norms)
    renamed = {k.replace(".base_layer.", "."): v for k, v in seen.items()}
    layers = [k.removesuffix(".lora_A.weight") for k in seen if k.endswith(".lora_A.weight")]
    shifts = set(bias_tensors(dict(load_model(base).named_modules()), layers))  # trained (train_bias)
    checked = [k for k in frozen if frozen[k].is_floating_point() and k not in shifts and not k.startswith(head)]
    assert len(checked) > 250 and all(k in renamed for k in checked)  # every frozen tensor outside the head
    assert all(torch.equal(renamed[k], frozen[k]) for k in checked), "the EMA's base was rounded"


def test_multi_gpu_without_cloudpickle_says_what_to_install(monkeypatch):
    # Ultralytics' launcher would pip-install cloudpickle, which fails offline inside the launch; the trainer checks
    # first (a CPU machine cannot build a multi-GPU trainer, so the check is called as the trainer calls it).
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cloudpickle" else real(name, *a))
    with pytest.raises(LoraYoloError, match=r"multi-GPU training needs cloudpickle .* pip install 'lora-yolo\[ddp\]'"):
        check_ddp_launcher()
    monkeypatch.undo()
    check_ddp_launcher()  # installed here (the dev extra): nothing to say
