"""The bilevel weight update: one-step-unrolled hypergradient of the validation loss.

With training loss L_tr(theta, w) = scale * sum_k w_k l_k(theta) and w = w(gamma), one virtual
SGD step (mirroring the real optimizer: momentum, weight decay, current learning rate xi)

    theta' = theta - xi * (m * buf + grad_theta L_tr(theta, w) + wd * theta)

and the outer loss L_val(theta') give the hypergradient

    dL_val/dw_k = -xi * scale * < grad L_val(theta'), grad_theta l_k(theta) >.

`exact` differentiates through the virtual step with autograd (torch.func.functional_call);
`finite_difference` evaluates every inner product at once with two extra forward passes,
(l_k(theta + eps v) - l_k(theta - eps v)) / (2 eps) with v = grad L_val(theta'), keeping the KD
teachers at their values at theta (they are detached in l_k, so they must not move with eps).
The step along v has length eps (default: cube root of the dtype's machine epsilon, 4.9e-3 in
float32, close to DARTS' 0.01; 6e-6 in float64).
`exact` with horizon K > 1 unrolls K virtual steps (the same batch, the optimizer's state carried on) and
differentiates L_val(theta_K) through all of them: a term whose help needs several steps to reach the validation
loss gets its credit, where one step sees none of it (the short-horizon bias, Wu et al., ICLR 2018).
Nothing here changes the model's parameters or buffers: the functional passes use batch statistics without
touching BatchNorm's running statistics (functional_buffers), and every update returns new tensors.
The optimizer arithmetic runs as torch._foreach_* ops over parameter lists, a handful of kernels per update
whatever the number of parameters, and reads no value on the host: the step runs without host syncs.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.func import functional_call

from .distributed import mean_over_ranks as _mean_over_ranks
from .models.base import draws_random_numbers, gradient_equilibrium_off, with_gradient_equilibrium
from .objectives import LEARNED, Objective, ValidationLoss, ce_terms, is_tracing

METHODS = ("exact", "finite_difference")
HYPERGRAD_NORMS = ("lr", "none")
META_SCHEDULES = ("per_run", "fixed")


def per_run_meta_lr(meta_steps: int, traverse: float, span: float = math.log(1e3),
                    max_lr: float = 0.1) -> float:
    """The weight learning rate at which Adam can move a weight parameter gamma by `span` (default: a factor
    of 1,000 in the weight, from the 1e-3 floor to 1) within `traverse` of the run's `meta_steps` weight
    steps. Adam's step is about lr per step while the hypergradient keeps its sign, whatever its size, so
    this gives runs of every length the same reach, where a fixed lr reaches 200 times further in a 300-epoch
    run than in a 1.5-epoch one. Capped at `max_lr`, so that very short runs (smoke tests, quick notebooks) do
    not throw the weights about. TrainConfig.meta_traverse owns the default traverse."""
    if meta_steps < 1:
        raise ValueError(f"meta_steps must be >= 1, got {meta_steps}")
    if not 0 < traverse <= 1:
        raise ValueError(f"meta_traverse must lie in (0, 1] (a fraction of the run's weight steps), got {traverse}")
    return min(span / (traverse * meta_steps), max_lr)


def updates_weights_at(step: int, interval: int = 1, warmup_steps: int = 0) -> bool:
    """Whether training step `step` (from 0) carries a weight update: every `interval` steps once the warm-up is
    over. The warm-up lets the network learn before a one-step hypergradient judges the terms: early on a
    distillation term's teacher is as weak as its student, and a short-horizon signal turns such terms down
    before they could help (DR-MGF waits 100 epochs)."""
    return step >= warmup_steps and step % interval == 0


def weight_steps(total_steps: int, interval: int = 1, warmup_steps: int = 0) -> int:
    """How many of training steps 0..total_steps-1 carry a weight update (updates_weights_at): the multiples of
    `interval` in [warmup_steps, total_steps). Not ceil((total - warmup) / interval): the updates keep the
    multiples of `interval`, so a warm-up that ends between two of them does not shift them."""
    first = -(-max(warmup_steps, 0) // interval)  # the first multiple of interval at or after the warm-up, / interval
    return max(-(-total_steps // interval) - first, 0)


Batch = Tuple[torch.Tensor, torch.Tensor]
Tensors = List[torch.Tensor]


def _trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def functional_buffers(model: nn.Module) -> Dict[str, None]:
    """The buffers a functional pass replaces: the running statistics of every BatchNorm in training mode, set to
    None, so the pass normalises by the batch's statistics exactly as a training pass does and leaves the running
    statistics untouched, bit for bit (no clone of them needed). Eval-mode BatchNorms (frozen stages) keep theirs."""
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                out[f"{prefix}.{b}" if prefix else b] = None
    return out


def functional_pass(model, names: Sequence[str], tensors: Sequence[torch.Tensor], buffers, x):
    """model(x) with the parameters `names` replaced by `tensors` and the BatchNorm statistics by `buffers`."""
    return functional_call(model, {**buffers, **dict(zip(names, tensors))}, (x,), tie_weights=False, strict=False)


def _momentum_buffers(model, momentum_buffer) -> Dict[str, Optional[torch.Tensor]]:
    """Accept None, {name: tensor}, or a sequence aligned with the model's trainable parameters."""
    names = list(_trainable(model))
    if momentum_buffer is None:
        return {n: None for n in names}
    if isinstance(momentum_buffer, Mapping):
        return {n: momentum_buffer.get(n) for n in names}
    bufs = list(momentum_buffer)
    if len(bufs) != len(names):
        raise ValueError(f"momentum_buffer has {len(bufs)} entries for {len(names)} trainable parameters")
    return dict(zip(names, bufs))


