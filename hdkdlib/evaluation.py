"""Evaluation of multi-exit networks (docs/method.md, "Evaluation protocols").

  anytime      top-1 / top-5 of every exit on a split, against each exit's cumulative cost
  budgeted     MSDNet's budgeted batch classification: thresholds fitted on validation, applied to test
  apply_thresholds   the same for thresholds a user picks
  early_exit_predict real early exit: runs exit by exit and only continues with the samples still running
  network_results    what a run records of its network (anytime, budgeted in FLOPs and ms)

Everything here computes and returns numbers; files are the run folder's business.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import cost, runinfo
from .distributed import gather_rows, sum_over_ranks
from .models import evaluating


# --- predictions ----------------------------------------------------------------------------------------
def predict(model, batches: Iterable, *, dtype=torch.float32):
    """Softmax probabilities of every exit: ([K, N, C] on the CPU, targets [N]). A loader sharded across ranks
    (`batches.sharded`) gives every rank the whole split, gathered in order: the same as one process."""
    probs, targets = [], []
    with evaluating(model):
        for x, y in batches:
            probs.append(torch.stack([F.softmax(z.float(), 1) for z in model(x)]).to("cpu", dtype))
            targets.append(y.cpu())
    if not probs:
        raise ValueError("empty split: no batches to evaluate")
    probs, targets = torch.cat(probs, 1), torch.cat(targets)
    if getattr(batches, "sharded", False):
        probs, targets = gather_rows(probs, dim=1), gather_rows(targets)
    return probs, targets


def leading_inputs(batches: Iterable, n: int) -> torch.Tensor:
    """The inputs of a split's first n samples (0: all), reading only the batches that hold them: ImageNet's
    50,000 test images as one float tensor would take 30 GB."""
    if n < 0:
        raise ValueError(f"the number of samples to take must be >= 0 (0: all of the split), got {n}")
    parts, count = [], 0
    for x, _ in batches:
        parts.append(x)
        count += len(x)
        if 0 < n <= count:  # before the loader decodes another batch
            break
    if not parts:
        raise ValueError("empty split: no batches to take inputs from")
    return torch.cat(parts)[:n] if n > 0 else torch.cat(parts)


def top5_hits(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[K, N, 5] booleans: whether each exit's i-th ranked class (by logits or probabilities [K, N, C]) is the
    target; column 0 gives top-1, any over the columns top-5 (top-C when there are fewer than 5 classes)."""
    return scores.topk(min(5, scores.shape[-1]), dim=2).indices == targets.view(1, -1, 1)


def per_exit_metrics(model, batches: Iterable) -> Dict[str, List[float]]:
    """Per-exit mean CE loss, top-1 and top-5 accuracy (fractions), streamed batch by batch (summed over ranks
    when the loader is sharded across them)."""
    loss = top1 = top5 = None
    n = 0
    with evaluating(model):
        for x, y in batches:
            logits = torch.stack([z.float() for z in model(x)])                      # [K, B, C]
            ce = torch.stack([F.cross_entropy(z, y, reduction="sum") for z in logits])
            hit = top5_hits(logits, y)
            c1, c5 = hit[..., 0].sum(1), hit.any(2).sum(1)
            loss, top1, top5 = (ce, c1, c5) if loss is None else (loss + ce, top1 + c1, top5 + c5)
            n += len(y)
    if n == 0:
        raise ValueError("empty split: no batches to evaluate")
    if getattr(batches, "sharded", False):
        total = torch.tensor(n, device=loss.device)
        loss, top1, top5, total = sum_over_ranks([loss, top1, top5, total])
        n = int(total)
    return {"loss": (loss / n).tolist(), "top1": (top1.double() / n).tolist(), "top5": (top5.double() / n).tolist()}


def _as_tensors(probs, targets):
    """Tensors, numpy arrays and nested lists alike: converted once, at the door."""
    probs = probs if torch.is_tensor(probs) else torch.as_tensor(np.asarray(probs, dtype=np.float64))
    targets = targets if torch.is_tensor(targets) else torch.as_tensor(np.asarray(targets, dtype=np.int64))
    return probs, targets


def _check_probs(probs: torch.Tensor, targets: torch.Tensor, name: str):
    if probs.dim() != 3:
        raise ValueError(f"{name}_probs must be [K, N, C] softmax outputs, got shape {list(probs.shape)}")
    if probs.shape[1] == 0:
        raise ValueError(f"empty {name} split: {name}_probs has no samples")
    if targets.shape != (probs.shape[1],):
        raise ValueError(f"{name}_targets shaped {list(targets.shape)} for {probs.shape[1]} samples")
    C = probs.shape[2]
    if targets.is_floating_point() or int(targets.min()) < 0 or int(targets.max()) >= C:
        raise ValueError(f"{name}_targets must be class indices 0..{C - 1} for {C} classes, got "
                         f"{targets.dtype} from {targets.min().item()} to {targets.max().item()}: a label outside "
                         "the classes would count as a miss")
    sums = probs.sum(2)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3) or (probs < 0).any():
        worst = (sums - 1).abs().max().item()
        raise ValueError(f"{name}_probs are not probabilities (rows sum to one within {worst:.3g} only, or "
                         "negative entries): pass softmax outputs, not logits")


