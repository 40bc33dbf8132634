"""What every command-line entry point shares: a closed pipe ends it quietly.

`python -m hdkdlib info NAME | head -1` closes our stdout early; Python would then print a BrokenPipeError
traceback, twice (again when it flushes stdout at exit). Like any Unix tool, we stop without a word.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


def run(main: Callable[[], int]) -> int:
    """main()'s exit code; on a closed stdout, 141 (128 + SIGPIPE, what a shell reports) and no traceback."""
    try:
        code = main()
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        return 141
