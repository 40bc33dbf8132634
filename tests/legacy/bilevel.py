"""The training step as it was before the sync-free rewrite (commit 3a5b9cc), kept only as the oracle that
tests/test_step.py compares the new step against. Not imported by the library."""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.func import functional_call

from hdkdlib.distributed import mean_over_ranks as _mean_over_ranks
from hdkdlib.objectives import LEARNED, Objective, ValidationLoss, ce_terms

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


Batch = Tuple[torch.Tensor, torch.Tensor]


def _trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _cloned_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def _call(model, params, buffers, x):
    return functional_call(model, {**buffers, **params}, (x,), tie_weights=False, strict=False)


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


def virtual_step(params: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], *, lr: float, momentum: float,
                 weight_decay: float, momentum_buffer: Dict[str, Optional[torch.Tensor]],
                 nesterov: bool = False) -> Dict[str, torch.Tensor]:
    """theta' as torch.optim.SGD (dampening 0, with or without Nesterov) would compute it; differentiable in grads."""
    return _sgd_update(params, grads, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       momentum_buffer=momentum_buffer, nesterov=nesterov)[0]


def _sgd_update(params, grads, *, lr, momentum, weight_decay, momentum_buffer, nesterov):
    """(theta', the momentum buffers SGD holds after the step)."""
    out, buffers = {}, {}
    for n, p in params.items():
        d = grads[n]
        if weight_decay:
            d = d + weight_decay * p
        buf = momentum_buffer.get(n)
        if momentum:
            new_buf = d if buf is None else momentum * buf + d  # SGD's first step starts the buffer at d
            buffers[n] = new_buf
            d = d + momentum * new_buf if nesterov else new_buf
        out[n] = p - lr * d
    return out, buffers


def adam_virtual_step(params: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], *, lr: float, betas=(0.9, 0.999),
                      eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False,
                      state: Optional[Dict[str, Dict]] = None) -> Dict[str, torch.Tensor]:
    """theta' as torch.optim.Adam (decoupled=False: weight decay added to the gradient) or AdamW (decoupled: the
    parameter shrunk by lr * wd) would compute it from its state {name: {step, exp_avg, exp_avg_sq}} (empty: the
    first step); differentiable in grads."""
    return _adam_update(params, grads, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                        state=state)[0]


def _adam_update(params, grads, *, lr, betas, eps, weight_decay, decoupled, state):
    """(theta', the state {name: {step, exp_avg, exp_avg_sq}} Adam or AdamW holds after the step)."""
    out, new_state = {}, {}
    for n, p in params.items():
        m, v, t = _adam_moments(n, p, grads[n], betas=betas, weight_decay=0.0 if decoupled else weight_decay, state=state)
        c1, c2 = 1 - betas[0] ** t, 1 - betas[1] ** t
        base = p * (1 - lr * weight_decay) if decoupled and weight_decay else p
        out[n] = base - lr * (m / c1) / ((v / c2).sqrt() + eps)
        new_state[n] = {"step": t, "exp_avg": m, "exp_avg_sq": v}
    return out, new_state


def _adam_moments(name, p, g, *, betas, weight_decay, state):
    s = (state or {}).get(name) or {}
    g = g + weight_decay * p if weight_decay else g
    m0, v0 = s.get("exp_avg"), s.get("exp_avg_sq")
    t = int(s["step"]) + 1 if "step" in s else 1
    m = (betas[0] * m0 if m0 is not None else 0) + (1 - betas[0]) * g
    v = (betas[1] * v0 if v0 is not None else 0) + (1 - betas[1]) * g * g
    return m, v, t


