"""Training throughput (images/s) of a CE step and an HDKD step (bilevel update every step and every
10 steps), eager and with the whole step compiled (torch.compile, CUDA graphs on GPUs), with peak GPU
memory, and the images/s of the data path alone. Prints a table and writes JSON.

    python benchmarks/train_throughput.py                      # GPU: batch 64 and 256, eager and compiled
    python benchmarks/train_throughput.py --device cpu --steps 3 --warmup 1 --batch-sizes 8 --modes eager   # smoke

The data are random uint8 images already on the device (GpuLoader), so this measures the step itself.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from hdkdlib import data, runinfo
from hdkdlib.train import DataBundle, TrainConfig, Trainer

CASES = [("ce", 1), ("hdkd", 1), ("hdkd", 10)]


def bundle(batch_size: int, device, n: int = 2048, num_classes: int = 100) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    stats = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=device)
    train = data.GpuLoader(x, y, batch_size, train=True, **stats)
    stream = data.GpuLoader(x, y, batch_size, train=True, pad=0, flip=False, seed=1, **stats)
    return DataBundle(train, stream, None, None, num_classes, (3, 32, 32))


def measure(arch, method, meta_interval, batch_size, mode, device, steps, warmup) -> dict:
    cfg = TrainConfig(arch=arch, method=method, meta_interval=meta_interval, batch_size=batch_size, device=str(device),
                      compile="" if mode == "eager" else "step",
                      compile_mode="reduce-overhead" if device.type == "cuda" else "default", progress=False)
    trainer = Trainer(cfg, data_bundle=bundle(batch_size, device))
    # Whole meta intervals in both windows, so "every 10 steps" times exactly one bilevel step in ten.
    warmup, steps = (-(-n // meta_interval) * meta_interval for n in (warmup, steps))
    batches = list(trainer.data.train.batches(0))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup):
        trainer.train_step(*batches[i % len(batches)])
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(steps):
        trainer.train_step(*batches[i % len(batches)])
    sync()
    seconds = time.perf_counter() - start
    return {"arch": arch, "method": method, "meta_interval": meta_interval if method != "ce" else None,
            "batch_size": batch_size, "mode": mode, "steps": steps, "images_per_s": steps * batch_size / seconds,
            "step_ms": 1000 * seconds / steps,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def measure_data_path(batch_size, device, steps, n: int = 50_000) -> dict:
    """Images/s of the GPU-resident loader alone: crop, flip and normalise of a CIFAR-sized uint8 set."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    loader = data.GpuLoader(x, torch.zeros(n, dtype=torch.long), batch_size, mean=(0.5,) * 3, std=(0.25,) * 3,
                            device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = loader.batches(0)
    next(batches)
    sync()
    start = time.perf_counter()
    count = 0
    for _ in range(min(steps, len(loader) - 1)):
        xb, _ = next(batches)
        count += len(xb)
    sync()
    return {"data_path_images_per_s": count / (time.perf_counter() - start), "batch_size": batch_size}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="msdnet_cifar_anytime")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"],
                   help="compile: the whole step with torch.compile (mode reduce-overhead, CUDA graphs, on GPUs)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", default="benchmarks/train_throughput.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rows, data_rows = [], []
    for bs in args.batch_sizes:
        data_rows.append(measure_data_path(bs, device, max(args.steps, 50)))
        print(f"data path alone           bs {bs:<4} {data_rows[-1]['data_path_images_per_s']:>9.0f} img/s")
    for bs in args.batch_sizes:
        for mode in args.modes:
            for method, interval in CASES:
                rows.append(measure(args.arch, method, interval, bs, mode, device, args.steps, args.warmup))
                r = rows[-1]
                print(f"{r['arch']:<22} bs {bs:<4} {mode:<8} {method:<5} meta/{interval if method != 'ce' else '-':<3} "
                      f"{r['images_per_s']:>9.0f} img/s {r['step_ms']:>8.1f} ms/step"
                      + (f" {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else ""))
    record = {"device": runinfo.device_name(device), "torch": torch.__version__, "host": platform.node(),
              "command": "python benchmarks/train_throughput.py " + " ".join(argv), "rows": rows,
              "data_path": data_rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
