"""merge and export: plain checkpoints and ONNX that compute what the adapter-attached model computes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    SHAPES_B1,
    detections,
    head_output,
    image_batch,
    make_base,
    random_adapter,
    same_detections,
    sha256,
)

from lora_yolo import LoraConfig, LoraConv2d, LoraYoloError, attach_adapter, load_adapter, load_model, save_adapter
from lora_yolo.export import export_model
from lora_yolo.merge import merge_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapters(base_pt, tmp_path_factory):
    """Two adapters with random (trained-like) B on the same base, and the merge of the first."""
    folder = tmp_path_factory.mktemp("adapters")
    a = save_adapter(random_adapter(base_pt, seed=1)[1], folder / "a.safetensors")
    b = save_adapter(random_adapter(base_pt, LoraConfig(targets=["head"], r=4), seed=2)[1], folder / "b.safetensors")
    merged = merge_files(base_pt, [str(a)], folder / "merged.pt")
    return a, b, merged


def test_unmerged_and_merged_agree_on_coco8_images(adapters, base_pt, coco8):
    a, _, merged = adapters
    x = image_batch(coco8, 160)
    unmerged = attach_adapter(load_model(base_pt), load_adapter(a))
    assert any(isinstance(m, LoraConv2d) for m in unmerged.modules())
    plain = load_model(merged)
    assert not any(isinstance(m, LoraConv2d) for m in plain.modules())
    expected = head_output(unmerged, x)
    assert (head_output(plain, x) - expected).abs().max() < 1e-4
    assert (expected - head_output(load_model(base_pt), x)).abs().max() > 1e-3  # the adapter does change outputs
    fused = load_model(merged).fuse(verbose=False)  # Ultralytics' conv+BN fusion on the merged model
    assert (head_output(fused, x) - head_output(plain, x)).abs().max() < 1e-4


def test_weighted_merge_is_the_weighted_sum_of_updates(adapters, base_pt, tmp_path, cli_here):
    a, b, _ = adapters
    before = {p: sha256(p) for p in (a, b, base_pt)}
    out = cli_here(
        "merge",
        "--base",
        str(base_pt),
        "--adapter",
        f"{a}:0.5",
        "--adapter",
        f"{b}:0.25",
        "-o",
        str(tmp_path / "ab.pt"),
    )
    assert out.returncode == 0, out.stderr
    assert {p: sha256(p) for p in (a, b, base_pt)} == before  # inputs untouched
    merged = load_model(tmp_path / "ab.pt").state_dict()
    expected = load_model(base_pt).state_dict()
    for path, w in ((a, 0.5), (b, 0.25)):
        for name, layer in (
            (n, m)
            for n, m in attach_adapter(load_model(base_pt), load_adapter(path)).named_modules()
            if isinstance(m, LoraConv2d)
        ):
            expected[f"{name}.weight"] = expected[f"{name}.weight"] + w * layer.delta_weight()
    assert max((merged[k] - expected[k]).abs().max().item() for k in merged) < 1e-6


def test_merge_refuses_other_architecture_with_both_fingerprints(adapters, tmp_path, cli_here):
    a, _, _ = adapters
    other = make_base(tmp_path / "s.pt", "yolo11s.yaml")
    out = cli_here("merge", "--base", str(other), "--adapter", str(a), "-o", str(tmp_path / "x.pt"))
    arch = load_adapter(a).base["arch"]
    assert out.returncode == 1 and arch in out.stderr and "yolo11s" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x.pt").exists()
    assert not list(tmp_path.glob(".x.pt*"))  # no temporary file left behind


def test_merge_refuses_to_overwrite_its_input(adapters, base_pt):
    a, _, _ = adapters
    with pytest.raises(LoraYoloError, match="overwrite an input"):
        merge_files(base_pt, [str(a)], base_pt)


def onnx_run(path: Path, x: torch.Tensor) -> np.ndarray:
    """ONNX Runtime's raw output, boxes divided by the image size as in head_output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    y[:, :4] /= x.shape[-1]
    return y


def test_onnx_matches_pytorch(adapters, coco8, tmp_path):
    _, _, merged = adapters
    onnx = export_model(merged, "onnx", output=tmp_path / "m.onnx", imgsz=160, dynamic=True)
    x = image_batch(coco8, 160)
    torch_out = head_output(load_model(merged).fuse(verbose=False), x).numpy()
    assert np.abs(onnx_run(onnx, x) - torch_out).max() < 1e-4


