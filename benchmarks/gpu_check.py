"""Everything a lent GPU should measure, in ONE device command of at most --budget seconds (default 540):

  (a) device and versions                                      -> device.json
  (b) kernels, host-to-device copies and syncs per step        -> profile.json
      (torch profiler; CE and HDKD, eager and captured, batch 64, in float32 as (e) trains)
  (c) training throughput, images/s, in float32 (as (e)        -> train_throughput.json (row by row)
      trains): CE and HDKD (weight update every step / every
      10), batch 64 and 256, captured,
      eager, and bf16 + channels-last captured; then the whole  -> train_compiled.json
      step compiled (CUDA graphs) at batch 64
  (d) early exit in time at batch 1 and 256                    -> early_exit.json
  (e) with the time left, seeds of the 100-class control       -> results.tgz (metrics and run logs only)
      (results/tin100-cpu-control/PROTOCOL.md): its four control arms, seed 5 first, then 4, ... (the CPU
      chains run upward from 0), in parallel on the GPU, only runs not recorded yet; their records pool
      with the CPU runs. Once the records hold the control's seeds 0-5, its HDKD arms (lr and T chosen by
      the protocol's rule from those records: hdkd_arms), at most four runs at a time and only as many as
      can finish in the time left at (c)'s speed, seed 5 first; in full float32 (NVIDIA_TF32_OVERRIDE=0), as
      on the CPU. Each run's split and data checksums, step mode and TF32 use are written to the log.
  and gpu_check.log, the whole console output. At most 8 files, flat, in --out (default $OUT).
It exits 1 (after writing every file it can) when (e) had no data or no readable records, when captured steps
trained otherwise than eager ones, or when a run failed. Give --budget 60 s under the command's limit_s (the
device tool lowers that limit when less device time is left), e.g. timeout_s 600 and the default 540.

Each part runs under its own deadline and writes its file as soon as it has numbers, so a timeout loses
nothing already measured; a part whose budget is too small is skipped with a line saying so. On the CPU
machine, once (both folders are git-ignored):

    mkdir -p .carry && cp ../shared/data/tinyimagenet100-32.tar.gz .carry/
    # device command (carry [".carry"]):  python3 benchmarks/gpu_check.py
    # back here: tar -xzf <files_at>/results.tgz -C <dir>;
    #   python -m hdkdlib.study --name tin100-cpu-control --merge-from <dir>; commit the merged records
    #   before reading the SUMMARY.md it rewrites (PROTOCOL.md, Amendment 3);
    # copy the tables into benchmarks/RESULTS.md

`--dry-run` runs every part on the CPU with tiny settings (tests/test_benchmarks.py does, on fake images).
Without CUDA and without --dry-run it says so and exits 2. It needs only torch, torchvision, pillow, numpy,
pandas, scipy, tabulate, matplotlib, seaborn and tqdm, which the GPU machine has; nothing of Jupyter.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's hdkdlib: the GPU machine does not install it
from hdkdlib.study import run_name  # noqa: E402  (the one spelling of a run's name)
DATA_SHA256 = "5fe9779d692b4a136c56c89d19d820256282d08dd1516cc74737f3307651ebdf"  # ../shared/data/README.md
DATA_ARCHIVE = "tinyimagenet100-32.tar.gz"
STUDY = "tin100-cpu-control"
# The control arms of results/tin100-cpu-control/PROTOCOL.md: (method, tag, options)
ARMS = [("ce", "n20-lr01", []), ("dbt", "n20-lr01-s100", ["--loss-scale", "1"]),
        ("ce", "n20-lr02", ["--lr", "0.2"]), ("dbt", "n20-lr02-s100", ["--loss-scale", "1", "--lr", "0.2"])]
PROTOCOL = ["--n-per-class", "20", "--val-per-class", "10", "--epochs", "100"]
GPU_PROTOCOL = [*PROTOCOL, "--device", "cuda"]
CLASSES = 100  # tinyimagenet100-32's
GPU_SEEDS = [5, 4, 3, 2, 1, 0]  # downward: the CPU chains run upward from seed 0


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
    archive = ROOT / ".carry" / DATA_ARCHIVE
    if not archive.is_file():
        log(f"no {data_root} and no {archive}: carry .carry (see this script's docstring)")
        return False
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != DATA_SHA256:
        log(f"{archive}: sha256 {digest} is not the data README's {DATA_SHA256}: copy it again")
        return False
    data_root.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(data_root.parent, filter="data")
    return (data_root / "train").is_dir()


def records_of_the_study():
    from hdkdlib.studyrecords import Study
    return Study(ROOT / "results" / STUDY)


def hdkd_arms(last_epochs: dict) -> list:
    """PROTOCOL.md's HDKD arms once the records hold seeds 0-5 of the four control arms ({run: its last epoch's
    metrics}), else []: at the lr where DBT's held-out top-1 (last epoch, mean over exits and seeds 0-5) is higher
    (a tie: 0.1), one at T = 1 (today's default) and one at T fixed at the median of DBT's final temperatures there,
    to one decimal (none when that is 1: it would be the first arm again)."""
    from statistics import median

    from hdkdlib.studyrecords import StudyRecordError
    from hdkdlib.studysummary import held_out_means
    control = {run_name(m, tag, s) for m, tag, _ in ARMS for s in range(6)}
    if not control <= set(last_epochs):
        return []
    for name in sorted(n for n in control if n.startswith("dbt-")):  # a NaN would lose every comparison: lr 0.1
        last = last_epochs[name]
        if not (all(0 <= v <= 1 for v in last.get("val_top1", [math.nan])) and last.get("temperature", 0) > 0):
            raise StudyRecordError(f"{name}'s last epoch lacks its held-out top-1 per exit or its temperature, "
                                   "which fix the HDKD arms: restore the study's records from git")
    held_out = held_out_means({n: last_epochs[n] for n in sorted(control) if n.startswith("dbt-")})
    tag = max(sorted(held_out), key=held_out.get).split("-", 1)[1]  # sorted: lr01 first, so a tie keeps 0.1
    temperature = round(median(last_epochs[run_name("dbt", tag, s)]["temperature"] for s in range(6)), 1)
    options = next(o for m, t, o in ARMS if t == tag)  # --loss-scale 1 and the lr, as DBT ran there
    arms = [("hdkd", f"{tag}-t1", options)]
    if temperature != 1:
        arms.append(("hdkd", f"{tag}-t{temperature:g}", [*options, "--temperature", f"{temperature:g}"]))
    return arms


def recorded_hdkd_arms() -> list:
    records = records_of_the_study()
    runs, curves = records.load()
    return hdkd_arms({n: records.metrics(curves, n)[-1] for n in runs["run"]})


def study_args(data_root, protocol, seed, method, tag, options, runs, results, at_once=1) -> list:
    """`python -m hdkdlib.study`'s arguments for one run of part (e), `at_once` runs sharing the GPU."""
    return ["--data-root", str(data_root), *protocol, "--methods", method, "--tag", tag, *options,
            "--seeds", str(seed), "--runs", str(runs), "--at-once", str(at_once),
            "--jobs", "2",  # a subprocess with its log (one run: the second job slot stays empty)
            "--results", str(results), "--name", STUDY, "--split-dir", str(Path(runs) / "splits")]


def rounds(recorded: set, hdkd: list, seeds=GPU_SEEDS) -> list:
    """Part (e)'s runs that are not recorded yet (a seed's run counts once, from whichever device finished it),
    at most four at a time: the control's arms a seed at a time, then, once PROTOCOL.md fixes them, the HDKD
    arms: [(label, [(seed, method, tag, options), ...]), ...]."""
    def missing(seed, arms):
        return [(seed, *arm) for arm in arms if run_name(arm[0], arm[1], seed) not in recorded]
    plan = [(f"seed {s}", missing(s, ARMS)) for s in seeds if missing(s, ARMS)]
    waiting = [run for s in seeds for run in missing(s, hdkd)]
    for k in range(0, len(waiting), 4):
        members = waiting[k:k + 4]
        plan.append((f"hdkd seed {', '.join(str(s) for s in dict.fromkeys(r[0] for r in members))}", members))
    return plan


def json_or_empty(path: Path) -> dict:
    """A part's JSON record, or {} where the part wrote none (timed out, failed): the caller then goes without."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def captured_steps_that_differ(profile: dict, tolerance: float = 0.01) -> list:
    """Part (b)'s cases whose captured step ended farther from the eager step (same seed and batches) than
    `tolerance` of eager's movement: "hdkd/1 0.31". Part (e)'s runs train captured, so any such case means their
    records would not be the protocol's training. Cases without a distance (part (b) cut short) pass."""
    return [f"{r['method']}/{r['meta_interval'] or 1} {r['distance_from_eager']:.2g}" for r in profile.get("rows", [])
            if r.get("mode") == "cap" and r.get("distance_from_eager") is not None
            and not r["distance_from_eager"] <= tolerance]


# Part (c) times training steps on batches already on the GPU; a run also starts (imports, decodes the data,
# captures its step) and, every epoch, evaluates the held-out split and writes a checkpoint. Sized short, a round's
# runs, which finish together, would all be killed at the deadline with nothing recorded.
RUN_STEPS_SLACK, RUN_START_S = 1.3, 30.0


def seconds_alone(members, throughput: dict, images_per_run: int):
    """Each run's seconds alone on the GPU: its training images at the captured batch-64 speed part (c) measured
    for its method (DBT: CE's), times RUN_STEPS_SLACK, plus RUN_START_S; None where (c) has no number for one."""
    rates = {(r["method"], r.get("meta_interval")): r["images_per_s"] for r in throughput.get("rows", [])
             if r.get("mode") == "cap" and r.get("batch_size") == 64}
    cases = [("hdkd", 1) if method == "hdkd" else ("ce", None) for _, method, _, _ in members]
    if not cases or not all(c in rates for c in cases):
        return None
    return [RUN_STEPS_SLACK * images_per_run / rates[c] + RUN_START_S for c in cases]


def runs_that_fit(members, throughput: dict, images_per_run: int, seconds: float, margin: float = 30) -> int:
    """How many of a round's runs (its first k) can finish together in `seconds`: runs sharing one GPU take turns
    on it (no MPS), so k of them may need the sum of their times alone. All of them where (c) has no number."""
    alone = seconds_alone(members, throughput, images_per_run)
    if alone is None:
        return len(members)
    total, k = margin, 0
    for t in alone:
        if total + t > seconds:
            break
        total, k = total + t, k + 1
    return k


def run_parallel_parts(log, name, cmds, seconds, env, on_finish=lambda: None) -> list:
    """Several commands at once (runs sharing the GPU), stopped together at the deadline or when this script
    stops: each in its own process group, so that the training processes a study starts stop with it.
    on_finish() after each run that ends (the archive: a kill later keeps it). Returns the runs that failed or
    exited with an error (not those stopped at the deadline)."""
    log(f"== ({name}) {len(cmds)} runs at once   [deadline {seconds:.0f} s]")
    start = time.monotonic()
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              process_group=0) for c in cmds]
    def label(k, c):  # a study's run by its name, any other command by its place
        options = ("--methods", "--tag", "--seeds")
        return run_name(*(c[c.index(o) + 1] for o in options)) if all(o in c for o in options) else f"command {k}"
    names = [label(k, c) for k, c in enumerate(cmds)]
    failed = []
    try:
        for run, proc in zip(names, procs):
            output, _ = proc.communicate(timeout=max(seconds - (time.monotonic() - start), 1))
            log(output[-1500:], f"== ({name}) {run}: exit {proc.returncode}")
            if proc.returncode:
                failed.append(run)
            on_finish()
        log(f"== ({name}) done in {time.monotonic() - start:.0f} s")
    except subprocess.TimeoutExpired:  # those stopped are no failure (nothing wrong was recorded); others may be
        stopped = [run for run, proc in zip(names, procs) if proc.poll() is None]
        failed += [run for run, proc in zip(names, procs) if proc.poll() and run not in failed]
        log(f"== ({name}) stopped at its deadline ({', '.join(stopped)}): finished runs are kept")
    finally:  # the deadline, or this script interrupted (SIGTERM is made an exit in main)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    return failed


