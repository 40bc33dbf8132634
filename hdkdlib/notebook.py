"""Notebook support: checking papermill parameters against the types the parameters cell declares.

A notebook's `parameters` cell declares each parameter with its type, `epochs: int = 1`; papermill
injects plain assignments after it (`epochs = 300`). The cell after that calls
`check_parameters(globals())`, which compares every declared parameter's current value with its
declared type and stops the run with a message naming the parameter when they disagree, and stops it
too when a parameter the notebook does not declare was passed (a misspelt `-p epoch 300`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, NamedTuple


_PLAIN = (bool, int, float, str, list, dict, tuple, type(None))
_CHECKED = "_parameters_checked_in"  # set in a namespace once checked: the id of that namespace (not of a copy)


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def check_parameters(namespace: Dict[str, Any], choices: Dict[str, tuple] | None = None) -> Dict[str, Any]:
    """Validate the annotated parameters in `namespace` (a notebook's globals()); return them as a dict.

    An int is accepted (and converted) where a float or a str is declared, since `-p lr 1` arrives as an int.
    `choices` maps a parameter name to its valid values."""
    declared = namespace.get("__annotations__", {})
    if not declared:
        raise RuntimeError("no annotated parameters found: declare them in the parameters cell as `name: type = value`")
    # papermill injects plain assignments; a plain value under a name the parameters cell does not declare is a
    # misspelt parameter (`-p epoch 300`), which would otherwise be ignored without a word. Only at a kernel's
    # first check: once the cells after it have run, their own names (`m`, `params`) are in the namespace too, and
    # a person running the set-up cell again in a live kernel passed no parameter.
    if namespace.get(_CHECKED) != id(namespace):
        unknown = sorted(n for n, v in namespace.items() if n not in declared and not n.startswith("_")
                         and n not in ("In", "Out") and isinstance(v, _PLAIN))
        if unknown:
            raise NameError(f"unknown parameter{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}: this "
                            f"notebook declares {', '.join(declared)}")
    params = {}
    for name, expected in declared.items():
        value = namespace.get(name)
        # `-p lr 1` arrives as an int and `-p seeds 3` too: the declared type is what was meant
        if expected in (float, str) and isinstance(value, int) and not isinstance(value, bool):
            value = expected(value)
            namespace[name] = value
        ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
        if not ok:
            raise TypeError(f"parameter {name!r} must be {_type_name(expected)}, got {type(value).__name__} "
                            f"{value!r}; pass e.g. `-p {name} <{_type_name(expected)}>` to papermill")
        if choices and name in choices and value not in choices[name]:
            raise ValueError(f"parameter {name!r} is {value!r}; valid values: {', '.join(map(str, choices[name]))}")
        params[name] = value
    namespace[_CHECKED] = id(namespace)
    return params


def use_idle_cores() -> int:
    """Set torch's CPU threads to the cores idle now (at least 1, at most torch's default) and return the count.
    On a busy machine every thread beyond the idle cores makes each operation wait for a core: 2-5x slower
    steps were measured on 2 cores (benchmarks/RESULTS.md). Training runs choose again when they start."""
    import torch

    from .distributed import idle_threads
    threads = idle_threads()
    torch.set_num_threads(threads)
    return threads


QUICK_EPOCHS = 5  # with data_root "auto", runs shorter than this are quick demos on small fake data


def resolve_data(dataset: str, data_root: str, epochs: int, n_per_class: int = -1) -> Dict[str, Any]:
    """Turn a notebook's data parameters into trainer settings.

    data_root "auto": a run of fewer than QUICK_EPOCHS epochs is a quick demo on a small fake copy of the
    dataset in the exact on-disk format (written once under runs/fake-data/, ignored by git); a longer
    run uses the real dataset under data/ (CIFAR is downloaded on first use). n_per_class -1: a few
    images per class for a quick demo, all images otherwise. Any other data_root is used as given."""
    from . import data
    from .paths import data_dir, runs_dir
    quick = data_root == "auto" and epochs < QUICK_EPOCHS
    settings: Dict[str, Any] = {"quick": quick}
    if not quick:
        settings["data_root"] = str(data_dir()) if data_root == "auto" else data_root
        settings["n_per_class"] = 0 if n_per_class < 0 else n_per_class
        return settings
    root = runs_dir() / "fake-data" / dataset
    if dataset in ("cifar10", "cifar100"):
        manifest = data.cifar.folder(root, dataset) / data.cifar.FAKE_MANIFEST
        if not manifest.is_file() or manifest.read_text().strip() == "{}":  # none yet, or a write stopped half-way
            k = data.CIFAR_SPECS[dataset]["num_classes"]
            data.write_fake_cifar(root, dataset, n_train=6 * k, n_test=2 * k, seed=0)
        per_class, val = 3, 1
    elif dataset in ("folder", "folder32"):
        if not (root / "val").is_dir():
            data.write_fake_image_folder(root, classes=[f"n{i:08d}" for i in range(10)], n_per_class=(6, 2),
                                         size=32 if dataset == "folder32" else 64, ext=".jpg")
        per_class, val = 4, 1
    else:  # synthetic: generated in memory, nothing to write
        per_class, val = 60, 10
    settings.update(data_root=str(root), split_dir=str(root / "splits"), val_per_class=val,
                    n_per_class=per_class if n_per_class < 0 else n_per_class)
    return settings


def clear_counts_without_outputs(path) -> bool:
    """Remove the execution count ([1]:, [2]: ...) of every code cell that keeps no output, so an unrun notebook
    shows no numbers; cells whose outputs are kept (nbval compares them) keep theirs, which nbval requires.
    Returns whether the file changed (`make strip` runs it after nbstripout --keep-count)."""
    import nbformat
    nb = nbformat.read(str(path), as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code" and not cell.outputs and cell.execution_count is not None:
            cell.execution_count, changed = None, True
    if changed:
        nbformat.write(nb, str(path))
    return changed


PATH_PARAMETERS = ("data_root", "out_dir", "run_dir")


def project_path(value: str) -> str:
    """A path parameter as the notebooks mean it: "" and "auto" as they are, an absolute path as given, and a
    relative one from the project root. The notebooks print their paths that way (paths.display_path), while a
    kernel starts in notebooks/ under JupyterLab and `make run` and wherever papermill was called otherwise."""
    from .paths import project_root
    if value in ("", "auto"):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else project_root() / path)


class Setup(NamedTuple):
    params: Dict[str, Any]  # the checked parameters
    data: Dict[str, Any]    # trainer settings of the notebook's data (empty when it trains on none)
    quick: bool             # a quick demo on small fake data: its numbers mean nothing


def set_up(namespace: Dict[str, Any], choices: Dict[str, tuple] | None = None, dataset: str | None = None) -> Setup:
    """The set-up cell every notebook shares: its parameters checked (check_parameters), its path parameters taken
    from the project root (project_path), torch's threads set to the idle cores (use_idle_cores) and, for a
    notebook that trains on `dataset`, the data settings its data_root, epochs and n_per_class parameters give
    (resolve_data)."""
    params = check_parameters(namespace, choices)
    for name in PATH_PARAMETERS:
        if name in params:
            namespace[name] = params[name] = project_path(params[name])
    use_idle_cores()
    if dataset is None:
        return Setup(params, {}, False)
    data = resolve_data(dataset, params["data_root"], params["epochs"], params.get("n_per_class", -1))
    return Setup(params, data, data.pop("quick"))


def run_folder(notebook: str, name: str, epochs: int, seed: int, quick: bool) -> str:
    """A notebook's default run folder, runs/<notebook>/<name>-e<epochs>-seed<seed>[-quick]: another number of
    epochs is another run, so `-p epochs 300` after a 30-epoch run starts its own folder instead of meeting the
    other run's settings. A run begun in the former default folder (named without its epochs) with these epochs
    goes on there, so it stays resumable."""
    from .paths import runs_dir
    from .runfolder import RunFolder
    suffix = "-quick" if quick else ""
    former = runs_dir() / notebook / f"{name}-seed{seed}{suffix}"
    try:
        recorded = (RunFolder(former).config() or {}).get("config", {}).get("epochs")
    except (OSError, ValueError):  # a damaged former folder is left alone: the run goes to the new name
        recorded = None
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded == epochs:
        return str(former)
    return str(runs_dir() / notebook / f"{name}-e{epochs}-seed{seed}{suffix}")


# -- tables: accuracy in percent, labelled, with the exits numbered as the library numbers them (1..K)

def percent(fraction: float) -> float:
    """A fraction in [0, 1] as percent: every notebook table reports accuracy in percent, its column saying so."""
    return 100.0 * fraction


def _flops_unit(largest: float, unit: str = "FLOPs"):
    """The cost column's unit: MFLOPs for networks, kFLOPs for toys whose cost would round to 0.00 MFLOPs."""
    return (f"M{unit}", 1e6) if largest >= 1e6 else (f"k{unit}", 1e3)


