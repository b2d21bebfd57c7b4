"""Fuzz both adapter loaders with structure-aware mutations: every crafted file must load or fail with one line.

A case takes a good adapter (random, for a yolo11n base built from its YAML), applies 1-3 mutations that know the
format (metadata keys, JSON shapes nested thousands deep, ranks 0 / negative / huge, alphas NaN / Inf, layer names
pointing at BatchNorms, depthwise convs, containers or nothing, `full` entries naming missing modules or buffers,
tensors dropped, emptied, reshaped or retyped, nc and names that disagree, add_classes adapters with LoRA where it
may not be or class-branch copies that do not fit, PEFT configs of the wrong type, bad regex patterns, empty PEFT
adapters, raw header bytes), writes it, and runs the loader and then the attach to the base:
  adapter  `load_adapter(file)` then `attach_adapter(base, adapter)`
  peft     `from_peft(folder, base)` then `attach_adapter(base, adapter)`
The outcome must be success or `LoraYoloError`; anything else is a crash, a case over `--hang` seconds is a hang.

    python scripts/fuzz_adapters.py --cases 10000            # both loaders, ~half each
    python scripts/fuzz_adapters.py --cases 200 --seed 7 --loader peft

Prints cases, crashes (with the first few tracebacks), hangs, outcomes per mutation and peak memory (RSS).
tests/test_untrusted.py runs a few hundred of the same cases.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from ultralytics.utils import LOGGER

from lora_yolo import LoraYoloError, attach_adapter, load_model, save_adapter
from lora_yolo.adapter import Adapter, extract_adapter, fingerprint, load_adapter, read_safetensors
from lora_yolo.branch import add_classes_layers
from lora_yolo.checkpoint import build_for_classes, save_checkpoint
from lora_yolo.config import LoraConfig
from lora_yolo.inject import add_lora
from lora_yolo.layer import LoraConv2d
from lora_yolo.peft_format import CONFIG, PREFIX, WEIGHTS, from_peft, to_peft
from lora_yolo.targets import class_layers, head_tensors, select_targets


@dataclass
class Case:
    """One crafted adapter in its parts: tensors, metadata (string values), and for PEFT the config dict."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    config: object = None  # PEFT's adapter_config.json content (any JSON value)
    raw_header: bytes | None = None  # replaces the whole safetensors header when set
    ours: bool = True  # PEFT only: the folder carries our metadata (written by to_peft), else PEFT-made
    mutations: list[str] = field(default_factory=list)


@dataclass
class Context:
    """What mutations may aim at: every module name of the base, its class convs (name -> in channels), and the
    tensors and metadata of a good add_classes adapter and of a good train_head adapter."""

    names: list[str]
    classes: dict[str, int]
    added: tuple[dict[str, torch.Tensor], dict[str, str]]
    headed: tuple[dict[str, torch.Tensor], dict[str, str]]  # a good train_head adapter's


def make_base(path: Path) -> Path:
    """yolo11n from its YAML, 80 classes, fixed seed: no download."""
    torch.manual_seed(0)
    model = load_model("yolo11n.yaml")
    model.half().float()
    return save_checkpoint(model, path, train_args={})


def good_adapter(base: Path, dora: bool = True) -> Adapter:
    """A DoRA adapter on the neck and head, B random, for the base's own classes (so a case that loads attaches in
    a quarter of a second: a new class set rebuilds the model with a forward pass, ten times slower)."""
    torch.manual_seed(1)
    model = load_model(base)
    fp = fingerprint(model)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=dora, targets=["neck", "head"])
    add_lora(model, select_targets(model, config), use_dora=dora)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraConv2d):
                m.lora_B.weight.normal_(0, 0.02)
    return extract_adapter(model, config, fp, full=[])


def good_classes_adapter(base: Path) -> Adapter:
    """An add_classes=adapted adapter for the base's classes + 2 new ones: DoRA on the neck and head outside the class
    branches, B random, and a copy of each class branch with every tensor moved, as if trained."""
    torch.manual_seed(2)
    plain = load_model(base)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, targets=["neck", "head"], add_classes="adapted")
    model = build_for_classes(plain, 82, {**plain.names, 80: "new0", 81: "new1"})
    plan, full = add_classes_layers(model, plain, config)
    add_lora(model, plan, use_dora=True)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(".lora_B.weight") or (name in full and "running_var" not in name):
                t.add_(torch.randn_like(t) * 0.02)
    return extract_adapter(model, config, fingerprint(plain), full=full)


