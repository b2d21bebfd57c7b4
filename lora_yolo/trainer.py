"""LoRA trainers: Ultralytics' own task trainers, with adapters added to the model they build.

`LoraTrainerMixin` holds the LoRA changes; `LoraDetectionTrainer`, `LoraSegmentationTrainer`, `LoraPoseTrainer`,
`LoraOBBTrainer`, `LoraSemanticTrainer`, `LoraDepthTrainer`, `LoraClassificationTrainer` and `LoraRTDETRTrainer`
put it in front of Ultralytics' trainer for each task (`TRAINERS`).

Everything Ultralytics does around the model (augmentation, EMA, AMP, schedulers, loggers, plots, validation,
callbacks, DDP) stays its own; this class changes only what it must, each where Ultralytics decides it:

- `get_model` builds the fine-tuning model exactly as DetectionTrainer does, adds the adapters, and turns the
  frozen set into Ultralytics' own `freeze` list. That matters: `_setup_train` sets `requires_grad=True` on every
  parameter not named in `freeze`, and builds the optimizer, DDP wrapper and EMA right after, before any callback.
  The class convs are trained in full whenever the dataset's class names differ from the base's; with
  add_classes a copy of each class branch trains instead (`lora_yolo.branch`), and nothing of the base (exact) or
  adapters outside the class branches (adapted).
- `build_optimizer` takes Ultralytics' optimizer and splits out two kinds of adapter tensor: LoRA's B, at
  `loraplus_lr_ratio` times the learning rate (LoRA+), and DoRA's magnitudes, without weight decay (decay would
  shrink every channel's norm, which the magnitude is); under MuSGD the adapters take its SGD part. With
  add_classes=adapted the class-branch copies train at their own learning rate.
- `_load_checkpoint_state` (resume) puts the exact base back into the EMA after Ultralytics loads its fp16 copy.
- `_handle_nan_recovery` stops every rank on a NaN seen by any rank, with one message.
- the model's frozen BatchNorms are folded into their convs (`lora_yolo.fold`): the same function, and autograd
  keeps no copy of each conv's output for BatchNorm's backward. Each SiLU output autograd would keep is kept as
  its input and recomputed in backward, and with `gradient_checkpointing` each layer's activations are
  (`lora_yolo.memory`); the EMA keeps plain layers.
- `setup_model` also trains on the CPU in channels-last memory format (`channels_last_on_cpu`), where Ultralytics
  does so on CUDA only: the same function, 0.88-0.97x the step time on x86 at 320 px (docs/benchmarks.md).
- `_model_train` puts frozen BatchNorm layers in eval mode each epoch (train mode would update their running
  statistics although their weights are frozen) and checks the trainable set has not drifted.
- `save_model` also writes the EMA's adapter (the weights Ultralytics validates) as safetensors.
- `final_eval` validates `merged.pt`, not `best.pt`: Ultralytics' final_eval fuses conv+BN on the loaded model,
  which would drop an unmerged adapter.

The LoRA state travels on the model as `model.lora_meta` (a plain dict), so it survives EMA deep copies,
checkpoint pickles and the cloudpickle that Ultralytics' DDP launcher uses to rebuild the model in each worker;
everything read after the model is built (the LoRA+ ratio) is read from there, since the worker's trainer is
rebuilt from Ultralytics' arguments alone. Knowledge distillation (`distill_model=`) is refused: Ultralytics wraps
the model in a DistillationModel, which carries no adapters.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import platform
from copy import deepcopy
from pathlib import Path

import torch
from torch import distributed as dist
from torch import nn
from ultralytics.cfg import QUANTIZE_ALIASES, cfg2dict
from ultralytics.models.rtdetr.train import RTDETRTrainer
from ultralytics.models.rtdetr.val import RTDETRValidator
from ultralytics.models.yolo.classify import ClassificationTrainer, ClassificationValidator
from ultralytics.models.yolo.depth import DepthTrainer, DepthValidator
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.models.yolo.obb import OBBTrainer, OBBValidator
from ultralytics.models.yolo.pose import PoseTrainer, PoseValidator
from ultralytics.models.yolo.segment import SegmentationTrainer, SegmentationValidator
from ultralytics.models.yolo.semantic import SemanticSegmentationTrainer, SemanticSegmentationValidator
from ultralytics.utils import DEFAULT_CFG, LOCAL_RANK, LOGGER, RANK, YAML
from ultralytics.utils.torch_utils import strip_optimizer, torch_distributed_zero_first, unwrap_model

from lora_yolo.adapter import (
    Adapter,
    attach_adapter,
    extract_adapter,
    fingerprint,
    load_adapter,
    save_adapter,
)
from lora_yolo.atomic import atomic_path
from lora_yolo.branch import ClassBranch, add_classes_layers
from lora_yolo.checkpoint import (
    MODEL_CLASSES,
    RTDETR,
    build_for_classes,
    load_model,
    model_kind,
    save_checkpoint,
)
from lora_yolo.classes import BRANCH_LR
from lora_yolo.config import LoraConfig
from lora_yolo.errors import LoraYoloError, first_line
from lora_yolo.fold import fold_batchnorm, unfold_batchnorm
from lora_yolo.inject import LORA_SUFFIXES, add_lora, lora_layers, set_trainable, unload_lora
from lora_yolo.memory import add_training_forward, remove_training_forward
from lora_yolo.merge import merge_files
from lora_yolo.targets import bias_tensors, class_layers, head_tensors, select_targets

ADAPTER, ADAPTER_LAST, MERGED, CONFIG_FILE = "adapter.safetensors", "adapter_last.safetensors", "merged.pt", "lora.yaml"
BASE = "base.pt"  # in weights/, only when the base is built from a model YAML


def trainable_names(model: nn.Module) -> set[str]:
    """The parameters LoRA training may change: every adapter weight plus the tensors trained in full."""
    lora = {n for n, _ in model.named_parameters() if n.endswith(LORA_SUFFIXES)}
    return lora | set(model.lora_meta["full"])


def freeze_list(model: nn.Module) -> list[str]:
    """Ultralytics `freeze` entries that freeze exactly the non-trainable parameters of modules holding no trainable
    one.

    Ultralytics freezes parameter `k` when `f"model.{x}."` is a substring of `k` for an entry `x`. Each entry here is
    the owner module of a frozen parameter (`16.cv1.bn`, `16.cv1.conv.base_layer`), and no trainable parameter
    lives under one of them, so the match is exact. A module holding both (a BatchNorm whose shift trains,
    train_bias) cannot be named without freezing its trained tensor before DDP registers what it averages; it is
    left out, Ultralytics lets its frozen tensors require gradients, and `build_optimizer` freezes them again.
    """
    keep = trainable_names(model)
    owners = {n.rpartition(".")[0] for n, _ in model.named_parameters() if n not in keep}
    return sorted(o.removeprefix("model.") for o in owners - {n.rpartition(".")[0] for n in keep})


def refuse_unsupported(args: dict, config: LoraConfig) -> None:
    """Ultralytics training arguments a LoRA run cannot take, each refused in one line. Checked on the arguments as
    given, before Ultralytics' trainer sets up: its setup makes the run folder, which a refused run would leave
    behind empty. A resumed run's own arguments passed this check when it started (Ultralytics lets a resume change
    `distill_model`, which is in `args`, but not `compile`).
    """
    if args.get("distill_model") is not None:
        raise LoraYoloError(
            "distill_model is not supported: Ultralytics' distillation wraps the model in a DistillationModel, "
            "which carries no adapters; train without it"
        )
    if config.gradient_checkpointing and args.get("compile"):
        raise LoraYoloError("gradient_checkpointing and compile exclude each other: train with one of them")
    if QUANTIZE_ALIASES.get(str(args.get("quantize")).lower()) == 8:  # QAT: Ultralytics swaps every conv for its own
        raise LoraYoloError(
            "quantize=8 (quantization-aware training) is not supported with adapters: train, then quantize "
            "merged.pt, a plain Ultralytics checkpoint (Ultralytics' QAT or an int8 export)"
        )


def check_keypoints(data: dict, base: nn.Module | None) -> None:
    """A pose dataset states its keypoint layout, and a trained pose base adapts to data with its own layout only:
    its head's keypoint outputs are sized by it. `base` None: a base built from a model YAML, which takes the
    dataset's layout."""
    if data.get("kpt_shape") is None:
        raise LoraYoloError("a pose dataset needs kpt_shape ([keypoints, 2 or 3]) in its YAML")
    if base is not None and tuple(base.yaml.get("kpt_shape", ())) != tuple(data["kpt_shape"]):
        raise LoraYoloError(
            f"the dataset's kpt_shape {list(data['kpt_shape'])} differs from the base's {base.yaml.get('kpt_shape')}: "
            "LoRA adapts a pose model to new data with the same keypoints"
        )


