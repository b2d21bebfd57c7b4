"""Inference cost of LoRA on CPU: merged vs base, and adapter-attached (unmerged) vs merged.

    python scripts/bench_inference.py [--base B.pt] [--imgsz 320] [--batch 1] [--repeats 30]

Three models in one process, timed in interleaved rounds (the order rotating each round) so machine noise hits
each alike; each round times one forward pass after warm-up. Prints the median of the per-round ratios and their
spread (10th-90th percentile): merged / base should be 1.00 within noise (a merged model is a plain YOLO model with
the same layers), unmerged / merged is the price of serving with the adapter attached.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_base, random_adapter  # noqa: E402

from lora_yolo import LoraConfig, load_model  # noqa: E402
from lora_yolo.adapter import attach_adapter  # noqa: E402
from lora_yolo.merge import merge_adapters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="base checkpoint (default: YOLO11n from its YAML)")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base_pt = args.base or make_base(Path(tmp) / "base.pt")
        _, adapter = random_adapter(base_pt, LoraConfig())
        base = load_model(base_pt).fuse(verbose=False).eval()
        merged = merge_adapters(load_model(base_pt), [(adapter, 1.0)]).fuse(verbose=False).eval()
        unmerged = attach_adapter(load_model(base_pt), adapter).eval()  # conv+BN fusion cannot hold an adapter
    models = {"base": base, "merged": merged, "unmerged": unmerged}
    x = torch.rand(args.batch, 3, args.imgsz, args.imgsz)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            for _ in range(3):
                m(x)
        names = list(models)
        for i in range(args.repeats):
            for name in names[i % 3 :] + names[: i % 3]:  # rotate the order: no model always runs first
                m = models[name]
                start = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - start)

    def ratio(a: str, b: str) -> str:
        r = sorted(x / y for x, y in zip(times[a], times[b]))
        q = statistics.quantiles(r, n=10)
        return f"{statistics.median(r):.3f} (p10 {q[0]:.3f}, p90 {q[-1]:.3f})"

    print(f"CPU, {args.threads} threads, batch {args.batch}, {args.imgsz} px, {args.repeats} interleaved rounds")
    print(f"merged / base      {ratio('merged', 'base')}")
    print(f"unmerged / merged  {ratio('unmerged', 'merged')}")
    print("median ms: " + ", ".join(f"{k} {1000 * statistics.median(v):.1f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
