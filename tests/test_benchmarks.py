"""The scripts under benchmarks/: they run where a GPU is lent for minutes, so their mechanics are checked here."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hdkdlib import data

ROOT = Path(__file__).resolve().parent.parent


def _fake_cifar_folder(root: Path) -> Path:
    data.write_fake_image_folder(root, classes=[f"c{i}" for i in range(4)], n_per_class=(20, 5), size=32, ext=".jpg")
    (root / "val").rename(root / "test")  # CIFAR-10 as JPEG has train/ and test/
    return root


def _cells(line: str) -> list:
    """The stripped cells of one markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_throughput_cases_name_the_exact_horizon():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train_throughput import parse_case, measure
    finally:
        sys.path.pop(0)
    assert [parse_case(c) for c in ("ce", "hdkd/10", "hdkd/8/h4")] == [("ce", 1, 0), ("hdkd", 10, 0), ("hdkd", 8, 4)]
    for bad in ("hdkd/x", "hdkd/1/4", "hdkd/1/h2/3", "/2"):
        with pytest.raises(SystemExit, match="bad case .*METHOD/INTERVAL/hK"):
            parse_case(bad)
    row = measure("toy_mlp", "hdkd", 1, 4, "eager", torch.device("cpu"), steps=1, warmup=1, num_classes=10, horizon=2)
    assert row["meta_horizon"] == 2 and row["images_per_s"] > 0