def anytime_table(rows, digits: int = 2, unit: str = "FLOPs"):
    """evaluation.anytime's rows as a table: index "exit" 1..K, cost in MFLOPs (`unit`: what the cost counts,
    cost.unit of results.json's cost_convention), "top-1 (%)" and "top-5 (%)"."""
    import pandas as pd
    t = pd.DataFrame(rows).set_index("exit")
    table = pd.DataFrame(index=t.index)
    if "flops" in t:
        column, scale = _flops_unit(t.flops.max(), unit)
        table[column] = t.flops / scale
    table["top-1 (%)"], table["top-5 (%)"] = percent(t.top1), percent(t.top5)
    return table.round(digits)


def budget_table(rows, every: int = 1, ms: list | None = None, digits: int = 2, unit: str = "FLOPs"):
    """evaluation.budgeted's rows (every `every`-th) as a table: the exit-rate parameter p, cost in MFLOPs per
    image (`unit` as anytime_table's), "accuracy (%)" and, given `ms` (milliseconds per image, one per row), the
    measured time."""
    import pandas as pd
    t = pd.DataFrame(rows)
    column, scale = _flops_unit(t.flops.max(), unit)
    table = pd.DataFrame({"p": t.p, f"{column}/img": t.flops / scale, "accuracy (%)": percent(t.accuracy)})
    if ms is not None:
        table["ms/img"] = ms
    return table.iloc[::every].round(digits).set_index("p")


