"""Real-data check (issue 9): MSDNet (anytime, 7 exits) on real CIFAR-10 images (an image-folder tree of
32x32 JPEGs) with ce, dbt, hdkd (and dkd), several seeds, the paper's CIFAR recipe compressed in time.

    python benchmarks/verify_real_data.py --data-root .data/cifar10-jpeg --epochs 50 --device cuda \
        --compile step --compile-mode reduce-overhead
    python benchmarks/verify_real_data.py --summarize-only           # rebuild results/README.md

Each run trains in runs/verify/<method>-seed<k>/ (resumable: rerun the same command after an
interruption) and its results.json is copied to results/cifar10/<method>-seed<k>/results.json, which is
committed with the summary table and figure in results/README.md. Only metrics, never images.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pandas as pd

from hdkdlib import evaluation, plots, train

ROOT = Path(__file__).resolve().parent.parent


def run_all(args) -> None:
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}-seed{seed}"
            cfg = train.TrainConfig(dataset="folder32", data_root=args.data_root, arch=args.arch, method=method,
                                    epochs=args.epochs, batch_size=args.batch_size, seed=seed, device=args.device,
                                    val_per_class=args.val_per_class, n_per_class=args.n_per_class,
                                    meta_interval=args.meta_interval, bf16=args.bf16, compile=args.compile,
                                    compile_mode=args.compile_mode,
                                    progress=args.progress, split_dir=args.split_dir,
                                    out=str(Path(args.runs) / name)).validate()
            print(f"== {name}: {' '.join(train.cli_args(cfg))}", flush=True)
            train.run(cfg)
            target = Path(args.results) / name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(cfg.out) / "results.json", target / "results.json")
            shutil.copy(Path(cfg.out) / "metrics.jsonl", target / "metrics.jsonl")


def summarize(results: Path, epochs_full: int = 300) -> str:
    """Markdown: per-exit test top-1 (mean and spread over seeds), epoch time, final learned weights."""
    table = evaluation.load_results(sorted(str(p) for p in results.glob("*/results.json")))
    if table.empty:
        raise SystemExit(f"no results under {results}")
    acc = table.assign(top1=100 * table.top1).groupby(["method", "exit"]).top1.agg(["mean", "std", "count"])
    lines = ["| method | seeds | " + " | ".join(f"exit {k}" for k in sorted(table.exit.unique())) + " |",
             "|---|---|" + "---|" * table.exit.nunique()]
    for method, group in acc.groupby(level=0):
        cells = [f"{m:.2f} ± {s:.2f}" if pd.notna(s) else f"{m:.2f}" for m, s in zip(group["mean"], group["std"])]
        lines.append(f"| {method} | {int(group['count'].iloc[0])} | " + " | ".join(cells) + " |")
    times = []
    for run in sorted(results.glob("*/metrics.jsonl")):
        rows = [json.loads(l) for l in run.read_text().splitlines()]
        per_epoch = sorted(r["epoch_seconds"] for r in rows)[len(rows) // 2]  # median epoch
        times.append(f"| {run.parent.name} | {per_epoch:.1f} s | {per_epoch * epochs_full / 3600:.2f} h | "
                     f"{sorted(r['images_per_s'] for r in rows)[len(rows) // 2]:.0f} |")
    out = ["Per-exit test top-1 (%), mean ± standard deviation over seeds:", "", *lines, "",
           f"Wall time (median epoch) and the implied {epochs_full}-epoch run:", "",
           "| run | epoch | 300 epochs | images/s |", "|---|---|---|---|", *times]
    learned = [p for p in results.glob("hdkd-seed*/results.json")]
    if learned:
        w = json.loads(learned[0].read_text())["weights"]
        out += ["", f"Final learned weights ({learned[0].parent.name}):", "",
                "| term | " + " | ".join(w) + " |", "|---|" + "---|" * len(w),
                "| weight | " + " | ".join(f"{v:.3f}" for v in w.values()) + " |"]
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    plots.anytime_curves(table, ax=ax, title="CIFAR-10 (real images): test top-1 per exit")
    plots.save(fig, "anytime", folder=results)
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=".data/cifar10-jpeg")
    p.add_argument("--methods", nargs="+", default=["ce", "dbt", "hdkd"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--arch", default="msdnet_cifar_anytime")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--n-per-class", type=int, default=0)
    p.add_argument("--meta-interval", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", default="", choices=["", "network", "step"])
    p.add_argument("--compile-mode", default="default", help="reduce-overhead: CUDA graphs on a GPU")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--split-dir", default="", help="default: data/splits/ (commit the split file it writes)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "verify"))
    p.add_argument("--results", default=str(ROOT / "results" / "cifar10"))
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args(argv)
    if not args.summarize_only:
        run_all(args)
    summary = summarize(Path(args.results))
    (Path(args.results) / "SUMMARY.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    sys.exit(main())
