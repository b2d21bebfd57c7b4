"""Outputs never cost the user anything: `lora-yolo export` puts its result inside an existing folder, refuses a full
folder of the export's own name and its own inputs, and replaces only a file or an empty folder (with one rename);
what lands has the usual permissions."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_yolo import LoraYoloError
from lora_yolo import export as export_module
from lora_yolo.export import export_model


def test_output_naming_an_existing_folder_puts_the_export_inside(base_pt, tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    path = export_model(base_pt, "onnx", output=folder, imgsz=64)
    assert path == folder / "yolo11n-base.onnx" and path.stat().st_size > 1_000_000
    assert (folder / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt", "yolo11n-base.onnx"]


class FolderExport:
    """Stands in for ultralytics.YOLO with a format that exports a folder (openvino, saved_model, ncnn ...)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def export(self, format: str, **kwargs) -> str:
        out = self.path.with_name(f"{self.path.stem}_{format}_model")
        out.mkdir()
        (out / "model.xml").write_text("new")
        return str(out)


@pytest.fixture
def folder_format(monkeypatch):
    monkeypatch.setattr(export_module, "YOLO", FolderExport)
    return "openvino"


def test_full_folder_of_the_exports_name_is_refused_untouched(base_pt, tmp_path, folder_format):
    model = tmp_path / "m.pt"
    model.write_bytes(base_pt.read_bytes())
    old = tmp_path / "m_openvino_model"
    old.mkdir()
    (old / "model.xml").write_text("old")
    (old / "notes.txt").write_text("mine")
    with pytest.raises(LoraYoloError, match="already exists and is not empty"):
        export_model(model, folder_format)
    assert (old / "model.xml").read_text() == "old" and (old / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m_openvino_model"]  # no temporary leftovers


def test_empty_folder_of_the_exports_name_is_replaced(base_pt, tmp_path, folder_format):
    model = tmp_path / "m.pt"
    model.write_bytes(base_pt.read_bytes())
    (tmp_path / "m_openvino_model").mkdir()
    path = export_model(model, folder_format)
    assert (path / "model.xml").read_text() == "new"


def test_file_where_a_folder_export_goes_is_refused(base_pt, tmp_path, folder_format):
    model = tmp_path / "m.pt"
    model.write_bytes(base_pt.read_bytes())
    (tmp_path / "m_openvino_model").write_text("a file of mine")
    with pytest.raises(LoraYoloError, match="exists as something else"):
        export_model(model, folder_format)
    assert (tmp_path / "m_openvino_model").read_text() == "a file of mine"


@pytest.mark.parametrize("which", ["model", "base"])
def test_export_never_overwrites_its_input(base_pt, tmp_path, which):
    model = tmp_path / "m.pt"
    model.write_bytes(base_pt.read_bytes())
    before = model.read_bytes()
    with pytest.raises(LoraYoloError, match="would overwrite an input"):
        if which == "model":
            export_model(model, "torchscript", output=model)
        else:
            export_model(base=model, adapters=[str(tmp_path / "a.safetensors")], format="torchscript", output=model)
    assert model.read_bytes() == before


def test_output_with_a_trailing_slash_is_a_folder(base_pt, tmp_path):
    with pytest.raises(LoraYoloError, match="output folder does not exist"):
        export_model(base_pt, "onnx", output=f"{tmp_path / 'newdir'}/", imgsz=64)
    assert not (tmp_path / "newdir").exists()


def test_written_files_have_the_usual_permissions(base_pt, tmp_path):
    """Temporary files are made 0600 (and safetensors recreates its file 0600): what lands must be 0666 - umask."""
    import os

    from conftest import random_adapter

    from lora_yolo import save_adapter
    from lora_yolo.peft_format import to_peft

    umask = os.umask(0)
    os.umask(umask)
    adapter = random_adapter(base_pt)[1]
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    folder = to_peft(adapter, tmp_path / "peft")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in folder.iterdir())
