"""Every setting of a training run, the recipes that fill them, and the command line built from them.

A *recipe* is a named set of values for the settings that differ between published training setups
(network, batch size, epochs, lr schedule, momentum kind, limited-data protocol). Those settings default
to None, and `TrainConfig` fills each one that was not given from its recipe when it is built, so the
command line, Python and the notebooks get the same values from this one place. `recipe=""` picks the
dataset's recipe: `imagenet` for `folder`, `msdnet_cifar` for everything else. docs/method.md says where
each recipe comes from.

    TrainConfig(dataset="folder").batch_size        # 256, as `python -m hdkdlib.train --dataset folder`
    argparser().parse_args(["--help"])              # every setting, explained from the help below
    to_argv(cfg)                                    # the flags that rebuild cfg (torchrun launches)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import operator
import typing

import torch
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import bilevel, models, objectives

DATASETS = ("cifar10", "cifar100", "folder32", "folder", "synthetic")
CUDA_GRAPHS = ("auto", "on", "off")
FROZEN_AT_START = "init"  # freeze_weights_from: keep the learned weights at their start
# torch's CPU generator keeps 32 bits of a seed (mt19937), so seeds 2^32 apart would draw the same network and,
# through data.order's (seed + 1) * 1_000_003 + epoch, the same batches; that product stays inside 64 bits.
MAX_SEED = 2 ** 32 - 1
HEADS_RESET = models.base.HEADS_RESET
MAX_THREADS = 1024  # above any machine's cores: more asks the OS for threads it refuses, after the data has loaded

RECIPES: Dict[str, Dict] = {
    # MSDNet's CIFAR code: batch 64, 300 epochs, lr x0.1 at 50% and 75%
    "msdnet_cifar": dict(arch="msdnet_cifar_anytime", batch_size=64, epochs=300, lr_milestones=(), nesterov=False,
                         n_per_class=0, val_per_class=0),
    # the HDKD paper's text: batch 128, 300 epochs, lr /10 at 150 and 225; its CIFAR net has >= 8 exits, most
    # likely Phuong & Lampert's 11-exit MSDNet
    "paper_cifar": dict(arch="msdnet_cifar_dbt11", batch_size=128, epochs=300, lr_milestones=(), nesterov=False,
                        n_per_class=0, val_per_class=0),
    # Phuong & Lampert's code: Nesterov momentum, batch 64, limited data: "CIFAR(500)" = 450 train + 50 held out
    "dbt_cifar": dict(arch="msdnet_cifar_dbt11", batch_size=64, epochs=300, lr_milestones=(), nesterov=True,
                      n_per_class=450, val_per_class=50),
    # MSDNet's ImageNet code: batch 256, 90 epochs, lr x0.1 every 30
    "imagenet": dict(arch="msdnet_imagenet_step4", batch_size=256, epochs=90, lr_milestones=(30, 60), nesterov=False,
                     n_per_class=0, val_per_class=0),
    # fine-tuning a torchvision backbone with exits, as such backbones are fine-tuned (DeiT/timm's practice):
    # AdamW, lr 1e-3 at batch 128, weight decay 0.05, cosine decay after a linear warm-up
    "finetune": dict(arch="vit_b_16_exits", batch_size=128, epochs=30, lr_milestones=(), nesterov=False,
                     n_per_class=0, val_per_class=0, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                     lr_schedule="cosine", warmup_epochs=3),
}


# Values every recipe shares unless it names its own (the SGD setups of MSDNet, the paper and Phuong & Lampert).
SGD_DEFAULTS = dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, lr_schedule="step", warmup_epochs=0)
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("step", "cosine")
LR_RANGE, SCALE_RANGE = (1e-8, 10.0), (1e-4, 1e4)


def check_weights(arch: str, weights: str) -> None:
    """A torchvision weights name for the backbone of `arch`, or a ValueError listing the valid ones."""
    import torchvision
    family = models.torchvision_arch(arch)
    if family is None:
        raise ValueError(f"weights {weights!r}: arch {arch} is not a torchvision backbone with exits "
                         f"({', '.join(models.BACKBONE_ARCHS)} are)")
    valid = [str(w) for w in torchvision.models.get_model_weights(family)]
    if weights not in valid:
        raise ValueError(f"unknown weights {weights!r} for {family}; valid: {', '.join(valid)}")


def default_recipe(dataset: str) -> str:
    return "imagenet" if dataset == "folder" else "msdnet_cifar"


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a run. Settings left at None are filled from the recipe."""
    # data
    dataset: str = _opt("cifar100", "cifar10 | cifar100 (torchvision's format) | folder32 (a tree of small "
                                    "images, held on the device) | folder (ImageNet-style tree) | synthetic")
    data_root: str = _opt("data", "where the dataset lives (CIFAR is downloaded there when missing)")
    download: bool = _opt(True, "CIFAR: download through torchvision when missing")
    recipe: str = _opt("", f"named values for the recipe settings: {', '.join(RECIPES)}; '': imagenet for folder, "
                           "msdnet_cifar otherwise")
    val_per_class: Optional[int] = _opt(None, "held-out validation images per class (recipe; 0: 5,000 in all for "
                                              "CIFAR, 50 per class for folder)")
    n_per_class: Optional[int] = _opt(None, "limited-data protocol: training images per class (recipe; 0: all the rest)")
    split_seed: int = _opt(0, "seed of the split file's draw")
    split_dir: str = _opt("", "where split files live; '': the project's data/splits/ (synthetic: runs/splits/)")
    # model and objective
    arch: Optional[str] = _opt(None, "network (recipe): " + ", ".join(models.names()))
    method: str = _opt("hdkd", "objective: " + ", ".join(objectives.names()))
    temperature: float = _opt(0.0, "KD temperature; 0: the objective's own default")
    kd_share: float = _opt(0.0, "the KD terms' share of each student's loss: dbt's C (0: 0.5, Phuong & Lampert's), "
                                "imta_kd's g (0: 0.9, IMTA's CIFAR setting; their ImageNet: 0.1); learned weights: "
                                "the share the dbt init starts from")
    temperature_growth: float = _opt(0.0, "dbt, hdbt: the factor T grows by after a confident step (0: 1.05)")
    temperature_threshold: float = _opt(0.0, "dbt, hdbt: the last exit's mean max-probability above which T grows "
                                             "(0: 0.5)")
    loss_scale: float = _opt(0.0, "factor on the whole training loss (dbt and learned-weight methods); 0: the "
                                  "objective's own (dbt: 2*5/exits, Phuong & Lampert's; learned weights: 1)")
    init: str = _opt("", "learned-weight initialisation (dbt, ds, uniform, random); '': the objective's default")
    weight_map: str = _opt("softmax", "learned weights: softmax (w = total * softmax(gamma)), softplus (free "
                                         "total), softplus_total (softplus normalised to the initial total) or "
                                         "bounded (each weight within weight_bound of its start)")
    weight_bound: float = _opt(0.8, "weight_map bounded: the fraction in (0, 1] by which a weight may leave its start")
    gradient_equilibrium: bool = _opt(False, "IMTA's gradient equilibrium")
    msdnet_init: str = _opt("rule", "MSDNets' initial weights: rule (conv N(0, sqrt(2/(k*k*out))), BN 1/0, Linear "
                                    "bias 0: the rule MSDNet's PyTorch code writes down) or torch (PyTorch's "
                                    "defaults: what that code runs, its loop reaching no layer)")
    # optimisation
    epochs: Optional[int] = _opt(None, "training epochs (recipe)")
    batch_size: Optional[int] = _opt(None, "images per step and process (recipe)")
    optimizer: Optional[str] = _opt(None, "network optimizer (recipe): sgd or adamw")
    lr: Optional[float] = _opt(None, "network learning rate (recipe)")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: Optional[bool] = _opt(None, "Nesterov momentum (recipe; Phuong & Lampert's code uses it)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.999, "AdamW beta2")
    weight_decay: Optional[float] = _opt(None, "weight decay (recipe; decoupled under AdamW)")
    lr_schedule: Optional[str] = _opt(None, "step (x lr_gamma at each milestone) or cosine (recipe)")
    warmup_epochs: Optional[int] = _opt(None, "epochs of linear lr warm-up before the schedule (recipe)")
    lr_milestones: Optional[Tuple[int, ...]] = _opt(None, "epochs where lr *= lr_gamma (recipe; empty: 50%% and 75%% "
                                                          "of the epochs)")
    lr_gamma: float = _opt(0.1, "lr factor at each milestone")
    weights: str = _opt("", "torchvision weights for a backbone with exits, e.g. ViT_B_16_Weights.IMAGENET1K_V1 "
                            "(downloaded by torchvision on first use)")
    # bilevel weight update (objectives with learned weights)
    meta_interval: int = _opt(1, "training steps per weight update (1..steps per epoch)")
    meta_warmup: float = _opt(0.0, "fraction of the run's steps, in [0, 1), before the weights start to learn (they "
                                   "keep their start meanwhile)")
    meta_schedule: str = _opt("per_run", "weight lr: per_run (gamma can move log(1000) within meta_traverse of the "
                                         "run's weight steps) or fixed (meta_lr)")
    meta_traverse: float = _opt(1.0, "per_run: fraction of the weight steps in (0, 1] within which a weight can "
                                     "move 1000-fold")
    meta_lr: float = _opt(1e-3, "weight lr (Adam) with meta_schedule fixed")
    hypergrad_norm: str = _opt("lr", "lr: hypergradient divided by the network's current lr (no stall after lr "
                                     "drops); none: raw")
    min_init_weight: float = _opt(1e-3, "floor of learned weights that start at 0 (dbt and ds inits), in (0, 1]")
    meta_method: str = _opt("finite_difference", "hypergradient: finite_difference or exact")
    meta_horizon: int = _opt(1, "virtual steps the hypergradient looks ahead (1: the paper's one step; K > 1: through "
                                "K steps on the batch, meta_method exact, about K times the cost; 1..steps per epoch)")
    val_loss: str = _opt("balanced", "validation objective of the weight update: balanced or ce")
    alpha: float = _opt(0.5, "balanced validation loss: share of the plain CE, in [0, 1]")
    freeze_weights_from: str = _opt("", "a finished run folder (or its results.json): its final learned "
                                              "weights, kept fixed (the frozen ablation); init: the weights' start, "
                                              "kept fixed (the no-learning ablation)")
    init_from: str = _opt("", "a finished run folder: start from its final network")
    train_heads_only: bool = _opt(False, "IMTA's second stage: the network frozen, the early exits' last Linear "
                                         "re-initialised and trained")
    heads_reset: str = _opt("classifiers", "train_heads_only: what starts again: classifiers (IMTA's: each early "
                                           "exit's last Linear; the last exit, the teacher, stays) or all (every head; "
                                           "runs begun before 2026-12-05)")
    # engine
    seed: int = _opt(0, "seed of the network initialisation and the batch order")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    threads: int = _opt(0, "CPU threads for torch; 0: auto (1 for small models or a busy machine, else the idle "
                           "cores)")
    bf16: bool = _opt(False, "bf16 autocast (fast on GPUs and on CPUs with AVX-512 BF16 or AMX; emulated, slow, "
                             "elsewhere)")
    channels_last: bool = _opt(False, "channels-last memory format")
    compile: str = _opt("", "'': eager; network: torch.compile the network; step: the whole training step")
    compile_mode: str = _opt("default", "torch.compile mode; reduce-overhead replays CUDA graphs on GPUs")
    cuda_graphs: str = _opt("auto", "the training step captured as CUDA graphs and replayed: auto (on a GPU when not "
                                    "compiling), on, off; where it cannot capture, eager with a one-line warning")
    workers: int = _opt(8, "DataLoader workers (folder)")
    eval_batch_size: int = _opt(500, "images per evaluation batch")
    check_every: int = _opt(50, "steps between checks for NaN (each check waits for the device)")
    out: str = _opt("", "run folder; '': nothing written")
    progress: bool = _opt(True, "progress bars")

    def __post_init__(self):
        name = self.recipe or default_recipe(self.dataset)
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
        recipe = {**SGD_DEFAULTS, **RECIPES[name]}
        filled = [key for key in recipe if getattr(self, key) is None]
        for key in filled:
            setattr(self, key, recipe[key])
        # a recipe's step milestones or Nesterov do not apply to a cosine schedule or AdamW chosen over it, and
        # validate refuses only what was given
        if self.lr_schedule == "cosine" and "lr_milestones" in filled:
            self.lr_milestones = ()
        if self.optimizer == "adamw" and "nesterov" in filled:
            self.nesterov = False

    def validate(self) -> "TrainConfig":
        for name, hint in typing.get_type_hints(TrainConfig).items():  # a config.json edited by hand, or JSON
            wrong = _wrong_type(getattr(self, name), hint)              # parameters: "2" or 2.5 epochs
            if wrong:
                raise ValueError(f"{name} must be {wrong}, got {getattr(self, name)!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}")
        if self.arch not in models.names():
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(models.names())}")
        if self.method not in objectives.names():
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(objectives.names())}")
        for f in dataclasses.fields(self):  # nan and inf parse as floats, and fail many steps later
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must lie in [0, {MAX_SEED}] (torch's generator keeps 32 bits of it), got {self.seed}")
        if not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must lie in [0, {MAX_THREADS}] (0: torch's default), got {self.threads}")
        for name in ("epochs", "batch_size", "meta_interval", "eval_batch_size", "check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_per_class", "val_per_class"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: the dataset's rule), got {getattr(self, name)}")
        # float32 weights move by lr * scale * gradient: far below 1e-8 of the weights nothing changes (a run
        # that trains nothing and exits 0), far above it the first step diverges
        if not LR_RANGE[0] <= self.lr <= LR_RANGE[1]:
            raise ValueError(f"lr must lie in [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}] (outside it float32 training does "
                             f"nothing or diverges), got {self.lr}")
        if not self.meta_lr > 0:
            raise ValueError(f"meta_lr (the weight learning rate) must be > 0, got {self.meta_lr}")
        if not 0 < self.meta_traverse <= 1:
            raise ValueError(f"meta_traverse must lie in (0, 1] (a fraction of the run's weight steps), "
                             f"got {self.meta_traverse}")
        if self.meta_schedule not in bilevel.META_SCHEDULES:
            raise ValueError(f"unknown meta_schedule {self.meta_schedule!r}; valid: {', '.join(bilevel.META_SCHEDULES)}")
        # names are checked whatever the method: a misspelt one is a mistake even where the setting is unused
        for name, valid in (("init", ("",) + objectives.INITS), ("weight_map", objectives.WEIGHT_MAPS),
                            ("val_loss", objectives.VALIDATION_LOSSES), ("meta_method", bilevel.METHODS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(v for v in valid if v)}")
        if self.hypergrad_norm not in bilevel.HYPERGRAD_NORMS:
            raise ValueError(f"unknown hypergrad_norm {self.hypergrad_norm!r}; valid: "
                             f"{', '.join(bilevel.HYPERGRAD_NORMS)}")
        if self.meta_schedule == "per_run" and self.meta_lr != TrainConfig.meta_lr:
            raise ValueError(f"meta_lr {self.meta_lr} is used only with meta_schedule 'fixed' (the default, 'per_run', "
                             "sets the weight lr from the run's length): add meta_schedule='fixed' "
                             "(--meta-schedule fixed), or drop meta_lr and tune meta_traverse")
        if not 0 <= self.meta_warmup < 1:
            raise ValueError(f"meta_warmup must lie in [0, 1) (a fraction of the run's steps), got {self.meta_warmup}")
        bilevel.check_horizon(self.meta_horizon, self.meta_method, self.gradient_equilibrium)
        if self.method in objectives.LEARNED and not self.freeze_weights_from:  # weights learned by hypergradient
            bilevel.check_method(self.meta_method, self.gradient_equilibrium)
        if not 0 < self.weight_bound <= 1:
            raise ValueError(f"weight_bound must lie in (0, 1] (the fraction by which a weight may leave its start), "
                             f"got {self.weight_bound}")
        if not 0 < self.min_init_weight <= 1:
            raise ValueError(f"min_init_weight must lie in (0, 1], got {self.min_init_weight}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1] (the balanced validation loss's share of plain CE), "
                             f"got {self.alpha}")
        if self.loss_scale and not SCALE_RANGE[0] <= self.loss_scale <= SCALE_RANGE[1] or self.loss_scale < 0:
            raise ValueError(f"loss_scale must lie in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] (a factor on the "
                             f"loss: outside it the steps vanish or explode), or be 0 (the objective's own), got "
                             f"{self.loss_scale}")
        if self.loss_scale and self.method not in ("dbt", *objectives.LEARNED):
            raise ValueError(f"loss_scale applies to dbt and the learned-weight methods ({', '.join(objectives.LEARNED)}),"
                             f" not {self.method}: drop it")
        if self.temperature < 0:
            raise ValueError(f"temperature must be > 0 (or 0: the objective's default), got {self.temperature}")
        if self.temperature and self.method not in objectives.with_temperature():
            raise ValueError(f"temperature applies to the methods with distillation ({', '.join(objectives.with_temperature())}),"
                             f" not {self.method}: drop it")
        if not 0 <= self.kd_share < 1:
            raise ValueError(f"kd_share must lie in (0, 1) (or 0: the objective's default), got {self.kd_share}")
        if self.kd_share and self.method not in kd_share_names():
            raise ValueError(f"kd_share applies to {', '.join(kd_share_names())}, not {self.method}: drop it")
        if (self.temperature_growth and self.temperature_growth < 1) or not 0 <= self.temperature_threshold < 1:
            raise ValueError(f"temperature_growth must be >= 1 and temperature_threshold lie in (0, 1) (or 0: DBT's "
                             f"1.05 and 0.5), got {self.temperature_growth} and {self.temperature_threshold}")
        if (self.temperature_growth or self.temperature_threshold) and self.method not in objectives.accepting("growth"):
            raise ValueError(f"temperature_growth and temperature_threshold are DBT's annealing "
                             f"({', '.join(objectives.accepting('growth'))}), not {self.method}'s: drop them")
        if not 0 <= self.momentum < 1 or (self.nesterov and self.momentum == 0):
            raise ValueError(f"momentum must lie in [0, 1) (and be > 0 with nesterov), got {self.momentum}")
        if self.weight_decay < 0 or self.lr_gamma <= 0:
            raise ValueError(f"weight_decay must be >= 0 and lr_gamma > 0, got {self.weight_decay} and {self.lr_gamma}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: load in the main process), got {self.workers}")
        if self.msdnet_init not in models.msdnet.INITS:
            raise ValueError(f"unknown msdnet_init {self.msdnet_init!r}; valid: {', '.join(models.msdnet.INITS)}")
        if self.msdnet_init != TrainConfig.msdnet_init and self.arch and self.arch not in models.MSDNET_CONFIGS:
            raise ValueError(f"msdnet_init sets an MSDNet's initial weights, and {self.arch} is not one: drop it")
        if self.heads_reset not in HEADS_RESET:
            raise ValueError(f"unknown heads_reset {self.heads_reset!r}; valid: {', '.join(HEADS_RESET)}")
        if self.train_heads_only and not self.init_from:
            raise ValueError("train_heads_only needs init_from: the run whose network the heads are trained on")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.optimizer == "sgd" and (self.beta1, self.beta2) != (TrainConfig.beta1, TrainConfig.beta2):
            raise ValueError("beta1 and beta2 are AdamW options: add optimizer adamw (--optimizer adamw), or drop them")
        if self.optimizer == "adamw" and (self.momentum != TrainConfig.momentum or self.nesterov):
            raise ValueError("momentum and nesterov are SGD options (AdamW has beta1, beta2): drop them, or use "
                             "optimizer sgd")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {self.beta1} and {self.beta2}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        if self.lr_schedule == "cosine" and (self.lr_milestones or self.lr_gamma != TrainConfig.lr_gamma):
            raise ValueError("lr_milestones and lr_gamma are options of the step schedule (cosine ignores them): drop "
                             "them, or use lr_schedule step (--lr-schedule step)")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must lie in [0, epochs), got {self.warmup_epochs} of {self.epochs}")
        if self.weights:
            check_weights(self.arch, self.weights)
        if self.compile not in ("", "network", "step"):
            raise ValueError(f"compile must be '', 'network' or 'step', got {self.compile!r}")
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPHS)}, got {self.cuda_graphs!r}")
        if self.cuda_graphs == "on" and self.compile == "step":
            raise ValueError("cuda_graphs on and compile step exclude each other (the compiled step is not captured): "
                             "drop one of them")
        self.lr_milestones = self._checked_milestones()
        if self.lr_schedule == "step":  # the lr bound holds for the schedule's last step too
            last = self.lr * self.lr_gamma ** sum(m < self.epochs for m in self.milestones())
            if not LR_RANGE[0] <= last <= LR_RANGE[1]:
                raise ValueError(f"lr_gamma {self.lr_gamma:g} takes the lr from {self.lr:g} to {last:g} by the last "
                                 f"milestone, outside [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}] (float32 training there does "
                                 "nothing or diverges): raise the lr, or use an lr_gamma nearer 1 or fewer "
                                 "milestones")
        return self

    def _checked_milestones(self) -> Tuple[int, ...]:
        """Whole epochs, increasing, within the run. A recipe's own milestones may lie beyond a run made shorter
        than the recipe's (they then never apply, as in the recipe's first epochs); given ones may not."""
        try:
            milestones = tuple(operator.index(m) for m in self.lr_milestones)
        except TypeError:
            raise ValueError(f"lr_milestones must be whole epochs, got {self.lr_milestones}") from None
        if any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
            example = f"e.g. {self.epochs // 2} {self.epochs * 3 // 4}, or " if self.epochs >= 4 else ""
            raise ValueError(f"lr_milestones must be increasing epochs >= 1, got {list(milestones)}: {example}none "
                             "for 50% and 75% of the run")
        recipe = RECIPES[self.recipe or default_recipe(self.dataset)]["lr_milestones"]
        beyond = [m for m in milestones if m >= self.epochs]
        if beyond and milestones != tuple(recipe) and self.lr_schedule == "step":
            raise ValueError(f"lr_milestones {beyond} lie at or beyond the run's {self.epochs} epochs (they would "
                             f"never apply): give milestones below {self.epochs}, or none for 50% and 75%")
        return milestones

    def milestones(self) -> Tuple[int, ...]:
        """The given milestones, else 50% and 75% of the run; those of a 1- or 2-epoch run that fall on epoch 0 or
        on each other are dropped (1 epoch: none; 2: one drop), as given ones may not be 0 or repeated."""
        return self.lr_milestones or tuple(sorted({m for m in (self.epochs // 2, self.epochs * 3 // 4) if m >= 1}))

    def lr_at(self, epoch: int) -> float:
        """The network's lr during `epoch` (from 0): a linear warm-up over warmup_epochs, then step or cosine."""
        if epoch < self.warmup_epochs:
            return self.lr * (epoch + 1) / (self.warmup_epochs + 1)
        if self.lr_schedule == "cosine":
            done = (epoch - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1)
            return self.lr * 0.5 * (1 + math.cos(math.pi * done))
        return self.lr * self.lr_gamma ** sum(epoch >= m for m in self.milestones())

    def make_optimizer(self, parameters):
        """The network optimizer these settings name (the bilevel step mirrors whichever it is)."""
        if self.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=self.lr, betas=(self.beta1, self.beta2),
                                     weight_decay=self.weight_decay)
        return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=self.nesterov)

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """Training steps before the first weight update (meta_warmup of the run)."""
        return int(self.meta_warmup * self.epochs * steps_per_epoch)

    def meta_lr_for(self, steps_per_epoch: int) -> float:
        """The weight learning rate: meta_lr, or (per_run) the one that gives this run's length a set reach (the
        weight steps after the warm-up)."""
        if self.meta_interval > steps_per_epoch:
            raise ValueError(f"meta_interval {self.meta_interval} is longer than an epoch ({steps_per_epoch} steps): "
                             f"use 1..{steps_per_epoch}")
        if self.meta_horizon > steps_per_epoch:
            raise ValueError(f"meta_horizon {self.meta_horizon} is longer than an epoch ({steps_per_epoch} steps): "
                             f"use 1..{steps_per_epoch}")
        if self.meta_schedule == "fixed":
            return self.meta_lr
        total = self.epochs * steps_per_epoch
        return bilevel.per_run_meta_lr(bilevel.weight_steps(total, self.meta_interval, self.warmup_steps(steps_per_epoch)),
                                       self.meta_traverse)

    def objective_options(self) -> Dict:
        """The options objectives.build gets from these settings (also: the weights a run starts from)."""
        options = {"temperature": self.temperature} if self.temperature else {}
        if self.kd_share:
            options[kd_share_names()[self.method]] = self.kd_share
        options.update({k: v for k, v in (("growth", self.temperature_growth),
                                          ("threshold", self.temperature_threshold)) if v})
        if self.loss_scale:  # DBT names it loss_scale; the learned-weight objectives pass scale to LearnedWeights
            options["scale" if self.method in objectives.LEARNED else "loss_scale"] = self.loss_scale
        if self.method in objectives.LEARNED:
            options.update(weight_map=self.weight_map, seed=self.seed, min_init_weight=self.min_init_weight)
            if self.weight_map == "bounded":
                options["bound"] = self.weight_bound
            if self.init:
                options["init"] = self.init
        return options


def kd_share_names() -> Dict[str, str]:
    """{method: its objective's name for the KD terms' share}: DBT's C (the learned-weight methods start from it),
    IMTA's gamma."""
    return {**{m: "C" for m in objectives.accepting("C")}, **{m: "gamma" for m in objectives.accepting("gamma")}}


def config_to_dict(cfg: TrainConfig) -> Dict:
    """The settings as config.json and checkpoints record them (JSON types: the milestones as a list)."""
    return {**dataclasses.asdict(cfg), "lr_milestones": list(cfg.lr_milestones)}


def _wrong_type(value, hint) -> Optional[str]:
    """What a setting of type `hint` must be, if `value` is not that (numpy numbers count as numbers), else None."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        ok = isinstance(value, (list, tuple)) and not any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                                                          for v in value)
        return None if ok else "a list of whole numbers"
    checks = {bool: (lambda v: isinstance(v, bool), "true or false"),
              int: (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "a whole number"),
              float: (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
              str: (lambda v: isinstance(v, str), "text")}
    ok, words = checks.get(hint, (lambda v: True, ""))
    return None if ok(value) else words


def config_from_dict(values: Dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; valid: {', '.join(sorted(names))}")
    values = dict(values)
    # checked before TrainConfig fills the recipe's values (validate checks every type after): a hand-edited
    # config.json gets one line, not a traceback
    for name in ("dataset", "recipe"):
        if name in values and not isinstance(values[name], str):
            raise ValueError(f"{name} must be a name (text), got {values[name]!r}")
    if values.get("lr_milestones") is not None:
        if not isinstance(values["lr_milestones"], (list, tuple)):
            raise ValueError(f"lr_milestones must be a list of epochs, got {values['lr_milestones']!r}")
        values["lr_milestones"] = tuple(values["lr_milestones"])
    return TrainConfig(**values).validate()


# --- command line ---------------------------------------------------------------------------------------
# The sections of --help, in order: every setting in exactly one (tests/test_config.py checks).
OPTION_GROUPS: Dict[str, Tuple[str, ...]] = {
    "data": ("dataset", "data_root", "download", "val_per_class", "n_per_class", "split_seed", "split_dir",
             "workers"),
    "network": ("arch", "weights", "gradient_equilibrium", "msdnet_init", "init_from", "train_heads_only",
                "heads_reset"),
    "optimisation": ("recipe", "epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "beta1", "beta2",
                     "weight_decay", "lr_schedule", "warmup_epochs", "lr_milestones", "lr_gamma"),
    "loss weights and bilevel update": (
        "method", "temperature", "kd_share", "temperature_growth", "temperature_threshold", "loss_scale", "init",
        "weight_map", "weight_bound", "min_init_weight", "freeze_weights_from", "meta_interval", "meta_warmup",
        "meta_schedule", "meta_traverse", "meta_lr", "hypergrad_norm", "meta_method", "meta_horizon", "val_loss",
        "alpha"),
    "speed": ("device", "threads", "bf16", "channels_last", "compile", "compile_mode", "cuda_graphs",
              "eval_batch_size", "check_every"),
    "run": ("seed", "out", "progress"),
}


def argparser(dataset: str = "cifar100", recipe: str = "", prog: str = "python -m hdkdlib.train",
              description: str = "") -> argparse.ArgumentParser:
    """Every setting as an option, its help from the field's metadata and its default shown for `dataset` and
    `recipe` (the values a run with them gets). Unset options parse to None: only given values override."""
    shown = TrainConfig(dataset=dataset, recipe=recipe)
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0],
                                epilog=f"Defaults shown for --dataset {dataset} (recipe "
                                       f"{recipe or default_recipe(dataset)}); give --dataset/--recipe with --help "
                                       "to see another recipe's values.")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for title, names in OPTION_GROUPS.items():
        _add_options(p.add_argument_group(title), [fields[n] for n in names], shown)
    return p


def _add_options(p, fields, shown: TrainConfig) -> None:
    for f in fields:
        flag, value = "--" + f.name.replace("_", "-"), getattr(shown, f.name)
        tag = " [recipe]" if any(f.name in r for r in RECIPES.values()) else ""
        help_text = f"{f.metadata['help']} (default{tag}: {value!r})".replace("%%", "%").replace("%", "%%")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(value, tuple):
            p.add_argument(flag, type=int, nargs="*", default=None, help=help_text)
        else:
            p.add_argument(flag, type=type(value), default=None, help=help_text)


def argparser_for(argv: List[str], **kwargs) -> argparse.ArgumentParser:
    """argparser() showing the defaults of the --dataset and --recipe that argv gives (what that run gets)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default="cifar100")
    pre.add_argument("--recipe", default="")
    known, _ = pre.parse_known_args(argv)
    return argparser(known.dataset if known.dataset in DATASETS else "cifar100",
                     known.recipe if known.recipe in RECIPES else "", **kwargs)


# The weight update's settings: they change nothing in a run whose loss weights are fixed (a fixed-weight method,
# or learned weights frozen from another run), so a changed default of theirs must not stop such a run resuming.
WEIGHT_UPDATE_SETTINGS = ("meta_interval", "meta_warmup", "meta_schedule", "meta_traverse", "meta_lr", "hypergrad_norm",
                          "meta_method", "meta_horizon", "val_loss", "alpha")
# How learned weights start and are mapped: nothing to a fixed-weight method.
LEARNED_WEIGHT_SETTINGS = ("init", "weight_map", "weight_bound", "min_init_weight")


def unused_settings(values: Dict) -> Dict[str, str]:
    """The settings that cannot change what a run with these (completed) settings computes, each with what it
    would need to count."""
    learned = values.get("method") in objectives.LEARNED
    unused = {} if values.get("weight_map") == "bounded" else {
        "weight_bound": "it bounds learned weights under --weight-map bounded"}
    if not values.get("train_heads_only"):  # only a second stage resets heads
        unused["heads_reset"] = "it applies with --train-heads-only"
    if values.get("arch") not in models.MSDNET_CONFIGS:
        unused["msdnet_init"] = "it applies to the msdnet_* networks"
    if not learned:  # the learned weights' own settings too (objective_options passes them to learned methods only)
        why = f"{values.get('method')}'s loss weights are not learned"
        return {**unused, **{k: why for k in WEIGHT_UPDATE_SETTINGS + LEARNED_WEIGHT_SETTINGS}}
    if values.get("freeze_weights_from"):
        return {**unused, **{k: "the loss weights are kept from --freeze-weights-from" for k in WEIGHT_UPDATE_SETTINGS}}
    if values.get("meta_schedule") == "per_run":
        return {**unused, "meta_lr": "--meta-schedule per_run sets the weights' step from --meta-traverse"}
    return {**unused, "meta_traverse": "it applies with --meta-schedule per_run"}


def unused_flags_line(unused: Dict[str, str]) -> str:
    """One line naming the given flags that change nothing ({setting: why}, as unused_settings says), grouped by
    why, and the fix."""
    by_reason: Dict[str, List[str]] = {}
    for name, why in unused.items():
        by_reason.setdefault(why, []).append("--" + name.replace("_", "-"))
    parts = []
    for why, flags in by_reason.items():
        named = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"
        parts.append(f"{named} change{'s' if len(flags) == 1 else ''} nothing in this run ({why})")
    return "; ".join(parts) + (": drop it" if len(unused) == 1 else ": drop them")


def to_argv(cfg: TrainConfig) -> List[str]:
    """The command-line flags that rebuild cfg: every setting that differs from a bare TrainConfig's, but those
    that change nothing in this run (unused_settings; a record's former default, say), which the CLI refuses."""
    bare = TrainConfig(dataset=cfg.dataset, recipe=cfg.recipe)
    unused = unused_settings(config_to_dict(cfg))
    args = []
    for f in dataclasses.fields(TrainConfig):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value == getattr(bare, f.name) and f.name not in ("dataset", "recipe"):
            continue
        if f.name in ("dataset", "recipe") and value == f.default:
            continue
        if f.name in unused:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args
