"""Where things go: the project's figures/, data/ and runs/ folders, wherever a notebook runs from.

JupyterLab, papermill and nbval start kernels in different working directories; the folders are
resolved from the project root (the checkout holding this package, or $HDKD_ROOT), so every
notebook writes to the same place.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path


def project_root() -> Path:
    if os.environ.get("HDKD_ROOT"):
        return Path(os.environ["HDKD_ROOT"]).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / "hdkdlib").is_dir():
        return here  # an editable install or a checkout on sys.path
    return Path.cwd()


def _folder(name: str, env: str) -> Path:
    path = Path(os.environ[env]) if os.environ.get(env) else project_root() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the path, or a folder above it, is a file
        where = f"{env} {path}" if os.environ.get(env) else f"the {name} folder {path}"
        raise ValueError(f"{where} is a file (or lies under one), not a folder: set {env} to a folder") from None
    return path


def figures_dir() -> Path:
    return _folder("figures", "HDKD_FIGURES")


def data_dir() -> Path:
    return _folder("data", "HDKD_DATA")


def runs_dir() -> Path:
    return _folder("runs", "HDKD_RUNS")


class DiskFull(OSError):
    """No space left while writing a file: one line naming it and what to do."""

    def __str__(self):
        return self.strerror


def atomic_write(path, write, before_replace=None) -> Path:
    """write(tmp) fills a temporary file, then a rename puts it in place: readers see the old file or the new one,
    never half of one. On any failure the temporary file is removed (a full disk stays no fuller) and the old
    file is untouched; a full disk becomes DiskFull. before_replace() runs once the new file is complete.
    Each writer has its own temporary name: processes that write the same file at once (parallel runs drawing
    one split file, summaries of one study) each put a whole file in place, the last one wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        _sync(tmp)  # on disk before the rename: after a power loss the name holds the old file or the new one
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        _sync(path.parent, directory=True)  # the rename itself
    except BaseException as e:
        full = _disk_full(e, path.parent)  # asked before the partial file is removed and frees its space
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFull(errno.ENOSPC, f"no space left on device while writing {path.name} in {path.parent}: "
                                         "free space or choose another --out") from e
        raise
    return path


def _sync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a folder (some network ones): the rename stands as it is
        if not directory:
            raise
    finally:
        os.close(fd)


def _disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC, or a writer that hides it (torch.save raises "unexpected pos ..." from its zip writer) while the
    folder's file system has under 1 MiB left."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return isinstance(error, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < 2 ** 20
    except OSError:
        return False


def open_lock_file(path: Path, refuse) -> int:
    """A lock file's descriptor (created if missing), never opened through a link: its holder writes into it, and a
    link's target would be created or overwritten. A link is refuse(one line saying so and what to do)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise refuse(f"{path} is a link (to {os.readlink(path)}): its lock would write into the target; remove the "
                     f"link (rm {path}) and run again") from None


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def display_path(path) -> str:
    """A path as notebooks print it, without the machine's folders: relative to the project ("runs/..."), or
    to $HDKD_RUNS / $HDKD_DATA / $HDKD_FIGURES, or to the home folder ("~/..."); else as given."""
    path = Path(path).resolve()
    places = [(project_root(), "")] + [(Path(os.environ[v]).resolve(), f"${v}/") for v in
                                       ("HDKD_RUNS", "HDKD_DATA", "HDKD_FIGURES") if os.environ.get(v)]
    for base, prefix in sorted(places, key=lambda p: -len(str(p[0]))):  # the innermost place first
        if path.is_relative_to(base):
            return prefix + str(path.relative_to(base))
    home = Path.home().resolve()
    return "~/" + str(path.relative_to(home)) if path.is_relative_to(home) else str(path)