def check_ddp_launcher() -> None:
    """Ultralytics' DDP launcher pickles the trainer with cloudpickle, which it pip-installs at launch, so offline a
    multi-GPU run would fail in its workers; say so before anything starts."""
    if importlib.util.find_spec("cloudpickle") is None:
        raise LoraYoloError(
            "multi-GPU training needs cloudpickle (Ultralytics' DDP launcher installs it at run time only when "
            "online): pip install 'lora-yolo[ddp]'"
        )


def channels_last_on_cpu(channels_last: bool | None, device: torch.device) -> bool:
    """Whether to train on the CPU in channels-last format: asked for (`channels_last=True`) or left to the default
    (None), on an x86 CPU with oneDNN (the CPUs Ultralytics' `AutoBackend` supports it on for inference), not on
    Windows, where Ultralytics measured channels-last training 3x slower (ultralytics#26105).

    Ultralytics' trainer uses channels-last on CUDA only, saying it brings nothing on the CPU; measured here it does
    for training (oneDNN's convolutions, forward and backward, run faster in it: docs/benchmarks.md).
    """
    return (
        channels_last is not False
        and device.type == "cpu"
        and platform.system() != "Windows"
        and platform.machine().lower() in {"x86_64", "amd64"}
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


class _DropFreezeLines(logging.Filter):
    """Ultralytics logs one 'Freezing layer' line per frozen parameter (hundreds here); one summary line is enough.
    It also warns for each frozen tensor it lets train, which `freeze_list` leaves to `build_optimizer` to freeze,
    and (with `channels_last`) that channels-last is ignored on the CPU, where `setup_model` applies it."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.lines = ("Freezing layer", "setting 'requires_grad=True' for frozen layer")
        self.lines += ("'channels_last=True' is only",) if channels_last else ()

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.lines)


class LoraTrainerMixin:
    """Trains LoRA adapters (and, for a new class set, the class layers; with add_classes, copies of the class
    branches instead) on a frozen base, in front of an Ultralytics task trainer.

    Example:
        >>> trainer = LoraDetectionTrainer(overrides={"data": "coco8.yaml", "model": "base.pt"}, lora=LoraConfig())
        >>> trainer.train()
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None, lora: LoraConfig | None = None):
        refuse_unsupported({**cfg2dict(cfg), **(overrides or {})}, lora or LoraConfig())
        super().__init__(cfg, overrides, _callbacks)
        if self.ddp:
            check_ddp_launcher()
        # Only for building the model: once built, the config travels on it (`lora_meta`), which is what a DDP
        # worker gets (Ultralytics rebuilds the trainer there from its arguments, without `lora=`).
        self.lora_config = lora or LoraConfig()
        self.cpu_channels_last = channels_last_on_cpu(self.args.channels_last, self.device)

    def get_model(self, cfg=None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """Build the fine-tuning model as Ultralytics' trainer does, add adapters; resume rebuilds base + adapter."""
        if weights is not None and getattr(weights, "lora_meta", None) is not None:  # a run's own checkpoint
            model = self._resume_model(weights)
        else:
            model = self._new_model(cfg, weights)
        self.args.freeze = freeze_list(model)
        return model

    def setup_model(self):
        """Ultralytics' model setup; then channels-last on the CPU (`channels_last_on_cpu`). Before `_setup_train`
        moves the model to the device (which keeps the format) and copies it for the EMA, so both train and validate
        in it; checkpoints are written in the standard format (Ultralytics' `save_model`), adapters contiguous."""
        ckpt = super().setup_model()
        if self.cpu_channels_last:
            self.model.to(memory_format=torch.channels_last)
        return ckpt

    def _new_model(self, cfg, weights: nn.Module | None) -> nn.Module:
        kpt = {"data_kpt_shape": tuple(self.data["kpt_shape"])} if self.args.task == "pose" else {}
        if weights is None:  # a model YAML: the random init is the base, kept beside the run so merge can find it
            model_class = MODEL_CLASSES[model_kind(cfg)]
            base = model_class(cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=False, **kpt)
            base.half().float()  # on the fp16 grid, so fp16 checkpoints (last.pt) hold the base exactly
            base.names = self.data["names"]
            base.pt_path = str(self.wdir / BASE)  # written by _setup_train, see _write_run_files
        else:
            base = weights
        if kpt:
            check_keypoints(self.data, weights)
        model = build_for_classes(base, self.data["nc"], self.data["names"])
        config = self.lora_config
        if config.add_classes:  # a trained copy of each class branch for the new classes; adapted: adapters elsewhere
            plan, full = add_classes_layers(model, base, config)
        else:
            # By names, not by count: model.load() maps class rows by name, so any new name starts from a random row.
            classes = class_layers(model) if dict(base.names) != dict(self.data["names"]) else []
            full = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in classes]
            if config.train_head:  # the whole head, its class layers among it
                full = head_tensors(model)
            plan = select_targets(model, config, full=frozenset(classes))
        if config.train_bias:
            full = [*full, *bias_tensors(dict(model.named_modules()), plan)]
        add_lora(model, plan, config.lora_dropout, config.use_rslora, config.use_dora)
        _training_form(model, config, bool(self.args.compile))
        model.lora_meta = {"config": config.to_dict(), "base": fingerprint(base), "full": full}
        return model

    def _resume_model(self, weights: nn.Module) -> nn.Module:
        """Base weights come from the base file, not from the fp16 checkpoint, so they stay bit-exact."""
        adapter = adapter_of(weights)
        model = attach_adapter(load_model(base_file(adapter)), adapter)
        _training_form(model, adapter.config, bool(self.args.compile))
        model.lora_meta = weights.lora_meta
        return model

    def _setup_train(self):
        """Ultralytics' setup (without its per-parameter freeze log), then the run files and one summary line."""
        quiet = _DropFreezeLines(self.cpu_channels_last)
        LOGGER.addFilter(quiet)
        try:
            super()._setup_train()
        finally:
            LOGGER.removeFilter(quiet)
        if self.ema:  # the EMA never trains: plain layers, and checkpoints (its pickles) hold Ultralytics' own forward
            remove_training_forward(self.ema.ema)
        model = unwrap_model(self.model)
        if RANK in {-1, 0}:
            self._write_run_files(model)
        n_train = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        LOGGER.info(
            f"LoRA: {len(lora_layers(model))} adapters, {n_train:,} trainable of {n_all:,} parameters "
            f"({100 * n_train / n_all:.2f}%), {len(model.lora_meta['full'])} tensors trained in full"
        )

    def _write_run_files(self, model: nn.Module) -> None:
        """The LoRA config, and for a YAML-built base the base itself (the untrained model without its adapters).

        Written here, in the process that trains, rather than in get_model: Ultralytics' DDP launcher deletes the
        run folder after the parent has built the model.
        """
        with atomic_path(self.save_dir / CONFIG_FILE) as tmp:
            YAML.save(tmp, model.lora_meta["config"])
        base = Path(model.lora_meta["base"]["path"])
        if base == (self.wdir / BASE).resolve() and not base.exists():
            save_checkpoint(unload_lora(deepcopy(model)), base, train_args={})

    def build_optimizer(self, model, *args, **kwargs):
        """Ultralytics' optimizer, with LoRA's B at `loraplus_lr_ratio` x lr, DoRA magnitudes without decay, and
        with add_classes=adapted the class-branch copies at their own lr (`lora_yolo.classes.BRANCH_LR`). It is built
        after DDP has wrapped the model, so it first freezes what `freeze_list` had to leave trainable until then.

        The ratio is read from the model's own `lora_meta`, so a DDP worker (whose trainer is rebuilt without `lora=`)
        uses the same one. Each new group copies its source group's settings (`param_group` included, which
        Ultralytics' warmup and resume read), so the schedulers scale it as they scale the rest. With MuSGD
        (Ultralytics' `optimizer=auto` choice for long runs) the adapter tensors take the optimizer's SGD part:
        Muon orthogonalises a weight's update, and for an adapted conv that update is B A, not either factor; tensors
        trained in full (class layers) keep Muon.
        """
        set_trainable(unwrap_model(model), trainable_names(unwrap_model(model)))  # what freeze_list could not freeze
        try:
            optimizer = super().build_optimizer(model, *args, **kwargs)
        except NotImplementedError as e:  # an optimizer name Ultralytics does not know
            raise LoraYoloError(first_line(e)) from None
        meta = unwrap_model(model).lora_meta
        config = LoraConfig.from_dict(meta["config"])
        ratio = config.loraplus_lr_ratio
        copies = set(meta["full"]) if config.add_classes == "adapted" else set()  # exact: lr0 is theirs
        names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            adapter = {**settings, "use_muon": False, "param_group": "weight"} if settings.get("use_muon") else settings
            rest, lora, lora_b, magnitudes, branches = [], [], [], [], []
            for p in group["params"]:
                name = names[id(p)]
                if name in copies:
                    branches.append(p)
                elif name.endswith(".lora_magnitude_vector"):
                    magnitudes.append(p)
                elif ratio != 1 and name.endswith(".lora_B.weight"):
                    lora_b.append(p)
                elif adapter is not settings and name.endswith(LORA_SUFFIXES):
                    lora.append(p)
                else:
                    rest.append(p)
            groups.append({**settings, "params": rest})
            groups.append({**adapter, "params": lora})
            groups.append({**adapter, "params": lora_b, "lr": settings["lr"] * ratio})
            groups.append({**adapter, "params": magnitudes, "weight_decay": 0.0, "param_group": "bn"})  # no decay
            groups.append({**settings, "params": branches, "lr": BRANCH_LR})
        optimizer.param_groups.clear()
        for group in groups:
            if group["params"]:
                optimizer.add_param_group(group)
        return optimizer

    def _model_train(self):
        """Train mode for the adapters; frozen BatchNorm layers stay in eval so their statistics never drift."""
        super()._model_train()
        model = unwrap_model(self.model)
        keep = trainable_names(model)
        drift = sorted(n for n, p in model.named_parameters() if p.requires_grad != (n in keep))
        if drift:  # Ultralytics or a callback changed requires_grad: put the LoRA trainable set back
            LOGGER.warning(f"LoRA: trainable set drifted ({len(drift)} tensors, e.g. {drift[0]}); restoring it")
            set_trainable(model, keep)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters()):
                m.eval()

    def _handle_nan_recovery(self, epoch: int) -> bool:
        """Stop on a non-finite loss or trained tensor (the EMA's, which the adapter is written from; a train_head
        BatchNorm's running variance can overflow while the loss is still finite) instead of Ultralytics'
        reload-and-retry: the adapters saved so far stay good.

        Every rank calls this at the same point of the epoch loop; under DDP the ranks agree first (any rank's NaN
        counts), so all of them stop together instead of the others waiting forever in the next collective.
        """
        kept = self.ema.ema if self.ema else unwrap_model(self.model)
        bad = (
            (self.loss is not None and not bool(self.loss.isfinite().all()))
            or (self.fitness is not None and not math.isfinite(self.fitness))
            or not all(bool(t.isfinite().all()) for t in adapter_of(kept).tensors.values())
        )
        if dist.is_available() and dist.is_initialized():
            seen = [False] * dist.get_world_size()
            dist.all_gather_object(seen, bad)
            bad = any(seen)
        if bad:
            last = self.save_dir / ADAPTER_LAST
            last_kept = f"the last good adapter is {last}" if last.exists() else "no adapter was saved before it"
            raise LoraYoloError(
                f"training diverged: the loss or the trained tensors became NaN/Inf in epoch {epoch + 1}; {last_kept}. "
                "Lower lr0 or the rank"
            )
        return False

    def _load_checkpoint_state(self, ckpt: dict) -> None:
        """Ultralytics' resume of optimizer, EMA and counters; then the EMA's frozen tensors from the model.

        The checkpoint's EMA is fp16, so loading it would round a base that is not on the fp16 grid; the model's
        base comes from the base file itself (`_resume_model`), so it is the exact one.
        """
        super()._load_checkpoint_state(ckpt)
        if self.ema:
            model = unwrap_model(self.model)
            keep = trainable_names(model)
            frozen = {k: v for k, v in model.state_dict().items() if k not in keep}
            self.ema.ema.load_state_dict(frozen, strict=False)

    def save_model(self):
        """Ultralytics' checkpoints, plus the EMA's adapter: `adapter_last` always, `adapter` when it is the best.

        The checkpoints hold the EMA with its BatchNorms unfolded: Ultralytics' `fuse()` on a loaded checkpoint folds
        each BatchNorm into its conv itself, and would apply a folded one twice.
        """
        unfold_batchnorm(self.ema.ema)
        try:
            saved = super().save_model()
        finally:
            fold_batchnorm(self.ema.ema)
        if saved:
            adapter = adapter_of(self.ema.ema)
            save_adapter(adapter, self.save_dir / ADAPTER_LAST)
            if self.best_fitness == self.fitness:  # the same test Ultralytics uses for best.pt
                save_adapter(adapter, self.save_dir / ADAPTER)
        return saved

    def final_eval(self):
        """Write `merged.pt` (base + best adapter, merged, plain Ultralytics) and validate it as the final result.

        Every rank takes part, as in Ultralytics' own final_eval: rank 0 writes while the others wait, then each rank
        validates (Ultralytics' validator enters a barrier of all ranks; one rank missing would hang the others).
        """
        # No adapter saved (stopped within epoch 1): nothing to merge, and a merged.pt left here is an earlier run's.
        saved = (self.save_dir / ADAPTER).exists()
        with torch_distributed_zero_first(LOCAL_RANK):
            if RANK in {-1, 0} and saved:
                for f in (self.last, self.best):
                    if f.exists():  # as Ultralytics: final checkpoints without optimizer state, replaced atomically
                        with atomic_path(f) as tmp:
                            if not strip_optimizer(f, s=str(tmp)):
                                raise LoraYoloError(f"{f} is not a readable checkpoint")
                write_merged(self.save_dir, vars(self.args))
        if not saved:
            return
        merged = self.save_dir / MERGED
        LOGGER.info(f"\nValidating {merged}...")
        self.validator.args.plots = self.args.plots
        self.validator.args.compile = False
        self.metrics = self.validator(model=str(merged))
        self.metrics.pop("fitness", None)
        self.epoch += 1  # log the final metrics at step epochs+1, as Ultralytics does
        self.run_callbacks("on_fit_epoch_end")
        self.epoch -= 1