def good_head_adapter(base: Path) -> Adapter:
    """A train_head adapter for the base's classes: DoRA on the neck, B random, and every head tensor (BatchNorm
    statistics included, variances kept positive) moved, as if trained."""
    torch.manual_seed(3)
    model = load_model(base)
    fp = fingerprint(model)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, targets=["neck"], train_head=True)
    full = head_tensors(model)
    add_lora(model, select_targets(model, config), use_dora=True)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(".lora_B.weight") or (name in full and "running_var" not in name):
                t.add_(torch.randn_like(t) * 0.02)
    return extract_adapter(model, config, fp, full=full)


# JSON values of the wrong shape: what a hostile or damaged metadata field may hold.
def junk(rng: random.Random) -> object:
    depth = rng.choice([1, 3, 50_000])
    return rng.choice(
        [
            None,
            True,
            0,
            -1,
            2**70,
            1e308,
            float("nan"),
            float("inf"),
            "x",
            "",
            [],
            {},
            [1, 2],
            {"a": 1},
            "[" * depth,
            json.loads("[" * min(depth, 50) + "]" * min(depth, 50)),
        ]
    )


def dumps(value: object) -> str:
    """JSON text of `value`; a string starting with '[' stays raw (deeply nested, unterminated JSON)."""
    if isinstance(value, str) and value.startswith("["):
        return value
    return json.dumps(value)


def m_meta_key(case: Case, rng: random.Random, ctx: Context) -> None:
    key = rng.choice(list(case.meta) or ["layers"])
    if rng.random() < 0.3:
        case.meta.pop(key, None)
    else:
        case.meta[key] = rng.choice([dumps(junk(rng)), "{bad json", "\x00", ""])


def m_layer_rank_alpha(case: Case, rng: random.Random, ctx: Context) -> None:
    layers = json.loads(case.meta["layers"])
    layer = rng.choice(list(layers))
    slot = rng.randrange(2)
    layers[layer][slot] = rng.choice([0, -1, 10**9, 2.5, True, "8", None, float("nan"), float("inf"), -0.0])
    if slot == 0 and layers[layer][0] == 0:  # rank 0 with empty tensors, consistently
        a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        case.tensors[a] = torch.empty(0, *case.tensors[a].shape[1:])
        case.tensors[b] = torch.empty(case.tensors[b].shape[0], 0, 1, 1)
    case.meta["layers"] = json.dumps(layers)


def m_layer_name(case: Case, rng: random.Random, ctx: Context) -> None:
    """Point a layer (metadata and tensor names together) at another module: a BN, a depthwise conv, DFL, a
    container, a parameter name, or nothing."""
    layers = json.loads(case.meta["layers"])
    old = rng.choice(list(layers))
    new = rng.choice(
        ctx.names + ["model.99.conv", "", ".", "model", "model.0.bn.weight", "a" * 40 + "b", "model.23.dfl.conv"]
    )
    layers[new] = layers.pop(old)
    case.meta["layers"] = json.dumps(layers)
    for key in [k for k in case.tensors if k.startswith(old + ".lora_")]:
        case.tensors[new + key[len(old) :]] = case.tensors.pop(key)


def m_full(case: Case, rng: random.Random, ctx: Context) -> None:
    full = json.loads(case.meta["full"])
    choice = rng.randrange(4)
    if choice == 0 and full:  # drop one (tensor and name)
        case.tensors.pop(full.pop(rng.randrange(len(full))), None)
    else:
        target = rng.choice(ctx.names)
        name = rng.choice([f"{target}.weight", f"{target}.bias", f"{target}.running_mean", "model.99.x.weight", "w"])
        full.append(name)
        case.tensors[name] = torch.randn(rng.choice([(3,), (3, 16, 1, 1), (80,), (1,)]))
    case.meta["full"] = json.dumps(full)