def accuracy_by_exit(accuracies: dict, digits: int = 1):
    """{method: [accuracy of exit 1..K as a fraction]} as a table: one row per method, columns "exit k" in
    percent (the column group says so)."""
    import pandas as pd
    table = pd.DataFrame({m: [percent(a) for a in accs] for m, accs in accuracies.items()}).T
    table.columns = pd.Index(range(1, table.shape[1] + 1), name="test top-1 (%) at exit")
    table.index.name = "method"
    return table.round(digits)


def what_was_done(trainer) -> str:
    """One line for a notebook's training cell, so that it reads differently when it trained and when it only
    loaded a finished run: "trained 3 epochs in runs/...", "loaded the finished run from runs/... (nothing
    trained)", "continued the interrupted run in runs/... to epoch 3", "evaluated the trained run in runs/..."."""
    from .paths import display_path
    where, epochs = display_path(trainer.cfg.out), trainer.cfg.epochs
    action = trainer.action
    if action == "load":
        return f"loaded the finished run from {where} (nothing trained; another out folder trains anew)"
    if action == "continue":
        return f"continued the interrupted run in {where} to epoch {epochs}"
    if action == "evaluate":
        return f"evaluated the trained run in {where}"
    return f"trained {epochs} epoch{'s' * (epochs != 1)} in {where}"
