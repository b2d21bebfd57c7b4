"""Export a merged model to ONNX, TorchScript, OpenVINO, ... through Ultralytics' own exporter.

The export runs on a copy in a temporary folder and its result is moved into place at the end with one rename, so a
failed export leaves no half-written file and never touches the inputs. `base` + `adapter` are merged in memory first.
`--output` naming an existing folder puts the export inside it; nothing that exists is deleted: a file of the same
name is replaced atomically, a folder of the same name only when it is empty (a full one is refused).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ultralytics import RTDETR, YOLO
from ultralytics.engine.exporter import export_formats
from ultralytics.utils import DEFAULT_CFG_DICT

from lora_yolo.atomic import refuse_inputs
from lora_yolo.errors import LoraYoloError, first_line
from lora_yolo.merge import merge_files, parse_adapter_spec


def formats() -> dict[str, str]:
    """Ultralytics export formats: argument -> suffix (e.g. onnx -> .onnx, openvino -> _openvino_model)."""
    table = export_formats()
    return dict(zip(table["Argument"], table["Suffix"]))


def export_model(
    model: str | Path | None = None,
    format: str = "onnx",
    base: str | Path | None = None,
    adapters: list[str] | None = None,
    output: str | Path | None = None,
    imgsz: int = 640,
    half: bool = False,
    dynamic: bool = False,
    simplify: bool = True,
    opset: int | None = None,
    nms: bool | None = None,
) -> Path:
    """Export a merged checkpoint, or `base` + `adapters` merged in memory; returns the exported file or folder.

    `nms` is Ultralytics' export argument: True embeds NMS in the graph, False exports a YOLO26 head's NMS-free
    one-to-one branch (its end-to-end output), None the raw one-to-many output, as Ultralytics does by default.

    Example:
        >>> export_model("runs/detect/train/merged.pt", format="onnx", imgsz=640)
        >>> export_model(base="yolo11n.pt", adapters=["adapter.safetensors"], format="onnx")
    """
    known = formats()
    if format not in known or format == "-":
        raise LoraYoloError(f"unknown export format {format!r}; formats: {', '.join(k for k in known if k != '-')}")
    if (model is None) == (base is None):
        raise LoraYoloError("give either a merged MODEL or --base with --adapter")
    if base is not None and not adapters:
        raise LoraYoloError("--base needs at least one --adapter")
    source = Path(model) if model is not None else parse_adapter_spec(adapters[0])[0]
    if model is not None and not source.is_file():
        raise LoraYoloError(f"model file not found: {source}")
    stem = source.stem if model is not None else f"{source.stem}-merged"
    target = Path(output) if output else source.with_name(stem + known[format])
    if output and (target.is_dir() or str(output).endswith(("/", os.sep))):  # a folder: the export goes into it
        target = target / (stem + known[format])
    if not target.parent.is_dir():
        raise LoraYoloError(f"output folder does not exist: {target.parent}")
    inputs = [p for p in (model, base, *(parse_adapter_spec(a)[0] for a in adapters or [])) if p is not None]
    refuse_inputs(target, inputs)
    if target.is_dir() and any(target.iterdir()):
        raise LoraYoloError(f"{target} already exists and is not empty; remove it or choose another --output")
    precision = {"quantize": 16 if half else None} if "quantize" in DEFAULT_CFG_DICT else {"half": half}
    if nms is not None:
        precision["nms"] = nms
    try:
        workspace = tempfile.TemporaryDirectory(prefix=".lora-yolo-export-", dir=target.parent)
    except OSError as e:
        raise LoraYoloError(f"cannot write to {target.parent}: {e.strerror or e}") from None
    with workspace as tmp:
        work = Path(tmp) / f"{stem}.pt"
        if model is not None:
            try:  # the exporter writes beside its input: never beside the user's file
                shutil.copyfile(source, work)
            except OSError as e:
                raise LoraYoloError(f"cannot write to {target.parent}: {e.strerror or e}") from None
        else:
            merge_files(base, adapters, work)
        try:
            yolo = YOLO(str(work))
            if nms and isinstance(yolo, RTDETR):  # Ultralytics would only warn and export without it
                raise LoraYoloError("--nms is not available for RT-DETR: its decoder's output needs no NMS")
            exported = yolo.export(
                format=format, imgsz=imgsz, dynamic=dynamic, simplify=simplify, opset=opset, device="cpu", **precision
            )
        except LoraYoloError:
            raise
        except Exception as e:
            hint = ""
            if isinstance(e, ImportError):  # the extra has ONNX's packages; other formats name their own
                hint = "; pip install 'lora-yolo[export]'" if format == "onnx" else "; install the package it names"
            raise LoraYoloError(f"{format} export failed: {first_line(e)}{hint}") from None
        if Path(exported).is_dir() != target.is_dir() and target.exists():
            kind = "a folder" if Path(exported).is_dir() else "a file"
            raise LoraYoloError(f"{format} export is {kind}, and {target} exists as something else")
        try:
            os.replace(exported, target)  # one rename: replaces a file or an empty folder, never anything else
        except OSError as e:
            raise LoraYoloError(f"cannot write {target}: {e.strerror or e}") from None
    return target


__all__ = ["export_model", "formats"]