class VirtualStep:
    """One step of the network's optimizer as a function of the gradient, theta' = theta - lr * d(g): SGD (momentum,
    Nesterov, weight decay), Adam or AdamW, read from the optimizer's settings and state. `apply` gives theta'
    (differentiable in the gradient, for the exact hypergradient); `tangent` gives (dd/dg)^T v, the direction
    along which the finite differences probe the training terms (SGD: v itself, times 1 + momentum with
    Nesterov; Adam: v times the elementwise derivative of its normalised step)."""
    KINDS = ("SGD", "Adam", "AdamW")

    def __init__(self, kind: str, lr: float, *, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, momentum_buffer=None, betas=(0.9, 0.999), eps: float = 1e-8, state=None):
        if kind not in self.KINDS:
            raise ValueError(f"the bilevel step mirrors {', '.join(self.KINDS)}; got {kind}")
        self.kind, self.lr, self.momentum, self.nesterov = kind, lr, momentum, nesterov
        self.weight_decay, self.momentum_buffer, self.betas, self.eps, self.state = \
            weight_decay, momentum_buffer or {}, tuple(betas), eps, state or {}

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, names: Dict[int, str]) -> "VirtualStep":
        """The step `optimizer` would take next; names maps id(parameter) to the parameter's name."""
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
        state = {names[id(p)]: optimizer.state.get(p, {}) for g in optimizer.param_groups for p in g["params"]
                 if id(p) in names}
        if kind == "SGD":
            return cls(kind, group["lr"], momentum=group.get("momentum", 0.0), nesterov=bool(group.get("nesterov")),
                       weight_decay=group.get("weight_decay", 0.0),
                       momentum_buffer={n: s.get("momentum_buffer") for n, s in state.items()})
        return cls(kind, group["lr"], weight_decay=group.get("weight_decay", 0.0), betas=group["betas"],
                   eps=group["eps"], state=state)

    def apply(self, params, grads) -> Dict[str, torch.Tensor]:
        return self.advance(params, grads)[0]

    def advance(self, params, grads) -> Tuple[Dict[str, torch.Tensor], "VirtualStep"]:
        """(theta', the step after it): the optimizer's state (momentum buffers, Adam's moments and step count)
        carried on, differentiable, for a hypergradient through several virtual steps (at this lr)."""
        if self.kind == "SGD":
            out, buffers = _sgd_update(params, grads, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                       momentum_buffer=self.momentum_buffer, nesterov=self.nesterov)
            return out, VirtualStep("SGD", self.lr, momentum=self.momentum, nesterov=self.nesterov,
                                    weight_decay=self.weight_decay, momentum_buffer=buffers)
        out, state = _adam_update(params, grads, lr=self.lr, betas=self.betas, eps=self.eps,
                                  weight_decay=self.weight_decay, decoupled=self.kind == "AdamW", state=self.state)
        return out, VirtualStep(self.kind, self.lr, weight_decay=self.weight_decay, betas=self.betas, eps=self.eps,
                                state=state)

    def tangent(self, params, grads, v):
        """(d d / d g)^T v for each parameter (d: the step direction, theta' = [decay] - lr * d)."""
        if self.kind == "SGD":
            return [u * (1 + self.momentum) if self.nesterov and self.momentum else u for u in v]
        out = []
        wd = 0.0 if self.kind == "AdamW" else self.weight_decay
        for (n, p), u in zip(params.items(), v):
            m, s, t = _adam_moments(n, p, grads[n], betas=self.betas, weight_decay=wd, state=self.state)
            c1, c2 = 1 - self.betas[0] ** t, 1 - self.betas[1] ** t
            g = grads[n] + wd * p if wd else grads[n]
            root = (s / c2).sqrt()
            denom = root + self.eps
            # d/dg [ (m/c1) / (sqrt(s/c2) + eps) ], with dm/dg = 1 - b1 and d sqrt(s/c2)/dg = (1 - b2) g / (c2 root)
            dm = (1 - self.betas[0]) / c1 / denom
            droot = torch.where(root > 0, (1 - self.betas[1]) * g / (c2 * root.clamp_min(1e-30)), torch.zeros_like(g))
            out.append(u * (dm - (m / c1) / denom ** 2 * droot))
        return out


def _val_loss_fn(val_loss, num_exits) -> nn.Module:
    if isinstance(val_loss, nn.Module):
        return val_loss
    return ValidationLoss(num_exits, kind=val_loss)


def check_horizon(horizon: int, method: str) -> None:
    """The one-line errors for meta_horizon (the length check against an epoch is TrainConfig's: it knows the epoch)."""
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"meta_horizon must be an integer >= 1 (virtual steps the hypergradient looks ahead), "
                         f"got {horizon!r}")
    if horizon > 1 and method != "exact":
        raise ValueError(f"meta_horizon {horizon} needs meta_method 'exact' (the finite-difference hypergradient looks "
                         f"one step ahead): add meta_method='exact' (--meta-method exact), or use meta_horizon 1")


