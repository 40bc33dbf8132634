"""Real-data check (issue 9): MSDNet (anytime, 7 exits) on real CIFAR-10 images (an image-folder tree of
32x32 JPEGs) with ce, dbt, hdkd (and dkd), several seeds, the paper's CIFAR recipe compressed in time.

    python benchmarks/verify_real_data.py --data-root .data/cifar10-jpeg --epochs 50 --device cuda \
        --compile step --compile-mode reduce-overhead --jobs 3
    python benchmarks/verify_real_data.py --methods hdkd --tag T3 --temperature 3 ...   # an ablation variant
    python benchmarks/verify_real_data.py --summarize-only           # rebuild results/README.md
    python benchmarks/verify_real_data.py --merge-from ../worktree   # runs trained in another checkout

Each run trains in runs/verify/<run>/, <run> = <method>[-<tag>]-seed<k> (resumable: rerun the same command
after an interruption). Its config.json, results.json and metrics.jsonl are copied to results/<name>/<run>/
(default name: cifar10), and results/README.md is rebuilt from every results/*/SUMMARY.md: the per-exit
table, the learned weights, and per run the device, torch version, epoch time, commit and command. Only
settings and metrics are committed, never images or weights, nor the split file (it is derived from the
images' labels; its checksum is in every config.json).

--jobs N trains N runs at once as separate `python -m hdkdlib.train` processes (logs in
runs/verify/<run>.log, a progress line a minute). Their epoch times then measure a shared device; the
summary says how many shared it, and benchmarks/train_throughput.py gives the one-run speed.
--epochs auto picks the epochs that let all runs train in --minutes at the speeds that benchmark measured.
Any other option of `python -m hdkdlib.train` (e.g. --temperature 3, --meta-traverse 0.5) applies to every run.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from hdkdlib import config, objectives, plots, records, resume, runfolder, stats, train
from hdkdlib.runfolder import RunFolder
from hdkdlib.paths import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
# What a results folder keeps of a run (never its weights); results.json last: it marks a finished run
RUN_FILES = (runfolder.CONFIG, runfolder.METRICS, runfolder.RESULTS)


def portable(path) -> str:
    """A path relative to the project root when inside it, so recorded commands work on any checkout."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_name(method: str, tag: str, seed: int) -> str:
    return f"{method}{'-' + tag if tag else ''}-seed{seed}"


def variant(run: str) -> str:
    """The run's name without its seed: what the summary averages over."""
    return run.rsplit("-seed", 1)[0]


def seed_of(run: str) -> int:
    """The run's seed: what pairs it with a run of another variant (same split and initial network)."""
    return int(run.rsplit("-seed", 1)[1])


def configs(args) -> list:
    """One config per (method, seed); paths relative to the project root, which is the working directory."""
    base = dict(dataset="folder32", data_root=portable(args.data_root), epochs=int(args.epochs),
                progress=args.progress and args.jobs == 1, split_dir=portable(args.split_dir))
    extra = args.train_options
    fixed = sorted(set(extra) & {"dataset", "data_root", "method", "seed", "out"})
    if fixed:
        raise SystemExit(f"cannot set {', '.join(fixed)} per run: use --data-root, --methods, --seeds, --runs/--tag")
    return [train.TrainConfig(**{**base, **extra}, method=method, seed=seed,
                              out=str(Path(portable(args.runs)) / run_name(method, args.tag, seed))).validate()
            for seed in args.seeds for method in args.methods]  # seed-major: pairs complete one by one


