"""A fast inference copy of a multi-exit network: BatchNorm folded into the layer before it, optionally in
channels-last memory format. Early exit spends most of its time in the high-resolution early stages, where
memory-bound work (BatchNorm, ReLU, concatenation) outweighs the convolutions; folding removes one of those
passes over every feature map. Predictions agree with the original to float rounding (tests count them).

    fast = inference.fast_copy(model)            # eval mode, BN folded; the original is left as it was
    evaluation.early_exit_predict(fast, x, thresholds)
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a Conv2d (or a Linear) inside an nn.Sequential into that
    layer, in place, and replace it by an Identity. The model must be in eval mode (running statistics are
    what is folded). Returns how many were folded."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: its running statistics are folded")
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            layer, norm = seq._modules[a], seq._modules[b]
            if isinstance(layer, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(layer, norm)
            elif isinstance(layer, nn.Linear) and isinstance(norm, nn.BatchNorm1d):
                seq._modules[a] = fuse_linear_bn_eval(layer, norm)
            else:
                continue
            seq._modules[b] = nn.Identity()
            folded += 1
    return folded


def fast_copy(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = False) -> nn.Module:
    """An eval-mode copy for inference only (no training: folded BatchNorm has no statistics to update)."""
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    if fold_bn:
        fold_batchnorm(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast
