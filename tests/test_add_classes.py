"""Adding the dataset's classes to the base's (`add_classes`): both modes score the new classes with a trained copy of
each class branch; exact mode keeps every base output, adapted mode also adapts the rest of the network on data
where the base pseudo-labels its own objects; both write ordinary adapters with the combined class set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TINY, make_base, plain_ultralytics, sha256
from ultralytics import YOLO

from lora_yolo import LoraConfig, LoraYoloError, load_adapter, load_model
from lora_yolo.classes import BRANCH_LR, FOLDER, combined_names, recorded_pseudo_labels
from lora_yolo.errors import TrainingInterrupted
from lora_yolo.export import export_model
from lora_yolo.serve import AdapterModel, predict, validate
from lora_yolo.train import train

pytestmark = pytest.mark.slow
B2 = ROOT / "datasets" / "shapes-b2"  # star, cross, ring, diamond: none is a demo base class
COMBINED = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "cross", 5: "ring", 6: "diamond"}
X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def labels_hash() -> dict[str, str]:
    return {str(p): sha256(p) for p in sorted((B2 / "labels").rglob("*.txt"))}


@pytest.fixture(scope="module")
def runs(demo_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("add")
    before = labels_hash()

    def crash_after_first_save(trainer):
        if trainer.epoch == 0:
            raise KeyboardInterrupt  # Ctrl-C after epoch 1 was saved: each mode must resume as that mode

    groups = {}  # mode -> its resumed run's optimizer: (initial lr, trainable parameter names) of each group

    def record_groups(mode: str):
        def record(trainer):  # Ultralytics puts the frozen parameters in the optimizer too
            names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
            named = [
                (g["initial_lr"], {names.get(id(p)) for p in g["params"]} - {None})
                for g in trainer.optimizer.param_groups
            ]
            groups[mode] = [(lr, group) for lr, group in named if group]

        return record

    args = dict(data=B2 / "data.yaml", model=demo_base, project=str(folder), **{**TINY, "fraction": 0.1})
    out = {}
    for mode, lr in (("exact", {"lr0": 0.003}), ("adapted", {})):  # exact: --lr0 alone, AdamW at it
        with pytest.raises(TrainingInterrupted):
            train(**args, **lr, config=LoraConfig(add_classes=mode), name=mode,
                  callbacks={"on_model_save": [crash_after_first_save]})  # fmt: skip
        last = folder / mode / "weights" / "last.pt"
        if mode == "exact":
            with pytest.raises(LoraYoloError, match="relabelled copy of the dataset"):
                train(B2 / "data.yaml", resume=last)  # the user's data: its class ids are not the run's
        out[mode] = train(None, resume=last, callbacks={"on_train_start": [record_groups(mode)]})
    out["groups"] = groups
    assert labels_hash() == before  # the user's dataset is never written
    return out


def test_combined_names_keep_the_base_ids_and_merge_shared_names():
    assert combined_names({0: "a", 1: "b"}, {0: "c", 1: "a", 2: "d"}) == {0: "a", 1: "b", 2: "c", 3: "d"}


def test_exact_mode_keeps_every_base_output_bit_identical(runs, demo_base):
    result = runs["exact"]  # interrupted after epoch 1 and resumed
    assert len((result.save_dir / "results.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    adapter = load_adapter(result.adapter)
    assert adapter.names == COMBINED and not adapter.layers  # no LoRA layer: a copy of each class branch
    base = load_model(demo_base).state_dict()
    copies = {k: k.replace(".new.", ".") for k in adapter.full}  # each copy tensor -> the base's tensor it started as
    assert len(adapter.full) > 3 * 2 and all(".cv3." in k and ".new." in k for k in adapter.full)
    assert {tuple(adapter.tensors[k].shape) for k in adapter.full if k.endswith(".2.weight")} == {(4, 64, 1, 1)}
    trained = [k for k, b in copies.items() if not torch.equal(adapter.tensors[k].float(), base[b].float())]
    assert any(k.endswith(".bn.running_mean") for k in trained)  # its BatchNorms trained, statistics included
    assert any(k.endswith(".conv.weight") for k in trained)  # and its convs, not only the new class rows
    served = AdapterModel(demo_base)
    served.set_adapter(served.load_adapter(result.adapter))
    plain = YOLO(str(demo_base)).model.fuse(verbose=False).eval()  # what Ultralytics predicts the base with
    with torch.no_grad():
        (y, raw), (y_base, raw_base) = served.model.eval()(X), plain(X)
        merged, unfused = load_model(result.merged).eval()(X)[0], load_model(demo_base).eval()(X)[0]
    assert torch.equal(raw["boxes"], raw_base["boxes"]) and torch.equal(raw["scores"][:, :3], raw_base["scores"])
    assert torch.equal(y[:, :4], y_base[:, :4])  # decoded boxes
    # Probabilities: the same sigmoid of the same logits, but torch's vectorised sigmoid may round the last bit of an
    # element differently once the tensor has other columns (by one float32 ulp, at most 6e-8 below 1); merged.pt's
    # wider plain convs may round its logits too.
    assert (y[:, 4:7] - y_base[:, 4:7]).abs().max() <= 2**-24 and y.shape[1] == 4 + 7
    assert torch.equal(merged[:, :4], unfused[:, :4]) and (merged[:, 4:7] - unfused[:, 4:7]).abs().max() < 1e-6
    assert (merged[:, 7:] - y[:, 7:]).abs().max() < 1e-5  # merged.pt's new classes: the served branch's
    served.disable_adapters()  # the base's own branches back, with no trace of the copies
    assert not any(".new." in n for n, _ in served.model.named_modules())


def test_exact_merged_model_is_plain_ultralytics(runs):
    """merged.pt holds the class branches as plain wider convs: a process without lora_yolo loads and predicts with
    it, and its new-class scores are those lora_yolo computes."""
    merged = runs["exact"].merged
    got = plain_ultralytics(f"""
        import json, torch
        from ultralytics import YOLO
        model = YOLO({str(merged)!r}).model.float().eval()
        torch.manual_seed(0)
        with torch.no_grad():
            y = model(torch.rand(1, 3, 64, 64))[0]
        print(json.dumps({{"shape": list(y.shape), "sum": y[:, 4:].sum().item()}}))
    """)
    torch.manual_seed(0)
    with torch.no_grad():
        y = load_model(merged).eval()(torch.rand(1, 3, 64, 64))[0]
    assert got["shape"] == [1, 4 + 7, y.shape[2]] and abs(got["sum"] - y[:, 4:].sum().item()) < 1e-3


@pytest.mark.parametrize("mode", ["exact", "adapted"])
def test_val_and_predict_with_the_adapter_match_merged(runs, demo_base, mode, tmp_path):
    """`val`/`predict --adapter` serve the combined class set (exact: the base's branches beside the copies) and
    score what merged.pt scores, on the run's relabelled validation split with the combined names."""
    result = runs[mode]
    data = result.save_dir / FOLDER / "data.yaml"
    args = dict(imgsz=64, batch=4, device="cpu", plots=False, project=str(tmp_path), verbose=False)
    served = validate(data, demo_base, result.adapter, name="served", **args)
    merged = YOLO(str(result.merged)).val(data=str(data), name="merged", **args)
    assert abs(served.box.map - merged.box.map) < 1e-3 and len(served.names) == len(COMBINED)
    folder = data.parent / "images" / "val"
    _, images, boxes = predict(folder, demo_base, result.adapter, imgsz=64, save=False, conf=0.01)
    assert images == len(list(folder.iterdir())) and boxes > 0


def test_exact_mode_trains_its_copies_at_the_lr0_given(runs):
    """Exact mode trains class-branch copies in full: the run above, given lr0 alone (interrupted and resumed),
    trained them with AdamW at that lr0, not at adapted mode's BRANCH_LR; the default (AdamW 0.01,
    `lora_yolo.classes.EXACT_TRAIN`) and every other way of asking are in test_branch.py."""
    args = yaml.safe_load((runs["exact"].save_dir / "args.yaml").read_text())
    assert (args["optimizer"], args["lr0"]) == ("AdamW", 0.003)
    groups = runs["groups"]["exact"]
    copies = {n for n in load_adapter(runs["exact"].adapter).full if ".running_" not in n}
    assert set().union(*(names for _, names in groups)) == copies  # nothing else trains
    assert {lr for lr, _ in groups} == {0.003}
    assert runs["exact"].pseudo_labels is None  # exact mode labels nothing


def test_adapted_mode_adapts_outside_the_class_branches_and_trains_their_copies_at_their_own_lr(runs):
    """Adapted mode: the same class-branch copies as exact mode, LoRA layers everywhere else, and the copies in their
    own optimizer groups at BRANCH_LR while the adapters train at the run's lr (optimizer=auto here)."""
    adapter, exact = load_adapter(runs["adapted"].adapter), load_adapter(runs["exact"].adapter)
    copies = set(adapter.full)
    assert copies == set(exact.full) and adapter.layers and not any(".23.cv3." in layer for layer in adapter.layers)
    assert len(adapter.layers) > 50  # backbone, neck and box branches
    groups = runs["groups"]["adapted"]  # the resumed run's
    params = {n for n in copies if ".running_" not in n}  # the copies' BatchNorm statistics are buffers
    assert params == set().union(*(names for _, names in groups if names & copies))
    assert {lr for lr, names in groups if names & copies} == {BRANCH_LR}
    assert all(names <= copies for _, names in groups if names & copies)
    adapters = [(lr, names) for lr, names in groups if not names & copies]
    assert set().union(*(names for _, names in adapters)) == {k for k in adapter.tensors if ".lora_" in k}
    assert BRANCH_LR not in {lr for lr, _ in adapters}


def test_adapted_mode_pseudo_labels_the_base_objects_in_the_run_folder(runs):
    result = runs["adapted"]
    adapter = load_adapter(result.adapter)
    assert adapter.names == COMBINED and adapter.layers and adapter.config.add_classes == "adapted"
    assert result.pseudo_labels > 0 and f"{result.pseudo_labels:,}" in result.table()  # resumed: read back
    lines = [
        line.split()
        for f in (result.save_dir / FOLDER / "labels" / "train").glob("*.txt")
        for line in f.read_text().splitlines()
    ]
    old = [line for line in lines if int(line[0]) < 3]  # the base's classes: only pseudo-labels carry them
    assert len(old) == result.pseudo_labels and all(int(line[0]) < 7 for line in lines)
    assert sum(int(line[0]) >= 3 for line in lines) > 0  # the dataset's own labels, shifted to the combined ids


def test_refusals_are_one_line(demo_base, tmp_path):
    same = B2.parent / "shapes-b1" / "data.yaml"  # the base's own classes: nothing to add
    with pytest.raises(LoraYoloError, match="there is no class to add"):
        train(same, model=demo_base, config=LoraConfig(add_classes="exact"), project=str(tmp_path), **TINY)
    assert not any(tmp_path.iterdir())  # refused before a run folder was made
    with pytest.raises(LoraYoloError, match="give a .pt checkpoint"):
        train(B2 / "data.yaml", model="yolo11n.yaml", config=LoraConfig(add_classes="exact"), project=str(tmp_path))
    with pytest.raises(LoraYoloError, match="add_classes must be exact or adapted"):
        LoraConfig(add_classes="both")


@pytest.fixture(scope="module")
def run26(tmp_path_factory):
    folder = tmp_path_factory.mktemp("add26")
    base = make_base(folder / "yolo26n.pt", "yolo26n.yaml")  # 80 COCO classes
    result = train(B2 / "data.yaml", model=base, config=LoraConfig(add_classes="exact"), project=str(folder),
                   name="e", **{**TINY, "fraction": 0.05, "epochs": 1})  # fmt: skip
    return base, result


@pytest.mark.parametrize("end2end", [False, True], ids=["one-to-many", "one-to-one"])
def test_exact_mode_on_yolo26_keeps_either_branch_bit_identical(run26, end2end):
    """YOLO26: both branches' class branches get a copy; served for either branch, the base's boxes and raw class
    scores are the base's."""
    base, result = run26
    adapter = load_adapter(result.adapter)
    assert any(".one2one_cv3.0.new." in k for k in adapter.full) and any(".cv3.0.new." in k for k in adapter.full)
    served = AdapterModel(base, end2end=end2end)
    served.set_adapter(served.load_adapter(result.adapter))
    plain = load_model(base)
    plain.end2end = end2end
    plain.fuse(verbose=False)
    with torch.no_grad():
        got, want = served.model.eval()(X)[1], plain.eval()(X)[1]
    key = "one2one" if end2end else "one2many"
    got, want = got.get(key, got), want.get(key, want)
    assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["scores"][:, :80], want["scores"])
    assert got["scores"].shape[1] == 84