def epochs_within(minutes: float, throughput: dict, methods, seeds, train_images: int, meta_interval: int = 1,
                  batch_size: int = 64, bounds=(4, 60)) -> int:
    """Epochs for which all runs, one after another, train in `minutes` at the speeds that
    benchmarks/train_throughput.py measured (compiled rows preferred): CE-cost methods at the CE speed,
    learned-weight methods at the HDKD speed with the nearest meta interval. Clamped to `bounds`: fewer than
    4 epochs cannot place the two lr drops apart, more than 60 is beyond what issue 9 asks."""
    rows = [r for r in throughput["rows"] if r["batch_size"] == batch_size] or throughput["rows"]
    modes = {r["mode"] for r in rows}
    preferred = next((m for m in ("step+graph", "compile", "step") if m in modes), "eager")  # compiled rows first
    rows = [r for r in rows if r["mode"] == preferred]
    ce = next(r["images_per_s"] for r in rows if r["method"] == "ce")
    learned = [r for r in rows if r["method"] != "ce"]
    hdkd = min(learned, key=lambda r: abs(r["meta_interval"] - meta_interval))["images_per_s"] if learned else ce
    seconds_per_epoch = len(seeds) * sum(train_images / (hdkd if m in objectives.LEARNED else ce) for m in methods)
    return int(min(max(minutes * 60 // seconds_per_epoch, bounds[0]), bounds[1]))


def probe(args) -> train.TrainConfig:
    """The settings every run shares (the training options given, then the recipe's values)."""
    return train.TrainConfig(**{"dataset": "folder32", **args.train_options})


def train_images(args) -> int:
    classes = [d for d in (Path(args.data_root) / "train").iterdir() if d.is_dir()]
    cfg = probe(args)
    if cfg.n_per_class:
        return cfg.n_per_class * len(classes)
    val_per_class = cfg.val_per_class or max(1, 5000 // len(classes))  # the dataset's rule (data.bundle)
    return sum(1 for d in classes for f in d.iterdir() if f.is_file()) - val_per_class * len(classes)


def resolve_epochs(args) -> int:
    """--epochs N, or `auto`: the epochs of runs already begun in --runs, else what fits --minutes."""
    if args.epochs != "auto":
        return int(args.epochs)
    begun = [f for f in map(RunFolder, sorted(Path(args.runs).glob("*/"))) if f.exists()]
    if begun:
        epochs = begun[0].config()["config"]["epochs"]
        print(f"epochs auto: {epochs}, as the runs already begun in {args.runs}", flush=True)
        return epochs
    path = Path(args.throughput)
    if not path.exists():
        raise SystemExit(f"--epochs auto needs the speeds in {path}: run benchmarks/train_throughput.py first")
    n = train_images(args)
    epochs = epochs_within(args.minutes, records.read_json(path), args.methods, args.seeds, n,
                           probe(args).meta_interval, probe(args).batch_size)
    print(f"epochs auto: {epochs} ({len(args.methods)} methods x {len(args.seeds)} seeds, {n} training images, "
          f"{args.minutes} minutes at the speeds in {path})", flush=True)
    return epochs


def finished(cfg) -> bool:
    return RunFolder(cfg.out).finished()


def collect(cfg, results: Path) -> None:
    """Copy a finished run's settings and metrics (not its weights) into the results folder."""
    target = results / Path(cfg.out).name
    target.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        shutil.copy(RunFolder(cfg.out).file(name), target / name)


def epochs_done(cfg) -> int:
    return len(RunFolder(cfg.out).metrics())


def run_parallel(cfgs, jobs: int, results: Path, poll_s: float = 60.0) -> list:
    """Train the runs `jobs` at a time as subprocesses; returns the names of runs that failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    waiting, active, failed = [c for c in cfgs if not finished(c)], {}, []
    for cfg in cfgs:
        if finished(cfg):
            collect(cfg, results)
    last_report = 0.0
    while waiting or active:
        while waiting and len(active) < jobs:
            cfg = waiting.pop(0)
            cmd = [sys.executable, "-m", "hdkdlib.train", *train.cli_args(cfg)]
            if RunFolder(cfg.out).exists():
                cmd.append("--resume")  # continues a checkpoint, restarts a run that never reached one
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            log = open(Path(cfg.out).with_suffix(".log"), "a")
            print(f"== start {Path(cfg.out).name}: {' '.join(cmd[1:])}", flush=True)
            active[Path(cfg.out).name] = (cfg, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log)
        time.sleep(min(poll_s, 5.0))
        for name, (cfg, proc, log) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[name]
            if proc.returncode == 0 and finished(cfg):
                collect(cfg, results)
                print(f"== done {name}", flush=True)
            else:
                failed.append(name)
                tail = Path(cfg.out).with_suffix(".log").read_text()[-1500:]
                print(f"== FAILED {name} (exit {proc.returncode}); end of its log:\n{tail}", flush=True)
        if time.monotonic() - last_report >= poll_s or not (waiting or active):
            last_report = time.monotonic()
            print(time.strftime("%H:%M:%S ") + " · ".join(
                f"{Path(c.out).name} {epochs_done(c)}/{c.epochs}" for c in cfgs), flush=True)
    return failed


def run_inline(cfgs, results: Path) -> None:
    for cfg in cfgs:
        print(f"== {Path(cfg.out).name}: {' '.join(train.cli_args(cfg))}", flush=True)
        train.run(cfg)
        collect(cfg, results)


def _median(values):
    return float(np.median(values)) if len(values) else float("nan")


def began(run: Path, record: dict) -> str:
    """The commit a run was trained with: its config.json's (written when it began), else results.json's."""
    folder = RunFolder(run)
    commit = folder.config()["git_commit"] if folder.exists() else record["git_commit"]
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def mean_sd(values: pd.Series, sign: str = "") -> str:
    """The cell of a per-seed quantity: "mean ± sd" (sample sd), or the mean alone for one seed; sign "+" for
    differences."""
    if len(values) > 1:
        return f"{values.mean():{sign}.2f} ± {values.std(ddof=1):.2f}"
    return f"{values.mean():{sign}.2f}"


def baselines_of(variant_name: str, baseline: str, variants, untagged: bool = True) -> list:
    """The baseline run sets a variant is paired with: the baseline with each prefix of the variant's tag that was
    run, longest first (dbt-n100 with ce-n100; hdkd-n50-w50 with ce-n50: the same protocol, a switch added;
    hdkd-n50-s143 with ce-n50-s143 and with ce-n50), else, if untagged, the untagged baseline (hdkd-T3 with ce)."""
    parts = variant_name.split("-")[1:]
    names = ("-".join([baseline, *parts[:k]]) for k in range(len(parts), 0, -1))
    tagged = [n for n in names if n in variants and n != variant_name]
    return tagged or ([baseline] if untagged and baseline in variants and baseline != variant_name else [])


def comparisons(variants, baselines=("ce", "dbt")) -> list:
    """The (variant, baseline run set) pairs the summary reports, fixed methods first: every variant against CE,
    learned-weight variants against DBT too."""
    pairs = []
    for v in sorted(variants, key=lambda v: (v.split("-")[0] in objectives.LEARNED, v)):
        method = v.split("-")[0]
        for b in baselines:
            if b == "ce" or method in objectives.LEARNED:
                # a baseline's own variants (ce-n50-s143) pair with its shorter tags only (ce-n50), not untagged
                pairs += [(v, base) for base in baselines_of(v, b, variants, untagged=method != b)]
    return pairs


def paired_differences(table: pd.DataFrame, exits, baselines=("ce", "dbt")) -> list:
    """Markdown lines: the per-exit test top-1 difference of runs with the same seed (same split and initial
    network), mean ± sd over the seeds both have: every variant against CE (dbt − ce is the positive control of
    distillation), and learned-weight variants against DBT too."""
    seed = table["run"].map(seed_of)
    top1 = (100 * table.assign(seed=seed).pivot_table(index=["variant", "seed"], columns="exit", values="top1"))
    rows, tests = [], []
    for v, base in comparisons(set(top1.index.get_level_values(0)), baselines):
        seeds = sorted(set(top1.loc[v].index) & set(top1.loc[base].index))
        if not seeds:
            continue
        d = top1.loc[v].loc[seeds] - top1.loc[base].loc[seeds]
        d["mean over exits"] = d.mean(axis=1)
        cells = {(f"exit {c}" if c != "mean over exits" else c): mean_sd(d[c], "+") for c in d.columns}
        rows.append({"difference": f"{v} − {base}", "seeds": len(seeds), **cells})
        if len(seeds) > 1:
            tests.append(paired_test_row(f"{v} − {base}", d["mean over exits"]))
    if not rows:
        return []
    lines = ["", "Paired differences of test top-1 (points), same seed = same split and initial network; "
                 "mean ± sd over seeds:", "", pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)]
    if tests:
        lines += ["", "Paired tests of the mean over exits (points; t-test on the per-seed differences, the 95% "
                      "interval two-sided; sign-flip: exact permutation p of mean > 0). Read by the protocol's rule, "
                      "not by eye:", "", pd.DataFrame(tests).to_markdown(index=False, disable_numparse=True)]
    return lines


def paired_test_row(name: str, differences: pd.Series) -> dict:
    """One row of the paired-tests table: mean, SE, 95% interval and p values of per-seed differences."""
    try:
        r = stats.paired_test(differences.to_numpy())
    except ImportError as e:  # a lent GPU without scipy: the summary is rebuilt on the CPU machine
        return {"difference": name, "seeds": len(differences), "mean": f"{differences.mean():+.2f}", "SE": str(e)}
    return {"difference": name, "seeds": r["n"], "mean": f"{r['mean']:+.2f}", "SE": f"{r['se']:.2f}",
            "95% interval": f"[{r['low']:+.2f}, {r['high']:+.2f}]", "p (one-sided, > 0)": f"{r['p_greater']:.3f}",
            "p (two-sided)": f"{r['p_two_sided']:.3f}", "p (sign-flip, > 0)": f"{r['p_sign_flip']:.3f}"}


def per_seed_rows(table: pd.DataFrame) -> list:
    """Markdown lines: per variant and seed, the test top-1 (%) mean over the exits: the number the protocols'
    per-seed rules read (a paired difference is two cells of one column)."""
    seed = table["run"].map(seed_of)
    means = (100 * table.assign(seed=seed).groupby(["variant", "seed"]).top1.mean()).unstack("seed")
    cells = means.map(lambda v: "" if np.isnan(v) else f"{v:.2f}").rename(columns=lambda s: f"seed {s}")
    return ["", "Test top-1 (%) per seed, mean over the exits:", "",
            cells.rename_axis(index="run", columns=None).reset_index().to_markdown(index=False, disable_numparse=True)]


def per_exit_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of (variant, exit, top1 in %) as a table: a row per variant, "mean ± sd" over seeds per exit column."""
    return rows.groupby(["variant", "exit"]).top1.agg(mean_sd).unstack("exit").rename(columns=lambda k: f"exit {k}")


def validation_rows(results: Path, names) -> list:
    """Markdown lines: per variant, the last epoch's validation top-1 per exit, mean ± sd over seeds. The held-out
    split is where settings are chosen (the test table is for reporting); the learned-weight methods also fit
    their weights to it, so it flatters them against the baselines, but not one such variant against another."""
    rows = [{"variant": variant(n), "run": n, "exit": k + 1, "top1": 100 * v}
            for n in names for k, v in enumerate(RunFolder(results / n).metrics()[-1]["val_top1"])]
    val = pd.DataFrame(rows)
    per_seed = val.groupby(["variant", "run"]).top1.mean()
    table = per_exit_cells(val)
    table["mean over exits"] = per_seed.groupby(level=0).agg(mean_sd)
    return ["", "Per-exit validation top-1 (%) after the last epoch, mean ± sd over seeds (the held-out split on "
                "which settings are chosen; learned-weight methods also fit their weights to it):", "",
            table.rename_axis("run").reset_index().to_markdown(index=False, disable_numparse=True)]


def fit_reached(rows) -> str:
    """The last epoch's training top-1 (%) of the first and the last exit: whether the run fit its data (the
    training batches are augmented and the network is in train mode, so this is a slight underestimate)."""
    first, last = rows[-1]["train_top1"][0], rows[-1]["train_top1"][-1]
    return f"{100 * first:.1f} / {100 * last:.1f}"


def weight_learning_runs(records: dict) -> dict:
    """The runs whose loss weights learned: a learned-weight method, not frozen (at its start or at another
    run's weights); their weights get a table and a figure."""
    return {n: r for n, r in records.items()
            if r["config"]["method"] in objectives.LEARNED and not r["config"].get("freeze_weights_from")}


EARLY_STUDENTS = 4  # the protocols' "students 1-4": the early exits whose KD weight their rules read


def kd_weight_per_student(weights: dict, num_exits: int) -> np.ndarray:
    """Each student exit's KD weights summed over its teachers (exits 1 .. K-1), as recorded: loss scale included."""
    matrix = plots.weight_matrix(weights, num_exits)
    return np.nansum(np.triu(matrix, 1), axis=1)[:-1]


def students_kd_rows(final: dict, start: dict, num_exits: int) -> list:
    """Markdown lines: per run, each student's KD weight at the end, and the mean over students 1-4 at the end,
    at the start and as a fraction of the start (the quantity the protocols' "keeps distillation" rules read).
    final: run -> its learned weights; start: run -> the weights it began from."""
    rows = []
    for run, weights in final.items():
        end, begin = kd_weight_per_student(weights, num_exits), kd_weight_per_student(start[run], num_exits)
        early_end, early_start = end[:EARLY_STUDENTS].mean(), begin[:EARLY_STUDENTS].mean()
        rows.append({"run": run, **{f"exit {i + 1}": f"{v:.3f}" for i, v in enumerate(end)},
                     f"students 1-{EARLY_STUDENTS}": f"{early_end:.3f}", "start": f"{early_start:.3f}",
                     "end / start": f"{early_end / early_start:.0%}"})
    return ["", "Students' KD weight at the end of each run (per student exit, its KD weights summed over its "
                "teachers, as recorded: loss scale included):", "",
            pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)]


def summarize(results: Path, epochs_full: int = 300) -> str:
    """Markdown section for one results folder: per-exit test top-1 (mean and spread over seeds), learned
    weights, and per run its device, torch version, epoch time and command. Also writes anytime.png."""
    folders = [f for f in map(RunFolder, sorted(results.glob("*/"))) if f.evaluated()]
    if not folders:
        raise SystemExit(f"no results under {results}")
    table = runfolder.load_results([str(f.path) for f in folders])
    table["variant"] = table["run"].map(variant)
    records = {f.path.name: f.results() for f in folders}
    meta = _read_runs_json(results / "RUNS.json")
    invocations = meta.get("invocations", [])
    at_once = {run: inv["jobs"] for inv in invocations for run in inv["runs"]}  # the last invocation that trained it
    exits = sorted(table.exit.unique())
    percent = table.assign(top1=100 * table.top1)
    acc = percent.groupby(["variant", "exit"]).top1.agg(["mean", "count"])
    out = [f"## {results.name}", ""]
    if meta.get("note"):
        out += [meta["note"], ""]
    per_exit = per_exit_cells(percent)
    per_exit.insert(0, "seeds", acc["count"].groupby(level=0).first().astype(int))
    per_exit["mean"] = acc["mean"].groupby(level=0).mean().map(lambda v: f"{v:.2f}")
    out += ["Per-exit test top-1 (%), mean ± standard deviation over seeds:", "",
            per_exit.rename_axis("run").reset_index().to_markdown(index=False, disable_numparse=True)]
    out += per_seed_rows(table)
    out += paired_differences(table, exits)
    out += validation_rows(results, list(records))
    learned = weight_learning_runs(records)
    for name in sorted({variant(n) for n in learned}):
        mats = [plots.weight_matrix(r["weights"], len(exits)) for n, r in learned.items() if variant(n) == name]
        matrix = pd.DataFrame(np.mean(mats, axis=0), index=pd.Index(exits, name="exit"), columns=exits)
        seeds = f"mean over {len(mats)} seeds" if len(mats) > 1 else "one seed"
        out += ["", f"Final learned weights of {name} ({seeds}): row = student exit, "
                    "diagonal = its CE weight, column j > row = weight of KD from exit j:", "",
                matrix.map(lambda v: "" if np.isnan(v) else f"{v:.3f}").reset_index().to_markdown(index=False, disable_numparse=True)]
    starts = {}
    for name, r in learned.items():
        cfg = config.config_from_dict(resume.stored_config(r["config"]))
        starts[name] = objectives.build(cfg.method, len(exits), **cfg.objective_options()).named_weights()
    if learned:
        out += students_kd_rows({n: r["weights"] for n, r in learned.items()}, starts, len(exits))
    per_run = []
    for name, r in records.items():
        rows = RunFolder(results / name).metrics()
        epoch = _median([row["epoch_seconds"] for row in rows])
        per_run.append({"run": name, "device": r["device"], "torch": r["packages"]["torch"],
                        "at once": at_once.get(name, "?"), "epochs": len(rows), "epoch": f"{epoch:.1f} s",
                        "train wall": f"{sum(row['epoch_seconds'] for row in rows) / 60:.1f} min",
                        f"{epochs_full} epochs": f"{epoch * epochs_full / 3600:.2f} h",
                        "images/s": f"{_median([row['images_per_s'] for row in rows]):.0f}",
                        "train top-1 (first / last exit)": fit_reached(rows),
                        "commit": began(results / name, r)})
    out += ["", f"Per run (epoch: median epoch wall time, training only; at once: runs that shared the device; "
                f"{epochs_full} epochs: the epoch time {epochs_full} times):", "",
            pd.DataFrame(per_run).to_markdown(index=False, disable_numparse=True)]
    out += ["", "Commands:", "", "```"]
    out += [f"{inv['command']}    # {inv['started']}: {', '.join(inv['runs'])}" for inv in invocations]
    for name, r in records.items():
        cfg = train.config_from_dict({**r["config"], "lr_milestones": tuple(r["config"]["lr_milestones"])})
        out.append(f"python -m hdkdlib.train {' '.join(train.cli_args(cfg))}")
    out += ["```", "", f"![anytime]({results.name}/anytime.png)", ""]

    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    plots.anytime_curves(table.assign(method=table["variant"]), ax=ax,
                         title=f"{results.name}: test top-1 per exit (mean, sd over seeds)")
    fig.savefig(results / "anytime.png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    for name in sorted({variant(n) for n in learned}):  # how the weights moved from their start, every seed
        runs = sorted(n for n in learned if variant(n) == name)
        start = starts[runs[0]]
        accuracy = [[row["train_top1"] for row in RunFolder(results / n).metrics()] for n in runs]
        axes = plots.weights_by_student([learned[n]["weights_history"] for n in runs], len(exits), initial=start,
                                        title=f"{name}: learned loss weights per epoch (epoch 0: the start; dotted: "
                                              f"the exit's training top-1), {len(runs)} seed{'s' * (len(runs) > 1)}",
                                        train_top1=accuracy if all(accuracy) else None)
        axes[0].figure.savefig(results / f"weights-{name}.png", dpi=110, bbox_inches="tight")
        plt.close(axes[0].figure)
        out += [f"![weights of {name}]({results.name}/weights-{name}.png)", ""]
    if (results / "NOTES.md").exists():  # the hand-written reading of these numbers
        out += ["### Observations", "", (results / "NOTES.md").read_text().strip(), ""]
    return "\n".join(out)


def record_invocation(path: Path, args, runs, argv) -> None:
    """RUNS.json: every command that trained runs into this results folder, with how many ran at once."""
    with _locked_runs_json(path) as meta:
        meta["note"] = args.note or meta["note"]
        meta["invocations"].append({"command": "python benchmarks/verify_real_data.py " + shlex.join(argv),
                                    "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                    "epochs": args.epochs, "jobs": min(args.jobs, len(runs)), "runs": runs})


@contextlib.contextmanager
def _locked_runs_json(path: Path):
    """RUNS.json read under an exclusive lock, written back (atomically) if the block changed it: two chains
    started together, or a merge beside a running chain, both get recorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = _read_runs_json(path)
        before = json.dumps(meta, indent=1)
        yield meta
        after = json.dumps(meta, indent=1)
        if after != before:
            atomic_write_text(path, after)


def _read_runs_json(path: Path) -> dict:
    if not path.exists():
        return {"note": "", "invocations": []}
    try:
        meta = records.read_json(path)
        if not isinstance(meta.get("invocations"), list):
            raise ValueError("no list of invocations")
        return meta
    except (ValueError, AttributeError) as e:
        raise SystemExit(f"{path} is not a RUNS.json ({e}): restore it from git") from None


def merge_from(results: Path, other: Path) -> list:
    """Bring the finished runs of another checkout's results folder (a worktree at a fixed commit that trained
    them) into this one: each run's config, results and metrics, and the RUNS.json invocations that trained
    them (each once). Nothing here is overwritten: a run present in both with other contents stops the merge
    before anything is copied. Hand-written files (PROTOCOL*.md, NOTES.md) stay this checkout's.
    Returns the runs copied."""
    if not other.is_dir():
        raise SystemExit(f"--merge-from: no results folder {other}: give the checkout whose "
                         f"results/{results.name}/ holds the runs")
    if other.resolve() == results.resolve():
        raise SystemExit(f"--merge-from: {other} is this results folder: give the other checkout")
    theirs = [d for d in sorted(other.iterdir()) if d.is_dir() and (d / runfolder.RESULTS).is_file()]
    new = []
    for run in theirs:
        missing = [n for n in RUN_FILES if not (run / n).is_file()]
        if missing:
            raise SystemExit(f"--merge-from: {run} lacks {', '.join(missing)}: finish or collect that run first")
        mine = results / run.name
        if not mine.exists():
            new.append(run)
        elif any(not (mine / n).is_file() or (mine / n).read_bytes() != (run / n).read_bytes() for n in RUN_FILES):
            raise SystemExit(f"--merge-from: {run.name} differs between {mine} and {run}; nothing was copied: "
                             f"keep one by hand")
    ours_path = results / "RUNS.json"
    incoming = _read_runs_json(other / "RUNS.json")
    results.mkdir(parents=True, exist_ok=True)
    for run in new:  # copied to a temporary name, then renamed: a half-copied run never looks finished
        part = results / (run.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        for n in RUN_FILES:
            shutil.copy(run / n, part / n)
        part.rename(results / run.name)
    with _locked_runs_json(ours_path) as meta:
        seen = {(i.get("command"), i.get("started")) for i in meta["invocations"]}
        added = [i for i in incoming["invocations"] if (i.get("command"), i.get("started")) not in seen]
        if added:
            meta["invocations"] = sorted(meta["invocations"] + added, key=lambda i: str(i.get("started")))
            meta["note"] = meta.get("note") or incoming.get("note", "")
    return [r.name for r in new]


def write_readme(root: Path = RESULTS) -> Path:
    """results/README.md: a fixed header, then every results/*/SUMMARY.md in name order."""
    sections = [p.read_text() for p in sorted(root.glob("*/SUMMARY.md"))]
    header = ["# Results on real data", "",
              "Metrics of verification runs (never images or weights), written by `benchmarks/verify_real_data.py`;",
              "rebuild with `python benchmarks/verify_real_data.py --summarize-only --name <folder>`. "
              "Every number here comes from the command listed with it.", ""]
    path = root / "README.md"
    atomic_write_text(path, "\n".join(header + sections))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Any other option of python -m hdkdlib.train applies to every run "
                                       "(give such runs a --tag).")
    p.add_argument("--data-root", default=".data/cifar10-jpeg")
    p.add_argument("--methods", nargs="+", default=["ce", "dbt", "hdkd"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", default="50", help="a number, or auto: what fits --minutes (see epochs_within)")
    p.add_argument("--minutes", type=float, default=16.0, help="with --epochs auto: training time for all runs")
    p.add_argument("--throughput", default=str(ROOT / "benchmarks" / "train_throughput.json"),
                   help="with --epochs auto: the speeds, from benchmarks/train_throughput.py")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, as separate processes")
    p.add_argument("--progress", action="store_true", help="progress bars (with --jobs 1)")
    p.add_argument("--split-dir", default=str(ROOT / "runs" / "verify" / "splits"),
                   help="split files of these images (derived from them: kept out of data/splits/, never committed)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "verify"))
    p.add_argument("--results", default=str(RESULTS), help="results root: README.md here, runs in <results>/<name>/")
    p.add_argument("--name", default="cifar10", help="results sub-folder of this set of runs")
    p.add_argument("--note", default="", help="a sentence placed above this set's table (what it is, what not)")
    p.add_argument("--tag", default="", help="run names become <method>-<tag>-seed<k>")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--merge-from", metavar="CHECKOUT",
                   help="copy the finished runs (and their RUNS.json entries) of CHECKOUT/results/<name>/ here, "
                        "then summarize: for runs trained in a worktree at a fixed commit")
    args, rest = p.parse_known_args(argv)
    # every other option is a training setting: typed, checked and explained by hdkdlib.config's parser
    train_options = vars(config.argparser(dataset="folder32", prog="verify_real_data.py (training options)")
                         .parse_args(rest))
    args.train_options = {k: v for k, v in train_options.items() if v is not None}
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.epochs != "auto" and not args.epochs.isdigit():
        p.error(f"--epochs must be a number or auto, got {args.epochs!r}")
    results = Path(args.results).resolve() / args.name
    failed = []
    if args.merge_from:
        copied = merge_from(results, Path(args.merge_from).resolve() / "results" / args.name)
        print(f"merged from {args.merge_from}: {', '.join(copied) or 'no new runs'}")
    elif not args.summarize_only:
        args.epochs = resolve_epochs(args)
        cfgs = configs(args)  # before the chdir: paths given relative to where the script was started
        os.chdir(ROOT)
        results.mkdir(parents=True, exist_ok=True)
        record_invocation(results / "RUNS.json", args, [Path(c.out).name for c in cfgs],
                          sys.argv[1:] if argv is None else argv)
        if args.jobs == 1:
            run_inline(cfgs, results)
        else:
            failed = run_parallel(cfgs, args.jobs, results)
    atomic_write_text(results / "SUMMARY.md", summarize(results))
    print((results / "SUMMARY.md").read_text())
    print(f"written: {write_readme(results.parent)}")
    if failed:
        print(f"failed runs: {', '.join(failed)} (their logs are in {args.runs})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
