"""The run folder: the only code that knows the names of the files in it, and how each is written.

    config.json        every setting, commit, packages, device, split checksum (written when the run begins)
    metrics.jsonl      one line per finished epoch
    checkpoint.pt      written every epoch and on Ctrl-C / SIGTERM; the one before is kept as checkpoint.prev.pt
    model.pt           the final network: its presence means training finished
    results.json       the evaluation (anytime, budgeted, weights, ...): with model.pt, the run is finished
    .lock              held (flock) by the process training in the folder, with its pid

Every file is written atomically (a temporary file renamed over the old one), so a kill at any moment
leaves either the old or the new version. Checkpoints hold tensors and plain values only and are loaded
with weights_only=True: no file in a run folder can make us execute code.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .paths import atomic_write_text

CONFIG, METRICS, RESULTS = "config.json", "metrics.jsonl", "results.json"
CHECKPOINT, PREVIOUS, MODEL, LOCK = "checkpoint.pt", "checkpoint.prev.pt", "model.pt", ".lock"


class RunFolderBusy(RuntimeError):
    pass


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
        return self.file(CONFIG).is_file()

    def finished(self) -> bool:
        """Trained and evaluated: model.pt and results.json are both there."""
        return self.file(MODEL).is_file() and self.file(RESULTS).is_file()

    def trained(self) -> bool:
        return self.file(MODEL).is_file()

    def resumable(self) -> bool:
        """An interrupted run with something to continue from (a checkpoint, or the previous one)."""
        return self.file(CHECKPOINT).is_file() or self.file(PREVIOUS).is_file()

    def config(self) -> Optional[Dict]:
        """The record config.json holds (None if the run never began)."""
        return json.loads(self.file(CONFIG).read_text()) if self.exists() else None

    # --- the lock -----------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Hold the folder's lock for the life of this process's run; refuse if another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.file(LOCK), "a+")
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
        tmp = self.file(CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        if self.file(CHECKPOINT).exists():
            os.replace(self.file(CHECKPOINT), self.file(PREVIOUS))  # the last good one stays
        os.replace(tmp, self.file(CHECKPOINT))

    def save_model(self, state_dict: Dict) -> None:
        tmp = self.file(MODEL + ".tmp")
        torch.save(state_dict, tmp)
        os.replace(tmp, self.file(MODEL))

    def write_results(self, results: Dict) -> Path:
        return atomic_write_text(self.file(RESULTS), json.dumps(results, indent=1, default=float))

    def restart(self) -> None:
        """Forget a run that never reached its first checkpoint (it has nothing to lose but its config)."""
        if self.resumable() or self.trained():
            raise RuntimeError(f"{self.path} holds a checkpoint or a model: it is not restarted")
        for name in (CONFIG, METRICS, RESULTS):
            self.file(name).unlink(missing_ok=True)

    # --- readers ------------------------------------------------------------------------------------------
    def metrics(self) -> List[Dict]:
        path = self.file(METRICS)
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []

    def results(self) -> Dict:
        return json.loads(self.file(RESULTS).read_text())

    def load_checkpoint(self, device, say=print) -> Dict:
        """checkpoint.pt, or checkpoint.prev.pt when the newer one cannot be read (after saying so)."""
        errors = []
        for name in (CHECKPOINT, PREVIOUS):
            path = self.file(name)
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location=device, weights_only=True)
            except Exception as e:  # a truncated or corrupt file: any unpickling or zip error
                errors.append(f"{path.name}: {type(e).__name__}: {str(e)[:200]}")
                continue
            if errors:
                say(f"warning: {errors[0]}; resuming from {path.name} (epoch {state['epoch']}, batch {state['batch']})")
            return state
        raise RuntimeError(f"cannot resume {self.path}: no readable checkpoint ({'; '.join(errors) or 'none there'}); "
                           f"start again in a new out folder")

    def load_model(self, device) -> Dict:
        return torch.load(self.file(MODEL), map_location=device, weights_only=True)
