"""What one training step costs, per recipe, side by side: full fine-tuning, Ultralytics' `freeze` of the backbone,
head only, and LoRA recipes with and without frozen BatchNorm folded into the convs.

For each model (built from its Ultralytics YAML; weights do not change cost) and image size, one process builds every
recipe's model and measures, on the same random batch with Ultralytics' own loss:
  saved   bytes autograd keeps for backward over forward + loss (unique storages, saved_tensors_hooks): deterministic
  held    bytes allocated in forward + loss and still held after it (torch's profiler): what checkpointing changes
  step    median seconds of forward + loss + backward + AdamW step, recipes interleaved round by round
Ratios are to full fine-tuning in the same run. With `--epochs N` it instead times whole training runs, each in a
fresh process: Ultralytics' full fine-tuning and `lora-yolo train` with the default preset, in channels-last format
on the CPU (what it does) and in the standard one (`channels_last=False`), N epochs each on the demo dataset
(datasets/shapes-b1, 120 training images), rounds interleaved; epoch = wall time per epoch as Ultralytics logs it
(results.csv), median over the epochs but the first (warm-up) and the last. The runs train with `val=False`, so the
epochs timed hold no validation: what validation costs depends on how many boxes the half-trained model proposes
(NMS), not on how it was trained. It also times one pass of Ultralytics' CPU data loader alone: on the CPU the
trainer loads in the training process between steps (`workers=0`), the same seconds in every run. With `--rss` each
recipe also runs alone in a fresh process for its peak RSS (yolo11n only by default: one process per recipe). On a
CUDA device it adds `torch.cuda.max_memory_allocated` and the step time under AMP.

    python scripts/bench_cost.py                                   # yolo11n, 320 px, batch 8
    python scripts/bench_cost.py --models yolo11n yolo11s yolo11m yolo26n --imgsz 320 640 --rounds 3
    python scripts/bench_cost.py --rss --json benchmarks/cost.json
    python scripts/bench_cost.py --models yolo11n yolo26n yolo11s yolo11m --backward-macs   # counted, not timed
    python scripts/bench_cost.py --models yolo11n yolo26n --epochs 3 --rounds 3              # whole epochs

Prints a Markdown table; `--json` also writes the raw numbers (every round's times).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.data.build import build_dataloader, build_yolo_dataset  # noqa: E402
from ultralytics.data.utils import check_det_dataset  # noqa: E402

from lora_yolo import LoraConfig, load_model  # noqa: E402
from lora_yolo.fold import fold_batchnorm  # noqa: E402
from lora_yolo.inject import add_lora, set_trainable  # noqa: E402
from lora_yolo.memory import Kept, add_training_forward, pack_saved, remove_training_forward, unpack_saved  # noqa: E402
from lora_yolo.presets import resolve_config  # noqa: E402
from lora_yolo.targets import bias_tensors, head_tensors, select_targets  # noqa: E402

# recipe -> (kind, LoraConfig or None, form): kind is full | freeze | head | lora | floor; form is how a LoRA model
# trains: "plain" (BatchNorm after the adapted conv), "folded" (frozen BatchNorms folded into the convs), "lean"
# (folded, and SiLU outputs recomputed in backward: what `lora-yolo train` runs, lora_yolo.memory); "-nhwc" after a
# form: in channels-last memory format (what `lora-yolo train` runs on an x86 CPU, and Ultralytics on CUDA). "floor"
# trains the head in full and every other BatchNorm's shift, no adapter: the least any recipe that trains the head in
# full and reaches layer 0 computes (forward, input gradients down to layer 1, the head's weight gradients)
_DEFAULT_CONFIG = resolve_config("default")[0]  # the preset itself, so this measures whatever the benchmark chose
DEFAULT = f"DoRA r {_DEFAULT_CONFIG.r} + head in full (default)"
RECIPES = {
    "full fine-tuning": ("full", None, "plain"),
    "freeze backbone": ("freeze", None, "plain"),
    "head only": ("head", None, "plain"),
    "DoRA all, r 32, unfolded (before folding)": ("lora", LoraConfig(use_dora=True, r=32, lora_alpha=64), "plain"),
    "DoRA all, r 32, folded (before lean)": ("lora", LoraConfig(use_dora=True, r=32, lora_alpha=64), "folded"),
    DEFAULT: ("lora", _DEFAULT_CONFIG, "lean"),
    f"{DEFAULT}, channels-last": ("lora", _DEFAULT_CONFIG, "lean-nhwc"),
    "full fine-tuning, channels-last": ("full", None, "plain-nhwc"),
    "floor: head in full, shifts only": ("floor", None, "lean"),
    "floor: head in full, shifts only, channels-last": ("floor", None, "lean-nhwc"),
    f"{DEFAULT} from layer 4, channels-last": ("lora", replace(_DEFAULT_CONFIG, first_layer=4), "lean-nhwc"),
    f"{DEFAULT} from layer 6, channels-last": ("lora", replace(_DEFAULT_CONFIG, first_layer=6), "lean-nhwc"),
    "DoRA r 8 + head in full (previous default)": (
        "lora",
        LoraConfig(use_dora=True, r=8, lora_alpha=16, clamp_rank=True, train_head=True),
        "lean",
    ),
    "DoRA all, r 32 (previous default)": (
        "lora",
        LoraConfig(use_dora=True, r=32, lora_alpha=64, clamp_rank=True),
        "lean",
    ),
    "DoRA all, r 32, small convs frozen (before clamp_rank)": (
        "lora",
        LoraConfig(use_dora=True, r=32, lora_alpha=64),
        "lean",
    ),
    "DoRA all, r 32, gradient checkpointing": (
        "lora",
        LoraConfig(use_dora=True, r=32, lora_alpha=64, gradient_checkpointing=True),
        "lean",
    ),
    "DoRA all, r 8": ("lora", LoraConfig(use_dora=True), "lean"),
    "LoRA all, r 32": ("lora", LoraConfig(r=32, lora_alpha=64), "lean"),
    "DoRA from layer 4": ("lora", LoraConfig(use_dora=True, r=32, lora_alpha=64, first_layer=4), "lean"),
    "DoRA from layer 6": ("lora", LoraConfig(use_dora=True, r=32, lora_alpha=64, first_layer=6), "lean"),
    "DoRA neck_head": (
        "lora",
        LoraConfig(use_dora=True, r=32, lora_alpha=64, targets=["neck", "head", "attention"]),
        "lean",
    ),
}


def build(model_yaml: str, recipe: str, device: str) -> nn.Module:
    """The model a recipe trains, in training mode: trainable tensors require grad, frozen BatchNorms in eval."""
    kind, config, form = RECIPES[recipe]
    torch.manual_seed(0)
    model = load_model(model_yaml)
    model.args = get_cfg()  # Ultralytics' default hyper-parameters, which its loss reads
    n_backbone, last = len(model.yaml["backbone"]), len(model.model) - 1
    if kind == "lora":
        head = set(head_tensors(model)) if config.train_head else set()  # its BatchNorms train: not folded
        plan = select_targets(model, config)
        shifts = set(bias_tensors(dict(model.named_modules()), plan)) if config.train_bias else set()
        add_lora(model, plan, config.lora_dropout, config.use_rslora, config.use_dora)
        set_trainable(model, {n for n, _ in model.named_parameters() if ".lora_" in n or n in head | shifts})
        if not form.startswith("plain"):
            fold_batchnorm(model, skip=[model.model[last]] if head else [])
        if form.startswith("lean"):
            add_training_forward(model, config.gradient_checkpointing)
    elif kind == "floor":
        head = set(head_tensors(model))
        shifts = {n for n, _ in model.named_parameters() if n.endswith(".bn.bias") and n not in head}
        set_trainable(model, head | shifts)
        fold_batchnorm(model, skip=[model.model[last]])
        add_training_forward(model)
    elif kind in ("freeze", "head"):  # Ultralytics' freeze: requires_grad off for the layers before `first`
        first = n_backbone if kind == "freeze" else last
        set_trainable(model, {n for n, _ in model.named_parameters() if int(n.split(".")[1]) >= first})
    model.to(device).train()
    if form.endswith("-nhwc"):
        model.to(memory_format=torch.channels_last)
    for m in model.modules():  # as Ultralytics' _model_train (and LoRA's) do: frozen BatchNorms in eval mode
        if isinstance(m, nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    return model


def batch(size: int, imgsz: int, device: str, nc: int = 80) -> dict:
    """A fixed random batch: images and 4 boxes per image, as Ultralytics' dataloader hands them to the loss."""
    g = torch.Generator().manual_seed(0)
    n = 4 * size
    xy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return {
        "img": torch.rand(size, 3, imgsz, imgsz, generator=g).to(device),
        "batch_idx": torch.arange(size).repeat_interleave(4).float().to(device),
        "cls": torch.randint(0, nc, (n, 1), generator=g).float().to(device),
        "bboxes": torch.cat([xy, wh], 1).to(device),
    }


