"""What went wrong in a finished run, said plainly: a collapsed validation mAP, a "best" adapter that is still the
base, a run in which no optimizer step reached the adapter.

Each of these happened to users and was invisible in the summary: on a real pretrained checkpoint a too-large lr0
drives mAP to 0 after one epoch and the best adapter saved is the one from before any update, which the summary then
presented as the fine-tuned result; on tiny data Ultralytics accumulates gradients over `nbs` images (64 by default)
and may never step at all, so the adapter written is the base's. Judged from what the run itself wrote (its
results.csv and its adapters), so the same checks hold for a resumed run or a DDP run's files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from lora_yolo.adapter import Adapter

# The last epoch's validation mAP50-95 below this share of the best seen (the base zero-shot included) is a collapse:
# far below where it was, and still there when training ended.
COLLAPSE_SHARE = 0.5
# Below this mAP50-95 a score is noise on a tiny validation set: no collapse from it, nothing to beat.
COLLAPSE_FLOOR = 0.02


def map_history(results_csv: Path, column: str = "metrics/mAP50-95(B)") -> list[float]:
    """Validation box mAP50-95 (or another `column`: top-1 accuracy for classification) after each epoch, as
    Ultralytics wrote it; a damaged row (a run killed while writing, then resumed) is skipped rather than failing
    the end of a finished run."""
    if not results_csv.is_file():
        return []
    history = []
    with open(results_csv, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            value = next((v for k, v in row.items() if k and k.strip() == column), None)
            try:
                history.append(float(value))
            except (TypeError, ValueError):
                continue
    return history


def untouched(adapter: Adapter) -> bool:
    """True when no update reached the adapter: every LoRA B is still exactly zero, so delta W = B A = 0.

    B starts at zero and its gradient is not zero once A is random, so any optimizer step with a learning rate above
    zero moves it; Ultralytics' warmup starts the weight groups at lr 0, so an early step may leave it at zero.
    """
    bs = [t for k, t in adapter.tensors.items() if k.endswith(".lora_B.weight")]
    return bool(bs) and all(not torch.any(t) for t in bs)


def diagnose(
    history: list[float],
    zero_shot: float | None,
    final: float,
    best_untouched: bool,
    last_untouched: bool,
    lr0: float,
    nbs: int,
    batch: int,
    auto: bool = False,
    score: str = "box mAP50-95",
) -> list[str]:
    """One line per problem found, each naming its fix; empty for a run that trained as it should.

    `best_untouched` / `last_untouched`: `untouched()` of adapter.safetensors / adapter_last.safetensors. `lr0` is
    the learning rate the run used; `auto`: Ultralytics' `optimizer=auto` chose it (and ignores `--lr0`); `score`
    names what `history`, `zero_shot` and `final` measure.
    """
    if last_untouched:
        return [
            f"no optimizer step changed the adapter: it is identical to the base. Ultralytics accumulates gradients "
            f"over nbs={nbs} images before each step (batch {batch}) and warms the learning rate up from 0; "
            f"pass nbs={batch} or train more epochs"
        ]
    problems = []
    start = [zero_shot] if zero_shot is not None else []
    peak = max([*start, *history], default=0.0)
    if history and peak >= COLLAPSE_FLOOR and history[-1] < COLLAPSE_SHARE * peak:
        where = "the base zero-shot" if peak == zero_shot else f"epoch {history.index(peak) + 1}"
        problems.append(
            f"validation {score} collapsed: {peak:.4f} at {where}, {history[-1]:.4f} after the last epoch "
            f"(merged.pt holds the best epoch's adapter). The learning rate is too high for this base: train again "
            + (
                f"with optimizer=AdamW and a lower --lr0 (e.g. {lr0 / 10:g}; optimizer=auto chose {lr0:g} and ignores "
                "--lr0)"
                if auto
                else f"with a lower --lr0 (e.g. {lr0 / 10:g})"
            )
        )
    if best_untouched:
        problems.append(
            "the best adapter is the untouched base: no update had reached it when it was saved and every later epoch "
            "scored lower, so merged.pt is the base, not a fine-tuned model"
        )
    elif zero_shot is not None and zero_shot >= COLLAPSE_FLOOR and final <= zero_shot:
        problems.append(
            f"the fine-tuned model scores no better than the base zero-shot ({score} {final:.4f} vs {zero_shot:.4f})"
        )
    return problems
