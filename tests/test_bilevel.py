import pytest
import torch
from torch.func import functional_call

from hdkdlib import bilevel, config, models, objectives as O


def _setup(objective="hdkd", seed=0, gradient_equilibrium=False):
    torch.manual_seed(seed)
    model = models.build("toy_mlp", 3, width=8, num_exits=3, batch_norm=True,
                         gradient_equilibrium=gradient_equilibrium).double()
    obj = O.build(objective, 3, init="random", seed=seed).double()
    train = (torch.randn(16, 2, dtype=torch.float64), torch.randint(0, 3, (16,)))
    val = (torch.randn(12, 2, dtype=torch.float64), torch.randint(0, 3, (12,)))
    return model, obj, train, val


def _brute_force(model, obj, train, val, lr, momentum, weight_decay, buf, h=1e-6):
    """Central differences of L_val(theta - lr * (m buf + grad L_tr(theta, w(gamma)) + wd theta)) in gamma."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(gamma):
        with torch.no_grad():
            obj.gamma.copy_(gamma)
        P = {n: p.clone().requires_grad_() for n, p in params.items()}
        state = {**{n: b.clone() for n, b in model.named_buffers()}, **P}
        g = torch.autograd.grad(obj(functional_call(model, state, (train[0],)), train[1]), list(P.values()))
        with torch.no_grad():
            theta = {n: P[n] - lr * ((momentum * buf[n] if buf else 0) + gi + weight_decay * P[n])
                     for n, gi in zip(P, g)}
            out = functional_call(model, {**{n: b.clone() for n, b in model.named_buffers()}, **theta}, (val[0],))
            return O.ce_terms(out, val[1]).sum().item()

    g0 = obj.gamma.detach().clone()
    num = torch.zeros_like(g0)
    for i in range(len(g0)):
        e = torch.zeros_like(g0)
        e[i] = h
        num[i] = (f(g0 + e) - f(g0 - e)) / (2 * h)
    with torch.no_grad():
        obj.gamma.copy_(g0)
    return num


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 1e-2)])
@pytest.mark.parametrize("objective", ["hdkd", "hdbt", "hmsdnet"])
def test_hypergradient_matches_brute_force(objective, momentum, weight_decay):
    model, obj, train, val = _setup(objective)
    lr = 0.1
    buf = {n: 0.1 * torch.randn_like(p) for n, p in model.named_parameters()} if momentum else None
    reference = _brute_force(model, obj, train, val, lr, momentum, weight_decay, buf)
    assert reference.abs().max() > 1e-4  # a real signal, not zero against zero
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method, tol in (("exact", 1e-4), ("finite_difference", 1e-2)):
        hg = bilevel.hypergradient(model, obj, train, val, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                   momentum_buffer=buf, method=method)
        rel = ((hg - reference).norm() / reference.norm()).item()
        assert rel < tol, (method, rel)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and BN buffers untouched


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 1e-2)])
def test_hypergradient_with_gradient_equilibrium_matches_brute_force(momentum, weight_decay):
    # the real step follows IMTA's rescaled gradient (the brute force takes it from the model too); the held-out
    # loss at theta' is what it is, unscaled: the exact path must not apply the scales to its gradient a second time
    model, obj, train, val = _setup("hdkd", gradient_equilibrium=True)
    lr = 0.1
    buf = {n: 0.1 * torch.randn_like(p) for n, p in model.named_parameters()} if momentum else None
    reference = _brute_force(model, obj, train, val, lr, momentum, weight_decay, buf)
    assert reference.abs().max() > 1e-4
    hg = bilevel.hypergradient(model, obj, train, val, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               momentum_buffer=buf, method="exact")
    assert ((hg - reference).norm() / reference.norm()).item() < 1e-4
    assert model.gradient_equilibrium  # switched back on after the held-out pass


def test_finite_differences_are_refused_with_gradient_equilibrium():
    """The probes measure each term's own gradient, the step follows IMTA's rescaled one: on MSDNet (scales on
    some stages only) the finite-difference hypergradient is 12% off brute force. Refused wherever weights are
    learned; CE with gradient equilibrium (no hypergradient) keeps the default meta_method."""
    model, obj, train, val = _setup("hdkd", gradient_equilibrium=True)
    refused = r"meta_method 'finite_difference' cannot follow gradient_equilibrium's rescaled gradient.*" \
              r"add meta_method='exact'"
    with pytest.raises(ValueError, match=refused):
        bilevel.hypergradient(model, obj, train, val, lr=0.1, method="finite_difference")
    with pytest.raises(ValueError, match=refused):
        bilevel.MetaStep(model, obj, method="finite_difference")
    with pytest.raises(ValueError, match=refused):
        config.TrainConfig(method="hdkd", gradient_equilibrium=True).validate()
    config.TrainConfig(method="hdkd", gradient_equilibrium=True, meta_method="exact").validate()
    config.TrainConfig(method="ce", gradient_equilibrium=True).validate()


def test_the_finite_difference_probes_are_not_drowned_by_bf16_autocast():
    """A float32 model trained under bf16 autocast: the probes' loss difference is about eps (5e-3) of the loss,
    which bf16 rounding (8 bits of mantissa) swamps; the probes run in float32, so the hypergradient under bf16 is
    close to the float32 one (bf16 still rounds the training pass: a tolerance, not equality)."""
    torch.manual_seed(0)
    model = models.build("toy_mlp", 10, in_features=32, width=128, num_exits=3, batch_norm=True)
    obj = O.build("hdkd", 3)
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
    val = (torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
    reference = bilevel.hypergradient(model, obj, train, val, lr=0.1, momentum=0.9, method="exact")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = bilevel.hypergradient(model, obj, train, val, lr=0.1, momentum=0.9, method="finite_difference")
    rel = ((under_bf16.float() - reference).norm() / reference.norm()).item()
    assert rel < 0.1, rel  # measured 0.008 here; 1.2 with the probes in bf16


def test_first_order_gives_zero_and_lr_must_be_positive():
    """L_val depends on the weights only through the virtual step, so the hypergradient vanishes with the step:
    it is linear in lr near 0 (first order = zero), and lr = 0 itself is refused."""
    model, obj, train, val = _setup()
    small, smaller = (bilevel.hypergradient(model, obj, train, val, lr=lr) for lr in (1e-6, 1e-9))
    assert small.abs().max() > 0
    torch.testing.assert_close(smaller * 1e3, small, rtol=1e-3, atol=0)
    assert smaller.abs().max() < 1e-6 * max(1.0, small.abs().max().item() * 1e6)
    with pytest.raises(ValueError, match="lr must be > 0"):
        bilevel.hypergradient(model, obj, train, val, lr=0.0)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("with_buffer", [False, True])
def test_virtual_step_equals_torch_sgd(nesterov, with_buffer):
    """The virtual step is what torch.optim.SGD does next, Nesterov or not, first step or later."""
    torch.manual_seed(0)
    params = {"a": torch.randn(5, dtype=torch.float64), "b": torch.randn(2, 3, dtype=torch.float64)}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    real = {n: p.clone().requires_grad_() for n, p in params.items()}
    sgd = torch.optim.SGD(real.values(), lr=0.3, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    if with_buffer:  # one earlier step leaves a momentum buffer
        for p in real.values():
            p.grad = torch.randn_like(p)
        sgd.step()
    buffers = {n: sgd.state[p]["momentum_buffer"].clone() for n, p in real.items()} if with_buffer else {}
    start = {n: p.detach().clone() for n, p in real.items()}
    for n, p in real.items():
        p.grad = grads[n].clone()
    sgd.step()
    virtual = bilevel.virtual_step(start, grads, lr=0.3, momentum=0.9, weight_decay=0.01,
                                   momentum_buffer=buffers, nesterov=nesterov)
    for n in params:
        torch.testing.assert_close(virtual[n], real[n].detach())


def test_momentum_buffer_as_list_equals_dict():
    model, obj, train, val = _setup()
    bufs = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    a = bilevel.hypergradient(model, obj, train, val, lr=0.1, momentum=0.9, momentum_buffer=bufs)
    b = bilevel.hypergradient(model, obj, train, val, lr=0.1, momentum=0.9, momentum_buffer=list(bufs.values()))
    torch.testing.assert_close(a, b)


class PassCounter:
    """Counts forward passes (stage 0 runs once per forward) and backward passes through stage 0."""

    def __init__(self, model):
        self.forward = self.backward = 0
        model.stages[0].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.forward += 1
        if output[0].requires_grad:
            output[0].register_hook(self._count_backward)

    def _count_backward(self, grad):
        self.backward += 1

    @property
    def equivalents(self):
        return self.forward + 2 * self.backward  # a backward costs about two forwards


def test_finite_difference_step_costs_at_most_three_ce_steps_and_reuses_gradients():
    model, obj, train, val = _setup("hdkd")
    model.float(), obj.float()
    train = (train[0].float(), train[1])
    val = (val[0].float(), val[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    counter = PassCounter(model)
    ce = O.build("ce", 3)
    opt.zero_grad()
    ce(model(train[0]), train[1]).backward()
    opt.step()
    ce_cost = counter.equivalents
    assert (counter.forward, counter.backward) == (1, 1)

    # the gradient the network update must use: the training loss at the current weights
    expected = torch.autograd.grad(obj(functional_call(model, {**{n: b.clone() for n, b in model.named_buffers()},
                                                                **dict(model.named_parameters())}, (train[0],)),
                                       train[1]), list(model.parameters()))
    counter.forward = counter.backward = 0
    meta = bilevel.MetaStep(model, obj, lr=0.05, method="finite_difference")
    w_before = obj.weights().detach().clone()
    meta.step(train, val, opt)
    assert (counter.forward, counter.backward) == (4, 2)  # train F+B, val F+B at theta', two perturbed F
    assert counter.equivalents <= 3 * ce_cost
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)  # reused, not recomputed
    assert not torch.allclose(obj.weights(), w_before)
    assert obj.weights().sum().item() == pytest.approx(w_before.sum().item(), rel=1e-5)  # softmax map keeps the total


def test_meta_step_methods_agree_on_first_update():
    updates = {}
    for method in bilevel.METHODS:
        model, obj, train, val = _setup("hdkd")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        meta = bilevel.MetaStep(model, obj, lr=0.01, method=method, val_loss="balanced")
        g0 = obj.gamma.detach().clone()
        meta.step(train, val, opt)
        updates[method] = obj.gamma.detach() - g0
        assert meta.val_loss.initialised.item()
    torch.testing.assert_close(updates["exact"], updates["finite_difference"], rtol=1e-3, atol=1e-6)


def test_bad_inputs():
    model, obj, train, val = _setup()
    with pytest.raises(ValueError, match="fixed weights"):
        bilevel.hypergradient(model, O.build("dkd", 3).double(), train, val, lr=0.1)
    with pytest.raises(ValueError, match="model has 3 exits but the objective was built for 4"):
        bilevel.hypergradient(model, O.build("hdkd", 4).double(), train, val, lr=0.1)
    with pytest.raises(ValueError, match="empty validation batch"):
        bilevel.hypergradient(model, obj, train, (val[0][:0], val[1][:0]), lr=0.1)
    with pytest.raises(ValueError, match="unknown hypergradient method"):
        bilevel.hypergradient(model, obj, train, val, lr=0.1, method="implicit")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = bilevel.MetaStep(model, obj, lr=1e3)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        meta.step(train, val, opt)
    assert torch.isfinite(obj.gamma).all()  # the weights never turn NaN silently


def test_the_meta_step_checks_finiteness_only_outside_compiling_and_its_loss_on_the_objectives_device(monkeypatch):
    """The finiteness check reads the device (a sync, a data-dependent branch that torch.compile(fullgraph=True)
    refuses): skipped while tracing, as the objective's own checks are. A balanced held-out loss made for the
    weights lives on their device (its running average meets the logits there)."""
    model, obj, train, val = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = bilevel.MetaStep(model, obj, lr=1e3)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    monkeypatch.setattr(bilevel, "is_tracing", lambda: True)
    monkeypatch.setattr(O, "is_tracing", lambda: True)  # the objective's own checks too
    meta.step(train, val, opt)  # no host read: nothing raised
    assert not torch.isfinite(obj.gamma).all()
    on_meta = O.build("hdkd", 3).to("meta")
    assert bilevel.MetaStep(model.to("meta"), on_meta).val_loss.ema.device.type == "meta"
    assert bilevel._val_loss_fn("balanced", on_meta).ema.device.type == "meta"


# --- the virtual step mirrors Adam and AdamW (issue 26) ---------------------------------------------------------
def _real_and_virtual(kind, with_state, weight_decay=0.05):
    torch.manual_seed(0)
    params = {"a": torch.randn(5, dtype=torch.float64), "b": torch.randn(2, 3, dtype=torch.float64)}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    grads["a"][0] = 0  # a dead unit: its gradient is 0 at every step, so its second moment is 0 without coupled decay
    real = {n: p.clone().requires_grad_() for n, p in params.items()}
    opt = getattr(torch.optim, kind)(real.values(), lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    for _ in range(3 if with_state else 0):  # earlier steps leave moments and a step count
        for p in real.values():
            p.grad = torch.randn_like(p)
        real["a"].grad[0] = 0
        opt.step()
    start = {n: p.detach().clone() for n, p in real.items()}
    step = bilevel.VirtualStep.of(opt, {id(p): n for n, p in real.items()})
    virtual = step.apply(start, grads)
    for n, p in real.items():
        p.grad = grads[n].clone()
    opt.step()
    return virtual, {n: p.detach() for n, p in real.items()}


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_virtual_step_equals_torch_adam_and_adamw(kind, with_state, weight_decay):
    virtual, real = _real_and_virtual(kind, with_state, weight_decay)
    for n in real:
        torch.testing.assert_close(virtual[n], real[n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["SGD-nesterov", "Adam", "AdamW"])
def test_finite_differences_follow_the_optimizers_step_direction(kind):
    """The finite-difference hypergradient (two forward passes along the step direction's tangent) equals the exact
    one (autograd through the optimizer's differentiable step), with optimizer state from earlier steps."""
    model, obj, train, val = _setup("hdkd")
    if kind == "SGD-nesterov":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    else:
        opt = getattr(torch.optim, kind)(model.parameters(), lr=0.01, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        obj(model(train[0]), train[1]).backward()
        opt.step()
    step = bilevel.VirtualStep.of(opt, {id(p): n for n, p in model.named_parameters()})
    hyper = {method: bilevel._hypergradient(model, obj, train, val, step=step, val_loss=O.ValidationLoss(3, kind="ce"),
                                            method=method, eps=None)[0][0] for method in bilevel.METHODS}
    assert hyper["exact"].abs().max() > 1e-6
    rel = ((hyper["finite_difference"] - hyper["exact"]).norm() / hyper["exact"].norm()).item()
    assert rel < 1e-3, rel


def test_other_optimizers_are_refused_by_name():
    model, obj, train, val = _setup()
    meta = bilevel.MetaStep(model, obj)
    with pytest.raises(ValueError, match=r"mirrors the optimizers SGD, Adam, AdamW .*RMSprop is not supported"):
        meta.step(train, val, torch.optim.RMSprop(model.parameters(), lr=0.01))
    with pytest.raises(ValueError, match="amsgrad and maximize are not supported"):
        meta.step(train, val, torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True))


# --- the hypergradient through K virtual steps (issue 23) --------------------------------------------------------
def _after_real_steps(model, obj, make_opt, opt_state, train, val, gamma, horizon, teachers=None):
    """L_val after `horizon` real optimizer steps on the training batch, from a copy of the model and optimizer;
    with `teachers` (one list of logits per step) the KD terms learn from those instead of the network's own exits.
    Returns (L_val, the exits' logits at each step)."""
    import copy
    net = copy.deepcopy(model)
    with torch.no_grad():
        obj.gamma.copy_(gamma)
    opt = make_opt(net.parameters())
    opt.load_state_dict(copy.deepcopy(opt_state))
    seen = []
    for k in range(horizon):
        opt.zero_grad()
        logits = net(train[0])
        seen.append([z.detach() for z in logits])
        obj(logits, train[1], teacher_logits=None if teachers is None else teachers[k]).backward()
        opt.step()
    obj.zero_grad()
    with torch.no_grad():
        return O.ce_terms(net(val[0]), val[1]).sum().item(), seen


@pytest.mark.parametrize("objective", ["hmsdnet", "hdkd"])
@pytest.mark.parametrize("kind", ["SGD", "Adam"])
@pytest.mark.parametrize("horizon", [1, 3])
def test_k_step_hypergradient_equals_the_derivative_through_k_real_steps(objective, kind, horizon):
    """The exact hypergradient with horizon K is dL_val/dgamma after K steps of the real optimizer (state from
    earlier steps: momentum buffers, Adam's moments and step count) on the same batch, by central differences.
    The KD teachers are constants of each step's gradient, and so of the hypergradient: the reference keeps them at
    their values along the unperturbed steps (how gamma moves later teachers is left out, a stated choice)."""
    import functools
    model, obj, train, val = _setup(objective)
    make = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3) if kind == "SGD" else \
        functools.partial(torch.optim.Adam, lr=0.01, weight_decay=1e-3)
    opt = make(model.parameters())
    for _ in range(2):  # earlier steps leave optimizer state
        opt.zero_grad()
        obj(model(train[0]), train[1]).backward()
        opt.step()
    obj.zero_grad()
    step = bilevel.VirtualStep.of(opt, {id(p): n for n, p in model.named_parameters()})
    hyper = bilevel._hypergradient(model, obj, train, val, step=step, val_loss=O.ValidationLoss(3, kind="ce"),
                                   method="exact", eps=None, horizon=horizon)[0][0]
    g0, h = obj.gamma.detach().clone(), 1e-6
    state = opt.state_dict()
    _, teachers = _after_real_steps(model, obj, make, state, train, val, g0, horizon)
    reference = torch.zeros_like(g0)
    for i in range(len(g0)):
        e = torch.zeros_like(g0)
        e[i] = h
        plus, _ = _after_real_steps(model, obj, make, state, train, val, g0 + e, horizon, teachers)
        minus, _ = _after_real_steps(model, obj, make, state, train, val, g0 - e, horizon, teachers)
        reference[i] = (plus - minus) / (2 * h)
    with torch.no_grad():
        obj.gamma.copy_(g0)
    assert reference.abs().max() > 1e-4
    rel = ((hyper - reference).norm() / reference.norm()).item()
    assert rel < 1e-5, rel


def test_horizon_options_are_checked():
    model, obj, train, val = _setup()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"meta_horizon must be an integer >= 1"):
            bilevel.MetaStep(model, obj, method="exact", horizon=bad)
    with pytest.raises(ValueError, match=r"meta_horizon 2 needs meta_method 'exact'"):
        bilevel.MetaStep(model, obj, method="finite_difference", horizon=2)
    with pytest.raises(ValueError, match=r"meta_horizon 3 needs meta_method 'exact'"):
        bilevel.hypergradient(model, obj, train, val, lr=0.1, method="finite_difference", horizon=3)
    model, obj, train, val = _setup(gradient_equilibrium=True)
    with pytest.raises(ValueError, match=r"meta_horizon 2 cannot be combined with gradient_equilibrium"):
        bilevel.MetaStep(model, obj, method="exact", horizon=2)
    with pytest.raises(ValueError, match=r"meta_horizon 3 cannot be combined with gradient_equilibrium"):
        bilevel.hypergradient(model, obj, train, val, lr=0.1, method="exact", horizon=3)
    with pytest.raises(ValueError, match=r"meta_horizon 2 cannot be combined with gradient_equilibrium"):
        config.TrainConfig(method="hdkd", meta_method="exact", meta_horizon=2, gradient_equilibrium=True).validate()


