"""`train()`: one call from a dataset YAML to an adapter, a merged checkpoint and a summary of what it cost."""

from __future__ import annotations

import csv
import signal
import statistics
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK

from lora_yolo.adapter import load_adapter
from lora_yolo.branch import check_widenable
from lora_yolo.checkpoint import RTDETR, is_model_yaml, load_model, model_kind, resolve_checkpoint
from lora_yolo.classes import (
    FOLDER,
    PSEUDO_CONF,
    check_add_classes,
    exact_training,
    prepare_dataset,
    recorded_pseudo_labels,
)
from lora_yolo.config import LoraConfig, positive_number
from lora_yolo.datacheck import check_dataset
from lora_yolo.diagnose import diagnose, map_history, untouched
from lora_yolo.errors import LoraYoloError, TrainingInterrupted, first_line
from lora_yolo.passthrough import check_args
from lora_yolo.presets import capped_lr0, resolve_config
from lora_yolo.targets import STATISTICS
from lora_yolo.trainer import (
    ADAPTER,
    ADAPTER_LAST,
    CONFIG_FILE,
    MERGED,
    TRAINERS,
    LoraTrainerMixin,
    base_file,
    check_keypoints,
)

# Train arguments that LoRA owns: passing them would silently fight the adapter setup.
RESERVED = {
    "model": "--model",
    "data": "DATA",
    "resume": "--resume",
    "freeze": "--targets/--include/--exclude",
    "task": "(the base model's task)",
    "mode": "(train)",
    # Ultralytics reads a cfg file in Model.train, not in the trainer this calls: passed through, it would be ignored
    "cfg": "--config (a lora-yolo YAML holds Ultralytics training arguments under 'train:')",
}


