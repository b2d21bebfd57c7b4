"""The oldest Ultralytics lora-yolo runs on, checked when the package is imported.

pip enforces `pyproject.toml`'s floor at install time, but an environment changed afterwards (another package
downgrading Ultralytics) would otherwise fail deep inside training, on a missing `unwrap_model` or
`_handle_nan_recovery`. The floor is the version the test suite ran on; a test keeps it equal to pyproject's.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MIN_ULTRALYTICS = "8.4.190"


def require_ultralytics(installed: str | None = None) -> None:
    """Raise ImportError, with one line saying what to install, if Ultralytics is older than `MIN_ULTRALYTICS`.

    Run as the `lora-yolo` command, the line is printed and the process exits 1 instead: the package is imported
    before the CLI's own error handling exists, and a command's errors are one line, never a traceback.
    """
    if installed is None:
        from ultralytics import __version__ as installed
    if _parts(installed) < _parts(MIN_ULTRALYTICS):
        need = f"ultralytics>={MIN_ULTRALYTICS}"
        message = f"lora-yolo needs {need}, found {installed}: pip install -U '{need}'"
        if Path(sys.argv[0]).stem == "lora-yolo":  # the console script (lora-yolo.exe on Windows)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
        raise ImportError(message)


def _parts(version: str) -> tuple[int, ...]:
    """`8.4.190` -> (8, 4, 190); a piece's leading digits count and a suffix ends it (`8.4.19rc1` -> (8, 4, 19))."""
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d*", piece).group()
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)
