"""The training engine: one Trainer for the notebooks and the command line.

    python -m hdkdlib.train --dataset cifar100 --data-root data --arch msdnet_cifar_anytime \\
        --method hdkd --epochs 300 --out runs/NAME [--resume]
    torchrun --nproc_per_node 8 -m hdkdlib.train --dataset folder --data-root /data/imagenet ...

hdkdlib.runfolder owns the run folder (its files, atomic writes, the lock); hdkdlib.config the settings.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch

from . import bilevel, cli, config, cost, data, distributed, evaluation, models, objectives, runfolder, runinfo
# Settings live in hdkdlib.config, data in hdkdlib.data.bundle; these names stay importable from here.
from .cli import say
from .config import TrainConfig, argparser_for, config_from_dict, config_to_dict, unused_settings
from .config import to_argv as cli_args
from .data.bundle import DataBundle, build_data
from .runfolder import RunFolder, RunFolderBusy, RunFolderDamaged, RunFolderMismatch
from .progress import bar as progress_bar
from .resume import resolve, settings_differ
from .step import CapturedStep, TrainStep, compile_step

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "prepare", "run", "load_run", "main", "cli_args",
           "config_from_dict", "DataBundle", "build_data"]


class TrainingInterrupted(RuntimeError):
    pass


class Trainer:
    """The parts of one run (data, network, objective, optimizers, run folder) and its training loop. Build it with
    prepare(cfg): the settings are taken as given (resume.resolve settles them) and never rewritten here."""

    def __init__(self, cfg: TrainConfig, process: Tuple[int, int, torch.device], data_bundle: Optional[DataBundle] = None):
        self.cfg, (self.rank, self.world_size, self.device) = cfg, process
        self.folder = RunFolder(cfg.out) if cfg.out else None  # read by every rank, written by rank 0
        self.data = data_bundle or build_data(cfg, self.device, self.rank, self.world_size)
        self.model = models.build(cfg.arch, self.data.num_classes, input_shape=self.data.input_shape,
                                  gradient_equilibrium=cfg.gradient_equilibrium,
                                  **({"init": cfg.msdnet_init} if cfg.arch in models.MSDNET_CONFIGS else {}),
                                  **({"weights": cfg.weights} if cfg.weights else {})).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.init_from:  # another run's final network; IMTA's second stage trains new heads on frozen stages
            try:
                self.model.load_state_dict(runfolder.final_network(cfg.init_from, self.device))
            except RuntimeError as e:  # torch lists every mismatched tensor; the first names the problem
                first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
                first = first if len(first) <= 160 else first[:160] + "..."  # a missing-keys line names them all
                raise ValueError(f"init_from {cfg.init_from}: its network is not a {cfg.arch} with "
                                 f"{self.data.num_classes} classes ({first.rstrip('.')}): give a finished run of "
                                 f"arch {cfg.arch} on this dataset") from None
            if cfg.train_heads_only:
                self.model.freeze_stages_and_reset_heads(cfg.heads_reset)
        # the loss is checked every check_every steps instead of every step: no host sync per step
        self.objective = objectives.build(cfg.method, self.model.num_exits, check_inputs=False,
                                          **cfg.objective_options()).to(self.device)
        self.optimizer = cfg.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        # "step" compiles the whole step (step.compile_step), the network inside it
        self.net = torch.compile(self.model, mode=cfg.compile_mode) if cfg.compile == "network" else self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.net = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.meta = None
        if cfg.freeze_weights_from == config.FROZEN_AT_START:  # no learning: what the weight update adds to its start
            self.objective.freeze(source="freeze_weights_from: init")
        elif cfg.freeze_weights_from:  # the frozen ablation: another run's final learned weights, kept fixed
            self.objective.fix_weights(runfolder.final_weights(cfg.freeze_weights_from),
                                       source=f"freeze_weights_from: {cfg.freeze_weights_from}")
        elif list(self.objective.parameters()):
            self.meta = bilevel.MetaStep(self.net, self.objective, lr=cfg.meta_lr_for(len(self.data.train)),
                                         method=cfg.meta_method, val_loss=cfg.val_loss, alpha=cfg.alpha,
                                         check_finite=False, hypergrad_norm=cfg.hypergrad_norm, device=self.device,
                                         horizon=cfg.meta_horizon)
            if cfg.compile == "step" and self.meta.same_draws and cfg.meta_method == "finite_difference":
                raise ValueError("compile 'step' cannot give the finite-difference probes the same dropout or "
                                 f"stochastic-depth masks ({cfg.arch} draws them; torch.compile traces no random "
                                 "state): use compile 'network' (--compile network), or no compile")
        self._step = None  # the TrainStep, built when training begins (it refers to the optimizer's loaded state)
        self.exit_flops = cost.exit_flops(self.model, self.data.input_shape)
        self.warmup_steps = cfg.warmup_steps(len(self.data.train))  # the weights keep their start until then
        self.epoch = self.batch = self.step = self.meta_steps = 0
        self._acc = self._zero_accumulators()
        self._stop_signal = None
        self.action = None  # what fit was asked to do: a notebook says "trained" or "loaded" (notebook.what_was_done)
        self.began = False  # the run folder checked and the state loaded: what fails from here on may pass on a rerun
        self._resumed_from = None  # (record, epoch, batch) of a resume, recorded just before its first checkpoint

    # -- run folder
    def _config_record(self) -> Dict:
        return {"config": config_to_dict(self.cfg), "git_commit": runinfo.git_commit(),
                "packages": runinfo.package_versions(), "device": runinfo.device_name(self.device),
                "threads_used": torch.get_num_threads(), "step_mode": self.step_mode,
                "world_size": self.world_size, "split": {k: self.data.split.get(k) for k in
                                                         ("protocol", "seed", "checksum", "val_per_class", "train_per_class")},
                "data": self.data.fingerprint, "tf32": self._tf32(), "exit_flops": self.exit_flops, "meta_lr_used": self.meta.lr if self.meta is not None else None}

    def _tf32(self) -> Optional[Dict[str, bool]]:
        """Whether CUDA convolutions and matmuls may round to TF32 (PyTorch's defaults: convolutions yes, matmuls
        no): a GPU run's arithmetic differs from a CPU run's there. None on a CPU."""
        if self.device.type != "cuda":
            return None
        if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":  # cuBLAS and cuDNN then never use TF32, whatever torch says
            return {"convolutions": False, "matmul": False}
        return {"convolutions": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}

    @property
    def writes(self) -> bool:  # rank 0 alone writes the run folder
        return self.folder is not None and self.rank == 0

    # -- checkpoints
    def state_dict(self) -> Dict:
        state = {"model": self.model.state_dict(), "objective": self.objective.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "batch": self.batch,
                 "step": self.step, "meta_steps": self.meta_steps,
                 "accumulators": {k: v.cpu() for k, v in self._acc.items()},
                 "config": config_to_dict(self.cfg),
                 "rng": torch.get_rng_state()}  # stochastic depth and dropout draw from it: resume bit-identically
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.meta is not None:
            state.update(self.meta.state_dict())
        return state

    def save_checkpoint(self) -> None:
        if self.writes:
            if self._resumed_from is not None:  # before the checkpoint it trained: a kill between keeps the record
                self.folder.record_resume(*self._resumed_from)
                self._resumed_from = None
            self.folder.save_checkpoint(self.state_dict())

    def load_checkpoint(self, state: Optional[Dict] = None) -> None:
        """Continue from the run folder's checkpoint (or the previous one, if the newer one is unreadable)."""
        state = state or self.folder.load_checkpoint(self.device, say=say, foreign=self._other_run)
        self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._step = None  # rebuilt over the loaded optimizer state
        if self.meta is not None:
            self.meta.load_state_dict(state)
        self.epoch, self.batch, self.step, self.meta_steps = (state[k] for k in ("epoch", "batch", "step", "meta_steps"))
        if "rng" in state:  # checkpoints from before it was kept resume as they did
            torch.set_rng_state(state["rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        # The epoch's training sums so far: rank 0's, the only ones a checkpoint holds (no collective at a stop, which
        # ranks may meet a step apart). The other ranks count from here, so a mid-epoch resume's epoch row averages
        # over the images counted instead of counting rank 0's W times.
        self._acc = ({k: v.to(self.device) for k, v in state["accumulators"].items()} if self.rank == 0
                     else self._zero_accumulators())

    def _other_run(self, state: Dict) -> Optional[str]:
        """Why a checkpoint is not this run's (copied from another run folder), or None."""
        if not isinstance(state.get("config"), dict):
            return "no settings recorded"
        differ = settings_differ(state["config"], config_to_dict(self.cfg))
        if differ:
            return f"other {', '.join(differ[:4])}"
        # a position outside the run would skip its training and end it as finished (batch == batches: the epoch's
        # steps all taken, a stop signal came before its metrics line)
        epoch, batch, batches = state["epoch"], state["batch"], len(self.data.train)
        if not all(type(v) is int for v in (epoch, batch, state["step"])) or not (
                0 <= epoch <= self.cfg.epochs and 0 <= batch <= batches and (epoch < self.cfg.epochs or batch == 0)):
            return f"epoch {epoch!r}, batch {batch!r} lie outside its {self.cfg.epochs} epochs of {batches} batches"
        return None

    def load_finished(self) -> None:
        """A finished run's final state: its last checkpoint (network, weights, their optimizers), or, with the
        checkpoints deleted or unreadable, model.pt and the final weights in results.json."""
        if self.folder.resumable():
            try:
                state = self.folder.load_checkpoint(self.device, say=say, foreign=self._other_run)
                if state["epoch"] == self.cfg.epochs and state["batch"] == 0:
                    return self.load_checkpoint(state)
                say(f"the readable checkpoint of {self.folder.path} is of epoch {state['epoch']}, not the last: "
                    "loading model.pt and the final weights instead")  # never the network of an epoch before
            except RuntimeError as e:
                say(f"{e}; loading model.pt and the weights in results.json instead")
        self.model.load_state_dict(self.folder.load_model(self.device))
        if list(self.objective.parameters()):  # trained, not yet evaluated: the last epoch's line has them
            named = self.folder.results()["weights"] if self.folder.evaluated() else self.folder.metrics()[-1]["weights"]
            self.objective.set_weights([named[n] / self.objective.scale for n in self.objective.term_names])
        self.epoch = self.cfg.epochs

    # -- training
    def _zero_accumulators(self):
        zeros = lambda *shape, dtype=torch.long: torch.zeros(shape, device=self.device, dtype=dtype)
        return {"loss": zeros(dtype=torch.float64), "correct": zeros(self.model.num_exits), "seen": zeros()}

    def _val_batch(self):  # the held-out stream continues across epochs and resumes
        return self.data.val_stream.batch_at(*divmod(self.meta_steps, len(self.data.val_stream)))

    @functools.cached_property
    def step_mode(self) -> str:
        """How steps run: compiled (--compile step), captured (CUDA graphs: the default on a GPU), or eager. CUDA
        graphs asked for where there is no GPU: eager, said in one line (and recorded in config.json). A capture
        that fails later falls back to eager: step_mode_ran says so in metrics.jsonl."""
        if self.cfg.compile == "step":
            return "compiled"
        wanted = self.cfg.cuda_graphs == "on" or (self.cfg.cuda_graphs == "auto" and self.device.type == "cuda"
                                                  and not self.cfg.compile)
        if wanted and (self.device.type != "cuda" or self.world_size > 1):
            if self.cfg.cuda_graphs == "on" and self.rank == 0:
                say(f"cuda_graphs on needs one CUDA device (this run: {self.device}, {self.world_size} process(es)): "
                    "the step runs eagerly")
            return "eager"
        return "captured" if wanted else "eager"

    def step_mode_ran(self) -> str:
        """How this epoch's steps ran: step_mode (what config.json records), or eager once capturing failed, with
        the reason (every epoch's line in metrics.jsonl says it)."""
        failed = getattr(getattr(self, "_call", None), "failed", None)
        return f"eager (capture failed: {failed})" if failed else self.step_mode

    def step_function(self) -> TrainStep:
        """The run's TrainStep, built on first use after the state is loaded."""
        if self._step is None:
            self._step = TrainStep(self.net, self.objective, self.optimizer, self.meta)
            self._step.set_lr(self.cfg.lr_at(self.epoch))
            mode = self.step_mode
            self._call = (compile_step(self._step, self.cfg.compile_mode) if mode == "compiled"
                          else CapturedStep(self._step, capture=True, say=say) if mode == "captured" else self._step)
        return self._step

    def train_step(self, x, y):
        """One optimisation step (with the bilevel weight update every meta_interval steps after the warm-up)."""
        due = self.meta is not None and bilevel.updates_weights_at(self.step, self.cfg.meta_interval, self.warmup_steps)
        self.step_function()
        # no autocast cache: a captured graph must not keep casts from another step
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16, cache_enabled=False):
            loss, logits = self._call((x, y), self._val_batch() if due else None)
        self.meta_steps += due
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
        # the global batch's: summed over ranks (copies: the sums stay this rank's for the next step)
        acc = dict(zip(self._acc, distributed.sum_over_ranks([t.clone() for t in self._acc.values()])))
        seen, val = max(int(acc["seen"]), 1), evaluation.per_exit_metrics(self.model, self.data.val)
        row = {"epoch": self.epoch + 1, "lr": self.cfg.lr_at(self.epoch), "train_loss": float(acc["loss"]) / seen,
               "train_top1": (acc["correct"].double() / seen).tolist(), "val_loss": val["loss"], "val_top1": val["top1"],
               "val_top5": val["top5"], "images_per_s": images / max(seconds, 1e-9), "epoch_seconds": seconds,
               "weights": self.objective.named_weights(), "step_mode": self.step_mode_ran(),
               **self.objective.state_for_log()}
        return row

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step, saving a checkpoint (what SIGINT and SIGTERM do during fit)."""
        self._stop_signal = signum

    def fit(self, action: str = "start") -> List[Dict]:
        """Carry out resume.resolve's action in the run folder ("start", "continue" from the checkpoint, "evaluate"
        or "load" a trained run) and train to cfg.epochs; returns the per-epoch metrics (also in metrics.jsonl)."""
        self.action = action
        if self.writes:
            self.folder.acquire()  # no second process trains into this folder meanwhile
        handlers = {}
        try:
            return self._fit(action, handlers)
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if self.writes:
                self.folder.release()

    def _fit(self, action: str, handlers: Dict) -> List[Dict]:
        if self.writes:
            self.folder.begin(self._config_record(), action, say=say)
        distributed.barrier()  # the other ranks go on once rank 0 has checked (and perhaps reset) the folder
        if action in ("load", "evaluate"):  # trained: its final network; no epoch of it is trained again
            self.load_finished()
            self.began = action == "evaluate"  # its evaluation, which follows, may pass on a rerun
            return []
        if action == "continue":  # its checkpoint (gone since resolve found it: the final network, if trained)
            self.load_checkpoint() if self.folder.resumable() else self.load_finished()
            if self.writes:  # written with its first checkpoint: a resume that fails before it changes nothing
                self._resumed_from = (self._config_record(), self.epoch, self.batch)
        self.began = True
        history = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, lambda signum, frame: self.request_stop(signum))
        while self.epoch < self.cfg.epochs:
            self.model.train()  # a model with frozen stages keeps them in eval mode (MultiExitNet.train)
            self.step_function().set_lr(self.cfg.lr_at(self.epoch))
            start, first_batch = time.perf_counter(), self.batch
            bar = progress_bar(total=len(self.data.train), initial=self.batch, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
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
                                               "--resume" if self.writes else ""))
            bar.close()
            self._check_finite()
            seconds = time.perf_counter() - start
            row = self._epoch_metrics(seconds, (self.batch - first_batch) * self.cfg.batch_size * self.world_size)
            history.append(row)
            self.epoch, self.batch = self.epoch + 1, 0
            self._acc = self._zero_accumulators()
            if self.writes:
                self.folder.append_metrics(row)
            self.save_checkpoint()
        if self.writes:
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
        if self.writes and self.folder.exists():
            results = self.folder.with_history(results)
            if write:
                self.folder.write_results(results)
        return results


def prepare(cfg: TrainConfig, data_bundle: Optional[DataBundle] = None) -> Trainer:
    """The one place that sets up this process for a run (ranks and device, the seed, CPU threads), then builds
    the run's Trainer. cfg is taken as given: resume.resolve settles it first for a run folder made earlier."""
    process = distributed.setup(cfg.device)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, process, data_bundle)
    if trainer.device.type == "cpu":
        torch.set_num_threads(cfg.threads or _recorded_threads(trainer.folder)
                              or distributed.auto_threads(trainer.exit_flops[-1] * cfg.batch_size))
    return trainer


