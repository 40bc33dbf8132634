"""Interactive threshold explorer: one confidence threshold per exit, with a live summary line (accuracy,
mean cost, where samples leave) and a live exit histogram.

A notebook is also read where no kernel runs the widget: on GitHub, in nbviewer, through nbconvert, in VS
Code without a kernel. So the explorer displays itself the way Jupyter intends, as *one* output whose mime
bundle carries three views of the same state, and every front end picks the richest it can render:
- `application/vnd.jupyter.widget-view+json`: the live widget (JupyterLab with a kernel, or with the widget
  state saved in the notebook, which our JupyterLab settings turn on: `notebooks/jupyterlab-settings/`);
- `image/png`: the histogram and the numbers drawn as one picture, at the thresholds shown;
- `text/plain`: the numbers as one line, for terminals and papermill logs.
No style rule hides anything: a front end shows one view of the output, never two.

A headless run (papermill, nbconvert --execute: a kernel whose requests allow no input, since nobody is there
to answer) has nobody to move a slider. There the explorer creates no widgets and its output is the picture
and the line alone: the executed notebook holds no widget state, and nbconvert's HTML shows the picture
instead of a widget view whose renderer it would load from a CDN (nothing, offline). A reopened notebook
shows the saved widget without a kernel behind it, so the widget says in its own title that the sliders
move only while the kernel runs the cell.

Thresholds below 1/C (C classes) act as 0: every sample's top probability is at least 1/C. The sliders span
1/C rounded down to their 0.01 steps (every sample leaves) to just above 1 (none leaves: a threshold of inf, as
evaluation.fit_thresholds gives where no sample should leave), so every position is a round threshold.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Dict, Optional, Sequence

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import display

from . import evaluation, plots
from .cost import format_cost

RUN_THE_CELLS = "A picture of the explorer: run the notebook's cells to move the sliders."
NEEDS_THE_KERNEL = ("The sliders move while the kernel runs this cell; in a reopened notebook they show the "
                    "saved state: run the cell to move them.")


def _accuracy_and_cost(result: Dict, exit_flops: Sequence[float]) -> str:
    return (f"accuracy {100 * result['accuracy']:.2f}% | mean cost {format_cost(result['flops'])} "
            f"({100 * result['flops'] / exit_flops[-1]:.0f}% of the full network)")


def summary(result: Dict, exit_flops: Sequence[float]) -> str:
    """One line: accuracy, mean cost with its unit, share of the full network's cost, share leaving per exit."""
    frac = " ".join(f"{100 * f:.0f}%" for f in result["exit_fractions"])
    return f"{_accuracy_and_cost(result, exit_flops)} | leaving per exit: {frac}"


def _shown(thresholds: Sequence[float]) -> str:
    """The thresholds of exits 1..K-1 (the last exit takes the rest: no threshold to show)."""
    return ", ".join(f"{t:.2f}" for t in thresholds[:-1])


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def histogram_png(fractions: Sequence[float]) -> bytes:
    """The exit histogram as PNG bytes (the live widget's picture)."""
    fig, ax = plt.subplots(figsize=(5, 2.6))
    plots.exit_distribution(fractions, ax=ax)
    fig.tight_layout()
    return _png(fig)


