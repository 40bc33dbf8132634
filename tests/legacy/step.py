"""The training step before the sync-free rewrite (commit 3a5b9cc): the oracle of tests/test_step.py."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .bilevel import MetaStep, VirtualStep


def backward_pass(net, objective, x, y, optimizer):
    """The real pass: gradients of the training loss in .grad (BatchNorm statistics update as in any step)."""
    optimizer.zero_grad(set_to_none=True)
    logits = net(x)
    loss = objective(logits, y)
    loss.backward()
    return loss.detach(), [z.detach() for z in logits]


def network_gradients(module) -> Dict[str, torch.Tensor]:
    """{name: gradient} of the trainable parameters, read, not copied: nothing writes .grad before the network
    optimizer uses it."""
    return {n: p.grad.detach() if p.grad is not None else torch.zeros_like(p)
            for n, p in module.named_parameters() if p.requires_grad}


def train_step(net, objective, optimizer, batch: Tuple[torch.Tensor, torch.Tensor],
               weight_update: Optional[MetaStep] = None, val_batch=None):
    """One optimisation step; with `weight_update` (and its held-out `val_batch`) the loss weights learn first,
    from this step's gradients and the virtual step `optimizer` is about to take. Returns (loss, logits)."""
    loss, logits = backward_pass(net, objective, *batch, optimizer)
    if weight_update is not None:
        virtual = VirtualStep.of(optimizer, weight_update.parameter_names())
        weight_update.update(batch, val_batch, logits, network_gradients(weight_update.module), virtual)
    optimizer.step()
    objective.after_step(logits)
    return loss, logits
