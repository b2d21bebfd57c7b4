"""The `lora-yolo` command: parse, call one library function, print. Every command is a library call too."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lora_yolo.errors import LoraYoloError, TrainingInterrupted

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune Ultralytics YOLO detectors with LoRA adapters.",
)
_state = {"debug": False}

# Shared LoRA selection options (the `hf` CLI style: one Annotated alias per option).
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="Preset name or YAML path.")]
RankOpt = Annotated[Optional[int], typer.Option("--rank", "-r", help="LoRA rank r.")]
AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha (scale = alpha / r).")]
DropoutOpt = Annotated[Optional[float], typer.Option("--dropout", help="Dropout on the adapter input, in [0, 1).")]
RsloraOpt = Annotated[Optional[bool], typer.Option("--rslora/--no-rslora", help="Scale by alpha / sqrt(r).")]
DoraOpt = Annotated[Optional[bool], typer.Option("--dora/--no-dora", help="DoRA: train a magnitude per channel.")]
LoraplusOpt = Annotated[
    Optional[float], typer.Option("--loraplus-ratio", help="LoRA+: B's learning rate over A's (1 = plain LoRA).")
]
TargetsOpt = Annotated[
    Optional[str], typer.Option("--targets", help="Comma list of presets: backbone,neck,head,attention,all.")
]
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", help="Regex on conv names to add (repeatable).")]
ExcludeOpt = Annotated[
    Optional[list[str]], typer.Option("--exclude", help="Regex on conv names to remove (repeatable).")
]
FirstLayerOpt = Annotated[
    Optional[int],
    typer.Option("--first-layer", help="No adapters before this model layer index: backward stops there (cheaper)."),
]
CheckpointingOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in backward: less training memory, about a third more time per step.",
    ),
]
ClampRankOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--clamp-rank/--no-clamp-rank",
        help="A selected layer whose rank limit min(out, in*k*k) is below the rank: adapt it at that limit (not skip).",
    ),
]
TrainHeadOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--train-head/--no-train-head",
        help="Train the task head (the last layer) in full, BatchNorm statistics included, instead of adapting it.",
    ),
]
TrainBiasOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--train-bias/--no-train-bias",
        help="Train each adapted conv's bias (its BatchNorm's shift; the statistics stay the base's) with its adapter.",
    ),
]
RankPatternOpt = Annotated[
    Optional[list[str]], typer.Option("--rank-pattern", help="REGEX=R per-layer rank (repeatable).")
]
ADAPTER_HELP = "ADAPTER.safetensors[:WEIGHT], repeatable; weights scale each adapter's update."
AdaptersOpt = Annotated[Optional[list[str]], typer.Option("--adapter", "-a", help=ADAPTER_HELP)]
AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", "-a", help="Adapter .safetensors to apply.")]
BaseOpt = Annotated[str, typer.Option("--model", "-m", help="The base .pt checkpoint the adapter was trained on.")]
OtherWeightsOpt = Annotated[
    bool, typer.Option(help="Accept a base with other weights than the adapter's (same architecture).")
]


AlphaPatternOpt = Annotated[
    Optional[list[str]], typer.Option("--alpha-pattern", help="REGEX=A per-layer alpha (repeatable).")
]


def _pairs(items: list[str] | None, cast: Callable[[str], Any], option: str) -> dict[str, Any] | None:
    """Parse repeated REGEX=VALUE options."""
    if not items:
        return None
    out = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        try:
            out[pattern] = cast(value)
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise typer.BadParameter(f"expected REGEX=VALUE, got {item!r}", param_hint=option)
    return out


# The parameters of `lora_options`: the LoRA settings a command can set (train refuses them on --resume).
LORA_OPTIONS = (
    "config", "rank", "alpha", "dropout", "rslora", "dora", "targets", "include", "exclude", "first_layer",
    "rank_pattern", "alpha_pattern", "loraplus_ratio", "gradient_checkpointing", "add_classes", "clamp_rank",
    "train_head", "train_bias",
)  # fmt: skip


def lora_options(options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(LoraConfig, train args) from a command's shared selection options, given as its arguments by name
    (`locals()` at the top of the command); a bad value is a usage error (exit 2)."""
    from lora_yolo.presets import resolve_config

    targets = options["targets"]
    try:
        return resolve_config(
            options["config"],
            r=options["rank"],
            lora_alpha=options["alpha"],
            lora_dropout=options["dropout"],
            use_rslora=options["rslora"],
            use_dora=options["dora"],
            loraplus_lr_ratio=options.get("loraplus_ratio"),
            gradient_checkpointing=options.get("gradient_checkpointing"),
            add_classes=options.get("add_classes"),
            targets=[t.strip() for t in targets.split(",") if t.strip()] if targets is not None else None,
            include=options["include"] or None,
            exclude=options["exclude"] or None,
            first_layer=options["first_layer"],
            clamp_rank=options["clamp_rank"],
            train_head=options["train_head"],
            train_bias=options["train_bias"],
            rank_pattern=_pairs(options["rank_pattern"], int, "--rank-pattern"),
            alpha_pattern=_pairs(options["alpha_pattern"], float, "--alpha-pattern"),
        )
    except LoraYoloError as e:
        raise typer.BadParameter(str(e)) from None


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    """Fine-tune Ultralytics YOLO detectors with LoRA adapters."""
    _state["debug"] = debug


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="A .pt checkpoint or a model YAML such as yolo11n.yaml.")],
    config: ConfigOpt = None,
    rank: RankOpt = None,
    alpha: AlphaOpt = None,
    dropout: DropoutOpt = None,
    rslora: RsloraOpt = None,
    dora: DoraOpt = None,
    targets: TargetsOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    first_layer: FirstLayerOpt = None,
    clamp_rank: ClampRankOpt = None,
    train_head: TrainHeadOpt = None,
    train_bias: TrainBiasOpt = None,
    rank_pattern: RankPatternOpt = None,
    alpha_pattern: AlphaPatternOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Dry run: every conv layer, whether LoRA would adapt it (or why not), and the adapter's cost."""
    lora, _ = lora_options(locals())
    from lora_yolo.inspect import inspect_model

    report = inspect_model(model, lora)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())


