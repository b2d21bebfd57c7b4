"""Shared fixtures and helpers: tiny offline base checkpoints built from Ultralytics model YAMLs, the shared COCO8
data, the CLI in a fresh process, and the strict-skips mode CI runs under (LORA_YOLO_STRICT_SKIPS=1)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT reads adapters from local folders only

from ultralytics.utils import LOGGER as ULTRALYTICS_LOGGER  # noqa: E402
from ultralytics.utils import ROOT as ULTRALYTICS_ROOT  # noqa: E402
from ultralytics.utils import YAML  # noqa: E402

from lora_yolo.checkpoint import load_model, save_checkpoint  # noqa: E402

pytest_plugins = ["pytester"]  # tests/test_strict_skips.py runs the strict-skips mode on throwaway test files

ROOT = Path(__file__).resolve().parents[1]
COCO8 = ROOT.parent / "shared" / "datasets" / "coco8" / "coco8.yaml"
LORA_YOLO = Path(sys.executable).parent / "lora-yolo"  # the console script `pip install -e .[dev]` puts beside python
# Short CPU training runs. nbs=batch and no warmup: every batch is an optimizer step at the real learning rate, even
# in a 2-batch run.
TINY = dict(epochs=2, imgsz=64, batch=4, nbs=4, warmup_epochs=0, workers=0, plots=False, device="cpu", seed=0)


def script_module(name: str):
    """scripts/<name>.py as a module, registered in sys.modules (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(*args, cwd: Path | None = None, console_script: bool = False) -> subprocess.CompletedProcess:
    """`lora-yolo ARGS` in a fresh process (arguments go through str); stdout and stderr captured as text.

    By default it runs `python -m lora_yolo.cli` with this interpreter. With `console_script` it runs the installed
    `lora-yolo` script, as users do: Ultralytics reads argv[0], and a program whose name ends in "yolo" gets its CLI's
    defaults (predict saves annotated images, as `yolo predict` does). The script missing is a failure, not a skip:
    README's test command installs the package (`pip install -e .[dev]`), which creates it.
    """
    if console_script:
        if not LORA_YOLO.is_file():
            pytest.fail(
                f"the lora-yolo console script is not at {LORA_YOLO}: install the package first, as README's "
                "test command does (pip install -e '.[dev]')",
                pytrace=False,
            )
        command = [str(LORA_YOLO)]
    else:
        command = [sys.executable, "-m", "lora_yolo.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def cli_here(monkeypatch, capsys):
    """`lora-yolo ARGS` run in this process through the console entry point (`lora_yolo.cli.run`), returning what
    `cli` returns: no interpreter start and torch import per call (about 4 s each on 2 cores). For a command's
    arguments, errors and output; `cli` stays the check of a fresh process and of the installed script."""
    from lora_yolo.cli import run

    def call(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["lora-yolo", *map(str, args)])
        if cwd is not None:
            monkeypatch.chdir(cwd)
        # What a real process would print too: Ultralytics' log lines (its handlers hold the stream of import time,
        # stdout) and Python warnings, both into the captured streams; the handlers get their stream back after.
        handlers = [h for h in ULTRALYTICS_LOGGER.handlers if isinstance(h, logging.StreamHandler)]
        streams = [h.stream for h in handlers]
        for h in handlers:
            h.setStream(sys.stdout)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    run()
                    code = 0
                except SystemExit as e:  # how the entry point ends on every error, and typer on some successes
                    code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            for h, stream in zip(handlers, streams):
                h.setStream(stream)
        captured = capsys.readouterr()
        err = captured.err + "".join(
            warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught
        )
        return subprocess.CompletedProcess(args, code, captured.out, err)

    return call


STRICT_SKIPS = "LORA_YOLO_STRICT_SKIPS"


class StrictSkips:
    """With LORA_YOLO_STRICT_SKIPS=1 (CI sets it), a skip is a failure, so nothing CI should test goes untested.

    A test that skips (in setup, e.g. a fixture's `pytest.skip`, or in its body) is reported as failed, with the skip
    reason. A module skipped while collecting (a module-level `pytest.importorskip`) has no test to fail: it is listed
    at the end and the session's exit status is set to "tests failed". Without the variable, skips stay skips (the
    shared COCO8 or the peft extra may truly be missing on a user's machine). Expected failures (xfail) are untouched.
    """

    def __init__(self) -> None:
        self.collect_skips: list[str] = []

    @staticmethod
    def active() -> bool:
        return os.environ.get(STRICT_SKIPS) == "1"

    @staticmethod
    def reason(report) -> str:
        longrepr = report.longrepr
        return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if self.active() and report.skipped and not hasattr(report, "wasxfail"):
            message = f"{STRICT_SKIPS}=1, so a skip is a failure: {self.reason(report)}"
            failure = pytest.CallInfo.from_call(lambda: pytest.fail(message, pytrace=False), when=report.when)
            report = pytest.TestReport.from_item_and_call(item, failure)
        return report

    def pytest_collectreport(self, report) -> None:
        if self.active() and report.skipped:
            self.collect_skips.append(f"{report.nodeid}: {self.reason(report)}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session) -> None:
        if self.collect_skips and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.collect_skips:
            terminalreporter.section(f"skipped while collecting, a failure under {STRICT_SKIPS}=1", red=True)
            for line in self.collect_skips:
                terminalreporter.line(line, red=True)


def pytest_configure(config) -> None:
    config.pluginmanager.register(StrictSkips(), "lora-yolo-strict-skips")


COCO_NAMES = YAML.load(ULTRALYTICS_ROOT / "cfg" / "datasets" / "coco8.yaml")["names"]  # in the package: offline


def make_base(path: Path, cfg: str = "yolo11n.yaml", seed: int = 0) -> Path:
    """A base checkpoint built from a model YAML (random weights, fixed seed): no download needed."""
    torch.manual_seed(seed)
    model = load_model(cfg)
    if len(model.names) == len(COCO_NAMES):  # an 80-class base knows COCO's names, as a released yolo11n.pt does
        model.names = dict(COCO_NAMES)
    return save_base(model, path)


def save_base(model: torch.nn.Module, path: Path) -> Path:
    """`model` written as a base checkpoint, with BatchNorm statistics that are not the identity (so tests notice if
    anything touches or folds them wrongly) and on the fp16 grid, like every released Ultralytics checkpoint."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.half().float()
    return save_checkpoint(model, path, train_args={})


RTDETR_TINY = ROOT / "tests" / "models" / "rtdetr-tiny.yaml"  # rtdetr-l's module types, small enough for CPU tests


def rtdetr_base(path: Path, names: dict, cfg: str | Path = RTDETR_TINY) -> Path:
    """A random RT-DETR base of `cfg` with the classes `names`."""
    from ultralytics.nn.tasks import RTDETRDetectionModel

    torch.manual_seed(0)
    model = RTDETRDetectionModel(str(cfg), nc=len(names), verbose=False)
    model.names, model.args, model.task = dict(names), {}, "detect"
    return save_base(model, path)


def plain_ultralytics(code: str, cwd: Path | None = None) -> dict:
    """Run `code` in a fresh interpreter where importing lora_yolo fails (so whatever it loads must be plain
    Ultralytics) and return the JSON object it prints last."""
    blocked = 'import sys\nsys.modules["lora_yolo"] = None  # importing lora_yolo now fails\n'
    out = subprocess.run(
        [sys.executable, "-c", blocked + textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd or ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1] or "{}")


@pytest.fixture(scope="session")
def base_pt(tmp_path_factory) -> Path:
    """yolo11n with 80 classes, from yolo11n.yaml."""
    return make_base(tmp_path_factory.mktemp("base") / "yolo11n-base.pt")


@pytest.fixture(scope="session")
def coco8() -> Path:
    """The real COCO8 images beside the project (../shared); tests that need them skip when it is absent."""
    if not COCO8.is_file():
        pytest.skip(f"COCO8 not found at {COCO8} (the shared/ folder beside the project root)")
    return COCO8


def head_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Raw Detect output (boxes and class scores before NMS) in eval mode.

    Box rows come out in pixels; they are divided by the image size here so that one absolute tolerance means the
    same for boxes (a fraction of the image) and for class scores (probabilities).
    """
    model.eval()
    with torch.no_grad():
        y = model(x)
    y = (y[0] if isinstance(y, (list, tuple)) else y).clone()
    y[:, :4] /= x.shape[-1]
    return y


def all_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a model returns in eval mode, nested tuples and dicts flattened in order: the decoded output and
    every head branch's raw predictions (YOLO26: one-to-many and one-to-one; RT-DETR: every decoder layer's and the
    encoder's, its denoising metadata None in eval)."""

    def flat(out) -> list[torch.Tensor]:
        if isinstance(out, torch.Tensor):
            return [out]
        if out is None:
            return []
        return [t for item in (out.values() if isinstance(out, dict) else out) for t in flat(item)]

    model.eval()
    with torch.no_grad():
        return flat(model(x))


def image_batch(data_yaml: Path, imgsz: int, split: str = "val") -> torch.Tensor:
    """The split's images, letterboxed to imgsz as Ultralytics' predictor does, as an RGB float batch in [0, 1]."""
    import cv2
    import numpy as np
    from ultralytics.data.augment import LetterBox

    files = sorted((data_yaml.parent / "images" / split).glob("*.jpg"))
    boxed = [LetterBox(new_shape=(imgsz, imgsz), auto=False)(image=cv2.imread(str(f))) for f in files]
    return torch.from_numpy(np.stack(boxed)[..., ::-1].transpose(0, 3, 1, 2).copy()).float() / 255


def random_adapter(base_pt: Path, config=None, seed: int = 1, scale: float = 0.05, names: dict | None = None):
    """A model with adapters whose B (and DoRA magnitude) is random, as if trained, and its Adapter, for base_pt.

    With `names` (a class set other than the base's) the class layers are rebuilt, randomised and stored in full; with
    train_head every head tensor is; with train_bias the BatchNorm shift after each adapted conv is; with add_classes
    the copies of the class branches are (their parameters), and LoRA layers are added outside the class branches
    (adapted mode) or nowhere (exact mode).
    """
    from lora_yolo import LoraConfig, LoraConv2d, add_lora, extract_adapter, fingerprint, select_targets
    from lora_yolo.branch import add_classes_layers
    from lora_yolo.checkpoint import build_for_classes
    from lora_yolo.targets import bias_tensors, class_layers, head_tensors

    config = config or LoraConfig()
    torch.manual_seed(seed)  # A's Kaiming init: the same seed gives the same adapter
    model = load_model(base_pt)
    base = fingerprint(model)
    if config.add_classes:
        plain = model
        model = build_for_classes(plain, len(names), names)
        plan, full = add_classes_layers(model, plain, config)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in full:
                if n in params:
                    params[n].add_(torch.randn(params[n].shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    else:
        owners = frozenset()
        if names is not None:
            model = build_for_classes(model, len(names), names)
            owners = frozenset(class_layers(model))
        full = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in owners]
        with torch.no_grad():
            for n in full:
                model.get_parameter(n).normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
            if config.train_head:  # every head tensor moved, as training moves it (variances stay positive)
                state, g = model.state_dict(), torch.Generator().manual_seed(seed)
                full = head_tensors(model)
                for n in full:
                    noise = torch.randn(state[n].shape, generator=g) * 0.1
                    state[n].mul_(1 + noise.abs()) if n.endswith("running_var") else state[n].add_(noise)
        plan = select_targets(model, config, full=owners)
        if config.train_bias:
            biases, g = bias_tensors(dict(model.named_modules()), plan), torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for n in biases:  # moved as training moves them, each its own way
                    b = model.get_parameter(n)
                    b.add_(torch.randn(b.shape, generator=g) * 0.1)
            full = [*full, *biases]
    add_lora(model, plan, use_dora=config.use_dora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraConv2d):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)
                if m.use_dora:
                    m.lora_magnitude_vector.mul_(1 + torch.randn(m.lora_magnitude_vector.shape, generator=g) * scale)
    return model, extract_adapter(model, config, base, full=full)


def saved_merged_attached(base_pt: Path, trained: torch.nn.Module, adapter, tmp_path: Path, x: torch.Tensor):
    """`adapter` saved, merged into base_pt by `merge_files` and attached to it: both compute what `trained` computes
    (within the fp16 file's rounding) and each other's outputs within 1e-4. Returns the file and the merged model."""
    from lora_yolo import attach_adapter, load_adapter, save_adapter
    from lora_yolo.merge import merge_files

    path = save_adapter(adapter, tmp_path / "a.safetensors")
    merged = load_model(merge_files(base_pt, [str(path)], tmp_path / "merged.pt"))
    attached = attach_adapter(load_model(base_pt), load_adapter(path))
    assert (head_output(attached, x) - head_output(trained, x)).abs().max() < 1e-3  # the file is fp16
    assert (head_output(merged, x) - head_output(attached, x)).abs().max() < 1e-4
    return path, merged


DEMO_BASE = ROOT / "lora_yolo" / "assets" / "yolo11n-shapes.pt"
SHAPES_B1 = ROOT / "datasets" / "shapes-b1" / "data.yaml"


@pytest.fixture(scope="session")
def demo_base() -> Path:
    """The shipped demo base (pretrained on synthetic domain A): a model whose detections mean something."""
    if not DEMO_BASE.is_file():  # committed with the package: its absence is a broken checkout, not a missing extra
        pytest.fail(f"demo base not found at {DEMO_BASE} (committed; made by scripts/pretrain_base.py)", pytrace=False)
    return DEMO_BASE


def detections(raw: torch.Tensor, imgsz: int) -> list[torch.Tensor]:
    """Ultralytics' NMS on a raw head output as head_output returns it: per image, rows (x1, y1, x2, y2, conf, cls)."""
    from ultralytics.utils.nms import non_max_suppression

    raw = raw.clone()
    raw[:, :4] *= imgsz
    return non_max_suppression(raw, conf_thres=0.25, iou_thres=0.7)


def same_detections(a: list[torch.Tensor], b: list[torch.Tensor], box_tol: float = 0.05) -> bool:
    """The same boxes (within box_tol pixels) and classes, image by image."""
    return all(
        len(x) == len(y) and torch.equal(x[:, 5], y[:, 5]) and bool(((x[:, :4] - y[:, :4]).abs() <= box_tol).all())
        for x, y in zip(a, b)
    )


def peft_and_ours(base: Path, adapter_file: Path, folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The base with an adapter applied by PEFT itself (from our PEFT export) and by lora_yolo, both in eval mode."""
    peft = pytest.importorskip("peft")
    from lora_yolo import attach_adapter, load_adapter
    from lora_yolo.checkpoint import build_for_classes
    from lora_yolo.peft_format import to_peft

    adapter = load_adapter(adapter_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that a YOLO model is not a transformers model
        theirs = peft.PeftModel.from_pretrained(
            build_for_classes(load_model(base), adapter.nc, adapter.names), str(to_peft(adapter, folder))
        )
    return theirs.eval(), attach_adapter(load_model(base), adapter).eval()