def _training_form(model: nn.Module, config: LoraConfig, compiled: bool) -> None:
    """What training computes with, the same function and gradients as the plain model: frozen BatchNorms folded,
    SiLU outputs recomputed in backward, and with `gradient_checkpointing` each layer recomputed.

    Under Ultralytics' `compile` the layers run plain (folded): inductor fails to compile the lean activations'
    saved-tensor hooks (their `as_strided` rebuild, "cannot determine truth value of Relational"), and its own
    partitioner already recomputes cheap elementwise ops such as SiLU in backward instead of saving them.
    """
    trained = [m.new for m in model.modules() if isinstance(m, ClassBranch)]  # their BatchNorms train
    fold_batchnorm(model, skip=[*trained, model.model[-1]] if config.train_head else trained)
    refuse_unsupported({"compile": compiled}, config)  # again: a new run's config is checked before it is built,
    if not compiled:  # but not that of a run's last.pt given as the base
        add_training_forward(model, config.gradient_checkpointing)


def adapter_of(model: nn.Module) -> Adapter:
    """The adapter a training model carries, with the metadata recorded when it was built."""
    meta = model.lora_meta
    return extract_adapter(model, LoraConfig.from_dict(meta["config"]), meta["base"], meta["full"])


def base_file(adapter: Adapter) -> str:
    """The base checkpoint an adapter was trained from, as recorded in it; an error if it is gone."""
    path = adapter.base.get("path", "")
    if not path or not Path(path).is_file():
        raise LoraYoloError(f"the adapter's base checkpoint {path or '(not recorded)'} is not on disk; pass --base")
    return path


