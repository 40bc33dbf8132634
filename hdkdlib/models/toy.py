"""A small multi-exit MLP for 2-D toy problems: each stage is Linear(+BatchNorm)+ReLU, each head a Linear."""
from __future__ import annotations

from torch import nn

from .base import MultiExitNet


class _Stage(nn.Module):
    def __init__(self, d_in: int, d_out: int, batch_norm: bool = False):
        super().__init__()
        norm = [nn.BatchNorm1d(d_out)] if batch_norm else []
        self.layer = nn.Sequential(nn.Linear(d_in, d_out), *norm, nn.ReLU())

    def forward(self, state):
        x = state.flatten(1) if not isinstance(state, (list, tuple)) else state[0]
        return [self.layer(x)]


class ToyMLP(MultiExitNet):
    def __init__(self, num_classes: int = 2, *, in_features: int = 2, width: int = 32,
                 num_exits: int = 4, layers_per_stage: int = 1, batch_norm: bool = False,
                 gradient_equilibrium: bool = False):
        if num_exits < 1 or layers_per_stage < 1:
            raise ValueError("toy_mlp needs num_exits >= 1 and layers_per_stage >= 1")
        stages = []
        d = in_features
        for _ in range(num_exits):
            blocks = [_Stage(d, width, batch_norm)] + [_Stage(width, width, batch_norm)
                                                       for _ in range(layers_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            d = width
        heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(num_exits))
        super().__init__(nn.ModuleList(stages), heads, gradient_equilibrium=gradient_equilibrium)
        self.in_features = in_features
        self.input_shape = (in_features,)

    def check_input(self, x):
        if x[0].numel() != self.in_features:
            raise ValueError(f"toy_mlp takes inputs of {self.in_features} features per sample (any shape, "
                             f"flattened), got {list(x.shape)}: build it with in_features={x[0].numel()}")
