"""Figures (matplotlib + seaborn), saved under figures/ as PNG and SVG."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .cost import si_scale
from .objectives import weight_matrix
from .paths import figures_dir


def save(fig, name: str, folder: Path | None = None) -> List[Path]:
    """Write `fig` as name.png and name.svg into figures/ (or `folder`); return the paths."""
    folder = Path(folder) if folder is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def per_exit_accuracy(table: pd.DataFrame, ax=None, title: str = "Accuracy per exit"):
    """Bars of accuracy per exit, one hue per method. `table` has columns method, exit, accuracy."""
    ax = ax or plt.gca()
    sns.barplot(data=table, x="exit", y="accuracy", hue="method", ax=ax)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    return ax


def decision_boundaries(axes_row, axis, preds, x, y, title_prefix: str = ""):
    """One panel per exit: predicted class over the plane (class c in pastel colour c, whichever classes a panel
    predicts), with the data on top (class c in deep colour c)."""
    extent = [axis[0].item(), axis[-1].item(), axis[0].item(), axis[-1].item()]
    classes = max(int(y.max()), *(int(p.max()) for p in preds)) + 1
    cmap = plt.matplotlib.colors.ListedColormap(sns.color_palette("pastel", classes))
    for k, (ax, pred) in enumerate(zip(axes_row, preds), start=1):
        # the colour scale spans every class, not the panel's own: an exit that never predicts class 0 would
        # otherwise paint class 1 in class 0's colour
        ax.imshow(pred.numpy(), origin="lower", extent=extent, cmap=cmap, vmin=-0.5, vmax=classes - 0.5,
                  interpolation="nearest", alpha=0.9)
        ax.scatter(x[:, 0], x[:, 1], c=[sns.color_palette("deep")[int(c)] for c in y], s=3, linewidths=0)
        ax.set_title(f"{title_prefix}exit {k}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])


LEGEND_FONTSIZE = 9  # legends readable at 100% zoom
_DASHES = ["--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (3, 1, 1, 1))]


def _teacher_dashes(term: str):
    """A KD term's dash pattern, one per teacher exit ("kd1<-3": teacher 3), so lines differ in more than hue."""
    teacher = int(term.split("<-")[1]) if "<-" in term else 0
    return _DASHES[teacher % len(_DASHES)]


def weight_trajectories(history: Dict[str, list], ax=None, top: int | None = None):
    """Learned loss weights over training steps, one line per term."""
    ax = ax or plt.gca()
    frame = pd.DataFrame(history["weights"], index=history["step"])
    if top:
        frame = frame[frame.iloc[-1].sort_values(ascending=False).index[:top]]
    colours = sns.color_palette("husl", len(frame.columns))  # one hue per term: no colour comes round again
    for name, colour in zip(frame.columns, colours):
        ax.plot(frame.index, frame[name], label=name, color=colour, lw=1.8 if name.startswith("ce") else 1.4,
                ls="-" if name.startswith("ce") else _teacher_dashes(name))
    ax.set_xlabel("step")
    ax.set_ylabel("weight")
    ax.legend(fontsize=LEGEND_FONTSIZE, handlelength=3, ncol=1 + len(frame.columns) // 12, loc="center left",
              bbox_to_anchor=(1.01, 0.5), frameon=False)  # beside the plot, never over the curves
    return ax


def weight_heatmap(weights: Dict[str, float], num_exits: int, ax=None, title: str = "Learned loss weights"):
    ax = ax or plt.gca()
    labels = [str(k) for k in range(1, num_exits + 1)]
    sns.heatmap(weight_matrix(weights, num_exits), annot=True, fmt=".2f", cmap="viridis", ax=ax,
                xticklabels=labels, yticklabels=labels, cbar=False)
    ax.set_xlabel("teacher exit (diagonal: CE)")
    ax.set_ylabel("student exit")
    ax.set_title(title)
    return ax


def anytime_curves(table: pd.DataFrame, ax=None, metric: str = "top1", title: str = "Anytime prediction",
                   unit: str = "FLOPs"):
    """Accuracy of every exit against its cumulative cost, one line per method (or run).
    `table`: columns method, exit, flops and `metric` (fractions), e.g. from runfolder.load_results; `unit`: what
    the flops column counts (cost.unit of results.json's cost_convention: MACs for exits on torchvision backbones)."""
    ax = ax or plt.gca()
    divisor, prefix = si_scale(table["flops"].max())
    frame = table.assign(cost=table["flops"] / divisor, accuracy=100 * table[metric])
    sns.lineplot(data=frame, x="cost", y="accuracy", hue="method", marker="o", ax=ax, errorbar="sd")
    ax.set_xlabel(f"cumulative {prefix}{unit} of the exit")
    ax.xaxis.set_major_locator(plt.MaxNLocator(6))
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_title(title)
    return ax


