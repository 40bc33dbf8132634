"""Per-exit cost: cumulative FLOPs and parameters of everything needed to produce each exit.

Two conventions:
  "msdnet"  the rules of MSDNet's reference op counter, so our numbers are comparable with the
            literature: conv multiply-adds, one op per ReLU output element, pooling = output
            elements x kernel area, Linear = weights + bias; BatchNorm costs nothing.
  "macs"    multiply-accumulates of convolutions and matrix products, from torch.utils.flop_counter
            (which reports 2 FLOPs per MAC, halved here).
Both run the model exit by exit, so exit k includes all earlier heads, as the reference does. A model's
own `cost_convention` is its default: MSDNets keep the reference's, to compare with the literature; exits on
torchvision backbones count MACs, since the reference's rules price a Linear at its weight count whatever
its input (wrong per token or per position) and give attention and normalisation nothing.

`latency` measures the same thing in time on a device: the cumulative seconds per image up to each exit,
timed stage by stage. FLOPs ignore memory-bound work (BatchNorm, ReLU, concatenation), which dominates the
high-resolution early stages, so budgets in FLOPs overstate what stopping early saves; budgets can be
stated in measured time instead (evaluation.budgeted takes any per-exit cost).
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models.base import evaluating

UNITS = {"msdnet": "FLOPs", "macs": "MACs"}  # each convention and what its numbers count, as tables and axes say
CONVENTIONS = tuple(UNITS)


def unit(convention: str | None) -> str:
    """The unit of a cost counted under `convention` (results.json's cost_convention; None: the reference's)."""
    if convention is not None and convention not in UNITS:
        raise ValueError(f"unknown cost convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    return UNITS[convention or "msdnet"]


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """scaled_dot_product_attention on a CPU: q @ k^T and attn @ v, [B, H, L, d] x [B, H, S, d]."""
    b, h, l, d = query
    return 2 * b * h * l * key[-2] * (d + value[-1])


def _fast_multi_head_attention_flops(query, key, value, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    """nn.MultiheadAttention's inference fast path: the q, k, v and output projections and both attention products,
    for [B, L, E] queries and [B, S, E] keys."""
    b, l, e = query
    s = key[-2]
    return 2 * b * (2 * l * e * e + 2 * s * e * e + 2 * l * s * e)


# Attention kernels torch's counter does not price on a CPU (it knows the CUDA ones): without these, a ViT's
# attention would cost nothing on a CPU, and nn.MultiheadAttention's inference fast path not even its projections.
EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
               torch.ops.aten._native_multi_head_attention: _fast_multi_head_attention_flops}


def flop_counter() -> FlopCounterMode:
    """torch's flop counter (2 FLOPs per multiply-accumulate) with the CPU attention kernels priced as well."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS)


