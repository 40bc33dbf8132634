"""A study's records: the only code that knows the two files of results/<study>/ that hold its runs' numbers.

    runs.csv        one row per finished run: its name, variant and seed, the settings that vary across the study
                    (a readable copy; the whole config is in the `config` column, as JSON), per-exit test top-1
                    and top-5 (`test_top1[k]`: exit k) with each exit's FLOPs, the last epoch's training top-1 per exit, the final loss
                    weights (`weights:<term>`), epochs, training minutes, device, torch, commit, and the study
                    command that trained it with how many runs shared the device (`at_once`)
    curves.csv.gz   one row per run and epoch: every field of the run folder's metrics.jsonl, lists as
                    `name[k]` (k = exit, from 1) and maps as `name:key`; gzip without a time stamp, so the same
                    curves are the same bytes

A run's record is made from its run folder (config.json, metrics.jsonl, results.json) by `record_from_run_folder`:
after training, and for run folders trained elsewhere (`merge`). Floats are written with the shortest repr that
reads back exactly, so every table drawn from these files equals the one drawn from the run folders.
Both files are rewritten whole under the study's lock (two studies' chains may finish runs at once); curves first,
runs.csv last: a run is in the study when its row is.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import math
import re
from pathlib import Path
from typing import Dict, Iterable, List

import pandas as pd

from . import records
from .paths import atomic_write, atomic_write_text
from .runfolder import RunFolder

RUNS, CURVES, LOCK = "runs.csv", "curves.csv.gz", ".lock"
FIXED = ("run", "variant", "seed", "method")  # the first columns of runs.csv; then the settings that vary
NOT_SETTINGS = {"seed", "method", "out", "progress"}  # differ by design, or say nothing about the numbers
# pandas before 3 parses floats exactly only when asked to (3 always does, and deprecates the option)
EXACT_FLOATS = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
_ITEM = re.compile(r"^(.+)\[(\d+)\]$")


class StudyRecordError(ValueError):
    """A study's records cannot be read or would be contradicted: one line naming the file and what to do."""


def variant(run: str) -> str:
    """The run's name without its seed: what the summary averages over."""
    return run.rsplit("-seed", 1)[0]


def seed_of(run: str) -> int:
    """The run's seed: what pairs it with a run of another variant (same split and initial network)."""
    return int(run.rsplit("-seed", 1)[1])


# --- flat rows ----------------------------------------------------------------------------------------------
def flatten(row: Dict) -> Dict:
    """A record as one table row: a list becomes name[1], name[2], ...; a map becomes name:key."""
    flat = {}
    for name, value in row.items():
        if isinstance(value, (list, tuple)) and name != "config":
            flat.update({f"{name}[{k}]": v for k, v in enumerate(value, 1)})
        elif isinstance(value, dict) and name != "config":
            flat.update({f"{name}:{key}": v for key, v in value.items()})
        else:
            flat[name] = value
    return flat


def unflatten(flat: Dict) -> Dict:
    """The record of a table row (flatten's inverse); empty cells (another run's columns) are no entries."""
    row: Dict = {}
    for column, value in flat.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        value = value.item() if hasattr(value, "item") else value  # numpy scalars as Python numbers
        item = _ITEM.match(column)
        if item:
            row.setdefault(item[1], {})[int(item[2])] = value
        elif ":" in column:
            name, key = column.split(":", 1)
            row.setdefault(name, {})[key] = value
        else:
            row[column] = value
    for name, value in row.items():  # lists were stored as {position: value}
        if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
            row[name] = [value[k] for k in sorted(value)]
    return row


# --- a run's record -------------------------------------------------------------------------------------------
def record_from_run_folder(path, at_once="", invocation: str = "", started: str = "") -> tuple:
    """(runs.csv row, curve rows) of a finished run folder (or a results copy of one: config.json,
    metrics.jsonl, results.json)."""
    folder = RunFolder(path)
    result, began, curves = folder.results(), folder.config(), folder.metrics()
    if began is None or not curves:
        raise StudyRecordError(f"{folder.path} lacks {'config.json' if began is None else 'metrics'}: "
                               "finish or collect that run first")
    run = folder.path.name
    config = result["config"]
    row = {"run": run, "variant": variant(run), "seed": seed_of(run), "method": config["method"],
           "test_top1": [r["top1"] for r in result["anytime"]], "test_top5": [r["top5"] for r in result["anytime"]],
           "flops": [r["flops"] for r in result["anytime"]],
           "train_top1": curves[-1]["train_top1"], "weights": result["weights"], "epochs": len(curves),
           "train_minutes": sum(r["epoch_seconds"] for r in curves) / 60, "device": result["device"],
           "torch": result["packages"]["torch"], "commit": began["git_commit"], "at_once": str(at_once),
           "started": started, "invocation": invocation, "config": json.dumps(config, sort_keys=True)}
    return flatten(row), [flatten({"run": run, **r}) for r in curves]


