"""The multi-exit interface every model in hdkdlib follows.

A multi-exit network is a chain of *stages* and one *head* per stage:

    state_0 = x
    state_k = stages[k](state_{k-1})          k = 1..K
    logits_k = heads[k](state_k[head_index])

`model(x)` returns the K logits; `model.exits(x)` yields them one at a time and runs
stage k+1 only when the caller asks for the next exit, so stopping early really
skips the rest of the network. The state is a list of tensors (MSDNet: one tensor
per scale; backbone exits: the exit feature plus whatever later stages still need).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List

import torch
from torch import nn


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode (BatchNorm running statistics) and no autograd inside; the previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


class _ScaleGrad(torch.autograd.Function):
    """Identity on the forward pass, gradient multiplied by `scale` on the backward pass."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, scale)


# IMTA's second stage starts again with: "classifiers" (each early exit's last Linear) or "all" (every head; runs
# begun before that rule)
HEADS_RESET = ("classifiers", "all")


def _equilibrium_nets(model: nn.Module) -> List["MultiExitNet"]:
    """The multi-exit networks in `model` (a wrapper's included) that scale their gradients by IMTA's rule."""
    return [m for m in model.modules() if isinstance(m, MultiExitNet) and m.gradient_equilibrium]


def with_gradient_equilibrium(model: nn.Module) -> bool:
    """Whether any multi-exit network in `model` (a wrapper's included) scales its gradients by IMTA's rule."""
    return bool(_equilibrium_nets(model))


def draws_random_numbers(model: nn.Module) -> bool:
    """Whether a training-mode forward pass of `model` draws random numbers (dropout, stochastic depth, such as
    swin_t's): passes that are compared with each other must then see the same draws."""
    from torchvision.ops import StochasticDepth
    return any(m.p > 0 for m in model.modules() if isinstance(m, (nn.modules.dropout._DropoutNd, StochasticDepth)))


@contextmanager
def gradient_equilibrium_off(model: nn.Module):
    """Passes made inside differentiate the network's loss itself, not IMTA's rescaled gradient (which is no loss's
    gradient): a held-out loss's gradient through the virtual step needs the true one."""
    nets = _equilibrium_nets(model)
    for m in nets:
        m.gradient_equilibrium = False
    try:
        yield model
    finally:
        for m in nets:
            m.gradient_equilibrium = True


class MultiExitNet(nn.Module):
    """Stages + heads. Subclasses only build the two ModuleLists.

    gradient_equilibrium: IMTA's rule (Li et al. 2019). The feature entering head k
    (0-based, K exits) has its gradient scaled by 1/(K-k) where the head and the rest of
    the network meet, and the path continuing to later stages by (K-k-1), so every exit
    contributes a comparable share of the gradient reaching the shared layers.
    """

    head_index: int = -1
    input_shape: tuple = ()  # one sample's shape, set by each network (used for cost accounting)

    def __init__(self, stages: nn.ModuleList, heads: nn.ModuleList, *, gradient_equilibrium: bool = False):
        super().__init__()
        if len(stages) != len(heads):
            raise ValueError(f"{len(stages)} stages but {len(heads)} heads: a multi-exit net needs one head per stage")
        self.stages = stages
        self.heads = heads
        self.gradient_equilibrium = gradient_equilibrium

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def check_input(self, x: torch.Tensor) -> None:
        """Overridden by networks that accept only some input sizes."""

    def freeze_stages_and_reset_heads(self, reset: str = "classifiers") -> None:
        """IMTA's second stage (their IMTA_MSDNet): the stage-1 network stops learning, stages and heads alike (in
        eval mode under train(), so its BatchNorm statistics stay); each student exit gets a new classifier (its
        head's last Linear, re-initialised) on the frozen head's features. The last exit keeps stage 1's: its
        logits are the students' teacher, as IMTA's frozen network's last exit is.
        reset "all" (runs begun before this rule): the stages frozen, every head re-initialised and trained."""
        if reset not in HEADS_RESET:
            raise ValueError(f"unknown heads_reset {reset!r}; valid: {', '.join(HEADS_RESET)}")
        self.stages_frozen = reset
        for p in (self if reset == "classifiers" else self.stages).parameters():
            p.requires_grad_(False)
        if reset == "all":
            for m in self.heads.modules():
                if hasattr(m, "reset_parameters") and m is not self.heads:
                    m.reset_parameters()
            if hasattr(self, "reset_parameters"):
                self.reset_parameters(self.heads)
            return
        for head in list(self.heads)[:-1]:
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"{type(self).__name__}'s heads end in no Linear layer: no classifier to train anew")
            linears[-1].reset_parameters()
            if hasattr(self, "reset_parameters"):  # a network's own initialisation rule (MSDNet: bias 0)
                self.reset_parameters(linears[-1])
            linears[-1].requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        frozen = getattr(self, "stages_frozen", False)
        if frozen:
            self.stages.eval()
        if frozen == "classifiers":  # the heads' features too: only their last Linear learns
            self.heads.eval()
        return self

    def run_exit(self, k: int, state):
        """Stage k on `state` (the input for k = 0) and head k: returns (new state, logits). Early-exit
        inference calls it on the samples still running, indexing the state's tensors by sample."""
        if k == 0 and isinstance(state, torch.Tensor):
            self.check_input(state)  # the same check as model(x): a wrong size fails here, by name
        return self._exit(k, state)

    def _exit(self, k: int, state):
        state = self.stages[k](state)
        if not self.gradient_equilibrium:
            return state, self.heads[k](state[self.head_index])
        K = self.num_exits
        state = list(state)
        feature = state[self.head_index % len(state)]
        scaled = scale_grad(feature, 1.0 / (K - k))
        logits = self.heads[k](scaled)
        onward = scale_grad(scaled, float(K - k - 1))
        # a stage may pass the exit's feature on more than once (a torchvision node that later stages read too):
        # every copy of it goes on scaled, or the later exits' gradients would reach it unscaled through the other
        return [onward if s is feature else s for s in state], logits

    def exits(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the logits of exit 1, 2, ... computing each stage only when asked for."""
        self.check_input(x)
        state = x
        for k in range(self.num_exits):
            state, logits = self._exit(k, state)
            yield logits

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.exits(x))
