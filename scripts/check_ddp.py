"""Check a real multi-GPU (DDP) LoRA run, for a machine with 2+ GPUs.

    python scripts/check_ddp.py --data path/to/coco8.yaml [--devices 0,1] [--epochs 2]

Ultralytics' DDP launcher pickles the trainer class, its args, the model (with its adapters) and the callbacks with
cloudpickle and rebuilds them in one worker per GPU. This trains through that path, then checks what must hold:
the adapters trained (B no longer zero), every base tensor in best.pt is bit-identical to the base, and merged.pt
reproduces base + adapter. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_base  # noqa: E402

from lora_yolo import attach_adapter, load_adapter, load_model, merge_lora  # noqa: E402
from lora_yolo.inject import base_state_dict  # noqa: E402
from lora_yolo.train import train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", help="base checkpoint (default: YOLO11n from its YAML, fp16 grid)")
    parser.add_argument("--devices", default="0,1")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--imgsz", type=int, default=320)
    args = parser.parse_args()
    if torch.cuda.device_count() < len(args.devices.split(",")):
        print(f"needs {args.devices} GPUs, found {torch.cuda.device_count()}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base_pt = Path(args.model) if args.model else make_base(Path(tmp) / "base.pt")
        result = train(
            args.data,
            model=base_pt,
            device=args.devices,
            epochs=args.epochs,
            imgsz=args.imgsz,
            batch=16,
            project=tmp,
            name="ddp",
            plots=False,
        )
        print(result.table())
        adapter = load_adapter(result.adapter)
        trained = all(t.abs().max() > 0 for k, t in adapter.tensors.items() if k.endswith("lora_B.weight"))
        base = load_model(base_pt).state_dict()
        best = base_state_dict(torch.load(result.save_dir / "weights" / "best.pt", weights_only=False)["model"])
        frozen_same = best.keys() == base.keys() and all(torch.equal(v.float(), base[k]) for k, v in best.items())
        fresh = merge_lora(attach_adapter(load_model(base_pt), adapter)).state_dict()
        merged = load_model(result.merged).state_dict()
        merge_same = max((fresh[k] - merged[k]).abs().max().item() for k in fresh) <= 1e-6
    checks = {"adapters trained": trained, "base bit-identical": frozen_same, "merged = base + adapter": merge_same}
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
