"""Everything a lent GPU should measure, in ONE device command of at most --budget seconds (default 540):

  (a) device and versions                                   -> device.json
  (b) training throughput: eager, compiled and CUDA-graph   -> train_throughput.json (written row by row)
      steps, CE and HDKD (bilevel every step / every 10), batch 64 and 128, compile time apart
  (c) early exit in time on the GPU                         -> early_exit.json
  (d) the real-data comparison with the time left: the CPU  -> results.tgz (metrics and run logs only)
      study's protocol (ce, dbt, hdkd x 3 seeds, 200 + 100 images per class, 15 epochs), runs in parallel
  and gpu_check.log, the whole console output. At most 6 files, flat, in --out (default $OUT).

Each part runs under its own deadline and writes its file as soon as it has numbers, so a timeout loses
nothing already measured; a part whose budget is too small is skipped with a line saying so. On the CPU
machine, once (both folders are git-ignored):

    mkdir -p .carry && cp ../shared/data/cifar10-jpeg.tar.gz .carry/
    # device command (carry [".carry"]):  python3 benchmarks/gpu_check.py
    # back here: tar -xzf <files_at>/results.tgz; commit results/; copy the tables into benchmarks/RESULTS.md

`--dry-run` runs every part on the CPU with tiny settings (tests/test_benchmarks.py does, on fake images).
Without CUDA and without --dry-run it says so and exits 2. It needs only torch, torchvision, numpy, pandas,
matplotlib, seaborn and tqdm, which the GPU machine has (../shared/device-wheels/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CIFAR10_JPEG_SHA256 = "1d26e266d748fedf13fb464d83e11ea734f0c5a9f15db57ca72e409919b435c7"  # ../shared/data/README.md
STUDY = ["--methods", "ce", "dbt", "hdkd", "--seeds", "0", "1", "2", "--epochs", "15", "--n-per-class", "200",
         "--val-per-class", "100"]


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, *lines):
        text = "\n".join(str(l) for l in lines)
        print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")


def run_part(log, name, cmd, seconds, min_seconds, env=None) -> bool:
    """Run one part as a subprocess under its deadline; its output goes to the log. False if skipped or failed."""
    if seconds < min_seconds:
        log(f"== ({name}) skipped: {seconds:.0f} s left for it, needs at least {min_seconds} s")
        return False
    log(f"== ({name}) {' '.join(cmd)}   [deadline {seconds:.0f} s]")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds)
        log(proc.stdout[-6000:], proc.stderr[-3000:] if proc.returncode else "",
            f"== ({name}) exit {proc.returncode} after {time.monotonic() - start:.0f} s")
        return proc.returncode == 0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log(out[-6000:], f"== ({name}) stopped at its deadline ({seconds:.0f} s): what it wrote so far is kept")
        return False


def unpack_data(log, data_root: Path) -> bool:
    if (data_root / "train").is_dir():
        return True
    archive = ROOT / ".carry" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        log(f"no {data_root} and no {archive}: carry .carry (see this script's docstring)")
        return False
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != CIFAR10_JPEG_SHA256:
        log(f"{archive}: sha256 {digest} is not the data README's {CIFAR10_JPEG_SHA256}: copy it again")
        return False
    data_root.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(data_root.parent, filter="data")
    return (data_root / "train").is_dir()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=540, help="seconds for everything (one device command)")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "runs" / "gpu-check")))
    p.add_argument("--data-root", default=str(ROOT / ".data" / "cifar10-jpeg"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny settings: checks the mechanics only")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")

    def left(reserve=15.0):
        return args.budget - (time.monotonic() - t0) - reserve

    import torch
    if not torch.cuda.is_available() and not args.dry_run:
        log("gpu_check: no CUDA device here; this script measures a GPU (use --dry-run to check its mechanics "
            "on a CPU)")
        return 2
    device = "cpu" if args.dry_run else "cuda"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    py = sys.executable

    # (a) device and versions
    import torchvision
    info = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
            "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None,
            "dry_run": args.dry_run, "budget_s": args.budget}
    (out / "device.json").write_text(json.dumps(info, indent=1))
    log("== (a) " + json.dumps(info))

    # (b) training throughput
    if args.dry_run:
        tp = ["--device", "cpu", "--arch", "toy_mlp", "--batch-sizes", "4", "--modes", "eager", "net",
              "--steps", "2", "--warmup", "1"]  # a compiled row, but no minutes of CPU compilation
        b_min = 5
    else:
        tp = ["--device", "cuda", "--batch-sizes", "64", "128", "--modes", "eager", "step", "step+graph",
              "--steps", "100", "--warmup", "20"]
        b_min = 60
    run_part(log, "b", [py, "benchmarks/train_throughput.py", *tp, "--json", str(out / "train_throughput.json")],
             min(left(), args.budget * 0.35), b_min, env)

    # (c) early exit in time
    ee = (["--device", "cpu", "--arch", "msdnet_cifar_budget", "--batch-size", "8", "--repeats", "1"] if args.dry_run
          else ["--device", "cuda", "--batch-size", "256", "--repeats", "20", "--paths", "eager", "fast", "fast+cl"])
    run_part(log, "c", [py, "benchmarks/early_exit.py", *ee, "--out", str(out / "early_exit.json")],
             min(left(), args.budget * 0.12), 5 if args.dry_run else 20, env)

    # (d) the real-data comparison with what is left
    runs, results = out.parent / (out.name + "-runs"), out.parent / (out.name + "-results")
    if not unpack_data(log, Path(args.data_root)):
        log("== (d) skipped: no data")
    else:
        d = (["--methods", "ce", "hdkd", "--seeds", "0", "--epochs", "1", "--arch", "toy_mlp", "--batch-size", "8",
              "--val-per-class", "4", "--device", "cpu", "--jobs", "2"] if args.dry_run
             else [*STUDY, "--device", "cuda", "--jobs", "3", "--compile", "step", "--compile-mode", "reduce-overhead"])
        run_part(log, "d", [py, "benchmarks/verify_real_data.py", "--data-root", str(args.data_root), *d,
                            "--runs", str(runs), "--results", str(results), "--name", "cifar10-gpu-study",
                            "--split-dir", str(runs / "splits"),
                            "--note", f"The CPU study's protocol on {info['device']} (benchmarks/gpu_check.py)."],
                 left(), 10 if args.dry_run else 60, env)
        with tarfile.open(out / "results.tgz", "w:gz") as tar:
            if results.is_dir():
                tar.add(results, arcname="results")
            for f in sorted(runs.glob("*.log")) if runs.is_dir() else []:
                tar.add(f, arcname=f"logs/{f.name}")
    log(f"== done in {time.monotonic() - t0:.0f} s of {args.budget:.0f}; files: "
        + ", ".join(sorted(f.name for f in out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
