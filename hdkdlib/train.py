"""The training engine: one Trainer for the notebooks and the command line.

    python -m hdkdlib.train --dataset cifar100 --data-root data --arch msdnet_cifar_anytime \\
        --method hdkd --epochs 300 --out runs/NAME [--resume]
    torchrun --nproc_per_node 8 -m hdkdlib.train --dataset folder --data-root /data/imagenet ...

hdkdlib.runfolder owns the run folder (its files, atomic writes, the lock); hdkdlib.config the settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from . import bilevel, cost, data, distributed, evaluation, models, objectives, runfolder, runinfo
# The settings live in hdkdlib.config, dataset dispatch and loaders in hdkdlib.data.bundle; these names stay
# importable from here (notebooks, older scripts).
from .config import DATASETS, LEGACY_VALUES, RECIPES, TrainConfig, argparser, config_from_dict, stored_config
from .config import to_argv as cli_args
from .data.bundle import DataBundle, build_data
from .runfolder import RunFolder, RunFolderBusy

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "run", "load_run", "main", "cli_args", "config_from_dict",
           "stored_config", "objective_options", "DataBundle", "build_data", "DATASETS", "RECIPES", "LEGACY_VALUES"]

IMAGENET_RECIPE = RECIPES["imagenet"]


def objective_options(cfg: TrainConfig) -> Dict:
    """The options objectives.build gets from a run's settings (also: the weights a run started from)."""
    options = {}
    if cfg.temperature:
        options["temperature"] = cfg.temperature
    if cfg.method in objectives.LEARNED:
        options["weight_map"] = cfg.weight_map
        options["seed"] = cfg.seed
        options["min_init_weight"] = cfg.min_init_weight
        if cfg.init:
            options["init"] = cfg.init
    return options


# --- the trainer ------------------------------------------------------------------------------------
class TrainingInterrupted(RuntimeError):
    pass


# Settings that may differ when a run is resumed: where things are and how fast they run, not what is computed.
RESUMABLE_CHANGES = {"progress", "workers", "device", "out", "check_every", "download", "data_root", "compile",
                     "compile_mode", "threads", "split_dir"}  # the split is compared by its checksum, not its path


