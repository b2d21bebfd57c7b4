"""A run that went wrong says so: collapsed mAP, a best adapter that is the untouched base, no optimizer step."""

from __future__ import annotations

import pytest
import torch
from conftest import random_adapter

from lora_yolo.diagnose import diagnose, untouched
from lora_yolo.synth import make_dataset
from lora_yolo.train import train

RUN = dict(imgsz=160, batch=8, workers=0, plots=False, device="cpu", seed=0)


@pytest.fixture(scope="module")
def adapters(base_pt):
    """A trained-looking adapter (random B) and the same adapter with every B at zero (no update reached it)."""
    _, trained = random_adapter(base_pt)
    fresh = {k: torch.zeros_like(t) if k.endswith(".lora_B.weight") else t for k, t in trained.tensors.items()}
    return trained, type(trained)(**{**vars(trained), "tensors": fresh})


def test_untouched_is_every_b_exactly_zero(adapters):
    trained, fresh = adapters
    assert untouched(fresh) and not untouched(trained)
    one = next(k for k in trained.tensors if k.endswith(".lora_B.weight"))
    moved = dict(fresh.tensors)
    moved[one] = moved[one].clone()
    moved[one].view(-1)[0] = 1e-4  # a single moved entry is an update
    assert not untouched(type(fresh)(**{**vars(fresh), "tensors": moved}))


@pytest.mark.parametrize(
    ("history", "zero_shot", "collapsed"),
    [
        ([0.30, 0.10, 0.05], None, True),  # fell to a sixth of epoch 1's
        ([0.00, 0.00, 0.00], 0.024, True),  # the real-checkpoint case: 0.024 zero-shot, 0.000 from epoch 1 on
        ([0.10, 0.40, 0.21], None, False),  # 52% of its best: a dip, not a collapse
        ([0.10, 0.40, 0.19], None, True),
        ([0.015, 0.0, 0.0], None, False),  # below the 0.02 floor: noise on a tiny validation set
        ([0.2, 0.3, 0.35], 0.5, False),  # below the base but rising: not a collapse (the last check says it)
    ],
)
def test_collapse_rule(history, zero_shot, collapsed):
    # both adapters trained (not untouched)
    found = diagnose(history, zero_shot, max(history), False, False, lr0=0.01, nbs=64, batch=8)
    assert any("collapsed" in w and "--lr0 (e.g. 0.001)" in w for w in found) == collapsed


def test_collapse_under_optimizer_auto_names_an_lr0_that_is_used():
    # optimizer=auto ignores --lr0: the fix must switch the optimizer too, and start from the lr auto chose
    (found,) = diagnose([0.3, 0.01], None, 0.3, False, False, lr0=0.00125, nbs=8, batch=8, auto=True)
    assert "optimizer=AdamW and a lower --lr0 (e.g. 0.000125; optimizer=auto chose 0.00125 and ignores" in found


def test_no_better_than_zero_shot_is_said():
    found = diagnose([0.2, 0.3, 0.35], 0.5, 0.35, False, False, lr0=0.01, nbs=64, batch=8)
    assert found == ["the fine-tuned model scores no better than the base zero-shot (box mAP50-95 0.3500 vs 0.5000)"]
    assert diagnose([0.2, 0.3, 0.6], 0.5, 0.6, False, False, lr0=0.01, nbs=64, batch=8) == []


@pytest.fixture(scope="module")
def domain_a(tmp_path_factory):
    """8 images of the demo base's own domain: its zero-shot mAP50-95 is about 0.66, far from zero."""
    return make_dataset(tmp_path_factory.mktemp("a8"), "A", n_train=8, n_val=8, imgsz=160, seed=3)


def test_collapsed_run_whose_best_is_the_base_says_both(demo_base, domain_a, tmp_path):
    """One batch per epoch and Ultralytics' warmup: epoch 1's only step runs at lr 0, so the adapter saved as best
    after it is the base; later steps at lr0 1.0 wreck the model. The summary must not present that as fine-tuned."""
    result = train(
        domain_a, model=demo_base, project=str(tmp_path), name="r", epochs=3, nbs=8, optimizer="AdamW", lr0=1.0, **RUN
    )
    assert len(result.warnings) == 2, result.warnings
    collapse, best = result.warnings
    assert collapse.startswith("validation box mAP50-95 collapsed: 0.6") and "0.0000 after the last epoch" in collapse
    assert "--lr0 (e.g. 0.1)" in collapse
    assert best.startswith("the best adapter is the untouched base")
    assert "WARNING: the best adapter is the untouched base" in result.table()
    assert "mAP50-95, merged.pt (the untouched base)" in result.table() and "mAP50-95, fine-tuned" not in result.table()


def test_damaged_results_rows_are_skipped(tmp_path):
    from lora_yolo.diagnose import map_history

    f = tmp_path / "results.csv"
    f.write_text("epoch, metrics/mAP50-95(B)\n1, 0.25\n2\n3, 0.5, extra\n4, x\n5, 0.125\n")
    assert map_history(f) == [0.25, 0.5, 0.125]  # row 2 too short, row 4 not a number; row 3's extra field ignored


def test_run_without_an_optimizer_step_says_so(demo_base, domain_a, tmp_path):
    """8 images at batch 8 with Ultralytics' default nbs=64: the first step (lr 0) is the only one in 2 epochs."""
    result = train(domain_a, model=demo_base, project=str(tmp_path), name="r", epochs=2, **RUN)
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("no optimizer step changed the adapter: it is identical to the base")
    assert "pass nbs=8" in result.warnings[0]
