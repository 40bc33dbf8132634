"""Exits on any torchvision backbone, without touching the backbone.

The backbone is traced with torchvision's feature-extraction utilities; the traced graph is
then cut after each exit node into consecutive segments. Segment k receives exactly the
values it needs from earlier segments and returns its exit feature first, followed by the
values that later segments still need. So `model.exits(x)` can stop after any exit, and the
segments share the backbone's own modules (and parameters).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .base import MultiExitNet, evaluating


def _split_graph(gm: fx.GraphModule, exit_nodes: Sequence[str]) -> List[fx.GraphModule]:
    nodes = list(gm.graph.nodes)
    # create_feature_extractor's graph returns {node name: fx node}: that maps names to fx nodes.
    returned = next(n for n in nodes if n.op == "output").args[0]
    targets = [returned[name] for name in exit_nodes]
    segment_of: Dict[fx.Node, int] = {}
    k = 0
    for n in nodes:
        if n.op == "output":
            continue
        segment_of[n] = k
        if k < len(targets) and n is targets[k]:
            k += 1
    segments = []
    carried: List[fx.Node] = []  # values entering the current segment, in order
    for k, target in enumerate(targets):
        members = [n for n in nodes if segment_of.get(n) == k]
        later = {n for n in nodes if n.op != "output" and segment_of.get(n, -1) > k}
        graph = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        for i, n in enumerate(carried):
            env[n] = graph.placeholder(f"carry_{i}")
        for n in members:
            env[n] = graph.node_copy(n, lambda m: env[m])
        available = list(carried) + members
        needed_later = [n for n in available if any(user in later for user in n.users)]
        graph.output(tuple(env[n] for n in [target] + needed_later))
        seg = fx.GraphModule(gm, graph)
        segments.append(seg)
        carried = needed_later
    return segments


class _Segment(nn.Module):
    """Calls a graph segment on the carried values (the first segment on the image itself)."""

    def __init__(self, graph_module: fx.GraphModule, first: bool):
        super().__init__()
        self.graph_module = graph_module
        self.first = first

    def forward(self, state):
        if self.first:
            return list(self.graph_module(state))
        return list(self.graph_module(*state[1:]))


class PooledLinear(nn.Sequential):
    def __init__(self, channels: int, num_classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))


class _ChannelsFirst(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class _Tokens(nn.Module):
    """The class token (index 0) or the mean over tokens of a [N, L, D] sequence."""

    def __init__(self, use_class_token: bool):
        super().__init__()
        self.use_class_token = use_class_token

    def forward(self, x):
        return x[:, 0] if self.use_class_token else x.mean(dim=1)


# Feature layouts an exit node can produce, and the default head for each:
#   nchw        [N, C, H, W] maps (CNNs)                 -> average pool, linear
#   nhwc        [N, H, W, C] maps (Swin, channels-last)  -> permute, average pool, linear
#   tokens_cls  [N, 1 + L, D] with a class token (ViT)   -> class token, LayerNorm, linear
#   tokens_mean [N, L, D] without one                    -> mean of tokens, LayerNorm, linear
#   flat        [N, D] pooled features                   -> linear
LAYOUTS = ("nchw", "nhwc", "tokens_cls", "tokens_mean", "flat")


def default_head(layout: str, shape, num_classes: int) -> nn.Module:
    if layout == "nchw":
        return PooledLinear(shape[1], num_classes)
    if layout == "nhwc":
        return nn.Sequential(_ChannelsFirst(), PooledLinear(shape[3], num_classes))
    if layout in ("tokens_cls", "tokens_mean"):
        return nn.Sequential(_Tokens(layout == "tokens_cls"), nn.LayerNorm(shape[2]), nn.Linear(shape[2], num_classes))
    if layout == "flat":
        return nn.Linear(shape[1], num_classes)
    raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")


def feature_dim(layout: str, shape) -> int:
    return shape[{"nchw": 1, "nhwc": 3, "tokens_cls": 2, "tokens_mean": 2, "flat": 1}[layout]]


def detect_layout(node: str, feature, input_shape, larger=None) -> str:
    """The layout of one exit node's output, from its shape and the input's: a 4-d map whose spatial dims keep
    the input's aspect ratio in positions 2, 3 (nchw) or 1, 2 (nhwc); a 3-d token sequence, with a class token
    when one token more than a square grid. When a map fits both (channels equal to a spatial size), `larger()`,
    the node's output for an input twice the size (or None), tells them apart: the channels stay, the spatial
    sizes grow. It is called only then.
    A ValueError names the node when its output fits no layout, or two."""
    if not torch.is_tensor(feature):
        raise ValueError(f"exit node {node!r} outputs a {type(feature).__name__}, not a feature map or token sequence: "
                         "choose a node whose output is one tensor")
    shape, (H, W) = tuple(feature.shape), tuple(input_shape[-2:])
    if len(shape) == 2:
        return "flat"
    if len(shape) == 3:
        grid = math.isqrt(shape[1] - 1) if shape[1] > 1 else 0
        return "tokens_cls" if grid * grid == shape[1] - 1 else "tokens_mean"
    if len(shape) == 4:
        def keeps_ratio(h, w):  # the map's aspect ratio is the input's, to within rounding of one cell
            return h <= H and w <= W and abs(H * w - W * h) <= max(H, W)
        fits = [name for name, (h, w) in (("nchw", shape[2:4]), ("nhwc", shape[1:3])) if keeps_ratio(h, w)]
        bigger = larger() if len(fits) == 2 and larger is not None else None
        if bigger is not None and bigger.dim() == 4:
            grown = [a != b for a, b in zip(shape, bigger.shape)]
            fits = [name for name, spatial in (("nchw", [False, False, True, True]), ("nhwc", [False, True, True, False]))
                    if grown == spatial]
        if len(fits) == 1:
            return fits[0]
        why = "could be [N, C, H, W] or [N, H, W, C]" if fits else "matches neither [N, C, H, W] nor [N, H, W, C]"
        raise ValueError(f"exit node {node!r} outputs shape {list(shape)}, which {why} for input {list(input_shape)}: "
                         f"give layout= (one of {', '.join(LAYOUTS)})")
    raise ValueError(f"exit node {node!r} outputs a {len(shape)}-d tensor {list(shape)}, not a feature map or token "
                     "sequence: choose another node")


def _probe_larger(backbone, gm, input_shape) -> Dict:
    """The exit features for an input twice the size, or {} when the backbone takes one input size only."""
    c, h, w = input_shape
    try:
        with evaluating(backbone), torch.no_grad():
            return gm(torch.zeros(1, c, 2 * h, 2 * w))
    except Exception:  # a fixed-size model (ViT's position embedding, MaxVit's partitions): no second look
        return {}


class BackboneExits(MultiExitNet):
    """A multi-exit model made from `backbone` with an exit after each node in `exit_nodes`.

    Each exit's head matches the layout of its node's output (LAYOUTS; detected from the shape, or `layout=`:
    one name for all exits or one per exit), or is `make_head(feature_dim, num_classes)`. Its cost is counted
    in multiply-accumulates by torch's flop counter (every family's operations, attention included).
    """

    head_index = 0
    cost_convention = "macs"

    def __init__(self, backbone: nn.Module, exit_nodes: Sequence[str], num_classes: int, *,
                 input_shape=(3, 224, 224), make_head=None, layout=None, gradient_equilibrium: bool = False):
        if isinstance(exit_nodes, str):
            raise ValueError(f"exit_nodes must be a list of node names, got the string {exit_nodes!r}: "
                             f"write exit_nodes=[{exit_nodes!r}]")
        exit_nodes = list(exit_nodes)
        repeated = sorted({n for n in exit_nodes if exit_nodes.count(n) > 1})
        if repeated:
            raise ValueError(f"exit_nodes names {', '.join(repeated)} more than once: one exit per node")
        _, eval_nodes = get_graph_node_names(backbone)

        def position(name):  # a module path ("layer1") stands for the last node inside it, as in torchvision
            hits = [i for i, n in enumerate(eval_nodes) if n == name or n.startswith(name + ".")]
            return hits[-1] if hits else None

        missing = [n for n in exit_nodes if position(n) is None]
        if missing or not exit_nodes:
            raise ValueError(f"no node named {missing} in {type(backbone).__name__}; available nodes: "
                             + ", ".join(eval_nodes))
        order = [position(n) for n in exit_nodes]
        if order != sorted(order):
            raise ValueError(f"exit nodes must follow the order of the graph; got {exit_nodes}")
        gm = create_feature_extractor(backbone, return_nodes=exit_nodes)
        segments = _split_graph(gm, exit_nodes)
        stages = nn.ModuleList(_Segment(seg, first=(k == 0)) for k, seg in enumerate(segments))
        with evaluating(backbone):  # probe the shape of every exit feature
            feats = gm(torch.zeros(1, *input_shape))
        layouts = [layout] * len(exit_nodes) if layout is None or isinstance(layout, str) else list(layout)
        if len(layouts) != len(exit_nodes):
            raise ValueError(f"layout gives {len(layouts)} layouts for {len(exit_nodes)} exit nodes")
        probed = []  # the second probe runs once, and only if some map is ambiguous

        def larger_of(node):
            if not probed:
                probed.append(_probe_larger(backbone, gm, input_shape))
            return probed[0].get(node)
        for k, (node, given) in enumerate(zip(exit_nodes, layouts)):
            if given is not None and given not in LAYOUTS:
                raise ValueError(f"unknown layout {given!r} for exit node {node!r}; valid: {', '.join(LAYOUTS)}")
            layouts[k] = given or detect_layout(node, feats[node], input_shape, lambda: larger_of(node))
            dims = {"nchw": 4, "nhwc": 4, "tokens_cls": 3, "tokens_mean": 3, "flat": 2}[layouts[k]]
            if not torch.is_tensor(feats[node]) or feats[node].dim() != dims:
                raise ValueError(f"exit node {node!r}: layout {layouts[k]} needs a {dims}-d output, got "
                                 f"{list(feats[node].shape) if torch.is_tensor(feats[node]) else type(feats[node]).__name__}")
        heads = nn.ModuleList(
            make_head(feature_dim(lay, feats[n].shape), num_classes) if make_head is not None
            else default_head(lay, feats[n].shape, num_classes) for n, lay in zip(exit_nodes, layouts))
        # The backbone itself is not registered: the segments hold the modules that run, so
        # parameters() leaves out what no exit uses (e.g. a ResNet's own fc layer).
        super().__init__(stages, heads, gradient_equilibrium=gradient_equilibrium)
        self.exit_nodes, self.layouts = exit_nodes, layouts
        self.input_shape = tuple(input_shape)


def resnet_exits(arch: str, num_classes: int, *, weights=None, exit_nodes=("layer1", "layer2", "layer3", "layer4"),
                 **kwargs) -> BackboneExits:
    """A torchvision ResNet with an exit after each stage; its own fc layer is left unused."""
    import torchvision
    backbone = getattr(torchvision.models, arch)(weights=weights or None)
    return BackboneExits(backbone, exit_nodes, num_classes, **kwargs)


def vit_exits(arch: str, num_classes: int, *, weights=None, exit_nodes=None, input_shape=(3, 224, 224), **kwargs):
    """A torchvision ViT with exits after evenly spaced encoder blocks (by default every third of ViT-B's 12: after
    blocks 3, 6, 9 and 12), heads on the class token. Without weights it is built for the input size given;
    pretrained weights fix the size they were trained at."""
    import torchvision
    size = input_shape[-1]
    if weights:
        backbone = getattr(torchvision.models, arch)(weights=weights)
        if backbone.image_size != size:
            raise ValueError(f"{arch} weights {weights} take {backbone.image_size} px images, got {size} px: resize the "
                             f"data to {backbone.image_size} px, or train without weights")
    else:
        backbone = getattr(torchvision.models, arch)(image_size=size)
    depth = len(backbone.encoder.layers)
    nodes = exit_nodes or [f"encoder.layers.encoder_layer_{i}" for i in range(depth // 4 - 1, depth, depth // 4)]
    return BackboneExits(backbone, nodes, num_classes, input_shape=input_shape, **kwargs)


def swin_exits(arch: str, num_classes: int, *, weights=None, exit_nodes=("features.1", "features.3", "features.5",
                                                                            "features.7"), **kwargs) -> BackboneExits:
    """A torchvision Swin Transformer with an exit after each of its four stages (channels-last maps)."""
    import torchvision
    backbone = getattr(torchvision.models, arch)(weights=weights or None)
    return BackboneExits(backbone, exit_nodes, num_classes, **kwargs)
