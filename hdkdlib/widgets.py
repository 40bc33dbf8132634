"""Interactive threshold explorer: one confidence threshold per exit, with live accuracy, mean cost
and exit histogram. Without a live frontend (papermill, nbval, a static viewer) the initial state is
also printed and drawn, so the executed notebook still shows it."""
from __future__ import annotations

from typing import Optional, Sequence

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import display

from . import evaluation, plots
from .cost import format_cost


def _summary(result, exit_flops) -> str:
    frac = " ".join(f"{100 * f:.0f}%" for f in result["exit_fractions"])
    return (f"accuracy {100 * result['accuracy']:.2f}% | mean cost {format_cost(result['flops'])} "
            f"({100 * result['flops'] / exit_flops[-1]:.0f}% of the full network) | leaving per exit: {frac}")


def threshold_explorer(probs, targets, exit_flops: Sequence[float], thresholds: Optional[Sequence[float]] = None,
                       show: bool = True) -> W.VBox:
    """Sliders for the thresholds of exits 1..K-1 (the last exit takes the rest) over `probs` [K, N, C].

    Returns the widget; `widget.result()` gives the current evaluation.apply_thresholds result."""
    K = probs.shape[0]
    if len(exit_flops) != K:
        raise ValueError(f"{K} exits but {len(exit_flops)} exit_flops")
    start = list(thresholds) if thresholds is not None else [0.9] * (K - 1) + [float("-inf")]
    sliders = [W.FloatSlider(value=min(max(start[k], 0.0), 1.0), min=0.0, max=1.0, step=0.01,
                             description=f"exit {k + 1}", continuous_update=False, readout_format=".2f")
               for k in range(K - 1)]
    label = W.HTML()
    out = W.Output()

    def current():
        return evaluation.apply_thresholds(probs, targets, [s.value for s in sliders] + [float("-inf")], exit_flops)

    def update(_=None):
        result = current()
        label.value = f"<b>{_summary(result, exit_flops)}</b>"
        out.clear_output(wait=True)
        with out:
            fig, ax = plt.subplots(figsize=(5, 2.6))
            plots.exit_distribution(result["exit_fractions"], ax=ax)
            plt.show()

    for s in sliders:
        s.observe(update, names="value")
    box = W.VBox([W.HTML("<b>Confidence threshold per exit</b> (a sample leaves at the first exit whose "
                         "max-probability reaches it)"), *sliders, label, out])
    box.result = current
    update()
    if show:
        display(box)
        print("static summary at the initial thresholds:", _summary(current(), exit_flops))
    return box
