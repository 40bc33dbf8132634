"""Kernels, host-to-device copies and host syncs per training step, from the torch profiler (a GPU's numbers;
on a CPU only the operator count means anything).

    python benchmarks/profile_step.py --json profile.json          # CE and HDKD, eager and captured, batch 64
    python benchmarks/profile_step.py --device cpu --arch toy_mlp --batch-size 4 --modes eager   # smoke

Each case runs its warm-up steps (the captured mode captures there), then the profiler records `--steps` steps.
Every mode starts from the same seed and trains on the same batches: `distance_from_eager` is how far a mode's
parameters end from the eager mode's, as a fraction of how far eager's moved (near 0 where the captured step
computes what eager does).
Counted per step: GPU kernels, memcpy host-to-device, memsets, the host's waits (cudaStreamSynchronize,
cudaDeviceSynchronize, cudaEventSynchronize), CUDA-graph launches, CPU-side operators, and the GPU's busy
time against the wall time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import bundle, parse_case  # noqa: E402 (a sibling script)

from hdkdlib import train  # noqa: E402
from hdkdlib.train import TrainConfig  # noqa: E402

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def classify(events) -> dict:
    counts = {"kernels": 0, "memcpy_htod": 0, "memset": 0, "syncs": 0, "graph_launches": 0, "cpu_ops": 0,
              "gpu_busy_us": 0.0}
    for e in events:
        name = e.name
        on_gpu = getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        if on_gpu:
            counts["gpu_busy_us"] += e.device_time_total if hasattr(e, "device_time_total") else 0.0
            if "Memcpy HtoD" in name:
                counts["memcpy_htod"] += 1
            elif "Memset" in name:
                counts["memset"] += 1
            elif "Memcpy" not in name:
                counts["kernels"] += 1
        elif name in SYNCS:
            counts["syncs"] += 1
        elif name == "cudaGraphLaunch":
            counts["graph_launches"] += 1
        elif name.startswith("aten::"):
            counts["cpu_ops"] += 1
    return counts


def profile_case(arch, method, interval, batch_size, mode, device, steps, warmup, num_classes) -> dict:
    cfg = TrainConfig(arch=arch, method=method, meta_interval=interval, batch_size=batch_size, device=str(device),
                      cuda_graphs="on" if mode == "cap" else "off", progress=False, threads=torch.get_num_threads())
    trainer = train.prepare(cfg, data_bundle=bundle(batch_size, device, num_classes=num_classes))
    batches = list(trainer.data.train.batches(0))
    start_params = _flat(trainer.model.parameters())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup):
        trainer.train_step(*batches[i % len(batches)])
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            trainer.train_step(*batches[i % len(batches)])
        sync()
    wall_us = 1e6 * (time.perf_counter() - start)
    counts = classify(prof.events())
    per_step = {k: v / steps for k, v in counts.items()}
    moved = _flat(trainer.model.parameters()) - start_params
    return {"arch": arch, "method": method, "meta_interval": interval if method != "ce" else None,
            "batch_size": batch_size, "mode": mode, "step_mode": trainer.step_mode, "steps": steps, **per_step,
            "wall_us_per_step": wall_us / steps,
            "gpu_busy_fraction": counts["gpu_busy_us"] / wall_us if device.type == "cuda" else None}, moved


def _flat(parameters) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten().cpu() for p in parameters])


def distance(moved: torch.Tensor, eager_moved: torch.Tensor) -> float:
    """How far two runs from the same start, seed and batches ended apart, as a fraction of how far the eager
    run's parameters moved: rounding gives about 1e-4 or less, one step wrong or missing of a few about 0.1."""
    return float(torch.linalg.vector_norm(moved - eager_moved) / torch.linalg.vector_norm(eager_moved).clamp_min(1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="msdnet_cifar_anytime")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=["eager", "cap"], choices=["eager", "cap"])
    p.add_argument("--methods", nargs="+", default=["ce", "hdkd/1"])
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5, help="steps before profiling (the captured mode captures there)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rows = []
    for spec in args.methods:
        method, interval, _ = parse_case(spec)
        moved = {}
        for mode in args.modes:
            row, moved[mode] = profile_case(args.arch, method, interval, args.batch_size, mode, device, args.steps,
                                              args.warmup, args.num_classes)
            # the captured step against the eager one from the same seed and batches (gpu_check trusts GPU runs by it)
            row["distance_from_eager"] = distance(moved[mode], moved["eager"]) if "eager" in moved else None
            rows.append(row)
            r = rows[-1]
            print(f"{method}/{interval} {mode:<5} ({r['step_mode']}): {r['kernels']:.0f} kernels, "
                  f"{r['memcpy_htod']:.0f} HtoD copies, {r['syncs']:.0f} syncs, {r['graph_launches']:.0f} graph "
                  f"launches, {r['cpu_ops']:.0f} CPU ops per step; {r['wall_us_per_step'] / 1000:.1f} ms/step"
                  + (f", GPU busy {r['gpu_busy_fraction']:.0%}" if r["gpu_busy_fraction"] is not None else "")
                  + (f"; parameters {r['distance_from_eager']:.1e} from eager's" if mode != "eager"
                     and r["distance_from_eager"] is not None else ""),
                  flush=True)
            if args.json:  # row by row: a deadline loses nothing measured
                Path(args.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                                       "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