def test_half_onnx_within_documented_tolerance(adapters, coco8, tmp_path):
    _, _, merged = adapters
    onnx = export_model(merged, "onnx", output=tmp_path / "h.onnx", imgsz=160, half=True)
    x = image_batch(coco8, 160)[:1]
    torch_out = head_output(load_model(merged), x).numpy()
    # fp16 weights and activations: boxes within 0.5% of the image side, class scores within 0.01
    diff = np.abs(onnx_run(onnx, x) - torch_out)
    assert diff[:, :4].max() < 5e-3 and diff[:, 4:].max() < 1e-2


def test_export_from_base_and_adapter_equals_export_of_merged(adapters, base_pt, coco8, tmp_path, cli_here):
    a, _, merged = adapters
    before = {p: sha256(p) for p in (a, base_pt)}
    out = cli_here(
        "export",
        "--base",
        str(base_pt),
        "--adapter",
        str(a),
        "--format",
        "onnx",
        "--imgsz",
        "64",
        "-o",
        str(tmp_path / "ba.onnx"),
    )
    assert out.returncode == 0, out.stderr
    assert {p: sha256(p) for p in (a, base_pt)} == before
    x = image_batch(coco8, 64)[:1]
    expected = head_output(load_model(merged), x).numpy()
    assert np.abs(onnx_run(tmp_path / "ba.onnx", x) - expected).max() < 1e-4


def test_unknown_format_and_failed_export(adapters, tmp_path, cli_here):
    _, _, merged = adapters
    out = cli_here("export", str(merged), "--format", "onx")
    assert out.returncode == 2 and "unknown export format 'onx'" in out.stderr and "onnx" in out.stderr
    before = sha256(merged)
    with pytest.raises(LoraYoloError, match="export failed"):  # TensorFlow is not installed: LiteRT cannot export
        export_model(merged, "litert", output=tmp_path / "m.tflite", imgsz=64)
    assert sha256(merged) == before and list(tmp_path.iterdir()) == []


def test_merged_exports_with_plain_ultralytics(adapters, tmp_path):
    _, _, merged = adapters
    code = f"""
        import sys, shutil
        sys.modules["lora_yolo"] = None  # lora_yolo cannot be imported in this process
        from ultralytics.cfg import entrypoint
        shutil.copy({str(merged)!r}, "m.pt")
        entrypoint("yolo export model=m.pt format=torchscript imgsz=64")  # exactly the `yolo` command line
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "m.torchscript").is_file()


@pytest.fixture(scope="module")
def demo(demo_base, tmp_path_factory):
    """A small adapter on the pretrained demo base: real detections, changed a little."""
    folder = tmp_path_factory.mktemp("demo")
    a = save_adapter(random_adapter(demo_base, seed=3, scale=0.01)[1], folder / "a.safetensors")
    return a, merge_files(demo_base, [str(a)], folder / "merged.pt")


def test_same_detections_unmerged_merged_and_onnx(demo, demo_base, tmp_path):
    a, merged = demo
    x = image_batch(SHAPES_B1, 160)[:8]
    unmerged = head_output(attach_adapter(load_model(demo_base), load_adapter(a)), x)
    plain = head_output(load_model(merged), x)
    assert (plain - unmerged).abs().max() < 1e-4
    ref = detections(unmerged, 160)
    assert sum(len(d) for d in ref) >= 8  # the base really detects shapes
    assert same_detections(detections(plain, 160), ref)
    onnx = export_model(merged, "onnx", output=tmp_path / "d.onnx", imgsz=160, dynamic=True)
    onnx_out = torch.from_numpy(onnx_run(onnx, x))
    assert (onnx_out - plain).abs().max() < 1e-4
    assert same_detections(detections(onnx_out, 160), ref)


def test_weighted_merge_of_class_layers_does_not_depend_on_order(base_pt):
    """X trains the class convs in full (same class names), L puts LoRA on them: each contributes w times its change,
    whichever comes first."""
    from lora_yolo.merge import merge_adapters

    base = load_model(base_pt)
    _, x = random_adapter(base_pt, seed=3, names=dict(base.names))
    plain, lora = random_adapter(base_pt, seed=4)
    assert x.full and not lora.full
    one = merge_adapters(base, [(x, 0.5), (lora, 0.5)]).state_dict()
    two = merge_adapters(base, [(lora, 0.5), (x, 0.5)]).state_dict()
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-6) for k in one)
    key = x.full[0]  # a class conv weight (x.full lists weight before bias)
    conv = plain.get_submodule(key.rpartition(".")[0])
    want = base.state_dict()[key] + 0.5 * (x.tensors[key] - base.state_dict()[key]) + 0.5 * conv.delta_weight()
    assert torch.allclose(one[key], want, rtol=0, atol=1e-6)
