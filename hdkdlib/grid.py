"""A grid of runs (notebook 05's ablations): each a name and the settings that differ from a base run, trained
or picked up in its own folder, in an order where a run that starts from another's result comes after it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from .config import TrainConfig

DEPENDS_ON = ("init_from", "freeze_weights_from")  # settings naming another run's folder or results


def folder_name(name: str) -> str:
    """A run's folder under the grid's root: "hdkd init=ds" -> hdkd_init-ds. A name that would leave the root or
    name no folder is refused."""
    folder = name.replace(" ", "_").replace("=", "-")
    if folder in ("", ".", "..") or "/" in folder or "\\" in folder:
        raise ValueError(f"grid run name {name!r} makes no folder of its own under the grid's root: use letters, "
                         "digits, spaces and = + - . in run names")
    return folder


def _where(path) -> str:  # a folder as compared: absolute, so a relative and an absolute root name one folder
    return os.path.abspath(path)


def ablation_grid(methods: List[str], root, variants: bool = True) -> Dict[str, Dict]:
    """The methods, IMTA's two stages (with imta_kd) and, with variants, the HDKD choices of the method card."""
    root = Path(root)
    grid = {name: dict(method=name) for name in methods}
    if "imta_kd" in methods:  # IMTA as its authors ran it: CE with gradient equilibrium, then new classifiers with KD
        grid["ce+GE"] = dict(method="ce", gradient_equilibrium=True)
        grid["imta 2-stage"] = dict(method="imta_kd", init_from=str(root / folder_name("ce+GE")),
                                    train_heads_only=True)
    if variants:
        if "hdkd" not in grid:  # the frozen variant keeps the hdkd run's final weights
            grid["hdkd"] = dict(method="hdkd")
        grid.update({
            "hdkd init=ds": dict(method="hdkd", init="ds"),
            "hdkd init=random": dict(method="hdkd", init="random"),
            "hdkd frozen": dict(method="hdkd", freeze_weights_from=str(root / "hdkd")),
            "hdkd val=ce": dict(method="hdkd", val_loss="ce"),
            # the balanced loss at alpha 1 is val=ce's: its other end, the ratio term alone
            "hdkd alpha=0": dict(method="hdkd", alpha=0.0),
            "hdkd exact": dict(method="hdkd", meta_method="exact"),
            "hdkd meta_interval=5": dict(method="hdkd", meta_interval=5),  # must fit an epoch (9 steps, quick mode)
            "hdkd T=3": dict(method="hdkd", temperature=3.0),
            "hdkd softplus": dict(method="hdkd", weight_map="softplus"),
        })
    return grid


def run_order(grid: Dict[str, Dict], root) -> List[str]:
    """The grid's names, each after the runs whose folders its settings name (init_from, freeze_weights_from)."""
    root = Path(root)
    by_folder: Dict[str, str] = {}
    for n in grid:  # two runs in one folder would train into each other (and one would be dropped from the result)
        folder = _where(root / folder_name(n))
        if folder in by_folder:
            raise ValueError(f"grid runs {by_folder[folder]!r} and {n!r} would share the folder {folder_name(n)}: "
                             "rename one")
        by_folder[folder] = n
    named = {n: [_where(s[k]) for k in DEPENDS_ON if s.get(k)] for n, s in grid.items()}  # folders it names
    needs = {n: [by_folder[f] for f in folders if f in by_folder] for n, folders in named.items()}
    order: List[str] = []

    def visit(name, path=()):
        if name in path:
            raise ValueError(f"the grid's runs depend on each other in a circle: {' -> '.join((*path, name))}")
        if name not in order:
            for dep in needs[name]:
                visit(dep, (*path, name))
            order.append(name)
    for name in grid:
        visit(name)
    return order


def run_grid(base: Dict, grid: Dict[str, Dict], root, data_bundle=None) -> Dict[str, str]:
    """Train (or pick up) every run of the grid under root/<folder>, all on the same data and split; returns
    {folder: name}. Finished runs are loaded, not retrained, so the grid can be filled over several sessions."""
    from . import train
    bundle: Optional[object] = data_bundle
    for name in run_order(grid, root):
        cfg = TrainConfig(**{**base, **grid[name]}, out=str(Path(root) / folder_name(name))).validate()
        trainer, _ = train.run(cfg, data_bundle=bundle)
        bundle = trainer.data
    return {folder_name(n): n for n in grid}