def test_real_data_verification_script_parallel_equals_inline(tmp_path):
    """benchmarks/verify_real_data.py: runs trained as parallel CLI processes give the same numbers as runs
    trained in-process; the summary holds them with mean and spread, and README.md collects the sections."""
    _fake_cifar_folder(tmp_path / "img")
    common = [sys.executable, str(ROOT / "benchmarks" / "verify_real_data.py"), "--data-root", str(tmp_path / "img"),
              "--methods", "ce", "hdkd", "--seeds", "0", "1", "--epochs", "1", "--arch", "toy_mlp", "--batch-size", "8", "--lr", "0.01",
              "--val-per-class", "4", "--device", "cpu", "--split-dir", str(tmp_path / "splits"),
              "--results", str(tmp_path / "results")]
    for name, jobs in (("parallel", "2"), ("inline", "1")):
        result = subprocess.run(common + ["--runs", str(tmp_path / name), "--name", name, "--jobs", jobs],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert (tmp_path / "parallel" / "hdkd-seed1.log").exists()

    def top1(name):
        return {p.parent.name: [r["top1"] for r in json.loads(p.read_text())["anytime"]]
                for p in (tmp_path / "results" / name).glob("*/results.json")}
    parallel, inline = top1("parallel"), top1("inline")
    assert sorted(parallel) == ["ce-seed0", "ce-seed1", "hdkd-seed0", "hdkd-seed1"] and parallel == inline

    # an ablation variant beside them: a training option changes a setting, --tag names the runs; NOTES.md is kept in
    (tmp_path / "results" / "parallel" / "NOTES.md").write_text("A hand-written reading.")
    one_run = common[:common.index("--methods")] + ["--methods", "hdkd", "--seeds", "0"] + common[common.index("--epochs"):]
    result = subprocess.run(one_run + ["--runs", str(tmp_path / "parallel"), "--name", "parallel", "--tag", "T2",
                                       "--temperature", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    tagged = json.loads((tmp_path / "results" / "parallel" / "hdkd-T2-seed0" / "results.json").read_text())
    assert tagged["config"]["temperature"] == 2.0

    summary = (tmp_path / "results" / "parallel" / "SUMMARY.md").read_text()
    rows = [_cells(l) for l in summary.splitlines() if l.startswith("|") and not l.startswith("|-")]
    ce = np.array([parallel["ce-seed0"], parallel["ce-seed1"]]) * 100
    row = next(r for r in rows if r[:2] == ["ce", "2"])
    assert row[2] == f"{ce[:, 0].mean():.2f} ± {ce[:, 0].std(ddof=1):.2f}"
    assert any(r[:2] == ["hdkd-T2", "1"] for r in rows)
    hdkd = np.array([parallel["hdkd-seed0"], parallel["hdkd-seed1"]]) * 100
    paired = next(r for r in rows if r[0] == "hdkd − ce")
    diff = hdkd[:, 0] - ce[:, 0]  # the same seeds paired
    assert paired[1] == "2" and paired[2] == f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f}"
    # the validation table: the last epoch's val_top1 of each run (metrics.jsonl), mean over seeds
    def last_val(run):
        rows = (tmp_path / "results" / "parallel" / run / "metrics.jsonl").read_text().splitlines()
        return np.array(json.loads(rows[-1])["val_top1"]) * 100
    val = np.array([last_val("ce-seed0"), last_val("ce-seed1")])
    val_section = summary[summary.index("Per-exit validation top-1"):]
    val_row = next(_cells(l) for l in val_section.splitlines() if l.startswith("| ce "))
    assert val_row[1] == f"{val[:, 0].mean():.2f} ± {val[:, 0].std(ddof=1):.2f}"
    assert val_row[-1] == f"{val.mean(1).mean():.2f} ± {val.mean(1).std(ddof=1):.2f}"
    assert "Final learned weights of hdkd (mean over 2 seeds)" in summary and "Final learned weights of hdkd-T2" in summary
    kd_section = summary[summary.index("Students' KD weight at the end"):]
    assert {r[0] for r in map(_cells, kd_section.splitlines()[4:7])} == {"hdkd-seed0", "hdkd-seed1", "hdkd-T2-seed0"}
    at_once = {r[0]: r[3] for r in rows if "-seed" in r[0] and len(r) > 3 and r[1].startswith("cpu")}
    assert at_once == {"ce-seed0": "2", "ce-seed1": "2", "hdkd-seed0": "2", "hdkd-seed1": "2", "hdkd-T2-seed0": "1"}
    commands = [l for l in summary.splitlines() if l.startswith("python benchmarks/verify_real_data.py")]
    assert len(commands) == 2 and "--jobs 2" in commands[0] and "--tag T2" in commands[1]
    assert sum(l.startswith("python -m hdkdlib.train") for l in summary.splitlines()) == 5
    assert summary.rstrip().endswith("### Observations\n\nA hand-written reading.")
    assert (tmp_path / "results" / "parallel" / "weights-hdkd.png").exists()
    assert (tmp_path / "results" / "parallel" / "weights-hdkd-T2.png").exists()
    readme = (tmp_path / "results" / "README.md").read_text()
    assert readme.index("## inline") < readme.index("## parallel")
    assert (tmp_path / "results" / "parallel" / "anytime.png").exists()


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.py in one command with CPU settings: every part writes its file, the archive holds
    the runs' metrics and logs, and at most 8 flat files come back."""
    img = _fake_cifar_folder(tmp_path / "img")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
           "--data-root", str(img), "--budget", "3000"]  # a bound, not a target: each part gets a share of it, and
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)  # a busy CPU ran early_exit past 144 s
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    files = sorted(f.name for f in out.iterdir())
    parts = "\n".join(line for line in (out / "gpu_check.log").read_text().splitlines() if line.startswith("== ("))
    assert files == ["device.json", "early_exit.json", "gpu_check.log", "profile.json", "results.tgz",
                     "train_compiled.json", "train_throughput.json"], parts
    assert json.loads((out / "device.json").read_text())["dry_run"] is True
    profiled = json.loads((out / "profile.json").read_text())["rows"]
    assert {(r["method"], r["mode"]) for r in profiled} == {(m, k) for m in ("ce", "hdkd") for k in ("eager", "cap")}
    throughput = json.loads((out / "train_throughput.json").read_text())  # benchmarks/train_throughput.py
    rows = throughput["rows"]
    assert {(r["mode"], r["method"], r["meta_interval"]) for r in rows} == {
        (m, c, i) for m in ("eager", "cap") for c, i in (("ce", None), ("hdkd", 1), ("hdkd", 10))}
    assert all(r["first_step_s"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert all(r["meta_horizon"] is None for r in rows)  # the default cases: finite differences, one step
    assert throughput["data_path"][0]["data_path_images_per_s"] > 0
    assert [r["mode"] for r in json.loads((out / "train_compiled.json").read_text())["rows"]] == ["net"]
    assert [r["path"] for r in json.loads((out / "early_exit.json").read_text())["8"]["paths"]] == ["eager", "fast"]
    with tarfile.open(out / "results.tgz") as archive:
        names = archive.getnames()
    for arm in ("ce-n20-lr01", "dbt-n20-lr01-s100", "ce-n20-lr02", "dbt-n20-lr02-s100"):  # the control's arms, seed 5
        assert f"results/tin100-cpu-control/{arm}-seed5/results.json" in names and f"logs/{arm}-seed5.log" in names, \
            (out / "gpu_check.log").read_text()[-4000:]
    log = (out / "gpu_check.log").read_text()
    assert all(f"== ({part}) exit 0" in log for part in ("b", "c", "d", "c compiled")), parts

    # a budget too small for the later parts: they are skipped with a line saying so, the earlier files stay
    small = subprocess.run(cmd[:-1] + ["30"] + ["--out", str(tmp_path / "small")], capture_output=True, text=True,
                           timeout=600)
    assert small.returncode == 0, small.stderr[-2000:]
    assert "skipped" in (tmp_path / "small" / "gpu_check.log").read_text()
    assert (tmp_path / "small" / "device.json").exists()


def test_gpu_check_without_cuda_says_so():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", "/tmp/none"],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "no CUDA device here" in done.stdout


def _verify_module():
    spec = importlib.util.spec_from_file_location("verify_real_data", ROOT / "benchmarks" / "verify_real_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_differences_pair_each_protocol_with_its_own_baseline():
    """dbt-n100 is paired with ce-n100, not with ce-n50 or an untagged ce; hdkd-T3 with the untagged ce and dbt;
    hdkd-n50-w50 (a switch in the n50 protocol) with ce-n50 and dbt-n50; hdkd-n50-s143 with ce-n50-s143 and ce-n50; the cells are mean ± sd over the seeds both variants have (hand-computed here)."""
    module = _verify_module()
    top1 = {("ce-n100", 0): [0.50, 0.60], ("ce-n100", 1): [0.52, 0.58], ("dbt-n100", 0): [0.55, 0.61],
            ("dbt-n100", 1): [0.56, 0.60], ("ce-n50", 0): [0.10, 0.10], ("dbt-n50", 0): [0.20, 0.30],
            ("ce", 0): [0.40, 0.40], ("dbt", 0): [0.45, 0.40], ("hdkd-T3", 0): [0.50, 0.50],
            ("hdkd-n50-w50", 0): [0.30, 0.30], ("ce-n50-s143", 0): [0.15, 0.15], ("hdkd-n50-s143", 0): [0.40, 0.40]}
    table = pd.DataFrame([{"run": f"{v}-seed{s}", "variant": v, "exit": k + 1, "top1": t}
                          for (v, s), values in top1.items() for k, t in enumerate(values)])
    lines = module.paired_differences(table, [1, 2])
    rows = {c[0]: c[1:] for c in map(_cells, lines[3].splitlines()[2:])}
    # the paired t-test of the mean over exits, for comparisons with 2+ seeds: dbt-n100 − ce-n100 only here
    tests = {c[0]: c[1:] for c in map(_cells, lines[7].splitlines()[2:])}
    assert list(tests) == ["dbt-n100 − ce-n100"]
    assert tests["dbt-n100 − ce-n100"][:3] == ["2", "+3.00", "0.00"]  # 3 points at both seeds: no spread
    assert set(rows) == {"dbt-n100 − ce-n100", "dbt-n50 − ce-n50", "dbt − ce", "hdkd-T3 − ce", "hdkd-T3 − dbt",
                         "hdkd-n50-w50 − ce-n50", "hdkd-n50-w50 − dbt-n50", "ce-n50-s143 − ce-n50",
                         "hdkd-n50-s143 − ce-n50-s143", "hdkd-n50-s143 − ce-n50", "hdkd-n50-s143 − dbt-n50"}
    d1, d2 = np.array([5.0, 4.0]), np.array([1.0, 2.0])  # exit 1 and exit 2 of dbt-n100 − ce-n100 at seeds 0, 1
    mean_over_exits = (d1 + d2) / 2
    assert rows["dbt-n100 − ce-n100"] == ["2", f"{d1.mean():+.2f} ± {d1.std(ddof=1):.2f}",
                                          f"{d2.mean():+.2f} ± {d2.std(ddof=1):.2f}",
                                          f"{mean_over_exits.mean():+.2f} ± {mean_over_exits.std(ddof=1):.2f}"]
    assert rows["dbt-n50 − ce-n50"] == ["1", "+10.00", "+20.00", "+15.00"]
    assert rows["hdkd-T3 − dbt"] == ["1", "+5.00", "+10.00", "+7.50"]
    assert rows["hdkd-n50-w50 − ce-n50"] == ["1", "+20.00", "+20.00", "+20.00"]
    assert rows["hdkd-n50-w50 − dbt-n50"] == ["1", "+10.00", "+0.00", "+5.00"]
    # a variant of a baseline (CE at another step size) pairs with the protocol's CE, and a variant sharing its tag
    # with both: with each of them
    assert rows["ce-n50-s143 − ce-n50"] == ["1", "+5.00", "+5.00", "+5.00"]
    assert rows["hdkd-n50-s143 − ce-n50-s143"] == ["1", "+25.00", "+25.00", "+25.00"]
    assert rows["hdkd-n50-s143 − ce-n50"] == ["1", "+30.00", "+30.00", "+30.00"]


def test_per_seed_table_holds_each_runs_mean_over_exits():
    module = _verify_module()
    top1 = {("ce", 0): [0.40, 0.50], ("ce", 3): [0.10, 0.20], ("hdkd-h4", 3): [0.333, 0.334]}
    table = pd.DataFrame([{"run": f"{v}-seed{s}", "variant": v, "exit": k + 1, "top1": t}
                          for (v, s), values in top1.items() for k, t in enumerate(values)])
    header, _, *rows = map(_cells, module.per_seed_rows(table)[-1].splitlines())
    assert header == ["run", "seed 0", "seed 3"]
    assert rows == [["ce", "45.00", "15.00"], ["hdkd-h4", "", "33.35"]]


def test_only_runs_whose_weights_learned_get_a_weights_table():
    records = {"hdkd-seed0": {"config": {"method": "hdkd", "freeze_weights_from": ""}},
               "hdkd-frozen-seed0": {"config": {"method": "hdkd", "freeze_weights_from": "init"}},
               "hdkd-old-seed0": {"config": {"method": "hdkd"}},  # begun before the setting existed
               "dbt-seed0": {"config": {"method": "dbt", "freeze_weights_from": ""}}}
    assert list(_verify_module().weight_learning_runs(records)) == ["hdkd-seed0", "hdkd-old-seed0"]


def test_students_kd_weight_sums_each_students_teachers():
    """The rules' "students' KD weight": per student exit its KD weights summed over its teachers (CE weights and
    the last exit left out), then the mean over students 1-4 against the same at the start (hand-computed)."""
    module = _verify_module()
    num_exits = 6
    start = {f"ce{i}": 1.0 for i in range(1, 7)}
    start.update({f"kd{i}<-{j}": 0.1 for i in range(1, 6) for j in range(i + 1, 7)})
    final = dict(start, **{"kd1<-6": 0.5, "kd1<-2": 0.3, "kd4<-5": 0.0, "kd5<-6": 2.0, "ce1": 9.0})
    per_student = module.kd_weight_per_student(final, num_exits)
    np.testing.assert_allclose(per_student, [0.3 + 3 * 0.1 + 0.5, 0.4, 0.3, 0.1, 2.0])
    lines = module.students_kd_rows({"hdkd-seed0": final}, {"hdkd-seed0": start}, num_exits)
    header, _, row = (_cells(l) for l in lines[-1].splitlines())
    assert header == ["run", "exit 1", "exit 2", "exit 3", "exit 4", "exit 5", "students 1-4", "start", "end / start"]
    early_end, early_start = (1.1 + 0.4 + 0.3 + 0.1) / 4, (0.5 + 0.4 + 0.3 + 0.2) / 4
    assert row == ["hdkd-seed0", "1.100", "0.400", "0.300", "0.100", "2.000", f"{early_end:.3f}", f"{early_start:.3f}",
                   f"{early_end / early_start:.0%}"]


def test_fit_reached_reads_the_last_epoch():
    module = _verify_module()
    rows = [{"train_top1": [0.1, 0.2, 0.3]}, {"train_top1": [0.912, 0.5, 0.9876]}]
    assert module.fit_reached(rows) == "91.2 / 98.8"


def test_epochs_within_a_time_budget():
    epochs_within = _verify_module().epochs_within
    rows = [dict(method="ce", meta_interval=None, batch_size=64, mode="step+graph", images_per_s=1000.0),
            dict(method="hdkd", meta_interval=1, batch_size=64, mode="step+graph", images_per_s=500.0),
            dict(method="hdkd", meta_interval=10, batch_size=64, mode="step+graph", images_per_s=900.0),
            dict(method="ce", meta_interval=None, batch_size=64, mode="eager", images_per_s=10.0)]
    # one epoch of ce + dbt + hdkd, 2 seeds, 45,000 images: 2 * (45 + 45 + 90) s = 360 s; 60 minutes -> 10 epochs
    assert epochs_within(60, {"rows": rows}, ["ce", "dbt", "hdkd"], [0, 1], 45_000) == 10
    assert epochs_within(60, {"rows": rows}, ["hdkd"], [0], 45_000, meta_interval=8) == 60  # 50 s/epoch: 72, capped
    assert epochs_within(1, {"rows": rows}, ["ce", "dbt", "hdkd"], [0, 1], 45_000) == 4     # too little time: 4


def test_early_exit_benchmark_reports_every_exit_for_each_path(tmp_path):
    out = tmp_path / "ee.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "early_exit.py"), "--device", "cpu",
                             "--arch", "msdnet_cifar_budget", "--batch-size", "8", "--repeats", "1", "--json",
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    for path in ("eager", "fast"):
        mine = [r for r in rows if r["path"] == path]
        exits = [r for r in mine if isinstance(r["exit"], int)]
        assert [r["exit"] for r in exits] == [1, 2, 3, 4, 5]
        assert all(set(r) >= {"flops_ratio", "latency_ratio", "time_ratio"} for r in exits)
        flops = [r["flops_ratio"] for r in exits]
        assert flops == sorted(flops) and flops[-1] == 1.0 and exits[-1]["latency_ratio"] == 1.0
        assert [r["exit"] for r in mine if not isinstance(r["exit"], int)] == ["all", "mixed"]
    record = json.loads(out.read_text())
    for p in record["paths"]:
        assert p["mixed"]["predictions_equal_to_simulation"] == p["mixed"]["samples"] == 8
    assert record["paths"][1]["agreement_with_eager"]["compared"] == 40


def test_threads_benchmark_smoke(tmp_path):
    """benchmarks/threads.py: a row per case and machine state, with the time at 1 thread and at every core."""
    out = tmp_path / "threads.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "threads.py"), "--repeats", "2",
                             "--cases", "toy MLP, full batch (01, 06)", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["machine"] for r in rows] == ["quiet", "busy (1 core taken)"]
    cores = rows[0]["cores"]
    assert all(r["1 thread ms"] > 0 and r[f"{cores} / 1 thread"] > 0 for r in rows)


def _record_many(path, tag, n, go):
    from types import SimpleNamespace
    module = _verify_module()
    go.wait(60)  # both chains loaded: they append at the same moments
    for i in range(n):
        module.record_invocation(Path(path), SimpleNamespace(note="", epochs=1, jobs=1), [f"{tag}{i}"], [tag, str(i)])


def test_two_chains_recording_their_commands_at_once_lose_none(tmp_path):
    """Two chains started together (ce and dbt) each append to RUNS.json: every invocation is kept."""
    import multiprocessing
    import time
    path, n = tmp_path / "RUNS.json", 150
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    chains = [context.Process(target=_record_many, args=(str(path), tag, n, go)) for tag in ("ce", "dbt")]
    for chain in chains:
        chain.start()
    time.sleep(5)  # not a timing assertion: lets both import the script before they race
    go.set()
    for chain in chains:
        chain.join(120)
        assert chain.exitcode == 0
    runs = sorted(r for entry in json.loads(path.read_text())["invocations"] for r in entry["runs"])
    assert runs == sorted([f"ce{i}" for i in range(n)] + [f"dbt{i}" for i in range(n)])


def _results_folder(root: Path, runs: dict, invocations: list) -> Path:
    """A results/<name>/ folder: runs maps a run name to its files' texts; RUNS.json lists the invocations."""
    for run, files in runs.items():
        (root / run).mkdir(parents=True)
        for name, text in files.items():
            (root / run / name).write_text(text)
    (root / "RUNS.json").write_text(json.dumps({"note": "", "invocations": invocations}, indent=1))
    return root


def _run_files(tag: str) -> dict:
    return {"config.json": f'{{"run": "{tag}"}}', "metrics.jsonl": f'{{"epoch": 1, "run": "{tag}"}}\n',
            "results.json": f'{{"anytime": [], "run": "{tag}"}}'}


def test_merge_from_a_worktree_copies_finished_runs_once_and_overwrites_nothing(tmp_path):
    """--merge-from: the worktree's finished runs and the invocations that trained them arrive once each, in
    the order they were started; unfinished runs stay behind; a run that differs stops the merge before any copy."""
    merge_from = _verify_module().merge_from
    older = {"command": "python benchmarks/verify_real_data.py --seeds 0", "started": "2026-12-01 10:00 UTC",
             "runs": ["ce-seed0"]}
    newer = {"command": "python benchmarks/verify_real_data.py --seeds 1", "started": "2026-12-02 10:00 UTC",
             "runs": ["ce-seed1", "ce-seed2"]}
    latest = {"command": "python benchmarks/verify_real_data.py --seeds 9", "started": "2026-12-03 10:00 UTC",
              "runs": ["ce-seed9"]}
    ours = _results_folder(tmp_path / "main", {"ce-seed0": _run_files("0")}, [older, latest])
    unfinished = {k: v for k, v in _run_files("2").items() if k != "results.json"}
    theirs = _results_folder(tmp_path / "worktree",
                             {"ce-seed0": _run_files("0"), "ce-seed1": _run_files("1"), "ce-seed2": unfinished},
                             [newer, older])
    assert merge_from(ours, theirs) == ["ce-seed1"]
    assert {p.name for p in ours.iterdir() if p.is_dir()} == {"ce-seed0", "ce-seed1"}
    for name, text in _run_files("1").items():
        assert (ours / "ce-seed1" / name).read_text() == text
    assert json.loads((ours / "RUNS.json").read_text())["invocations"] == [older, newer, latest]
    before = (ours / "RUNS.json").read_text()
    assert merge_from(ours, theirs) == [] and (ours / "RUNS.json").read_text() == before  # idempotent

    (theirs / "ce-seed3").mkdir()
    for name, text in _run_files("3").items():
        (theirs / "ce-seed3" / name).write_text(text)
    (theirs / "ce-seed0" / "results.json").write_text('{"anytime": [], "run": "another"}')
    with pytest.raises(SystemExit, match="ce-seed0 differs between .*nothing was copied"):
        merge_from(ours, theirs)
    assert not (ours / "ce-seed3").exists() and (ours / "RUNS.json").read_text() == before
    assert (ours / "ce-seed0" / "results.json").read_text() == _run_files("0")["results.json"]
    with pytest.raises(SystemExit, match="is this results folder"):
        merge_from(ours, ours)
    (theirs / "RUNS.json").write_text("[1, 2]")
    (theirs / "ce-seed0" / "results.json").write_text(_run_files("0")["results.json"])
    with pytest.raises(SystemExit, match="is not a RUNS.json .*restore it from git"):
        merge_from(ours, theirs)