def _passthrough(tokens: list[str]) -> dict[str, Any]:
    """Ultralytics-style `key=value` tokens, typed the way the `yolo` CLI types them."""
    from ultralytics.cfg import smart_value

    out = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key or key.startswith("-"):
            raise typer.BadParameter(f"unexpected argument {token!r}; extra Ultralytics arguments are key=value")
        out[key] = smart_value(value)
    return out


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    data: Annotated[
        Optional[str],
        typer.Argument(
            help="Ultralytics dataset YAML (train/val/names); classification: the dataset folder (train/, val/)."
        ),
    ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Base .pt checkpoint or model YAML.")] = "yolo11n.pt",
    config: ConfigOpt = None,
    rank: RankOpt = None,
    alpha: AlphaOpt = None,
    dropout: DropoutOpt = None,
    rslora: RsloraOpt = None,
    dora: DoraOpt = None,
    targets: TargetsOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    first_layer: FirstLayerOpt = None,
    clamp_rank: ClampRankOpt = None,
    train_head: TrainHeadOpt = None,
    train_bias: TrainBiasOpt = None,
    rank_pattern: RankPatternOpt = None,
    alpha_pattern: AlphaPatternOpt = None,
    loraplus_ratio: LoraplusOpt = None,
    gradient_checkpointing: CheckpointingOpt = None,
    add_classes: Annotated[
        Optional[str],
        typer.Option(
            help="Keep the base's classes and add DATA's; a trained copy of each class branch scores the new classes: "
            "exact (the base's outputs bit-identical) or adapted (adapters everywhere else too, the base's objects "
            "pseudo-labelled)."
        ),
    ] = None,
    pseudo_conf: Annotated[
        Optional[float], typer.Option(help="--add-classes adapted: confidence of the base's pseudo-labels.")
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
    imgsz: Annotated[Optional[int], typer.Option(help="Image size.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, 0, 0,1 ...")] = None,
    lr0: Annotated[Optional[float], typer.Option(help="Initial learning rate.")] = None,
    project: Annotated[Optional[str], typer.Option(help="Runs folder.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue an interrupted run from its weights/last.pt.")] = None,
) -> None:
    """Train LoRA adapters on DATA; extra key=value arguments go to Ultralytics' trainer (e.g. mosaic=0.5)."""
    if resume is not None and data is not None and "=" in data and not Path(data).exists():
        ctx.args.insert(0, data)  # no DATA with --resume: the first key=value landed in its place
        data = None
    options = dict(locals())
    if resume is not None:  # the run continues with the LoRA settings it started with (its lora.yaml)
        given = [f"--{k.replace('_', '-')}" for k in LORA_OPTIONS if options[k] not in (None, [])]
        if given:
            raise typer.BadParameter(
                f"{', '.join(given)} cannot change on --resume: the run continues with its own LoRA settings "
                "(its lora.yaml); start a new run to change them",
                param_hint="--resume",
            )
    lora, preset_args = lora_options(options) if resume is None else (None, {})  # a resumed run keeps its own
    if lora is not None and (lr0 is not None or "lr0" in _passthrough(ctx.args)):  # the user's lr0, used as given
        lora = replace(lora, lr0_base_ratio=0.0)
    from lora_yolo.train import RESERVED
    from lora_yolo.train import train as train_lora

    flags = dict(epochs=epochs, imgsz=imgsz, batch=batch, device=device, lr0=lr0, project=project, name=name, seed=seed)
    overrides = _overrides(ctx, RESERVED, "training", preset_args, **flags)
    extra = {} if pseudo_conf is None else {"pseudo_conf": pseudo_conf}
    result = train_lora(data, model=model, config=lora, resume=resume, **extra, **overrides)
    typer.echo("\n" + result.table())


@app.command()
def merge(
    base: Annotated[str, typer.Option("--base", "-b", help="The base .pt checkpoint the adapters were trained on.")],
    adapter: Annotated[list[str], typer.Option("--adapter", "-a", help=ADAPTER_HELP)],  # required here
    output: Annotated[str, typer.Option("--output", "-o", help="Merged checkpoint to write.")] = "merged.pt",
    allow_other_weights: OtherWeightsOpt = False,
) -> None:
    """Fold adapters into their base: a plain Ultralytics checkpoint, inputs untouched, written atomically."""
    from lora_yolo.merge import merge_files

    typer.echo(merge_files(base, adapter, output, allow_other_weights))


@app.command()
def export(
    model: Annotated[Optional[str], typer.Argument(help="A merged .pt checkpoint (or use --base/--adapter).")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript, openvino, ...")] = "onnx",
    base: Annotated[Optional[str], typer.Option("--base", "-b", help="Base checkpoint to merge in memory.")] = None,
    adapter: AdaptersOpt = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Where to put the export.")] = None,
    imgsz: Annotated[int, typer.Option(help="Input image size.")] = 640,
    half: Annotated[bool, typer.Option(help="FP16 weights.")] = False,
    dynamic: Annotated[bool, typer.Option(help="Dynamic input shapes.")] = False,
    simplify: Annotated[bool, typer.Option(help="Simplify the ONNX graph.")] = True,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset.")] = None,
    nms: Annotated[
        Optional[bool],
        typer.Option("--nms/--no-nms", help="Embed NMS; --no-nms: YOLO26's NMS-free end-to-end output."),
    ] = None,
) -> None:
    """Export a merged model with Ultralytics' exporter; a failed export leaves the inputs untouched."""
    from lora_yolo.export import export_model, formats

    if format not in formats() or format == "-":
        choices = ", ".join(k for k in formats() if k != "-")
        raise typer.BadParameter(f"unknown export format {format!r}; formats: {choices}", param_hint="--format")
    path = export_model(model, format, base, adapter, output, imgsz, half, dynamic, simplify, opset, nms)
    typer.echo(path)


def _overrides(
    ctx: typer.Context, reserved: dict[str, str], mode: str, defaults: dict[str, Any] | None = None, **flags: Any
) -> dict[str, Any]:
    """Ultralytics arguments: `defaults` (a preset's), then the flags given, then key=value pass-through, each
    winning over the one before; an unknown or reserved key is a usage error (exit 2), caught before any work."""
    from lora_yolo.passthrough import check_args

    overrides = {**(defaults or {}), **{k: v for k, v in flags.items() if v is not None}, **_passthrough(ctx.args)}
    try:
        check_args(overrides, reserved, mode)
    except LoraYoloError as e:
        raise typer.BadParameter(str(e)) from None
    return overrides


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def predict(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Image, folder, video or glob, as for `yolo predict`.")],
    model: BaseOpt = "yolo11n.pt",
    adapter: AdapterOpt = None,
    imgsz: Annotated[Optional[int], typer.Option(help="Image size.")] = None,
    conf: Annotated[Optional[float], typer.Option(help="Confidence threshold.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, 0, ...")] = None,
    allow_other_weights: OtherWeightsOpt = False,
) -> None:
    """Predict with a base and an adapter (no merged file); Ultralytics' usual outputs (save=True by default)."""
    from lora_yolo.serve import RESERVED
    from lora_yolo.serve import predict as predict_lora

    overrides = _overrides(ctx, RESERVED, "predict", {"save": True}, imgsz=imgsz, conf=conf, device=device)
    save_dir, images, boxes = predict_lora(source, model, adapter, allow_other_weights, **overrides)
    found = "" if boxes is None else f", {boxes} detections"  # classification, semantic, depth: one per image
    typer.echo(f"{images} images{found}; results in {save_dir}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def val(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="Ultralytics dataset YAML (classification: the dataset folder).")],
    model: BaseOpt = "yolo11n.pt",
    adapter: AdapterOpt = None,
    imgsz: Annotated[Optional[int], typer.Option(help="Image size.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, 0, ...")] = None,
    allow_other_weights: OtherWeightsOpt = False,
) -> None:
    """Validate a base with an adapter (no merged file) with Ultralytics' validator; prints mAP."""
    from lora_yolo.serve import RESERVED, validate

    overrides = _overrides(ctx, RESERVED, "val", imgsz=imgsz, batch=batch, device=device)
    metrics = validate(data, model, adapter, allow_other_weights, **overrides)
    if hasattr(metrics, "top1"):  # classification
        typer.echo(f"top-1 {metrics.top1:.4f}  top-5 {metrics.top5:.4f}; results in {metrics.save_dir}")
    elif "metrics/delta1" in getattr(metrics, "results_dict", {}):  # depth
        r = metrics.results_dict
        typer.echo(
            f"delta1 {r['metrics/delta1']:.4f}  abs_rel {r['metrics/abs_rel']:.4f}; results in {metrics.save_dir}"
        )
    elif hasattr(metrics, "miou"):  # semantic segmentation
        typer.echo(
            f"mIoU {metrics.miou:.4f}  pixel accuracy {metrics.pixel_accuracy:.4f}; results in {metrics.save_dir}"
        )
    else:
        typer.echo(f"mAP50 {metrics.box.map50:.4f}  mAP50-95 {metrics.box.map:.4f}; results in {metrics.save_dir}")


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="An adapter .safetensors (--to peft) or a PEFT folder (--from peft).")],
    output: Annotated[str, typer.Argument(help="The PEFT folder (--to peft) or adapter .safetensors to write.")],
    to: Annotated[Optional[str], typer.Option("--to", help="Target format: peft.")] = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Source format: peft.")] = None,
    base: Annotated[
        Optional[str], typer.Option("--base", "-b", help="With --from peft, for a PEFT adapter not made by lora-yolo.")
    ] = None,
) -> None:
    """Convert an adapter to PEFT's LoRA format (adapter_config.json + adapter_model.safetensors), or back."""
    from lora_yolo.peft_format import convert as convert_adapter

    if (to, from_) not in {("peft", None), (None, "peft")}:
        raise typer.BadParameter("give exactly one of --to peft or --from peft")
    typer.echo(convert_adapter(source, output, to, base))


def run() -> None:
    """Console entry point: known errors become one line on stderr and exit 1 (usage errors exit 2)."""
    try:
        app(standalone_mode=False)
    except LoraYoloError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(130 if isinstance(e, TrainingInterrupted) else 1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as e:  # click's usage errors: they print themselves and carry exit code 2
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    run()
