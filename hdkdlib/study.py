"""A study: a protocol's grid of methods x settings x seeds on an image folder, trained in parallel and resumably,
its finished runs recorded in results/<study>/ (hdkdlib.studyrecords) and summarised with paired statistics
(hdkdlib.studysummary). From the command line:

    python -m hdkdlib.study --data-root .data/cifar10-jpeg --methods ce dbt hdkd --seeds 0 1 2 --epochs 50 \
        --name cifar10 --jobs 3 --device cuda --compile step
    python -m hdkdlib.study --name cifar10 --methods hdkd --tag T3 --temperature 3 ...   # a variant beside them
    python -m hdkdlib.study --summarize-only                       # every SUMMARY.md and results/README.md again
    python -m hdkdlib.study --name cifar10 --merge-from ../worktree   # runs trained in another checkout
    python -m hdkdlib.study --name cifar10 --figures               # figures/<study>/*.png (never committed)

and from a notebook: `study.run(["ce", "hdkd"], seeds=[0, 1], name=..., epochs=..., **training settings)`, then
`study.Study(path).runs()` and `studysummary.paired_differences(...)`.

Each run trains in runs/<study>/<run>/, <run> = <method>[-<tag>]-seed<k> (rerun the same command after an
interruption: finished runs are recorded, begun ones resume from their checkpoints). --jobs N trains N runs at once
as separate `python -m hdkdlib.train` processes (logs in runs/<study>/<run>.log, a progress line a minute); their
epoch times then measure a shared device, and the records say how many shared it. Any other option of
`python -m hdkdlib.train` (e.g. --temperature 3) applies to every run. Only settings and metrics are recorded,
never images, weights or split files (a split is derived from the images' labels; its checksum is in the config).
A run joins a study only beside runs of its protocol: its variant's runs differ from it in the seed alone (and in
where and how fast they trained), and every run of the study saw the same data (the decoded pixels' sha256, where
the run recorded one); anything else is refused, nothing written.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import cli, config, objectives, records, resume, studyrecords, studysummary, train
from .paths import atomic_write_text, project_root
from .runfolder import RunFolder
from .studyrecords import Study, StudyRecordError

ROOT = project_root()
STUDY_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def portable(path) -> str:
    """A path relative to the project root when inside it, so recorded commands work on any checkout."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_name(method: str, tag: str, seed: int) -> str:
    return f"{method}{'-' + tag if tag else ''}-seed{seed}"


def configs(methods, seeds, runs, tag: str = "", **settings) -> List[train.TrainConfig]:
    """One config per (method, seed), seed-major (pairs complete one by one); paths relative to the project root,
    the directory runs are trained from."""
    fixed = sorted(set(settings) & {"method", "seed", "out"})
    if fixed:
        raise ValueError(f"cannot set {', '.join(fixed)} per run: use --methods, --seeds, --runs/--tag")
    for key in ("data_root", "split_dir"):
        if settings.get(key):
            settings[key] = portable(settings[key])
    names = [run_name(method, tag, seed) for seed in seeds for method in methods]
    unrecordable = [n for n in names if not studyrecords.RUN_NAME.match(n)]
    if unrecordable:  # refused before training: a run whose name runs.csv cannot hold would train for nothing
        raise ValueError(f"run name {unrecordable[0]!r} cannot be recorded in runs.csv: seeds are whole numbers >= 0, "
                         "and a tag is letters, digits, '.', '_' or '+' (parts joined by '-'): change --seeds or --tag")
    settings = {"dataset": "folder32", **settings}
    return [train.TrainConfig(**settings, method=method, seed=seed,
                              out=str(Path(portable(runs)) / run_name(method, tag, seed))).validate()
            for seed in seeds for method in methods]


