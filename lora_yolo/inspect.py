"""`inspect`: a dry run that shows every conv layer, what LoRA would do to it, and what the adapter would cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_yolo.adapter import adapter_bytes, extract_adapter, fingerprint
from lora_yolo.branch import check_widenable
from lora_yolo.checkpoint import load_model
from lora_yolo.config import LoraConfig
from lora_yolo.inject import add_lora
from lora_yolo.targets import ConvLayer, bias_tensors, describe_convs, head_tensors, plan_of


@dataclass
class InspectReport:
    """What `inspect` prints: one row per conv, then totals."""

    model: str
    layers: list[ConvLayer] = field(default_factory=list)
    base_params: int = 0
    lora_params: int = 0
    adapter_bytes: int = 0
    full_params: int = 0  # the head's parameters, with train_head (the adapter also holds its BatchNorm statistics)
    bias_params: int = 0  # with train_bias, the BatchNorm shifts after the adapted convs
    add_classes: str | None = None  # the adapter also holds class-branch copies, sized by the data's new classes

    @property
    def trainable_pct(self) -> float:
        """Trained parameters (LoRA, and the head with train_head) as a share of everything the adapted model holds."""
        trained = self.lora_params + self.full_params + self.bias_params
        return 100 * trained / (self.base_params + self.lora_params)

    def to_dict(self) -> dict:
        """JSON form for `inspect --json`."""
        return {
            "model": self.model,
            "layers": [row.to_dict() for row in self.layers],
            "totals": {
                "base_params": self.base_params,
                "lora_params": self.lora_params,
                "full_params": self.full_params,
                "bias_params": self.bias_params,
                "trainable_pct": round(self.trainable_pct, 4),
                "adapter_bytes": self.adapter_bytes,
                "selected_layers": sum(row.selected for row in self.layers),
            },
        }

    def table(self) -> str:
        """Human-readable table, one conv per line."""
        head = f"{'layer':<28} {'kind':<10} {'section':<8} {'in':>5} {'out':>5} {'k':>2} {'s':>2} {'r':>3} {'lora':>7}"
        head += "  note"
        lines = [head, "-" * len(head)]
        for row in self.layers:
            note = "selected" if row.selected else row.reason
            lines.append(
                f"{row.name:<28} {row.kind:<10} {row.section:<8} {row.in_channels:>5} {row.out_channels:>5} "
                f"{row.kernel:>2} {row.stride:>2} {row.r or '-':>3} {row.lora_params or '-':>7}  {note}"
            )
        copies = ", plus a copy of each class branch (add_classes: its size depends on the data)"
        copies = copies if self.add_classes else ""
        lines += [
            "",
            f"selected layers: {sum(row.selected for row in self.layers)} of {len(self.layers)} conv and linear layers",
            f"base params:     {self.base_params:,}",
            f"LoRA params:     {self.lora_params:,}",
            *([f"head in full:    {self.full_params:,} (train_head)"] if self.full_params else []),
            *([f"biases:          {self.bias_params:,} (train_bias)"] if self.bias_params else []),
            f"trained:         {self.trainable_pct:.2f}% of the adapted model's parameters",
            f"adapter file:    {self.adapter_bytes:,} bytes{copies}",
        ]
        return "\n".join(lines)


def inspect_model(source: str | Path, config: LoraConfig) -> InspectReport:
    """Describe what `config` would do to the model at `source` (`.pt` or model YAML), without training.

    Example:
        >>> print(inspect_model("yolo11n.yaml", LoraConfig(targets=["head"])).table())
    """
    model = load_model(source)
    if config.add_classes:
        check_widenable(model)
    rows = describe_convs(model, config)
    base = fingerprint(model)
    base_params = sum(p.numel() for p in model.parameters())
    plan = {} if config.add_classes == "exact" else plan_of(rows, config)
    full = head_tensors(model) if config.train_head else []
    biases = bias_tensors(dict(model.named_modules()), plan) if config.train_bias else []
    params = dict(model.named_parameters())
    add_lora(model, plan, config.lora_dropout, config.use_rslora, config.use_dora)
    adapter = extract_adapter(model, config, base, full=[*full, *biases])
    return InspectReport(
        model=str(source),
        layers=rows,
        base_params=base_params,
        lora_params=sum(row.lora_params for row in rows),
        adapter_bytes=adapter_bytes(adapter),
        full_params=sum(params[n].numel() for n in full if n in params),
        bias_params=sum(params[n].numel() for n in biases),
        add_classes=config.add_classes,
    )
