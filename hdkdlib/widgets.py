"""Interactive threshold explorer: one confidence threshold per exit, with a live summary line (accuracy,
mean cost, where samples leave) and a live exit histogram.

A notebook is also read where no kernel runs the widget: on GitHub, through nbconvert without widget
scripts, or reopened the next day ("Error displaying widget: model not found"). So the explorer's output
comes in two parts:
- the widget itself (sliders, live line, live histogram);
- a *static copy* of its initial state, an ordinary display output: the histogram as a PNG image and the
  summary as text, with one line saying to run the cells to use the sliders.
The live widget carries a style rule that hides every static copy while it renders, so in a live
JupyterLab the moving sliders never sit beside a stale line; wherever the widget cannot render, the rule
is absent and the static copy shows.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Dict, Optional, Sequence

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import display

from . import evaluation, plots
from .cost import format_cost

STATIC_CLASS = "hdkd-static-copy"  # the CSS class of static copies, hidden while a live explorer renders
RUN_THE_CELLS = "Static copy at the initial thresholds: run the notebook's cells to use the sliders."


def summary(result: Dict, exit_flops: Sequence[float]) -> str:
    """One line: accuracy, mean cost with its unit, share of the full network's cost, share leaving per exit."""
    frac = " ".join(f"{100 * f:.0f}%" for f in result["exit_fractions"])
    return (f"accuracy {100 * result['accuracy']:.2f}% | mean cost {format_cost(result['flops'])} "
            f"({100 * result['flops'] / exit_flops[-1]:.0f}% of the full network) | leaving per exit: {frac}")


def histogram_png(fractions: Sequence[float]) -> bytes:
    """The exit histogram as PNG bytes (the same figure live and static)."""
    fig, ax = plt.subplots(figsize=(5, 2.6))
    plots.exit_distribution(fractions, ax=ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def static_copy(result: Dict, exit_flops: Sequence[float], thresholds: Sequence[float]) -> Dict[str, str]:
    """The mime bundle of a static copy: text/html (image, line, note) for JupyterLab, nbconvert and GitHub;
    text/plain for terminals."""
    line = summary(result, exit_flops)
    shown = ", ".join(f"{t:.2f}" for t in thresholds[:-1])
    png = base64.b64encode(histogram_png(result["exit_fractions"])).decode("ascii")
    text, note = html.escape(line, quote=False), html.escape(RUN_THE_CELLS, quote=False)
    page = (f'<div class="{STATIC_CLASS}"><img src="data:image/png;base64,{png}" alt="share of samples per exit"/>'
            f"<p><b>{text}</b> (thresholds {shown})<br/><i>{note}</i></p></div>")
    return {"text/html": page, "text/plain": f"{line} (thresholds {shown})\n{RUN_THE_CELLS}"}


def threshold_explorer(probs, targets, exit_flops: Sequence[float], thresholds: Optional[Sequence[float]] = None,
                       show: bool = True) -> W.VBox:
    """Sliders for the thresholds of exits 1..K-1 (the last exit takes the rest) over `probs` [K, N, C].

    Returns the widget; `widget.result()` gives the current evaluation.apply_thresholds result. With
    show=True it is displayed, followed by its static copy (see the module's docstring)."""
    K = probs.shape[0]
    if len(exit_flops) != K:
        raise ValueError(f"{K} exits but {len(exit_flops)} exit_flops")
    start = list(thresholds) if thresholds is not None else [0.9] * (K - 1) + [float("-inf")]
    sliders = [W.FloatSlider(value=min(max(start[k], 0.0), 1.0), min=0.0, max=1.0, step=0.01,
                             description=f"exit {k + 1}", continuous_update=False, readout_format=".2f")
               for k in range(K - 1)]
    label = W.HTML()
    image = W.Image(format="png", layout=W.Layout(width="450px"))

    def current():
        return evaluation.apply_thresholds(probs, targets, [s.value for s in sliders] + [float("-inf")], exit_flops)

    def update(_=None):
        result = current()
        label.value = f"<b>{html.escape(summary(result, exit_flops), quote=False)}</b>"
        image.value = histogram_png(result["exit_fractions"])

    for s in sliders:
        s.observe(update, names="value")
    title = W.HTML(f"<style>.{STATIC_CLASS} {{display: none}}</style><b>Confidence threshold per exit</b> (a "
                   "sample leaves at the first exit whose max-probability reaches it)")
    box = W.VBox([title, *sliders, label, image])
    box.result = current
    update()
    if show:
        display(box)
        display(static_copy(current(), exit_flops, [s.value for s in sliders] + [float("-inf")]), raw=True)
    return box