def log_provenance(log, runs: Path, members) -> None:
    """What each run's config.json says it trained on (the run folders stay on the GPU machine): the split's
    checksum and the data's, how its steps ran and the commit, so that pooling with the CPU runs can be checked
    here."""
    for seed, method, tag, _ in members:
        try:
            record = json.loads((runs / run_name(method, tag, seed) / "config.json").read_text())
        except (OSError, ValueError):
            continue
        log(f"== (e) {run_name(method, tag, seed)}: split {(record.get('split') or {}).get('checksum')}, data "
            f"{(record.get('data') or {}).get('sha256')}, step_mode {record.get('step_mode')}, tf32 "
            f"{record.get('tf32')}, device {record.get('device')}, commit {record.get('git_commit')}")


def merge_early_exit(out: Path) -> None:
    """The per-batch-size early-exit records as one early_exit.json."""
    parts = sorted(out.glob("early_exit-*.json"))
    if parts:
        merged = {p.stem.split("-", 1)[1]: json.loads(p.read_text()) for p in parts}
        (out / "early_exit.json").write_text(json.dumps(merged, indent=1))
        for p in parts:
            p.unlink()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=540, help="seconds for everything (one device command)")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "runs" / "gpu-check")))
    p.add_argument("--data-root", default=str(ROOT / ".data" / "tinyimagenet100-32"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny settings: checks the mechanics only")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM: the runs' cleanup still runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")

    def left(reserve=15.0):  # seconds for the parts still to come, 15 kept for the archive and the last lines
        return max(0.0, args.budget - (time.monotonic() - t0) - reserve)

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

    # in float32, as part (e) trains: (b)'s captured-against-eager check gates (e), and (c)'s speeds size its
    # rounds (TF32 convolutions would be faster, and their rounding, magnified by the finite-difference
    # hypergradient, is no check of float32 training)
    float32 = {**env, "NVIDIA_TF32_OVERRIDE": "0"}

    # (b) kernels, copies and syncs per step
    prof = (["--device", "cpu", "--arch", "toy_mlp", "--batch-size", "4", "--num-classes", "10"] if args.dry_run
            else ["--device", "cuda", "--batch-size", "64"])
    run_part(log, "b", [py, "benchmarks/profile_step.py", *prof, "--json", str(out / "profile.json")],
             min(left(), args.budget * 0.1), 5 if args.dry_run else 20, float32)

    # (c) training throughput: captured and eager first, the compiled step (minutes of compilation) last
    if args.dry_run:
        tp = ["--device", "cpu", "--arch", "toy_mlp", "--batch-sizes", "4", "--modes", "eager", "cap", "--steps", "2",
              "--warmup", "1"]
        compiled = ["--device", "cpu", "--arch", "toy_mlp", "--batch-sizes", "4", "--modes", "net", "--steps", "2",
                    "--warmup", "1", "--methods", "ce"]
    else:
        tp = ["--device", "cuda", "--batch-sizes", "64", "256", "--modes", "cap", "eager", "bf16+cl+cap",
              "--steps", "50", "--warmup", "10"]
        compiled = ["--device", "cuda", "--batch-sizes", "64", "--modes", "step+graph", "--methods", "ce", "hdkd/1",
                    "--steps", "50", "--warmup", "5"]
    run_part(log, "c", [py, "benchmarks/train_throughput.py", *tp, "--json", str(out / "train_throughput.json")],
             min(left(), args.budget * 0.3), 5 if args.dry_run else 60, float32)

    # (d) early exit in time, at batch 1 (latency) and 256 (throughput)
    for bs in (["8"] if args.dry_run else ["1", "256"]):
        ee = (["--device", "cpu", "--arch", "msdnet_cifar_budget", "--batch-size", bs, "--repeats", "1"] if args.dry_run
              else ["--device", "cuda", "--batch-size", bs, "--repeats", "20", "--paths", "eager", "fast", "fast+cl"])
        run_part(log, "d", [py, "benchmarks/early_exit.py", *ee, "--out", str(out / f"early_exit-{bs}.json")],
                 min(left(), args.budget * 0.06), 5 if args.dry_run else 20, env)
    merge_early_exit(out)

    # (e) seeds of the 100-class control with what is left, then the compiled step if time remains
    runs, results = out.parent / (out.name + "-runs"), out.parent / (out.name + "-results")
    failed = []  # what makes this command exit 1: the numbers that did come back stay, the failure is not hidden
    if not unpack_data(log, Path(args.data_root)):
        log("== (e) skipped: no data")
        failed.append("(e): no data")
    else:
        study = (["--epochs", "1", "--arch", "toy_mlp", "--batch-size", "8", "--val-per-class", "4", "--device", "cpu",
                  "--n-per-class", "8"] if args.dry_run else GPU_PROTOCOL)
        differ = captured_steps_that_differ(json_or_empty(out / "profile.json"))
        if differ:
            log(f"== (e) skipped: the captured step trains otherwise than the eager one ({', '.join(differ)} of "
                "eager's movement apart, part (b)): runs trained so would not be the protocol's")
            plan = []
            failed.append("(e): captured steps differ")
        elif args.dry_run:
            plan = rounds(set(), [], GPU_SEEDS[:1])
        else:
            try:
                plan = rounds(set(records_of_the_study().runs()["run"]), recorded_hdkd_arms())
            except Exception as e:  # noqa: BLE001 (damaged records, a StudyRecordError, or a failed read: the
                log(f"== (e) skipped: {type(e).__name__}: {e}")  # compiled step and the other files still come)
                plan = []
                failed.append("(e): the study's records")
        throughput = json_or_empty(out / "train_throughput.json")
        images_per_run = CLASSES * int(study[study.index("--n-per-class") + 1]) * int(study[study.index("--epochs") + 1])
        def archive():  # after every round and on the way out: a kill at the limit keeps the finished runs
            tmp = out / "results.tgz.part"
            with tarfile.open(tmp, "w:gz") as tar:
                if results.is_dir():
                    tar.add(results, arcname="results")
                for f in sorted(runs.glob("*.log")) if runs.is_dir() else []:
                    tar.add(f, arcname=f"logs/{f.name}")
            os.replace(tmp, out / "results.tgz")
        study_env = float32  # like the CPU runs it pools with: NVIDIA's libraries round convolutions to TF32 by default
        try:
            for label, members in plan:
                if left() < (10 if args.dry_run else 120):
                    log(f"== (e) stopped before {label}: {left():.0f} s left")
                    break
                k = runs_that_fit(members, throughput, images_per_run, left())
                if k == 0:  # it would be killed with nothing recorded
                    first = 30 + seconds_alone(members[:1], throughput, images_per_run)[0]
                    log(f"== (e) stopped before {label}: its first run needs at least {first:.0f} s at part (c)'s "
                        f"speed (30 s kept), {left():.0f} s left")
                    break
                if k < len(members):
                    log(f"== (e) {label}: {k} of its {len(members)} runs can finish in the {left():.0f} s left")
                    members = members[:k]
                arms = [[py, "-m", "hdkdlib.study", *study_args(args.data_root, study, seed, method, tag, options,
                                                                runs, results, len(members))]
                        for seed, method, tag, options in members]
                failed += run_parallel_parts(log, f"e {label}", arms, left(), study_env, on_finish=archive)
                log_provenance(log, runs, members)
                archive()
        finally:
            archive()
    run_part(log, "c compiled", [py, "benchmarks/train_throughput.py", *compiled, "--json",
                                 str(out / "train_compiled.json")], left(), 5 if args.dry_run else 120, float32)
    log(f"== done in {time.monotonic() - t0:.0f} s of {args.budget:.0f}; files: "
        + ", ".join(sorted(f.name for f in out.iterdir())))
    if failed:
        log(f"== failed: {', '.join(failed)} (exit 1; the files above are kept)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