class Trainer:
    def __init__(self, cfg: TrainConfig, data_bundle: Optional[DataBundle] = None):
        self.cfg = cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world_size, self.device = distributed.setup(cfg.device)
        torch.manual_seed(cfg.seed)
        self.data = data_bundle or build_data(cfg, self.device, self.rank, self.world_size)
        self.model = models.build(cfg.arch, self.data.num_classes, input_shape=self.data.input_shape,
                                  gradient_equilibrium=cfg.gradient_equilibrium).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.init_from:
            self._init_network(Path(cfg.init_from))
        self.objective = objectives.build(cfg.method, self.model.num_exits, **self._objective_options()).to(self.device)
        self.objective.check_inputs = False  # checked every check_every steps instead: no host sync per step
        self.optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                         momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        self.net = self.model
        if cfg.compile:
            self.net = torch.compile(self.model, mode=cfg.compile_mode)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.net = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.meta = None
        if self.cfg.freeze_weights_from:
            self._freeze_weights(Path(self.cfg.freeze_weights_from))
        elif list(self.objective.parameters()):
            self.meta = bilevel.MetaStep(self.net, self.objective, lr=self.meta_lr(), method=cfg.meta_method,
                                         val_loss=cfg.val_loss, alpha=cfg.alpha, check_finite=False,
                                         hypergrad_norm=cfg.hypergrad_norm)
            self.meta.val_loss.to(self.device)
        self._plain_fn, self._meta_fn = self._plain_step, self._meta_step
        if cfg.compile == "step":  # graph breaks at backward() split the step; each part is compiled
            self._plain_fn = torch.compile(self._plain_step, mode=cfg.compile_mode)
            self._meta_fn = torch.compile(self._meta_step, mode=cfg.compile_mode)
        self.exit_flops = cost.exit_flops(self.model, self.data.input_shape)
        self.epoch = self.batch = self.step = self.meta_steps = 0
        self._acc = self._zero_accumulators()
        self.run_dir = RunFolder(cfg.out) if cfg.out else None            # read by every rank
        self.folder = self.run_dir if self.rank == 0 else None              # written by rank 0 only
        self.out = self.folder.path if self.folder is not None else None
        self._stop_signal = None

    # -- setup helpers
    def meta_lr(self) -> float:
        """The weight learning rate: meta_lr, or (per_run) the one that gives this run's length a set reach."""
        steps_per_epoch = len(self.data.train)
        if self.cfg.meta_interval > steps_per_epoch:
            raise ValueError(f"meta_interval {self.cfg.meta_interval} is longer than an epoch ({steps_per_epoch} "
                             f"steps): use 1..{steps_per_epoch}")
        if self.cfg.meta_schedule == "fixed":
            return self.cfg.meta_lr
        return bilevel.per_run_meta_lr(math.ceil(self.cfg.epochs * steps_per_epoch / self.cfg.meta_interval),
                                       self.cfg.meta_traverse)

    def _objective_options(self) -> Dict:
        return objective_options(self.cfg)

    def _init_network(self, run_dir: Path) -> None:
        """Load another run's final network; with train_heads_only, freeze its stages and re-initialise the heads."""
        path = RunFolder(run_dir).file(runfolder.MODEL) if run_dir.is_dir() else run_dir
        if not path.is_file():
            raise FileNotFoundError(f"init_from: no finished network at {path} (train the first stage there first)")
        self.model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        if self.cfg.train_heads_only:
            self.model.freeze_stages_and_reset_heads()

    def _freeze_weights(self, path: Path) -> None:
        """Start from another run's final learned weights and keep them fixed (no bilevel update)."""
        if self.cfg.method not in objectives.LEARNED:
            raise ValueError(f"freeze_weights_from needs a method with learned weights ({', '.join(objectives.LEARNED)})")
        try:
            weights = json.loads(path.read_text())["weights"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"freeze_weights_from: cannot read final weights from {path} ({e})") from e
        self.objective.fix_weights(weights, source=f"freeze_weights_from: {path}")

    def _zero_accumulators(self):
        K = self.model.num_exits
        return {"loss": torch.zeros((), device=self.device, dtype=torch.float64),
                "correct": torch.zeros(K, device=self.device, dtype=torch.long),
                "seen": torch.zeros((), device=self.device, dtype=torch.long)}

    def _autocast(self):
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- run folder
    def _config_record(self) -> Dict:
        return {"config": dataclasses.asdict(self.cfg), "git_commit": runinfo.git_commit(),
                "packages": runinfo.package_versions(), "device": runinfo.device_name(self.device),
                "world_size": self.world_size, "split": {k: self.data.split.get(k) for k in
                                                         ("protocol", "seed", "checksum", "val_per_class", "train_per_class")},
                "exit_flops": self.exit_flops,
                "meta_lr_used": self.meta.optimizer.param_groups[0]["lr"] if self.meta is not None else None}

    def settings_differ(self, record: Dict) -> List[str]:
        """The settings in which a run folder's config.json record differs from this run's: everything that
        changes what is computed (where things are and how fast they run may change); the split by checksum."""
        old, new = stored_config(record["config"]), dataclasses.asdict(self.cfg)
        differ = sorted(k for k in set(old) | set(new)
                        if k not in RESUMABLE_CHANGES and json.dumps(old.get(k)) != json.dumps(new.get(k)))
        old_split, new_split = record.get("split", {}).get("checksum"), self.data.split.get("checksum")
        if old_split and new_split and old_split != new_split:
            differ.append("split (checksum)")
        return differ

    def _prepare_run_folder(self, resume: bool) -> bool:
        """Check the run folder against these settings and begin the run there; True when training continues
        from a checkpoint. A folder whose run never reached a checkpoint holds nothing but its config: it is
        started afresh, with or without resume."""
        if self.run_dir is None:
            return False
        if self.folder is not None:
            f, command = self.folder, "the same command plus --resume (Python: train.run(cfg))"
            if f.exists():
                differ = self.settings_differ(f.config())
                if differ:
                    raise ValueError(f"run folder {f.path} holds a run with other settings ({', '.join(differ)}): "
                                     "run with its settings (--resume takes them from its config.json) or choose "
                                     "another out folder")
                if f.resumable() and not resume:
                    state = "a finished run (load it with train.run(cfg) or train.load_run)" if f.trained() else \
                        f"an interrupted run: continue it with {command}"
                    raise FileExistsError(f"run folder {f.path} holds {state}, or choose another out folder")
                if not f.resumable():
                    print(f"hdkdlib.train: {f.path} holds a run that stopped before its first checkpoint: "
                          "starting it again from the beginning", file=sys.stderr)
                    f.restart()
            elif resume:
                print(f"hdkdlib.train: nothing to resume in {f.path}: starting a new run there", file=sys.stderr)
            if not f.exists():
                f.write_config(self._config_record())
        distributed.barrier()  # the other ranks decide once rank 0 has checked (and perhaps reset) the folder
        return resume and self.run_dir.resumable()

    # -- checkpoints
    def state_dict(self) -> Dict:
        state = {"model": self.model.state_dict(), "objective": self.objective.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "batch": self.batch,
                 "step": self.step, "meta_steps": self.meta_steps,
                 "accumulators": {k: v.cpu() for k, v in self._acc.items()},
                 "config": dataclasses.asdict(self.cfg)}
        state["config"]["lr_milestones"] = list(self.cfg.lr_milestones)
        if self.meta is not None:
            state["meta_optimizer"] = self.meta.optimizer.state_dict()
            state["val_loss"] = self.meta.val_loss.state_dict()
        return state

    def save_checkpoint(self) -> None:
        if self.folder is not None:
            self.folder.save_checkpoint(self.state_dict())

    def load_checkpoint(self, path: Optional[Path] = None) -> None:
        """Continue from the run folder's checkpoint (or the previous one, if the newer one is unreadable)."""
        folder = RunFolder(Path(path).parent) if path is not None else self.run_dir
        state = folder.load_checkpoint(self.device, say=lambda m: print(f"hdkdlib.train: {m}", file=sys.stderr))
        self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.meta is not None:
            self.meta.optimizer.load_state_dict(state["meta_optimizer"])
            self.meta.val_loss.load_state_dict(state["val_loss"])
        self.epoch, self.batch, self.step, self.meta_steps = (state[k] for k in ("epoch", "batch", "step", "meta_steps"))
        self._acc = {k: v.to(self.device) for k, v in state["accumulators"].items()}

    # -- training
    def _val_batch(self):
        n = len(self.data.val_stream)
        m = self.meta_steps
        return self.data.val_stream.batch_at(m // n, m % n)

    def _plain_step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.net(x)
        loss = self.objective(logits, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), [z.detach() for z in logits]

    def _meta_step(self, x, y, x_val, y_val):
        loss, logits = self.meta.step((x, y), (x_val, y_val), self.optimizer)  # leaves the gradients in .grad
        self.optimizer.step()
        return loss, logits

    def train_step(self, x, y):
        """One optimisation step (with the bilevel weight update every meta_interval steps)."""
        with self._autocast():
            if self.meta is not None and self.step % self.cfg.meta_interval == 0:
                loss, logits = self._meta_fn(x, y, *self._val_batch())
                self.meta_steps += 1
            else:
                loss, logits = self._plain_fn(x, y)
        self.objective.after_step(logits)
        self.step += 1
        with torch.no_grad():
            self._acc["loss"] += loss.detach().double() * len(y)
            self._acc["correct"] += torch.stack([(z.argmax(1) == y).sum() for z in logits])
            self._acc["seen"] += len(y)
        return loss

    def _check_finite(self):
        bad = not torch.isfinite(self._acc["loss"])
        if self.meta is not None:
            bad = bad or not all(torch.isfinite(p).all() for p in self.objective.parameters())
        if bad:
            raise FloatingPointError(f"non-finite loss or loss weights at epoch {self.epoch + 1}, step {self.step}: "
                                     "training stopped; no checkpoint was written after the last good epoch. "
                                     "Lower lr (or meta_lr), or try bf16 off.")

    def _handle_signal(self, signum, frame):
        self._stop_signal = signum

    def _epoch_metrics(self, seconds: float, images: int) -> Dict:
        acc = self._acc
        seen = max(int(acc["seen"]), 1)
        val = evaluation.per_exit_metrics(self.model, self.data.val)
        row = {"epoch": self.epoch + 1, "lr": self.cfg.lr_at(self.epoch), "train_loss": float(acc["loss"]) / seen,
               "train_top1": (acc["correct"].double() / seen).tolist(), "val_loss": val["loss"], "val_top1": val["top1"],
               "val_top5": val["top5"], "images_per_s": images / max(seconds, 1e-9), "epoch_seconds": seconds,
               "weights": self.objective.named_weights()}
        if hasattr(self.objective, "temperature") and torch.is_tensor(self.objective.temperature):
            row["temperature"] = float(self.objective.temperature)
        return row

    def _append_metrics(self, row: Dict) -> None:
        if self.folder is not None:
            self.folder.append_metrics(row)

    def fit(self, resume: bool = False) -> List[Dict]:
        """Train to cfg.epochs; returns the per-epoch metrics (also in metrics.jsonl). resume: continue from the
        run folder's checkpoint; a folder holding an interrupted run is an error without it."""
        if self.folder is not None:
            self.folder.acquire()  # no second process trains into this folder meanwhile
        handlers = {}
        try:
            return self._fit(resume, handlers)
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if self.folder is not None:
                self.folder.release()

    def _fit(self, resume: bool, handlers: Dict) -> List[Dict]:
        if self._prepare_run_folder(resume):
            self.load_checkpoint()
        history = []
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._handle_signal)
        while self.epoch < self.cfg.epochs:
            self.model.train()
            if self.cfg.train_heads_only:
                self.model.stages.eval()  # frozen stages keep their BatchNorm statistics too
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr_at(self.epoch)
            start, first_batch = time.perf_counter(), self.batch
            bar = tqdm(total=len(self.data.train), initial=self.batch, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                       disable=not self.cfg.progress or self.rank != 0, leave=False)
            for x, y in self.data.train.batches(self.epoch, start=self.batch):
                loss = self.train_step(x, y)
                self.batch += 1
                bar.update(1)
                if self.step % self.cfg.check_every == 0:
                    self._check_finite()
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                if self._stop_signal is not None:
                    self._check_finite()
                    self.save_checkpoint()
                    raise TrainingInterrupted(
                        f"stopped by signal {self._stop_signal} at epoch {self.epoch + 1}, batch {self.batch}; "
                        f"checkpoint saved" + (f" in {self.out}: continue with the same command plus --resume"
                                               if self.out else ""))
            bar.close()
            self._check_finite()
            seconds = time.perf_counter() - start
            row = self._epoch_metrics(seconds, (self.batch - first_batch) * self.cfg.batch_size * self.world_size)
            history.append(row)
            self.epoch, self.batch = self.epoch + 1, 0
            self._acc = self._zero_accumulators()
            self._append_metrics(row)
            self.save_checkpoint()
        if self.folder is not None:
            self.folder.save_model(self.model.state_dict())
        return history

    # -- evaluation after training
    def evaluate(self, write: bool = True) -> Dict:
        """Anytime (test) and budgeted (thresholds on the held-out split, applied to test) results."""
        val_probs, val_y = evaluation.predict(self.model, self.data.val)
        test_probs, test_y = evaluation.predict(self.model, self.data.test)
        # Budgets in measured time beside FLOPs: the per-exit cost on this device (ms per image, stage by stage)
        batch = min(256, self.cfg.eval_batch_size)
        exit_ms = [1000 * t for t in cost.latency(self.model, self.data.input_shape, batch_size=batch,
                                                  device=self.device)]
        results = {"anytime": evaluation.anytime(test_probs, test_y, self.exit_flops),
                   "budgeted": evaluation.budgeted(val_probs, val_y, test_probs, test_y, self.exit_flops),
                   "budgeted_ms": evaluation.budgeted(val_probs, val_y, test_probs, test_y, exit_ms, cost_key="ms"),
                   "exit_flops": self.exit_flops, "exit_ms": exit_ms,
                   "exit_ms_measured_on": {"device": runinfo.device_name(self.device), "batch_size": batch,
                                           "threads": torch.get_num_threads(), "unit": "ms per image, eager"},
                   "weights": self.objective.named_weights(), **self._config_record()}
        if self.folder is not None and self.folder.exists():
            # The code that trained is the one recorded when the run began; say what evaluated it too.
            began = self.folder.config()
            results["evaluated_with"] = {k: results[k] for k in ("git_commit", "packages", "device")}
            results.update({k: began[k] for k in ("git_commit", "packages", "device")})
        if self.folder is not None:
            history = self.folder.metrics()
            if history:
                results["weights_history"] = [row["weights"] for row in history]
            if write:
                self.folder.write_results(results)
        return results


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def load_run(run_dir, device: str = "auto") -> Trainer:
    """A finished run folder as a Trainer holding its final model (for evaluation and exploration)."""
    folder = RunFolder(run_dir)
    if not (folder.exists() and folder.trained()):
        raise FileNotFoundError(f"{folder.path} is not a finished run folder (config.json and model.pt expected)")
    values = stored_config(folder.config()["config"])
    cfg = config_from_dict({**values, "device": device, "progress": False, "out": ""})
    trainer = Trainer(cfg)
    trainer.model.load_state_dict(folder.load_model(trainer.device))
    return trainer


