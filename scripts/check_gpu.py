"""GPU check, for a machine with one or more CUDA GPUs: about 3-6 minutes on one GPU.

    python scripts/check_gpu.py [--epochs 3] [--imgsz 640] [--json out.json]
    python scripts/check_gpu.py --device cpu --imgsz 64 --epochs 1   # the same steps on CPU, to check the script

On the demo base and the committed B1 data, side by side in one run: full fine-tuning (plain Ultralytics) and the
default LoRA recipe, both with Ultralytics' AMP (fp16 autocast and its gradient scaler, its default on a GPU), same
epochs, image size and batch. Reports the epoch-time and `torch.cuda.max_memory_allocated` ratios of LoRA to full
fine-tuning, whether every logged loss was finite, merged == base + adapter on the GPU, ONNX export parity against
PyTorch, TensorRT export when `tensorrt` is installed, and with two or more GPUs runs scripts/check_ddp.py.
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import DEMO_BASE, SHAPES_B1, head_output  # noqa: E402

from lora_yolo import attach_adapter, load_adapter, load_model  # noqa: E402
from lora_yolo.export import export_model  # noqa: E402
from lora_yolo.train import train  # noqa: E402


def epoch_stats(run_dir: Path) -> tuple[float, bool]:
    """Median epoch time from Ultralytics' results.csv, and whether every logged loss is finite."""
    with open(run_dir / "results.csv", encoding="utf-8") as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    times = [float(r["time"]) for r in rows]
    losses = [float(v) for r in rows for k, v in r.items() if "loss" in k]
    return statistics.median(b - a for a, b in zip([0.0, *times], times)), all(map(math.isfinite, losses))


def peak_memory(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def onnx_parity(merged: Path, onnx: Path, x: torch.Tensor) -> float:
    """Largest difference of the ONNX export's output from PyTorch's (fused, as exported), relative to its scale."""
    import onnxruntime as ort

    export_model(merged, "onnx", output=onnx, imgsz=x.shape[-1])
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = load_model(merged).fuse(verbose=False).eval()(x)[0].numpy()
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="0")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    gpu = args.device != "cpu"
    if gpu and not torch.cuda.is_available():
        print("no CUDA GPU found; use --device cpu to check the script itself")
        return 2
    if "," in args.device:
        print("one GPU here (--device 0); scripts/check_ddp.py checks several, and runs by itself with 2+ GPUs")
        return 2
    device = torch.device(f"cuda:{args.device}" if gpu else "cpu")
    common = dict(epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, device=args.device, amp=True, plots=False,
                  workers=4, exist_ok=True, seed=0)  # fmt: skip
    out: dict = {"gpu": torch.cuda.get_device_name(device) if gpu else "cpu", "torch": torch.__version__, **common}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        from ultralytics import YOLO

        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        full = YOLO(str(DEMO_BASE))
        full.train(data=str(SHAPES_B1), project=tmp, name="full", **common)
        out["full_epoch_s"], full_finite = epoch_stats(Path(full.trainer.save_dir))
        out["full_peak_mib"] = peak_memory(device)
        del full  # its trainer, model, EMA and optimizer state must not count in LoRA's peak
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        result = train(SHAPES_B1, model=DEMO_BASE, project=tmp, name="lora", **common)
        out["lora_epoch_s"], lora_finite = epoch_stats(result.save_dir)
        out["lora_peak_mib"] = peak_memory(device)
        out["epoch_ratio"] = out["lora_epoch_s"] / out["full_epoch_s"]
        out["memory_ratio"] = out["lora_peak_mib"] / out["full_peak_mib"]
        out["losses_finite"] = full_finite and lora_finite
        out["lora_map50_95"], out["warnings"] = result.metrics["mAP50-95"], result.warnings
        if not out["losses_finite"]:
            failures.append("a logged loss is not finite")

        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 for the comparison
        x = torch.rand(2, 3, args.imgsz, args.imgsz, device=device)
        unmerged = attach_adapter(load_model(DEMO_BASE), load_adapter(result.adapter)).to(device)
        diff = (head_output(load_model(result.merged).to(device), x) - head_output(unmerged, x)).abs().max().item()
        out["merged_vs_unmerged"] = diff
        if diff > 1e-4:
            failures.append(f"merged differs from base + adapter by {diff:.2e}")

        try:  # each export stage records its failure: the training numbers above must not be lost with it
            out["onnx_max_diff"] = onnx_parity(result.merged, Path(tmp) / "merged.onnx", x[:1].cpu())
            if out["onnx_max_diff"] > 1e-4:
                failures.append(f"ONNX differs from PyTorch by {out['onnx_max_diff']:.2e} (relative)")
        except Exception as e:
            out["onnx_max_diff"] = f"failed: {e}"
            failures.append("ONNX export or run failed")

        try:
            import tensorrt  # noqa: F401
        except ImportError:
            out["tensorrt"] = "not installed"
        else:
            start = time.perf_counter()
            try:
                export_model(result.merged, "engine", output=Path(tmp) / "merged.engine", imgsz=args.imgsz)
                out["tensorrt"] = f"exported in {time.perf_counter() - start:.0f} s"
            except Exception as e:  # the check reports it; the other results still stand
                out["tensorrt"] = f"failed: {e}"
                failures.append("TensorRT export failed")

    if gpu and torch.cuda.device_count() >= 2:
        ddp = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_ddp.py"), "--data", str(SHAPES_B1)])
        out["ddp"] = "passed" if ddp.returncode == 0 else f"failed ({ddp.returncode})"
        if ddp.returncode:
            failures.append("check_ddp.py failed")
    out["failures"] = failures
    print("\n| GPU | px | batch | epochs | LoRA / full epoch time | LoRA / full max_memory_allocated | losses finite |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {out['gpu']} | {args.imgsz} | {args.batch} | {args.epochs} | {out['epoch_ratio']:.2f}x | "
          f"{out['memory_ratio']:.2f}x | {out['losses_finite']} |")  # fmt: skip
    print(json.dumps(out, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
