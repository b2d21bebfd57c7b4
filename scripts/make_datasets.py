"""Generate the synthetic datasets: the small B1/B2 splits shipped in datasets/, or larger ones anywhere.

python scripts/make_datasets.py                       # datasets/shapes-b1 and datasets/shapes-b2 (shipped)
python scripts/make_datasets.py --domain A --train 1200 --val 200 --out /tmp/shapes-a
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lora_yolo.synth import make_dataset

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"B1": "shapes-b1", "B2": "shapes-b2"}  # the README demo and the tests use these


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", choices=["A", "B1", "B2"])
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--val", type=int, default=40)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    jobs = [(args.domain, args.out)] if args.domain else [(d, ROOT / "datasets" / n) for d, n in SHIPPED.items()]
    for domain, out in jobs:
        if out is None:
            parser.error("--out is required with --domain")
        shutil.rmtree(out, ignore_errors=True)
        print(make_dataset(out, domain, args.train, args.val, args.imgsz, args.seed))


if __name__ == "__main__":
    main()
