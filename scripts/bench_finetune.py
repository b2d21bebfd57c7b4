"""LoRA vs full fine-tuning vs Ultralytics `freeze`, on synthetic domain shift (B1) and new classes (B2), on CPU.

    python scripts/bench_finetune.py --quick          # one seed, short schedule: under 10 minutes on 2 cores
    python scripts/bench_finetune.py                  # 2 seeds, full schedule: 47 min on 2 cores (8 methods x 2 x 2)
    python scripts/bench_finetune.py --append --methods full lora-default lora-dora lora-plus4 lora-plus4-lr0.005
                                                      # new rows added to results.json as a new batch

With --append the runs join benchmarks/results.json as a new batch. Every ratio is to full fine-tuning of the same
seed in the same batch (so each batch reruns `full`); a method run in several batches is averaged over all its runs.

Every method starts from the same base (the shipped demo base, pretrained on domain A) with the same data, epochs,
image size and seed, each in its own subprocess (so peak memory is its own). Writes benchmarks/results.json,
benchmarks/results.md and benchmarks/results.png (mAP50-95 vs trainable parameters).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "lora_yolo" / "assets" / "yolo11n-shapes.pt"
OUT = ROOT / "benchmarks"

# name -> (kind, settings). Ultralytics methods use Ultralytics' own defaults (optimizer=auto), as a user would.
METHODS = {
    "full": ("ultralytics", {}),
    "freeze-backbone": ("ultralytics", {"freeze": "backbone"}),
    "head-only": ("ultralytics", {"freeze": "all-but-head"}),
    # Plain LoRA rows pin use_dora=False: "lora-default" is the default preset as it was before DoRA won (batch 1),
    # kept under its name so every batch compares; "lora-dora" is the default preset since.
    "lora-default": ("lora", {"config": "default", "use_dora": False}),
    "lora-neck-head": ("lora", {"config": "neck_head"}),
    "lora-high-capacity": ("lora", {"config": "high_capacity"}),
    "lora-r4": ("lora", {"config": "default", "use_dora": False, "r": 4, "lora_alpha": 8}),
    "lora-r16": ("lora", {"config": "default", "use_dora": False, "r": 16, "lora_alpha": 32}),
    "lora-dora": ("lora", {"config": "default", "use_dora": True}),
    "lora-plus4": ("lora", {"config": "default", "use_dora": False, "loraplus_lr_ratio": 4}),
    # diverged at lr0 0.01 (B1, seed 0, epoch 9)
    "lora-plus16": ("lora", {"config": "default", "use_dora": False, "loraplus_lr_ratio": 16}),
    "lora-plus4-lr0.005": (
        "lora",
        {"config": "default", "use_dora": False, "loraplus_lr_ratio": 4, "train": {"lr0": 0.005}},
    ),
    # Candidates tried while choosing the defaults (run them with --methods).
    "lora-all-lr0.005": ("lora", {"config": "default", "use_dora": False, "train": {"lr0": 0.005}}),
    "lora-all-lr0.02": ("lora", {"config": "default", "use_dora": False, "train": {"lr0": 0.02}}),
    "lora-neck-head-lr0.005": ("lora", {"config": "neck_head", "train": {"lr0": 0.005}}),
    "lora-neck-head-lr0.01": ("lora", {"config": "neck_head", "train": {"lr0": 0.01}}),
}
STANDARD = [
    "full",
    "freeze-backbone",
    "head-only",
    "lora-default",
    "lora-neck-head",
    "lora-high-capacity",
    "lora-r4",
    "lora-r16",
    "lora-dora",
    "lora-plus4",
    "lora-plus4-lr0.005",
]


def run_method(spec: dict) -> dict:
    """Worker: train one method, validate it, report metrics, sizes, time and this process's peak memory."""
    from ultralytics import YOLO

    from lora_yolo.checkpoint import load_model
    from lora_yolo.presets import resolve_config
    from lora_yolo.train import train

    kind, settings = METHODS[spec["method"]]
    common = dict(
        epochs=spec["epochs"],
        imgsz=spec["imgsz"],
        batch=spec["batch"],
        seed=spec["seed"],
        device="cpu",
        workers=2,
        plots=False,
        project=spec["project"],
        name=spec["method"],
        exist_ok=True,
    )
    base = load_model(spec["base"])
    n_layers, n_backbone = len(base.model), len(base.yaml["backbone"])
    if kind == "ultralytics":
        freeze = {"backbone": n_backbone, "all-but-head": n_layers - 1}.get(settings.get("freeze"))
        model = YOLO(spec["base"])
        model.train(data=spec["data"], freeze=freeze, **common)
        weights = Path(model.trainer.best)
        trained = model.trainer.model
        trainable = sum(
            p.numel()
            for n, p in trained.named_parameters()
            if not n.startswith(tuple(f"model.{i}." for i in range(freeze or 0))) and ".dfl" not in n
        )
        stored = weights.stat().st_size
        run_dir = Path(model.trainer.save_dir)
    else:
        overrides = {k: v for k, v in settings.items() if k not in ("config", "train")}
        config, preset_args = resolve_config(settings["config"], **overrides)
        result = train(
            spec["data"], model=spec["base"], config=config, **{**preset_args, **settings.get("train", {}), **common}
        )
        weights, trainable, stored, run_dir = (
            result.merged,
            result.trainable,
            result.adapter.stat().st_size,
            result.save_dir,
        )
    # Share of the trained model's parameters, adapters included (PEFT's print_trainable_parameters convention).
    total = result.total if kind == "lora" else sum(p.numel() for p in trained.parameters())
    scores = {}
    for split, data in (("B", spec["data"]), ("A", spec.get("forgetting_data"))):
        if data:
            r = YOLO(str(weights)).val(
                data=data,
                imgsz=spec["imgsz"],
                batch=spec["batch"],
                device="cpu",
                plots=False,
                project=spec["project"],
                name=f"{spec['method']}-val{split}",
                exist_ok=True,
            )
            scores[split] = {"mAP50": float(r.box.map50), "mAP50-95": float(r.box.map)}
    with open(run_dir / "results.csv", encoding="utf-8") as f:
        times = [float(row["time"]) for row in csv.DictReader(f)]
    epoch_s = statistics.median(b - a for a, b in zip([0.0, *times], times))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {
        "method": spec["method"],
        "scores": scores,
        "trainable": trainable,
        "total": total,
        "stored_bytes": stored,
        "epoch_s": epoch_s,
        "peak_mb": peak_mb,
    }


