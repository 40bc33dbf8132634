"""Settings settled before training starts: every rule about run folders made earlier lives here.

    plan = resolve(settings, "auto")     # -> Plan(cfg, action), or one clear error
    trainer = train.prepare(plan.cfg)    # the Trainer takes plan.cfg as given
    trainer.fit(plan.action)

Modes (what the caller asks for):
    "new"       a new run; a folder holding one that reached a checkpoint is an error (the CLI without --resume)
    "continue"  the run recorded in the folder, with its recorded settings; given ones must agree (--resume);
                an out folder where no run began is an error (a mistyped --out)
    "auto"      continue (or load) what the folder holds, else start (train.run, the notebooks)
Actions (what the folder then calls for): "start", "continue" (from its checkpoint), "evaluate" (trained, not
evaluated) and "load" (finished: trained and evaluated).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, NamedTuple, Union

from .cli import say
from .config import TrainConfig, config_from_dict, config_to_dict, unused_settings
from .runfolder import RunFolder

MODES = ("new", "continue", "auto")

# Settings added after runs were already made, with the value that reproduces how those runs trained: a run
# folder whose config.json lacks one resumes with this value, not with today's default.
LEGACY_VALUES = {"meta_schedule": "fixed", "hypergrad_norm": "none", "nesterov": False, "recipe": "",
                 "optimizer": "sgd", "lr_schedule": "step", "warmup_epochs": 0, "heads_reset": "all",
                 "msdnet_init": "rule"}

# Defaults changed after runs were made under the former value: a run folder that began under it (and has
# something to continue) keeps it when the new settings hold today's default.
FORMER_DEFAULTS = {"meta_traverse": 0.25, "heads_reset": "all"}

# Settings that may differ when a run is resumed: where things are and how fast they run, not what is computed.
# Places are compared by what they hold: the split by its checksum, not its path (a moved clone resumes).
RESUMABLE_CHANGES = {"progress", "workers", "device", "out", "check_every", "download", "data_root", "compile",
                     "compile_mode", "cuda_graphs", "threads", "split_dir"}


class Plan(NamedTuple):
    cfg: TrainConfig
    action: str  # start | continue | evaluate | load


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"resume must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def stored_config(values: Dict) -> Dict:
    """A run folder's recorded settings, completed: settings added since it began take the value that
    reproduces its training (LEGACY_VALUES) or else their default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    missing = {k: LEGACY_VALUES.get(k, v) for k, v in defaults.items() if k not in values}
    return {**values, **missing}


def completed_config(values: Dict) -> TrainConfig:
    """Recorded settings (a run folder's or a study record's), completed as stored_config does and checked."""
    return config_from_dict(stored_config(values))


def recorded_config(folder: RunFolder) -> TrainConfig:
    """The settings a run folder recorded, completed and checked (for loading a finished run elsewhere)."""
    return completed_config(folder.config()["config"])


def _floats(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_floats(v) for v in value]
    return value


def comparable(value) -> str:
    """A setting's (or a record's) value as two are compared: JSON text, keys sorted, whole numbers as floats, so
    temperature 3 (from Python) and 3.0 (from the command line or a CSV column) are one value; NaN equals NaN."""
    return json.dumps(_floats(value), sort_keys=True, default=str)


def settings_differ(recorded: Dict, new: Dict) -> list:
    """The settings that change what is computed in which a run folder's record and new settings differ."""
    old = stored_config(recorded)
    free = RESUMABLE_CHANGES | (unused_settings(old).keys() & unused_settings(new).keys())
    return sorted(k for k in set(old) | set(new) if k not in free and comparable(old.get(k)) != comparable(new.get(k)))


def _former_defaults(recorded: Dict, cfg: TrainConfig) -> Dict:
    """The settings whose default changed since the run began under the former one, where cfg holds today's."""
    here = stored_config(recorded)
    return {k: here[k] for k, former in FORMER_DEFAULTS.items()
            if k not in unused_settings(here) and comparable(here.get(k)) == comparable(former)
            and getattr(cfg, k) == getattr(TrainConfig, k)}


def _state(folder: RunFolder) -> str:
    if folder.finished():
        return "load"
    if folder.trained():
        return "evaluate"
    return "continue" if folder.resumable() else "start"


def resolve(settings: Union[TrainConfig, Dict], mode: str = "auto") -> Plan:
    """The final settings of the run in settings' out folder, and what to do there; or one clear error."""
    check_mode(mode)
    values = config_to_dict(settings) if isinstance(settings, TrainConfig) else dict(settings)
    folder = RunFolder(values["out"]) if values.get("out") else None
    if mode == "continue" and folder is None:
        raise ValueError("resuming needs an out folder (--out), the run folder to continue")
    if folder is not None:
        folder.refuse_if_records_without_config()
    if folder is None or not folder.exists():
        if mode == "continue":  # a mistyped --out would start a new run with the default settings
            raise FileNotFoundError(f"nothing to resume in {folder.path} (no run began there): check --out, or leave "
                                    "out --resume to start a new run")
        return Plan(config_from_dict(values), "start")
    if folder.evaluated() and not (folder.trained() or folder.resumable()):
        raise FileExistsError(f"run folder {folder.path} holds a finished run's results without its network (model.pt "
                              "and the checkpoints are gone): it is not trained again over them; restore model.pt "
                              "to load it, or choose another out folder")
    folder.refuse_to_restart_over_metrics()
    recorded = folder.config()["config"]
    if mode == "continue":  # the recorded settings; those given must agree
        values = {**stored_config(recorded), **values}
    cfg = config_from_dict(values)
    action = _state(folder)
    if action != "start":
        former = _former_defaults(recorded, cfg)
        if former:
            say(f"run folder {cfg.out} began under a former default ({', '.join(f'{k} {v}' for k, v in former.items())}"
                "): continuing with it; choose another out folder for today's")
            cfg = dataclasses.replace(cfg, **former).validate()
    differ = settings_differ(recorded, config_to_dict(cfg))
    if differ:
        raise folder.other_settings(differ)
    if action != "start" and mode == "new":
        state = {"load": "a finished run (load it with train.run(cfg) or train.load_run)",
                 "evaluate": "a run trained but not evaluated: rerun with --resume to evaluate it (Python: train.run(cfg))",
                 "continue": "an interrupted run: continue it with the same command plus --resume (Python: "
                             "train.run(cfg))"}[action]
        raise FileExistsError(f"run folder {folder.path} holds {state}, or choose another out folder")
    return Plan(cfg, action)