def epochs_within(minutes: float, throughput: dict, methods, seeds, train_images: int, meta_interval: int = 1,
                  batch_size: int = 64, bounds=(4, 60)) -> int:
    """Epochs for which all runs, one after another, train in `minutes` at the speeds that
    benchmarks/train_throughput.py measured (compiled rows preferred): CE-cost methods at the CE speed,
    learned-weight methods at the HDKD speed with the nearest meta interval. Clamped to `bounds`: fewer than
    4 epochs cannot place the two lr drops apart."""
    rows = [r for r in throughput["rows"] if r["batch_size"] == batch_size] or throughput["rows"]
    modes = {r["mode"] for r in rows}
    preferred = next((m for m in ("step+graph", "compile", "step") if m in modes), "eager")  # compiled rows first
    rows = [r for r in rows if r["mode"] == preferred]
    ce = next((r["images_per_s"] for r in rows if r["method"] == "ce"), None)
    if ce is None:
        raise ValueError("no CE row among the speeds")
    learned = [r for r in rows if r["method"] != "ce"]
    hdkd = min(learned, key=lambda r: abs(r["meta_interval"] - meta_interval))["images_per_s"] if learned else ce
    seconds_per_epoch = len(seeds) * sum(train_images / (hdkd if m in objectives.LEARNED else ce) for m in methods)
    return int(min(max(minutes * 60 // seconds_per_epoch, bounds[0]), bounds[1]))


def train_images(data_root, settings: dict) -> int:
    classes = [d for d in (Path(data_root) / "train").iterdir() if d.is_dir()]
    cfg = train.TrainConfig(**{"dataset": "folder32", **settings})
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
        epochs = begun[0].config()["config"].get("epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"--epochs auto takes the epochs of the runs begun in {args.runs}, but "
                             f"{begun[0].file('config.json')} records {epochs!r}: give --epochs N")
        print(f"epochs auto: {epochs}, as the runs already begun in {args.runs}", flush=True)
        return epochs
    path = Path(args.throughput)
    if not path.exists():
        raise SystemExit(f"--epochs auto needs the speeds in {path}: run benchmarks/train_throughput.py first")
    n = train_images(args.data_root, args.train_options)
    probe = train.TrainConfig(**{"dataset": "folder32", **args.train_options})
    try:
        epochs = epochs_within(args.minutes, records.read_json(path), args.methods, args.seeds, n,
                               probe.meta_interval, probe.batch_size)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # an old or hand-edited speeds file
        raise ValueError(f"--epochs auto cannot read the speeds in {path} ({type(e).__name__}: {e}): run "
                         "benchmarks/train_throughput.py again, or give --epochs N") from None
    print(f"epochs auto: {epochs} ({len(args.methods)} methods x {len(args.seeds)} seeds, {n} training images, "
          f"{args.minutes} minutes at the speeds in {path})", flush=True)
    return epochs


class Recorder:
    """Puts each finished run's record in the study, with the command that trained it and how many shared the
    device."""

    def __init__(self, study: Study, invocation: str = "", at_once=1):
        self.study, self.invocation, self.at_once = study, invocation, at_once
        self.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def __call__(self, cfg) -> None:
        resume.resolve(cfg, "auto")  # a finished folder left by another command (other settings) is refused
        self.study.add([studyrecords.record_from_run_folder(cfg.out, self.at_once, self.invocation, self.started)])


def finished(cfg) -> bool:
    return RunFolder(cfg.out).finished()


def run_parallel(cfgs, jobs: int, record, poll_s: float = 60.0) -> list:
    """Train the runs `jobs` at a time as subprocesses; returns the names of runs that failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    waiting, active, failed = [c for c in cfgs if not finished(c)], {}, []
    try:
        _watch(waiting, active, failed, cfgs, jobs, record, env, poll_s)
    finally:  # a failure here (a record refused, Ctrl-C) stops the runs it started: none trains unwatched
        for cfg, proc, log in active.values():
            proc.terminate()
            proc.wait()
            log.close()
    return failed


def _watch(waiting, active, failed, cfgs, jobs, record, env, poll_s) -> None:
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
                record(cfg)
                print(f"== done {name}", flush=True)
            else:
                failed.append(name)
                tail = Path(cfg.out).with_suffix(".log").read_text()[-1500:]
                print(f"== FAILED {name} (exit {proc.returncode}); end of its log:\n{tail}", flush=True)
        if time.monotonic() - last_report >= poll_s or not (waiting or active):
            last_report = time.monotonic()
            print(time.strftime("%H:%M:%S ") + " · ".join(
                f"{Path(c.out).name} {len(RunFolder(c.out).metrics())}/{c.epochs}" for c in cfgs), flush=True)


def run(methods, seeds, name: str, results=None, runs=None, tag: str = "", jobs: int = 1,
        invocation: str = "", at_once: int = 0, **settings) -> Study:
    """Train (or resume, or pick up) every (method, seed) run of a study and record the finished ones in
    results/<name>/; returns the study. `settings` are TrainConfig fields shared by every run (data_root, epochs,
    ...). Runs train from the project root (paths in the configs are relative to it, so records are portable)."""
    study = Study(Path(results or ROOT / "results") / name)
    runs = Path(runs or ROOT / "runs" / name)
    settings.setdefault("split_dir", str(runs / "splits"))
    settings["progress"] = bool(settings.get("progress")) and jobs == 1  # bars of parallel runs would interleave
    cfgs = configs(methods, seeds, runs, tag, **settings)
    recorded = set(study.runs()["run"])  # a recorded run is done: never trained again, its record never replaced
    if recorded & {Path(c.out).name for c in cfgs}:
        print(f"already recorded in {study.path}: {', '.join(sorted(recorded & {Path(c.out).name for c in cfgs}))}")
    cfgs = [c for c in cfgs if Path(c.out).name not in recorded]
    record = Recorder(study, invocation, at_once or min(jobs, len(cfgs)))
    here = Path.cwd()
    os.chdir(ROOT)  # the configs' paths are relative to the project root
    try:
        for cfg in cfgs:
            if finished(cfg):  # trained, not yet recorded (stopped between the two)
                record(cfg)
        if jobs == 1:
            for cfg in (c for c in cfgs if not finished(c)):
                print(f"== {Path(cfg.out).name}: {' '.join(train.cli_args(cfg))}", flush=True)
                train.run(cfg)
                record(cfg)
            failed = []
        else:
            failed = run_parallel(cfgs, jobs, record)
    finally:
        os.chdir(here)
    if failed:
        raise RunsFailed(failed)
    return study


class RunsFailed(RuntimeError):
    def __init__(self, names):
        self.names = names
        super().__init__(f"failed runs: {', '.join(names)}")


def merge_from(study: Study, other: Path) -> List[str]:
    """Bring the finished runs of another checkout's study folder (a worktree at a fixed commit that trained them,
    or the results a lent GPU brought back) into this study. Its records, or, in a folder of run copies
    (config.json, metrics.jsonl, results.json per run), those made from them. Nothing here is overwritten: a run
    recorded here stays as it is, and one that the other folder holds with other numbers (the same seed finished
    on another device too) is named; a run counts once, from whichever device's record came first. Hand-written
    files (PROTOCOL*.md, NOTES.md) stay this checkout's. Returns the runs added."""
    if not other.is_dir():
        raise SystemExit(f"--merge-from: no results folder {other}: give the checkout whose "
                         f"results/{study.name}/ holds the runs")
    if other.resolve() == study.path.resolve():
        raise SystemExit(f"--merge-from: {other} is this study's folder: give the other checkout")
    theirs = Study(other)
    if theirs.exists():
        runs, curves = theirs.load()
        incoming = [({k: v for k, v in row.items() if not k.startswith("setting:")},
                     curves.loc[curves["run"] == row["run"]].dropna(axis=1, how="all").to_dict("records"))
                    for row in (r.dropna().to_dict() for _, r in runs.iterrows())]
    else:
        invocations = legacy_invocations(other)
        incoming = [_run_copy_record(d, invocations) for d in sorted(other.iterdir())
                    if d.is_dir() and (d / "results.json").is_file()]
    return study.add(incoming, on_differ=lambda run: print(
        f"kept {run} as recorded in {study.path}: {other} holds it with other numbers (a run counts once, from the "
        "record that came first)", file=sys.stderr))


def _run_copy_record(folder: Path, invocations: list) -> tuple:
    """The record of a run copy in an older checkout's study folder, or one line saying why it is none."""
    last = [i for i in invocations if folder.name in i.get("runs", [])]  # the last command that trained it
    provenance = (str(last[-1].get("jobs", "?")), str(last[-1].get("command", "")), str(last[-1].get("started", ""))
                  ) if last else ("?", "", "")
    try:
        return studyrecords.record_from_run_folder(folder, *provenance)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        if isinstance(e, StudyRecordError):
            raise
        raise StudyRecordError(f"{folder} is not a finished run's copy ({type(e).__name__}: {e}): finish or "
                               "collect that run, or move the folder out of the study") from None


def legacy_invocations(folder: Path) -> list:
    """The commands that trained the runs of a folder of run copies (its RUNS.json, the older layout), each
    {"command", "started", "jobs", "runs"}; none without the file."""
    path = folder / "RUNS.json"
    if not path.is_file():
        return []
    meta = records.read_json(path)
    invocations = meta.get("invocations") if isinstance(meta, dict) else None
    if not isinstance(invocations, list) or not all(isinstance(i, dict) and isinstance(i.get("runs", []), list)
                                                    for i in invocations):
        raise StudyRecordError(f"{path} is not a RUNS.json (an object whose 'invocations' list the commands and "
                               "their runs): restore it from git in that checkout")
    return invocations


def write_summaries(study: Study) -> Path:
    """SUMMARY.md of the study, under the study's lock (a chain finishing a run meanwhile waits: the summary holds
    every run recorded when it was written), and the index results/README.md under the results folder's lock (two
    studies summarising at once write it one after the other, so the last one written reads both)."""
    with study.locked():
        path = atomic_write_text(study.path / "SUMMARY.md", studysummary.summarize(study))
    with studyrecords.locked(study.path.parent / studyrecords.INDEX_LOCK):
        atomic_write_text(study.path.parent / "README.md", studysummary.index(studyrecords.studies(study.path.parent)))
    return path


def draw_figures(study: Study, folder: Optional[Path] = None) -> List[Path]:
    """The study's anytime curves and, per learned-weight variant, its weights by student beside the training
    accuracy: PNGs in figures/<study>/ (drawn from the records; never committed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import paths, plots
    folder = Path(folder or paths.figures_dir() / study.name)
    folder.mkdir(parents=True, exist_ok=True)
    runs, curves = study.load()
    if runs.empty:
        raise StudyRecordError(f"no runs recorded in {study.path}: check --name and --results")
    table = studyrecords.per_exit(runs)
    flops = studyrecords.per_exit(runs, "flops").rename(columns={"top1": "flops"})
    table = table.merge(flops[["run", "exit", "flops"]], on=["run", "exit"])
    fig, ax = plt.subplots(figsize=(6, 4))
    plots.anytime_curves(table.assign(method=table["variant"]), ax=ax,
                         title=f"{study.name}: test top-1 per exit (mean, sd over seeds)")
    written = [folder / "anytime.png"]
    fig.savefig(written[0], dpi=130, bbox_inches="tight")
    plt.close(fig)
    records_ = {n: study.record(runs, n) for n in runs["run"]}
    learned = studysummary.weight_learning_runs(records_)
    exits = int(table.exit.max())
    for name in sorted({studyrecords.variant(n) for n in learned}):
        names = sorted(n for n in learned if studyrecords.variant(n) == name)
        epochs = [study.metrics(curves, n) for n in names]
        axes = plots.weights_by_student([[row["weights"] for row in rows] for rows in epochs], exits,
                                        initial=studysummary.initial_weights(learned[names[0]], exits),
                                        title=f"{name}: learned loss weights per epoch (epoch 0: the start; dotted: "
                                              f"the exit's training top-1), {len(names)} seed{'s' * (len(names) > 1)}",
                                        train_top1=[[row["train_top1"] for row in rows] for rows in epochs])
        written.append(folder / f"weights-{name}.png")
        axes[0].figure.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(axes[0].figure)
    return written


def argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hdkdlib.study", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other option of python -m hdkdlib.train applies to every run "
                                       "(give such runs a --tag).")
    p.add_argument("--name", help="the study: its records go to <results>/<name>/ (with --summarize-only and "
                                 "no name: every study)")
    p.add_argument("--data-root", default=".data/cifar10-jpeg", help="an image folder (train/ and val/ of classes)")
    p.add_argument("--methods", nargs="+", default=["ce", "dbt", "hdkd"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tag", default="", help="run names become <method>-<tag>-seed<k>")
    p.add_argument("--epochs", default="50", help="a number, or auto: what fits --minutes (see epochs_within)")
    p.add_argument("--minutes", type=float, default=16.0, help="with --epochs auto: training time for all runs")
    p.add_argument("--throughput", default=str(ROOT / "benchmarks" / "train_throughput.json"),
                   help="with --epochs auto: the speeds, from benchmarks/train_throughput.py")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, as separate processes")
    p.add_argument("--at-once", type=int, default=0, help="runs sharing the device, recorded per run, when several "
                                                          "study commands train at once (default: this one's runs)")
    p.add_argument("--progress", action="store_true", help="progress bars (with --jobs 1)")
    p.add_argument("--runs", help="where the runs train (default runs/<name>)")
    p.add_argument("--split-dir", help="split files of these images (default <runs>/splits; derived from the "
                                       "images, never committed)")
    p.add_argument("--results", default=str(ROOT / "results"), help="results root: README.md here, the study in "
                                                                    "<results>/<name>/")
    p.add_argument("--summarize-only", action="store_true", help="write SUMMARY.md and README.md from the records")
    p.add_argument("--merge-from", metavar="CHECKOUT",
                   help="add the finished runs of CHECKOUT/results/<name>/ (records or run copies), then summarize")
    p.add_argument("--figures", action="store_true", help="draw the study's figures into figures/<name>/")
    return p


def parse_args(argv) -> argparse.Namespace:
    """The study's options, with `train_options`: the training settings given (every option the study's own
    parser does not know, typed, checked and explained by hdkdlib.config's parser)."""
    p = argparser()
    args, rest = p.parse_known_args(argv)
    options = vars(config.argparser(dataset="folder32", prog="python -m hdkdlib.study (training options)")
                   .parse_args(rest))
    args.train_options = {k: v for k, v in options.items() if v is not None}
    if args.jobs < 1 or args.at_once < 0:
        p.error("--jobs must be >= 1 and --at-once >= 0")
    if args.epochs != "auto" and not args.epochs.isdigit():
        p.error(f"--epochs must be a number or auto, got {args.epochs!r}")
    if not args.name and not args.summarize_only:
        p.error("--name is required (the study), except with --summarize-only")
    if args.name and not STUDY_NAME.match(args.name):
        p.error(f"--name {args.name!r}: a study's name is one folder name (letters, digits, . _ -)")
    return args


def run_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig fields every run of the command shares (what `run` takes as settings)."""
    settings = {**args.train_options, "data_root": args.data_root, "epochs": resolve_epochs(args),
                "progress": args.progress}
    if args.split_dir:
        settings["split_dir"] = args.split_dir
    return settings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    failed = []
    try:
        if not args.name:
            for each in studyrecords.studies(Path(args.results)):
                print(f"written: {write_summaries(each)}")
            return 0
        study = Study(Path(args.results).resolve() / args.name)
        args.runs = args.runs or str(ROOT / "runs" / args.name)
        if args.merge_from:
            added = merge_from(study, Path(args.merge_from).resolve() / "results" / args.name)
            print(f"merged from {args.merge_from}: {', '.join(added) or 'no new runs'}")
        elif args.figures:
            print("\n".join(f"written: {p}" for p in draw_figures(study)))
            return 0
        elif not args.summarize_only:
            try:
                run(args.methods, args.seeds, args.name, results=study.path.parent, runs=args.runs, tag=args.tag,
                    jobs=args.jobs, invocation="python -m hdkdlib.study " + shlex.join(argv), at_once=args.at_once,
                    **run_settings(args))
            except RunsFailed as e:
                failed = e.names
        if study.exists():
            try:
                print(write_summaries(study).read_text())
                print(f"written: {study.path.parent / 'README.md'}")
            except ImportError as e:  # a lent GPU without tabulate: its records are written, the summary is not
                if "tabulate" not in str(e) or args.summarize_only:
                    raise
                print(f"summary not written ({e}): the records are; run --summarize-only where the project's "
                      "requirements are installed", file=sys.stderr)
        elif args.summarize_only or args.merge_from:
            raise StudyRecordError(f"no study at {study.path} (no {studyrecords.RUNS}): check --name and --results")
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
        # bad records or settings (StudyRecordError is one), bad data (DatasetError), a file in the way, a busy
        # or refused run folder: the same one line as python -m hdkdlib.train; the same command resumes
        print("error: " + cli.error_line(e), file=sys.stderr)
        return 2
    if failed:
        print(f"failed runs: {', '.join(failed)} (their logs are in {args.runs})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
