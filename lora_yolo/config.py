"""`LoraConfig`: what LoRA adds to a YOLO model, saved beside the weights in every adapter file.

Field names follow PEFT's `LoraConfig` (`r`, `lora_alpha`, `lora_dropout`, `use_rslora`, `rank_pattern`,
`alpha_pattern`) so PEFT users recognise them. Ultralytics' own training arguments are not repeated here:
they pass through to the trainer unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lora_yolo.errors import LoraYoloError

# Named groups of conv layers, derived from the model's own YAML (see lora_yolo.targets).
PRESETS = ("backbone", "neck", "head", "attention", "all")
DEFAULT_TARGETS = ["all"]  # every ungrouped conv; base weights all stay frozen (benchmarks/results.md says why)


@dataclass
class LoraConfig:
    """LoRA hyper-parameters and the layers they apply to.

    Example:
        >>> LoraConfig(r=8, lora_alpha=16, targets=["head"], exclude=[r"cv2\\.0"])
    """

    r: int = 8  # rank of every adapter unless rank_pattern says otherwise
    lora_alpha: float = 16.0  # scale = lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter's input, training only
    use_rslora: bool = False  # rank-stabilised scaling (Kalajdzievski 2023): alpha / sqrt(r)
    use_dora: bool = False  # DoRA (Liu et al. 2024): a trained magnitude per output channel, see lora_yolo.layer
    loraplus_lr_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): B learns this many times faster than A; 1 = off
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # presets, see PRESETS
    include: list[str] = field(default_factory=list)  # regexes (re.search on conv names) added to the presets
    exclude: list[str] = field(default_factory=list)  # regexes removed from the selection, applied last
    first_layer: int = 0  # no adapter in model layers before this index: backward stops there (lora_yolo.fold)
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (lora_yolo.memory)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex -> rank, first match wins
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex -> alpha, first match wins
    add_classes: str | None = None  # "exact" | "adapted": keep the base's classes, add the data's (lora_yolo.classes)
    # a selected layer whose rank limit min(out, in*k*k) is below its rank: adapted at that limit (alpha scaled to
    # keep the scale) instead of left frozen
    clamp_rank: bool = False
    # the task head (the model's last layer) trains in full, BatchNorm statistics included, and gets no adapter: PEFT's
    # modules_to_save for a classifier; the benchmark's real bases learned new classes far better with it
    train_head: bool = False
    # the bias of every adapted conv trains with its adapter (PEFT's bias="lora_only"): Ultralytics' convs have none,
    # their Conv block's bias is the BatchNorm's shift (beta), so that trains, its statistics stay the base's. The
    # adapters turn filters whose frozen statistics then no longer centre them; a trained shift can (bias_tensors)
    train_bias: bool = False
    # the preset's lr0 at most this multiple of the lr0 the base was trained with, where the base records an
    # optimizer of the same family, not below presets.LR0_FLOOR (lora_yolo.presets.capped_lr0); 0 = off. An lr0
    # given on the command line (or to `train()` without a config) is used as given
    lr0_base_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)):
            raise LoraYoloError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not 0 <= self.lora_dropout < 1:
            raise LoraYoloError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check_alpha("loraplus_lr_ratio", self.loraplus_lr_ratio)
        if self.lr0_base_ratio != 0 and not positive_number(self.lr0_base_ratio):
            raise LoraYoloError(f"lr0_base_ratio must be 0 (off) or a finite number > 0, got {self.lr0_base_ratio!r}")
        if isinstance(self.first_layer, bool) or not isinstance(self.first_layer, int) or self.first_layer < 0:
            raise LoraYoloError(f"first_layer must be a layer index >= 0, got {self.first_layer!r}")
        for name in ("use_rslora", "use_dora", "gradient_checkpointing", "clamp_rank", "train_head", "train_bias"):
            if not isinstance(getattr(self, name), bool):
                raise LoraYoloError(f"{name} must be true or false, got {getattr(self, name)!r}")
        # One canonical form, so a preset's `16` and a default's `16.0` give identical adapter metadata.
        self.lora_alpha, self.lora_dropout = float(self.lora_alpha), float(self.lora_dropout)
        self.loraplus_lr_ratio, self.lr0_base_ratio = float(self.loraplus_lr_ratio), float(self.lr0_base_ratio)
        self.alpha_pattern = {p: float(a) for p, a in self.alpha_pattern.items()}
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        unknown = [t for t in self.targets if t not in PRESETS]
        if unknown:
            raise LoraYoloError(f"unknown target preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                _compile(name, pattern)
        for pattern, r in self.rank_pattern.items():
            _compile("rank_pattern", pattern)
            _check_rank(f"rank_pattern[{pattern!r}]", r)
        for pattern in self.alpha_pattern:
            _compile("alpha_pattern", pattern)
        if self.add_classes not in (None, "exact", "adapted"):
            raise LoraYoloError(f"add_classes must be exact or adapted, got {self.add_classes!r}")
        if self.add_classes and self.train_head:
            raise LoraYoloError("train_head and add_classes exclude each other: add_classes keeps the base's head")
        if self.add_classes and self.train_bias:
            raise LoraYoloError("train_bias and add_classes exclude each other: add_classes keeps the base's biases")
        if not self.targets and not self.include:
            raise LoraYoloError("no targets: give at least one preset or an include pattern")

    def rank_for(self, name: str) -> int:
        """Rank of the adapter on conv `name`: the first matching rank_pattern, else `r`."""
        return next((r for p, r in self.rank_pattern.items() if re.search(p, name)), self.r)

    def alpha_for(self, name: str) -> float:
        """Alpha of the adapter on conv `name`: the first matching alpha_pattern, else `lora_alpha`."""
        return next((a for p, a in self.alpha_pattern.items() if re.search(p, name)), self.lora_alpha)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form (stored in adapter metadata and run folders).

        `first_layer`, `gradient_checkpointing`, `add_classes`, `clamp_rank`, `train_head` and `train_bias` are left
        out at their defaults: lora-yolo versions before them refuse unknown keys, and an adapter that does not use
        them should stay readable by them. `lr0_base_ratio` is always left out: it only chose a run's lr0 (in its
        args.yaml), and is nothing an adapter is.
        """
        data = asdict(self)
        del data["lr0_base_ratio"]
        defaults = (
            ("first_layer", 0),
            ("gradient_checkpointing", False),
            ("add_classes", None),
            ("clamp_rank", False),
            ("train_head", False),
            ("train_bias", False),
        )
        for name, default in defaults:
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from a dict such as a parsed `configs/*.yaml`; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraYoloError(f"unknown LoRA config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        return cls(**data)


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoraYoloError(f"{name} must be a positive integer, got {value!r}")


def positive_number(value: Any) -> bool:
    """A finite int or float above 0 that a float holds: JSON's and YAML's integers have no size limit, and
    `float(10**400)` raises OverflowError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:
        return False


def _check_alpha(name: str, value: Any) -> None:
    if not positive_number(value):
        big = isinstance(value, int) and value.bit_length() > 64  # whose repr may run to thousands of digits
        raise LoraYoloError(
            f"{name} must be a finite number > 0, got {f'a {value.bit_length()}-bit integer' if big else repr(value)}"
        )


def _compile(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        raise LoraYoloError(f"{name} pattern {pattern!r} is not a valid regular expression: {e}") from None