def run(cfg: TrainConfig, evaluate: bool = True, data_bundle: Optional[DataBundle] = None,
        resume: Optional[bool] = None) -> Tuple[Trainer, Optional[Dict]]:
    """Train (or pick up) the run in cfg.out and evaluate it: what the notebooks call.

    A finished run with the same settings is loaded, not retrained. An interrupted one is continued from its
    checkpoint (resume=None or True; resume=False makes that an error, as the CLI without --resume), and one
    that stopped before its first checkpoint starts again. A folder holding other settings is an error."""
    trainer = Trainer(cfg, data_bundle)
    folder = trainer.run_dir
    if folder is not None and folder.finished():
        differ = trainer.settings_differ(folder.config())
        if differ:
            raise ValueError(f"run folder {folder.path} holds a run with other settings ({', '.join(differ)}); "
                             "choose another out folder")
        trainer.load_checkpoint()  # the final network (as in model.pt) and the weights' state
        return trainer, folder.results()
    trainer.fit(resume=True if resume is None else resume)
    return trainer, (trainer.evaluate() if evaluate and trainer.rank == 0 else None)


def _parser(argv=None) -> argparse.ArgumentParser:
    """The training CLI's parser: config.argparser() with the defaults of the --dataset/--recipe in argv."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default="cifar100")
    pre.add_argument("--recipe", default="")
    known, _ = pre.parse_known_args(argv or [])
    p = argparser(known.dataset if known.dataset in DATASETS else "cifar100",
                  known.recipe if known.recipe in RECIPES else "", description=__doc__.split("\n\n")[0])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, with its "
                                                         "recorded settings")
    p.add_argument("--no-eval", action="store_true", help="skip the final test evaluation")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected failure")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(_parser(argv).parse_args(argv))
    resume, no_eval, debug = args.pop("resume"), args.pop("no_eval"), args.pop("debug")
    given = {k: v for k, v in args.items() if v is not None}
    values = dict(given)
    if resume and not given.get("out"):
        print("hdkdlib.train: error: --resume needs --out, the run folder to continue", file=sys.stderr)
        return 2
    recorded = RunFolder(given["out"]) if given.get("out") else None
    if resume and recorded.exists():
        # --resume continues the run with its recorded settings; options given on the command line must agree
        values = {**stored_config(recorded.config()["config"]), **given}
    finished = False
    try:
        trainer = Trainer(config_from_dict(values))
        trainer.fit(resume=resume)
        if not no_eval and trainer.rank == 0:
            results = trainer.evaluate()
            print(" ".join(f"exit{r['exit']}={100 * r['top1']:.2f}" for r in results["anytime"]))
        finished = True
    except TrainingInterrupted as e:
        print(f"hdkdlib.train: {e}", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, FloatingPointError, data.DatasetError, RunFolderBusy,
            RuntimeError, OSError) as e:
        if debug:
            raise
        hint = ""
        if recorded is not None and recorded.resumable() and not isinstance(e, (RunFolderBusy, FileExistsError)):
            hint = f" (the last good checkpoint in {recorded.path} is kept: continue with the same command plus --resume)"
        message = str(e)
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original error's line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"hdkdlib.train: error: {type(e).__name__ + ': ' if isinstance(e, OSError) else ''}{message}{hint}",
              file=sys.stderr)
        return 2
    finally:
        distributed.teardown(wait=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