def anytime(probs: torch.Tensor, targets: torch.Tensor, exit_flops: Optional[Sequence[float]] = None) -> List[Dict]:
    """One row per exit: exit, top1, top5 (fractions) and, if given, its cumulative flops."""
    probs, targets = _as_tensors(probs, targets)
    _check_probs(probs, targets, "test")
    if exit_flops is not None and len(exit_flops) != probs.shape[0]:
        raise ValueError(f"{probs.shape[0]} exits but {len(exit_flops)} exit_flops")
    hit = top5_hits(probs, targets)
    rows = []
    for k in range(probs.shape[0]):
        row = {"exit": k + 1, "top1": hit[k, :, 0].double().mean().item(), "top5": hit[k].any(1).double().mean().item()}
        if exit_flops is not None:
            row["flops"] = float(exit_flops[k])
        rows.append(row)
    return rows


# --- budgeted batch classification ----------------------------------------------------------------------
def exit_shares(p: float, num_exits: int) -> torch.Tensor:
    """Target share of samples leaving at exit k, proportional to p^k (k = 1..K), normalised."""
    try:  # MSDNet's arithmetic, so thresholds match its code to the last bit wherever p^K is a float
        share = torch.tensor([p ** k for k in range(1, num_exits + 1)], dtype=torch.float64)
        if not torch.isfinite(share.sum()):
            raise OverflowError
    except OverflowError:  # a huge p: the same ratios as p^(k-K), which cannot overflow when p > 1
        share = torch.tensor([p ** (k - num_exits) for k in range(1, num_exits + 1)], dtype=torch.float64)
    return share / share.sum()


def fit_thresholds(val_probs: torch.Tensor, shares: torch.Tensor) -> List[float]:
    """MSDNet's rule: for exit k < K, among the samples no earlier exit took, T_k is the confidence of the
    floor(N * share_k)-th most confident one (none exit: T_k = inf); the last exit takes the rest (-inf)."""
    K, N, _ = val_probs.shape
    conf = val_probs.max(2).values.double()                                  # [K, N]
    taken = torch.zeros(N, dtype=torch.bool)
    thresholds = []
    for k in range(K - 1):
        out_n = math.floor(N * shares[k].item())
        remaining = conf[k][~taken]
        t = math.inf
        if 1 <= out_n <= len(remaining):
            t = remaining.topk(out_n).values[-1].item()
        thresholds.append(t)
        taken |= conf[k] >= t
    return thresholds + [-math.inf]


def check_thresholds(thresholds: Sequence[float], K: int) -> None:
    if len(thresholds) != K:
        raise ValueError(f"{K} exits but {len(thresholds)} thresholds")
    if any(math.isnan(float(t)) for t in thresholds):
        raise ValueError(f"thresholds {list(thresholds)} hold a NaN, which no confidence reaches: give each exit a "
                         "number (inf: nobody leaves there)")


def apply_thresholds(probs: torch.Tensor, targets: torch.Tensor, thresholds: Sequence[float],
                     exit_flops: Sequence[float]) -> Dict:
    """Each sample leaves at the first exit whose confidence (max probability) reaches its threshold;
    the last exit takes whatever is left. Accuracy, exit fractions and expected flops per sample."""
    probs, targets = _as_tensors(probs, targets)
    _check_probs(probs, targets, "test")
    K, N, _ = probs.shape
    if len(thresholds) != K or len(exit_flops) != K:
        raise ValueError(f"{K} exits but {len(thresholds)} thresholds and {len(exit_flops)} exit_flops")
    check_thresholds(thresholds, K)
    conf, pred = probs.max(2)
    t = torch.tensor(list(thresholds[:-1]) + [-math.inf], dtype=torch.float64).view(K, 1)
    leaves = conf.double() >= t
    exit_index = leaves.to(torch.int8).argmax(0)                              # the first exit that takes it
    correct = pred.gather(0, exit_index.view(1, -1)).squeeze(0) == targets
    fractions = torch.bincount(exit_index, minlength=K).double() / N
    return {"thresholds": [float(v) for v in thresholds], "exit_fractions": fractions.tolist(),
            "accuracy": correct.double().mean().item(),
            "flops": float((fractions * torch.tensor(list(exit_flops), dtype=torch.float64)).sum()),
            "exit_index": exit_index}


def default_ps() -> List[float]:
    return [k / 20 for k in range(1, 40)]