# --- the optimizers' arithmetic over parameter lists ----------------------------------------------------------
# Out of place throughout: the exact hypergradient differentiates through it, and the real update copies its
# results into the parameters and the optimizer's state (step.TrainStep). lr may be a float or a 0-d tensor.
def _or_zeros(tensors, like):
    """State that does not exist yet (the first step) as zeros: SGD's buffer 0 * m + d is d exactly, as
    torch.optim starts it; Adam's moments and step count start at zero."""
    return [t if t is not None else torch.zeros_like(p) for t, p in zip(tensors, like)]


def _sgd(params: Tensors, grads: Tensors, bufs, *, lr, momentum, weight_decay, nesterov):
    """(theta', momentum buffers after the step) as torch.optim.SGD (dampening 0) computes them."""
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else list(grads)
    new_bufs = []
    if momentum:
        new_bufs = torch._foreach_add(torch._foreach_mul(_or_zeros(bufs, params), momentum), d)
        d = torch._foreach_add(d, new_bufs, alpha=momentum) if nesterov else new_bufs
    return torch._foreach_sub(params, torch._foreach_mul(d, lr)), new_bufs


def _adam_moments(params, grads, state, *, betas, weight_decay):
    """(m, v, step count, 1 - beta1^t, 1 - beta2^t, the gradient with L2 decay) after one more Adam step."""
    g = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else list(grads)
    m = torch._foreach_lerp(_or_zeros(state["exp_avg"], params), g, 1 - betas[0])
    v = torch._foreach_addcmul(torch._foreach_mul(_or_zeros(state["exp_avg_sq"], params), betas[1]), g, g,
                               value=1 - betas[1])
    # the step count in float64, as torch.optim computes its bias corrections (1 - 0.999 in float32 is off by 1e-5)
    # (torch.optim keeps a float32 count on the host: read where it lies, converted; a no-op for a prepared one)
    t = torch._foreach_add([s.to(p.device, torch.float64) if s is not None else p.new_zeros((), dtype=torch.float64)
                            for s, p in zip(state["step"], params)], 1)
    c1, c2 = (torch._foreach_neg(torch._foreach_sub(torch._foreach_pow(b, t), 1)) for b in betas)
    return m, v, t, c1, c2, g


def _sqrt_zero_slope(tensors: Tensors) -> Tensors:
    """sqrt of non-negative tensors, the same values bit for bit, with slope 0 where an element is 0.
    Adam's second moment v is 0 where every gradient so far was exactly 0 (a dead ReLU without coupled decay):
    the plain sqrt's slope, inf there, becomes inf * 0 = NaN through v = (1 - b2) g^2. The update m / (sqrt(v) + eps)
    is differentiable there all the same, and as m is 0 wherever v is, any finite slope gives its true derivative.
    The mask s = sign(v) (1 or 0, constant in autograd) makes v + (1 - s) v itself or 1: sqrt(v + (1 - s)) * s is
    sqrt(v) where v > 0, and 0 with slope 0 where v = 0."""
    s = torch._foreach_sign(tensors)
    safe = torch._foreach_add(tensors, torch._foreach_add(torch._foreach_neg(s), 1))
    return torch._foreach_mul(torch._foreach_sqrt(safe), s)


