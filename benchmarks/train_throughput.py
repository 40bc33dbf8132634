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
import os
import platform
import sys
import time
from pathlib import Path

import torch

from hdkdlib import data, runinfo, train
from hdkdlib.train import DataBundle, TrainConfig

CASES = [("ce", 1, 0), ("hdkd", 1, 0), ("hdkd", 10, 0)]  # (method, meta interval, horizon; 0: finite differences)


def parse_case(spec: str) -> tuple:
    """'hdkd/10' -> every 10th step a finite-difference weight update; 'hdkd/1/h2' -> every step the exact
    hypergradient through 2 virtual steps (meta_horizon); 'ce' -> (ce, 1, 0)."""
    parts = spec.split("/")
    method = parts[0]
    interval = parts[1] if len(parts) > 1 else "1"
    horizon = parts[2] if len(parts) > 2 else "h0"
    horizon_ok = horizon.startswith("h") and horizon[1:].isdigit()
    if len(parts) > 3 or not method or not interval.isdigit() or not horizon_ok:
        raise SystemExit(f"bad case {spec!r}: METHOD, METHOD/INTERVAL or METHOD/INTERVAL/hK (exact, horizon K)")
    return method, int(interval), int(horizon[1:])


def bundle(batch_size: int, device, n: int = 2048, num_classes: int = 100, channels_last: bool = False) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    stats = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=device, channels_last=channels_last)
    train = data.GpuLoader(x, y, batch_size, train=True, **stats)
    stream = data.GpuLoader(x, y, batch_size, train=True, pad=0, flip=False, seed=1, **stats)
    return DataBundle(train, stream, None, None, num_classes, (3, 32, 32))


VARIANT_FLAGS = ("eager", "bf16", "cl", "net", "step", "graph", "cap")
CPU_VARIANTS = ["eager", "eager@1", "bf16", "bf16@1", "cl", "net", "step", "bf16+net"]


def parse_variant(spec: str) -> dict:
    """'bf16+net@1' -> bf16 autocast, torch.compile of the network, 1 thread. Flags: eager (nothing), bf16,
    cl (channels-last), net (compile the network), step (compile the whole step), graph (compile mode
    reduce-overhead: CUDA graphs on a GPU), cap (the step captured as CUDA graphs by the trainer; without it
    every variant runs with cuda_graphs off); '@N': N CPU threads."""
    flags, _, threads = spec.partition("@")
    parts = flags.split("+")
    unknown = [f for f in parts if f not in VARIANT_FLAGS]
    if unknown or (threads and not threads.isdigit()):
        raise SystemExit(f"bad variant {spec!r}: flags {'+'.join(VARIANT_FLAGS)} joined by '+', optional @THREADS")
    return dict(bf16="bf16" in parts, channels_last="cl" in parts,
                compile="step" if "step" in parts else "network" if "net" in parts else "",
                graphs="graph" in parts, captured="cap" in parts, threads=int(threads) if threads else None)