def zero_shot(base: str, data: str, imgsz: int, batch: int, project: str) -> dict:
    """The base on a split without fine-tuning (only meaningful when the classes are the base's)."""
    from ultralytics import YOLO

    r = YOLO(base).val(data=data, imgsz=imgsz, batch=batch, device="cpu", plots=False, project=project, exist_ok=True)
    return {"mAP50": float(r.box.map50), "mAP50-95": float(r.box.map)}


def summarize(runs: list[dict]) -> dict:
    """Mean and spread over seeds per (domain, method), and ratios to full fine-tuning from the same seeds."""
    table = {}
    for domain in sorted({r["domain"] for r in runs}):
        rows = [r for r in runs if r["domain"] == domain]
        full = {_batch(r): r for r in rows if r["method"] == "full"}
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            m = [r["scores"]["B"]["mAP50-95"] for r in mine]
            entry = {
                "mAP50-95": statistics.mean(m),
                "mAP50-95_spread": (max(m) - min(m)) / 2,
                "mAP50": statistics.mean(r["scores"]["B"]["mAP50"] for r in mine),
                "vs_full": statistics.mean(
                    r["scores"]["B"]["mAP50-95"] / full[_batch(r)]["scores"]["B"]["mAP50-95"] for r in mine
                ),
                "trainable": mine[0]["trainable"],
                "trainable_pct": 100 * mine[0]["trainable"] / mine[0]["total"],
                "stored_bytes": mine[0]["stored_bytes"],
                "stored_vs_full": mine[0]["stored_bytes"] / full[_batch(mine[0])]["stored_bytes"],
                "epoch_time_vs_full": statistics.median(r["epoch_s"] / full[_batch(r)]["epoch_s"] for r in mine),
                "peak_mem_vs_full": statistics.median(r["peak_mb"] / full[_batch(r)]["peak_mb"] for r in mine),
                "seeds": len(mine),
            }
            if all("A" in r["scores"] for r in mine):
                entry["A_mAP50-95_after"] = statistics.mean(r["scores"]["A"]["mAP50-95"] for r in mine)
            table.setdefault(domain, {})[method] = entry
    return table


def _batch(run: dict) -> tuple[int, int]:
    return run.get("batch", 0), run["seed"]


