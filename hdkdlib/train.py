"""The training engine: one Trainer for the notebooks and the command line.

    python -m hdkdlib.train --dataset cifar100 --data-root data --arch msdnet_cifar_anytime \\
        --method hdkd --epochs 300 --out runs/NAME [--resume]
    torchrun --nproc_per_node 8 -m hdkdlib.train --dataset folder --data-root /data/imagenet ...

hdkdlib.runfolder owns the run folder (its files, atomic writes, the lock); hdkdlib.config the settings.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm  # text bars: a finished bar stays a line of text (a widget bar dies with its kernel)

from . import bilevel, cli, cost, data, distributed, evaluation, models, objectives, runfolder, runinfo
# Settings live in hdkdlib.config, data in hdkdlib.data.bundle; these names stay importable from here.
from .config import TrainConfig, argparser_for, config_from_dict, stored_config
from .config import to_argv as cli_args
from .data.bundle import DataBundle, build_data
from .paths import DiskFull
from .runfolder import RunFolder, RunFolderBusy, RunFolderDamaged

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "run", "load_run", "main", "cli_args", "config_from_dict",
           "DataBundle", "build_data"]


def say(message: str) -> None:
    print(f"hdkdlib.train: {message}", file=sys.stderr)


class TrainingInterrupted(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, data_bundle: Optional[DataBundle] = None):
        self.run_dir = RunFolder(cfg.out) if cfg.out else None            # read by every rank
        former = self.run_dir.former_defaults(cfg) if self.run_dir else {}
        cfg = dataclasses.replace(cfg, **former)  # a run begun under a former default continues as it began
        self.cfg = cfg.validate()
        self.rank, self.world_size, self.device = distributed.setup(cfg.device)
        if former and self.rank == 0:
            say(f"run folder {cfg.out} began under a former default ({', '.join(f'{k} {v}' for k, v in former.items())}): "
                "continuing with it; choose another out folder for today's")
        torch.manual_seed(cfg.seed)
        self.data = data_bundle or build_data(cfg, self.device, self.rank, self.world_size)
        self.model = models.build(cfg.arch, self.data.num_classes, input_shape=self.data.input_shape,
                                  gradient_equilibrium=cfg.gradient_equilibrium,
                                  **({"weights": cfg.weights} if cfg.weights else {})).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.init_from:  # another run's final network; IMTA's second stage trains new heads on frozen stages
            self.model.load_state_dict(runfolder.final_network(cfg.init_from, self.device))
            if cfg.train_heads_only:
                self.model.freeze_stages_and_reset_heads()
        self.objective = objectives.build(cfg.method, self.model.num_exits, **cfg.objective_options()).to(self.device)
        self.objective.check_inputs = False  # checked every check_every steps instead: no host sync per step
        self.optimizer = cfg.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.net = self.model
        if cfg.compile:
            self.net = torch.compile(self.model, mode=cfg.compile_mode)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.net = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.meta = None
        if cfg.freeze_weights_from:  # the frozen ablation: another run's final learned weights, kept fixed
            self.objective.fix_weights(runfolder.final_weights(cfg.freeze_weights_from),
                                       source=f"freeze_weights_from: {cfg.freeze_weights_from}")
        elif list(self.objective.parameters()):
            self.meta = bilevel.MetaStep(self.net, self.objective, lr=cfg.meta_lr_for(len(self.data.train)), method=cfg.meta_method,
                                         val_loss=cfg.val_loss, alpha=cfg.alpha, check_finite=False,
                                         hypergrad_norm=cfg.hypergrad_norm)
            self.meta.val_loss.to(self.device)
        self._plain_fn, self._meta_fn = self._plain_step, self._meta_step
        if cfg.compile == "step":  # graph breaks at backward() split the step; each part is compiled
            self._plain_fn = torch.compile(self._plain_step, mode=cfg.compile_mode)
            self._meta_fn = torch.compile(self._meta_step, mode=cfg.compile_mode)
        self.exit_flops = cost.exit_flops(self.model, self.data.input_shape)
        if self.device.type == "cpu":  # threads 0: what suits this model and how busy the machine is now
            torch.set_num_threads(cfg.threads or distributed.auto_threads(self.exit_flops[-1] * cfg.batch_size))
        self.warmup_steps = cfg.warmup_steps(len(self.data.train))  # the weights keep their start until then
        self.epoch = self.batch = self.step = self.meta_steps = 0
        self._acc = self._zero_accumulators()
        self.folder = self.run_dir if self.rank == 0 else None              # written by rank 0 only
        self._stop_signal = None

    # -- setup helpers
    def _zero_accumulators(self):
        zeros = lambda *shape, dtype=torch.long: torch.zeros(shape, device=self.device, dtype=dtype)
        return {"loss": zeros(dtype=torch.float64), "correct": zeros(self.model.num_exits), "seen": zeros()}

    # -- run folder
    def _config_record(self) -> Dict:
        return {"config": dataclasses.asdict(self.cfg), "git_commit": runinfo.git_commit(),
                "packages": runinfo.package_versions(), "device": runinfo.device_name(self.device),
                "threads_used": torch.get_num_threads(),
                "world_size": self.world_size, "split": {k: self.data.split.get(k) for k in
                                                         ("protocol", "seed", "checksum", "val_per_class", "train_per_class")},
                "exit_flops": self.exit_flops,
                "meta_lr_used": self.meta.optimizer.param_groups[0]["lr"] if self.meta is not None else None}

    def _begin(self, resume: Optional[bool]) -> bool:
        """Rank 0 checks the run folder against these settings and begins the run there (RunFolder.begin); True
        when training continues from a checkpoint."""
        if self.folder is not None:
            self.folder.begin(self._config_record(), resume, say=say)
        distributed.barrier()  # the other ranks decide once rank 0 has checked (and perhaps reset) the folder
        return resume is not False and self.run_dir is not None and self.run_dir.resumable()

    # -- checkpoints
    def state_dict(self) -> Dict:
        state = {"model": self.model.state_dict(), "objective": self.objective.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "batch": self.batch,
                 "step": self.step, "meta_steps": self.meta_steps,
                 "accumulators": {k: v.cpu() for k, v in self._acc.items()},
                 "config": {**dataclasses.asdict(self.cfg), "lr_milestones": list(self.cfg.lr_milestones)},
                 "rng": torch.get_rng_state()}  # stochastic depth and dropout draw from it: resume bit-identically
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.meta is not None:
            state["meta_optimizer"] = self.meta.optimizer.state_dict()
            state["val_loss"] = self.meta.val_loss.state_dict()
        return state

    def save_checkpoint(self) -> None:
        if self.folder is not None:
            self.folder.save_checkpoint(self.state_dict())

    def load_checkpoint(self) -> None:
        """Continue from the run folder's checkpoint (or the previous one, if the newer one is unreadable)."""
        state = self.run_dir.load_checkpoint(self.device, say=say)
        self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.meta is not None:
            self.meta.optimizer.load_state_dict(state["meta_optimizer"])
            self.meta.val_loss.load_state_dict(state["val_loss"])
        self.epoch, self.batch, self.step, self.meta_steps = (state[k] for k in ("epoch", "batch", "step", "meta_steps"))
        if "rng" in state:  # checkpoints from before it was kept resume as they did
            torch.set_rng_state(state["rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self._acc = {k: v.to(self.device) for k, v in state["accumulators"].items()}

    def load_finished(self) -> None:
        """A finished run's final state: its last checkpoint (network, weights, their optimizers), or, with the
        checkpoints deleted or unreadable, model.pt and the final weights in results.json."""
        if self.run_dir.resumable():
            try:
                return self.load_checkpoint()
            except RuntimeError as e:
                say(f"{e}; loading model.pt and the weights in results.json instead")
        self.model.load_state_dict(self.run_dir.load_model(self.device))
        if list(self.objective.parameters()):
            named = self.run_dir.results()["weights"]
            self.objective.set_weights([named[n] / self.objective.scale for n in self.objective.term_names])
        self.epoch = self.cfg.epochs

    # -- training
    def _val_batch(self):  # the held-out stream continues across epochs and resumes
        return self.data.val_stream.batch_at(*divmod(self.meta_steps, len(self.data.val_stream)))

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
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            if self.meta is not None and bilevel.updates_weights_at(self.step, self.cfg.meta_interval, self.warmup_steps):
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

    def _epoch_metrics(self, seconds: float, images: int) -> Dict:
        acc, seen, val = self._acc, max(int(self._acc["seen"]), 1), evaluation.per_exit_metrics(self.model, self.data.val)
        row = {"epoch": self.epoch + 1, "lr": self.cfg.lr_at(self.epoch), "train_loss": float(acc["loss"]) / seen,
               "train_top1": (acc["correct"].double() / seen).tolist(), "val_loss": val["loss"], "val_top1": val["top1"],
               "val_top5": val["top5"], "images_per_s": images / max(seconds, 1e-9), "epoch_seconds": seconds,
               "weights": self.objective.named_weights()}
        if hasattr(self.objective, "temperature") and torch.is_tensor(self.objective.temperature):
            row["temperature"] = float(self.objective.temperature)
        return row

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step, saving a checkpoint (what SIGINT and SIGTERM do during fit)."""
        self._stop_signal = signum

    def fit(self, resume: Optional[bool] = False) -> List[Dict]:
        """Train to cfg.epochs; returns the per-epoch metrics (also in metrics.jsonl). resume: True or None
        continue from the run folder's checkpoint (True says so when there is none); with False a folder holding
        an interrupted run is an error."""
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

    def _fit(self, resume: Optional[bool], handlers: Dict) -> List[Dict]:
        if self._begin(resume):
            self.load_checkpoint()
        history = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, lambda signum, frame: self.request_stop(signum))
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
                        f"checkpoint saved" + (f" in {self.folder.path}: continue with the same command plus "
                                               "--resume" if self.folder is not None else ""))
            bar.close()
            self._check_finite()
            seconds = time.perf_counter() - start
            row = self._epoch_metrics(seconds, (self.batch - first_batch) * self.cfg.batch_size * self.world_size)
            history.append(row)
            self.epoch, self.batch = self.epoch + 1, 0
            self._acc = self._zero_accumulators()
            if self.folder is not None:
                self.folder.append_metrics(row)
            self.save_checkpoint()
        if self.folder is not None:
            self.folder.save_model(self.model.state_dict())
        return history

    # -- evaluation after training
    def evaluate(self, write: bool = True) -> Optional[Dict]:
        """Anytime (test) and budgeted (thresholds on the held-out split, applied to test) results. Under torchrun
        every rank evaluates its block of each split; rank 0 gets (and writes) the results, the others None."""
        val, test = evaluation.predict(self.model, self.data.val), evaluation.predict(self.model, self.data.test)
        if self.rank != 0:
            return None
        results = {**evaluation.network_results(self.model, val, test, self.exit_flops, self.data.input_shape,
                                                self.device, latency_batch=min(256, self.cfg.eval_batch_size)),
                   "weights": self.objective.named_weights(), **self._config_record()}
        if self.folder is not None and self.folder.exists():
            results = self.folder.with_history(results)
            if write:
                self.folder.write_results(results)
        return results


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
        folder.check_settings(trainer._config_record())
        trainer.load_finished()
        return trainer, folder.results()
    trainer.fit(resume=resume)
    return trainer, (trainer.evaluate() if evaluate else None)


def _parser(argv=None):
    """The training CLI's parser: config's, with the defaults of the --dataset/--recipe in argv shown."""
    p = argparser_for(argv or [], description=__doc__.split("\n\n")[0])
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
        say("error: --resume needs --out, the run folder to continue")
        return 2
    recorded = RunFolder(given["out"]) if given.get("out") else None
    finished = False
    try:
        if resume and recorded.exists():
            # --resume continues the run with its recorded settings; options given on the command line must agree
            values = {**stored_config(recorded.config()["config"]), **given}
        trainer = Trainer(config_from_dict(values))
        trainer.fit(resume=resume)
        results = None if no_eval else trainer.evaluate()
        if results is not None:
            print(" ".join(f"exit{r['exit']}={100 * r['top1']:.2f}" for r in results["anytime"]))
        finished = True
    except TrainingInterrupted as e:
        say(str(e))
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, FloatingPointError, data.DatasetError, RunFolderBusy,
            RuntimeError, OSError) as e:
        if debug:
            raise
        message = str(e)  # raised in a DataLoader worker: keep the original error's line
        message = message.strip().splitlines()[-1].split(": ", 1)[-1] if "Original Traceback" in message else message
        if isinstance(e, PermissionError):
            message += " (the file system refused: choose an --out, --data-root or --split-dir you may use)"
        elif recorded and recorded.resumable() and not isinstance(e, (RunFolderBusy, FileExistsError, RunFolderDamaged)):
            message += f" (the last good checkpoint in {recorded.path} is kept: continue with the same command plus --resume)"
        say(f"error: {type(e).__name__ + ': ' if isinstance(e, OSError) and not isinstance(e, DiskFull) else ''}{message}")
        return 2
    finally:
        distributed.teardown(wait=finished)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