def _adam(params: Tensors, grads: Tensors, state, *, lr, betas, eps, weight_decay, decoupled):
    """(theta', Adam's state after the step) as torch.optim.Adam, or AdamW (decoupled), computes them."""
    m, v, t, c1, c2, _ = _adam_moments(params, grads, state, betas=betas, weight_decay=0.0 if decoupled else weight_decay)
    denom = torch._foreach_add(_sqrt_zero_slope(torch._foreach_div(v, c2)), eps)
    d = torch._foreach_div(torch._foreach_div(m, c1), denom)
    base = torch._foreach_mul(params, 1 - lr * weight_decay) if decoupled and weight_decay else params
    return torch._foreach_sub(base, torch._foreach_mul(d, lr)), {"step": t, "exp_avg": m, "exp_avg_sq": v}


def _sgd_update(params, grads, *, lr, momentum, weight_decay, momentum_buffer, nesterov):
    """Dict form of _sgd: (theta', the momentum buffers SGD holds after the step), both {name: tensor}."""
    names = list(params)
    out, bufs = _sgd(list(params.values()), [grads[n] for n in names], [momentum_buffer.get(n) for n in names],
                     lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    return dict(zip(names, out)), dict(zip(names, bufs))


def virtual_step(params: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], *, lr: float, momentum: float,
                 weight_decay: float, momentum_buffer: Dict[str, Optional[torch.Tensor]],
                 nesterov: bool = False) -> Dict[str, torch.Tensor]:
    """theta' as torch.optim.SGD (dampening 0, with or without Nesterov) would compute it; differentiable in grads."""
    return _sgd_update(params, grads, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       momentum_buffer=momentum_buffer, nesterov=nesterov)[0]


def adam_virtual_step(params: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], *, lr: float, betas=(0.9, 0.999),
                      eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False,
                      state: Optional[Dict[str, Dict]] = None) -> Dict[str, torch.Tensor]:
    """theta' as torch.optim.Adam (decoupled=False: weight decay added to the gradient) or AdamW (decoupled: the
    parameter shrunk by lr * wd) would compute it from its state {name: {step, exp_avg, exp_avg_sq}} (empty: the
    first step); differentiable in grads."""
    names, state = list(params), state or {}
    lists = {k: [_as_tensor((state.get(n) or {}).get(k)) for n in names] for k in ADAM_STATE}
    out, _ = _adam(list(params.values()), [grads[n] for n in names], lists, lr=lr, betas=betas, eps=eps,
                   weight_decay=weight_decay, decoupled=decoupled)
    return dict(zip(names, out))


ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _as_tensor(value):
    """torch.optim keeps Adam's step as a tensor; an int or float (older state dicts) is made one."""
    return torch.tensor(float(value), dtype=torch.float64) if isinstance(value, (int, float)) else value


