"""Lean activations and gradient checkpointing (`lora_yolo.memory`): the same loss and gradients, less memory held
for backward."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import TINY, plain_ultralytics
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile
from ultralytics.cfg import get_cfg
from ultralytics.utils import LOGGER

from lora_yolo import LoraConfig, load_model
from lora_yolo.adapter import load_adapter
from lora_yolo.errors import LoraYoloError
from lora_yolo.fold import FoldedBatchNorm2d, fold_batchnorm
from lora_yolo.inject import add_lora, set_trainable
from lora_yolo.memory import add_training_forward, lean_activations, remove_training_forward
from lora_yolo.synth import make_dataset
from lora_yolo.targets import select_targets
from lora_yolo.train import train
from lora_yolo.trainer import LoraDetectionTrainer, channels_last_on_cpu


def training_model(form: str) -> nn.Module:
    """YOLO11n with the default DoRA adapters, BatchNorms folded and frozen ones in eval; `form` is "folded" (no
    training forward), "lean" (as the trainer builds it) or "checkpointed" (`gradient_checkpointing`)."""
    torch.manual_seed(0)
    model = load_model("yolo11n.yaml")
    model.args = get_cfg()  # the hyper-parameters Ultralytics' loss reads
    config = LoraConfig(use_dora=True)
    add_lora(model, select_targets(model, config), use_dora=True)
    set_trainable(model, {n for n, _ in model.named_parameters() if ".lora_" in n})
    with torch.no_grad():  # trained-looking adapters, so every gradient path is exercised
        for n, p in model.named_parameters():
            if n.endswith("lora_B.weight"):
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(n)))
    fold_batchnorm(model)
    if form != "folded":
        add_training_forward(model, checkpointing=form == "checkpointed")
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def batch(size: int = 2, imgsz: int = 128) -> dict:
    g = torch.Generator().manual_seed(0)
    n = 3 * size
    return {
        "img": torch.rand(size, 3, imgsz, imgsz, generator=g),
        "batch_idx": torch.arange(size).repeat_interleave(3).float(),
        "cls": torch.randint(0, 80, (n, 1), generator=g).float(),
        "bboxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.2 + 0.05], 1),
    }


def held_for_backward(model: nn.Module, data: dict) -> tuple[torch.Tensor, int]:
    """The loss and the bytes allocated during forward + loss and still held when it returns (what backward needs),
    counted by torch's profiler: checkpointed layers' inputs included, which saved-tensor hooks would not see."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = model.loss(data)
    return loss, sum(e.self_cpu_memory_usage for e in prof.key_averages())


def loss_grads_held(form: str, data: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    model = training_model(form)
    loss, held = held_for_backward(model, data)
    loss.sum().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, held


def test_lean_and_checkpointed_forms_give_the_same_loss_and_gradients_with_less_memory_held():
    data = batch()
    loss0, grads0, held0 = loss_grads_held("folded", data)
    assert len(grads0) > 100  # every adapter tensor
    loss1, grads1, held1 = loss_grads_held("lean", data)
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
    for n, g in grads0.items():  # SiLU recomputed by the same kernel from the same input: bit-identical
        assert torch.equal(g, grads1[n]), n
    assert held1 < 0.9 * held0, (held1, held0)  # deterministic: 0.866x here, 0.67x at 320 px, batch 8 (less loss)
    loss2, grads2, held2 = loss_grads_held("checkpointed", data)
    assert torch.equal(loss0, loss2) and grads0.keys() == grads2.keys()
    for n, g in grads0.items():  # the same ops in the same order: equal up to float summation order (seen: exact)
        assert torch.allclose(g, grads2[n], rtol=1e-5, atol=1e-8), n
    assert held2 < 0.5 * held0, (held2, held0)  # measured on this model at 128 px: 0.37x


def test_lean_activations_store_a_silu_output_and_its_views_as_the_silu_input():
    """A conv after SiLU, and one after a `chunk` half of it (C2f's pattern): the input each conv's node gives back
    in backward is rebuilt (another storage) with exactly the values the conv saw. A conv after another tensor, or
    after SiLU outside the context, gets its own input back."""
    torch.manual_seed(0)
    weight = torch.randn(4, 4, 3, 3, requires_grad=True)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with lean_activations():
        a = F.silu(x * 2)
        half = a.chunk(2, 1)[1]
        after_whole, after_half = F.conv2d(a, weight), F.conv2d(half, weight[:, :2])
        after_other = F.conv2d(x, weight)
    outside = F.silu(x)
    after_outside = F.conv2d(outside, weight)
    rebuilt = after_whole.grad_fn._saved_input, after_half.grad_fn._saved_input
    assert torch.equal(rebuilt[0], a) and torch.equal(rebuilt[1], half)
    assert all(storage(r) != storage(a) for r in rebuilt)
    assert storage(after_other.grad_fn._saved_input) == storage(x)
    assert storage(after_outside.grad_fn._saved_input) == storage(outside)


def test_lean_activations_keep_autograds_in_place_error_and_survive_a_freed_silu():
    """Autograd does not check hooked saved tensors for in-place changes: the hooks do, for any saved tensor and for
    a SiLU input changed after SiLU. A SiLU whose graph was already run backward is kept as it is."""
    x = torch.randn(3, requires_grad=True)
    for change in ("saved", "silu input"):
        with lean_activations():
            y = x * 2
            out = (y * y).sum() if change == "saved" else (F.silu(y) * x).sum()
        with torch.no_grad():
            y.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()
    a = F.silu(x * 2)
    a.sum().backward()  # frees the SiLU node's saved input
    w = torch.randn(3, requires_grad=True)
    with lean_activations():
        out = (a * w).sum()
    assert torch.equal(torch.autograd.grad(out, w)[0], a.detach())  # `a` kept as it is, as plain autograd keeps it


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_eval_copies_and_removal_run_plain_layers():
    model = training_model("checkpointed")
    assert all(vars(layer)["forward"].args[1:] == (True,) for layer in list(model.model)[:-1])
    assert "forward" not in vars(model.model[-1])  # the head feeds the loss directly: not checkpointed
    twin = copy.deepcopy(model)  # as Ultralytics' EMA is made: each copied wrapper calls its own copied layer
    assert all(vars(layer)["forward"].args[0] is layer for layer in list(twin.model)[:-1])
    lean = training_model("lean")
    assert all(vars(layer)["forward"].args[1:] == (False,) for layer in lean.model)  # the head too
    x = batch()["img"]
    model.eval()
    with torch.no_grad():
        y_eval = model(x)[0]
    remove_training_forward(model)
    assert not any("forward" in vars(layer) for layer in model.model)
    with torch.no_grad():
        assert torch.equal(model(x)[0], y_eval)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("shapes"), "B1", n_train=8, n_val=4, imgsz=64, seed=5)