@dataclass
class TrainResult:
    """What a run produced and what it cost; `table()` is the summary printed at the end."""

    save_dir: Path
    metrics: dict[str, float]  # mAP50 / mAP50-95 of merged.pt (classify: top1 / top5 accuracy)
    base_metrics: dict[str, float] | None  # the base, zero-shot, when its classes are the dataset's
    trainable: int
    total: int
    epoch_seconds: float  # median over epochs
    pseudo_labels: int | None = None  # add_classes=adapted: boxes of the base's classes the base labelled
    warnings: list[str] = field(default_factory=list)  # what went wrong (`lora_yolo.diagnose`), each with its fix
    untouched: bool = False  # the best adapter received no update: merged.pt is the base

    @property
    def adapter(self) -> Path:
        return self.save_dir / ADAPTER

    @property
    def adapter_last(self) -> Path:
        return self.save_dir / ADAPTER_LAST

    @property
    def merged(self) -> Path:
        return self.save_dir / MERGED

    def table(self) -> str:
        """Human-readable summary."""
        base, m = self.base_metrics, self.metrics
        first, second, label = next((a, b, label) for a, b, label in PAIRS if a in m)
        rows = [
            (
                f"{label}, " + ("merged.pt (the untouched base)" if self.untouched else "fine-tuned"),
                f"{m[first]:.4f} / {m[second]:.4f}",
            ),
            *[
                (f"{kind} mAP50 / mAP50-95, fine-tuned", f"{m[f'{kind} mAP50']:.4f} / {m[f'{kind} mAP50-95']:.4f}")
                for kind in ("mask", "pose")
                if f"{kind} mAP50" in m
            ],
            (
                f"{label}, base zero-shot",
                f"{base[first]:.4f} / {base[second]:.4f}" if base else "n/a (classes differ)",
            ),
            (
                "trainable parameters",
                f"{self.trainable:,} of {self.total:,} ({100 * self.trainable / self.total:.2f}%)",
            ),
            (
                "adapter vs merged.pt (fp32)",
                f"{self.adapter.stat().st_size:,} B vs {self.merged.stat().st_size:,} B "
                f"({self.merged.stat().st_size / self.adapter.stat().st_size:.0f}x smaller)",
            ),
            ("time per epoch (median)", f"{self.epoch_seconds:.1f} s"),
            *(
                [("pseudo-labels added (the base's classes)", f"{self.pseudo_labels:,}")]
                if self.pseudo_labels is not None
                else []
            ),
            ("adapter", str(self.adapter)),
            ("adapter (last epoch)", str(self.adapter_last)),
            ("merged model", str(self.merged)),
            ("LoRA config", str(self.save_dir / CONFIG_FILE)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join([*(f"{k:<{width}}  {v}" for k, v in rows), *(f"WARNING: {w}" for w in self.warnings)])


# The two scores the summary shows, per kind of metrics (the first key present wins)
PAIRS = (
    ("top1", "top5", "top-1 / top-5 accuracy"),
    ("mIoU", "pixel accuracy", "mIoU / pixel accuracy"),
    ("delta1", "abs_rel", "delta1 / abs_rel"),
    ("mAP50", "mAP50-95", "mAP50 / mAP50-95"),
)

# What a run is judged by: (results.csv column, `TrainResult.metrics` key, name in messages), per task.
SCORES = {
    "classify": ("metrics/accuracy_top1", "top1", "top-1 accuracy"),
    "detect": ("metrics/mAP50-95(B)", "mAP50-95", "box mAP50-95"),
    "semantic": ("metrics/mIoU", "mIoU", "mIoU"),
    "depth": ("metrics/delta1", "delta1", "depth delta1 accuracy"),
}


def score_of(task: str) -> tuple[str, str, str]:
    """The score of `task` (every task with a Detect head is judged by its box mAP50-95)."""
    return SCORES.get(task, SCORES["detect"])


def _map(metrics: dict[str, float]) -> dict[str, float]:
    """Box mAP50 / mAP50-95, plus mask (segment) or keypoint (pose) mAP when the task reports them; top-1 / top-5
    accuracy for classification; mIoU and pixel accuracy for semantic segmentation; delta1 (share of pixels within
    1.25x of the true depth) and the mean relative error for depth."""
    if "metrics/accuracy_top1" in metrics:
        return {"top1": float(metrics["metrics/accuracy_top1"]), "top5": float(metrics["metrics/accuracy_top5"])}
    if "metrics/mIoU" in metrics:
        return {"mIoU": float(metrics["metrics/mIoU"]), "pixel accuracy": float(metrics["metrics/pixel_acc"])}
    if "metrics/delta1" in metrics:
        return {"delta1": float(metrics["metrics/delta1"]), "abs_rel": float(metrics["metrics/abs_rel"])}
    out = {"mAP50": float(metrics["metrics/mAP50(B)"]), "mAP50-95": float(metrics["metrics/mAP50-95(B)"])}
    for suffix, kind in (("M", "mask"), ("P", "pose")):
        if f"metrics/mAP50({suffix})" in metrics:
            out[f"{kind} mAP50"] = float(metrics[f"metrics/mAP50({suffix})"])
            out[f"{kind} mAP50-95"] = float(metrics[f"metrics/mAP50-95({suffix})"])
    return out


def _lr0_for_base(overrides: dict[str, Any], config: LoraConfig | None, base: torch.nn.Module) -> dict[str, Any]:
    """`overrides` with lr0 at most `config.lr0_base_ratio` times the lr0 the base was trained with (`capped_lr0`),
    said in the log when lowered. Left as they are: `optimizer=auto` (Ultralytics picks its own lr and ignores lr0),
    exact add_classes (its own optimizer and lr0 train class branches in full), and an lr0 that is not a number
    (Ultralytics' own argument check reports it)."""
    optimizer = str(overrides.get("optimizer", DEFAULT_CFG.optimizer))
    if config is None or not config.lr0_base_ratio or config.add_classes == "exact" or optimizer.lower() == "auto":
        return overrides
    lr0 = overrides.get("lr0", DEFAULT_CFG.lr0)
    if not positive_number(lr0):
        return overrides
    capped, why = capped_lr0(float(lr0), optimizer, getattr(base, "args", None) or {}, config.lr0_base_ratio)
    if why is None:
        return overrides
    LOGGER.info(f"LoRA: {why}")
    return {**overrides, "lr0": capped}


def _epoch_seconds(results_csv: Path) -> float:
    with open(results_csv, encoding="utf-8") as f:
        times = [float(row["time"]) for row in csv.DictReader(f)]
    return statistics.median(b - a for a, b in zip([0.0, *times], times)) if times else 0.0


def train(
    data: str | Path | None,
    model: str | Path = "yolo11n.pt",
    config: LoraConfig | None = None,
    resume: str | Path | None = None,
    callbacks: dict[str, list[Callable]] | None = None,
    pseudo_conf: float = PSEUDO_CONF,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune `model` on the Ultralytics dataset `data` with LoRA; `overrides` are Ultralytics train arguments.

    `callbacks` maps Ultralytics trainer events (`on_train_epoch_end`, ...) to extra functions of the trainer.
    With `config.add_classes` the run keeps the base's classes and adds the dataset's (`lora_yolo.classes`);
    `pseudo_conf` is the confidence of the base's pseudo-labels in `adapted` mode.

    Example:
        >>> result = train("coco8.yaml", model="yolo11n.pt", config=LoraConfig(r=8), epochs=10, imgsz=640)
        >>> print(result.table())
    """
    if config is None and resume is None:  # the default preset, its training arguments under the caller's
        config, preset_args = resolve_config(None)
        if "lr0" in overrides:  # the caller's lr0 is used as given, as on the command line
            config = replace(config, lr0_base_ratio=0.0)
        overrides = {**preset_args, **overrides}
    overrides = exact_training(config, overrides)
    check_args(overrides, RESERVED, "training")
    pseudo_labels = None
    if resume is not None:
        if config is not None:  # as Ultralytics, which keeps a resumed run's own arguments (batch, device aside)
            raise LoraYoloError("a resumed run keeps the LoRA settings it started with: pass no config with resume")
        if not Path(resume).is_file():
            raise LoraYoloError(f"resume checkpoint not found: {resume}")
        task, kind, run_data = _resumed_run(resume)
        if Path(run_data).parent.name == FOLDER:
            if data is not None:
                raise LoraYoloError(
                    f"this run trains on its relabelled copy of the dataset ({run_data}, add_classes): resume without "
                    "DATA"
                )
            pseudo_labels = recorded_pseudo_labels(run_data)
        if data is not None:  # a new path for the run's dataset (moved): Ultralytics takes it on resume
            check_dataset(data, task)
            overrides = {**overrides, "data": str(data)}
        trainer = _trainer(kind, overrides={**overrides, "resume": str(resume)})
    else:
        if data is None:
            raise LoraYoloError("DATA is required (a dataset YAML) unless --resume is given")
        if config is not None and config.add_classes:  # before the trainer makes a run folder
            if is_model_yaml(model):
                raise LoraYoloError("add_classes keeps a trained base's classes: give a .pt checkpoint, not a YAML")
            if not 0 < pseudo_conf <= 1:
                raise LoraYoloError(f"pseudo_conf must be in (0, 1], got {pseudo_conf}")
        base = load_model(model)
        task, kind = base.task, model_kind(base)
        resolved = check_dataset(data, task)
        if task == "pose":  # before the trainer makes a run folder
            check_keypoints(resolved, None if is_model_yaml(model) else base)
        if config is not None and config.add_classes:
            check_add_classes(resolved, base.names, kind, adapted=config.add_classes == "adapted")
            check_widenable(base)
        overrides = _lr0_for_base(overrides, config, base)
        trainer = _trainer(
            kind, overrides={**overrides, "model": str(model), "data": str(data), "task": task}, lora=config
        )
    with _refused_before_training(trainer):  # until the first epoch starts
        if resume is None:
            if config is not None and config.add_classes:  # the relabelled copy of the dataset, in the run folder
                if trainer.ddp:  # Ultralytics' DDP launcher deletes the run folder, and the relabelled copy with it
                    raise LoraYoloError("add_classes trains on one device for now: pass a single --device")
                adapted = config.add_classes == "adapted"
                relabelled, pseudo = prepare_dataset(
                    resolved,
                    resolve_checkpoint(model),
                    base.names,
                    trainer.save_dir / FOLDER,
                    pseudo_conf if adapted else None,
                    task,
                )
                pseudo_labels = pseudo if adapted else None
                trainer.args.data = str(relabelled)
                trainer.data = trainer.get_dataset()
            # As Ultralytics' Model.train does: build the model before train(), so the DDP launcher pickles the model
            # with its adapters and each worker trains that very model.
            trainer.model = trainer.get_model(cfg=base.yaml, weights=None if is_model_yaml(model) else base)
        for event, functions in (callbacks or {}).items():
            for function in functions:
                trainer.add_callback(event, function)
        with _stop_on_sigterm():
            try:
                trainer.train()
            except KeyboardInterrupt:
                raise TrainingInterrupted(trainer.last) from None

    adapter = load_adapter(trainer.save_dir / ADAPTER)
    base = base_file(adapter)
    column, key, name = score_of(trainer.args.task)
    metrics = trainer.metrics  # None in the parent of a DDP run: its workers validated
    if not metrics or column not in metrics:
        metrics = _validate(trainer, trainer.save_dir / MERGED, "merged_val")
    base_metrics = None
    same_classes = adapter.base["nc"] == adapter.nc and load_model(base).names == adapter.names
    if same_classes or adapter.task == "depth":  # depth has no classes: the base always predicts the same thing
        base_metrics = _map(_validate(trainer, base, "base_val"))
    metrics = _map(metrics)
    best_untouched = untouched(adapter)
    warnings = diagnose(
        map_history(trainer.csv, column),
        zero_shot=base_metrics[key] if base_metrics else None,
        final=metrics[key],
        best_untouched=best_untouched,
        last_untouched=untouched(load_adapter(trainer.save_dir / ADAPTER_LAST)),
        lr0=_learning_rate(trainer),
        nbs=trainer.args.nbs,
        batch=trainer.args.batch,
        auto=trainer.args.optimizer == "auto",
        score=name,
    )
    for w in warnings:
        LOGGER.warning(f"lora-yolo: {w}")
    return TrainResult(
        save_dir=trainer.save_dir,
        metrics=metrics,
        base_metrics=base_metrics,
        # parameters only: a trained BatchNorm's statistics (train_head, add_classes' copies) are stored, not trained
        trainable=sum(t.numel() for k, t in adapter.tensors.items() if not k.endswith(STATISTICS)),
        total=sum(p.numel() for p in trainer.model.parameters()),
        epoch_seconds=_epoch_seconds(trainer.csv),
        pseudo_labels=pseudo_labels,
        warnings=warnings,
        untouched=best_untouched,
    )


def _take_back_run_folder(trainer: LoraTrainerMixin) -> None:
    """Undo what Ultralytics' trainer wrote when it was built, for a new run refused before training starts: left
    behind, its folder (args.yaml and an empty weights/) would take the run's name from the next run.

    Only a folder that holds nothing else goes: without `exist_ok` the folder is new, but a name such as `x/..` or a
    second run started at the same moment can reach an existing one, and once setup has written more (labels.jpg)
    it is left whole. With `exist_ok`, on resume, or on a rank other than 0 (a torchrun launch), nothing is touched.
    """
    run, weights = trainer.save_dir, trainer.wdir
    if trainer.args.exist_ok or trainer.args.resume or RANK not in {-1, 0} or not run.is_dir():
        return
    if {p.name for p in run.iterdir()} <= {"args.yaml", weights.name} and not any(weights.glob("*")):
        (run / "args.yaml").unlink(missing_ok=True)
        for folder in (weights, run):
            if folder.is_dir():
                folder.rmdir()


@contextmanager
def _refused_before_training(trainer: LoraTrainerMixin) -> Iterator[None]:
    """A new run refused before its first epoch starts, while its model is built (a selection that matches nothing,
    a rank no layer can use) or in Ultralytics' setup inside `trainer.train()` (a split with no images, images
    without labels, a bad `imgsz`, a folder it cannot write): the run folder Ultralytics made is taken back
    (`_take_back_run_folder`), and Ultralytics' plain Python exceptions become one line. Once training has started
    an error is not the user's input and keeps its traceback; so does a DDP run's, which its workers report."""
    started = []  # marked before any other on_train_start callback runs: an error in one is not setup's
    trainer.callbacks["on_train_start"].insert(0, lambda _: started.append(True))
    try:
        yield
    except BaseException as e:
        if started:
            raise
        _take_back_run_folder(trainer)
        if isinstance(e, (ValueError, TypeError, OSError)) and not trainer.ddp:
            raise LoraYoloError(first_line(e)) from e  # the cause kept for --debug
        raise


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so a kill from a scheduler unwinds like Ctrl-C.

    Python runs the handler between bytecodes, so a checkpoint being written (one C-level write) completes first.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resumed_run(checkpoint: str | Path) -> tuple[str, str, str]:
    """The task, model kind and dataset of an interrupted run, from its own last.pt (a checkpoint this user's run
    wrote)."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model, args = ckpt.get("ema") or ckpt["model"], ckpt["train_args"]
    except Exception as e:
        raise LoraYoloError(f"{checkpoint} is not an Ultralytics training checkpoint ({first_line(e)})") from None
    if getattr(model, "lora_meta", None) is None or not args.get("data"):
        raise LoraYoloError(f"{checkpoint} is not a lora-yolo run's checkpoint: resume from a run's weights/last.pt")
    if not 0 < ckpt.get("epoch", -1) + 1 < args.get("epochs", 0):  # Ultralytics asserts this deep in its setup
        raise LoraYoloError(f"{checkpoint}: the run finished its {args.get('epochs')} epochs, nothing to resume")
    task = args.get("task") or "detect"
    return task, RTDETR if model_kind(model) == RTDETR else task, str(args["data"])


def _learning_rate(trainer: LoraTrainerMixin) -> float:
    """The initial learning rate the run used: with `optimizer=auto` Ultralytics picks its own and ignores lr0 (the
    parent of a DDP run has no optimizer; its lr0 stands in)."""
    optimizer = getattr(trainer, "optimizer", None)
    return optimizer.param_groups[0]["initial_lr"] if optimizer is not None else trainer.args.lr0


def _trainer(kind: str, **kwargs: Any) -> LoraTrainerMixin:
    """The trainer of the model's kind (its task, or `rtdetr`); what Ultralytics refuses while setting up (a GPU that
    is not there, a bad value) is one line."""
    try:
        return TRAINERS[kind][0](**kwargs)
    except (ValueError, SyntaxError, TypeError, OSError, RuntimeError) as e:  # OSError: a folder it cannot write
        raise LoraYoloError(first_line(e)) from None


def _validate(trainer: LoraTrainerMixin, model: str | Path, name: str) -> dict[str, float]:
    """Ultralytics validation of a checkpoint with the run's own settings, saved under the run folder."""
    args = {**vars(trainer.args), "mode": "val", "plots": False, "save_json": False}
    return validator_of(trainer)(save_dir=trainer.save_dir / name, args=args)(model=str(model))


def validator_of(trainer: LoraTrainerMixin) -> type:
    """The Ultralytics validator of the trainer's model kind (RT-DETR's is not its task's, detect)."""
    return next(v for t, v in TRAINERS.values() if isinstance(trainer, t))