def prepare_state(optimizer: torch.optim.Optimizer, params) -> None:
    """Create the optimizer's state the first step would create, as torch.optim would after it (so a checkpoint
    is still torch.optim's state_dict): SGD's momentum buffer (zeros: 0 * momentum + d is d exactly, the value
    SGD starts it at), Adam's moments (zeros) and step count (0, a float64 tensor on the parameter's device; a
    count torch.optim kept on the host in float32 is moved there)."""
    group = optimizer.param_groups[0]
    for p in params:
        state = optimizer.state[p]
        if isinstance(optimizer, torch.optim.SGD):
            if group.get("momentum") and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not state:
            state.update(step=torch.zeros((), dtype=torch.float64, device=p.device),
                         exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                         exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
        elif not isinstance(state["step"], torch.Tensor) or state["step"].device != p.device \
                or state["step"].dtype != torch.float64:
            state["step"] = torch.as_tensor(state["step"]).to(p.device, torch.float64)


class VirtualStep:
    """One step of the network's optimizer as a function of the gradient, theta' = theta - lr * d(g): SGD (momentum,
    Nesterov, weight decay), Adam or AdamW, read from the optimizer's settings and state. The parameters come as a
    list aligned with `names` (or a dict by name). `apply` gives theta' (differentiable in the gradient, for the
    exact hypergradient); `advance` also the optimizer's state after the step; `tangent` gives (dd/dg)^T v, the
    direction along which the finite differences probe the training terms (SGD: v itself, times 1 + momentum with
    Nesterov; Adam: v times the elementwise derivative of its normalised step).
    `state` holds lists aligned with `names`: SGD {"momentum_buffer": [...]}, Adam {"step", "exp_avg",
    "exp_avg_sq"}; an entry None is state not created yet (the first step)."""
    KINDS = ("SGD", "Adam", "AdamW")

    def __init__(self, kind: str, lr, *, names: Sequence[str] = (), momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, momentum_buffer=None, betas=(0.9, 0.999), eps: float = 1e-8, state=None):
        if kind not in self.KINDS:
            raise ValueError(f"the bilevel step mirrors {', '.join(self.KINDS)}; got {kind}")
        self.kind, self.lr, self.momentum, self.nesterov = kind, lr, momentum, nesterov
        self.weight_decay, self.betas, self.eps, self.names = weight_decay, tuple(betas), eps, list(names)
        if kind == "SGD":
            if isinstance(momentum_buffer, Mapping):  # {name: tensor}: aligned with names
                momentum_buffer = [momentum_buffer.get(n) for n in self.names]
            state = {"momentum_buffer": list(momentum_buffer) if momentum_buffer is not None
                     else [None] * len(self.names)}
        elif state is None or isinstance(next(iter(state.values()), None), (dict, type(None))):
            # {name: {step, exp_avg, exp_avg_sq}} as torch.optim keeps it per parameter
            state = {k: [_as_tensor(((state or {}).get(n) or {}).get(k)) for n in self.names] for k in ADAM_STATE}
        self.state = state

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, names: Dict[int, str], lr=None) -> "VirtualStep":
        """The step `optimizer` would take next; names maps id(parameter) to the parameter's name (the order of the
        optimizer's parameters is the order of the lists); lr: a tensor the schedule fills, else the group's."""
        kind = type(optimizer).__name__
        if kind not in cls.KINDS:
            raise ValueError(f"the bilevel step mirrors the optimizers {', '.join(cls.KINDS)} (their virtual step is "
                             f"exact); {kind} is not supported: train the network with one of them")
        group = optimizer.param_groups[0]
        keys = ("lr", "momentum", "nesterov", "weight_decay", "betas", "eps")
        if any({k: g.get(k) for k in keys} != {k: group.get(k) for k in keys} for g in optimizer.param_groups):
            raise ValueError("the bilevel step needs one set of optimizer settings; the parameter groups differ")
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError(f"the bilevel step mirrors plain {kind}: amsgrad and maximize are not supported")
        if kind == "SGD" and group.get("dampening"):
            raise ValueError("the bilevel step mirrors SGD without dampening: set dampening=0")
        params = [p for g in optimizer.param_groups for p in g["params"] if id(p) in names]
        states = [optimizer.state.get(p, {}) for p in params]
        common = dict(names=[names[id(p)] for p in params], weight_decay=group.get("weight_decay", 0.0))
        lr = group["lr"] if lr is None else lr
        if kind == "SGD":
            return cls(kind, lr, momentum=group.get("momentum", 0.0), nesterov=bool(group.get("nesterov")),
                       momentum_buffer=[s.get("momentum_buffer") for s in states], **common)
        state = {k: [_as_tensor(s.get(k)) for s in states] for k in ADAM_STATE}
        return cls(kind, lr, betas=group["betas"], eps=group["eps"], state=state, **common)

    def _lists(self, params, grads):
        if isinstance(params, Mapping):
            return [params[n] for n in self.names], [grads[n] for n in self.names]
        return list(params), list(grads)

    def apply(self, params, grads):
        return self.advance(params, grads)[0]

    def advance(self, params, grads) -> Tuple[Union[Dict[str, torch.Tensor], Tensors], "VirtualStep"]:
        """(theta', the step after it): the optimizer's state (momentum buffers, Adam's moments and step count)
        carried on, differentiable, for a hypergradient through several virtual steps (at this lr). theta' comes
        as the parameters came: a dict by name or a list."""
        p, g = self._lists(params, grads)
        if self.kind == "SGD":
            out, bufs = _sgd(p, g, self.state["momentum_buffer"], lr=self.lr, momentum=self.momentum,
                             weight_decay=self.weight_decay, nesterov=self.nesterov)
            after = VirtualStep("SGD", self.lr, names=self.names, momentum=self.momentum, nesterov=self.nesterov,
                                weight_decay=self.weight_decay, momentum_buffer=bufs or None)
        else:
            out, state = _adam(p, g, self.state, lr=self.lr, betas=self.betas, eps=self.eps,
                               weight_decay=self.weight_decay, decoupled=self.kind == "AdamW")
            after = VirtualStep(self.kind, self.lr, names=self.names, weight_decay=self.weight_decay, betas=self.betas,
                                eps=self.eps, state=state)
        return (dict(zip(self.names, out)) if isinstance(params, Mapping) else out), after

    def tangent(self, params, grads, v) -> Tensors:
        """(d d / d g)^T v for each parameter (d: the step direction, theta' = [decay] - lr * d)."""
        if self.kind == "SGD":
            return torch._foreach_mul(list(v), 1 + self.momentum) if self.nesterov and self.momentum else list(v)
        p, g = self._lists(params, grads)
        wd = 0.0 if self.kind == "AdamW" else self.weight_decay
        m, s, _, c1, c2, g = _adam_moments(p, g, self.state, betas=self.betas, weight_decay=wd)
        root = torch._foreach_sqrt(torch._foreach_div(s, c2))
        denom = torch._foreach_add(root, self.eps)
        # d/dg [ (m/c1) / (sqrt(s/c2) + eps) ], with dm/dg = 1 - b1 and d sqrt(s/c2)/dg = (1 - b2) g / (c2 root);
        # where root is 0, s is 0, so g is 0 too and the second term vanishes (root clamped against 0/0)
        dm = torch._foreach_div(torch._foreach_mul(torch._foreach_reciprocal(c1), 1 - self.betas[0]), denom)
        droot = torch._foreach_div(torch._foreach_mul(g, 1 - self.betas[1]),
                                   torch._foreach_mul(torch._foreach_clamp_min(root, 1e-30), c2))
        ratio = torch._foreach_div(torch._foreach_div(m, c1), torch._foreach_mul(denom, denom))
        return torch._foreach_mul(list(v), torch._foreach_sub(dm, torch._foreach_mul(ratio, droot)))


