"""Operator counts of one training step on the CPU: what a GPU launches, counted without a GPU.

    python benchmarks/op_count.py                     # msdnet_cifar_anytime, batch 8, a markdown table
    python benchmarks/op_count.py --json out.json     # the same numbers as JSON

A dispatch mode (torch.utils._python_dispatch.TorchDispatchMode) sees every aten operator a step runs: on a
GPU each compute operator is at least one kernel launch, so their count is the step's launch cost. Counted:
- compute ops: every operator except views (outputs that alias an input) and detach;
- host syncs: operators that make the host wait for the device (`_local_scalar_dense`: item(), int(), bool();
  nonzero and boolean-mask indexing, whose output size the host must read);
- list tensors: tensors built from Python values (`lift_fresh`: torch.tensor([...]), each a host-to-device copy).

Phases by difference, each from the same starting state: the forward pass alone; forward + backward (the
gradients); the whole CE step (+ the network's update); the whole step of dbt and hdkd (hdkd: the weight update
every step, finite differences). Optimizers use foreach=True, as on CUDA. And one early-exit batch
(hdkdlib.evaluation.early_exit_predict at batch 64, equal shares to every exit): its host syncs.
"""
from __future__ import annotations

import argparse
import copy
import json
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hdkdlib import bilevel, evaluation, models, objectives
from hdkdlib.step import TrainStep

SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.item"}
SKIP_OPS = {"aten.detach", "aten.lift_fresh"}


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _bool_index(func, args) -> bool:
    """x[mask]: aten.index with a boolean index runs nonzero inside the kernel (a sync on a GPU)."""
    if str(func.overloadpacket) not in ("aten.index", "aten.index_put_", "aten.index_put"):
        return False
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])


class OpCounter(TorchDispatchMode):
    """Counts compute ops, host syncs and tensors built from Python values, with the names of each."""

    def __init__(self):
        super().__init__()
        self.compute, self.syncs, self.lists = Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS or _bool_index(func, args):
            self.syncs[name] += 1
        if name == "aten.lift_fresh":
            self.lists[name] += 1
        if name not in SKIP_OPS and not _is_view(func):
            self.compute[name] += 1
        return func(*args, **(kwargs or {}))

    def totals(self) -> dict:
        return {"compute": sum(self.compute.values()), "syncs": sum(self.syncs.values()),
                "list_tensors": sum(self.lists.values())}


def count(fn) -> dict:
    with OpCounter() as c:
        fn()
    return c.totals()


def _setup(method, batch, classes, arch, seed=0):
    torch.manual_seed(seed)
    model = models.build(arch, classes, input_shape=(3, 32, 32))
    objective = objectives.build(method, model.num_exits, check_inputs=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
    meta = (bilevel.MetaStep(model, objective, check_finite=False) if list(objective.parameters()) else None)
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(batch, 3, 32, 32, generator=g), torch.randn(batch, 3, 32, 32, generator=g)
    y, yv = torch.randint(0, classes, (batch,), generator=g), torch.randint(0, classes, (batch,), generator=g)
    return model, objective, opt, meta, (x, y), (xv, yv)


def step_counts(method, batch=8, classes=100, arch="msdnet_cifar_anytime") -> dict:
    """Op counts of one step (the second: the optimizer's state exists), and its phases by difference."""
    model, objective, opt, meta, train, val = _setup(method, batch, classes, arch)
    model.train()
    step = TrainStep(model, objective, opt, meta)  # built once per run, as the Trainer does
    step(train, val if meta else None)  # the first step: every state exists after it
    state = copy.deepcopy((model.state_dict(), objective.state_dict()))

    def restore():  # the step (counted last) holds the optimizer's state: only the forward passes are undone
        model.load_state_dict(state[0]), objective.load_state_dict(state[1])

    def forward():
        with torch.no_grad():
            objective(model(train[0]), train[1])

    def gradients():
        loss = objective(model(train[0]), train[1])
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    rows = {}
    for phase, fn in (("forward", forward), ("forward+backward", gradients),
                      ("step", lambda: step(train, val if meta else None))):
        restore()
        rows[phase] = count(fn)
    return rows


def early_exit_syncs(batch=64, classes=100, arch="msdnet_cifar_anytime") -> dict:
    """Host syncs of one early-exit batch with thresholds that send an equal share to every exit."""
    torch.manual_seed(0)
    model = models.build(arch, classes, input_shape=(3, 32, 32)).eval()
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        conf = torch.stack([z.softmax(1).max(1).values for z in model(x)])  # [K, N]
    K = model.num_exits
    thresholds = [float(conf[k].quantile(1 - 1 / (K - k))) for k in range(K - 1)] + [0.0]
    with torch.no_grad():
        totals = count(lambda: evaluation.early_exit_predict(model, x, thresholds, batch_size=batch))
    return {"exits": K, **totals}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="msdnet_cifar_anytime")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--methods", nargs="+", default=["ce", "dbt", "hdkd"])
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {m: step_counts(m, args.batch_size, args.num_classes, args.arch) for m in args.methods}
    result["early_exit"] = early_exit_syncs(64, args.num_classes, args.arch)
    ce = result.get("ce", {}).get("step", {}).get("compute")
    print(f"{args.arch}, batch {args.batch_size}, {args.num_classes} classes, torch {torch.__version__}\n")
    print("| method | forward | backward | rest of the step | step | x CE step | host syncs | list tensors |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.methods:
        r = result[m]
        f, fb, s = r["forward"]["compute"], r["forward+backward"]["compute"], r["step"]["compute"]
        ratio = f"{s / ce:.2f}" if ce else ""
        print(f"| {m} | {f} | {fb - f} | {s - fb} | {s} | {ratio} | {r['step']['syncs']} | {r['step']['list_tensors']} |")
    e = result["early_exit"]
    print(f"\nearly exit, batch 64, equal shares to {e['exits']} exits: {e['syncs']} host syncs, "
          f"{e['compute']} compute ops, {e['list_tensors']} list tensors")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
