"""Benchmark `--add-classes`: does the demo base keep its own classes (domain A) while learning the new-class task?

    python scripts/bench_add_classes.py            # all runs, then benchmarks/add_classes.json / .md
    python scripts/bench_add_classes.py --seed 1   # another seed (appended; the report takes every seed run)
    python scripts/bench_add_classes.py --methods exact --lr 0.003   # AdamW at lr0 0.003 instead of optimizer=auto
    python scripts/bench_add_classes.py --base rail-v8n --methods exact adapted --lr 0.01 ...   # a real base

The new-class data is what a user adding classes has: scenes of A's shapes and the 4 new ones together (synthetic
domain AB2), only the new ones labelled, so the base's objects are in the training images unlabelled (what adapted
mode pseudo-labels and what a plain fine-tune learns to ignore); 64 training images, validation and test splits of
40, scored on the new classes only. Schedule: scripts/bench_finetune.py's, at Ultralytics' `optimizer=auto` unless
an lr is given. Runs, each scored on A's test images (the base's 3 classes, 40 images of A alone, which the base
never saw) and on the new classes' test images:
  exact       lora-yolo --add-classes exact (a trained copy of each class branch scores the new classes)
  adapted     lora-yolo --add-classes adapted (the same copies, adapters everywhere else with the recipe add_classes
              uses, the `dora_r32` preset; the base's objects pseudo-labelled)
  lora-new    that adapter recipe (`dora_r32`) on the new classes alone (a new class set: forgets A)
  full-new    Ultralytics full fine-tuning on the new classes alone (forgets A)
  full-pseudo Ultralytics full fine-tuning on adapted's pseudo-labelled data (the combined class set)
Goals (the add-classes issue): on A, exact 100% of the base and adapted >= 95%; on the new classes, exact >= 90% and
adapted >= 95% of lora-new. Each run appends to benchmarks/add_classes.jsonl as it ends. lora-yolo's runs also record
the new classes' validation mAP50-95 of merged.pt, which is what an lr is chosen on (never the test splits).

Real bases (`--base`, scripts/bench_finetune.py's): no images of their own classes can be rendered, so they learn
the fine-tuning benchmark's new-classes task (the 4 shapes alone, 64 images, its seeds) and are scored on the new
classes only, against the dora_r32 recipe's run of that task in benchmarks/exploration/runs.jsonl (the
new-class-only adapter on the same images); what they keep of their own classes is not measured.

The earlier version of this benchmark trained on scenes of the new shapes alone, where adapted mode's pseudo-labels
could only be the base's mistakes: benchmarks/v1/add_classes.md; adapted mode before it had class-branch copies (its
class convs trained in full, one row per combined class) is in benchmarks/v1/adapted_class_convs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from copy import deepcopy
from pathlib import Path

import yaml
from bench_finetune import BASES, EXPLORATION, N_TEST, N_VAL, SCHEDULE, datasets, fetch_base, load_runs, mean_spread

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks"
RUNS = OUT / "add_classes.jsonl"
METHODS = ("exact", "adapted", "lora-new", "full-new", "full-pseudo")
A_VAL_SEED = 9  # A's validation images (A's test images are seed 8): how much of A an lr keeps, for choosing it
DEMO = "demo-11n"
REAL_METHODS = ("exact", "adapted")  # on a real base: the new-class-only reference is bench_finetune's own run
REFERENCE = ("dora-r32-clamped", "auto")  # bench_finetune's method and lr for the dora_r32 preset


def mixed_datasets(root: Path) -> dict[str, str]:
    """{"data": train + val, "test": test} YAMLs of the new-class task: domain AB2 scenes (A's shapes beside the new
    ones) with the new shapes labelled alone, under ids 0-3, as a dataset of the new classes has them."""
    from lora_yolo.synth import DOMAINS, make_dataset

    first = len(DOMAINS["A"].classes)  # AB2's classes: A's, then B2's
    out = {}
    for name, n_train, n, seed in (("data", 64, N_VAL, 7), ("test", 0, N_TEST, 8)):
        folder = root / f"mixed-{name}"
        if not (folder / "data.yaml").is_file():
            make_dataset(folder, "AB2", n_train, n, SCHEDULE["imgsz"], seed=seed)
            for label in (folder / "labels").rglob("*.txt"):
                rows = [line.split() for line in label.read_text().splitlines() if line.strip()]
                label.write_text("".join(f"{int(c) - first} {' '.join(r)}\n" for c, *r in rows if int(c) >= first))
            spec = yaml.safe_load((folder / "data.yaml").read_text())
            spec["names"] = dict(enumerate(DOMAINS["B2"].classes))
            (folder / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        out[name] = str(folder / "data.yaml")
    return out


def with_names(data: str | Path, names: dict[int, str], out: Path) -> Path:
    """`data` with another class list (the combined one), its images and labels where they are."""
    spec = yaml.safe_load(Path(data).read_text())
    spec.update(path=str(Path(data).parent.resolve()), names=names)
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def score(weights: Path, data: Path, project: Path) -> float:
    from ultralytics import YOLO

    r = YOLO(str(weights)).val(
        data=str(data), imgsz=SCHEDULE["imgsz"], batch=16, device="cpu", plots=False, project=str(project),
        name="val", exist_ok=True, verbose=False,
    )  # fmt: skip
    return float(r.box.map)


def run(method: str, seed: int, root: Path, lr: str | float = "auto", base_name: str = DEMO) -> dict:
    from ultralytics import YOLO

    from lora_yolo.checkpoint import load_model
    from lora_yolo.classes import FOLDER, combined_names, prepare_dataset
    from lora_yolo.datacheck import check_dataset
    from lora_yolo.presets import ADD_CLASSES_PRESET, resolve_config
    from lora_yolo.synth import make_dataset
    from lora_yolo.train import train

    base = fetch_base(base_name)
    new = mixed_datasets(root) if base_name == DEMO else datasets(root, "new-classes", 64)
    demo = base_name == DEMO  # only the demo base's own classes (domain A) can be rendered and scored
    base_names = load_model(base).names
    combined = combined_names(base_names, yaml.safe_load(Path(new["data"]).read_text())["names"])
    project = root / f"{base_name}-{method}-{seed}-{lr}"
    optimizer = {"optimizer": "auto"} if lr == "auto" else {"optimizer": "AdamW", "lr0": float(lr)}
    common = dict(**SCHEDULE, **optimizer, nbs=SCHEDULE["batch"], seed=seed, device="cpu", workers=2,
                  plots=False, project=str(project), name="run", exist_ok=True)  # fmt: skip
    pseudo = val = None
    if method in ("exact", "adapted", "lora-new"):
        # what the CLI trains for --add-classes without --config; lora-new: the same adapter recipe, new classes alone
        extra = {"add_classes": method} if method != "lora-new" else {}
        config, _ = resolve_config(None if extra else ADD_CLASSES_PRESET, **extra)
        result = train(new["data"], model=base, config=config, **common)
        weights, pseudo = result.merged, result.pseudo_labels
        val = result.metrics["mAP50-95"]  # merged.pt on the new classes' validation split: what lr is chosen on
    else:
        data = new["data"]
        if method == "full-pseudo":  # the same relabelled, pseudo-labelled data as adapted
            data = prepare_dataset(check_dataset(new["data"]), base, base_names, project / FOLDER, 0.25, "detect")[0]
        model = YOLO(str(base))
        model.train(data=str(data), **common)
        weights = Path(model.trainer.best)
    names = load_model(weights).names
    keeps_a = names == combined
    new_test = new["test"]
    if keeps_a:  # the new classes' test labels under the combined ids; A's test with the combined class list
        both = yaml.safe_load(Path(new["test"]).read_text())
        both.update(path=str(Path(new["test"]).parent.resolve()), train=both["val"])  # relabels both splits
        (project / "test-both.yaml").write_text(yaml.safe_dump(both, sort_keys=False))
        both = check_dataset(project / "test-both.yaml")
        new_test = prepare_dataset(both, base, base_names, project / "new-test", None, "detect")[0]
    a_scores = {"a_val": None, "a_test": None}
    if demo:
        for split, split_seed, n in (("a_val", A_VAL_SEED, N_VAL), ("a_test", 8, N_TEST)):
            a = make_dataset(root / split, "A", 0, n, SCHEDULE["imgsz"], seed=split_seed)
            a_scores[split] = (
                score(weights, with_names(a, combined, project / f"{split}.yaml"), project) if keeps_a else 0.0
            )
    return {
        "base": base_name,
        "method": method,
        "seed": seed,
        "lr": lr,
        "new_val": val,
        **a_scores,
        "new_test": score(weights, Path(new_test), project),
        "pseudo_labels": pseudo,
    }


def inference_cost() -> list[str]:
    """Markdown rows: what add_classes' class branches cost at inference, served (base branch + copy) and merged
    (one widened plain branch), for the demo base with its 4 new classes and for 80-class YOLO11n / YOLOv8n / YOLO26n
    models (random weights: the cost does not depend on them) with 4 more."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import get_flops

    from lora_yolo.branch import add_class_branches, widen_branches
    from lora_yolo.checkpoint import build_for_classes, load_model

    bases = {"demo base (yolo11n, 3 classes)": load_model(fetch_base("demo-11n"))}
    for cfg in ("yolo11n", "yolov8n", "yolo26n"):
        bases[f"{cfg}, 80 classes"] = DetectionModel(f"{cfg}.yaml", nc=80, verbose=False)
    rows = []
    for label, base in bases.items():
        names = {**base.names, **{len(base.names) + i: f"new{i}" for i in range(4)}}
        served = build_for_classes(base, len(names), names)
        add_class_branches(served, base, 4)
        merged = widen_branches(deepcopy(served))
        b, s, m = (get_flops(deepcopy(x).fuse(verbose=False), 640) for x in (base, served, merged))
        rows.append(f"| {label} | {b:.2f} | {s:.2f} (+{s / b - 1:.0%}) | {m:.2f} (+{m / b - 1:.0%}) |")
    return rows


