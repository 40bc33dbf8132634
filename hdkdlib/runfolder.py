"""The run folder: the only code that knows the names of the files in it, and how each is written.

    config.json        every setting, commit, packages, device, split checksum, the data's fingerprint (written
                       when the run begins; each resume adds its commit, packages and device under "resumed")
    metrics.jsonl      one line per finished epoch
    checkpoint.pt      written every epoch and on Ctrl-C / SIGTERM; the one before is kept as checkpoint.prev.pt
    model.pt           the final network: its presence means training finished
    results.json       the evaluation (anytime, budgeted, weights, ...): with model.pt, the run is finished
    .lock              held (flock) by the process training in the folder, with its pid

Every file is written atomically (a temporary file renamed over the old one), so a kill at any moment
leaves either the old or the new version. Every file is read through hdkdlib.records: checkpoints hold tensors
and plain values only and are loaded with weights_only=True (no file in a run folder can make us execute code),
JSON records are bounded in size and depth.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import records
from .paths import atomic_write, atomic_write_text, open_lock_file

CONFIG, METRICS, RESULTS = "config.json", "metrics.jsonl", "results.json"
RESUME_PROVENANCE = ("git_commit", "packages", "device", "threads_used", "step_mode")  # what each resume records
CHECKPOINT, PREVIOUS, MODEL, LOCK = "checkpoint.pt", "checkpoint.prev.pt", "model.pt", ".lock"
CHECKPOINT_KEYS = {"model", "objective", "optimizer", "epoch", "batch", "step", "meta_steps", "accumulators", "config"}
FILES = (CONFIG, METRICS, RESULTS, CHECKPOINT, PREVIOUS, MODEL, LOCK)


class RunFolderBusy(RuntimeError):
    pass


class RunFolderDamaged(ValueError):
    """A record in the run folder cannot be read: resuming would fail the same way, so the message says what to
    do instead."""


class RunFolderMismatch(ValueError):
    """The run folder holds a run with other settings or data than given: the same command with --resume would
    be refused the same way."""


def _warn(message: str) -> None:
    print(f"hdkdlib: {message}", file=sys.stderr)


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        self._lock_file = None

    def __repr__(self):
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # --- questions --------------------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the folder holds a run (its config.json); one clear error where it cannot hold one, or where one
        of its files is a directory: every step in it would fail on that, resuming included."""
        self._refuse_damaged()
        return self.file(CONFIG).is_file()

    def _refuse_damaged(self) -> None:
        for place in (self.path, *self.path.parents):
            if place.exists():
                if not place.is_dir():
                    where = "is a file" if place == self.path else f"lies under {place}, a file"
                    raise ValueError(f"run folder {self.path} {where}, not a folder: choose another out folder (--out)")
                break
        for name in FILES:
            if self.file(name).exists() and not self.file(name).is_file():
                kind = "a directory" if self.file(name).is_dir() else "not a regular file"
                raise RunFolderDamaged(f"{name} in {self.path} is {kind}, not a file: move it out of the way or "
                                       "restore the file from a copy of the run folder, or choose another out folder")

    def finished(self) -> bool:
        """Trained and evaluated: model.pt and results.json are both there."""
        return self.file(MODEL).is_file() and self.file(RESULTS).is_file()

    def evaluated(self) -> bool:
        """results.json is there (also in a copy of the run's metrics without its weights, as in results/)."""
        return self.file(RESULTS).is_file()

    def trained(self) -> bool:
        return self.file(MODEL).is_file()

    def records_without_config(self) -> List[str]:
        """The run's files present in a folder whose config.json is missing (deleted, or never copied): such a
        folder is not empty, and a new run there would overwrite a run whose settings are unknown."""
        if self.exists():
            return []
        return [n for n in (CHECKPOINT, PREVIOUS, MODEL, RESULTS, METRICS) if self.file(n).exists()]

    def refuse_if_records_without_config(self) -> None:
        found = self.records_without_config()
        if found:
            raise FileExistsError(f"run folder {self.path} holds {', '.join(found)} but no {CONFIG}: a run whose "
                                  f"settings are unknown, which a new run would overwrite. Restore {CONFIG} from a "
                                  "copy of the folder, or choose another out folder")

    def resumable(self) -> bool:
        """An interrupted run with something to continue from (a checkpoint, or the previous one)."""
        return self.file(CHECKPOINT).is_file() or self.file(PREVIOUS).is_file()

    def config(self) -> Optional[Dict]:
        """The record config.json holds (None if the run never began)."""
        if not self.exists():
            return None
        fix = "restore it from a copy (without it the run's settings are unknown), or start again in a new out folder"
        record = self._read_json(CONFIG, fix)
        if not isinstance(record.get("config"), dict):  # another tool's config.json, or one edited by hand
            raise RunFolderDamaged(f"{CONFIG} in {self.path} holds no run's settings (a 'config' object): {fix}")
        # the parts a resume reads (and adds to): a wrong shape is one line here, not a traceback there
        for key, shape, ok in (("split", "an object", lambda v: isinstance(v, dict)),
                               ("data", "an object", lambda v: v is None or isinstance(v, dict)),
                               ("resumed", "a list of objects",
                                lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v))):
            if key in record and not ok(record[key]):
                raise RunFolderDamaged(f"{CONFIG} in {self.path}: its {key!r} is {json.dumps(record[key])[:40]}, not "
                                       f"{shape}: {fix}")
        return record

    def _read_json(self, name: str, fix: str):
        try:
            record = records.read_json(self.file(name))
        except records.Unreadable as e:
            raise RunFolderDamaged(f"{name} in {self.path} is unreadable ({e.reason}): {fix}") from None
        if not isinstance(record, dict):
            raise RunFolderDamaged(f"{name} in {self.path} holds a {type(record).__name__}, not a record: {fix}")
        return record

    def other_settings(self, differ: List[str]) -> ValueError:
        """The refusal to run here under settings other than the recorded ones (resume.resolve, begin)."""
        return RunFolderMismatch(f"run folder {self.path} holds a run with other settings ({', '.join(differ)}): run with "
                          "its settings (--resume takes them from its config.json) or choose another out folder")

    def begin(self, record: Dict, action: str, say=_warn) -> None:
        """Begin a run planned by resume.resolve here (rank 0): its split must be the recorded one (by checksum);
        a starting run forgets one that stopped before its first checkpoint and writes its config.json."""
        self.refuse_if_records_without_config()
        here = self.config()
        if here is not None:
            old, new = here.get("split", {}).get("checksum"), record.get("split", {}).get("checksum")
            if old and new and old != new:
                raise self.other_settings(["split (checksum)"])
            if action != "start":  # a run that restarts from nothing may start on other data
                self._check_same_data(here.get("data") or {}, record.get("data") or {})
            if action == "continue":
                self._check_same_processes(here.get("world_size"), record.get("world_size"))
            if action == "start":
                say(f"{self.path} holds a run that stopped before its first checkpoint: starting it again from the "
                    "beginning")
                self.restart()
        if action == "start":
            self.write_config(record)

    def record_resume(self, record: Dict, epochs_done: int, batch: int) -> None:
        """config.json keeps the code that began the run and adds, under "resumed", the code, packages and device
        of each resume, from where its checkpoint stood: later epochs may have been trained by other code."""
        here = self.config()
        resume = {"epochs_done": epochs_done, "batch": batch, **{k: record.get(k) for k in RESUME_PROVENANCE}}
        self.write_config({**here, "resumed": [*here.get("resumed", []), resume]})

    def _check_same_data(self, recorded: Dict, given: Dict) -> None:
        """A run continues (or is evaluated) on the data it began with; records from before data fingerprints
        cannot be checked."""
        if recorded.get("sha256") and given.get("sha256") and recorded["sha256"] != given["sha256"]:
            raise RunFolderMismatch(
                f"run folder {self.path} trained on other data: its {CONFIG} records {recorded.get('of')} with "
                f"sha256 {recorded['sha256'][:12]} from {recorded.get('root')}, but {given.get('root')} holds "
                f"sha256 {given['sha256'][:12]}: give the data root of the images it trained on, or choose another "
                "out folder for a new run")

    def _check_same_processes(self, recorded, given) -> None:
        """A run trains on in as many processes as it began with: batch_size is per process, so another count
        changes the global batch, and a mid-epoch checkpoint's batch index would point elsewhere in the epoch."""
        if recorded and given and recorded != given:
            raise RunFolderMismatch(
                f"run folder {self.path} trained in {recorded} process(es), this resume has {given}: batch_size is per "
                f"process, so the global batch would change; resume with {recorded} (torchrun --nproc-per-node "
                f"{recorded}, or 1: plain python), or choose another out folder for a new run")

    # --- the lock -----------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Hold the folder's lock for the life of this process's run; refuse if another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = os.fdopen(open_lock_file(self.file(LOCK), RunFolderDamaged), "a+")  # it holds our pid
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunFolderBusy(f"run folder {self.path} is in use by process {holder}: wait for that run to end "
                                "(or stop it), or choose another out folder") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f

    def release(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # --- writers ------------------------------------------------------------------------------------------
    def write_config(self, record: Dict) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(self.file(CONFIG), json.dumps(record, indent=1))

    def append_metrics(self, row: Dict) -> Path:
        """Add an epoch's line; a resumed epoch replaces its line. The whole file is rewritten atomically."""
        lines = [l for l in self.metrics() if l["epoch"] < row["epoch"]] + [row]
        return atomic_write_text(self.file(METRICS), "".join(json.dumps(l) + "\n" for l in lines))

    def save_checkpoint(self, state: Dict) -> None:
        def keep_previous():  # only once the new one is complete: a failed write leaves both as they were
            if self.file(CHECKPOINT).exists():
                os.replace(self.file(CHECKPOINT), self.file(PREVIOUS))
        atomic_write(self.file(CHECKPOINT), lambda tmp: torch.save(state, tmp), before_replace=keep_previous)

    def save_model(self, state_dict: Dict) -> None:
        atomic_write(self.file(MODEL), lambda tmp: torch.save(state_dict, tmp))

    def write_results(self, results: Dict) -> Path:
        return atomic_write_text(self.file(RESULTS), json.dumps(results, indent=1, default=float))

    def with_history(self, results: Dict) -> Dict:
        """An evaluation's results, completed from this folder: the code that trained is the one config.json
        recorded when the run began (the evaluating code goes to evaluated_with), and the weights' history."""
        began, provenance = self.config(), ("git_commit", "packages", "device")
        results = {**results, "evaluated_with": {k: results.get(k) for k in provenance},
                   **{k: began.get(k) for k in provenance}, "resumed": began.get("resumed", [])}
        history = self.metrics()
        for row in history:
            if not isinstance(row.get("weights"), dict):
                raise RunFolderDamaged(f"{METRICS} in {self.path}: epoch {row['epoch']}'s line holds no weights: restore "
                                       "it from a copy of the run folder, or delete that line (only that epoch's "
                                       "metrics are lost) and run again")
        if history:
            results["weights_history"] = [row["weights"] for row in history]
        return results

    def refuse_to_restart_over_metrics(self) -> None:
        """Epochs' metrics without a checkpoint or model (those deleted to save space): not a run that stopped before
        its first checkpoint, which has at most its first epoch's line (written just before that checkpoint)."""
        if self.resumable() or self.trained():
            return
        epochs = self.metrics()
        if any(row.get("epoch", 0) > 1 for row in epochs):
            raise FileExistsError(f"run folder {self.path} holds {len(epochs)} epochs' metrics but no checkpoint or "
                                  f"model.pt to continue them: it is not trained again over them; restore "
                                  f"{CHECKPOINT} to continue, or choose another out folder")

    def restart(self) -> None:
        """Forget a run that never reached its first checkpoint (it has nothing to lose but its config)."""
        if self.resumable() or self.trained():
            raise RuntimeError(f"{self.path} holds a checkpoint or a model: it is not restarted")
        self.refuse_to_restart_over_metrics()
        for name in (RESULTS, METRICS, CONFIG):  # config.json last: a kill between leaves no metrics without it
            self.file(name).unlink(missing_ok=True)

    # --- readers ------------------------------------------------------------------------------------------
    def metrics(self, say=_warn) -> List[Dict]:
        """The epochs' lines. A last line cut short (a crash or a copy mid-write; our own writes are atomic) is
        dropped with a warning: that epoch's metrics are lost, its training is not. Any other unreadable line
        is an error naming it."""
        path = self.file(METRICS)
        if not path.exists():
            return []
        try:
            text = records.read_text(path, errors="replace")
        except records.Unreadable as e:
            raise RunFolderDamaged(f"{METRICS} in {self.path} is unreadable ({e.reason}): restore it from a copy of "
                                   "the run folder, or move it out of the way (the epochs' metrics are lost, their "
                                   "training is not)") from None
        lines = text.splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = records.parse_json(line, f"line {number}")
                if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                    raise ValueError("not an epoch's record")
            except ValueError as e:
                if number == len(lines) and not text.endswith("\n"):
                    say(f"warning: the last line of {path} is cut short (an interrupted write or copy): dropped; "
                        "that epoch's metrics are lost, training continues from the checkpoint")
                    break
                raise RunFolderDamaged(f"{METRICS} in {self.path}: line {number} is unreadable "
                                       f"({getattr(e, 'reason', e)}): delete that line "
                                       "(only that epoch's metrics are lost) and run again") from None
            rows.append(row)
        return rows

    def results(self) -> Dict:
        fix = "delete it and run the same command with --resume: the run is evaluated again from model.pt"
        record = self._read_json(RESULTS, fix)
        anytime = record.get("anytime", [])
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (isinstance(anytime, list) and all(isinstance(r, dict) and number(r.get("exit")) and number(r.get("top1"))
                                                  for r in anytime)):
            raise RunFolderDamaged(f"{RESULTS} in {self.path}: its 'anytime' is not a list of exits' results "
                                   f"(exit, top1): {fix}")
        return record

    def load_checkpoint(self, device, say=print, foreign=lambda state: None) -> Dict:
        """checkpoint.pt, or checkpoint.prev.pt when the newer one cannot be read or is no checkpoint of this run
        (foreign(state): why not, or None), after saying so."""
        errors = []
        for name in (CHECKPOINT, PREVIOUS):
            path = self.file(name)
            if not path.exists():
                continue
            try:
                state = records.load_tensors(path, device)
                missing = CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else CHECKPOINT_KEYS
                if missing:
                    raise records.Unreadable(path, f"it is no checkpoint (it lacks {', '.join(sorted(missing))})")
                why = foreign(state)
                if why:
                    raise records.Unreadable(path, f"it is the checkpoint of another run ({why})")
            except records.Unreadable as e:
                errors.append(f"{path.name} not loaded: {e.reason}")
                continue
            if errors:
                say(f"warning: {errors[0]}; resuming from {path.name} (epoch {state['epoch']}, batch {state['batch']})")
            return state
        raise RuntimeError(f"cannot resume {self.path}: no readable checkpoint ({'; '.join(errors) or 'none there'}); "
                           f"start again in a new out folder")

    def load_model(self, device) -> Dict:
        """model.pt's state dict. Its run has nothing else to take the network from (load_finished tries the
        checkpoints first), so a damaged one is restored from a copy or the run trained again."""
        try:
            return _state_dict(records.load_tensors(self.file(MODEL), device), self.file(MODEL))
        except records.Unreadable as e:
            raise RunFolderDamaged(f"{MODEL} in {self.path} is unreadable ({e.reason}): restore it from a copy of the "
                                   "run folder, or train the run again in another out folder") from None


def _state_dict(state, path) -> Dict:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise records.Unreadable(path, "it holds no network's state dict (a map of names to tensors)")
    return state


def final_network(path, device) -> Dict:
    """The state dict of a finished run's network: a run folder's model.pt, or a model.pt given directly."""
    folder = RunFolder(path) if Path(path).is_dir() else RunFolder(Path(path).parent)
    file = folder.file(MODEL) if Path(path).is_dir() else Path(path)
    if not file.exists():
        raise FileNotFoundError(f"no finished network at {file} (train that run to the end first)")
    try:
        return _state_dict(records.load_tensors(file, device), file)
    except records.Unreadable as e:
        raise ValueError(f"init_from: {e}: give --init-from a finished run whose {MODEL} is intact") from None


def final_weights(path) -> Dict[str, float]:
    """The final learned weights in a results.json (or the run folder holding one), as {term name: weight}."""
    path = Path(path)
    path = path / RESULTS if path.is_dir() else path
    try:
        weights = records.read_json(path)["weights"]
    except (OSError, KeyError, TypeError, records.Unreadable) as e:
        kind = e.reason if isinstance(e, records.Unreadable) else f"{type(e).__name__}: {e}"
        raise ValueError(f"cannot read final weights from {path} ({kind}): give a finished run's results.json") from e
    if not isinstance(weights, dict):
        raise ValueError(f"{path}: 'weights' must map term names to numbers")
    for name, value in weights.items():  # a negative CE weight would silently maximise that loss
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{path}: 'weights' must map term names to numbers, each finite and >= 0, but {name!r} "
                             f"is {value!r}: give a finished run's results.json")
    return weights


def load_results(paths):
    """Many runs' results.json (paths, folders or a glob) as one long pandas table: one row per run and exit."""
    import glob as globmod

    import pandas as pd
    if isinstance(paths, (str, os.PathLike)):
        paths = sorted(globmod.glob(str(paths))) if any(c in str(paths) for c in "*?[") else [paths]
    rows = []
    for p in paths:
        p = Path(p)
        p = RunFolder(p).file(RESULTS) if p.is_dir() else p
        res = records.read_json(p)
        cfg = res.get("config", {})
        for row in res["anytime"]:
            rows.append({"run": p.parent.name, "method": cfg.get("method"), "arch": cfg.get("arch"),
                         "dataset": cfg.get("dataset"), "seed": cfg.get("seed"), **row})
    return pd.DataFrame(rows)