def measure(arch, method, meta_interval, batch_size, variant, device, steps, warmup, num_classes=100,
            horizon=0) -> dict:
    v = parse_variant(variant)
    threads_before = torch.get_num_threads()
    if v["threads"]:
        torch.set_num_threads(v["threads"])
    meta = dict(meta_method="exact", meta_horizon=horizon) if horizon else {}
    cfg = TrainConfig(arch=arch, method=method, meta_interval=meta_interval, batch_size=batch_size, device=str(device),
                      **meta,
                      bf16=v["bf16"], channels_last=v["channels_last"], compile=v["compile"],
                      compile_mode="reduce-overhead" if v["graphs"] and v["compile"] else "default",
                      cuda_graphs="on" if v["captured"] else "off",
                      progress=False, threads=torch.get_num_threads())  # the variant's threads, never auto
    try:
        trainer = train.prepare(cfg, data_bundle=bundle(batch_size, device, num_classes=num_classes,
                                                  channels_last=v["channels_last"]))
        # Whole meta intervals in both windows, so "every 10 steps" times exactly one bilevel step in ten.
        warmup, steps = (-(-n // meta_interval) * meta_interval for n in (warmup, steps))
        batches = list(trainer.data.train.batches(0))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        trainer.train_step(*batches[0])  # the first step compiles (when compiling): its time is reported apart
        sync()
        first_step_s = time.perf_counter() - start
        for i in range(1, warmup):
            trainer.train_step(*batches[i % len(batches)])
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for i in range(steps):
            trainer.train_step(*batches[i % len(batches)])
        sync()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads_before)
    return {"arch": arch, "method": method, "meta_interval": meta_interval if method != "ce" else None,
            "meta_horizon": horizon if method != "ce" and horizon else None,
            "batch_size": batch_size, "mode": variant, "threads": v["threads"] or threads_before, "steps": steps,
            "images_per_s": steps * batch_size / seconds, "step_ms": 1000 * seconds / steps,
            "first_step_s": first_step_s,
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
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--modes", nargs="+", default=None,
                   help="variants, each flags joined by '+' with an optional @THREADS: eager, bf16, cl (channels-last), "
                        "net (compile the network), step (compile the whole step), graph (compile mode reduce-overhead: CUDA "
                        f"graphs), cap (the step captured as CUDA graphs), e.g. bf16+net@1; 'compile' means step+graph. "
                        f"Default: GPU eager cap step step+graph; "
                        f"CPU {' '.join(CPU_VARIANTS)}")
    p.add_argument("--methods", nargs="+", default=None,
                   help="cases as METHOD, hdkd/INTERVAL or hdkd/INTERVAL/hK (exact hypergradient, horizon K) "
                        "(default: ce hdkd/1 hdkd/10)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", default="benchmarks/train_throughput.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    modes = [("step+graph" if m == "compile" else m) for m in (args.modes or (["eager", "cap", "step", "step+graph"]
                                                                               if device.type == "cuda" else CPU_VARIANTS))]
    for m in modes:
        parse_variant(m)
    cases = CASES if not args.methods else [parse_case(c) for c in args.methods]
    rows, data_rows = [], []
    for bs in args.batch_sizes:
        data_rows.append(measure_data_path(bs, device, max(args.steps, 50)))
        print(f"data path alone           bs {bs:<4} {data_rows[-1]['data_path_images_per_s']:>9.0f} img/s")
    for bs in args.batch_sizes:
        for method, interval, horizon in cases:
            for mode in modes:
                rows.append(measure(args.arch, method, interval, bs, mode, device, args.steps, args.warmup,
                                    args.num_classes, horizon))
                write_record(args, argv, device, rows, data_rows)  # row by row: a deadline loses nothing measured
                r = rows[-1]
                base = next(b for b in rows if b["batch_size"] == bs and b["method"] == method
                            and b["meta_interval"] == r["meta_interval"] and b["meta_horizon"] == r["meta_horizon"])
                exact = f" exact h{horizon}" if r["meta_horizon"] else ""
                print(f"{r['arch']:<22} bs {bs:<4} {mode:<10} {method:<5} meta/{interval if method != 'ce' else '-':<3}{exact} "
                      f"{r['images_per_s']:>9.0f} img/s {r['step_ms']:>8.1f} ms/step "
                      f"x{r['images_per_s'] / base['images_per_s']:.2f} of {base['mode']}, first step {r['first_step_s']:.1f} s"
                      + (f" {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else ""))
    return write_record(args, argv, device, rows, data_rows)


def write_record(args, argv, device, rows, data_rows) -> dict:
    record = {"device": runinfo.device_name(device), "torch": torch.__version__, "host": platform.node(),
              "threads": torch.get_num_threads(), "command": "python benchmarks/train_throughput.py " + " ".join(argv),
              "rows": rows, "data_path": data_rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.json).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, args.json)
    return record


if __name__ == "__main__":
    main()