def lr_choices(runs: list[dict], base_a_val: float) -> list[str]:
    """Which lr seed 0's validation scores pick: exact mode by the new classes' mAP50-95 (A is the base's by
    construction); adapted mode by the worse of its two ratios, A against the base and the new classes against
    lora-new, the goals' own terms."""
    ref = next((r["new_val"] for r in runs if (r["method"], r["seed"], r.get("lr")) == ("lora-new", 0, "auto")), None)
    criteria = {
        "exact": lambda r: r["new_val"],
        "adapted": lambda r: min(r["a_val"] / base_a_val, r["new_val"] / ref) if ref else None,
    }
    lines = []
    for method, criterion in criteria.items():
        scored = {
            r["lr"]: criterion(r)
            for r in runs
            if r["method"] == method and r["seed"] == 0 and r.get("new_val") is not None and r.get("a_val")
        }
        scored = {lr: v for lr, v in scored.items() if v is not None}
        if scored:
            best = max(scored, key=scored.get)
            each = ", ".join(f"{lr} {v:.4f}" for lr, v in sorted(scored.items()))
            lines.append(f"- {method}: validation picks lr {best} ({each})")
    return ["Learning rates as seed 0's validation scores rank them:", "", *lines] if lines else []


def real_base_rows(runs: list[dict]) -> tuple[list[str], dict]:
    """Markdown lines and JSON rows of the real bases' runs: the new classes' test mAP50-95 against bench_finetune's
    run of the dora_r32 recipe on the same images and seeds (the new-class-only adapter)."""
    reference = {
        (r["base"], r["seed"]): r["test"]
        for r in load_runs(EXPLORATION)
        if (r["task"], r["n_train"], r["method"], str(r["lr"])) == ("new-classes", 64, *REFERENCE) and "test" in r
    }
    lines, rows = [], {}
    for base in [b for b in BASES if b != DEMO]:
        mine = [r for r in runs if r.get("base") == base]
        for m, lr in sorted({(r["method"], str(r["lr"])) for r in mine}):
            these = [r for r in mine if (r["method"], str(r["lr"])) == (m, lr)]
            seeds = sorted(r["seed"] for r in these)
            ref = [reference.get((base, seed)) for seed in seeds]
            test, spread = mean_spread([r["new_test"] for r in these])
            ratio = test / statistics.mean(ref) if None not in ref else None
            rows[f"{base} {m} @ {lr}"] = dict(
                base=base,
                method=m,
                lr=lr,
                seeds=seeds,
                new_test=test,
                new_spread=spread,
                reference_test=ref,
                vs_reference=ratio,
            )
            pseudo = these[0]["pseudo_labels"]
            lines.append(
                f"| {base} | {m} @ {lr} | {','.join(map(str, seeds))} | {test:.3f}±{spread:.3f} | "
                f"{'-' if ratio is None else format(ratio, '.1%')} | "
                f"{'-' if None in ref else format(statistics.mean(ref), '.3f')} | {'-' if pseudo is None else pseudo} |"
            )
    if not lines:
        return [], rows
    head = [
        "Real bases (`--base`): the fine-tuning benchmark's new-classes task (the 4 shapes alone, 64 images), scored "
        "on the new classes only; the reference is the dora_r32 recipe's new-class-only run of the same images and "
        "seeds in benchmarks/exploration/runs.jsonl. What they keep of their own classes is not measured (no images of "
        "them).",
        "",
        "| base | method | seeds | new-class test mAP50-95 | vs reference | reference | pseudo-labels |",
        "|---|---|---|---|---|---|---|",
    ]
    return head + lines, rows


