"""Ultralytics arguments passed through lora-yolo's commands (`key=value`), checked against Ultralytics' own list.

Checked before any work, so a misspelled key is one line suggesting the right one, not an error mid-run.
"""

from __future__ import annotations

import difflib
from typing import Any

from ultralytics.utils import DEFAULT_CFG_DICT

from lora_yolo.errors import LoraYoloError


def check_args(overrides: dict[str, Any], reserved: dict[str, str], mode: str) -> None:
    """Refuse pass-through keys Ultralytics does not know (suggesting the closest) and keys a command owns."""
    for key in overrides:
        if key in reserved:
            raise LoraYoloError(f"'{key}' cannot be passed through; use {reserved[key]}")
        if key not in DEFAULT_CFG_DICT:
            close = difflib.get_close_matches(key, DEFAULT_CFG_DICT, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise LoraYoloError(f"'{key}' is not an Ultralytics {mode} argument{hint}")