def budgeted_curves(curves: Dict[str, List[Dict]], ax=None, title: str = "Budgeted batch classification",
                    unit: str = "FLOPs"):
    """Test accuracy against the mean cost per image, one curve per method: {method: evaluation.budgeted(...)}.
    Rows with "ms" (results.json's budgeted_ms: exit shares times each exit's measured full-batch time) are drawn
    in ms per image; the others in `unit` (as anytime_curves). Curves in time and in counts share no axis."""
    ax = ax or plt.gca()
    timed = {name: "ms" in rows[0] for name, rows in curves.items() if rows}
    if len(set(timed.values())) > 1:
        raise ValueError(f"budgeted_curves: {', '.join(n for n, t in timed.items() if t)} in ms per image, "
                         f"{', '.join(n for n, t in timed.items() if not t)} in {unit}: draw them on separate axes")
    in_ms = any(timed.values())
    divisor, prefix = (1.0, "") if in_ms else si_scale(max(r["flops"] for rows in curves.values() for r in rows))
    for name, rows in curves.items():
        x = [r["ms"] for r in rows] if in_ms else [r["flops"] / divisor for r in rows]
        ax.plot(x, [100 * r["accuracy"] for r in rows], marker=".", label=name)
    ax.xaxis.set_major_locator(plt.MaxNLocator(6))
    ax.set_xlabel("expected ms per test image (from per-exit times)" if in_ms
                  else f"average {prefix}{unit} per test image")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend()
    return ax


def exit_distribution(fractions: Sequence[float], ax=None, title: str = "Where samples leave"):
    ax = ax or plt.gca()
    ax.bar(range(1, len(fractions) + 1), [100 * f for f in fractions], color=sns.color_palette("deep")[2])
    ax.set_xticks(range(1, len(fractions) + 1))  # exits are whole numbers
    ax.set_xlabel("exit")
    ax.set_ylabel("share of samples (%)")
    ax.set_title(title)
    return ax


def weight_evolution(history: Sequence[Dict[str, float]], ax=None, title: str = "Loss weights over epochs"):
    """Heatmap: one row per loss term, one column per epoch (learned weights as recorded in metrics.jsonl)."""
    ax = ax or plt.gca()
    frame = pd.DataFrame(list(history)).T
    frame.columns = range(1, frame.shape[1] + 1)
    sns.heatmap(frame, cmap="viridis", ax=ax, cbar_kws={"label": "weight"}, yticklabels=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("term")
    ax.set_title(title)
    return ax


def weights_by_student(histories: Sequence[Sequence[Dict[str, float]]], num_exits: int, axes=None,
                       initial: Dict[str, float] | None = None, title: str = "Learned loss weights by student exit",
                       train_top1: Sequence[Sequence[Sequence[float]]] | None = None):
    """Small multiples, one panel per student exit: its CE weight (solid) and the weight of KD from each later
    exit (dashed, colour = teacher) over the epochs, log scale; one thin line per run (e.g. seed), so runs
    agreeing show as one bundle. `initial` (the weights before training) is drawn at epoch 0. `train_top1`
    (per run, per epoch, per exit: metrics.jsonl's train_top1) adds that exit's training top-1 on a right-hand
    axis (grey, dotted): whether the KD weights rise once its training CE saturates, or fall before."""
    if axes is None:
        cols = min(4, num_exits)
        rows = -(-num_exits // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), sharex=True, sharey=True,
                                 squeeze=False)
        fig.suptitle(title)
    axes = np.asarray(axes).ravel()
    # teachers told apart by hue; tab10 without its grey, which is the training accuracy's colour
    tab = [c for i, c in enumerate(sns.color_palette("tab10")) if i != 7]
    palette = tab if num_exits <= len(tab) else sns.color_palette("husl", num_exits)
    legend = {}  # label -> line: one legend for the figure, as a teacher has the same colour in every panel
    for i in range(num_exits):
        ax = axes[i]
        terms = [f"ce{i + 1}"] + [f"kd{i + 1}<-{j + 1}" for j in range(i + 1, num_exits)]
        for history in histories:
            frame = pd.DataFrame(list(history))
            if initial is not None:
                frame = pd.concat([pd.DataFrame([initial]), frame], ignore_index=True)
                frame.index = range(0, len(frame))
            else:
                frame.index = range(1, len(frame) + 1)
            for t in terms:
                if t not in frame:
                    continue
                j = int(t.split("<-")[1]) - 1 if "<-" in t else i
                ax.plot(frame.index, frame[t], color="black" if t.startswith("ce") else palette[j],
                        ls="-" if t.startswith("ce") else _teacher_dashes(t), lw=1.5, alpha=0.85,
                        label=("CE" if t.startswith("ce") else f"KD from {j + 1}") if history is histories[0] else None)
        ax.set_yscale("log")
        legend.update({label: line for line, label in zip(*ax.get_legend_handles_labels())})
        if train_top1 is not None:
            right = ax.twinx()
            for run in train_top1:
                right.plot(range(1, len(run) + 1), [100 * epoch[i] for epoch in run], color="grey", ls=":", lw=1.2,
                           label="train top-1" if run is train_top1[0] else None)
            right.set_ylim(0, 100)
            right.set_ylabel("train top-1 (%)", fontsize=7, color="grey")
            right.tick_params(labelsize=7, colors="grey")
            legend.update({label: line for line, label in zip(*right.get_legend_handles_labels())})
        ax.set_title(f"student exit {i + 1}", fontsize=9)
    for ax in axes[num_exits:]:
        ax.set_visible(False)
    for ax in axes[:num_exits]:
        ax.set_xlabel("epoch")
        ax.set_ylabel("weight")
        ax.xaxis.set_major_locator(plt.MaxNLocator(nbins=4, integer=True))  # whole epochs, labels apart
    fig = axes[0].figure
    box = fig.legend(list(legend.values()), list(legend), fontsize=LEGEND_FONTSIZE, handlelength=3,
                     loc="center right", frameon=False)
    fig.canvas.draw()  # the legend's width, so the panels (and their right-hand axis labels) keep clear of it
    fig.tight_layout(rect=(0, 0, 1 - box.get_window_extent().width / fig.bbox.width, 1))
    return axes