def write_merged(run_dir: Path, train_args: dict) -> Path:
    """`merged.pt` in `run_dir`: the run's base with `adapter.safetensors` merged in, in a fresh model."""
    base = base_file(load_adapter(run_dir / ADAPTER))
    return merge_files(base, [str(run_dir / ADAPTER)], run_dir / MERGED, train_args=train_args)


class LoraDetectionTrainer(LoraTrainerMixin, DetectionTrainer):
    """LoRA training of a detection model."""


class LoraSegmentationTrainer(LoraTrainerMixin, SegmentationTrainer):
    """LoRA training of a segmentation model (the mask prototype and coefficient convs adapt like any other)."""


class LoraPoseTrainer(LoraTrainerMixin, PoseTrainer):
    """LoRA training of a pose model on data with the base's keypoint layout."""


class LoraOBBTrainer(LoraTrainerMixin, OBBTrainer):
    """LoRA training of an oriented-box model."""


class LoraSemanticTrainer(LoraTrainerMixin, SemanticSegmentationTrainer):
    """LoRA training of a YOLO26 semantic segmentation model; its dataset's polygons get Ultralytics' background
    class (`add_polygon_background`), so a base trained on such data has the same class set."""


class LoraDepthTrainer(LoraTrainerMixin, DepthTrainer):
    """LoRA training of a YOLO26 depth model. Ultralytics' final_eval refits the head's output calibration
    (`cal_a`, `cal_b` buffers) into best.pt/last.pt after training; lora-yolo's final_eval does not: merged.pt and
    serving with the adapter keep the base's calibration, so the two agree and the adapter file stays the whole
    change (docs/training.md)."""