# --- the exact hypergradient through Adam where a gradient element is exactly zero (issue 36) --------------------
def _with_dead_units(seed=0):
    """_setup's network without BatchNorm (which would recentre every unit) and three first-stage units dead for
    every input: their gradients, and those of the weights they feed, are exactly zero."""
    torch.manual_seed(seed)
    model = models.build("toy_mlp", 3, width=8, num_exits=3).double()
    with torch.no_grad():
        model.stages[0][0].layer[0].bias[:3] = -100.0
    obj = O.build("hdkd", 3, init="random", seed=seed).double()
    train = (torch.randn(16, 2, dtype=torch.float64), torch.randint(0, 3, (16,)))
    val = (torch.randn(12, 2, dtype=torch.float64), torch.randint(0, 3, (12,)))
    return model, obj, train, val


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("with_state", [False, True])
def test_adam_hypergradient_with_dead_units_matches_brute_force(kind, with_state):
    """Where a gradient element is 0 at every step, Adam's second moment is 0 and autograd through its square root
    gave inf * 0 = NaN for every weight. The exact hypergradient is finite there and is dL_val/dgamma after the
    real optimizer's step, by central differences; so is the finite-difference one (its tangent divides by the
    root). Adam without weight decay, as coupled decay would make every gradient element non-zero; AdamW with it."""
    import functools
    model, obj, train, val = _with_dead_units()
    # Adam's first step is about g / (|g| + eps), nearly sign(g), whose slope in gamma is about eps / g^2: at eps
    # 1e-8 the hypergradient (1e-7) drowns in the central differences' round-off, so the first step takes eps 1e-3
    make = functools.partial(getattr(torch.optim, kind), lr=0.01, weight_decay=1e-2 if kind == "AdamW" else 0.0,
                             eps=1e-8 if with_state else 1e-3)
    opt = make(model.parameters())
    for _ in range(2 if with_state else 0):  # earlier steps leave moments, zero where the units are dead
        opt.zero_grad()
        obj(model(train[0]), train[1]).backward()
        opt.step()
    obj.zero_grad()
    grads = torch.autograd.grad(obj(model(train[0]), train[1]), list(model.parameters()))
    assert any((g == 0).any() for g in grads)  # the case itself: gradient elements exactly zero
    if with_state:
        assert any((opt.state[p]["exp_avg_sq"] == 0).any() for p in model.parameters())
    step = bilevel.VirtualStep.of(opt, {id(p): n for n, p in model.named_parameters()})
    hyper = {method: bilevel._hypergradient(model, obj, train, val, step=step, val_loss=O.ValidationLoss(3, kind="ce"),
                                            method=method, eps=None)[0][0] for method in bilevel.METHODS}
    g0, h = obj.gamma.detach().clone(), 1e-6
    state = opt.state_dict()
    _, teachers = _after_real_steps(model, obj, make, state, train, val, g0, 1)
    reference = torch.zeros_like(g0)
    for i in range(len(g0)):
        e = torch.zeros_like(g0)
        e[i] = h
        plus, _ = _after_real_steps(model, obj, make, state, train, val, g0 + e, 1, teachers)
        minus, _ = _after_real_steps(model, obj, make, state, train, val, g0 - e, 1, teachers)
        reference[i] = (plus - minus) / (2 * h)
    with torch.no_grad():
        obj.gamma.copy_(g0)
    assert reference.abs().max() > 1e-4  # a real signal, not zero against zero
    # the reference's round-off, 1e-16 * L_val / h = 1e-10 against a signal of 1e-4, bounds the agreement to about
    # 1e-6: exact within 1e-5; finite differences add their own O(eps^2) truncation and round-off (1e-3, as above)
    for method, tol in (("exact", 1e-5), ("finite_difference", 1e-3)):
        assert torch.isfinite(hyper[method]).all(), (method, hyper[method])
        rel = ((hyper[method] - reference).norm() / reference.norm()).item()
        assert rel < tol, (method, rel)
    # the case end to end: the weight update refused the NaN (FloatingPointError) and learnt nothing
    bilevel.MetaStep(model, obj, lr=0.01, method="exact").step(train, val, opt)
    assert torch.isfinite(obj.gamma).all() and not torch.equal(obj.gamma.detach(), g0)