def state_png(result: Dict, exit_flops: Sequence[float], thresholds: Sequence[float]) -> bytes:
    """The explorer's state as one picture for readers without a kernel: the histogram with each bar's share
    written on it, the accuracy and cost line, the thresholds, and the note saying how to get the sliders."""
    fractions = result["exit_fractions"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    plots.exit_distribution(fractions, ax=ax, title="")
    for k, f in enumerate(fractions):
        ax.annotate(f"{100 * f:.0f}%", (k + 1, 100 * f), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 110)
    fig.suptitle(f"{_accuracy_and_cost(result, exit_flops)}\nthresholds per exit: {_shown(thresholds)} (the last "
                 "exit takes the rest)", fontsize=9)
    fig.text(0.5, 0.01, RUN_THE_CELLS, ha="center", va="bottom", fontsize=8, style="italic")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _png(fig)


def headless_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel executing for nobody: papermill and nbconvert --execute
    (nbclient) send their requests with allow_stdin false, while JupyterLab, Notebook and VS Code, with a person
    at the front end who could answer input(), send true."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    return kernel is not None and not getattr(kernel, "_allow_stdin", True)


NEVER = 1.01  # a slider's position above every max-probability: no sample leaves at that exit
STEPS_PER_UNIT = 100  # the sliders move in steps of 0.01


class _Views:
    """The picture and the line of an explorer's state (both kinds of explorer below)."""

    def thresholds(self):
        """The sliders' ends are the thresholds beyond them: above 1 no sample leaves (inf: a saturated float32
        softmax reaches 1.0 exactly), at 1/C every one does (-inf: a float32 max-probability can fall just below
        1/C)."""
        return [float("inf") if s.value > 1 else float("-inf") if s.value <= s.min else s.value
                for s in self._sliders] + [float("-inf")]

    def result(self) -> Dict:
        """evaluation.apply_thresholds at the sliders' thresholds."""
        return evaluation.apply_thresholds(self._probs, self._targets, self.thresholds(), self._exit_flops)

    def _static_views(self) -> Dict[str, str]:
        result, thresholds = self.result(), self.thresholds()
        return {"image/png": base64.b64encode(state_png(result, self._exit_flops, thresholds)).decode("ascii"),
                "text/plain": f"{summary(result, self._exit_flops)} (thresholds {_shown(thresholds)})"}


class ThresholdExplorer(_Views, W.VBox):
    """The explorer's widget; displaying it gives one output with the three views (module docstring)."""

    def __init__(self, children, sliders, probs, targets, exit_flops):
        super().__init__(children)
        self._sliders, self._probs, self._targets, self._exit_flops = sliders, probs, targets, exit_flops

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)  # the widget view (and ipywidgets' own text/plain)
        bundle.update(self._static_views())
        return bundle


class _Threshold:
    """A slider's value without a widget (the headless explorer's)."""

    def __init__(self, value: float, min: float, max: float = NEVER):
        self.value, self.min, self.max = value, min, max


class StaticExplorer(_Views):
    """The explorer of a headless run: no widgets (nobody to move them), the picture and the line as its output;
    result() and thresholds() as ThresholdExplorer's, its thresholds set through `sliders[k].value`."""

    def __init__(self, sliders, probs, targets, exit_flops):
        self.sliders = self._sliders = sliders
        self._probs, self._targets, self._exit_flops = probs, targets, exit_flops

    def _repr_mimebundle_(self, **kwargs):
        return self._static_views()


def threshold_explorer(probs, targets, exit_flops: Sequence[float], thresholds: Optional[Sequence[float]] = None,
                       show: bool = True):
    """Sliders for the thresholds of exits 1..K-1 (the last exit takes the rest) over `probs` [K, N, C], spanning
    1/C rounded down to the sliders' 0.01 steps (every sample leaves) to NEVER (none leaves: thresholds of inf
    start there).

    Returns the widget; `widget.result()` gives the current evaluation.apply_thresholds result. With
    show=True it is displayed (one output, three views: see the module's docstring). In a headless run it
    returns a StaticExplorer: the same results, no widgets."""
    K, C = probs.shape[0], probs.shape[2]
    if len(exit_flops) != K:
        raise ValueError(f"{K} exits but {len(exit_flops)} exit_flops")
    start = list(thresholds) if thresholds is not None else [0.9] * (K - 1) + [float("-inf")]
    lowest = math.floor(STEPS_PER_UNIT / C) / STEPS_PER_UNIT  # on the 0.01 grid (1/3 would put 1.00 out of reach)
    values = [min(max(start[k], lowest), NEVER) for k in range(K - 1)]  # inf at NEVER, -inf at the lowest
    if headless_kernel():
        box = StaticExplorer([_Threshold(v, lowest) for v in values], probs, targets, exit_flops)
        if show:
            display(box)
        return box
    sliders = [W.FloatSlider(value=v, min=lowest, max=NEVER, step=1 / STEPS_PER_UNIT, description=f"exit {k + 1}",
                             continuous_update=False, readout_format=".2f")
               for k, v in enumerate(values)]
    label = W.HTML()
    image = W.Image(format="png", layout=W.Layout(width="450px"))
    title = W.HTML("<b>Confidence threshold per exit</b> (a sample leaves at the first exit whose "
                   f"max-probability reaches it; at 1/{C} every sample leaves, above 1 none)<br><i>"
                   f"{html.escape(NEEDS_THE_KERNEL)}</i>")
    box = ThresholdExplorer([title, *sliders, label, image], sliders, probs, targets, exit_flops)

    def update(_=None):
        result = box.result()
        label.value = f"<b>{html.escape(summary(result, exit_flops), quote=False)}</b>"
        image.value = histogram_png(result["exit_fractions"])

    for s in sliders:
        s.observe(update, names="value")
    update()
    if show:
        display(box)
    return box
