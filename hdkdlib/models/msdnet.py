"""MSDNet (Huang et al., ICLR 2018), rebuilt layer for layer after the reference configuration.

The network keeps feature maps at S scales (S = len(gr_factor)). Each layer adds `growth *
gr_factor[s]` channels at scale s, computed from the same scale (a "normal" 3x3 conv) and,
for s > 0, from the finer scale s-1 (a strided "down" 3x3 conv); the new maps are
concatenated to the old ones (dense connectivity). With pruning 'max', the finest scales are
dropped as the network deepens, and a 1x1 "transition" halves the channels each time.
Every block ends in a classifier on the coarsest scale. Shapes, channel counts and the
per-exit cost match the reference code (see tests/test_models.py and docs/method.md, "Networks").
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn

from .base import MultiExitNet, evaluating


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1,
                 bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def bottleneck_conv(c_in: int, c_out: int, stride: int, bottleneck: bool, bn_width: int,
                    bias: bool = False) -> nn.Sequential:
    """[1x1 bottleneck to min(c_in, bn_width*c_out)] then a 3x3 conv (stride 1 'normal', 2 'down')."""
    layers: list = []
    c_inner = c_in
    if bottleneck:
        c_inner = min(c_in, bn_width * c_out)
        layers += list(conv_bn_relu(c_in, c_inner, kernel=1, padding=0, bias=bias))
    layers += list(conv_bn_relu(c_inner, c_out, kernel=3, stride=stride, padding=1, bias=bias))
    return nn.Sequential(*layers)


class ScaleUnit(nn.Module):
    """New maps at one scale: from the same scale, and (unless it is the finest one kept) from the finer one."""

    def __init__(self, c_same: int, c_out: int, bottleneck: bool, bn_same: int, c_finer: int = 0, bn_finer: int = 1,
                 bias: bool = False):
        super().__init__()
        self.from_finer = bottleneck_conv(c_finer, c_out // 2, 2, bottleneck, bn_finer, bias) if c_finer else None
        self.from_same = bottleneck_conv(c_same, c_out // 2 if c_finer else c_out, 1, bottleneck, bn_same, bias)

    def forward(self, finer, same):
        if self.from_finer is None:
            return torch.cat([same, self.from_same(same)], dim=1)
        return torch.cat([same, self.from_finer(finer), self.from_same(same)], dim=1)


class FirstLayer(nn.Module):
    """The stem: the input image to S scales (CIFAR: 3x3 conv; ImageNet: 7x7/2 conv + 3x3/2 max-pool)."""

    def __init__(self, c_out: int, gr_factor: Sequence[int], imagenet: bool, bias: bool = False):
        super().__init__()
        c0 = c_out * gr_factor[0]
        if imagenet:
            stem = nn.Sequential(nn.Conv2d(3, c0, 7, 2, 3), nn.BatchNorm2d(c0), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(3, 2, 1))
        else:
            stem = conv_bn_relu(3, c0, bias=bias)
        layers = [stem]
        for s in range(1, len(gr_factor)):
            layers.append(conv_bn_relu(c_out * gr_factor[s - 1], c_out * gr_factor[s], stride=2, bias=bias))
        self.layers = nn.ModuleList(layers)

    def forward(self, x) -> List[torch.Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class MSDLayer(nn.Module):
    """One multi-scale dense layer taking `in_scales` scales to `out_scales` (the finest ones are pruned)."""

    def __init__(self, c_in: int, growth: int, n_scales: int, in_scales: int, out_scales: int,
                 gr_factor: Sequence[int], bn_factor: Sequence[int], bottleneck: bool, bias: bool = False):
        super().__init__()
        self.discard = in_scales - out_scales  # 0 or 1 in the reference configurations
        offset = n_scales - out_scales
        units = []
        for s in range(offset, n_scales):
            has_finer = s > offset or self.discard > 0
            units.append(ScaleUnit(
                c_same=c_in * gr_factor[s], c_out=growth * gr_factor[s], bottleneck=bottleneck,
                bn_same=bn_factor[s],
                c_finer=c_in * gr_factor[s - 1] if has_finer else 0,
                bn_finer=bn_factor[s - 1] if has_finer else 1, bias=bias))
        self.units = nn.ModuleList(units)

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        # xs holds the in_scales current maps, finest first; output i sits at xs[i + discard].
        out = []
        for i, unit in enumerate(self.units):
            j = i + self.discard
            out.append(unit(xs[j - 1] if j > 0 else None, xs[j]))
        return out


class Transition(nn.Module):
    """1x1 conv-BN-ReLU at every kept scale, compressing the channels (pruning 'max')."""

    def __init__(self, c_in: int, c_out: int, out_scales: int, offset: int, gr_factor: Sequence[int],
                 bias: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(conv_bn_relu(c_in * gr_factor[offset + i], c_out * gr_factor[offset + i],
                                                kernel=1, padding=0, bias=bias) for i in range(out_scales))

    def forward(self, xs):
        return [conv(x) for conv, x in zip(self.convs, xs)]


class Classifier(nn.Module):
    """Head on the coarsest scale: two strided conv-BN-ReLU, 2x2 average pooling, Linear."""

    def __init__(self, c_in: int, c_mid: int, num_classes: int, bias: bool = False):
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(c_in, c_mid, stride=2, bias=bias),
                                      conv_bn_relu(c_mid, c_mid, stride=2, bias=bias),
                                      nn.AvgPool2d(2))
        self.linear = nn.Linear(c_mid, num_classes)

    def forward(self, x):
        return self.linear(self.features(x).flatten(1))


def _head_output_size(size: int, imagenet: bool, n_scales: int) -> int:
    """Side of a head's pooled output for `size` px inputs: the stem (ImageNet: /4), a /2 per coarser scale,
    the head's two stride-2 convolutions (ceil), then 2x2 average pooling (floor). The Linear needs 1."""
    side = size
    for _ in range(2 if imagenet else 0):
        side = -(-side // 2)
    for _ in range(n_scales - 1 + 2):
        side = -(-side // 2)
    return side // 2


def block_steps(n_blocks: int, step_mode: str, step: int, base: int) -> List[int]:
    """Layers per block: `base` first, then `step` each ('even') or step*i + 1 ('lin_grow')."""
    if step_mode not in ("even", "lin_grow"):
        raise ValueError(f"step_mode must be 'even' or 'lin_grow', got {step_mode!r}")
    return [base] + [step if step_mode == "even" else step * i + 1 for i in range(1, n_blocks)]


def scales_at(layer: int, n_layers: int, n_scales: int, prune: str):
    """(in_scales, out_scales) of the `layer`-th layer (1-based), as in the reference code."""
    if prune == "max":
        interval = math.ceil(n_layers / n_scales)
        return (n_scales - math.floor(max(0, layer - 2) / interval),
                n_scales - math.floor((layer - 1) / interval))
    if prune == "min":
        return min(n_scales, n_layers - layer + 2), min(n_scales, n_layers - layer + 1)
    raise ValueError(f"prune must be 'max' or 'min', got {prune!r}")


class MSDNet(MultiExitNet):
    def __init__(self, num_classes: int, *, n_blocks: int, step_mode: str, step: int, base: int,
                 channels: int, growth: int, gr_factor: Sequence[int], bn_factor: Sequence[int],
                 imagenet: bool = False, bottleneck: bool = True, prune: str = "max", reduction: float = 0.5,
                 input_size: int | None = None, gradient_equilibrium: bool = False, conv_bias: bool = False,
                 init: str = "rule"):
        if init not in INITS:
            raise ValueError(f"unknown MSDNet init {init!r}; valid: {', '.join(INITS)}")
        if len(gr_factor) != len(bn_factor):
            raise ValueError(f"gr_factor {list(gr_factor)} and bn_factor {list(bn_factor)} must have one entry per scale")
        small = {k: v for k, v in dict(n_blocks=n_blocks, step=step, base=base, channels=channels, growth=growth,
                                       scales=len(gr_factor)).items() if v < 1}
        if small:  # a block of no layers would add an exit on the same features; growth 0 divides by zero
            raise ValueError(f"MSDNet needs n_blocks, step, base, channels, growth and scales >= 1, got {small}")
        odd = [s for s in range(1, len(gr_factor)) if growth * gr_factor[s] % 2]
        if odd:  # a coarser scale's new channels come half from the finer scale, half from its own: n // 2 each
            raise ValueError(f"growth x gr_factor[s] must be even at every scale s >= 1 (half its new channels come "
                             f"from the finer scale), got growth {growth} and gr_factor {list(gr_factor)} at scale "
                             f"{odd[0]}: choose an even growth or even factors")
        n_scales = len(gr_factor)
        steps = block_steps(n_blocks, step_mode, step, base)
        n_layers = sum(steps)
        stages, heads = [], []
        c, layer = channels, 0
        for b in range(n_blocks):
            mods: list = [FirstLayer(channels, gr_factor, imagenet, conv_bias)] if b == 0 else []
            for _ in range(steps[b]):
                layer += 1
                s_in, s_out = scales_at(layer, n_layers, n_scales, prune)
                mods.append(MSDLayer(c, growth, n_scales, s_in, s_out, gr_factor, bn_factor, bottleneck, conv_bias))
                c += growth
                compress = (prune == "max" and s_in > s_out) or (
                    prune == "min" and layer in (math.floor(n_layers / 3), math.floor(2 * n_layers / 3)))
                if reduction > 0 and compress:
                    c_new = math.floor(reduction * c)
                    mods.append(Transition(c, c_new, s_out, n_scales - s_out, gr_factor, conv_bias))
                    c = c_new
            stages.append(nn.Sequential(*mods))
            c_last = c * gr_factor[-1]
            heads.append(Classifier(c_last, c_last if imagenet else 128, num_classes, conv_bias))
        super().__init__(nn.ModuleList(stages), nn.ModuleList(heads), gradient_equilibrium=gradient_equilibrium)
        self.steps = steps
        self.input_size = input_size or (224 if imagenet else 32)
        valid = [s for s in range(8, 1025) if _head_output_size(s, imagenet, n_scales) == 1]
        if self.input_size not in valid:
            raise ValueError(f"this MSDNet takes images of {valid[0]}-{valid[-1]} px (input_size), got "
                             f"{self.input_size}: its heads pool the coarsest scale to 1x1 only in that range. Resize "
                             "the images, or use a network made for the size (msdnet_imagenet_* for 224 px)")
        self.input_shape = (3, self.input_size, self.input_size)
        self.init = init
        self.reset_parameters()

    def reset_parameters(self, root: nn.Module | None = None) -> None:
        """docs/method.md, "Networks": init "rule": conv N(0, sqrt(2 / (k*k*out))), BN 1/0, Linear bias 0 (weights:
        PyTorch default), for every module under `root` (default: the whole network); "torch": PyTorch's defaults,
        as the modules were built (or reset) with them."""
        if self.init == "torch":
            return
        for m in (root or self).modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if m.bias is not None:  # Phuong & Lampert's convolutions carry biases, initialised to 0
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def layout(self) -> List[dict]:
        """One row per layer, read off a forward pass: block, kind, and per kept scale its channels
        and resolution (scale 0 = finest). The exit rows give the head's input scale."""
        rows, block = [], [0]
        kinds = {FirstLayer: "stem", MSDLayer: "dense layer", Transition: "transition"}
        n_scales = len(self.stages[0][0].layers)

        def record(module, inputs, output):
            rows.append(dict(block=block[0], kind=kinds[type(module)],
                             scales=list(range(n_scales - len(output), n_scales)),
                             channels=[o.shape[1] for o in output], size=[o.shape[-1] for o in output]))

        handles = [m.register_forward_hook(record) for m in self.modules() if type(m) in kinds]
        try:
            with evaluating(self):
                for b, _ in enumerate(self.exits(torch.zeros(1, *self.input_shape)), start=1):
                    for r in rows:
                        r["block"] = r["block"] or b
                    rows.append(dict(block=b, kind=f"exit {b}", scales=[n_scales - 1],
                                     channels=[rows[-1]["channels"][-1]], size=[rows[-1]["size"][-1]]))
        finally:
            for h in handles:
                h.remove()
        return rows

    def check_input(self, x):
        s = self.input_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2] != s or x.shape[-1] != s:
            raise ValueError(f"this MSDNet takes images shaped [N, 3, {s}, {s}], got {list(x.shape)}: "
                             f"resize or crop the input to {s}x{s} (or build it with input_size=...)")


# "rule": the initialisation MSDNet's PyTorch code writes down (conv N(0, sqrt(2/(k*k*out))), BN 1/0, Linear bias 0);
# "torch": PyTorch's defaults, what that code runs, as its loop applies the rule to each block's and head's direct
# children, none of which is a convolution, BatchNorm or Linear.
INITS = ("rule", "torch")

CONFIGS = {
    "msdnet_cifar_anytime": dict(n_blocks=7, step_mode="even", step=2, base=4, channels=16, growth=6,
                                 gr_factor=(1, 2, 4), bn_factor=(1, 2, 4)),
    "msdnet_cifar_budget": dict(n_blocks=5, step_mode="lin_grow", step=1, base=1, channels=16, growth=6,
                                gr_factor=(1, 2, 4), bn_factor=(1, 2, 4)),
    **{f"msdnet_imagenet_step{s}": dict(n_blocks=5, step_mode="even", step=s, base=s, channels=32, growth=16,
                                        gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), imagenet=True)
       for s in (4, 6, 7)},
    # Phuong & Lampert's CIFAR-100 network (their MsdNet: 3 scales, 11 exits, 4 layers to the first exit and 2
    # between exits, planes 6/12/24 x (1 + layer), pruning 'min', halving at 1/3 and 2/3, heads 128 wide,
    # bottlenecks 4x, convolutions with biases). In MSDNet's terms: channels 1, growth 1, gr_factor = their
    # plane multipliers. docs/method.md, "Networks", gives its reference cost.
    "msdnet_cifar_dbt11": dict(n_blocks=11, step_mode="even", step=2, base=4, channels=1, growth=1,
                               gr_factor=(6, 12, 24), bn_factor=(4, 4, 4), prune="min", conv_bias=True),
}
