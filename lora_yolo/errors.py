"""The project's one error type.

Everything a user can cause (a bad path, a bad option, an adapter that does not fit its base) raises
`LoraYoloError` with a message meant to be printed as is; the CLI turns it into one line and a non-zero exit.
"""

import re


class LoraYoloError(Exception):
    """A failure the user can act on; the message says what went wrong and, where possible, what to do."""


class TrainingInterrupted(LoraYoloError):
    """Ctrl-C or SIGTERM: the run folder keeps the last completed epoch, and the message says how to resume."""

    def __init__(self, last) -> None:
        how = f"resume with: lora-yolo train --resume {last}" if last.exists() else "no epoch was completed yet"
        super().__init__(f"training interrupted; {how}")


def first_line(e: BaseException) -> str:
    """The first line of another library's error message, without its emoji prefix or terminal colours
    (Ultralytics colours its prefixes, "train: "), to quote in ours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return text[0].replace("ERROR ❌️ ", "").strip() if text else type(e).__name__