def m_tensor(case: Case, rng: random.Random, ctx: Context) -> None:
    key = rng.choice(list(case.tensors))
    t = case.tensors[key]
    op = rng.randrange(7)
    if op == 0:
        del case.tensors[key]
    elif op == 6:
        case.tensors[key] = t[:0]  # no rows, same number of dimensions: a rank-0 A, or nc=0 class rows
    elif op == 1:
        case.tensors[key] = torch.empty(0)
    elif op == 2:
        case.tensors[key] = torch.tensor(1.0)  # a scalar
    elif op == 3:
        case.tensors[key] = t.flatten()[: max(1, t.numel() // 2)].clone()
    elif op == 4:
        case.tensors[key] = t.to(rng.choice([torch.int32, torch.bool, torch.float64, torch.bfloat16]))
    else:
        case.tensors[key] = t.clone().fill_(rng.choice([float("nan"), float("inf"), 1e30]))


def m_classes(case: Case, rng: random.Random, ctx: Context) -> None:
    nc = rng.choice([0, -3, 2, 3, 4, 80, 10**6, 10**10])
    labels = rng.choice([{str(i): f"c{i}" for i in range(3)}, {"0": "a"}, {"0": 1, "1": 2, "2": 3}, {"x": "a"}, {}])
    if rng.random() < 0.5:
        case.meta["nc"] = json.dumps(nc)
    else:
        case.meta["names"] = json.dumps(labels)


def m_class_set(case: Case, rng: random.Random, ctx: Context) -> None:
    """Turn the adapter into one for 3 new classes, consistently (class convs in full), then maybe break it the way
    a file can: LoRA also on a class conv, a class conv's bias missing or of the base's 80 rows."""
    nc = 3
    case.meta["nc"], case.meta["names"] = json.dumps(nc), json.dumps({str(i): f"new{i}" for i in range(nc)})
    layers = {k: v for k, v in json.loads(case.meta["layers"]).items() if k not in ctx.classes}
    case.meta["layers"] = json.dumps(layers)  # as training does: class convs trained in full carry no LoRA
    for key in [k for k in case.tensors if k.rpartition(".lora_")[0] in ctx.classes]:
        del case.tensors[key]
    full = []
    for conv, c in ctx.classes.items():
        case.tensors[f"{conv}.weight"], case.tensors[f"{conv}.bias"] = torch.randn(nc, c, 1, 1), torch.randn(nc)
        full += [f"{conv}.weight", f"{conv}.bias"]
    op = rng.randrange(4)
    conv = rng.choice(list(ctx.classes))
    if op == 1:  # LoRA on a class conv trained in full
        layers = json.loads(case.meta["layers"])
        layers[conv] = [4, 8.0]
        case.meta["layers"] = json.dumps(layers)
        case.tensors[f"{conv}.lora_A.weight"] = torch.randn(4, ctx.classes[conv], 1, 1)
        case.tensors[f"{conv}.lora_B.weight"] = torch.randn(rng.choice([nc, 80]), 4, 1, 1)
        if "lora_magnitude_vector" in "".join(case.tensors):
            case.tensors[f"{conv}.lora_magnitude_vector"] = torch.ones(nc)
    elif op == 2:
        full.remove(f"{conv}.bias")
        del case.tensors[f"{conv}.bias"]
    elif op == 3:
        case.tensors[f"{conv}.bias"] = torch.randn(80)
    case.meta["full"] = json.dumps(full)


# How `add_classes_case` breaks the good add_classes adapter (0: it does not); each must be refused.
ADD_CLASSES_BREAKS = (
    "none",
    "exact mode with LoRA layers",
    "a LoRA layer inside a class branch",
    "a copy's tensor missing",
    "a negative variance",
    "classes not led by the base's",
    "a copy's class conv with the wrong rows",
)


def add_classes_case(case: Case, ctx: Context, op: int, rng: random.Random) -> None:
    """Make the case the good add_classes adapter, broken as `ADD_CLASSES_BREAKS[op]` says."""
    tensors, meta = ctx.added
    case.tensors, case.meta = dict(tensors), dict(meta)
    copies = json.loads(meta["full"])
    if op == 1:
        config = json.loads(meta["lora_config"])
        case.meta["lora_config"] = json.dumps({**config, "add_classes": "exact"})
    elif op == 2:  # LoRA on a class conv: inside its branch
        conv = rng.choice(list(ctx.classes))
        layers = {**json.loads(meta["layers"]), conv: [4, 8.0]}
        case.meta["layers"] = json.dumps(layers)
        case.tensors[f"{conv}.lora_A.weight"] = torch.randn(4, ctx.classes[conv], 1, 1)
        case.tensors[f"{conv}.lora_B.weight"] = torch.randn(80, 4, 1, 1)
        case.tensors[f"{conv}.lora_magnitude_vector"] = torch.ones(80)
    elif op == 3:
        key = copies.pop(rng.randrange(len(copies)))
        del case.tensors[key]
        case.meta["full"] = json.dumps(copies)
    elif op == 4:
        key = rng.choice([k for k in copies if k.endswith(".running_var")])
        case.tensors[key] = -case.tensors[key] - 1
    elif op == 5:
        case.meta["names"] = json.dumps({**json.loads(meta["names"]), "0": "other"})
    elif op == 6:
        key = rng.choice([k for k in copies if k.endswith(".new.2.weight")])
        case.tensors[key] = case.tensors[key][:1]


# How `train_head_case` breaks the good train_head adapter (0: it does not); each must be refused.
TRAIN_HEAD_BREAKS = (
    "none",
    "a negative variance",
    "the fixed DFL projection trained",
    "a head tensor of the wrong shape",
    "head tensors without train_head",
    "a BatchNorm statistic outside the head",
    "a LoRA layer in the head",
)


def train_head_case(case: Case, ctx: Context, op: int, rng: random.Random) -> None:
    """Make the case the good train_head adapter, broken as `TRAIN_HEAD_BREAKS[op]` says."""
    tensors, meta = ctx.headed
    case.tensors, case.meta = dict(tensors), dict(meta)
    full = json.loads(meta["full"])
    extra = {
        2: ("model.23.dfl.conv.weight", torch.ones(1, 16, 1, 1)),
        5: ("model.10.cv1.bn.running_var", torch.ones(128)),
    }
    if op == 1:
        key = rng.choice([k for k in full if k.endswith(".running_var")])
        case.tensors[key] = -case.tensors[key] - 1
    elif op == 3:
        key = rng.choice([k for k in full if not k.startswith("model.23.cv3.")])  # not a class layer's rows
        case.tensors[key] = case.tensors[key].flatten()[:-1].contiguous()
    elif op == 4:
        config = json.loads(meta["lora_config"])
        case.meta["lora_config"] = json.dumps({k: v for k, v in config.items() if k != "train_head"})
    elif op == 6:  # an adapter on a head conv beside the head's tensors: serving would run the head without it
        conv = "model.23.cv2.0.0.conv"
        case.meta["layers"] = json.dumps({**json.loads(meta["layers"]), conv: [4, 8.0]})
        case.tensors[f"{conv}.lora_A.weight"] = torch.randn(4, 64, 3, 3)
        case.tensors[f"{conv}.lora_B.weight"] = torch.randn(64, 4, 1, 1)
        case.tensors[f"{conv}.lora_magnitude_vector"] = torch.ones(64)
    elif op in extra:
        key, value = extra[op]
        case.tensors[key] = value
        case.meta["full"] = json.dumps([*full, key])


def m_train_head(case: Case, rng: random.Random, ctx: Context) -> None:
    """The good train_head adapter, intact half the time, else broken one way (`TRAIN_HEAD_BREAKS`)."""
    op = rng.randrange(2 * len(TRAIN_HEAD_BREAKS) - 2)
    train_head_case(case, ctx, op if op < len(TRAIN_HEAD_BREAKS) else 0, rng)


def m_add_classes(case: Case, rng: random.Random, ctx: Context) -> None:
    """The good add_classes adapter, intact half the time, else broken one way (`ADD_CLASSES_BREAKS`)."""
    op = rng.randrange(2 * len(ADD_CLASSES_BREAKS) - 2)
    add_classes_case(case, ctx, op if op < len(ADD_CLASSES_BREAKS) else 0, rng)


def m_base(case: Case, rng: random.Random, ctx: Context) -> None:
    base = json.loads(case.meta["base"])
    key = rng.choice(["arch", "weights", "nc", "yaml", "path"])
    if rng.random() < 0.5:
        base.pop(key, None)
    else:
        base[key] = junk(rng)
    case.meta["base"] = json.dumps(base, allow_nan=True) if rng.random() < 0.9 else dumps(junk(rng))


def m_config(case: Case, rng: random.Random, ctx: Context) -> None:
    config = json.loads(case.meta["lora_config"])
    key = rng.choice(list(config) + ["bogus"])
    config[key] = rng.choice(
        [0, -1, "x", None, [], {}, ["nope"], "(", {"(": 2}, {"x": 0}, 2.0, True, float("nan"), 10**9]
    )
    case.meta["lora_config"] = json.dumps(config)


def m_raw_header(case: Case, rng: random.Random, ctx: Context) -> None:
    case.raw_header = rng.choice([b"[" * 50_000, b"{" * 40_000, b'{"a":' * 20_000, b"\xff" * 64, b"{}", b"[]"])


def m_peft_config(case: Case, rng: random.Random, ctx: Context) -> None:
    config = case.config if isinstance(case.config, dict) else {}
    op = rng.randrange(4)
    if op == 0:
        case.config = junk(rng)  # a list, a number, deep nesting...
    elif op == 1:
        config[rng.choice(["alpha_pattern", "rank_pattern"])] = rng.choice(
            [{"(": 4}, {"model\\.1": "x"}, {"model": 0}, [1], "x", {"[": 2}, {"(?i)model": 4}, {"(a|aa)+": 2}]
        )
    else:
        key = rng.choice(["r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "peft_type", "bias"])
        config[key] = rng.choice(["x", -1, 0, None, [], 1.5, True, "LORA", "all", float("nan")])


def m_peft_tensors(case: Case, rng: random.Random, ctx: Context) -> None:
    op = rng.randrange(3)
    if op == 0:  # an empty adapter
        case.tensors.clear()
    elif op == 1:  # only the class layers (no LoRA tensors)
        for key in [k for k in case.tensors if ".lora_" in k]:
            del case.tensors[key]
    else:
        case.ours = False  # a PEFT-made adapter, as far as the reader knows


ADAPTER_MUTATIONS: list[Callable] = [
    m_meta_key,
    m_layer_rank_alpha,
    m_layer_name,
    m_full,
    m_tensor,
    m_classes,
    m_class_set,
    m_add_classes,
    m_train_head,
    m_base,
    m_config,
    m_raw_header,
]
PEFT_MUTATIONS: list[Callable] = [m_peft_config, m_peft_tensors, m_tensor, m_layer_name, m_full]


def write_adapter(case: Case, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in case.tensors.items()}, str(path), metadata=case.meta)
    if case.raw_header is not None:
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        path.write_bytes(struct.pack("<Q", len(case.raw_header)) + case.raw_header + data[8 + n :])
    return path


def write_peft(case: Case, folder: Path) -> Path:
    """A PEFT folder from the case: `meta` goes under the `lora_yolo` key (to_peft's layout) unless PEFT-made."""
    folder.mkdir()
    meta = {"format": "pt", **({"lora_yolo": json.dumps(case.meta)} if case.ours else {})}
    tensors = {PREFIX + k: v.contiguous() for k, v in case.tensors.items()}
    save_file(tensors, str(folder / WEIGHTS), metadata=meta)
    (folder / CONFIG).write_text(dumps(case.config) if not isinstance(case.config, dict) else json.dumps(case.config))
    return folder


class Hang(BaseException):
    """Raised by the alarm in a case that runs past its time (BaseException: no `except Exception` swallows it)."""


def _hang(signum, frame) -> None:
    raise Hang


class Fuzzer:
    """Runs crafted cases against one base; keeps the counts."""

    def __init__(self, workdir: Path, hang: float = 5.0) -> None:
        self.workdir = workdir
        self.base_path = make_base(workdir / "base.pt")
        self.base = load_model(self.base_path)
        self.context = Context(
            names=[n for n, _ in self.base.named_modules() if n],  # every module, class convs included
            classes={n: self.base.get_submodule(n).in_channels for n in class_layers(self.base)},
            added=read_safetensors(save_adapter(good_classes_adapter(self.base_path), workdir / "added.safetensors")),
            headed=read_safetensors(save_adapter(good_head_adapter(self.base_path), workdir / "headed.safetensors")),
        )
        good = good_adapter(self.base_path)
        self.adapter_file = save_adapter(good, workdir / "good.safetensors")
        self.peft_dir = to_peft(load_adapter(self.adapter_file), workdir / "good-peft")
        self.hang = hang
        self.outcomes: Counter = Counter()
        self.crashes: list[str] = []
        self.hangs = 0
        self.cases = 0

    def make(self, rng: random.Random, loader: str) -> Case:
        tensors, meta = read_safetensors(self.adapter_file if loader == "adapter" else self.peft_dir / WEIGHTS)
        if loader == "peft":
            tensors = {k[len(PREFIX) :]: v for k, v in tensors.items()}
            inner = json.loads(meta["lora_yolo"])
            case = Case(tensors, inner, json.loads((self.peft_dir / CONFIG).read_text()))
            mutations = PEFT_MUTATIONS + ADAPTER_MUTATIONS[:-1]
        else:
            case = Case(tensors, meta)
            mutations = ADAPTER_MUTATIONS
        for _ in range(rng.choice([1, 1, 2, 3])):
            mutation = rng.choice(mutations)
            try:
                mutation(case, rng, self.context)
            except (KeyError, ValueError, IndexError, TypeError, AttributeError, RecursionError, RuntimeError):
                continue  # an earlier mutation already broke what this one edits
            case.mutations.append(mutation.__name__)
        return case

    def run(self, seed: int, loader: str) -> str:
        """One case: 'ok', 'refused' or 'crash'; counted."""
        return self.check(self.make(random.Random(seed), loader), loader, f"seed {seed}")

    def check(self, case: Case, loader: str, label: str) -> str:
        """Write `case`, load it with `loader` and attach it: 'ok', 'refused', 'hang' or 'crash'; counted."""
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            previous = signal.signal(signal.SIGALRM, _hang)
            signal.setitimer(signal.ITIMER_REAL, self.hang)  # a case that runs away is stopped and counted
            try:
                if loader == "adapter":
                    adapter = load_adapter(write_adapter(case, Path(tmp) / "x.safetensors"))
                else:
                    adapter = from_peft(write_peft(case, Path(tmp) / "peft"), self.base)
                attach_adapter(self.base, adapter)
                outcome = "ok"
            except LoraYoloError:
                outcome = "refused"
            except Hang:
                outcome = "hang"
                self.hangs += 1
                self.crashes.append(f"{label} {loader} {case.mutations}: over {self.hang:g} s")
            except Exception:
                outcome = "crash"
                self.crashes.append(f"{label} {loader} {case.mutations}\n{traceback.format_exc(limit=3)}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        self.cases += 1
        self.outcomes[(loader, outcome)] += 1
        for name in case.mutations:
            self.outcomes[(name, outcome)] += 1
        return outcome


def main() -> None:
    LOGGER.setLevel(logging.WARNING)  # model rebuilds log one line each
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loader", choices=["both", "adapter", "peft"], default="both")
    parser.add_argument("--hang", type=float, default=5.0, help="seconds after which a case counts as a hang")
    args = parser.parse_args()
    loaders = ["adapter", "peft"] if args.loader == "both" else [args.loader]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-adapters-") as tmp:
        fuzzer = Fuzzer(Path(tmp), args.hang)
        for i in range(args.cases):
            fuzzer.run(args.seed * 1_000_003 + i, loaders[i % len(loaders)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        f"cases {fuzzer.cases}, crashes {len(fuzzer.crashes)}, hangs (> {args.hang:g} s) {fuzzer.hangs}, "
        f"peak RSS {peak:.0f} MiB, {time.perf_counter() - start:.0f} s"
    )
    for loader in loaders:
        row = {o: fuzzer.outcomes[(loader, o)] for o in ("ok", "refused", "crash", "hang")}
        print(f"  {loader:8s} {row}")
    for name in sorted({k for k, _ in fuzzer.outcomes if k.startswith("m_")}):
        row = {o: n for o in ("ok", "refused", "crash", "hang") if (n := fuzzer.outcomes[(name, o)])}
        print(f"  {name:20s} {row}")
    for text in fuzzer.crashes[:5]:
        print(text)
    sys.exit(1 if fuzzer.crashes or fuzzer.hangs else 0)


if __name__ == "__main__":
    main()
