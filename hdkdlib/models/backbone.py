"""Exits on any torchvision backbone, without touching the backbone.

The backbone is traced with torchvision's feature-extraction utilities; the traced graph is
then cut after each exit node into consecutive segments. Segment k receives exactly the
values it needs from earlier segments and returns its exit feature first, followed by the
values that later segments still need. So `model.exits(x)` can stop after any exit, and the
segments share the backbone's own modules (and parameters).
"""
from __future__ import annotations

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


class BackboneExits(MultiExitNet):
    """A multi-exit model made from `backbone` with an exit after each node in `exit_nodes`.

    Each exit gets global average pooling and a Linear head, or `make_head(channels, num_classes)`.
    """

    head_index = 0

    def __init__(self, backbone: nn.Module, exit_nodes: Sequence[str], num_classes: int, *,
                 input_shape=(3, 224, 224), make_head=PooledLinear, gradient_equilibrium: bool = False):
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
        with evaluating(backbone):  # probe the channel count of every exit feature
            feats = gm(torch.zeros(1, *input_shape))
        heads = nn.ModuleList(make_head(feats[n].shape[1], num_classes) for n in exit_nodes)
        # The backbone itself is not registered: the segments hold the modules that run, so
        # parameters() leaves out what no exit uses (e.g. a ResNet's own fc layer).
        super().__init__(stages, heads, gradient_equilibrium=gradient_equilibrium)
        self.exit_nodes = exit_nodes
        self.input_shape = tuple(input_shape)


def resnet_exits(arch: str, num_classes: int, *, weights=None, exit_nodes=("layer1", "layer2", "layer3", "layer4"),
                 **kwargs) -> BackboneExits:
    """A torchvision ResNet with an exit after each stage; its own fc layer is left unused."""
    import torchvision
    backbone = getattr(torchvision.models, arch)(weights=weights)
    return BackboneExits(backbone, exit_nodes, num_classes, **kwargs)
