"""The dependency floors in pyproject.toml are the versions the suite runs on, and an older Ultralytics is refused."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from lora_yolo.compat import MIN_ULTRALYTICS, _parts, require_ultralytics

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def floor(package: str) -> str:
    """The `>=` version of `package` in pyproject's dependencies (read as text: tomllib needs Python 3.11)."""
    return re.search(rf'^\s*"{package}>=([\w.]+)', PYPROJECT.read_text(), re.MULTILINE).group(1)


@pytest.mark.parametrize("package", ["ultralytics", "typer", "torch", "safetensors", "pyyaml"])
def test_installed_versions_meet_the_declared_floors(package):
    """Fails when the suite runs on an older release than pyproject promises to work with."""
    assert _parts(version(package)) >= _parts(floor(package)), f"{package} {version(package)} < {floor(package)}"


def test_the_import_check_uses_pyprojects_floor():
    assert MIN_ULTRALYTICS == floor("ultralytics")


@pytest.mark.parametrize("older", ["8.3.0", "8.4.189", "8.4.0rc1"])
def test_an_older_ultralytics_is_refused_with_one_line(older):
    with pytest.raises(ImportError, match=rf"lora-yolo needs ultralytics>={MIN_ULTRALYTICS}, found {older}"):
        require_ultralytics(older)


@pytest.mark.parametrize("newer", [MIN_ULTRALYTICS, "8.4.191", "8.5.0", "9.0.0.dev3"])
def test_the_floor_and_newer_pass(newer):
    require_ultralytics(newer)


def test_the_command_says_it_in_one_line():
    """`lora-yolo` with an old Ultralytics: one line on stderr and exit 1, no traceback (the import fails before the
    CLI's error handling exists)."""
    code = (
        "import sys, ultralytics; ultralytics.__version__ = '8.3.0'; sys.argv = ['lora-yolo', '--help']; "
        "from lora_yolo.cli import run; run()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    need = f"ultralytics>={MIN_ULTRALYTICS}"
    assert out.stderr == f"error: lora-yolo needs {need}, found 8.3.0: pip install -U '{need}'\n"
