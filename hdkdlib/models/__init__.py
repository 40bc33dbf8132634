"""Multi-exit models: `build(name, num_classes, **options)` and `names()`.

Every model is a `MultiExitNet`: `model(x)` returns the list of K logits and
`model.exits(x)` yields them one by one, computing only what the next exit needs.
"""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Callable, Dict, List

from .backbone import BackboneExits, resnet_exits, swin_exits, vit_exits
from .base import MultiExitNet, evaluating, scale_grad
from .msdnet import CONFIGS as MSDNET_CONFIGS, MSDNet
from .toy import ToyMLP


def _msdnet(name: str) -> Callable[..., MSDNet]:
    def make(num_classes: int, **options) -> MSDNet:
        return MSDNet(num_classes, **{**MSDNET_CONFIGS[name], **options})
    make.__doc__ = f"{name}: MSDNet {MSDNET_CONFIGS[name]}"
    return make


_REGISTRY: Dict[str, Callable[..., MultiExitNet]] = {
    **{name: _msdnet(name) for name in MSDNET_CONFIGS},
    "resnet18_exits": lambda num_classes, **o: resnet_exits("resnet18", num_classes, **o),
    "resnet50_exits": lambda num_classes, **o: resnet_exits("resnet50", num_classes, **o),
    "vit_b_16_exits": lambda num_classes, **o: vit_exits("vit_b_16", num_classes, **o),
    "swin_t_exits": lambda num_classes, **o: swin_exits("swin_t", num_classes, **o),
    "toy_mlp": lambda num_classes, **o: ToyMLP(num_classes, **o),
}


# The built-in networks made of a torchvision backbone: its builder's name (for --weights).
BACKBONE_ARCHS = {"resnet18_exits": "resnet18", "resnet50_exits": "resnet50", "vit_b_16_exits": "vit_b_16",
                  "swin_t_exits": "swin_t"}


def torchvision_arch(name: str):
    """The torchvision builder behind a built-in backbone network, or None (MSDNets, the toy MLP)."""
    return BACKBONE_ARCHS.get(name)


def names() -> List[str]:
    return sorted(_REGISTRY)


def _shape_options(name: str, input_shape) -> Dict:
    """How each family takes the shape of one input sample."""
    if name == "toy_mlp":
        return {"in_features": math.prod(input_shape)}
    if name.startswith("msdnet"):
        return {"input_size": input_shape[-1]}
    return {"input_shape": tuple(input_shape)}


def build(name: str, num_classes: int, *, input_shape=None, **options) -> MultiExitNet:
    """Build a registered multi-exit model; options override the configuration's values. input_shape, one
    sample's shape such as (3, 32, 32), sizes the network for its data (each family says how)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(names())}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if input_shape is not None:
        options = {**_shape_options(name, input_shape), **options}
    try:
        return _REGISTRY[name](num_classes, **options)
    except TypeError as e:  # an option the constructor does not know: suggest the nearest real one
        bad = [k for k in options if f"'{k}'" in str(e)]
        known = {p for f in (MSDNet.__init__, BackboneExits.__init__, ToyMLP.__init__, resnet_exits, vit_exits)
                 for p in inspect.signature(f).parameters if p not in ("self", "num_classes", "kwargs")}
        close = difflib.get_close_matches(bad[0], sorted(known), n=1, cutoff=0.5) if bad else []
        raise TypeError(f"model {name!r}: {e}" + (f"; did you mean {close[0]}=?" if close else "")) from e


__all__ = ["build", "names", "evaluating", "MultiExitNet", "MSDNet", "BackboneExits", "ToyMLP", "resnet_exits",
           "vit_exits", "swin_exits", "torchvision_arch", "scale_grad"]
