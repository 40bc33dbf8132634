"""What every command-line entry point shares: a closed pipe ends it quietly, an expected failure is one line.

`python -m hdkdlib info NAME | head -1` closes our stdout early; Python would then print a BrokenPipeError
traceback, twice (again when it flushes stdout at exit). Like any Unix tool, we stop without a word.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from .paths import DiskFull


def run(main: Callable[[], int]) -> int:
    """main()'s exit code; on a closed stdout, 141 (128 + SIGPIPE, what a shell reports) and no traceback."""
    try:
        code = main()
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        return 141


def say(message: str) -> None:
    """A line for the person running the command, on stderr; under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(f"hdkdlib.train: {message}", file=sys.stderr)


def error_line(error: BaseException, kept_checkpoint: Optional[str] = None) -> str:
    """An expected failure as one line: the original error of a DataLoader worker, the fix for a refused path,
    and, where a run's last good checkpoint is kept, how to continue from it."""
    message = str(error)
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original error's line
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    if isinstance(error, PermissionError):
        message += " (the file system refused: choose an --out, --data-root or --split-dir you may use)"
    elif kept_checkpoint is not None:
        message += f" (the last good checkpoint in {kept_checkpoint} is kept: continue with the same command plus --resume)"
    kind = type(error).__name__ + ": " if isinstance(error, OSError) and not isinstance(error, DiskFull) else ""
    return kind + message