class LoraClassificationTrainer(LoraTrainerMixin, ClassificationTrainer):
    """LoRA training of a classification model: the Classify head's linear layer adapts (`LoraLinear`) or, for a new
    class set, trains in full."""


class LoraRTDETRTrainer(LoraTrainerMixin, RTDETRTrainer):
    """LoRA training of an RT-DETR model: its convs and the transformer's linear layers adapt (`LoraLinear`), the
    decoder's score layers and class embedding train in full for a new class set; Ultralytics' RT-DETR data
    pipeline, loss (with its denoising queries) and validator."""


# kind -> (trainer, validator): every Ultralytics task whose head extends Detect, classification, semantic, depth,
# and RT-DETR (`lora_yolo.checkpoint.MODEL_CLASSES`).
TRAINERS = {
    "classify": (LoraClassificationTrainer, ClassificationValidator),
    "detect": (LoraDetectionTrainer, DetectionValidator),
    "segment": (LoraSegmentationTrainer, SegmentationValidator),
    "pose": (LoraPoseTrainer, PoseValidator),
    "obb": (LoraOBBTrainer, OBBValidator),
    "semantic": (LoraSemanticTrainer, SemanticSegmentationValidator),
    "depth": (LoraDepthTrainer, DepthValidator),
    RTDETR: (LoraRTDETRTrainer, RTDETRValidator),
}
