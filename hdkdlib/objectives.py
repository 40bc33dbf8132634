"""Training objectives for multi-exit networks, behind one registry: `build(name, num_exits, **options)`.

Every objective is a weighted sum of per-term losses,

    loss = scale * sum_t w_t * l_t(logits, targets),

where the terms are per-exit cross-entropies `ce{i}` and distillation terms `kd{i}<-{j}`
(student exit i learns from teacher exit j; the teacher is always detached). The weights are
fixed buffers (ce, dbt, imta_kd, dkd) or a positive map of free parameters (hmsdnet, hdbt, hdkd),
so that `objective.parameters()` are exactly the weights the bilevel step learns. Linearity in
w is what makes the bilevel hypergradient cheap (see hdkdlib.bilevel).

  name      terms                                   weights
  ce        CE_i                                    1 (MSDNet)
  dbt       CE_i, soft-CE(last -> i) at annealed T  (1-C), C; whole loss x 2*5/K (Phuong & Lampert)
  imta_kd   CE_i, KL(last -> i) at T                (1-g) and g for i < K, CE_K weight 1 (IMTA)
  dkd       CE_i, KL(j -> i) for every i < j        1 ("NaiveDKD")
  hmsdnet   CE_i                                    learned
  hdbt      dbt's terms                             learned
  hdkd      CE_i, KL(j -> i) for every i < j        learned (HDKD)
"""
from __future__ import annotations

import inspect
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed

WEIGHT_MAPS = ("softmax", "softplus", "softplus_total", "bounded")
INITS = ("dbt", "ds", "uniform", "random")
VALIDATION_LOSSES = ("ce", "balanced")


def is_tracing() -> bool:
    """Checks that need the host (NaN, label range) are skipped while compiling or capturing."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return compiling or capturing


def check_logits(logits: Sequence[torch.Tensor], targets: torch.Tensor, num_exits: int) -> None:
    if len(logits) != num_exits:
        raise ValueError(f"the objective was built for {num_exits} exits but got {len(logits)} logits: "
                         f"build it with num_exits={len(logits)} (model.num_exits)")
    n = targets.shape[0]
    if n == 0:
        raise ValueError("empty batch: the objective needs at least one sample")
    if any(z.shape[0] != n for z in logits):
        raise ValueError(f"logits batch sizes {[z.shape[0] for z in logits]} differ from the {n} targets")
    if not is_tracing():
        c = logits[0].shape[1]
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"targets must lie in [0, {c - 1}] for {c}-class logits; got values in [{lo}, {hi}]")


class Objective(nn.Module):
    """Weighted sum of named loss terms. Subclasses define `term_names` and `term_losses`."""

    def __init__(self, num_exits: int, term_names: List[str], scale: float = 1.0):
        super().__init__()
        if num_exits < 1:
            raise ValueError(f"num_exits must be >= 1, got {num_exits}")
        self.num_exits = num_exits
        self.term_names = term_names
        self.scale = scale
        self.check_inputs = True  # the trainer's captured step turns this off and checks losses itself

    # --- terms --------------------------------------------------------------------------------
    def term_losses(self, logits: Sequence[torch.Tensor], targets: torch.Tensor,
                    teacher_logits: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """Vector of the per-term losses (same order as term_names).

        teacher_logits, when given, replace the teachers of the KD terms (the bilevel finite-difference
        passes keep the teachers computed at the unperturbed parameters)."""
        raise NotImplementedError

    def weights(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: Sequence[torch.Tensor], targets: torch.Tensor, *, return_terms: bool = False,
                teacher_logits: Optional[Sequence[torch.Tensor]] = None):
        if self.check_inputs:
            check_logits(logits, targets, self.num_exits)
        terms = self.term_losses(logits, targets, teacher_logits)
        loss = self.scale * (self.weights() * terms).sum()
        if self.check_inputs and not is_tracing() and not torch.isfinite(loss):
            bad = [n for n, t in zip(self.term_names, terms.detach().tolist()) if not math.isfinite(t)]
            raise FloatingPointError(f"non-finite loss ({loss.item()}); non-finite terms: {bad or 'none (weights?)'}; "
                                     "lower the learning rate or check the inputs")
        return (loss, terms) if return_terms else loss

    def named_weights(self) -> Dict[str, float]:
        return dict(zip(self.term_names, (self.scale * self.weights().detach()).tolist()))

    def fix_weights(self, named: Dict[str, float], source: str = "the given weights") -> None:
        raise ValueError(f"{source} needs a method with learned weights ({', '.join(LEARNED)}), not "
                         f"{type(self).__name__}")

    def freeze(self, source: str = "freezing the weights") -> None:
        """Stop learning the weights and keep them exactly as they are (the no-learning ablation)."""
        self.fix_weights(self.named_weights(), source)  # refused here: the weights are fixed already

    def after_step(self, logits: Sequence[torch.Tensor]) -> None:
        """Called once per real training step (DBT anneals its temperature here)."""

    def state_for_log(self) -> Dict[str, float]:
        """What a training log records of this objective besides its weights (an annealed temperature)."""
        return {}


# --- term helpers ---------------------------------------------------------------------------------
def ce_terms(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """The K exits' mean cross-entropies as one call over [K*N, C] (one kernel where K calls launch K)."""
    K, n = len(logits), targets.shape[0]
    return F.cross_entropy(torch.cat(list(logits)), targets.repeat(K), reduction="none").view(K, n).mean(1)


