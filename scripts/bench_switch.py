"""Switching adapters on one loaded base vs loading a full checkpoint, side by side, medians over interleaved rounds.

    python scripts/bench_switch.py            # about a minute on 2 CPU cores

Measured per round, in rotating order: `set_adapter` (the adapter computed on the fly), `set_adapter` +
`merge_adapter` (folded into the weights, zero inference overhead), a switch to an adapter with another class set,
and loading the equivalent merged checkpoint with `YOLO(path)` and fusing it (what a predictor does first). Also
one forward pass at 320 px: the adapter unmerged, merged in place, and disabled, each against the same adapter as
a plain merged checkpoint (the zero-overhead reference). Prints a Markdown table for README.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import DEMO_BASE, random_adapter  # noqa: E402
from ultralytics import YOLO  # noqa: E402

from lora_yolo.adapter import save_adapter  # noqa: E402
from lora_yolo.merge import merge_files  # noqa: E402
from lora_yolo.serve import AdapterModel  # noqa: E402

ROUNDS = 30


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, kwargs in {
            "a": {"seed": 1},
            "b": {"seed": 2},
            "classes": {"seed": 3, "names": {0: "x", 1: "y"}},
        }.items():
            paths[name] = save_adapter(random_adapter(DEMO_BASE, **kwargs)[1], Path(tmp) / f"{name}.safetensors")
        merged = merge_files(DEMO_BASE, [str(paths["a"])], Path(tmp) / "merged.pt")
        model = AdapterModel(DEMO_BASE)
        for name, path in paths.items():
            model.load_adapter(path, name)
        model.set_adapter("b")

        def switch(name, merge=False):
            model.set_adapter(name)
            if merge:
                model.merge_adapter()

        def load():
            YOLO(str(merged)).model.fuse(verbose=False)

        cases = {
            "set_adapter (unmerged)": lambda: switch("a"),
            "set_adapter + merge_adapter": lambda: switch("a", merge=True),
            "set_adapter, other class set": lambda: switch("classes"),
            "YOLO(merged.pt) + fuse": load,
        }
        times = {k: [] for k in cases}
        for i in range(ROUNDS):
            for k in list(cases)[i % len(cases) :] + list(cases)[: i % len(cases)]:
                switch("b")  # start each from another adapter
                times[k].append(timed(cases[k]))

        x = torch.rand(1, 3, 320, 320)
        plain = YOLO(str(merged)).model.fuse(verbose=False)  # the same adapter as a plain merged checkpoint
        states = {
            "merged.pt, plain Ultralytics": (lambda: None, plain),
            "base (adapters disabled)": (model.disable_adapters, model.model),
            "adapter unmerged": (lambda: switch("a"), model.model),
            "adapter merged in place": (lambda: switch("a", merge=True), model.model),
        }
        fwd = {k: [] for k in states}
        with torch.no_grad():
            for i in range(ROUNDS):
                for k in list(states)[i % len(states) :] + list(states)[: i % len(states)]:
                    prepare, net = states[k]
                    prepare()
                    net(x)  # warm
                    fwd[k].append(timed(lambda net=net: net(x)))

    load_ms = statistics.median(times["YOLO(merged.pt) + fuse"]) * 1e3
    print(f"| operation ({ROUNDS} rounds, median) | ms | vs loading a checkpoint |\n|---|---|---|")
    for k, v in times.items():
        ms = statistics.median(v) * 1e3
        print(f"| {k} | {ms:.2f} | {ms / load_ms:.4f}x |")
    reference = fwd["merged.pt, plain Ultralytics"]
    print("\n| forward pass, 320 px, per round ratio (median) | vs merged.pt |\n|---|---|")
    for k, v in fwd.items():
        print(f"| {k} | {statistics.median(a / b for a, b in zip(v, reference)):.3f}x |")


if __name__ == "__main__":
    main()