def _recorded_threads(folder: Optional[RunFolder]) -> Optional[int]:
    """For threads 0 (what suits the model and how busy the machine is now): a run that goes on from a checkpoint
    keeps the thread count it began with, since a convolution's sums differ between thread counts (a resume
    would not be bit-identical)."""
    if folder is None or not folder.resumable():
        return None
    used = folder.config().get("threads_used")
    return used if isinstance(used, int) and not isinstance(used, bool) and 0 < used <= config.MAX_THREADS else None


def load_run(run_dir, device: str = "auto") -> Trainer:
    """A trained run folder as a Trainer holding its final model, read-only (for evaluation and exploration)."""
    folder = RunFolder(run_dir)
    if not (folder.exists() and folder.trained()):
        raise FileNotFoundError(f"{folder.path} is not a finished run folder (config.json and model.pt expected)")
    plan = resolve({"out": str(folder.path), "device": device, "progress": False}, "continue")
    trainer = prepare(dataclasses.replace(plan.cfg, out=""))  # no folder: evaluating it writes nothing there
    folder.begin(trainer._config_record(), "load")  # the data and split it trained on, as a resume checks them
    trainer.model.load_state_dict(folder.load_model(trainer.device))
    return trainer


def run(cfg: TrainConfig, evaluate: bool = True, data_bundle: Optional[DataBundle] = None,
        resume: str = "auto") -> Tuple[Trainer, Optional[Dict]]:
    """Train (or pick up) the run in cfg.out and evaluate it: what the notebooks call. resume: "auto" (continue or
    load what the folder holds), "continue" or "new" (a folder holding a run is an error); see hdkdlib.resume.
    A finished run with the same settings is loaded, not retrained; a folder holding other settings is an error."""
    plan = resolve(cfg, resume)
    trainer = prepare(plan.cfg, data_bundle)
    trainer.fit(plan.action)
    if plan.action == "load":
        return trainer, trainer.folder.results()
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
    if resume and not given.get("out"):
        say("error: --resume needs --out, the run folder to continue")
        return 2
    trainer, finished = None, False
    try:
        plan = resolve(given, "continue" if resume else "new")  # --resume: the recorded settings; given ones agree
        unused = unused_settings(config_to_dict(plan.cfg))
        pointless = {k: unused[k] for k in given if k in unused}
        if pointless:  # a setting that cannot count is a mistake (a missing flag beside it), not a choice
            raise ValueError(config.unused_flags_line(pointless))
        trainer = prepare(plan.cfg)
        trainer.fit(plan.action)
        if plan.action == "load":  # finished: its results stay those it recorded (not evaluated again here)
            say(f"{plan.cfg.out} holds a finished run: its recorded results")
            results = trainer.folder.results()
        else:
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
        # --resume is advised only where it can succeed: after the run began training from a readable folder, and
        # not after a non-finite loss, which a bit-identical resume meets again. A bad setting, a damaged record or
        # an unreadable checkpoint fails the same way when resumed.
        kept = (trainer is not None and trainer.began and trainer.writes and trainer.folder.resumable()
                and not isinstance(e, (RunFolderDamaged, RunFolderMismatch, FloatingPointError)))
        say("error: " + cli.error_line(e, str(trainer.folder.path) if kept else None))
        return 2
    finally:
        distributed.teardown(wait=finished)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