def test_training_with_checkpointing_gives_the_same_adapter(shapes, tmp_path):
    """Two runs from the same YAML base and seed, with and without checkpointing: the same adapter, so
    checkpointing changed nothing but memory and time; the flag travels in lora.yaml, not in plain checkpoints."""
    results, forms = {}, {}

    def record(trainer):  # what each layer of the model being trained runs: lean (False), checkpointed (True), plain
        wrappers = [vars(layer).get("forward") for layer in trainer.model.model]
        forms[trainer.lora_config.gradient_checkpointing] = [w.args[1] if w else None for w in wrappers]

    for flag in (False, True):
        config = LoraConfig(use_dora=True, gradient_checkpointing=flag)
        results[flag] = train(shapes, model="yolo11n.yaml", config=config, project=str(tmp_path), name=str(flag),
                              callbacks={"on_train_epoch_start": [record]}, **{**TINY, "epochs": 1})  # fmt: skip
    n = len(forms[False])
    assert forms == {False: [False] * n, True: [True] * (n - 1) + [None]}  # the trainer installs either form
    a, b = (load_adapter(results[f].adapter_last) for f in (False, True))
    assert a.tensors.keys() == b.tensors.keys()
    diff = max(float((a.tensors[k].float() - b.tensors[k].float()).abs().max()) for k in a.tensors)
    assert diff == 0, diff  # the same gradients, so the same updates, bit for bit
    assert any(k.endswith("lora_B.weight") and torch.any(t) for k, t in b.tensors.items())  # it trained
    assert (
        b.config.gradient_checkpointing
        and "gradient_checkpointing: true" in (results[True].save_dir / "lora.yaml").read_text()
    )
    ckpt = torch.load(results[True].save_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)
    assert not any("forward" in vars(layer) for layer in ckpt["model"].model)  # the EMA (stripped: model) is plain
    base = torch.load(results[True].save_dir / "weights" / "base.pt", map_location="cpu", weights_only=False)
    assert not any("forward" in vars(layer) for layer in base["model"].model)  # the YAML-built base: plain too