def _val_loss_fn(val_loss, objective: Objective) -> nn.Module:
    """A held-out loss module: the one given, or a new one of that kind on the objective's device (a balanced
    loss's running average lives beside the logits it weighs)."""
    if isinstance(val_loss, nn.Module):
        return val_loss
    return ValidationLoss(objective.num_exits, kind=val_loss).to(_device_of(objective))


def _device_of(objective: Objective) -> torch.device:
    return next(iter(objective.parameters()), torch.empty(0)).device


def check_horizon(horizon: int, method: str, gradient_equilibrium: bool = False) -> None:
    """The one-line errors for meta_horizon (the length check against an epoch is TrainConfig's: it knows the epoch)."""
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"meta_horizon must be an integer >= 1 (virtual steps the hypergradient looks ahead), "
                         f"got {horizon!r}")
    if horizon > 1 and method != "exact":
        raise ValueError(f"meta_horizon {horizon} needs meta_method 'exact' (the finite-difference hypergradient looks "
                         f"one step ahead): add meta_method='exact' (--meta-method exact), or use meta_horizon 1")
    # IMTA's rescaled gradient is no function's gradient: differentiating it again (the second virtual step's
    # dependence on the first) picks up its scales where the forward pass has none (measured: 2% off brute force at 2 steps)
    if horizon > 1 and gradient_equilibrium:
        raise ValueError(f"meta_horizon {horizon} cannot be combined with gradient_equilibrium (its rescaled gradient "
                         f"has no second derivative to unroll through): use meta_horizon 1, or turn "
                         f"gradient_equilibrium off")


def check_method(method: str, gradient_equilibrium: bool) -> None:
    """The finite-difference probes measure each term's own gradient along v, while the step under IMTA's gradient
    equilibrium follows its rescaled gradient: they agree only where the scales act as one diagonal on every term
    (measured on msdnet_cifar_budget in float64: 12% off brute force, where the exact path is within 2e-8)."""
    if gradient_equilibrium and method == "finite_difference":
        raise ValueError("meta_method 'finite_difference' cannot follow gradient_equilibrium's rescaled gradient (its "
                         "probes measure each term's own gradient): add meta_method='exact' (--meta-method exact), or "
                         "turn gradient_equilibrium off; a run begun so is started again in a new folder")


def _check(model, objective, train_batch, val_batch, lr, method, horizon=1):
    if method not in METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; valid: {', '.join(METHODS)}")
    equilibrium = with_gradient_equilibrium(model)  # a walk over the model's modules, at every weight update
    check_horizon(horizon, method, equilibrium)
    check_method(method, equilibrium)
    if not list(objective.parameters()):
        raise ValueError(f"{type(objective).__name__} has fixed weights: nothing to learn "
                         f"(objectives with learned weights: {', '.join(LEARNED)})")
    K = getattr(model, "num_exits", None)
    if K is not None and K != objective.num_exits:
        raise ValueError(f"the model has {K} exits but the objective was built for {objective.num_exits}")
    for name, (x, y) in (("train", train_batch), ("validation", val_batch)):
        if x.shape[0] == 0 or y.shape[0] == 0:
            raise ValueError(f"empty {name} batch: the hypergradient needs at least one sample")
    if not isinstance(lr, torch.Tensor) and lr <= 0:  # a tensor lr is checked where the schedule fills it
        raise ValueError(f"lr must be > 0 (the unrolled step is the method; lr = 0 gives a zero hypergradient), got {lr}")