def report() -> None:
    runs = [json.loads(line) for line in RUNS.read_text().splitlines()] if RUNS.is_file() else []
    real, real_rows = real_base_rows(runs)
    runs = [r for r in runs if r.get("base", DEMO) == DEMO]
    from lora_yolo.synth import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        a_test = make_dataset(Path(tmp) / "A-test", "A", 0, N_TEST, SCHEDULE["imgsz"], seed=8)
        base_a = score(fetch_base("demo-11n"), a_test, Path(tmp))
        a_val = make_dataset(Path(tmp) / "A-val", "A", 0, N_VAL, SCHEDULE["imgsz"], seed=A_VAL_SEED)
        base_a_val = score(fetch_base("demo-11n"), a_val, Path(tmp))
    rows = {}
    order = {m: i for i, m in enumerate(METHODS)}
    combos = {(r["method"], str(r.get("lr", "auto"))) for r in runs}
    for m, lr in sorted(combos, key=lambda k: (order[k[0]], k[1] != "auto", k[1])):
        mine = [r for r in runs if (r["method"], str(r.get("lr", "auto"))) == (m, lr)]
        a_test, a_spread = mean_spread([r["a_test"] for r in mine])
        new_test, new_spread = mean_spread([r["new_test"] for r in mine])
        seed0 = next((r for r in mine if r["seed"] == 0), {})  # validation: what lrs are compared on
        rows[m if lr == "auto" else f"{m} @ {lr}"] = {
            "lr": lr,
            "seeds": sorted(r["seed"] for r in mine),
            "a_test": a_test,
            "a_spread": a_spread,
            "new_test": new_test,
            "new_spread": new_spread,
            "new_val": seed0.get("new_val"),
            "a_val": seed0.get("a_val"),
            "pseudo_labels": mine[0]["pseudo_labels"],
        }
    ref_new = rows.get("lora-new", {}).get("new_test")
    lines = [
        "# Adding classes to the demo base (benchmarks/add_classes.jsonl, scripts/bench_add_classes.py)",
        "",
        f"Base zero-shot mAP50-95 on A's test images (its own 3 classes): {base_a:.3f}. Schedule: {SCHEDULE}, "
        "optimizer=auto (a row `@ lr`: AdamW at that lr0), 64 training images of scenes with A's shapes and the 4 "
        "new ones, the new ones labelled.",
        "",
        f"Base on A's validation images: {base_a_val:.3f}. "
        "Test: means over the seeds, ± half their range; validation: seed 0. Exact mode's own lr "
        "(`lora_yolo.classes.EXACT_TRAIN`, used unless an optimizer is given; adapted mode trains its copies at it "
        "too, `BRANCH_LR`) was chosen on seed 0's validation in the first version of this benchmark (benchmarks/v1); "
        "a row `adapted @ lr` sets its adapters' lr.",
        "",
        "| method | seeds | A test mAP50-95 | vs base | new-class test mAP50-95 | vs lora-new | new-class val (seed 0) "
        "| A val (seed 0) | pseudo-labels |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        vs_new = f"{100 * r['new_test'] / ref_new:.1f}%" if ref_new else "-"
        lines.append(
            f"| {m} | {','.join(map(str, r['seeds']))} | {r['a_test']:.3f}±{r['a_spread']:.3f} | "
            f"{100 * r['a_test'] / base_a:.1f}% | {r['new_test']:.3f}±{r['new_spread']:.3f} | {vs_new} | "
            f"{'-' if r['new_val'] is None else format(r['new_val'], '.3f')} | "
            f"{'-' if not r['a_val'] else format(r['a_val'], '.3f')} | "
            f"{r['pseudo_labels'] if r['pseudo_labels'] is not None else '-'} |"
        )
    lines += ["", *lr_choices(runs, base_a_val)]
    lines += ["", *real] if real else []
    lines += [
        "",
        "Inference cost of the class branches (both modes), GFLOPs of one 640x640 image (fused; Ultralytics' "
        "get_flops):",
        "",
        "| model + 4 new classes | base | served with --adapter | merged.pt |",
        "|---|---|---|---|",
        *inference_cost(),
    ]
    (OUT / "add_classes.md").write_text("\n".join(lines) + "\n")
    (OUT / "add_classes.json").write_text(
        json.dumps({"base_a_test": base_a, "base_a_val": base_a_val, "rows": rows, "real_bases": real_rows}, indent=2)
        + "\n"
    )
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default=DEMO, choices=list(BASES), help=f"real bases run {', '.join(REAL_METHODS)}")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lr", default="auto", help="auto (Ultralytics' optimizer=auto) or an AdamW lr0")
    parser.add_argument("--report", action="store_true", help="only write the report from what ran")
    args = parser.parse_args()
    if args.base != DEMO and not set(args.methods) <= set(REAL_METHODS):
        parser.error(f"a real base runs {' and '.join(REAL_METHODS)} only (its reference is bench_finetune's run)")
    if not args.report:
        runs = map(json.loads, RUNS.read_text().splitlines()) if RUNS.is_file() else []
        done = {(r.get("base", DEMO), r["method"], r["seed"], str(r.get("lr", "auto"))) for r in runs}
        with tempfile.TemporaryDirectory() as tmp:
            for method in args.methods:
                if (args.base, method, args.seed, args.lr) in done:
                    continue
                result = run(method, args.seed, Path(tmp), args.lr, args.base)
                print(json.dumps(result), flush=True)
                with open(RUNS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(result) + "\n")
    report()


if __name__ == "__main__":
    sys.exit(main())
