"""The readers of every file the project loads: JSON records (config.json, results.json, metrics.jsonl, split
files, manifests) through read_json / parse_json, tensor files (checkpoints, networks) through load_tensors.

A file may be torn (a copy or a kill mid-write), foreign or hostile: a directory where the file should be, a JSON
text nested deep enough to exhaust the parser's stack or holding a number too long for Python's int, a tensor
file carrying a pickle payload. Each is refused as one Unreadable error (a ValueError) naming the file and
saying why in our words. Nothing in a file is executed, and no message repeats torch's advice to load it with
weights_only=False: that would execute the payload.
"""
from __future__ import annotations

import io
import json
import pickle
import stat
import sys
import warnings
from pathlib import Path

import torch

MAX_JSON_BYTES = 64 * 2 ** 20  # our largest records (an ImageNet split file) hold a few MiB
MAX_JSON_DEPTH = 64            # our records nest a handful of levels


class Unreadable(ValueError):
    """A file that cannot be read as what it should hold. str(): the file and why; .reason: why alone (for
    callers that name the file their own way and add what to do)."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is unreadable ({reason})")


def _regular_file(path: Path) -> None:
    """Refuse a directory or a device where a file should be before opening it (reading a FIFO would block).
    A missing or forbidden file raises the OSError that names it."""
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise Unreadable(path, "a directory, not a file")
    if not stat.S_ISREG(mode):
        raise Unreadable(path, "not a regular file")


def read_bytes(path) -> bytes:
    """A record's bytes, at most MAX_JSON_BYTES of them (a study's tables, a gzip file's packed bytes)."""
    path = Path(path)
    _regular_file(path)
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise Unreadable(path, f"larger than {MAX_JSON_BYTES // 2 ** 20} MiB, more than any record of ours holds")
    return data


def read_gzip(path) -> bytes:
    """A gzip record's unpacked bytes, at most MAX_JSON_BYTES of them (a small file may unpack to a huge one)."""
    import gzip
    import zlib
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(read_bytes(path))) as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise Unreadable(path, f"not a whole gzip file: {e}") from None
    if len(data) > MAX_JSON_BYTES:
        raise Unreadable(path, f"unpacks to more than {MAX_JSON_BYTES // 2 ** 20} MiB, more than any record of ours")
    return data


def read_text(path, errors: str = "strict") -> str:
    """A record's text (UTF-8), at most MAX_JSON_BYTES of it. errors="replace" keeps a torn multi-byte character
    of a JSON-lines file's last line readable as the damage it is."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError:
        raise Unreadable(path, "not a JSON text file") from None


def _deeper_than(value, limit: int) -> bool:
    """Whether value's lists and objects nest more than limit levels (walked without recursion)."""
    todo = [(value, 1)] if isinstance(value, (list, dict)) else []
    while todo:
        node, depth = todo.pop()
        if depth > limit:
            return True
        todo.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)
                    if isinstance(child, (list, dict)))
    return False


def parse_json(text: str, where):
    """A JSON text's value, or Unreadable naming `where` (a file, or a file's line)."""
    too_deep = f"nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise Unreadable(where, f"JSONDecodeError: {e}") from None
    except RecursionError:  # deeper than the interpreter's stack allows: refused before our own bound is asked
        raise Unreadable(where, too_deep) from None
    except ValueError as e:  # Python's limit on the digits of an int (its own message suggests raising it)
        reason = (f"a number longer than {sys.get_int_max_str_digits()} digits" if "digits" in str(e)
                  else f"{type(e).__name__}: {e}")
        raise Unreadable(where, reason) from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise Unreadable(where, too_deep)
    return value


def read_json(path):
    """A JSON file's value, bounded in size and depth; Unreadable naming the file otherwise."""
    return parse_json(read_text(path), path)


def load_tensors(path, device="cpu"):
    """A tensor file's contents (tensors and plain values), loaded with weights_only=True: a file holding any
    other object is refused without being executed. Unreadable naming the file, in our words, otherwise; a
    missing or forbidden file raises the OSError that names it."""
    path = Path(path)
    _regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a foreign pickle's protocol: the refusal below says it all
            return torch.load(path, map_location=device, weights_only=True)
    except (OSError, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:  # a refused object, a truncated or corrupt zip, any unpickling error
        raise Unreadable(path, _why_unreadable(e)) from None


def _why_unreadable(error: Exception) -> str:
    """torch.load's refusal in our words: its own text advises loading the file unsafely."""
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error):
        return "it holds objects other than tensors (a modified or foreign file); it was not executed"
    return f"truncated or corrupt ({type(error).__name__})"
