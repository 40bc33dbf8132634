"""CPU threads for small models: training-step time at 1 thread and at every core, on a quiet machine and
on a busy one (a second process keeping one core at work, as a test run or another training run would).

    python benchmarks/threads.py [--repeats 30] [--json benchmarks/threads.json]

Cases: the toy MLP of notebooks 01 and 06 (full-batch, 1,500 points), the toy MLP of notebook 05's quick
runs (batch 64 of 3x32x32 synthetic images) and notebook 03's MSDNet (batch 64). Each time is the median
of `repeats` steps after warm-up steps; ratios compare rows of the same run only. What hdkdlib does with
the result: toy.fit uses 1 thread, and a run's `threads` 0 picks 1 thread for small models and otherwise the
cores idle when it starts (distributed.auto_threads).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hdkdlib import models, objectives, toy  # noqa: E402
from hdkdlib.distributed import cpu_threads  # noqa: E402
from hdkdlib.train import TrainConfig, prepare  # noqa: E402


def _spin(stop):
    """One busy core: what a second run (or a test suite) does to this machine."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def _toy_step():
    torch.manual_seed(0)
    x, y = toy.spirals(1500, seed=0)
    model = models.build("toy_mlp", 3, width=32, num_exits=4)
    objective = objectives.build("hdkd", 4)

    def step():  # 5 full-batch steps with the bilevel update, as toy.fit runs them
        toy.fit(model, objective, (x[:1000], y[:1000]), (x[1000:], y[1000:]), steps=5, progress=False, threads=0,
                log_every=10**9)
    return step


def _trainer_step(arch):
    cfg = TrainConfig(dataset="synthetic", arch=arch, method="hdkd", batch_size=64, epochs=1, device="cpu",
                      progress=False, threads=1, meta_schedule="fixed", meta_lr=1e-3)
    trainer = prepare(cfg)  # each measurement sets its own thread count
    batches = list(trainer.data.train.batches(0))
    state = {"i": 0}

    def step():
        state["i"] += 1
        trainer.train_step(*batches[state["i"] % len(batches)])
    return step


CASES = {"toy MLP, full batch (01, 06)": _toy_step,
         "toy MLP, batch 64 (05 quick)": lambda: _trainer_step("toy_mlp"),
         "msdnet_cifar_anytime, batch 64 (03)": lambda: _trainer_step("msdnet_cifar_anytime")}


def median_ms(step, threads: int, repeats: int, warmup: int = 3) -> float:
    with cpu_threads(threads):
        for _ in range(warmup):
            step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--cases", nargs="*", default=list(CASES), help="a subset of: " + "; ".join(CASES))
    p.add_argument("--json", default="", help="also write the rows here")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, cores})
    rows = []
    for busy in (False, True):
        stop = mp.Event()
        spinner = mp.Process(target=_spin, args=(stop,), daemon=True) if busy else None
        if spinner:
            spinner.start()
            time.sleep(1.0)
        try:
            for name in args.cases:
                step = CASES[name]()
                ms = {n: median_ms(step, n, args.repeats) for n in counts}
                rows.append({"case": name, "machine": "busy (1 core taken)" if busy else "quiet", "cores": cores,
                             **{f"{n} thread{'s' * (n > 1)} ms": round(v, 2) for n, v in ms.items()},
                             f"{cores} / 1 thread": round(ms[cores] / ms[1], 2)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if spinner:
                stop.set()
                spinner.join()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": f"cpu, {cores} cores", "torch": torch.__version__,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