@pytest.mark.parametrize("mode", ["exact", "adapted"])
def test_merged_combined_model_exports_to_onnx_matching_pytorch(runs, mode, tmp_path):
    import onnxruntime as ort

    merged = runs[mode].merged
    onnx = export_model(merged, "onnx", output=tmp_path / "m.onnx", imgsz=64)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X[:1].numpy()})
    model = load_model(merged).fuse(verbose=False).eval()
    with torch.no_grad():
        want = model(X[:1])[0].numpy()
    assert got.shape == want.shape and want.shape[1] == 4 + len(COMBINED)  # every combined class is exported
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4)  # boxes in pixels: relative; scores: absolute


def test_the_pseudo_label_count_is_read_back_only_when_it_is_one(tmp_path):
    """A resumed adapted run reads its pseudo-label count from its relabelled data.yaml; anything else there (a
    missing key, a list, a bool, a negative number, bytes that are not UTF-8, no file) gives no count, not an error."""
    data = tmp_path / "data.yaml"
    cases = {"lora_yolo_pseudo_labels: 12\n": 12, "names: {0: a}\n": None, "lora_yolo_pseudo_labels: [1]\n": None,
             "lora_yolo_pseudo_labels: true\n": None, "lora_yolo_pseudo_labels: -1\n": None, "- a\n": None}  # fmt: skip
    for text, want in cases.items():
        data.write_text(text)
        assert recorded_pseudo_labels(data) == want, text
    data.write_bytes(b"lora_yolo_pseudo_labels: 3\nnames: {0: \xe9}\n")
    assert recorded_pseudo_labels(data) is None and recorded_pseudo_labels(tmp_path / "missing.yaml") is None
