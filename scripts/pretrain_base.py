"""Pretrain the demo base: YOLO11n from its YAML, fully trained on synthetic domain A, on CPU, offline.

    python scripts/pretrain_base.py --epochs 40     # writes lora_yolo/assets/yolo11n-shapes.pt (+ .json sidecar)

The README demo and the fine-tuning benchmark start from this checkpoint; users with internet keep the default
`yolo11n.pt`. The sidecar records how it was made (data, epochs, time, mAP on A's val split).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from ultralytics import YOLO, __version__

from lora_yolo.synth import make_dataset

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "lora_yolo" / "assets" / "yolo11n-shapes.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pretrain-"))
    data = make_dataset(work / "shapes-a", "A", args.train, args.val, args.imgsz, args.seed)
    start = time.time()
    model = YOLO("yolo11n.yaml")
    model.train(
        data=str(data),
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        seed=args.seed,
        device="cpu",
        workers=2,
        project=str(work / "runs"),
        name="pretrain",
        plots=False,
        exist_ok=True,
    )
    minutes = (time.time() - start) / 60
    best = work / "runs" / "pretrain" / "weights" / "best.pt"
    metrics = YOLO(best).val(data=str(data), imgsz=args.imgsz, batch=args.batch, device="cpu", plots=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(best, args.out)  # Ultralytics' best.pt: fp16, optimizer stripped
    sidecar = {
        "made_by": "scripts/pretrain_base.py",
        "model": "yolo11n.yaml (random init)",
        "data": f"lora_yolo.synth domain A, {args.train} train / {args.val} val, {args.imgsz} px, seed {args.seed}",
        "epochs": args.epochs,
        "batch": args.batch,
        "ultralytics": __version__,
        "train_minutes_2cpu": round(minutes, 1),
        "val_A": {"mAP50": round(float(metrics.box.map50), 4), "mAP50-95": round(float(metrics.box.map), 4)},
    }
    args.out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print(json.dumps(sidecar, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
