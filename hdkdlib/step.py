"""One training step, for every method: forward, gradients, the loss weights' update (learned-weight methods,
when due) and the network's update. The Trainer, toy.fit and the benchmarks all take their steps here.

The step reads nothing on the host: gradients come from torch.autograd.grad (no .grad to zero), the optimizer's
arithmetic runs as torch._foreach_* ops over parameter lists (bilevel's, shared with the virtual step), its state
(momentum buffers, Adam's moments and step count) exists before the first step, and the learning rate is a 0-d
tensor the schedule fills. So the step can be compiled as one graph or captured as a CUDA graph, and costs a
fixed number of kernels whatever the number of parameters.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .bilevel import ADAM_STATE, MetaStep, VirtualStep, _trainable, prepare_state


class TrainStep:
    """The training step of one run: `step(batch)`, or `step(batch, val_batch)` with the weight update. Built once
    (and again after the optimizer's state is loaded: it holds references to that state)."""

    def __init__(self, net, objective, optimizer: torch.optim.Optimizer, weight_update: Optional[MetaStep] = None):
        self.net, self.objective, self.optimizer, self.weight_update = net, objective, optimizer, weight_update
        self.module = getattr(net, "module", net)
        names = {id(p): n for n, p in _trainable(self.module).items()}
        self.params = [p for g in optimizer.param_groups for p in g["params"] if id(p) in names]
        if len(self.params) != len(names):
            raise ValueError(f"the optimizer holds {len(self.params)} of the network's {len(names)} trainable "
                             "parameters: build it over all of them")
        self.distributed = self.module is not net  # DDP all-reduces gradients in backward(), not autograd.grad
        prepare_state(optimizer, self.params)
        # in the parameters' precision (at least float32): a float64 run steps by 0.3, not by float32's 0.30000001
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=self.params[0].device,
                               dtype=torch.promote_types(self.params[0].dtype, torch.float32))
        self.update = VirtualStep.of(optimizer, names, lr=self.lr)  # its state lists alias the optimizer's state
        self.state_keys = ("momentum_buffer",) if self.update.kind == "SGD" else ADAM_STATE
        self.state = [self.update.state[k] for k in self.state_keys]

    def set_lr(self, lr: float) -> None:
        """The schedule's lr for the steps that follow: filled into the tensor the step reads (and into the
        optimizer's groups, which checkpoints keep)."""
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr.fill_(lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def gradients(self, x, y):
        """The real pass: (loss, logits, gradients of the training loss), BatchNorm statistics updated as in any
        training pass."""
        logits = self.net(x)
        loss = self.objective(logits, y)
        if self.distributed:
            for p in self.params:
                p.grad = None
            loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        else:
            grads = list(torch.autograd.grad(loss, self.params, allow_unused=True))
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
        return loss.detach(), [z.detach() for z in logits], grads

    def apply(self, theta, after) -> None:
        """Write the step's result into the parameters and the optimizer's state."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, theta)
            if self.update.kind == "SGD" and not self.update.momentum:
                return  # plain SGD keeps no state
            for target, key in zip(self.state, self.state_keys):
                torch._foreach_copy_(target, after.state[key])

    def __call__(self, batch: Tuple[torch.Tensor, torch.Tensor], val_batch=None):
        """One optimisation step; with `val_batch` (and a weight update) the loss weights learn first, from this
        step's gradients and the virtual step the network is about to take, which is then applied as the real
        one. Returns (loss, logits)."""
        loss, logits, grads = self.gradients(*batch)
        after = None
        if val_batch is not None and self.weight_update is not None:
            _, after = self.weight_update.update(batch, val_batch, logits, grads, self.update)
        if after is None:
            with torch.no_grad():
                after = self.update.advance([p.detach() for p in self.params], grads)
        self.apply(*after)
        self.objective.after_step(logits)
        return loss, logits


def compile_step(step: TrainStep, mode: str = "default"):
    """torch.compile of the whole step as one graph (fullgraph: a graph break is an error, not a silent split).
    Tracing torch.autograd.grad needs dynamo's trace_autograd_ops; a torch without it compiles the step in parts
    (split at the gradients), said in one line."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        print(f"torch {torch.__version__} cannot trace torch.autograd.grad: the step compiles in parts", flush=True)
        return torch.compile(step, mode=mode)
    compiled = torch.compile(step, mode=mode, fullgraph=True)

    def call(*args):
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args)
    return call


class CapturedStep:
    """The step replayed as CUDA graphs: the batches are copied into static input buffers; the first `warmup`
    steps of each kind run eagerly (on a side stream on CUDA), then one graph with and one without the weight
    update is captured, sharing one memory pool, and replayed. The learning rate is a tensor the graphs read, so
    set_lr refills it between epochs. A batch of another shape than the captured one (the last partial batch)
    runs eagerly, never through a graph made for another size.

    `capture=False` runs the same bookkeeping without graphs (the CPU, and the tests): static buffers, the
    choice of the graph per step, the eager path for other shapes. If capturing fails (data-dependent control flow
    in a backbone, an op that syncs), one line says why and the step stays eager from then on.

    The returned loss and logits are the graph's static outputs: the next replay overwrites them, so callers use
    them before the next step (the Trainer adds them to its accumulators at once)."""

    def __init__(self, step: TrainStep, capture: bool, warmup: int = 3, say=print):
        self.step, self.capture, self.warmup, self.say = step, capture, warmup, say
        self.static = {}  # kind ("update" / "plain") -> (input buffers, outputs, graph or None)
        self.eager_steps = {"update": 0, "plain": 0}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.failed = None  # why capturing failed, once it has

    def set_lr(self, lr: float) -> None:
        self.step.set_lr(lr)

    def _graphed(self, kind, inputs):
        """Capture `kind`'s graph over static copies of `inputs`; None (and eager from now on) if it fails."""
        static = [t.clone() for t in inputs]
        if not self.capture:
            return static, None, None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._run(kind, static)
        except Exception as e:  # noqa: BLE001 (any failure to capture means: stay eager, and say why)
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.say(f"the training step cannot be captured as a CUDA graph ({self.failed}); training eagerly")
            return None
        return static, out, graph

    def _run(self, kind, tensors):
        batch = (tensors[0], tensors[1])
        return self.step(batch, (tensors[2], tensors[3]) if kind == "update" else None)

    def __call__(self, batch, val_batch=None):
        kind = "update" if val_batch is not None else "plain"
        inputs = [*batch, *(val_batch or ())]
        if self.failed is not None:
            return self.step(batch, val_batch)
        if self.eager_steps[kind] < self.warmup:  # real steps, eager: state and autotuning settle before capture
            self.eager_steps[kind] += 1
            if not self.capture:
                return self.step(batch, val_batch)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(batch, val_batch)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if kind not in self.static:
            captured = self._graphed(kind, inputs)
            if captured is None:
                return self.step(batch, val_batch)
            self.static[kind] = captured
        static, out, graph = self.static[kind]
        if any(t.shape != s.shape or t.dtype != s.dtype for t, s in zip(inputs, static)):
            return self.step(batch, val_batch)  # another batch size: eager, never a graph made for another
        for s, t in zip(static, inputs):
            s.copy_(t, non_blocking=True)
        if graph is None:
            return self._run(kind, static)
        graph.replay()
        return out