def write_report(results: dict) -> None:
    """results.md (tables) and results.png (mAP50-95 vs trainable parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# Fine-tuning benchmark ({results['mode']})", "", results["protocol"], ""]
    for domain, rows in results["table"].items():
        head_full = rows["head-only"]["mAP50-95"] / rows["full"]["mAP50-95"] if "head-only" in rows else float("nan")
        lines += [f"## {domain}: {results['domains'][domain]}", ""]
        if domain in results["zero_shot"]:
            lines.append(
                f"Base zero-shot mAP50-95 on {domain}: {results['zero_shot'][domain]['mAP50-95']:.3f}; "
                f"base on A val: {results['base_A']['mAP50-95']:.3f}."
            )
        lines += [f"Difficulty (head-only / full mAP50-95): {head_full:.2f}.", ""]
        cols = [
            "method",
            "mAP50-95",
            "± ",
            "mAP50",
            "vs full",
            "trainable",
            "% params",
            "stored bytes",
            "vs full",
            "epoch time",
            "peak mem",
        ] + (["A mAP50-95 after"] if domain == "B1" else [])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for method, e in rows.items():
            cells = [
                method,
                f"{e['mAP50-95']:.3f}",
                f"{e['mAP50-95_spread']:.3f}",
                f"{e['mAP50']:.3f}",
                f"{e['vs_full']:.1%}",
                f"{e['trainable']:,}",
                f"{e['trainable_pct']:.2f}",
                f"{e['stored_bytes']:,}",
                f"{e['stored_vs_full']:.3f}",
                f"{e['epoch_time_vs_full']:.2f}x",
                f"{e['peak_mem_vs_full']:.2f}x",
            ] + ([f"{e.get('A_mAP50-95_after', float('nan')):.3f}"] if domain == "B1" else [])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("failed"):
        lines += ["## Runs that failed", ""]
        lines += [f"- {r['method']} on {r['domain']}, seed {r['seed']}: {r['error']}" for r in results["failed"]]
        lines.append("")
    (OUT / "results.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, len(results["table"]), figsize=(6 * len(results["table"]), 4.5), squeeze=False)
    for ax, (domain, rows) in zip(axes[0], results["table"].items()):
        for method, e in rows.items():
            ax.scatter(
                e["trainable"], e["mAP50-95"], s=40, color="tab:red" if method.startswith("lora") else "tab:blue"
            )
            ax.annotate(method, (e["trainable"], e["mAP50-95"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set(title=f"{domain}: {results['domains'][domain]}", xlabel="trainable parameters", ylabel="mAP50-95")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "results.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, short schedule")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--methods", nargs="*", default=STANDARD, choices=list(METHODS))
    parser.add_argument("--domains", nargs="*", default=["B1", "B2"], choices=["B1", "B2"])
    parser.add_argument("--base", default=str(BASE))
    parser.add_argument("--append", action="store_true", help="add these runs to results.json as a new batch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_method(json.loads(args.worker))))
        return

    from lora_yolo.synth import make_dataset

    seeds = args.seeds or (1 if args.quick else 2)
    epochs = args.epochs or (6 if args.quick else 15)
    n_train, n_val, imgsz, batch = (100, 60, 160, 16) if args.quick else (160, 80, 160, 16)
    domains = {
        d: t
        for d, t in {"B1": "domain shift (A's classes, new look)", "B2": "new classes"}.items()
        if d in args.domains
    }
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data = {d: str(make_dataset(Path(tmp) / d, d, n_train, n_val, imgsz, seed=7)) for d in domains}
        data_a = str(make_dataset(Path(tmp) / "A", "A", 0, n_val, imgsz, seed=99))  # fresh A images: forgetting
        zs = {"B1": zero_shot(args.base, data["B1"], imgsz, batch, f"{tmp}/zs")} if "B1" in domains else {}
        base_a = zero_shot(args.base, data_a, imgsz, batch, f"{tmp}/zsA")
        runs, failed = [], []
        for seed in range(seeds):
            for domain in domains:
                for method in args.methods:
                    spec = {
                        "method": method,
                        "data": data[domain],
                        "base": args.base,
                        "epochs": epochs,
                        "imgsz": imgsz,
                        "batch": batch,
                        "seed": seed,
                        "project": f"{tmp}/{domain}-s{seed}",
                        "forgetting_data": data_a if domain == "B1" else None,
                    }
                    t = time.time()
                    out = subprocess.run(
                        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True
                    )
                    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:  # recorded and reported (a diverging config is a result too), then go on
                        error = (out.stderr.strip().splitlines() or ["no output"])[-1]
                        failed.append({"method": method, "domain": domain, "seed": seed, "error": error})
                        print(f"[{time.time() - start:6.0f}s] {domain} seed {seed} {method:20s} FAILED: {error}")
                        continue
                    run = {**json.loads(line[7:]), "domain": domain, "seed": seed}
                    runs.append(run)
                    print(
                        f"[{time.time() - start:6.0f}s] {domain} seed {seed} {method:20s} "
                        f"mAP50-95 {run['scores']['B']['mAP50-95']:.3f} ({time.time() - t:.0f}s)",
                        flush=True,
                    )
    minutes = (time.time() - start) / 60
    protocol = (
        f"Base: {Path(args.base).name}. {n_train} train / {n_val} val images per domain at {imgsz} px, "
        f"{epochs} epochs, batch {batch}, {seeds} seed(s), CPU (2 cores). Ratios are to full fine-tuning "
        f"of the same seed, measured in the same run. Total time {minutes:.0f} min."
    )
    if args.append:
        old = json.loads((OUT / "results.json").read_text())
        n = 1 + max(r.get("batch", 0) for r in old["runs"])
        runs = old["runs"] + [{**r, "batch": n} for r in runs]
        failed = old.get("failed", []) + [{**r, "batch": n} for r in failed]
        protocol = (
            f"{old['protocol']} Batch {n} ({', '.join(args.methods)}; run later, same protocol): {minutes:.0f} min. "
            "Every ratio is to `full` of the same seed and batch."
        )
    results = {
        "mode": "quick" if args.quick else "full",
        "protocol": protocol,
        "domains": domains,
        "zero_shot": zs,
        "base_A": base_a,
        "runs": runs,
        "failed": failed,
        "table": summarize(runs),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results)
    print((OUT / "results.md").read_text())


if __name__ == "__main__":
    main()