def _check(model, objective, train_batch, val_batch, lr, method, horizon=1):
    if method not in METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; valid: {', '.join(METHODS)}")
    check_horizon(horizon, method)
    if not list(objective.parameters()):
        raise ValueError(f"{type(objective).__name__} has fixed weights: nothing to learn "
                         f"(objectives with learned weights: {', '.join(LEARNED)})")
    K = getattr(model, "num_exits", None)
    if K is not None and K != objective.num_exits:
        raise ValueError(f"the model has {K} exits but the objective was built for {objective.num_exits}")
    for name, (x, y) in (("train", train_batch), ("validation", val_batch)):
        if x.shape[0] == 0 or y.shape[0] == 0:
            raise ValueError(f"empty {name} batch: the hypergradient needs at least one sample")
    if lr <= 0:
        raise ValueError(f"lr must be > 0 (the unrolled step is the method; lr = 0 gives a zero hypergradient), got {lr}")


def _fd_hypergradient(model, objective, params, grads, teacher_logits, train_batch, val_batch, *, step: VirtualStep,
                      val_loss, eps):
    """Finite-difference hypergradient from an already computed training pass (grads, teachers at theta).

    Under DDP every rank holds the same theta' (gradients are all-reduced); v and the finite differences
    are averaged across ranks, which gives exactly the single-process result for the global batches."""
    buffers, lr = _cloned_buffers(model), step.lr
    with torch.no_grad():
        theta1 = step.apply(params, grads)
    theta1 = {n: t.requires_grad_(True) for n, t in theta1.items()}
    xv, yv = val_batch
    val_logits = _call(model, theta1, buffers, xv)
    lv = val_loss(val_logits, yv)
    v = _mean_over_ranks([g.detach() for g in torch.autograd.grad(lv, list(theta1.values()))])
    with torch.no_grad():
        v = step.tangent(params, grads, v)  # the chain rule through the optimizer's step direction
    if eps is None:  # the classic central-difference step: balances truncation (eps^2) and round-off (u/eps)
        eps = torch.finfo(next(iter(params.values())).dtype).eps ** (1 / 3)
    with torch.no_grad():
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v))
        step = eps / norm.clamp_min(1e-12)
        x, y = train_batch
        plus = {n: p.detach() + step * g for (n, p), g in zip(params.items(), v)}
        minus = {n: p.detach() - step * g for (n, p), g in zip(params.items(), v)}
        l_plus = objective.term_losses(_call(model, plus, buffers, x), y, teacher_logits)
        l_minus = objective.term_losses(_call(model, minus, buffers, x), y, teacher_logits)
        d_w = _mean_over_ranks([-lr * objective.scale * (l_plus - l_minus) / (2 * step)])[0]
    hyper = torch.autograd.grad((objective.weights() * d_w.to(objective.weights().dtype)).sum(),
                                list(objective.parameters()))
    return hyper, [z.detach() for z in val_logits]


