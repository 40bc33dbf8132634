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
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import pandas as pd

from . import config, records
from .paths import atomic_write, atomic_write_text, open_lock_file
from .resume import comparable, completed_config, settings_differ, stored_config, unused_settings
from .runfolder import RunFolder

RUNS, CURVES, LOCK = "runs.csv", "curves.csv.gz", ".lock"
INDEX_LOCK = ".index.lock"  # in the results folder: one index writer at a time, reading every study's records
FIXED = ("run", "variant", "seed", "method")  # the first columns of runs.csv; then the settings that vary
NOT_SETTINGS = {"seed", "method", "out", "progress"}  # differ by design, or say nothing about the numbers
# where and how fast a run trained: runs of one protocol may differ in these (a GPU's seeds pool with a CPU's)
# (bf16 is no such setting: it changes the numbers, not only the speed)
NOT_PROTOCOL = ((set(config.OPTION_GROUPS["speed"]) - {"bf16"}) | set(config.OPTION_GROUPS["run"])
                | {"data_root", "split_dir", "workers", "download"})
# pandas before 3 parses floats exactly only when asked to (3 always does, and deprecates the option)
EXACT_FLOATS = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
# a seed without leading zeros: seed01 would be a second run of seed 1, averaged with it
RUN_NAME = re.compile(r"^[A-Za-z0-9_.+]+(-[A-Za-z0-9_.+*]+)*-seed(0|[1-9][0-9]*)$")
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
    for name, value in row.items():  # lists were stored as {position: value}; a missing value inside stays NaN
        if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
            row[name] = [value.get(k, math.nan) for k in range(1, max(value) + 1)]
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
    differ = settings_differ(began.get("config") or {}, stored_config(config) if isinstance(config, dict) else {})
    if differ:  # a results.json of another run copied in beside this one's files
        raise StudyRecordError(f"{folder.path}: results.json is not the result of the run config.json began "
                               f"({', '.join(differ[:4])} differ): copy the whole run folder again")
    if [r["epoch"] for r in curves] != list(range(1, config["epochs"] + 1)):
        raise StudyRecordError(f"{folder.path / 'metrics.jsonl'} holds {len(curves)} of the run's {config['epochs']} "
                               "epochs (a cut-short or partial copy): copy the whole run folder again")
    row = {"run": run, "variant": variant(run), "seed": seed_of(run), "method": config["method"],
           "test_top1": [r["top1"] for r in result["anytime"]], "test_top5": [r["top5"] for r in result["anytime"]],
           "flops": [r["flops"] for r in result["anytime"]],
           "train_top1": curves[-1]["train_top1"], "weights": result["weights"], "epochs": len(curves),
           "train_minutes": sum(r["epoch_seconds"] for r in curves) / 60, "device": result["device"],
           "torch": result["packages"]["torch"], "commit": began["git_commit"], "at_once": str(at_once),
           "started": started, "invocation": invocation, "config": json.dumps(config, sort_keys=True)}
    fingerprint = (result.get("data") or {}).get("sha256")  # runs of older commits recorded none
    if isinstance(fingerprint, str):
        row["data_sha256"] = fingerprint
    # curves hold numbers; how an epoch's steps ran (its step_mode) is the run folder's, not the study's
    return flatten(row), [flatten({"run": run, **{k: v for k, v in r.items() if k not in NOT_CURVES}}) for r in curves]


# --- the files ------------------------------------------------------------------------------------------------
TEXT = ("run", "variant", "method", "device", "torch", "commit", "data_sha256", "at_once", "started", "invocation",
        "config")
NEEDED_CURVES = ("run", "epoch", "epoch_seconds", "images_per_s", "train_top1[1]", "val_top1[1]")
NOT_CURVES = ("step_mode",)  # metrics.jsonl's text fields
PROVENANCE = ("at_once", "started", "invocation")  # how a run was trained, not what it measured
# runs.csv's last columns, in order
REST = ("epochs", "train_minutes", "device", "torch", "commit", "data_sha256", *PROVENANCE)