def _msdnet_ops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> float:
    """Ops for one sample (batch of 1) under the reference counter's rules."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * module.out_channels * kh * kw * out.shape[2] * out.shape[3] / module.groups
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return out.numel() / out.shape[0]
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        kh, kw = (module.kernel_size,) * 2 if isinstance(module.kernel_size, int) else module.kernel_size
        return out.shape[1] * out.shape[2] * out.shape[3] * kh * kw
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return inp.numel() / inp.shape[0]  # every input element is added once
    if isinstance(module, nn.Linear):
        return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    return 0.0


def per_exit(model: nn.Module, input_shape: Sequence[int], convention: str | None = None) -> List[Dict]:
    """[{'exit': k, 'flops': cumulative FLOPs, 'params': cumulative parameters}] for k = 1..K.

    input_shape is one sample's shape, e.g. (3, 32, 32). Parameters: those of stages 1..k and heads 1..k, each
    once (so exit k includes earlier heads but no later stage), counted by ownership: a module's hooks miss
    parameters its forward reads without calling a module (attention's in_proj, ViT's class token and position
    embedding, Swin's relative-position tables). A network without stages and heads: those of the modules run.
    """
    convention = convention or getattr(model, "cost_convention", "msdnet")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    owned = _params_by_exit(model)  # by ownership where the network has stages and heads; else by the hooks
    ops = [0.0]
    seen_params: set = set()
    params = [0]

    def hook(module, args, out):
        if convention == "msdnet":
            ops[0] += _msdnet_ops(module, args[0], out)
        if owned is None:
            for p in module.parameters(recurse=False):
                if id(p) not in seen_params:
                    seen_params.add(id(p))
                    params[0] += p.numel()

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves] if convention == "msdnet" or owned is None else []
    rows = []
    try:
        x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
        with evaluating(model), flop_counter() as counter:
            for k, _ in enumerate(model.exits(x), start=1):
                flops = ops[0] if convention == "msdnet" else counter.get_total_flops() / 2
                rows.append({"exit": k, "flops": float(flops), "params": int(owned[k - 1] if owned else params[0])})
    finally:
        for h in handles:
            h.remove()
    return rows


def _params_by_exit(model: nn.Module) -> List[int] | None:
    """Cumulative parameter counts of stages[:k] and heads[:k] (a parameter shared by two counts once)."""
    if not (isinstance(getattr(model, "stages", None), nn.ModuleList) and isinstance(getattr(model, "heads", None),
                                                                                     nn.ModuleList)):
        return None
    seen, total, counts = set(), 0, []
    for stage, head in zip(model.stages, model.heads):
        for p in [*stage.parameters(), *head.parameters()]:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        counts.append(total)
    return counts


def exit_flops(model: nn.Module, input_shape: Sequence[int], convention: str | None = None) -> List[float]:
    """The K cumulative per-exit FLOPs alone (what the budgeted evaluation needs)."""
    return [row["flops"] for row in per_exit(model, input_shape, convention)]


def default_num_classes(name: str) -> int:
    """1000 for the ImageNet networks (MSDNet ImageNet, the torchvision backbones), 100 (CIFAR-100) for the others."""
    from . import models
    return 1000 if ("imagenet" in name or models.torchvision_arch(name)) else 100


def of_named(name: str, num_classes: int | None = None, convention: str | None = None) -> List[Dict]:
    """per_exit for a built-in network at its native input size, with MFLOPs added to each row."""
    from . import models  # local: models does not need cost, and cost stays importable on its own
    model = models.build(name, num_classes or default_num_classes(name))
    return [{**row, "mflops": row["flops"] / 1e6} for row in per_exit(model, model.input_shape, convention)]


SI_PREFIXES = ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))


def si_scale(value: float) -> tuple:
    """(divisor, prefix) for showing `value` (or a range whose largest value it is) with an SI prefix."""
    magnitude = abs(float(value))
    return next(((d, p) for d, p in SI_PREFIXES if magnitude >= d), (1.0, ""))


def format_cost(value: float, unit: str = "FLOPs", digits: int = 3) -> str:
    """497 -> '497 FLOPs', 15.14e6 -> '15.1 MFLOPs', 2.5e9 -> '2.5 GFLOPs': an SI prefix from the magnitude."""
    divisor, prefix = si_scale(value)
    return f"{value / divisor:.{digits}g} {prefix}{unit}"


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(model: nn.Module, input_shape: Sequence[int], *, batch_size: int = 256, repeats: int = 5,
            warmup: int = 2, device=None, memory_format=torch.contiguous_format) -> List[float]:
    """Cumulative seconds per image up to and including each exit, on `device` (default: the model's), at
    `batch_size`: every stage and head timed on its own (eval mode, no autograd), the median of `repeats`
    timed passes after `warmup` untimed ones, on an input in `memory_format` (channels_last for a network
    converted to it, as its real inputs are)."""
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, batch_size >= 1; got {repeats}, {warmup}, {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x = torch.randn(batch_size, *input_shape, device=device)
    x = x.contiguous(memory_format=memory_format) if x.dim() == 4 else x
    per_stage = []
    with evaluating(model):
        model.check_input(x)
        for i in range(warmup + repeats):
            state, times = x, []
            for k in range(model.num_exits):
                _sync(device)
                start = time.perf_counter()
                state, _ = model.run_exit(k, state)
                _sync(device)
                times.append(time.perf_counter() - start)
            if i >= warmup:
                per_stage.append(times)
    medians = [statistics.median(t[k] for t in per_stage) for k in range(model.num_exits)]
    total, out = 0.0, []
    for m in medians:
        total += m
        out.append(total / batch_size)
    return out
