"""Atomic file writes: a reader (or a crash) sees either the old file or the complete new one, never half of it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_yolo.errors import LoraYoloError


def refuse_inputs(output: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is one of the files or folders it is made from: writing it would destroy them (links
    resolved, so another name for an input is refused too)."""
    out = Path(output).resolve()
    if any(out == Path(source).resolve() for source in inputs):
        raise LoraYoloError(f"output {output} would overwrite an input")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` with one `os.replace`.

    The temporary file lives in the destination folder so the final rename never crosses filesystems.
    On any error the temporary file is removed and `path` is left as it was.

    Example:
        >>> with atomic_path("adapter.safetensors") as tmp:
        ...     save_file(tensors, tmp)
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise LoraYoloError(f"output folder does not exist: {path.parent}")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise LoraYoloError(f"cannot write to {path.parent}: {e.strerror}") from e
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp makes 0600 (and safetensors recreates the file 0600): the result should look like any other file
        _usual_mode(tmp, 0o666)
        _fsync(tmp)  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LoraYoloError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path` with one rename.

    `path` must not exist or be an empty folder (a rename replaces an empty folder, never a full one: a reader sees
    no folder, or the complete new one). On any error the temporary folder is removed and `path` is left as it was.

    Example:
        >>> with atomic_dir("peft-adapter") as tmp:
        ...     (tmp / "adapter_config.json").write_text("{}")
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise LoraYoloError(f"output folder does not exist: {path.parent}")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise LoraYoloError(f"cannot write to {path.parent}: {e.strerror}") from e
    try:
        yield tmp
        for item in tmp.rglob("*"):
            _usual_mode(item, 0o777 if item.is_dir() else 0o666)
        _usual_mode(tmp, 0o777)  # mkdtemp makes 0700: the result should look like any other folder we write
        for item in [*tmp.rglob("*"), tmp]:  # the data is on disk before the rename makes it visible
            _fsync(item)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LoraYoloError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _usual_mode(path: Path, mode: int) -> None:
    """Give `path` the permissions a plain open() or mkdir() would: `mode` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