def _fd_hypergradient(model, objective, params, grads, teacher_logits, train_batch, val_batch, *, step: VirtualStep,
                      val_loss, eps, same_draws: bool = False):
    """Finite-difference hypergradient from an already computed training pass (params and grads: lists aligned
    with step.names; the teachers at theta). Returns (hypergradient, validation logits, (theta', the optimizer's
    state after the step)): the virtual step is the real one, so the caller may apply it.

    same_draws (draws_random_numbers(model), decided outside any compiled region): the two probes replay the same
    random numbers. With dropout or stochastic depth each probe would draw its own masks, and their loss difference,
    divided by the probes' tiny distance, would swamp the hypergradient (swin_t_exits: two seeds' hypergradients
    3.7 times their norm apart).

    Under DDP every rank holds the same theta' (gradients are all-reduced); v and the finite differences
    are averaged across ranks, which gives exactly the single-process result for the global batches."""
    # Under bf16 autocast the probes' difference (about eps of the loss) would drown in bf16 rounding (measured:
    # 1.2 relative error against the exact hypergradient on a small MLP): the passes after the training pass run
    # in float32.
    with torch.autocast(params[0].device.type, enabled=False):
        return _fd_hypergradient_float32(model, objective, params, grads, teacher_logits, train_batch, val_batch,
                                         step=step, val_loss=val_loss, eps=eps, same_draws=same_draws)


def _fd_hypergradient_float32(model, objective, params, grads, teacher_logits, train_batch, val_batch, *, step,
                              val_loss, eps, same_draws):
    teacher_logits = [z.to(params[0].dtype) for z in teacher_logits]  # bf16 from an autocast training pass
    buffers, names = functional_buffers(model), step.names
    with torch.no_grad():
        theta1, after = step.advance(params, grads)
    leaves = [t.requires_grad_(True) for t in theta1]
    xv, yv = val_batch
    val_logits = functional_pass(model, names, leaves, buffers, xv)
    v = _mean_over_ranks([g.detach() for g in torch.autograd.grad(val_loss(val_logits, yv), leaves)])
    if eps is None:  # the classic central-difference step: balances truncation (eps^2) and round-off (u/eps)
        eps = torch.finfo(params[0].dtype).eps ** (1 / 3)
    with torch.no_grad():
        v = step.tangent(params, grads, v)  # the chain rule through the optimizer's step direction
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)).double())
        r = eps / norm.clamp_min(1e-12)
        delta = torch._foreach_mul(v, r.to(v[0].dtype))
        x, y = train_batch

        def probe(theta):
            return objective.term_losses(functional_pass(model, names, theta, buffers, x), y, teacher_logits)
        if same_draws:  # both probes draw the same masks: see _fd_hypergradient
            device = params[0].device
            with torch.random.fork_rng(devices=[torch.cuda.current_device() if device.index is None else device.index]
                                       if device.type == "cuda" else []):
                l_plus = probe(torch._foreach_add(params, delta))
        else:
            l_plus = probe(torch._foreach_add(params, delta))
        l_minus = probe(torch._foreach_sub(params, delta))
        d_w = _mean_over_ranks([-step.lr * objective.scale * (l_plus - l_minus) / (2 * r)])[0]
    hyper = torch.autograd.grad((objective.weights() * d_w.to(objective.weights().dtype)).sum(),
                                list(objective.parameters()))
    theta1 = [t.detach() for t in theta1]
    return hyper, [z.detach() for z in val_logits], (theta1, after)


def _hypergradient(model, objective, train_batch, val_batch, *, step: VirtualStep, val_loss, method, eps,
                   horizon: int = 1):
    """(hypergradient tuple, validation logits at the last virtual theta) from functional passes that leave the
    model's parameters and buffers as they are.

    exact: autograd through `horizon` virtual steps, theta_k+1 = step_k(theta_k), each on the same training batch
    (the batches the real steps will draw are not known yet) with the KD teachers at theta_k and the optimizer's
    state carried on; the validation loss is taken at theta_horizon."""
    trainable = _trainable(model)
    names = step.names or list(trainable)
    params = [trainable[n].detach().requires_grad_(True) for n in names]
    x, y = train_batch
    buffers = functional_buffers(model)
    logits = functional_pass(model, names, params, buffers, x)
    loss = objective(logits, y)
    if method == "exact":
        theta = params
        for k in range(horizon):
            if k:
                loss = objective(functional_pass(model, names, theta, buffers, x), y)
            grads = torch.autograd.grad(loss, theta, create_graph=True)
            theta, step = step.advance(theta, grads)
        xv, yv = val_batch
        # the held-out loss's own gradient at theta': IMTA's scales belong to the training gradient inside theta'
        with gradient_equilibrium_off(model):
            val_logits = functional_pass(model, names, theta, buffers, xv)
            hyper = torch.autograd.grad(val_loss(val_logits, yv), list(objective.parameters()))
        return hyper, [z.detach() for z in val_logits]
    grads = torch.autograd.grad(loss, params)
    return _fd_hypergradient(model, objective, [p.detach() for p in params], list(grads), [z.detach() for z in logits],
                             train_batch, val_batch, step=step, val_loss=val_loss, eps=eps,
                             same_draws=draws_random_numbers(model))[:2]


