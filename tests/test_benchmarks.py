"""The scripts under benchmarks/: they run where a GPU is lent for minutes, so their mechanics are checked here."""
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from hdkdlib import data, studyrecords
from hdkdlib.studyrecords import StudyRecordError
from hdkdlib.studyrecords import Study

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


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.py in one command with CPU settings: every part writes its file, the archive holds
    the runs' metrics and logs, and at most 8 flat files come back."""
    img = _fake_cifar_folder(tmp_path / "img")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
           "--data-root", str(img), "--budget", "6000"]  # a bound, not a target: each part gets a share of it (the
    # dry run's work is fixed), and a busy CPU (two pytest workers beside two training runs) ran early_exit past 180 s
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    files = sorted(f.name for f in out.iterdir())
    parts = "\n".join(line for line in (out / "gpu_check.log").read_text().splitlines() if line.startswith("== ("))
    assert files == ["device.json", "early_exit.json", "gpu_check.log", "profile.json", "results.tgz",
                     "train_compiled.json", "train_throughput.json"], parts
    assert json.loads((out / "device.json").read_text())["dry_run"] is True
    profiled = json.loads((out / "profile.json").read_text())["rows"]
    assert {(r["method"], r["mode"]) for r in profiled} == {(m, k) for m in ("ce", "hdkd") for k in ("eager", "cap")}
    assert all(r["distance_from_eager"] == 0.0 for r in profiled)  # on a CPU "cap" runs eagerly: the same steps
    throughput = json.loads((out / "train_throughput.json").read_text())  # benchmarks/train_throughput.py
    rows = throughput["rows"]
    assert {(r["mode"], r["method"], r["meta_interval"]) for r in rows} == {
        (m, c, i) for m in ("eager", "cap") for c, i in (("ce", None), ("hdkd", 1), ("hdkd", 10))}
    assert all(r["first_step_s"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert all(r["meta_horizon"] is None for r in rows)  # the default cases: finite differences, one step
    assert throughput["data_path"][0]["data_path_images_per_s"] > 0
    assert [r["mode"] for r in json.loads((out / "train_compiled.json").read_text())["rows"]] == ["net"]
    early_exit = json.loads((out / "early_exit.json").read_text())["8"]
    assert [r["path"] for r in early_exit["paths"]] == ["eager", "fast"]
    _check_early_exit_record(early_exit)
    with tarfile.open(out / "results.tgz") as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "back", filter="data")
    recorded = set(Study(tmp_path / "back" / "results" / "tin100-cpu-control").runs()["run"])
    back = Study(tmp_path / "back" / "results" / "tin100-cpu-control")
    assert back.record(back.runs(), "ce-n20-lr01-seed5")["at_once"] == "4"  # the four arms shared the device
    for arm in ("ce-n20-lr01", "dbt-n20-lr01-s100", "ce-n20-lr02", "dbt-n20-lr02-s100"):  # the control's arms, seed 5
        assert f"{arm}-seed5" in recorded and f"logs/{arm}-seed5.log" in names, (out / "gpu_check.log").read_text()[-4000:]
    assert not [n for n in names if n.endswith((".json", ".png"))]  # the study's records, no run folders
    log = (out / "gpu_check.log").read_text()
    assert all(f"== ({part}) exit 0" in log for part in ("b", "c", "d", "c compiled")), parts
    assert all(f"== (e seed 5) {arm}-seed5: exit 0" in log for arm in ("ce-n20-lr01", "dbt-n20-lr02-s100")), parts

    # a budget too small for every part after (a): each is skipped with a line saying so, (a)'s file stays
    small = subprocess.run(cmd[:-1] + ["6"] + ["--out", str(tmp_path / "small")], capture_output=True, text=True,
                           timeout=600)
    assert small.returncode == 0, small.stderr[-2000:]
    log = (tmp_path / "small" / "gpu_check.log").read_text()
    assert all(f"== ({part}) skipped" in log for part in ("b", "c", "d", "c compiled")) and "== (e) stopped" in log, log
    assert (tmp_path / "small" / "device.json").exists()
    # no data for (e): every other file still comes back, and the command says it failed
    nodata = cmd[:cmd.index("--data-root") + 1] + [str(tmp_path / "missing")] + cmd[cmd.index("--data-root") + 2:-1]
    failed = subprocess.run(nodata + ["6", "--out", str(tmp_path / "nodata")], capture_output=True, text=True,
                            timeout=600)
    log = (tmp_path / "nodata" / "gpu_check.log").read_text()
    assert failed.returncode == 1 and "== failed: (e): no data (exit 1" in log, log
    assert (tmp_path / "nodata" / "device.json").exists()


def test_gpu_check_without_cuda_says_so():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", "/tmp/none"],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "no CUDA device here" in done.stdout


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_gpu_check_chooses_the_hdkd_arms_by_the_protocols_rule():
    """tin100-cpu-control's HDKD arms: none until the four control arms have seeds 0-5; then at the lr where DBT's
    held-out top-1 (mean over exits and seeds) is higher, a tie going to 0.1, with T = 1 and T = the median of
    DBT's final temperatures there to one decimal (hand-computed below); one arm when that median is 1."""
    gpu_check = _gpu_check()
    last = {f"ce-n20-lr0{k}-seed{s}": {"val_top1": [0.9, 0.9]} for k in (1, 2) for s in range(6)}  # plays no part
    last.update({f"dbt-n20-lr01-s100-seed{s}": {"val_top1": [0.20, 0.30], "temperature": t}
                 for s, t in enumerate([2.0, 2.5, 2.7, 3.0, 9.0, 1.0])})
    last.update({f"dbt-n20-lr02-s100-seed{s}": {"val_top1": [0.10, 0.20 + 0.01 * s], "temperature": 4.0}
                 for s in range(6)})
    # lr 0.1: 25% at every seed; lr 0.2: 15% + 0.5 s% -> 16.25% on average: lr 0.1; median of 1, 2, 2.5, 2.7, 3, 9 = 2.6
    arms = gpu_check.hdkd_arms(last)
    assert arms == [("hdkd", "n20-lr01-s100-t1", ["--loss-scale", "1"]),
                    ("hdkd", "n20-lr01-s100-t2.6", ["--loss-scale", "1", "--temperature", "2.6"])]
    better = {**last, **{f"dbt-n20-lr02-s100-seed{s}": {"val_top1": [0.30, 0.30], "temperature": 4.04}
                         for s in range(6)}}
    assert gpu_check.hdkd_arms(better)[1] == ("hdkd", "n20-lr02-s100-t4", ["--loss-scale", "1", "--lr", "0.2",
                                                                          "--temperature", "4"])
    # a tie, also when the same accuracies come at other seeds (float sums in another order)
    accuracies = [[0.172, 0.514, 0.232, 0.012, 0.789, 0.204, 0.552], [0.942, 0.88, 0.561, 0.237, 0.414, 0.526, 0.352],
                  [0.975, 0.867, 0.591, 0.361, 0.47, 0.931, 0.275], [0.675, 0.561, 0.623, 0.98, 0.746, 0.005, 0.392],
                  [0.802, 0.877, 0.84, 0.977, 0.907, 0.96, 0.758], [0.524, 0.828, 0.132, 0.531, 0.796, 0.574, 0.21]]
    order = [2, 4, 1, 5, 0, 3]  # lr 0.2's seeds: unrounded, its mean comes out 1.4e-14 higher
    tie = {**last, **{f"dbt-n20-lr0{k}-s100-seed{s}": {"val_top1": accuracies[s if k == 1 else order[s]],
                                                       "temperature": 2.0} for k in (1, 2) for s in range(6)}}
    assert gpu_check.hdkd_arms(tie)[0][1] == "n20-lr01-s100-t1"
    cold = {**last, **{f"dbt-n20-lr01-s100-seed{s}": {"val_top1": [0.2, 0.3], "temperature": 1.04} for s in range(6)}}
    assert gpu_check.hdkd_arms(cold) == [("hdkd", "n20-lr01-s100-t1", ["--loss-scale", "1"])]  # T_dbt rounds to 1
    for missing in ("dbt-n20-lr02-s100-seed5", "dbt-n20-lr01-s100-seed0", "ce-n20-lr02-seed3"):
        assert gpu_check.hdkd_arms({k: v for k, v in last.items() if k != missing}) == []
    # a blank held-out exit would lose every comparison (lr 0.1 by default), a lost temperature end part (e)
    for damage in ({"val_top1": [float("nan"), 0.3], "temperature": 2.0}, {"val_top1": [0.3, 0.3]}):
        with pytest.raises(StudyRecordError, match="dbt-n20-lr02-s100-seed3's last epoch lacks its held-out"):
            gpu_check.hdkd_arms({**better, "dbt-n20-lr02-s100-seed3": damage})
    # part (e)'s plan: only runs not recorded; the control's arms a seed at a time, then HDKD's four runs at a time
    recorded = {f"{m}-{tag}-seed{s}" for m, tag, _ in gpu_check.ARMS for s in (0, 1, 2, 3, 4)} - {"ce-n20-lr02-seed4"}
    recorded |= {"hdkd-n20-lr01-s100-t2.6-seed4"}
    plan = gpu_check.rounds(recorded, arms, seeds=[5, 4, 3, 2])
    assert [label for label, _ in plan] == ["seed 5", "seed 4", "hdkd seed 5, 4, 3", "hdkd seed 3, 2"]
    assert plan[0][1] == [(5, *arm) for arm in gpu_check.ARMS]
    assert plan[1][1] == [(4, "ce", "n20-lr02", ["--lr", "0.2"])]
    assert [(seed, tag) for seed, _, tag, _ in plan[2][1]] == [(5, "n20-lr01-s100-t1"), (5, "n20-lr01-s100-t2.6"),
                                                               (4, "n20-lr01-s100-t1"), (3, "n20-lr01-s100-t1")]
    assert [(seed, tag) for seed, _, tag, _ in plan[3][1]] == [(3, "n20-lr01-s100-t2.6"), (2, "n20-lr01-s100-t1"),
                                                               (2, "n20-lr01-s100-t2.6")]
    # the committed records: until they hold seeds 0-5 of the four control arms, no HDKD arm is chosen
    recorded = set(gpu_check.records_of_the_study().runs()["run"])
    complete = all(f"{m}-{tag}-seed{s}" in recorded for m, tag, _ in gpu_check.ARMS for s in range(6))
    assert bool(gpu_check.recorded_hdkd_arms()) == complete


def test_gpu_runs_of_the_study_pool_with_its_recorded_cpu_runs(tmp_path):
    """Part (e)'s commands give each arm the settings of that arm's committed CPU runs (recorded by an older
    commit's script): the study takes a GPU seed beside them, not refusing it as another protocol. The HDKD arms
    (hypothetical lr and T here) make configs of the same protocol as their control arm."""
    from hdkdlib import config, study
    gpu_check = _gpu_check()
    records = gpu_check.records_of_the_study()
    rows = records.runs().to_dict("records")
    arms = [*gpu_check.ARMS, ("hdkd", "n20-lr02-s100-t2.3", ["--loss-scale", "1", "--lr", "0.2", "--temperature", "2.3"])]
    for method, tag, options in arms:
        args = study.parse_args(gpu_check.study_args(tmp_path / "data", gpu_check.GPU_PROTOCOL, 5, method, tag,
                                                     options, tmp_path / "runs", tmp_path / "results"))
        cfg, = study.configs(args.methods, args.seeds, args.runs, args.tag, **study.run_settings(args))
        assert cfg.device == "cuda" and cfg.seed == 5 and cfg.method == method
        row = {"run": f"{method}-{tag}-seed5", "variant": f"{method}-{tag}", "config": json.dumps(config.config_to_dict(cfg))}
        if method != "hdkd":
            assert any(r["variant"] == row["variant"] for r in rows), row["variant"]
            records._refuse_other_protocol(rows, row)  # raises StudyRecordError naming the settings that differ
        else:
            dbt = json.loads(next(r["config"] for r in rows if r["variant"] == "dbt-n20-lr02-s100"))
            mine = config.config_to_dict(cfg)
            shared = set(mine) & set(dbt) - studyrecords.NOT_PROTOCOL - studyrecords.NOT_SETTINGS
            assert {k for k in shared if mine[k] != dbt[k]} == {"temperature"}  # the method aside
            assert mine["temperature"] == 2.3


def _running(pid: int) -> bool:
    """Whether a process runs (a zombie nobody reaped, as in a container without init, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def test_a_round_that_cannot_finish_is_known_before_it_starts():
    """Part (e) cuts a round to its first runs whose times alone add up to the time left (runs sharing a GPU take
    turns), and skips it when none fits: killed at the deadline it would record nothing. A run's time alone is
    its training images at part (c)'s captured batch-64 speed, x 1.3 for the epochs' evaluations and checkpoints,
    plus 30 s to start. DBT trains at CE's speed; without a number: unknown."""
    gpu_check = _gpu_check()
    rows = [{"method": "ce", "meta_interval": None, "batch_size": 64, "mode": "cap", "images_per_s": 1000.0},
            {"method": "hdkd", "meta_interval": 1, "batch_size": 64, "mode": "cap", "images_per_s": 250.0},
            {"method": "hdkd", "meta_interval": 1, "batch_size": 64, "mode": "eager", "images_per_s": 50.0},
            {"method": "hdkd", "meta_interval": 10, "batch_size": 64, "mode": "cap", "images_per_s": 900.0},
            {"method": "ce", "meta_interval": None, "batch_size": 256, "mode": "cap", "images_per_s": 9000.0}]
    control = [(5, "ce", "n20-lr01", []), (5, "dbt", "n20-lr02-s100", ["--loss-scale", "1", "--lr", "0.2"])]
    # 200,000 images: 200 s at 1,000/s -> 1.3 x 200 + 30 = 290 s; 800 s at 250/s -> 1,070 s
    assert gpu_check.seconds_alone(control, {"rows": rows}, 200_000) == pytest.approx([290.0, 290.0])
    hdkd = [*control, (4, "hdkd", "n20-lr01-s100-t1", ["--loss-scale", "1"])]
    assert gpu_check.seconds_alone(hdkd, {"rows": rows}, 200_000) == pytest.approx([290.0, 290.0, 1070.0])
    assert gpu_check.seconds_alone(hdkd, {"rows": rows[:1]}, 200_000) is None  # no HDKD number: unknown
    assert gpu_check.seconds_alone(control, {}, 200_000) is None  # part (c) wrote nothing
    # runs sharing the GPU take turns: k of them fit when the sum of their times alone (and 30 s) does
    assert gpu_check.runs_that_fit(hdkd, {"rows": rows}, 200_000, 1679) == 2  # 30 + 290 + 290, then 1,070 more
    assert gpu_check.runs_that_fit(hdkd, {"rows": rows}, 200_000, 1681) == 3
    assert gpu_check.runs_that_fit(hdkd, {"rows": rows}, 200_000, 319) == 0
    assert gpu_check.runs_that_fit(hdkd, {}, 200_000, 10) == 3  # no number: the round is not cut


def test_part_e_trusts_the_gpu_only_where_captured_steps_train_as_eager_ones():
    """Part (b) trains each case eager and captured from one seed on the same batches; a captured step that ends
    apart (a stale buffer, a lost lr change) would make every run of part (e) wrong, so (e) is skipped then."""
    gpu_check = _gpu_check()
    rows = [{"method": "ce", "meta_interval": None, "mode": "eager", "distance_from_eager": 0.0},
            {"method": "ce", "meta_interval": None, "mode": "cap", "distance_from_eager": 2e-5},
            {"method": "hdkd", "meta_interval": 1, "mode": "eager", "distance_from_eager": 0.0},
            {"method": "hdkd", "meta_interval": 1, "mode": "cap", "distance_from_eager": 0.31}]
    assert gpu_check.captured_steps_that_differ({"rows": rows}) == ["hdkd/1 0.31"]
    assert gpu_check.captured_steps_that_differ({"rows": rows[:2]}) == []
    assert gpu_check.captured_steps_that_differ({"rows": [{**rows[3], "distance_from_eager": float("nan")}]})
    assert gpu_check.captured_steps_that_differ({}) == []  # part (b) wrote nothing: nothing known against it


def test_a_round_past_its_deadline_stops_the_training_its_studies_started(tmp_path):
    """gpu_check's runs at once: at the deadline each command's whole process group is killed, so the training
    process a study starts (its child) does not go on using the GPU after gpu_check has stopped."""
    gpu_check = _gpu_check()
    spawn = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(120)']); open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(120)")
    pidfiles = [tmp_path / f"child{k}" for k in range(2)]
    cmds = [[sys.executable, "-c", spawn, str(f)] for f in pidfiles]
    lines = []
    start = time.monotonic()
    gpu_check.run_parallel_parts(lambda *text: lines.extend(text), "e seed 5", cmds, 5, dict(os.environ))
    assert time.monotonic() - start < 60 and any("stopped at its deadline" in line for line in lines)
    children = [int(f.read_text()) for f in pidfiles]
    deadline = time.monotonic() + 10
    while any(map(_running, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, children))


def test_a_rounds_failed_runs_are_returned_whether_or_not_the_deadline_came():
    """Part (e) exits 1 when a run failed: run_parallel_parts names the runs that exited with an error, also those
    that failed while an earlier one in the list was still running at the deadline; stopped ones are no failures."""
    gpu_check = _gpu_check()

    def cmd(code, tag):
        return [sys.executable, "-c", code, "--methods", "hdkd", "--tag", tag, "--seeds", "5"]
    quiet = lambda *text: None
    assert gpu_check.run_parallel_parts(quiet, "e", [cmd("pass", "a"), cmd("raise SystemExit(3)", "b")], 60,
                                        dict(os.environ)) == ["hdkd-b-seed5"]
    assert gpu_check.run_parallel_parts(quiet, "e", [cmd("import time; time.sleep(60)", "a"),
                                                     cmd("raise SystemExit(3)", "b")], 5,
                                        dict(os.environ)) == ["hdkd-b-seed5"]


def test_early_exit_keeps_the_paths_measured_before_a_failure_or_deadline(tmp_path, monkeypatch):
    """benchmarks/early_exit.py writes its record after every path: a deadline (gpu_check part (d)) or a crash in
    a later path keeps the paths already measured, as a whole JSON file."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import early_exit
    finally:
        sys.path.pop(0)
    measured = early_exit.measure_path

    def measure_path(model, path, x, repeats):
        if path == "fast":
            raise RuntimeError("killed")
        return measured(model, path, x, repeats)
    monkeypatch.setattr(early_exit, "measure_path", measure_path)
    out = tmp_path / "early_exit-2.json"
    with pytest.raises(RuntimeError, match="killed"):
        early_exit.main(["--device", "cpu", "--arch", "msdnet_cifar_budget", "--batch-size", "2", "--repeats", "1",
                         "--paths", "eager", "fast", "--out", str(out)])
    assert [p["path"] for p in json.loads(out.read_text())["paths"]] == ["eager"]
    assert [f.name for f in tmp_path.iterdir()] == [out.name]  # no temporary file left


def _check_early_exit_record(record: dict) -> None:
    """benchmarks/early_exit.py's record of msdnet_cifar_budget at batch 8 (part (d) of the dry run): a row per
    exit and path, ratios that grow to the full network's 1.0, and the mixed case predicting as the simulation."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from early_exit import flat_rows  # what --json prints
    finally:
        sys.path.pop(0)
    rows = flat_rows(record)
    for path in ("eager", "fast"):
        mine = [r for r in rows if r["path"] == path]
        exits = [r for r in mine if isinstance(r["exit"], int)]
        assert [r["exit"] for r in exits] == [1, 2, 3, 4, 5]
        assert all(set(r) >= {"flops_ratio", "latency_ratio", "time_ratio"} for r in exits)
        flops = [r["flops_ratio"] for r in exits]
        assert flops == sorted(flops) and flops[-1] == 1.0 and exits[-1]["latency_ratio"] == 1.0
        assert [r["exit"] for r in mine if not isinstance(r["exit"], int)] == ["all", "mixed"]
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