def saved_bytes(model: nn.Module, data: dict, lean: bool) -> int:
    """Unique storages autograd keeps over forward + loss. A lean model's layers pack their saved tensors in their
    own (innermost) hooks, which would hide them from ours: its wrappers come off for the count and its packing runs
    inside ours (`lean`), so what is counted is what is kept (a SiLU output counts as the input it is kept as). A
    checkpointed model's recomputed layers keep their inputs outside autograd: see `held_bytes`."""
    seen = {}
    if lean:
        remove_training_forward(model)

    def pack(t: torch.Tensor) -> object:
        packed = pack_saved(t) if lean else Kept(t, t._version)
        storage = packed[0].untyped_storage()  # the tensor kept: the saved one, or the SiLU input
        seen[storage.data_ptr()] = storage.nbytes()
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack_saved):
        loss, _ = model.loss(data)
    del loss
    if lean:
        add_training_forward(model)
    return sum(seen.values())


def is_lean(recipe: str) -> bool:
    """Whether a recipe's layers store SiLU outputs as their inputs (lean and not checkpointed)."""
    _, config, form = RECIPES[recipe]
    return form.startswith("lean") and not (config and config.gradient_checkpointing)


def held_bytes(model: nn.Module, data: dict) -> int:
    """Bytes allocated during forward + loss and still held when it returns: what backward needs, including the
    layer inputs that gradient checkpointing keeps outside autograd's saved tensors (torch's profiler, on CPU too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = model.loss(data)
    del loss
    return sum(e.self_cpu_memory_usage for e in prof.key_averages())


def step_seconds(model: nn.Module, optimizer: torch.optim.Optimizer, data: dict, amp: bool = False) -> float:
    sync = torch.cuda.synchronize if data["img"].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.autocast("cuda", enabled=amp):
        loss, _ = model.loss(data)
    loss.sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def measure(model_yaml: str, imgsz: int, size: int, rounds: int, steps: int, device: str) -> dict:
    """Every recipe on one model and size, interleaved: per recipe its saved bytes and all step times (none when
    `rounds` is 0)."""
    data = batch(size, imgsz, device)
    out = {}
    for r in RECIPES:  # one model at a time: a 640 px graph of a larger model takes several GB
        model = build(model_yaml, r, device)
        out[r] = {
            "saved": saved_bytes(model, data, is_lean(r)),
            "held": held_bytes(model, data),
            "steps": [],
            "amp_steps": [],
        }
        del model
    if not rounds:
        return out
    models = {r: build(model_yaml, r, device) for r in RECIPES}
    optimizers = {
        r: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for r, m in models.items()
    }
    for r in RECIPES:  # one warm-up step each
        step_seconds(models[r], optimizers[r], data)
    order = list(RECIPES)
    for i in range(rounds):
        for r in order[i % len(order) :] + order[: i % len(order)]:  # a different recipe goes first each round
            out[r]["steps"] += [step_seconds(models[r], optimizers[r], data) for _ in range(steps)]
            if device == "cuda":
                out[r]["amp_steps"] += [step_seconds(models[r], optimizers[r], data, amp=True) for _ in range(steps)]
    if device == "cuda":
        for r, m in models.items():
            torch.cuda.reset_peak_memory_stats()
            step_seconds(m, optimizers[r], data, amp=True)
            out[r]["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


def peak_rss(model_yaml: str, imgsz: int, size: int, recipe: str) -> int:
    """Peak RSS (bytes) of a fresh process that builds one recipe and takes three steps.

    Read from /proc's VmHWM: getrusage's ru_maxrss survives exec on Linux, so a child would report this process's
    peak.
    """
    code = (
        "import sys; sys.path.insert(0, 'scripts'); import bench_cost as b; import torch;"
        f"m = b.build({model_yaml!r}, {recipe!r}, 'cpu'); d = b.batch({size}, {imgsz}, 'cpu');"
        "o = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4);"
        "[b.step_seconds(m, o, d) for _ in range(3)];"
        "print(next(int(x.split()[1]) * 1024 for x in open('/proc/self/status') if x.startswith('VmHWM')))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def backward_macs(model_yaml: str, imgsz: int) -> tuple[float, float, float]:
    """Conv multiply-adds of one training step of the default recipe, today and with a low-rank adapter backward,
    and the floor of any recipe that trains the head in full and adapts layers from layer 0 (adapter gradients
    free: forward, input gradients and the head's weight gradients), each as a ratio to full fine-tuning's, for one
    image (the ratios do not depend on the batch).

    Every conv costs C in forward and C for its input gradient (counted for every conv but the first: the image
    needs none; YOLO26's one-to-one branch, whose input is detached, is counted too, a 0.1% overstatement). Full
    fine-tuning also computes every weight gradient (C). The default computes the full weight gradient G of each
    adapted conv and projects it onto A and B (C), and each head conv's (C, train_head); other grouped convs are
    frozen (no weight gradient). A low-rank backward
    would skip G: with z = conv(x, A) (C r / out), grad B = c dy z^T (C r / fan_in, fan_in = in kh kw), B^T dy
    (C r / fan_in) and grad A = c conv_weight(x, B^T dy) (C r / out); counted where that is cheaper than C.
    """
    model = load_model(model_yaml)
    config, _ = resolve_config("default")
    plan = select_targets(model, config)
    in_full = {n.removesuffix(".weight") for n in head_tensors(model)} if config.train_head else set()  # head convs
    macs: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: macs.__setitem__(name, o.numel() * m.weight[0].numel()))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, imgsz, imgsz))
    for hook in hooks:
        hook.remove()
    full = today = low = floor = 0.0
    for i, (name, c) in enumerate(macs.items()):
        conv = model.get_submodule(name)
        passes = c + (c if i else 0)  # forward and input gradient
        full += passes + c
        floor += passes + (c if name in in_full else 0)
        weight = c if name in plan or name in in_full else 0
        r = plan[name][0] if name in plan else 0
        today += passes + weight
        if name in plan:
            low += passes + min(c, 2 * c * r / conv.weight[0].numel() + 2 * c * r / conv.out_channels)
        else:  # frozen, or trained in full
            low += passes + weight
    return today / full, low / full, floor / full


# epoch mode: name -> (kind, channels_last); the LoRA runs use the default preset (its optimizer, AdamW, for all)
EPOCH_RUNS = {
    "full fine-tuning": ("full", None),
    "default (channels-last on the CPU)": ("lora", None),
    "default, standard format": ("lora", False),
}
DEMO_DATA = Path(__file__).resolve().parents[1] / "datasets" / "shapes-b1" / "data.yaml"


def epoch_seconds(model_yaml: str, imgsz: int, size: int, epochs: int, run: str, out: Path) -> list[float]:
    """Per-epoch wall times (results.csv) of one training run in a fresh process."""
    kind, channels_last = EPOCH_RUNS[run]
    args = dict(
        data=str(DEMO_DATA), epochs=epochs, imgsz=imgsz, batch=size, nbs=size, device="cpu", workers=2, seed=0,
        optimizer="AdamW", lr0=1e-3, val=False, plots=False, project=str(out), name="run", exist_ok=True,
    )  # fmt: skip
    if kind == "full":
        code = f"from ultralytics import YOLO; YOLO({model_yaml!r}).train(**{args!r})"
    else:
        code = (
            "from lora_yolo.presets import resolve_config; from lora_yolo.train import train;"
            f"train(model={model_yaml!r}, config=resolve_config('default')[0], channels_last={channels_last!r},"
            f"**{args!r})"
        )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{run} on {model_yaml} failed:\n{done.stderr[-3000:]}")
    with open(out / "run" / "results.csv", encoding="utf-8") as f:
        times = [float(row["time"]) for row in csv.DictReader(f)]
    return [b - a for a, b in zip([0.0, *times], times)]


def loader_seconds(imgsz: int, size: int, passes: int) -> list[float]:
    """Seconds per pass over the demo training set through Ultralytics' training loader as its trainer runs it on
    the CPU: `workers=0` (the trainer sets it there), so images are loaded and augmented in the training process,
    between steps, the same work for every run. Augmentation as in the timed runs (mosaic on: they stop before
    `close_mosaic`)."""
    cfg = get_cfg(overrides={"data": str(DEMO_DATA), "imgsz": imgsz, "batch": size, "seed": 0})
    data = check_det_dataset(str(DEMO_DATA))
    loader = build_dataloader(build_yolo_dataset(cfg, data["train"], size, data), size, workers=0, shuffle=True)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for _ in loader:
            pass
        times.append(time.perf_counter() - start)
    return times


def measure_epochs(model_yaml: str, imgsz: int, size: int, epochs: int, rounds: int) -> dict:
    """Every run of `EPOCH_RUNS`, rounds interleaved (a different one first each round): per run the median epoch
    time of each round, the first epoch and the last (validated) left out."""
    out: dict[str, list[float]] = {r: [] for r in EPOCH_RUNS}
    order = list(EPOCH_RUNS)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for r in order[i % len(order) :] + order[: i % len(order)]:
                times = epoch_seconds(model_yaml, imgsz, size, epochs, r, Path(tmp) / f"{i}-{order.index(r)}")
                out[r].append(statistics.median(times[1:-1]))
    return out


def epoch_table(results: list[dict]) -> str:
    rows = ["| model | px | run | epoch s (median of rounds) | vs full fine-tuning (median, rounds' min-max) |"]
    rows.append("| --- | --- | --- | --- | --- |")
    for res in results:
        full = res["runs"]["full fine-tuning"]
        for run, times in res["runs"].items():
            ratios = [t / f for t, f in zip(times, full)]
            rows.append(
                f"| {res['model']} | {res['imgsz']} | {run} | {statistics.median(times):.2f} | "
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
            )
    return "\n".join(rows)


def table(results: list[dict]) -> str:
    rows = [
        "| model | px | recipe | saved bytes vs full | held for backward vs full | step vs full (median, rounds' "
        "min-max) | peak RSS vs full |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        full = res["recipes"]["full fine-tuning"]
        for recipe, r in res["recipes"].items():
            step = "-"
            if r["steps"]:
                n = len(r["steps"]) // res["rounds"]  # steps per round
                per_round = [
                    statistics.median(r["steps"][i * n : (i + 1) * n])
                    / statistics.median(full["steps"][i * n : (i + 1) * n])
                    for i in range(res["rounds"])
                ]
                median = statistics.median(r["steps"]) / statistics.median(full["steps"])
                step = f"{median:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"
            rss = f"{r['rss'] / full['rss']:.2f}x" if "rss" in r else "-"
            rows.append(
                f"| {res['model']} | {res['imgsz']} | {recipe} | {r['saved'] / full['saved']:.2f}x | "
                f"{r['held'] / full['held']:.2f}x | {step} | {rss} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["yolo11n"])
    parser.add_argument("--imgsz", nargs="+", type=int, default=[320])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all recipes; 0: bytes only")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per recipe per round")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), help="a subset (full fine-tuning always)")
    parser.add_argument("--rss", action="store_true", help="also peak RSS, one fresh process per recipe")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--backward-macs", action="store_true", help="only count conv MACs of the default's step")
    parser.add_argument("--epochs", type=int, help="time whole training runs of this many epochs instead of steps")
    args = parser.parse_args()
    if args.epochs:
        if args.epochs < 3:
            parser.error("--epochs needs at least 3: the first and the last are not timed")
        if args.rss or args.recipes or args.backward_macs:
            parser.error("--epochs times its own runs (EPOCH_RUNS): --rss, --recipes and --backward-macs are per step")
        results = []
        for model in args.models:
            for imgsz in args.imgsz:
                runs = measure_epochs(f"{model}.yaml", imgsz, args.batch, args.epochs, max(args.rounds, 1))
                loader = loader_seconds(imgsz, args.batch, args.epochs)
                results.append({"model": model, "imgsz": imgsz, "batch": args.batch, "runs": runs, "loader": loader})
                print(f"{model} {imgsz} px done", file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"epochs": args.epochs, "results": results}, indent=1))
        print(f"CPU, batch {args.batch}, {args.epochs} epochs per run, torch {torch.__version__}")
        print(epoch_table(results))
        for res in results:
            print(
                f"{res['model']} {res['imgsz']} px: loading the epoch's data (Ultralytics' CPU loader, in the "
                f"training process) takes {statistics.median(res['loader']):.2f} s of it, the same in every run"
            )
        return
    if args.backward_macs:
        print("| model | px | default today / full FT | with a low-rank adapter backward | floor, adapters free |")
        print("|---|---|---|---|---|")
        for model in args.models:
            for imgsz in args.imgsz:
                today, low, floor = backward_macs(f"{model}.yaml", imgsz)
                print(f"| {model} | {imgsz} | {today:.3f}x | {low:.3f}x | {floor:.3f}x |")
        return
    if args.recipes:  # the others leave the table; ratios stay to full fine-tuning
        for name in [r for r in RECIPES if r != "full fine-tuning" and r not in args.recipes]:
            del RECIPES[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    results = []
    for model in args.models:
        for imgsz in args.imgsz:
            start = time.perf_counter()
            recipes = measure(f"{model}.yaml", imgsz, args.batch, args.rounds, args.steps, device)
            if args.rss:
                for recipe in RECIPES:
                    recipes[recipe]["rss"] = peak_rss(f"{model}.yaml", imgsz, args.batch, recipe)
            results.append(
                {"model": model, "imgsz": imgsz, "batch": args.batch, "rounds": args.rounds, "recipes": recipes}
            )
            print(f"{model} {imgsz} px: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            if args.json:  # after every model and size, so a long run that is stopped keeps what it measured
                args.json.write_text(json.dumps({"device": device, "results": results}, indent=1))
    print(f"device {device}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps, torch {torch.__version__}")
    print(table(results))
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