def hypergradient(model: nn.Module, objective: Objective, train_batch: Batch, val_batch: Batch, *, lr: float,
                  momentum: float = 0.0, weight_decay: float = 0.0, momentum_buffer=None,
                  val_loss: Union[str, nn.Module] = "ce", method: str = "exact",
                  eps: Optional[float] = None, nesterov: bool = False,
                  horizon: int = 1) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """dL_val(theta')/d(objective.parameters()), theta' one virtual step of SGD on L_tr (`horizon` steps on the
    same batch with method "exact").

    A batch is (inputs, targets); val_loss is "ce" (sum of per-exit CE), "balanced" or a
    ValidationLoss; momentum_buffer is None, {parameter name: tensor} or a list aligned with the
    trainable parameters. Returns a tensor (or a tuple if the objective has several parameters).
    The model's parameters and buffers are left exactly as they were."""
    _check(model, objective, train_batch, val_batch, lr, method, horizon)
    step = VirtualStep("SGD", lr, names=list(_trainable(model)), momentum=momentum, nesterov=nesterov,
                       weight_decay=weight_decay, momentum_buffer=_momentum_buffers(model, momentum_buffer))
    hyper, _ = _hypergradient(model, objective, train_batch, val_batch, step=step,
                              val_loss=_val_loss_fn(val_loss, objective), method=method, eps=eps,
                              horizon=horizon)
    return hyper[0] if len(hyper) == 1 else tuple(hyper)


