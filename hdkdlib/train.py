"""The training engine: one Trainer for the notebooks and the command line.

    python -m hdkdlib.train --dataset cifar100 --data-root data --arch msdnet_cifar_anytime \\
        --method hdkd --epochs 300 --out runs/NAME [--resume]
    torchrun --nproc_per_node 8 -m hdkdlib.train --dataset folder --data-root /data/imagenet ...

A run folder holds config.json (every setting, git commit, package versions, device), metrics.jsonl
(one line per epoch), checkpoint.pt (written atomically every epoch and on Ctrl-C / SIGTERM; the
previous one is kept as checkpoint.prev.pt), and at the end model.pt and results.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import bilevel, cost, data, evaluation, models, objectives, runinfo
from .paths import atomic_write_text, runs_dir

# The settings live in hdkdlib.config; these names stay importable from here (notebooks, older scripts).
from .config import (DATASETS, LEGACY_VALUES, RECIPES, TrainConfig, argparser, config_from_dict,  # noqa: E402,F401
                     stored_config, to_argv as cli_args)

IMAGENET_RECIPE = RECIPES["imagenet"]


# --- data -------------------------------------------------------------------------------------------
@dataclass
class DataBundle:
    train: object          # .batches(epoch, start) and len(): the augmented training stream
    val_stream: object     # .batch_at(epoch, b): held-out batches for the weight update (never augmented)
    val: object            # evaluation batches of the held-out split
    test: object           # evaluation batches of the test split
    num_classes: int
    input_shape: tuple
    split: Dict = field(repr=False, default_factory=dict)
    mean: tuple = ()
    std: tuple = ()


def _tensor_data(cfg: TrainConfig):
    root = Path(cfg.data_root)
    if cfg.dataset in ("cifar10", "cifar100"):
        x, y, _ = data.load_cifar(root, cfg.dataset, train=True, download_if_missing=cfg.download)
        xt, yt, _ = data.load_cifar(root, cfg.dataset, train=False, download_if_missing=cfg.download)
        spec = data.CIFAR_SPECS[cfg.dataset]
        return x, y, xt, yt, spec["num_classes"], spec["mean"], spec["std"]
    if cfg.dataset == "synthetic":
        x, y = data.synthetic_images(6000, num_classes=10, seed=0)        # same classes (pattern_seed 0),
        xt, yt = data.synthetic_images(1000, num_classes=10, seed=1)      # other samples for the test set
        return x, y, xt, yt, 10, None, None
    test_split = "test" if (root / "test").is_dir() else "val"
    x, y, classes = data.folder_to_tensor(root, "train")
    xt, yt, _ = data.folder_to_tensor(root, test_split)
    return x, y, xt, yt, len(classes), None, None


def build_data(cfg: TrainConfig, device, rank: int = 0, world_size: int = 1) -> DataBundle:
    if cfg.dataset == "folder":
        return _folder_data(cfg, device, rank, world_size)
    x, y, xt, yt, k, mean, std = _tensor_data(cfg)
    val_per_class = cfg.val_per_class or max(1, 5000 // k)
    split_dir = cfg.split_dir or (str(runs_dir() / "splits") if cfg.dataset == "synthetic" else None)
    split = data.splits.load_or_create(y.numpy(), dataset=cfg.dataset, val_per_class=val_per_class,
                                       train_per_class=cfg.n_per_class or None, seed=cfg.split_seed,
                                       folder=split_dir)  # generated data: its splits are not versioned
    tr, va = data.splits.as_tensors(split)
    if mean is None:  # statistics of the training images themselves (folder32, synthetic)
        pixels = x[tr].float() / 255
        mean, std = tuple(pixels.mean((0, 2, 3)).tolist()), tuple(pixels.std((0, 2, 3)).tolist())
    common = dict(mean=mean, std=std, device=device, channels_last=cfg.channels_last)
    if len(tr) < cfg.batch_size * world_size:
        raise ValueError(f"{len(tr)} training images but a global batch of {cfg.batch_size * world_size}: "
                         "lower batch_size or use more data")
    train = data.GpuLoader(x[tr], y[tr], cfg.batch_size, train=True, seed=cfg.seed, rank=rank,
                           world_size=world_size, **common)
    stream = data.GpuLoader(x[va], y[va], min(cfg.batch_size, len(va) // world_size), train=True, pad=0, flip=False,
                            seed=cfg.seed + 1, rank=rank, world_size=world_size, **common)
    val = data.GpuLoader(x[va], y[va], cfg.eval_batch_size, train=False, **common)
    test = data.GpuLoader(xt, yt, cfg.eval_batch_size, train=False, **common)
    return DataBundle(train, stream, val, test, k, tuple(x.shape[1:]), split, tuple(mean), tuple(std))


class _HostLoader:
    """Image-folder batches through a DataLoader, sharded across ranks like the GpuLoader."""

    def __init__(self, dataset, indices, batch_size, *, train, seed, workers, device, rank, world_size,
                 channels_last):
        self.dataset, self.indices, self.batch_size = dataset, torch.as_tensor(indices), batch_size
        self.train, self.seed, self.workers, self.device = train, seed, workers, device
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last

    def __len__(self):
        g = self.batch_size * self.world_size
        return len(self.indices) // g if self.train else -(-len(self.indices) // g)

    def _order(self, epoch):
        if not self.train:
            return self.indices
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def batches(self, epoch, start=0):
        order, g = self._order(epoch), self.batch_size * self.world_size
        mine = [order[b * g + self.rank * self.batch_size: b * g + (self.rank + 1) * self.batch_size]
                for b in range(start, len(self))]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, torch.cat(mine).tolist()),
                                             batch_size=self.batch_size, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda")
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y.to(self.device)

    def batch_at(self, epoch, b):
        """Batch b of `epoch`; consecutive calls share one DataLoader (its workers start once per epoch)."""
        if getattr(self, "_cursor", None) != (epoch, b):
            self._iterator = self.batches(epoch, start=b)
        self._cursor = (epoch, b + 1)
        return next(self._iterator)

    def __iter__(self):
        return self.batches(0)


def _folder_data(cfg, device, rank, world_size) -> DataBundle:
    root = Path(cfg.data_root)
    train_aug = data.image_folder(root, "train")
    train_plain = data.image_folder(root, "train", train=False)
    test = data.image_folder(root, "test" if (root / "test").is_dir() else "val", train=False)
    k = len(train_aug.classes)
    split = data.splits.load_or_create(train_aug.targets, dataset=f"folder-{root.name}",
                                       val_per_class=cfg.val_per_class or 50, train_per_class=cfg.n_per_class or None,
                                       seed=cfg.split_seed, folder=cfg.split_dir or None)
    common = dict(seed=cfg.seed, workers=cfg.workers, device=device, channels_last=cfg.channels_last)
    train = _HostLoader(train_aug, split["train"], cfg.batch_size, train=True, rank=rank, world_size=world_size, **common)
    stream = _HostLoader(train_plain, split["val"], cfg.batch_size, train=True, rank=rank, world_size=world_size,
                         **{**common, "seed": cfg.seed + 1})
    val = _HostLoader(train_plain, split["val"], cfg.eval_batch_size, train=False, rank=0, world_size=1, **common)
    test_all = _HostLoader(test, range(len(test)), cfg.eval_batch_size, train=False, rank=0, world_size=1, **common)
    return DataBundle(train, stream, val, test_all, k, (3, 224, 224), split, data.IMAGENET_MEAN, data.IMAGENET_STD)


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


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA device is available: use --device cpu (or auto)")
    return device


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    if path.exists():
        os.replace(path, path.with_name(path.stem + ".prev" + path.suffix))  # the last good one stays
    os.replace(tmp, path)


# Settings that may differ when a run is resumed: where things are and how fast they run, not what is computed.
RESUMABLE_CHANGES = {"progress", "workers", "device", "out", "check_every", "download", "data_root", "compile",
                     "compile_mode", "threads"}


class Trainer:
    def __init__(self, cfg: TrainConfig, data_bundle: Optional[DataBundle] = None):
        self.cfg = cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world_size = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self._init_distributed()
        self.device = _resolve_device(cfg.device)
        if self.device.type == "cuda" and self.world_size > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        torch.manual_seed(cfg.seed)
        self.data = data_bundle or build_data(cfg, self.device, self.rank, self.world_size)
        self.model = models.build(cfg.arch, self.data.num_classes, **self._arch_options()).to(self.device)
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
        self.out = Path(cfg.out) if cfg.out and self.rank == 0 else None
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

    def _init_distributed(self):
        backend = "nccl" if torch.cuda.is_available() and self.cfg.device != "cpu" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def _arch_options(self) -> Dict:
        options = {"gradient_equilibrium": self.cfg.gradient_equilibrium}
        if self.cfg.arch == "toy_mlp":
            options["in_features"] = math.prod(self.data.input_shape)
        elif self.cfg.arch.startswith("msdnet") and self.data.input_shape[-1] != (224 if "imagenet" in self.cfg.arch else 32):
            options["input_size"] = self.data.input_shape[-1]
        elif self.cfg.arch.startswith("resnet"):
            options["input_shape"] = self.data.input_shape
        return options

    def _objective_options(self) -> Dict:
        return objective_options(self.cfg)

    def _init_network(self, run_dir: Path) -> None:
        """Load another run's final network; with train_heads_only, freeze its stages and re-initialise the heads."""
        path = run_dir / "model.pt" if run_dir.is_dir() else run_dir
        if not path.is_file():
            raise FileNotFoundError(f"init_from: no finished network at {path} (train the first stage there first)")
        self.model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        if self.cfg.train_heads_only:
            for p in self.model.stages.parameters():
                p.requires_grad_(False)
            for m in self.model.heads.modules():
                if hasattr(m, "reset_parameters") and m is not self.model.heads:
                    m.reset_parameters()
            if hasattr(self.model, "reset_parameters"):  # MSDNet's own initialisation rule, heads only
                self.model.reset_parameters(self.model.heads)

    def _freeze_weights(self, path: Path) -> None:
        """Start from another run's final learned weights and keep them fixed (no bilevel update)."""
        if self.cfg.method not in objectives.LEARNED:
            raise ValueError(f"freeze_weights_from needs a method with learned weights ({', '.join(objectives.LEARNED)})")
        try:
            weights = json.loads(path.read_text())["weights"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"freeze_weights_from: cannot read final weights from {path} ({e})") from e
        if list(weights) != self.objective.term_names:
            raise ValueError(f"freeze_weights_from: {path} has terms {list(weights)}, this objective "
                             f"{self.objective.term_names}")
        self.objective.set_weights([weights[n] / self.objective.scale for n in self.objective.term_names])
        self.objective.gamma.requires_grad_(False)

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

    def _prepare_run_folder(self, resume: bool) -> None:
        if self.out is None:
            return
        cfg_path = self.out / "config.json"
        if cfg_path.exists():
            old = stored_config(json.loads(cfg_path.read_text())["config"])
            new = dataclasses.asdict(self.cfg)
            differ = sorted(k for k in set(old) | set(new)
                            if k not in RESUMABLE_CHANGES and json.dumps(old.get(k)) != json.dumps(new.get(k)))
            if not resume:
                raise FileExistsError(f"run folder {self.out} already holds a run: pass resume=True (--resume) to "
                                      "continue it, or choose another out folder")
            if differ:
                raise ValueError(f"run folder {self.out} holds a run with other settings ({', '.join(differ)}); "
                                 "resume with the same settings or choose another out folder")
        elif resume and not (self.out / "checkpoint.pt").exists():
            raise FileNotFoundError(f"nothing to resume in {self.out}: no config.json / checkpoint.pt")
        self.out.mkdir(parents=True, exist_ok=True)
        if not cfg_path.exists():
            atomic_write_text(cfg_path, json.dumps(self._config_record(), indent=1))

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
        if self.out is not None:
            _atomic_save(self.state_dict(), self.out / "checkpoint.pt")

    def load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            prev = path.with_name("checkpoint.prev.pt")
            hint = f"; the previous checkpoint {prev} is intact: rename it to {path.name} to resume from it" \
                if prev.exists() else ""
            raise RuntimeError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}{hint}") from e
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
        if self.out is None:
            return
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        lines = [l for l in lines if json.loads(l)["epoch"] < row["epoch"]]  # a resumed epoch replaces its line
        path.write_text("".join(l + "\n" for l in lines + [json.dumps(row)]))

    def fit(self, resume: bool = False) -> List[Dict]:
        """Train to cfg.epochs; returns the per-epoch metrics (also in metrics.jsonl)."""
        self._prepare_run_folder(resume)
        if resume and self.cfg.out:
            self.load_checkpoint(Path(self.cfg.out) / "checkpoint.pt")
        history = []
        handlers = {}
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._handle_signal)
        try:
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
                            f"checkpoint saved" + (f" in {self.out}: resume with --resume" if self.out else ""))
                bar.close()
                self._check_finite()
                seconds = time.perf_counter() - start
                row = self._epoch_metrics(seconds, (self.batch - first_batch) * self.cfg.batch_size * self.world_size)
                history.append(row)
                self.epoch, self.batch = self.epoch + 1, 0
                self._acc = self._zero_accumulators()
                self._append_metrics(row)
                self.save_checkpoint()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
        if self.out is not None:
            torch.save(self.model.state_dict(), self.out / "model.pt")
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
        if self.out is not None and (self.out / "config.json").exists():
            # The code that trained is the one recorded when the run began; say what evaluated it too.
            began = json.loads((self.out / "config.json").read_text())
            results["evaluated_with"] = {k: results[k] for k in ("git_commit", "packages", "device")}
            results.update({k: began[k] for k in ("git_commit", "packages", "device")})
        if self.out is not None:
            path = self.out / "metrics.jsonl"
            if path.exists():
                results["weights_history"] = [json.loads(l)["weights"] for l in path.read_text().splitlines()]
            if write:
                evaluation.write_results(self.out, results)
        return results


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def load_run(run_dir, device: str = "auto") -> Trainer:
    """A finished run folder as a Trainer holding its final model (for evaluation and exploration)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists() or not (run_dir / "model.pt").exists():
        raise FileNotFoundError(f"{run_dir} is not a finished run folder (config.json and model.pt expected)")
    values = stored_config(json.loads((run_dir / "config.json").read_text())["config"])
    cfg = config_from_dict({**values, "device": device, "progress": False, "out": ""})
    trainer = Trainer(cfg)
    trainer.model.load_state_dict(torch.load(run_dir / "model.pt", map_location=trainer.device, weights_only=True))
    return trainer


def run(cfg: TrainConfig, evaluate: bool = True, data_bundle: Optional[DataBundle] = None
        ) -> Tuple[Trainer, Optional[Dict]]:
    """Train (or pick up) the run in cfg.out and evaluate it: what the notebooks call.

    A finished run with the same settings is loaded, not retrained; an interrupted one is resumed
    from its checkpoint; a folder holding other settings is an error (choose another out folder)."""
    out = Path(cfg.out) if cfg.out else None
    trainer = Trainer(cfg, data_bundle)
    if out is not None and (out / "results.json").exists() and (out / "model.pt").exists():
        trainer._prepare_run_folder(resume=True)  # raises if the settings differ
        trainer.load_checkpoint(out / "checkpoint.pt")  # the final network (as in model.pt) and the weights' state
        return trainer, json.loads((out / "results.json").read_text())
    trainer.fit(resume=out is not None and (out / "checkpoint.pt").exists())
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
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(_parser(argv).parse_args(argv))
    resume, no_eval = args.pop("resume"), args.pop("no_eval")
    given = {k: v for k, v in args.items() if v is not None}
    values = dict(given)
    recorded = Path(given.get("out", "")) / "config.json"
    if resume and given.get("out") and recorded.is_file():
        # --resume continues the run with its recorded settings; options given on the command line must agree
        values = {**stored_config(json.loads(recorded.read_text())["config"]), **given}
    try:
        trainer = Trainer(config_from_dict(values))
        trainer.fit(resume=resume)
        if not no_eval and trainer.rank == 0:
            results = trainer.evaluate()
            print(" ".join(f"exit{r['exit']}={100 * r['top1']:.2f}" for r in results["anytime"]))
        if dist.is_initialized():
            # Leave together: a rank tearing down its gloo group while rank 0 still evaluates was seen to
            # abort once in CI (std::terminate in the idle rank). torchrun ends the others if a rank fails.
            dist.barrier()
    except TrainingInterrupted as e:
        print(f"hdkdlib.train: {e}", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, FloatingPointError, data.DatasetError) as e:
        print(f"hdkdlib.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