def test_finite_difference_probes_of_a_network_with_dropout_draw_the_same_masks():
    """Each probe drawing its own dropout masks turned their loss difference, divided by the probes' tiny distance,
    into noise (150-1,000 times the hypergradient's norm). With the probes' draws replayed, two seeds differ only
    by their masks in the training and held-out passes (2% here: a tolerance, since the masks are not the same)
    and agree with the exact hypergradient as closely."""
    torch.manual_seed(0)
    model = models.build("toy_mlp", 3, width=16, num_exits=3).double()
    model.stages[1][0].layer.append(torch.nn.Dropout(0.2))
    obj = O.build("hdkd", 3, init="random", seed=0).double()
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(64, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g))
    val = (torch.randn(64, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g))
    assert bilevel.MetaStep(model, obj).same_draws
    assert not bilevel.MetaStep(models.build("toy_mlp", 3, width=16, num_exits=3), O.build("hdkd", 3)).same_draws
    hyper = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        hyper.append(bilevel.hypergradient(model, obj, train, val, lr=0.1, method="finite_difference"))
    exact = bilevel.hypergradient(model, obj, train, val, lr=0.1, method="exact")
    assert ((hyper[0] - hyper[1]).norm() / exact.norm()).item() < 0.1
    assert ((hyper[0] - exact).norm() / exact.norm()).item() < 0.1