# --- the files ------------------------------------------------------------------------------------------------
class Study:
    """results/<study>/: its runs (one row each) and their per-epoch curves."""

    def __init__(self, path):
        self.path = Path(path)
        self.name = self.path.name

    def exists(self) -> bool:
        return (self.path / RUNS).is_file()

    def runs(self) -> pd.DataFrame:
        if not self.exists():
            return pd.DataFrame(columns=list(FIXED))
        table = self._read_csv(RUNS)
        missing = [c for c in (*FIXED, "config") if c not in table.columns]
        if missing:
            raise StudyRecordError(f"{self.path / RUNS} lacks the columns {', '.join(missing)}: restore it from git")
        return table

    def curves(self) -> pd.DataFrame:
        if not (self.path / CURVES).is_file():
            return pd.DataFrame(columns=["run", "epoch"])
        return self._read_csv(CURVES)

    def _read_csv(self, name: str) -> pd.DataFrame:
        path = self.path / name
        try:
            data = records.read_gzip(path) if name.endswith(".gz") else records.read_bytes(path)
            return pd.read_csv(io.BytesIO(data), dtype={"at_once": str}, keep_default_na=False, na_values=[""],
                               **EXACT_FLOATS)
        except (OSError, ValueError, pd.errors.ParserError) as e:  # Unreadable is a ValueError
            reason = e.reason if isinstance(e, records.Unreadable) else f"{type(e).__name__}: {e}"
            raise StudyRecordError(f"{path} is unreadable ({reason}): restore it from git") from None

    # --- per run ----------------------------------------------------------------------------------------------
    def record(self, runs: pd.DataFrame, run: str) -> Dict:
        """A run's row as a record: lists per exit, maps of weights, the config as a dict."""
        row = unflatten(runs.loc[runs["run"] == run].iloc[0].to_dict())
        row["config"] = records.parse_json(row["config"], f"{self.path / RUNS}, run {run}'s config")
        return row

    def metrics(self, curves: pd.DataFrame, run: str) -> List[Dict]:
        """A run's epochs as metrics.jsonl held them."""
        rows = curves.loc[curves["run"] == run].sort_values("epoch")
        return [{k: v for k, v in unflatten(r).items() if k != "run"} for r in rows.to_dict("records")]

    # --- writing ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self):
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def add(self, new: Iterable[tuple], replace: bool = True) -> List[str]:
        """Put (row, curve rows) records in the study, under its lock. replace=False (a merge) refuses a run
        already there with other numbers, before anything is written. Returns the runs added or changed."""
        with self.locked():
            runs, curves = self.runs(), self.curves()
            changed = []
            for row, curve in new:
                mine = runs.loc[runs["run"] == row["run"]]
                if len(mine) and self.same(mine, curves, row, curve):
                    continue
                if len(mine) and not replace:
                    raise StudyRecordError(f"run {row['run']} differs between {self.path / RUNS} and the one "
                                           "merged; nothing was written: keep one by hand")
                runs = pd.concat([runs.loc[runs["run"] != row["run"]], pd.DataFrame([row])], ignore_index=True)
                curves = pd.concat([curves.loc[curves["run"] != row["run"]], pd.DataFrame(curve)], ignore_index=True)
                changed.append(row["run"])
            if changed:
                self._write(runs, curves)
            return changed

    def same(self, mine: pd.DataFrame, curves: pd.DataFrame, row: Dict, curve: List[Dict]) -> bool:
        """Whether a run's stored numbers are those of (row, curve): its provenance (at_once, started,
        invocation) aside."""
        provenance = {"at_once", "started", "invocation", "setting"}
        stored = {k: v for k, v in unflatten(mine.iloc[0].to_dict()).items() if k not in provenance}
        given = {k: v for k, v in unflatten(row).items() if k not in provenance}
        return stored == given and self.metrics(curves, row["run"]) == [
            {k: v for k, v in unflatten(r).items() if k != "run"} for r in curve]

    def _write(self, runs: pd.DataFrame, curves: pd.DataFrame) -> None:
        runs = runs.sort_values("run").reset_index(drop=True)
        curves = curves.sort_values(["run", "epoch"]).reset_index(drop=True)
        other = sorted((c for c in runs.columns if c not in FIXED and not c.startswith("setting:")), key=_rank)
        runs = pd.concat([runs[list(FIXED)], settings_table(runs, runs_setting_columns(runs)), runs[other]], axis=1)
        text = curves.to_csv(index=False, lineterminator="\n")
        atomic_write(self.path / CURVES, lambda tmp: Path(tmp).write_bytes(gzip.compress(text.encode(), mtime=0)))
        atomic_write_text(self.path / RUNS, runs.to_csv(index=False, lineterminator="\n"))


def _rank(column: str) -> int:
    """runs.csv's column groups in order: numbers per exit, weights, the rest, the config last (a stable sort
    keeps exits and terms in their order)."""
    groups = ("test_top1[", "test_top5[", "flops[", "train_top1[", "weights:")
    return next((i for i, g in enumerate(groups) if column.startswith(g)), len(groups)) + 2 * (column == "config")


def runs_setting_columns(runs: pd.DataFrame) -> List[str]:
    """The settings whose value differs between the study's runs (seed and method have their own columns)."""
    configs = [json.loads(c) for c in runs["config"]]
    keys = sorted({k for c in configs for k in c} - NOT_SETTINGS)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def settings_table(runs: pd.DataFrame, keys: List[str]) -> pd.DataFrame:
    configs = [json.loads(c) for c in runs["config"]]
    cells = [{k: json.dumps(c[k]) if isinstance(c.get(k), (list, dict)) else c.get(k) for k in keys} for c in configs]
    return pd.DataFrame(cells, columns=keys, index=runs.index).add_prefix("setting:")


def per_exit(runs: pd.DataFrame, quantity: str = "test_top1") -> pd.DataFrame:
    """One row per run and exit: run, variant, exit, and the quantity (test_top1, train_top1, ...) as `top1`."""
    columns = [c for c in runs.columns if _ITEM.match(c) and _ITEM.match(c)[1] == quantity]
    long = runs.melt(id_vars=["run", "variant"], value_vars=columns, var_name="exit", value_name="top1")
    long["exit"] = long["exit"].map(lambda c: int(_ITEM.match(c)[2]))
    return long.dropna(subset=["top1"]).sort_values(["run", "exit"]).reset_index(drop=True)


def studies(root) -> List[Study]:
    return [Study(p) for p in sorted(Path(root).iterdir()) if p.is_dir() and Study(p).exists()]
