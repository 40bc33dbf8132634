"""Progress bars that read well in a terminal, live in Jupyter, and in a notebook executed headlessly.

In a terminal: tqdm's text bar on stderr. In a Jupyter kernel tqdm's text bar would write every refresh to
stderr: JupyterLab shows it in a pink error box (and keeps an empty strip once a `leave=False` bar clears), and
papermill stores each refresh as a separate output, so an exported notebook shows one line per refresh. There the
bar is instead *one* plain-text display output updated in place (`display_id`): live it redraws quietly, and a
headless run (papermill, nbconvert --execute) stores only its last state, one line per bar. A notebook's bar
keeps its final line even with `leave=False`: that line says how long the step took.
"""
from __future__ import annotations

import io

from tqdm import tqdm as _tqdm


def in_jupyter_kernel() -> bool:
    """Whether this process is a Jupyter (ipykernel) kernel, where outputs are messages to a front end."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency of the notebooks
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class DisplayBar(_tqdm):
    """tqdm drawn as one text/plain display output, updated in place (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self._handle = None
        kwargs["file"] = io.StringIO()  # tqdm's own writes (the newline at close) go nowhere
        kwargs.setdefault("ascii", False)  # tqdm would guess from the file: a StringIO has no encoding, so "###"
        kwargs.setdefault("mininterval", 0.5)  # at most two updates a second: few messages to the front end
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        from IPython.display import display as show
        text = self.__str__() if msg is None or msg == "" else msg  # a cleared bar keeps its last line
        bundle = {"text/plain": text}
        if self._handle is None:
            self._handle = show(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)
        return True


def bar(*args, **kwargs) -> _tqdm:
    """A progress bar with tqdm's arguments: a DisplayBar in a Jupyter kernel, tqdm's text bar elsewhere."""
    if in_jupyter_kernel() and not kwargs.get("disable", False):
        return DisplayBar(*args, **kwargs)
    return _tqdm(*args, **kwargs)