def dense_pairs(num_exits: int) -> List[Tuple[int, int]]:
    """(student, teacher) 0-based pairs with teacher deeper than student, student-major order."""
    return [(i, j) for i in range(num_exits) for j in range(i + 1, num_exits)]


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, T: float | torch.Tensor) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), 'batchmean' (summed over classes, mean over samples)."""
    log_p = F.log_softmax(teacher.detach() / T, dim=1)
    log_q = F.log_softmax(student / T, dim=1)
    return T * T * (log_p.exp() * (log_p - log_q)).sum(1).mean()


def kd_soft_ce(student: torch.Tensor, teacher: torch.Tensor, T: float | torch.Tensor) -> torch.Tensor:
    """T^2 * cross-entropy between softmax(teacher/T) and softmax(student/T) (DBT's form: KL + teacher entropy)."""
    p = F.softmax(teacher.detach() / T, dim=1)
    return -T * T * (p * F.log_softmax(student / T, dim=1)).sum(1).mean()


def pair_indices(num_exits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """dense_pairs(K) as two index tensors (students, teachers); objectives keep them as buffers, built once."""
    students, teachers = zip(*dense_pairs(num_exits)) if num_exits > 1 else ((), ())
    return torch.tensor(students, dtype=torch.long), torch.tensor(teachers, dtype=torch.long)


def dense_kd_terms(logits: Sequence[torch.Tensor], T: float, teacher_logits=None, pairs=None) -> torch.Tensor:
    """All K(K-1)/2 dense KD terms at once, ordered as dense_pairs(K); `pairs`: pair_indices(K) on the logits'
    device (without it they are built here, a host-to-device copy per call)."""
    K = len(logits)
    teachers = logits if teacher_logits is None else teacher_logits
    # a term is the difference of two sums of about log C each: in float32 at least, outside autocast, whose bf16
    # einsum would leave it 10% off (measured at C = 100)
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    with torch.autocast(logits[0].device.type, enabled=False):
        log_q = F.log_softmax(torch.stack([z.to(dtype) for z in logits]) / T, dim=2)       # students [K, N, C]
        log_p = F.log_softmax(torch.stack([t.detach().to(dtype) for t in teachers]) / T, dim=2)
        p = log_p.exp()
        n = log_q.shape[1]
        neg_entropy = (p * log_p).sum(2).mean(1)                                   # [K] teachers
        cross = torch.einsum("jnc,inc->ij", p, log_q) / n                          # [student i, teacher j]
        si, tj = pairs if pairs is not None else (i.to(log_q.device) for i in pair_indices(K))
        return T * T * (neg_entropy[tj] - cross[si, tj])


# --- weights ---------------------------------------------------------------------------------------
class FixedWeights(Objective):
    def __init__(self, num_exits, term_names, weights: Sequence[float], scale: float = 1.0):
        super().__init__(num_exits, term_names, scale)
        self.register_buffer("_w", torch.tensor(list(weights), dtype=torch.float32))

    def weights(self):
        return self._w


class LearnedWeights(Objective):
    """w = total * softmax(gamma) (default: the weights redistribute a fixed total, which the initialisation
    sets), w = softplus(gamma) (free: the total may grow), or w = total * softplus(gamma) / sum(softplus(gamma))
    ("softplus_total": a fixed total without softmax's exponential competition; Adam's steps in gamma change a
    large weight by a shrinking fraction). All keep every weight positive and let it approach 0.
    "bounded" keeps each weight within a trust region around its start, w = start * (1 + bound * tanh(gamma)),
    bound in (0, 1] (L2W-DEN's form, 1 + eps (w - mean w) with eps 0.8 on CIFAR, made relative): a one-step
    hypergradient that undervalues a term can lower it by at most that fraction."""

    def __init__(self, num_exits, term_names, init_weights: Sequence[float], *, weight_map: str = "softmax",
                 min_init_weight: float = 1e-3, scale: float = 1.0, bound: float = 0.8):
        super().__init__(num_exits, term_names, scale)
        if weight_map not in WEIGHT_MAPS:
            raise ValueError(f"unknown weight_map {weight_map!r}; valid: {', '.join(WEIGHT_MAPS)}")
        self.weight_map = weight_map
        if weight_map == "bounded":
            if not 0 < bound <= 1:
                raise ValueError(f"weight_bound must lie in (0, 1] (the fraction by which a weight may leave its "
                                 f"start), got {bound}")
            self.bound = bound
            self.register_buffer("start", torch.zeros(len(term_names)))
        self.register_buffer("total", torch.zeros(()))
        self.gamma = nn.Parameter(torch.zeros(len(term_names)))
        self.set_weights(init_weights, min_weight=min_init_weight)

    def weights(self):
        if self.weight_map == "bounded":
            return self.start * (1 + self.bound * torch.tanh(self.gamma))
        if self.weight_map == "softmax":
            return self.total * torch.softmax(self.gamma, dim=0)
        w = F.softplus(self.gamma)
        return self.total * w / w.sum() if self.weight_map == "softplus_total" else w

    def fix_weights(self, named: Dict[str, float], source: str = "the given weights") -> None:
        """Set the weights by term name (as `named_weights()` gives them, scale included) and stop learning them:
        the "frozen" ablation. The names must be this objective's terms, in order."""
        if list(named) != self.term_names:
            raise ValueError(f"{source} has terms {list(named)}, this objective {self.term_names}")
        self.set_weights([named[n] / self.scale for n in self.term_names])
        self.gamma.requires_grad_(False)

    def freeze(self, source: str = "freezing the weights") -> None:
        # no round trip through named_weights: exp(log(w)) is not w in every CPU's vector math, and the ablation
        # must train bit for bit as the weights' warm-up does
        self.gamma.requires_grad_(False)

    @torch.no_grad()
    def set_weights(self, weights: Sequence[float], min_weight: float = 1e-12) -> None:
        """Set the parameters so that weights() returns `weights` (each clamped to at least min_weight)."""
        w = torch.tensor(list(weights), dtype=torch.float64).clamp_min(min_weight)
        if len(w) != len(self.gamma):
            raise ValueError(f"{len(w)} weights for {len(self.gamma)} terms ({', '.join(self.term_names)})")
        self.total.fill_(float(w.sum()))
        if self.weight_map == "bounded":  # the trust region is centred on the weights set here
            self.start.copy_(w.to(self.start.dtype))
            self.gamma.zero_()
        elif self.weight_map == "softmax":
            self.gamma.copy_(w.log().to(self.gamma.dtype))
        else:  # softplus(gamma) = w: as it is, or normalised to the total it already has
            self.gamma.copy_(torch.log(torch.expm1(w)).to(self.gamma.dtype))


def initial_weights(init: str, kinds: List[str], C: float = 0.5, generator: torch.Generator | None = None):
    """Starting weights by term kind ('ce', 'kd_last' = KD from the last exit, 'kd' = other KD)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    if init == "dbt":
        return [{"ce": 1 - C, "kd_last": C, "kd": 0.0}[k] for k in kinds]
    if init == "ds":
        return [1.0 if k == "ce" else 0.0 for k in kinds]
    if init == "uniform":
        return [1.0] * len(kinds)
    z = torch.randn(len(kinds), generator=generator, dtype=torch.float64)
    return (len(kinds) * torch.softmax(z, 0)).tolist()  # random shares of the uniform total


def _names(K: int, kd: str) -> Tuple[List[str], List[str]]:
    names = [f"ce{i + 1}" for i in range(K)]
    kinds = ["ce"] * K
    pairs = dense_pairs(K) if kd == "dense" else [(i, K - 1) for i in range(K - 1)] if kd == "last" else []
    names += [f"kd{i + 1}<-{j + 1}" for i, j in pairs]
    kinds += ["kd_last" if j == K - 1 else "kd" for _, j in pairs]
    return names, kinds


# --- the objectives ---------------------------------------------------------------------------------
class _CETerms:
    def term_losses(self, logits, targets, teacher_logits=None):
        return ce_terms(logits, targets)


class _DenseTerms:
    def _init_pairs(self, num_exits):
        students, teachers = pair_indices(num_exits)  # not in the state dict: derived from num_exits
        self.register_buffer("_students", students, persistent=False)
        self.register_buffer("_teachers", teachers, persistent=False)

    def term_losses(self, logits, targets, teacher_logits=None):
        kd = dense_kd_terms(logits, self.temperature, teacher_logits, pairs=(self._students, self._teachers))
        return torch.cat([ce_terms(logits, targets), kd])


class _LastTeacherTerms:
    """CE at every exit and KD from the last exit to each earlier one (DBT: soft-CE, annealed T; IMTA: KL)."""

    def term_losses(self, logits, targets, teacher_logits=None):
        teacher = (logits if teacher_logits is None else teacher_logits)[-1]
        T = self.temperature
        kd = kd_soft_ce if self.kd_form == "soft_ce" else kd_kl
        kd_terms = [kd(z, teacher, T) for z in logits[:-1]]
        return torch.cat([ce_terms(logits, targets), torch.stack(kd_terms)]) if kd_terms else ce_terms(logits, targets)


class _Annealed:
    """DBT's temperature: starts at T0, x`growth` after a step where the last exit's mean max-probability
    at the current T exceeds `threshold`. Kept as a buffer so it is checkpointed and capture-safe."""

    def _init_temperature(self, T0, growth, threshold):
        self.register_buffer("temperature", torch.tensor(float(T0)))
        self.growth, self.threshold = growth, threshold

    def after_step(self, logits):
        with torch.no_grad():
            confidence = F.softmax(logits[-1].detach().float() / self.temperature, dim=1).max(1).values.mean()
            # over the global batch: each rank deciding on its own would let the ranks' temperatures drift apart
            confidence = distributed.mean_over_ranks([confidence])[0]
            self.temperature.mul_(torch.where(confidence > self.threshold, self.growth, 1.0))

    def state_for_log(self) -> Dict[str, float]:
        return {"temperature": float(self.temperature)}


class CESum(_CETerms, FixedWeights):
    def __init__(self, num_exits):
        names, _ = _names(num_exits, "none")
        super().__init__(num_exits, names, [1.0] * num_exits)


class DBT(_Annealed, _LastTeacherTerms, FixedWeights):
    kd_form = "soft_ce"

    def __init__(self, num_exits, C: float = 0.5, temperature: float = 1.0, growth: float = 1.05,
                 threshold: float = 0.5, loss_scale: Optional[float] = None):
        names, kinds = _names(num_exits, "last")
        super().__init__(num_exits, names, initial_weights("dbt", kinds, C),
                         scale=2 * 5 / num_exits if loss_scale is None else loss_scale)
        self._init_temperature(temperature, growth, threshold)


class IMTAKD(_LastTeacherTerms, FixedWeights):
    kd_form = "kl"

    def __init__(self, num_exits, gamma: float = 0.9, temperature: float = 3.0):
        names, kinds = _names(num_exits, "last")
        w = [(1 - gamma) if k == "ce" else gamma for k in kinds]
        w[num_exits - 1] = 1.0  # the last exit has no teacher: plain CE
        super().__init__(num_exits, names, w)
        self.temperature = temperature


class DenseKD(_DenseTerms, FixedWeights):
    def __init__(self, num_exits, temperature: float = 1.0, kd_weight: float = 1.0):
        names, kinds = _names(num_exits, "dense")
        super().__init__(num_exits, names, [1.0 if k == "ce" else kd_weight for k in kinds])
        self.temperature = temperature
        self._init_pairs(num_exits)


class HMSDNet(_CETerms, LearnedWeights):
    def __init__(self, num_exits, init: str = "ds", seed: int = 0, **weight_options):
        names, kinds = _names(num_exits, "none")
        g = torch.Generator().manual_seed(seed)
        super().__init__(num_exits, names, initial_weights(init, kinds, generator=g), **weight_options)


class HDBT(_Annealed, _LastTeacherTerms, LearnedWeights):
    kd_form = "soft_ce"

    def __init__(self, num_exits, init: str = "dbt", seed: int = 0, C: float = 0.5, temperature: float = 1.0,
                 growth: float = 1.05, threshold: float = 0.5, **weight_options):
        names, kinds = _names(num_exits, "last")
        g = torch.Generator().manual_seed(seed)
        super().__init__(num_exits, names, initial_weights(init, kinds, C, g), **weight_options)
        self._init_temperature(temperature, growth, threshold)


class HDKD(_DenseTerms, LearnedWeights):
    def __init__(self, num_exits, init: str = "dbt", seed: int = 0, temperature: float = 1.0, C: float = 0.5,
                 **weight_options):
        names, kinds = _names(num_exits, "dense")
        g = torch.Generator().manual_seed(seed)
        super().__init__(num_exits, names, initial_weights(init, kinds, C, g), **weight_options)
        self.temperature = temperature
        self._init_pairs(num_exits)


_REGISTRY = {"ce": CESum, "dbt": DBT, "imta_kd": IMTAKD, "dkd": DenseKD,
             "hmsdnet": HMSDNet, "hdbt": HDBT, "hdkd": HDKD}
LEARNED = ("hmsdnet", "hdbt", "hdkd")


def accepting(option: str) -> tuple:
    """The objectives whose constructor takes `option` (a run setting that means nothing to the others)."""
    return tuple(n for n, cls in _REGISTRY.items() if option in inspect.signature(cls).parameters)


def with_temperature() -> tuple:
    """The objectives with a KD temperature (the others have no distillation term to soften)."""
    return accepting("temperature")


def weight_matrix(weights: Dict[str, float], num_exits: int) -> np.ndarray:
    """K x K matrix of named term weights (`ce{i}`, `kd{i}<-{j}`): diagonal = CE weight of exit i, (i, j) above it =
    weight of KD from exit j into exit i; NaN where no term exists."""
    m = np.full((num_exits, num_exits), np.nan)
    for name, w in weights.items():
        if name.startswith("ce"):
            i = int(name[2:]) - 1
            m[i, i] = w
        else:
            i, j = (int(v) - 1 for v in name[2:].split("<-"))
            m[i, j] = w
    return m


def names() -> List[str]:
    return list(_REGISTRY)


def build(name: str, num_exits: int, **options) -> Objective:
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; valid names: {', '.join(names())}")
    check_inputs = options.pop("check_inputs", True)  # False: the caller checks the loss itself, off the step
    try:
        objective = _REGISTRY[name](num_exits, **options)
    except TypeError as e:
        raise TypeError(f"objective {name!r}: {e}") from e
    objective.check_inputs = check_inputs
    return objective


# --- validation objectives (outer problem of the bilevel step) ----------------------------------------
class ValidationLoss(nn.Module):
    """L_val on held-out data. kind='ce': sum of per-exit CE. kind='balanced' (docs/method.md, "Leads"):

        alpha * sum_i CE_i + (1 - alpha) * sum_i softplus(CE_i / ema_i - 1)

    where ema_i tracks exit i's validation CE (an exponential moving average, updated by `update`
    after each weight step). The ratio term is scale-free, so every exit gets an equal say however
    large its own loss; the softplus is a soft hinge pushing each exit below its running expectation.
    """

    def __init__(self, num_exits: int, kind: str = "ce", alpha: float = 0.5, ema_momentum: float = 0.9):
        super().__init__()
        if kind not in VALIDATION_LOSSES:
            raise ValueError(f"unknown validation loss {kind!r}; valid: {', '.join(VALIDATION_LOSSES)}")
        self.kind, self.alpha, self.ema_momentum = kind, alpha, ema_momentum
        self.register_buffer("ema", torch.zeros(num_exits))
        self.register_buffer("initialised", torch.tensor(False))

    def forward(self, logits, targets):
        ce = ce_terms(logits, targets)
        if self.kind == "ce":
            return ce.sum()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # The ratio term is nonlinear in CE, so it must see the CE of the global batch: its value is
            # all-reduced, its gradient stays this rank's; averaging the ranks' gradients then gives exactly
            # the single-process gradient.
            world = torch.distributed.get_world_size()
            total = ce.detach().clone()
            torch.distributed.all_reduce(total)
            ce = ce + (total / world - ce.detach())
        ema = torch.where(self.initialised, self.ema, ce.detach())
        ratio = F.softplus(ce / ema - 1.0)
        return self.alpha * ce.sum() + (1 - self.alpha) * ratio.sum()

    @torch.no_grad()
    def update(self, ce_values: torch.Tensor) -> None:
        new = torch.where(self.initialised, self.ema_momentum * self.ema + (1 - self.ema_momentum) * ce_values,
                          ce_values)
        self.ema.copy_(new)
        self.initialised.fill_(True)