class Study:
    """results/<study>/: its runs (one row each) and their per-epoch curves."""

    def __init__(self, path):
        self.path = Path(path)
        self.name = self.path.name

    def exists(self) -> bool:
        return (self.path / RUNS).is_file()

    def load(self) -> tuple:
        """(runs, curves), checked: a damaged or foreign record is one StudyRecordError naming it."""
        runs = self._read_csv(RUNS) if self.exists() else pd.DataFrame(columns=[*FIXED, "config"])
        curves = self._read_csv(CURVES) if (self.path / CURVES).exists() else pd.DataFrame(columns=["run", "epoch"])
        if self.exists():
            self.check(runs, curves)
        return runs, curves

    def runs(self) -> pd.DataFrame:
        return self.load()[0]

    def curves(self) -> pd.DataFrame:
        return self.load()[1]

    def _read_csv(self, name: str) -> pd.DataFrame:
        path = self.path / name
        try:
            data = records.read_gzip(path) if name.endswith(".gz") else records.read_bytes(path)
            return pd.read_csv(io.BytesIO(data), dtype={c: str for c in TEXT}, keep_default_na=False,
                               na_values=[""], **EXACT_FLOATS)
        except (OSError, ValueError, pd.errors.ParserError) as e:  # Unreadable is a ValueError
            reason = e.reason if isinstance(e, records.Unreadable) else f"{type(e).__name__}: {e}"
            raise StudyRecordError(f"{path} is unreadable ({reason}): restore it from git") from None

    def check(self, runs: pd.DataFrame, curves: pd.DataFrame) -> None:
        """Every row a run of this study with the numbers a summary reads, every run with its curves."""
        def refuse(line, what):
            raise StudyRecordError(f"{self.path / RUNS}{f', line {line}' if line else ''}: {what}: restore it from "
                                   "git (or merge the run again from its run folder)")
        missing = [c for c in (*FIXED, "config", "commit", "device", "torch", "test_top1[1]") if c not in runs.columns]
        if missing:
            refuse(0, f"lacks the columns {', '.join(missing)}")
        exits = [c for c in runs.columns if c.startswith("test_top1[")]
        for line, row in enumerate(runs.to_dict("records"), 2):
            run = row["run"]
            if not isinstance(run, str) or not RUN_NAME.match(run):
                refuse(line, f"{run!r} is not a run's name (<method>[-<tag>]-seed<k>)")
            if row["seed"] != seed_of(run) or row["variant"] != variant(run):
                refuse(line, f"its seed {row['seed']!r} and variant {row['variant']!r} are not those of {run}")
            try:
                settings = records.parse_json(row["config"] if isinstance(row["config"], str) else "",
                                              f"run {run}'s config")
                if not isinstance(settings, dict) or settings.get("method") != row["method"]:
                    raise ValueError(f"not the settings of a {row['method']!r} run")
                if settings.get("seed", row["seed"]) != row["seed"]:  # the summary pairs runs by their names' seed
                    raise ValueError(f"trained with seed {settings.get('seed')!r}, not its name's {row['seed']}")
                epochs = completed_config(settings).epochs
            except ValueError as e:
                refuse(line, f"{run}'s config is not a run's settings ({e})")
            if run.split("-")[0] != row["method"]:  # the summary pairs runs by the method their name gives
                refuse(line, f"{run} is the name of no {row['method']!r} run (<method>[-<tag>]-seed<k>)")
            if not all(isinstance(row[c], str) and row[c] for c in ("commit", "device", "torch")):
                refuse(line, f"{run} lacks its commit, device or torch version")
            top1 = [row[c] for c in exits]
            if not all(isinstance(t, float) and (math.isnan(t) or 0 <= t <= 1) for t in top1) or math.isnan(top1[0]):
                refuse(line, f"{run}'s test top-1 per exit must be fractions in [0, 1], got {top1}")
            if any(math.isnan(t) for t in top1[:sum(not math.isnan(t) for t in top1)]):  # exits 1..k, no gap
                refuse(line, f"{run}'s test top-1 lacks an exit before its last one, got {top1}")
            if row.get("epochs") != epochs:
                refuse(line, f"{run} records {row.get('epochs')} epochs of its config's {epochs}")
            data = row.get("data_sha256", math.nan)
            if not (isinstance(data, float) and math.isnan(data)) and not (
                    isinstance(data, str) and re.fullmatch(r"[0-9a-f]{64}", data)):
                refuse(line, f"{run}'s data_sha256 {data!r} is no sha256 digest")
        if runs["run"].duplicated().any():
            refuse(0, f"lists {runs['run'][runs['run'].duplicated()].iloc[0]} twice")
        if runs.empty:
            return
        counts = runs[exits].notna().sum(axis=1).groupby(runs["variant"]).nunique()
        if (counts > 1).any():  # the summary's mean over exits would be over fewer exits for one seed
            refuse(0, f"the {counts[counts > 1].index[0]} runs record test top-1 for different numbers of exits")
        lacking = [c for c in NEEDED_CURVES if c not in curves.columns]
        if lacking:
            raise StudyRecordError(f"{self.path / CURVES} lacks the columns {', '.join(lacking)}: restore it from git")
        without = sorted(set(runs["run"]) - set(curves["run"]))
        if without:
            raise StudyRecordError(f"{self.path / CURVES} has no epochs of {', '.join(without[:3])}: restore it "
                                   "from git (or merge the run again from its run folder)")
        if not pd.api.types.is_integer_dtype(curves["epoch"]) or not all(
                map(pd.api.types.is_numeric_dtype, curves.drop(columns="run").dtypes)):
            raise StudyRecordError(f"{self.path / CURVES} holds a value that is not a number (or a fractional "
                                   "epoch): restore it from git")
        held = curves.groupby("run")["epoch"].agg(sorted)
        for run, epochs in zip(runs["run"], runs["epochs"]):
            if held[run] != list(range(1, int(epochs) + 1)):
                raise StudyRecordError(f"{self.path / CURVES} does not hold epochs 1-{int(epochs)} of {run} once each: "
                                       "restore it from git (or merge the run again from its run folder)")
        accuracies = curves[[c for c in curves.columns if re.match(r"^\w*top[15]\[", c)]]
        temperature = curves["temperature"] if "temperature" in curves.columns else pd.Series(dtype=float)
        if ((accuracies < 0) | (accuracies > 1)).any().any() or (temperature <= 0).any():
            raise StudyRecordError(f"{self.path / CURVES} holds an accuracy outside [0, 1] or a temperature <= 0: "
                                   "restore it from git")

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
    def locked(self):
        """The study's lock (flock): the chains of one study record and summarise one at a time."""
        return locked(self.path / LOCK)

    def add(self, new: Iterable[tuple], on_differ: Optional[Callable[[str], None]] = None) -> List[str]:
        """Put (row, curve rows) records in the study, under its lock; returns the runs added. A run already there
        with the same numbers is left as it is; with other numbers: it stays as recorded, and on_differ(run) is
        told, or without on_differ nothing is written and the error names it; a run with other settings than its
        variant's runs, or a record that is no run's: nothing is written and the error names it."""
        with self.locked():
            runs, curves = self.load()
            rows, epochs, added = runs.to_dict("records"), curves.to_dict("records"), []
            for row, curve in new:
                mine = runs.loc[runs["run"] == row["run"]]
                if len(mine):
                    if not self.same(mine, curves, row, curve):
                        if on_differ is None:
                            raise StudyRecordError(f"run {row['run']} differs between {self.path / RUNS} and the "
                                                   "one given; nothing was written: keep one by hand")
                        on_differ(row["run"])
                    continue
                self._refuse_other_protocol(rows, row)
                epochs = [e for e in epochs if e["run"] != row["run"]] + list(curve)  # drops a crash's leftovers
                rows.append(row)
                added.append(row["run"])
            if added:
                runs, curves = pd.DataFrame(rows), pd.DataFrame(epochs)
                self.check(runs, curves)
                self._write(runs, curves)
            return added

    def _refuse_other_protocol(self, rows: List[Dict], row: Dict) -> None:
        """A variant's runs differ in their seed only: a run with other settings (another protocol, begun under
        another command) is refused, naming the settings, before anything is written. Where the run trained, on
        which device and how fast are no settings of the protocol; settings one run lacks (added to the library
        after it began) count at the value that reproduces them."""
        # completed as a resume completes them: a setting one run lacks counts at the value that reproduces it
        # (kd_share 0.3 against an older run without kd_share is another protocol); unused ones are not compared
        data = row.get("data_sha256")
        for other in rows:  # the summary pairs any two variants' runs by seed: all of them saw the same data
            if isinstance(data, str) and isinstance(other.get("data_sha256"), str) and other["data_sha256"] != data:
                raise StudyRecordError(
                    f"run {row['run']} trained on other data than {other['run']} in {self.path / RUNS} (decoded "
                    f"pixels and labels sha256 {data[:12]}..., not {other['data_sha256'][:12]}...): a run on other "
                    "data is never mixed into a study; nothing was written. Record it in another study (--name)")
        given = stored_config(json.loads(row["config"]))
        for other in (stored_config(json.loads(r["config"])) for r in rows if r["variant"] == row["variant"]):
            skip = NOT_PROTOCOL | (unused_settings(given).keys() & unused_settings(other).keys())
            differ = [k for k in sorted(set(given) | set(other)) if k not in skip
                      and comparable(given.get(k)) != comparable(other.get(k))]
            if differ:
                raise StudyRecordError(
                    f"run {row['run']} has other settings than the {row['variant']} runs in {self.path / RUNS} ("
                    + ", ".join(f"{k}: {given.get(k)!r}, not {other.get(k)!r}" for k in differ[:4])
                    + "): a run of another protocol is never mixed into a study; nothing was written. Give it "
                      "another --tag or --name")

    def same(self, mine: pd.DataFrame, curves: pd.DataFrame, row: Dict, curve: List[Dict]) -> bool:
        """Whether a run's stored numbers are those of (row, curve), its provenance aside (resume.comparable: NaN
        equals NaN, 60 equals 60.0, as a CSV column read back may turn one into the other)."""
        def numbers(record):
            return comparable({k: v for k, v in unflatten(record).items() if k not in (*PROVENANCE, "setting")})
        theirs = sorted(({k: v for k, v in unflatten(r).items() if k != "run"} for r in curve), key=lambda r: r["epoch"])
        return (numbers(mine.iloc[0].to_dict()) == numbers(row)
                and comparable(self.metrics(curves, row["run"])) == comparable(theirs))

    def _write(self, runs: pd.DataFrame, curves: pd.DataFrame) -> None:
        """Columns in a fixed order (the same records are the same bytes, whatever order the runs came in)."""
        runs = runs.sort_values("run").reset_index(drop=True)
        curves = curves.sort_values(["run", "epoch"]).reset_index(drop=True)
        other = sorted((c for c in runs.columns if c not in FIXED and not c.startswith("setting:")), key=_rank)
        runs = pd.concat([runs[list(FIXED)], settings_table(runs, runs_setting_columns(runs)), runs[other]], axis=1)
        curves = curves[["run", "epoch", *sorted((c for c in curves.columns if c not in ("run", "epoch")), key=_order)]]
        text = curves.to_csv(index=False, lineterminator="\n")
        atomic_write(self.path / CURVES, lambda tmp: Path(tmp).write_bytes(gzip.compress(text.encode(), mtime=0)))
        atomic_write_text(self.path / RUNS, runs.to_csv(index=False, lineterminator="\n"))


def _order(column: str) -> tuple:
    """A column's place among its kind: lists by exit, maps and the rest by name."""
    item = _ITEM.match(column)
    return (item[1], int(item[2])) if item else (column, 0)


def _rank(column: str) -> tuple:
    """runs.csv's columns in order: numbers per exit, weights, the rest in REST's order, the config last."""
    groups = ("test_top1[", "test_top5[", "flops[", "train_top1[", "weights:")
    group = next((i for i, g in enumerate(groups) if column.startswith(g)), len(groups))
    return group + 2 * (column == "config"), REST.index(column) if column in REST else len(REST), _order(column)


def runs_setting_columns(runs: pd.DataFrame) -> List[str]:
    """The settings whose value differs between the study's runs (seed and method have their own columns)."""
    configs = [json.loads(c) for c in runs["config"]]
    keys = sorted({k for c in configs for k in c} - NOT_SETTINGS)
    return [k for k in keys if len({comparable(c.get(k)) for c in configs}) > 1]


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


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive flock on the lock file path (created, with its folder, if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_lock_file(path, StudyRecordError)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def studies(root) -> List[Study]:
    return [Study(p) for p in sorted(Path(root).iterdir()) if p.is_dir() and Study(p).exists()]
