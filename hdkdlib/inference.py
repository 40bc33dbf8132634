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
import torch.fx
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .evaluation import check_thresholds


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a Conv2d (or a Linear) inside an nn.Sequential into that
    layer, in place, and replace it by an Identity; in the torch.fx graphs of a torchvision backbone's segments,
    torch.fx's own conv-bn fusion does it. The model must be in eval mode (running statistics are what is
    folded). Returns how many were folded."""
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
    norms = lambda: sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    before = norms()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.fx.GraphModule):
                setattr(parent, name, fx_fuse(child, inplace=True, no_trace=True))
    return folded + before - norms()


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


class StageGraphs:
    """Early exit for one input at a time with each stage, its head and its exit's confidence as one CUDA graph
    (captured on first use): at batch 1 a GPU is bound by launching kernels, and a captured stage is one launch.
    Stage k's graph reads stage k-1's static output, so a sample that goes on costs no copy; the one host sync per
    exit reads the confidence. capture=False runs the same stages eagerly (the CPU, and the tests).

        graphs = StageGraphs(fast_copy(model), capture=torch.cuda.is_available())
        prediction, exit_index = graphs.predict(x[:1], thresholds)
    """

    def __init__(self, model: nn.Module, capture: bool = False):
        if model.training:
            raise ValueError("StageGraphs needs a model in eval mode (inference only): call model.eval()")
        self.model, self.capture = model, capture
        self.static_input = None
        self.stages = []  # per stage: (graph or None, static outputs (state, confidence, prediction))

    def _stage(self, k, state):
        state, logits = self.model.run_exit(k, state)
        conf, pred = torch.softmax(logits.float(), 1).max(1)
        return state, conf, pred

    def _build(self, x):
        """Every stage captured, or nothing kept: a capture that fails (out of memory, an op a graph cannot hold)
        leaves no half-built object whose last built stage would then act as the last exit."""
        static_input, stages = x.clone(), []
        state = static_input
        pool = torch.cuda.graph_pool_handle() if self.capture else None
        for k in range(self.model.num_exits):
            if not self.capture:
                stages.append((None, None))
                continue
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # a warm-up run of the stage before its capture
                self._stage(k, state)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._stage(k, state)
            stages.append((graph, out))
            state = out[0]
        self.static_input, self.stages = static_input, stages

    @torch.no_grad()
    def predict(self, x: torch.Tensor, thresholds) -> tuple:
        """(predicted class, exit index) of the single input x [1, ...]: stage by stage until a confidence reaches
        its exit's threshold (the last exit takes what is left)."""
        if x.shape[0] != 1:
            raise ValueError(f"StageGraphs runs one input at a time; got a batch of {x.shape[0]}: use "
                             "evaluation.early_exit_predict for batches")
        check_thresholds(thresholds, self.model.num_exits)
        if self.model.training:  # train mode would use batch statistics and move BatchNorm's running ones
            raise ValueError("StageGraphs needs a model in eval mode (inference only): call model.eval()")
        if self.static_input is None:
            self.model.check_input(x)
            self._build(x)
        elif x.shape != self.static_input.shape or x.dtype != self.static_input.dtype:
            raise ValueError(f"StageGraphs was built for inputs {tuple(self.static_input.shape)} "
                             f"({self.static_input.dtype}); got {tuple(x.shape)} ({x.dtype}): build another")
        self.static_input.copy_(x)
        state = self.static_input
        for k, (graph, out) in enumerate(self.stages):
            if graph is None:
                out = self._stage(k, state)
            else:
                graph.replay()
            state, conf, pred = out
            if k == len(self.stages) - 1 or conf.item() >= thresholds[k]:  # the one host sync of this exit
                return int(pred.item()), k