def test_lean_activations_keep_silu_inputs_in_channels_last_too():
    """The trainer trains channels-last on x86 CPUs (Ultralytics on CUDA): SiLU outputs are still stored as their
    inputs there (`pack_saved` rebuilds only a SiLU output with its input's strides), with the same loss and
    gradients within float tolerance of the standard format."""
    data = batch()
    loss0, grads0, held0 = loss_grads_held("lean", data)
    model = training_model("lean").to(memory_format=torch.channels_last)
    assert model.model[1].conv.base_layer.weight.is_contiguous(memory_format=torch.channels_last)
    loss1, held1 = held_for_backward(model, {**data, "img": data["img"].contiguous(memory_format=torch.channels_last)})
    loss1.sum().backward()
    # measured 1.021x (the profiler also counts format copies); SiLU outputs kept as they are would hold 1.15x here
    assert abs(held1 / held0 - 1) < 0.05, (held1, held0)
    assert torch.allclose(loss1.detach(), loss0, rtol=1e-5)
    for n, g in grads0.items():
        p = model.get_parameter(n)
        assert (p.grad - g).abs().max() / g.abs().max().clamp_min(1e-12) < 1e-4, n


def test_training_runs_channels_last_on_an_x86_cpu_and_writes_standard_checkpoints(shapes, tmp_path):
    """`lora-yolo train` on this CPU trains (and validates the EMA) in channels-last, where Ultralytics alone would
    not (CUDA only), unless `channels_last=False`; its checkpoints and merged.pt hold standard-format weights, as
    Ultralytics writes its own (older Ultralytics releases fuse with `.view`, which fails on channels-last 3x3
    weights). Ultralytics' warning that it ignores `channels_last=True` on the CPU is not shown: here it applies."""
    if not channels_last_on_cpu(None, torch.device("cpu")):
        pytest.skip("channels-last training needs an x86 CPU with oneDNN (this test's CI has one)")
    formats = {}

    def record(trainer):
        weights = (
            trainer.model.model[1].conv.base_layer.weight,
            trainer.ema.ema.model[1].conv.base_layer.weight,
        )
        formats[trainer.args.channels_last] = [w.is_contiguous(memory_format=torch.channels_last) for w in weights]

    lines: list[str] = []
    seen = logging.Handler()
    seen.emit = lambda record: lines.append(str(record.msg))
    LOGGER.addHandler(seen)
    try:
        for flag in (None, True, False):
            run = train(shapes, model="yolo11n.yaml", config=LoraConfig(use_dora=True), project=str(tmp_path),
                        name=str(flag), channels_last=flag, callbacks={"on_train_epoch_end": [record]},
                        **{**TINY, "epochs": 1})  # fmt: skip
    finally:
        LOGGER.removeHandler(seen)
    assert formats == {None: [True, True], True: [True, True], False: [False, False]}
    assert any("LoRA:" in line for line in lines) and not any("'channels_last=True' is only" in line for line in lines)
    run_dir = run.save_dir.parent / "None"
    # the 3x3 convs: last.pt's with the adapters' A among them (as before base.pt was checked), base.pt's the base's
    # own (the YAML-built base, written from the channels-last model)
    for name, convs in (("last.pt", 50), ("base.pt", 40)):
        ckpt = torch.load(run_dir / "weights" / name, map_location="cpu", weights_only=False)
        weights = [p for p in ckpt["model"].parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert len(weights) > convs and all(p.is_contiguous() for p in weights), name
    out = plain_ultralytics(f"""
        import json
        from ultralytics import YOLO
        model = YOLO({str(run_dir / "merged.pt")!r})
        standard = all(p.is_contiguous() for p in model.model.parameters())
        model.model.fuse()
        print(json.dumps({{"standard": standard}}))
    """)
    assert out["standard"], out


def test_under_compile_the_layers_train_plain_and_folded(base_pt, coco8, tmp_path):
    """Ultralytics' `compile=True` with adapters: inductor fails on the lean activations' hooks (measured: "cannot
    determine truth value of Relational" in the first step), so the trainer builds the model without them, still
    folded; gradient checkpointing (the other training forward) and compile are refused together in one line,
    before a run folder is made. A whole compiled run is not in the suite (its compile takes minutes here;
    docs/training.md has one)."""
    base = load_model(base_pt)
    forms = {}
    for compiled in (False, True):
        overrides = {"model": str(base_pt), "data": str(coco8), "compile": compiled, "project": str(tmp_path / "built")}
        model = LoraDetectionTrainer(overrides=overrides, lora=LoraConfig(use_dora=True)).get_model(
            cfg=base.yaml, weights=copy.deepcopy(base)
        )
        forms[compiled] = (
            sum("forward" in vars(layer) for layer in model.model),
            sum(isinstance(m, FoldedBatchNorm2d) for m in model.modules()),
        )
    assert forms[False] == (len(base.model), forms[True][1]) and forms[True][0] == 0 and forms[True][1] > 50
    with pytest.raises(LoraYoloError, match="gradient_checkpointing and compile exclude each other"):
        train(
            coco8,
            model=base_pt,
            config=LoraConfig(gradient_checkpointing=True),
            compile=True,
            project=str(tmp_path / "refused"),
            **TINY,
        )
    assert not (tmp_path / "refused").exists()