def budgeted(val_probs, val_targets, test_probs, test_targets, exit_flops, ps=None, cost_key: str = "flops") -> List[Dict]:
    """MSDNet's budgeted batch classification: for each p, thresholds fitted on validation and applied to
    test. One dict per p: p, thresholds, exit_fractions, accuracy (fraction), and the expected cost per test
    sample under `cost_key` ("flops"; with per-exit times from cost.latency as exit_flops, e.g. "ms")."""
    (val_probs, val_targets), (test_probs, test_targets) = (_as_tensors(val_probs, val_targets),
                                                            _as_tensors(test_probs, test_targets))
    _check_probs(val_probs, val_targets, "val")
    _check_probs(test_probs, test_targets, "test")
    ps = default_ps() if ps is None else [float(p) for p in np.asarray(ps, dtype=np.float64).ravel()]
    bad = [p for p in ps if not (p > 0 and math.isfinite(p))]
    if bad:
        raise ValueError(f"ps must be finite and > 0 (the budget parameter p of the p^k exit shares), got {bad[0]}")
    K = val_probs.shape[0]
    if test_probs.shape[0] != K or len(exit_flops) != K:
        raise ValueError(f"exit counts differ: val {K}, test {test_probs.shape[0]}, exit_flops {len(exit_flops)}")
    rows = []
    for p in ps:
        thresholds = fit_thresholds(val_probs, exit_shares(p, K))
        result = apply_thresholds(test_probs, test_targets, thresholds, exit_flops)
        result.pop("exit_index")
        result[cost_key] = result.pop("flops")
        rows.append({"p": p, **result})
    return rows


# --- real early exit ----------------------------------------------------------------------------------
def early_exit_predict(model, x: torch.Tensor, thresholds: Sequence[float], batch_size: int = 256,
                       exit_flops: Optional[Sequence[float]] = None) -> Dict:
    """Run the model exit by exit; samples whose confidence reaches T_k leave at exit k and the later
    stages run on the others only. Returns predictions, exit indices (0-based), wall time, and the
    flops spent (sum over samples of the cumulative cost of their exit) if exit_flops is given."""
    K = model.num_exits
    check_thresholds(thresholds, K)
    if exit_flops is not None and len(exit_flops) != K:  # before the model runs, not after
        raise ValueError(f"{K} exits but {len(exit_flops)} exit_flops")
    model.check_input(x)  # as model(x) would
    preds = torch.empty(len(x), dtype=torch.long, device=x.device)
    exits = torch.empty(len(x), dtype=torch.long, device=x.device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with evaluating(model):
        for b in range(0, len(x), batch_size):
            state, alive = x[b:b + batch_size], torch.arange(b, min(b + batch_size, len(x)), device=x.device)
            for k in range(K):
                state, logits = model.run_exit(k, state)
                conf, pred = F.softmax(logits.float(), 1).max(1)
                if k == K - 1:  # everyone left leaves here
                    preds.index_copy_(0, alive, pred), exits.index_fill_(0, alive, k)
                    break
                leave = conf.double() >= thresholds[k]  # as apply_thresholds: 0.9 is not rounded to float32
                # Compaction by sorted indices: the leavers first (a stable sort keeps the order of both groups),
                # so one count, the one host synchronisation per exit, splits them; a boolean mask would sync
                # once per use.
                leaving = int(leave.sum())
                if leaving == 0:
                    continue  # nobody leaves: no copy of the state (compaction costs as much as a cheap stage)
                order = torch.argsort(leave.to(torch.uint8), descending=True, stable=True)
                out, keep = order[:leaving], order[leaving:]
                gone = alive.index_select(0, out)
                preds.index_copy_(0, gone, pred.index_select(0, out)), exits.index_fill_(0, gone, k)
                if leaving == len(leave):
                    break
                alive = alive.index_select(0, keep)
                state = [s.index_select(0, keep) for s in state]
    sync()
    out = {"predictions": preds, "exit_index": exits, "wall_time_s": time.perf_counter() - start}
    if exit_flops is not None:
        out["flops"] = float(torch.tensor(list(exit_flops), dtype=torch.float64)[exits.cpu()].sum())
    return out


def network_results(model, val, test, exit_flops: Sequence[float], input_shape, device,
                    latency_batch: int = 256) -> Dict:
    """The evaluation a run records, from predictions (probs, targets) of the held-out and
    test splits: anytime on test; budgeted with thresholds fitted on the held-out split and applied to test, in
    FLOPs and in time (each exit's cost measured on this device, ms per image, eager)."""
    exit_ms = [1000 * t for t in cost.latency(model, input_shape, batch_size=latency_batch, device=device)]
    return {"anytime": anytime(*test, exit_flops), "budgeted": budgeted(*val, *test, exit_flops),
            "budgeted_ms": budgeted(*val, *test, exit_ms, cost_key="ms"), "exit_flops": list(exit_flops),
            # what "flops" counts here: MSDNet's op rules (MSDNets) or multiply-accumulates (torchvision backbones)
            "cost_convention": getattr(model, "cost_convention", "msdnet"),
            "exit_ms": exit_ms, "exit_ms_measured_on": {"device": runinfo.device_name(torch.device(device)),
                                                        "batch_size": latency_batch, "threads": torch.get_num_threads(),
                                                        "unit": "ms per image, eager"}}
