"""The toy problem of notebook 01: 2-D interleaved spirals, where deeper exits beat shallow ones,
and a small full-batch training loop (with the optional bilevel weight update) to study objectives."""
from __future__ import annotations

import math
from typing import Dict, List

import torch


from . import bilevel
from .step import TrainStep
from .progress import bar as progress_bar
from .distributed import cpu_threads
from .models import evaluating
from .objectives import Objective


def spirals(n: int, num_classes: int = 3, turns: float = 1.5, noise: float = 0.15, seed: int = 0):
    """`n` points on `num_classes` interleaved spiral arms in [-1, 1]^2, with Gaussian noise."""
    if n < num_classes:
        raise ValueError(f"need at least one point per class: n={n} < num_classes={num_classes}")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    r = torch.rand(n, generator=g).sqrt()  # uniform density over the disc
    angle = r * turns * 2 * math.pi + y * (2 * math.pi / num_classes)
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1)
    x = x + noise * r.unsqueeze(1) * torch.randn(n, 2, generator=g)
    perm = torch.randperm(n, generator=g)
    return x[perm], y[perm]


def accuracy(model, x, y) -> List[float]:
    with evaluating(model):
        return [(z.argmax(1) == y).float().mean().item() for z in model(x)]


def fit(model, objective: Objective, train, val=None, *, steps: int = 500, lr: float = 0.1, momentum: float = 0.9,
        weight_decay: float = 1e-4, meta_interval: int = 1, meta_lr: float = 0.01, meta_method: str = "finite_difference",
        val_loss: str = "balanced", seed: int = 0, log_every: int = 10, progress: bool = True,
        threads: int = 1) -> Dict[str, list]:
    """Full-batch SGD on `train`; if the objective has learned weights, the bilevel step on `val`
    every `meta_interval` steps. Returns the history: step, train loss, per-exit val accuracy, weights.

    threads: torch's CPU threads during the fit (0: leave torch's setting). A toy model's operations are too
    small to share: one thread is faster, and far faster on a busy machine (benchmarks/threads.py)."""
    torch.manual_seed(seed)
    learned = bool(list(objective.parameters()))
    if learned and val is None:
        raise ValueError(f"{type(objective).__name__} learns its weights on held-out data: pass val=(x, y)")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    meta = bilevel.MetaStep(model, objective, lr=meta_lr, method=meta_method, val_loss=val_loss) if learned else None
    history: Dict[str, list] = {"step": [], "loss": [], "val_accuracy": [], "weights": []}
    model.train()
    train_step = TrainStep(model, objective, opt, meta)
    with cpu_threads(threads):
        for step in progress_bar(range(1, steps + 1), desc=type(objective).__name__, disable=not progress):
            due = meta is not None and step % meta_interval == 0
            loss, logits = train_step(train, val if due else None)
            if step % log_every == 0 or step == steps:
                history["step"].append(step)
                history["loss"].append(float(loss.detach()))
                history["val_accuracy"].append(accuracy(model, *val) if val is not None else None)
                history["weights"].append(objective.named_weights())
    return history


def decision_grid(model, resolution: int = 150, extent: float = 1.3):
    """Predicted class of every exit on a resolution x resolution grid over [-extent, extent]^2."""
    axis = torch.linspace(-extent, extent, resolution)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with evaluating(model):
        preds = [z.argmax(1).reshape(resolution, resolution) for z in model(points)]
    return axis, preds