class MetaStep:
    """The loss weights' update: from a training pass already made (its gradients and teacher logits, given by
    step.TrainStep) and a held-out batch, the hypergradient, then a step of the weights' own optimizer (Adam).

    The virtual step is the one the network optimizer would take (VirtualStep.of: SGD with its momentum buffers,
    or Adam/AdamW with their moments and step count), so it mirrors the real update; other optimizers are
    refused. The network update uses the gradient at the weights *before* this weight step (a one-step lag, as in
    DARTS' alternation).

    `horizon` K > 1 (method "exact"): the hypergradient through K virtual steps on the step's training batch, against
    the short-horizon bias of one step (a term whose help shows only after several steps); about K times the cost.

    The weights' Adam runs as the same list arithmetic as the network's (no host sync: its step count stays a
    tensor on the weights' device); its state lives in `optimizer` (a torch.optim.Adam), as checkpoints keep it.
    """

    def __init__(self, model: nn.Module, objective: Objective, *, lr: float = 1e-3, betas=(0.5, 0.999),
                 method: str = "finite_difference", val_loss: Union[str, ValidationLoss] = "balanced",
                 alpha: float = 0.5, eps: Optional[float] = None, check_finite: bool = True,
                 hypergrad_norm: str = "lr", device=None, horizon: int = 1):
        if method not in METHODS:
            raise ValueError(f"unknown hypergradient method {method!r}; valid: {', '.join(METHODS)}")
        equilibrium = with_gradient_equilibrium(model)
        check_horizon(horizon, method, equilibrium)
        check_method(method, equilibrium)
        self.horizon = horizon
        if hypergrad_norm not in HYPERGRAD_NORMS:
            raise ValueError(f"unknown hypergrad_norm {hypergrad_norm!r}; valid: {', '.join(HYPERGRAD_NORMS)}")
        if not lr > 0:
            raise ValueError(f"the weight learning rate (meta_lr) must be > 0, got {lr}")
        # "lr": the hypergradient divided by the network's current lr. It is proportional to that lr (it runs
        # through the virtual step), so without this every lr drop shrinks it tenfold and Adam's second-moment
        # average, still full of the larger values, damps the weight steps for about 1/(1 - beta2) steps.
        self.hypergrad_norm = hypergrad_norm
        # Under DistributedDataParallel the real pass goes through the wrapper (gradient all-reduce) and
        # the functional passes through the wrapped module.
        self.model, self.module = model, getattr(model, "module", model)
        if method == "exact" and self.module is not model:
            raise ValueError("the exact hypergradient is single-process only; use method='finite_difference' with DDP")
        self.objective, self.method, self.eps, self.check_finite = objective, method, eps, check_finite
        self.same_draws = draws_random_numbers(self.module)  # the network's dropout is fixed when it is built
        self.val_loss = val_loss if isinstance(val_loss, nn.Module) else ValidationLoss(
            objective.num_exits, kind=val_loss, alpha=alpha)
        self.val_loss.to(device if device is not None else _device_of(objective))
        self.optimizer = torch.optim.Adam(objective.parameters(), lr=lr, betas=betas)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> Dict:  # the checkpoint's keys since the first runs
        return {"meta_optimizer": self.optimizer.state_dict(), "val_loss": self.val_loss.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.optimizer.load_state_dict(state["meta_optimizer"])
        self.val_loss.load_state_dict(state["val_loss"])

    def parameter_names(self) -> Dict[int, str]:
        """{id(parameter): name} of the network's trainable parameters (for VirtualStep.of)."""
        return {id(p): n for n, p in _trainable(self.module).items()}

    def _adam_step(self, hyper) -> None:
        """Adam on the weights' parameters from the hypergradient, written into self.optimizer's state (created
        on the first step, its step count a tensor beside the parameters)."""
        params = [p for p in self.objective.parameters()]
        prepare_state(self.optimizer, params)
        state = [self.optimizer.state[p] for p in params]
        group = self.optimizer.param_groups[0]
        lists = {k: [s[k] for s in state] for k in ADAM_STATE}
        with torch.no_grad():
            out, after = _adam([p.detach() for p in params], list(hyper), lists, lr=group["lr"], betas=group["betas"],
                               eps=group["eps"], weight_decay=0.0, decoupled=False)
            torch._foreach_copy_(params, out)
            for k in ADAM_STATE:
                torch._foreach_copy_(lists[k], after[k])

    def update(self, train_batch: Batch, val_batch: Batch, logits, grads, step: VirtualStep):
        """One weight update from the training pass at theta (its logits, the KD teachers, and its gradients: a list
        aligned with step.names, or {name: tensor}) and the virtual step the network optimizer will take.
        Returns (hypergradient, the virtual step's (theta', optimizer state after it)), the second None where the
        hypergradient does not compute it (exact)."""
        _check(self.module, self.objective, train_batch, val_batch, step.lr, self.method, self.horizon)
        after = None
        if self.method == "finite_difference":
            trainable = _trainable(self.module)
            params = [trainable[n].detach() for n in step.names]
            grads = [grads[n] for n in step.names] if isinstance(grads, Mapping) else list(grads)
            hyper, val_logits, after = _fd_hypergradient(
                self.module, self.objective, params, grads, [z.detach() for z in logits], train_batch, val_batch,
                step=step, val_loss=self.val_loss, eps=self.eps, same_draws=self.same_draws)
        else:  # the reference path: a second, differentiable training pass (slow, for checks and ablations)
            hyper, val_logits = _hypergradient(self.module, self.objective, train_batch, val_batch, step=step,
                                               val_loss=self.val_loss, method="exact", eps=self.eps,
                                               horizon=self.horizon)
        if self.hypergrad_norm == "lr":
            hyper = [h / step.lr for h in hyper]
        # the check reads the device (a host sync, a branch on data): left out where the step is compiled or captured
        if self.check_finite and not is_tracing() and not all(torch.isfinite(h).all() for h in hyper):
            raise FloatingPointError("non-finite hypergradient: the loss weights were not updated; "
                                     "lower the weight learning rate or the network learning rate")
        self._adam_step(hyper)
        if self.val_loss.kind == "balanced":
            self.val_loss.update(_mean_over_ranks([ce_terms(val_logits, val_batch[1]).detach()])[0])
        return hyper, after

    def step(self, train_batch: Batch, val_batch: Batch, optimizer: torch.optim.Optimizer):
        """A weight update without the network's update (the caller's optimizer.step() follows): for studies
        that drive the weight update by hand. Returns (loss, logits), the gradients left in .grad."""
        optimizer.zero_grad(set_to_none=True)
        logits = self.model(train_batch[0])
        loss = self.objective(logits, train_batch[1])
        loss.backward()
        logits = [z.detach() for z in logits]
        step = VirtualStep.of(optimizer, self.parameter_names())
        trainable = _trainable(self.module)
        grads = [trainable[n].grad if trainable[n].grad is not None else torch.zeros_like(trainable[n])
                 for n in step.names]
        self.update(train_batch, val_batch, logits, grads, step)
        return loss.detach(), logits