def _hypergradient(model, objective, train_batch, val_batch, *, step: VirtualStep, val_loss, method, eps,
                   horizon: int = 1):
    """(hypergradient tuple, validation logits at the last virtual theta) from functional passes on cloned state.

    exact: autograd through `horizon` virtual steps, theta_k+1 = step_k(theta_k), each on the same training batch
    (the batches the real steps will draw are not known yet) with the KD teachers at theta_k and the optimizer's
    state carried on; the validation loss is taken at theta_horizon."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in _trainable(model).items()}
    x, y = train_batch
    buffers = _cloned_buffers(model)
    logits = _call(model, params, buffers, x)
    loss = objective(logits, y)
    if method == "exact":
        theta = params
        for k in range(horizon):
            if k:
                loss = objective(_call(model, theta, buffers, x), y)
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
            theta, step = step.advance(theta, dict(zip(theta, grads)))
        xv, yv = val_batch
        val_logits = _call(model, theta, _cloned_buffers(model), xv)
        hyper = torch.autograd.grad(val_loss(val_logits, yv), list(objective.parameters()))
        return hyper, [z.detach() for z in val_logits]
    grads = torch.autograd.grad(loss, list(params.values()))
    return _fd_hypergradient(model, objective, params, dict(zip(params, grads)), [z.detach() for z in logits],
                             train_batch, val_batch, step=step, val_loss=val_loss, eps=eps)


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
    step = VirtualStep("SGD", lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                       momentum_buffer=_momentum_buffers(model, momentum_buffer))
    hyper, _ = _hypergradient(model, objective, train_batch, val_batch, step=step,
                              val_loss=_val_loss_fn(val_loss, objective.num_exits), method=method, eps=eps,
                              horizon=horizon)
    return hyper[0] if len(hyper) == 1 else tuple(hyper)


class MetaStep:
    """The loss weights' update: from a training pass already made (its gradients and teacher logits, given by
    step.train_step) and a held-out batch, the hypergradient, then a step of the weights' own optimizer (Adam).

    The virtual step is the one the network optimizer would take (VirtualStep.of: SGD with its momentum buffers,
    or Adam/AdamW with their moments and step count), so it mirrors the real update; other optimizers are
    refused. The network update uses the gradient at the weights *before* this weight step (a one-step lag, as in
    DARTS' alternation).

    `horizon` K > 1 (method "exact"): the hypergradient through K virtual steps on the step's training batch, against
    the short-horizon bias of one step (a term whose help shows only after several steps); about K times the cost.
    """

    def __init__(self, model: nn.Module, objective: Objective, *, lr: float = 1e-3, betas=(0.5, 0.999),
                 method: str = "finite_difference", val_loss: Union[str, ValidationLoss] = "balanced",
                 alpha: float = 0.5, eps: Optional[float] = None, check_finite: bool = True,
                 hypergrad_norm: str = "lr", device=None, horizon: int = 1):
        if method not in METHODS:
            raise ValueError(f"unknown hypergradient method {method!r}; valid: {', '.join(METHODS)}")
        check_horizon(horizon, method)
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
        self.val_loss = val_loss if isinstance(val_loss, nn.Module) else ValidationLoss(
            objective.num_exits, kind=val_loss, alpha=alpha)
        if device is not None:
            self.val_loss.to(device)
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

    def update(self, train_batch: Batch, val_batch: Batch, logits, grads: Dict[str, torch.Tensor],
               step: VirtualStep):
        """One weight update from the training pass at theta (its logits, the KD teachers, and its gradients
        {name: tensor}) and the virtual step the network optimizer will take; returns the hypergradient."""
        _check(self.module, self.objective, train_batch, val_batch, step.lr, self.method, self.horizon)
        if self.method == "finite_difference":
            params = {n: p.detach() for n, p in _trainable(self.module).items()}
            hyper, val_logits = _fd_hypergradient(
                self.module, self.objective, params, grads, [z.detach() for z in logits], train_batch, val_batch,
                step=step, val_loss=self.val_loss, eps=self.eps)
        else:  # the reference path: a second, differentiable training pass (slow, for checks and ablations)
            hyper, val_logits = _hypergradient(self.module, self.objective, train_batch, val_batch, step=step,
                                               val_loss=self.val_loss, method="exact", eps=self.eps,
                                               horizon=self.horizon)
        self.optimizer.zero_grad(set_to_none=True)
        if self.hypergrad_norm == "lr":
            hyper = [h / step.lr for h in hyper]
        for p, h in zip(self.objective.parameters(), hyper):
            if self.check_finite and not torch.isfinite(h).all():
                raise FloatingPointError("non-finite hypergradient: the loss weights were not updated; "
                                         "lower the weight learning rate or the network learning rate")
            p.grad = h
        self.optimizer.step()
        if self.val_loss.kind == "balanced":
            self.val_loss.update(_mean_over_ranks([ce_terms(val_logits, val_batch[1]).detach()])[0])
        return hyper

    def step(self, train_batch: Batch, val_batch: Batch, optimizer: torch.optim.Optimizer):
        """step.train_step without the network's update (the caller's optimizer.step() follows): for studies
        that drive the weight update by hand. Returns (loss, logits), the gradients left in .grad."""
        from .step import backward_pass, network_gradients  # here, not on top: step.py imports this module
        loss, logits = backward_pass(self.model, self.objective, *train_batch, optimizer)
        step = VirtualStep.of(optimizer, self.parameter_names())
        self.update(train_batch, val_batch, logits, network_gradients(self.module), step)
        return loss, logits
