"""hdkdlib.study, .studyrecords and .studysummary: a study's runs trained in parallel or in-process give the same
records; records round-trip the run folders' numbers exactly; every committed study's summary is what its records
compute; merges and concurrent writers lose nothing; the paired statistics against hand-computed values."""
import gzip
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hdkdlib import data, study, studyrecords, studysummary
from hdkdlib.runfolder import RunFolder
from hdkdlib.studyrecords import Study, StudyRecordError

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted(p.name for p in (ROOT / "results").iterdir() if (p / studyrecords.RUNS).exists())


def _cells(line: str) -> list:
    """The stripped cells of one markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _fake_cifar_folder(root: Path) -> Path:
    data.write_fake_image_folder(root, classes=[f"c{i}" for i in range(4)], n_per_class=(20, 5), size=32, ext=".jpg")
    (root / "val").rename(root / "test")  # CIFAR-10 as JPEG has train/ and test/
    return root


def _run_copy(root: Path, run: str, top1, epochs: int = 3, weights=None) -> Path:
    """A finished run's files as a study keeps them (config.json, metrics.jsonl, results.json), with awkward
    floats (thirds, tiny and huge values) so an inexact round trip would show; its method is its name's."""
    folder, method = root / run, run.split("-")[0]
    folder.mkdir(parents=True)
    weights = weights or {f"ce{k}": 1.0 for k in range(1, len(top1) + 1)}
    cfg = {"method": method, "seed": int(run.rsplit("seed", 1)[1]), "epochs": epochs, "dataset": "folder32",
           "lr": 0.1, "out": f"runs/{run}"}
    (folder / "config.json").write_text(json.dumps({"config": cfg, "git_commit": "abc123" * 7}))
    rows = [{"epoch": e, "lr": 0.1 / 3 ** e, "train_loss": 1 / 3 + e, "train_top1": [0.1 * e + k / 7 for k in range(len(top1))],
             "val_top1": [1e-17 * e + k / 9 for k in range(len(top1))], "images_per_s": 1e6 / 7, "epoch_seconds": 60 + e,
             "weights": {t: w * (1 + e / 3) for t, w in weights.items()}} for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    anytime = [{"exit": k + 1, "top1": t, "top5": min(1.0, t + 0.2), "flops": 1e6 * (k + 1)} for k, t in enumerate(top1)]
    (folder / "results.json").write_text(json.dumps({
        "anytime": anytime, "weights": weights, "config": cfg, "device": "cpu (x86_64, 1 threads)",
        "packages": {"torch": "2.4.0"}, "git_commit": "abc123" * 7}))
    return folder


def _set_config(folder: Path, **values) -> Path:
    """The run copy as trained with other settings: config.json's and results.json's config both say so."""
    for name in ("config.json", "results.json"):
        text = json.loads((folder / name).read_text())
        text["config"].update(values)
        (folder / name).write_text(json.dumps(text))
    return folder


# --- records ---------------------------------------------------------------------------------------------------
def test_records_round_trip_the_run_folders_numbers_exactly(tmp_path):
    """Every metrics field of every epoch, the test accuracy per exit, the final weights and the config read back
    equal (==, not close) to the run folder's; the curves file is the same bytes when written again."""
    hdkd_weights = {"ce1": 0.5, "ce2": 1 / 3, "kd1<-2": 2e-9}
    folders = [_run_copy(tmp_path / "runs", "ce-seed0", [0.1, 1 / 3]),
               _run_copy(tmp_path / "runs", "hdkd-seed0", [0.25, 0.5], epochs=4, weights=hdkd_weights)]
    target = Study(tmp_path / "results" / "s")
    assert target.add([studyrecords.record_from_run_folder(f) for f in folders]) == ["ce-seed0", "hdkd-seed0"]
    runs, curves = target.runs(), target.curves()
    for folder in folders:
        assert target.metrics(curves, folder.name) == RunFolder(folder).metrics()
        record, result = target.record(runs, folder.name), RunFolder(folder).results()
        assert record["test_top1"] == [r["top1"] for r in result["anytime"]]
        assert record["weights"] == result["weights"] and record["config"] == result["config"]
    assert "weights:kd1<-2" in runs.columns and np.isnan(runs.loc[0, "weights:kd1<-2"])  # CE has no KD term
    assert target.record(runs, "ce-seed0")["weights"] == {"ce1": 1.0, "ce2": 1.0}
    before = (target.path / studyrecords.CURVES).read_bytes()
    target._write(runs, curves)
    assert (target.path / studyrecords.CURVES).read_bytes() == before and before[4:8] == bytes(4)  # no time stamp
    assert target.add([studyrecords.record_from_run_folder(f) for f in folders]) == []  # nothing new


def test_two_chains_finishing_runs_at_once_lose_none(tmp_path):
    """The ce and dbt chains of a study record their runs into one runs.csv at the same moments: all are kept."""
    folders = [_run_copy(tmp_path / "runs", f"{m}-seed{s}", [0.1 * s, 0.2], epochs=2) for m in ("ce", "dbt") for s in range(8)]
    target, go = Study(tmp_path / "results" / "s"), threading.Barrier(2)

    def chain(method):
        go.wait()
        for folder in folders:
            if folder.name.startswith(method):
                Study(target.path).add([studyrecords.record_from_run_folder(folder)])
    threads = [threading.Thread(target=chain, args=(m,)) for m in ("ce", "dbt")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(target.runs()["run"]) == sorted(f.name for f in folders)
    assert sorted(set(target.curves()["run"])) == sorted(f.name for f in folders)


def _set(column, value, row=0):
    def change(table):
        table.loc[row, column] = value
        return table
    return change


DAMAGED_RUNS = {  # a change to runs.csv -> the words of its one-line refusal
    "a header only": (lambda t: t[["run", "seed"]].iloc[:0], "lacks the columns variant, method, config"),
    "a run without a seed": (_set("run", "ce"), "'ce' is not a run's name"),
    "a seed with a leading zero": (lambda t: _set("variant", "ce")(_set("seed", "0")(_set("run", "ce-seed00")(t))),
                                   "'ce-seed00' is not a run's name"),  # else averaged with ce-seed0
    "another method's name": (lambda t: _set("variant", "dbt")(_set("run", "dbt-seed0")(t)),
                              "dbt-seed0 is the name of no 'ce' run"),  # the summary pairs by the name's method
    "a gap among the exits": (_set("test_top1[2]", ""), "lacks an exit before its last one, got [0.1, nan, 0.3]"),
    "other epochs than its config's": (_set("epochs", "2"), "ce-seed0 records 2 epochs of its config's 3"),
    "a run twice": (lambda t: pd.concat([t, t]), "lists ce-seed0 twice"),
    "another variant": (_set("variant", "dbt"), "are not those of ce-seed0"),
    "no JSON config": (_set("config", "method=ce"), "ce-seed0's config is not a run's settings"),
    "a config of no run": (_set("config", "{}"), "not the settings of a 'ce' run"),
    "an unknown method": (lambda t: _set("config", t.loc[0, "config"].replace('"ce"', '"zz"'))(_set("method", "zz")(t)),
                          "ce-seed0's config is not a run's settings"),
    "a config of another seed": (lambda t: _set("config", t.loc[0, "config"].replace('"seed": 0', '"seed": 3'))(t),
                                 "trained with seed 3, not its name's 0"),  # paired by the name's seed
    "no commit": (_set("commit", ""), "ce-seed0 lacks its commit"),
    "top-1 above 1": (_set("test_top1[1]", "7.5"), "must be fractions in [0, 1], got [7.5"),
    "top-1 a word": (_set("test_top1[2]", "abc"), "must be fractions in [0, 1]"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_RUNS))
def test_a_damaged_runs_table_is_one_line_and_nothing_is_written(tmp_path, capsys, case):
    """Each damage to runs.csv: --summarize-only exits 2 with one line naming the file and the problem; a merge into
    the damaged study writes nothing."""
    target = Study(tmp_path / "results" / "s")
    target.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "runs", "ce-seed0", [0.1, 0.2, 0.3]))])
    change, words = DAMAGED_RUNS[case]
    table = pd.read_csv(target.path / studyrecords.RUNS, dtype=str, keep_default_na=False)
    change(table).to_csv(target.path / studyrecords.RUNS, index=False)
    before = {p.name: p.read_bytes() for p in target.path.iterdir() if p.is_file()}
    capsys.readouterr()
    assert study.main(["--name", "s", "--results", str(tmp_path / "results"), "--summarize-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "runs.csv" in err, err
    _run_copy(tmp_path / "other" / "results" / "s", "ce-seed1", [0.3, 0.4, 0.5])
    assert study.main(["--name", "s", "--results", str(tmp_path / "results"), "--merge-from", str(tmp_path / "other")]) == 2
    assert {p.name: p.read_bytes() for p in target.path.iterdir() if p.is_file()} == before


def test_damaged_curves_and_missing_studies_are_one_line(tmp_path, capsys):
    folder = _run_copy(tmp_path / "runs", "ce-seed0", [0.1, 0.2])
    target = Study(tmp_path / "results" / "s")
    target.add([studyrecords.record_from_run_folder(folder)])
    curves = target.path / studyrecords.CURVES
    text = gzip.decompress(curves.read_bytes()).decode()
    cases = {"not a whole gzip file": gzip.compress(text.encode())[:-6],
             "unpacks to more than 64 MiB": gzip.compress(b"0" * (65 * 2 ** 20)),  # 65 MiB from 64 KiB
             "lacks the columns epoch": gzip.compress(text.replace("run,epoch,", "run,epch,", 1).encode()),
             "has no epochs of ce-seed0": gzip.compress(text.split("\n", 1)[0].encode() + b"\n"),
             "not a number": gzip.compress(text.replace("\nce-seed0,1,", "\nce-seed0,one,", 1).encode()),
             "does not hold epochs 1-3 of ce-seed0 once each": gzip.compress(text.replace("\nce-seed0,2,", "\nce-seed0,1,", 1).encode()),
             "an accuracy outside [0, 1]": gzip.compress(text.replace(",0.1,0.2428", ",1.1,0.2428", 1).encode())}
    args = ["--name", "s", "--results", str(tmp_path / "results"), "--summarize-only"]
    for words, packed in cases.items():
        curves.write_bytes(packed)
        capsys.readouterr()
        assert study.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "curves.csv.gz" in err, (words, err)
    assert study.main(["--name", "t", "--results", str(tmp_path / "results"), "--summarize-only"]) == 2
    assert "no study at" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: usage and the error, exit 2
        study.main(["--name", "../s", "--results", str(tmp_path / "results"), "--summarize-only"])
    assert "one folder name" in capsys.readouterr().err


def test_a_variants_runs_with_different_numbers_of_exits_are_refused(tmp_path):
    """A seed whose last exit is blank would be averaged over fewer exits than the others: the records are
    refused, naming the variant, and nothing is written."""
    target = Study(tmp_path / "results" / "s")
    target.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "runs", "ce-seed0", [0.1, 0.2, 0.3]))])
    before = {p.name: p.read_bytes() for p in target.path.iterdir()}
    with pytest.raises(StudyRecordError, match="the ce runs record test top-1 for different numbers of exits"):
        target.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "runs", "ce-seed1", [0.3, 0.4]))])
    assert {p.name: p.read_bytes() for p in target.path.iterdir()} == before
    assert target.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "runs", "dbt-seed1", [0.3, 0.4]))])


def test_a_cut_short_run_copy_is_no_record(tmp_path, capsys):
    """A run copy whose metrics.jsonl lost its last line (a copy taken mid-write) would record the epoch before as
    the last one (the held-out top-1 and temperature a protocol reads): refused, naming the file."""
    folder = _run_copy(tmp_path / "runs", "ce-seed0", [0.1, 0.2], epochs=3)
    lines = (folder / "metrics.jsonl").read_text()
    (folder / "metrics.jsonl").write_text(lines[:-40])
    with pytest.raises(StudyRecordError, match=r"metrics.jsonl holds 2 of the run's 3 epochs .*copy the whole"):
        studyrecords.record_from_run_folder(folder)
    assert "is cut short" in capsys.readouterr().err


def test_a_finished_run_folder_of_other_settings_is_not_recorded(tmp_path, capsys):
    """A finished run folder left in the runs folder by another command (here 3 epochs at lr 0.1) is not taken as
    this command's run (5 epochs): one line naming the folder and the settings, nothing recorded."""
    _run_copy(tmp_path / "runs" / "s", "ce-seed0", [0.1, 0.2], epochs=3)
    (tmp_path / "runs" / "s" / "ce-seed0" / "model.pt").write_bytes(b"")  # finished: weights and results
    assert RunFolder(tmp_path / "runs" / "s" / "ce-seed0").finished()
    capsys.readouterr()
    assert study.main(["--name", "s", "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs" / "s"),
                       "--methods", "ce", "--seeds", "0", "--epochs", "5", "--arch", "toy_mlp", "--device", "cpu",
                       "--data-root", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run with other settings" in err and "epochs" in err, err
    assert not Study(tmp_path / "results" / "s").exists()


# --- merges ------------------------------------------------------------------------------------------------------
def test_merge_brings_finished_runs_once_and_overwrites_nothing(tmp_path, capsys):
    """--merge-from: a worktree's run copies (with RUNS.json, the older layout) or another study's records arrive
    once each; an unfinished run stays behind; a run recorded here with other numbers keeps its record."""
    ours = Study(tmp_path / "main" / "results" / "s")
    ours.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "mine", "ce-seed0", [0.1, 0.2]))])
    theirs = tmp_path / "wt" / "results" / "s"
    _run_copy(theirs, "ce-seed0", [0.1, 0.2])
    _run_copy(theirs, "ce-seed1", [0.3, 0.4])
    (_run_copy(theirs, "ce-seed2", [0.5, 0.6]) / "results.json").unlink()  # still training
    (theirs / "RUNS.json").write_text(json.dumps({"note": "", "invocations": [
        {"command": "python benchmarks/verify_real_data.py --seeds 1", "started": "2026-12-02 10:00 UTC",
         "jobs": 2, "runs": ["ce-seed1", "ce-seed2"]}]}))
    assert study.merge_from(ours, theirs) == ["ce-seed1"]
    record = ours.record(ours.runs(), "ce-seed1")
    assert record["test_top1"] == [0.3, 0.4] and record["at_once"] == "2"
    assert record["invocation"] == "python benchmarks/verify_real_data.py --seeds 1"  # as it ran, not rewritten
    before = {p.name: p.read_bytes() for p in ours.path.iterdir()}
    assert study.merge_from(ours, theirs) == []  # idempotent
    assert {p.name: p.read_bytes() for p in ours.path.iterdir()} == before

    gpu = Study(tmp_path / "gpu" / "results" / "s")  # a study's records, as a lent GPU brings them back
    gpu.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "g", f"dbt-seed{s}", [0.2, 0.3])) for s in (4, 5)])
    assert study.merge_from(ours, gpu.path) == ["dbt-seed4", "dbt-seed5"]
    assert ours.metrics(ours.curves(), "dbt-seed5") == RunFolder(tmp_path / "g" / "dbt-seed5").metrics()

    # the same seed finished elsewhere too, with other numbers: the record here stays and is named; the rest arrives
    _run_copy(theirs, "ce-seed3", [0.7, 0.8])
    (theirs / "ce-seed0" / "results.json").write_text(
        (theirs / "ce-seed0" / "results.json").read_text().replace('"top1": 0.1', '"top1": 0.15'))
    capsys.readouterr()
    assert study.merge_from(ours, theirs) == ["ce-seed3"]
    assert "kept ce-seed0 as recorded" in capsys.readouterr().err
    assert ours.record(ours.runs(), "ce-seed0")["test_top1"] == [0.1, 0.2]
    # a run whose whole-number values read back as floats (its curve's lr column is shared with 0.1-lr runs) is
    # the same record: merged again, nothing is said or written
    whole = _run_copy(theirs, "ce-seed6", [0.3, 0.4])
    lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    (whole / "metrics.jsonl").write_text("".join(json.dumps({**r, "lr": 1, "epoch_seconds": 60}) + "\n" for r in lines))
    assert study.merge_from(ours, theirs) == ["ce-seed6"]
    before = {p.name: p.read_bytes() for p in ours.path.iterdir()}
    capsys.readouterr()
    assert study.merge_from(ours, theirs) == [] and "ce-seed6" not in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ours.path.iterdir()} == before
    with pytest.raises(SystemExit, match="is this study's folder"):
        study.merge_from(ours, ours.path)
    (theirs / "RUNS.json").write_text("[1, 2]")
    with pytest.raises(StudyRecordError, match="RUNS.json is not a RUNS.json .*restore it from git"):
        study.merge_from(ours, theirs)


# --- the committed studies -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STUDIES)
def test_each_committed_summary_is_what_its_records_compute(name):
    """SUMMARY.md of every study in results/ is recomputed from runs.csv, curves.csv.gz and NOTES.md alone."""
    target = Study(ROOT / "results" / name)
    assert studysummary.summarize(target) == (target.path / "SUMMARY.md").read_text()


def test_results_hold_records_not_run_folders_or_images():
    assert STUDIES and studysummary.index([Study(ROOT / "results" / n) for n in STUDIES]) == \
        (ROOT / "results" / "README.md").read_text()
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if tracked:  # a checkout (an sdist has no git)
        assert not [p for p in tracked if p.endswith((".png", ".json", ".jsonl"))]
        assert all(p.count("/") == 2 or p == "results/README.md" for p in tracked)  # no per-run folders


# --- running a study -------------------------------------------------------------------------------------------------
def test_a_study_trained_in_parallel_equals_one_trained_in_process(tmp_path, capsys, monkeypatch):
    """python -m hdkdlib.study: runs trained as parallel CLI processes give the same numbers as runs trained
    in-process; the summary holds them with mean and spread, and README.md indexes both studies."""
    _fake_cifar_folder(tmp_path / "img")
    common = [sys.executable, "-m", "hdkdlib.study", "--data-root", str(tmp_path / "img"),
              "--methods", "ce", "hdkd", "--seeds", "0", "1", "--epochs", "1", "--arch", "toy_mlp", "--batch-size", "8",
              "--lr", "0.01", "--val-per-class", "4", "--device", "cpu", "--split-dir", str(tmp_path / "splits"),
              "--results", str(tmp_path / "results")]
    for name, jobs in (("parallel", "2"), ("inline", "1")):
        result = subprocess.run(common + ["--runs", str(tmp_path / name), "--name", name, "--jobs", jobs],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert (tmp_path / "parallel" / "hdkd-seed1.log").exists()
    parallel, inline = (Study(tmp_path / "results" / n).runs().set_index("run") for n in ("parallel", "inline"))
    top1 = [c for c in parallel.columns if c.startswith("test_top1[")]
    assert sorted(parallel.index) == ["ce-seed0", "ce-seed1", "hdkd-seed0", "hdkd-seed1"]
    pd.testing.assert_frame_equal(parallel[top1], inline[top1])
    assert set(parallel["at_once"]) == {"2"} and set(inline["at_once"]) == {"1"}

    # the same study again, from another directory: its recorded runs are not trained again; finished runs not yet
    # recorded (here: into another study) are recorded without training
    settings = dict(data_root=str(tmp_path / "img"), epochs=1, arch="toy_mlp", batch_size=8, lr=0.01,
                    val_per_class=4, device="cpu", split_dir=str(tmp_path / "splits"))
    trained = {p: p.stat().st_mtime_ns for p in (tmp_path / "parallel").rglob("*.pt")}
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    study.run(["ce", "hdkd"], [0, 1], "parallel", results=tmp_path / "results", runs=tmp_path / "parallel", **settings)
    assert "already recorded" in capsys.readouterr().out
    copy = study.run(["ce", "hdkd"], [0, 1], "copy", results=tmp_path / "results", runs=tmp_path / "parallel", **settings)
    assert sorted(copy.runs()["run"]) == sorted(parallel.index)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "parallel").rglob("*.pt")} == trained

    # a variant beside them: a training option changes a setting, --tag names the runs; NOTES.md is kept in
    (tmp_path / "results" / "parallel" / "NOTES.md").write_text("A hand-written reading.")
    one_run = common[:common.index("--methods")] + ["--methods", "hdkd", "--seeds", "0"] + common[common.index("--epochs"):]
    assert study.main(one_run[3:] + ["--runs", str(tmp_path / "parallel"), "--name", "parallel", "--tag", "T2",
                                     "--temperature", "2"]) == 0, capsys.readouterr()  # what the CLI above runs
    runs = Study(tmp_path / "results" / "parallel").runs().set_index("run")
    assert runs.loc["hdkd-T2-seed0", "setting:temperature"] == 2.0  # the setting that varies has a column
    assert json.loads(runs.loc["hdkd-T2-seed0", "config"])["temperature"] == 2.0

    summary = (tmp_path / "results" / "parallel" / "SUMMARY.md").read_text()
    rows = [_cells(l) for l in summary.splitlines() if l.startswith("|") and not l.startswith("|-")]
    ce = 100 * runs.loc[["ce-seed0", "ce-seed1"], top1].to_numpy()
    row = next(r for r in rows if r[:2] == ["ce", "2"])
    assert row[2] == f"{ce[:, 0].mean():.2f} ± {ce[:, 0].std(ddof=1):.2f}"
    assert any(r[:2] == ["hdkd-T2", "1"] for r in rows)
    hdkd = 100 * runs.loc[["hdkd-seed0", "hdkd-seed1"], top1].to_numpy()
    paired = next(r for r in rows if r[0] == "hdkd − ce")
    diff = hdkd[:, 0] - ce[:, 0]  # the same seeds paired
    assert paired[1] == "2" and paired[2] == f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f}"
    # the validation table: the last epoch's val_top1 of each run (the run folder's metrics), mean over seeds
    val = np.array([RunFolder(tmp_path / "parallel" / r).metrics()[-1]["val_top1"] for r in ("ce-seed0", "ce-seed1")]) * 100
    val_section = summary[summary.index("Per-exit validation top-1"):]
    val_row = next(_cells(l) for l in val_section.splitlines() if l.startswith("| ce "))
    assert val_row[1] == f"{val[:, 0].mean():.2f} ± {val[:, 0].std(ddof=1):.2f}"
    assert val_row[-1] == f"{val.mean(1).mean():.2f} ± {val.mean(1).std(ddof=1):.2f}"
    assert "Final learned weights of hdkd (mean over 2 seeds)" in summary and "Final learned weights of hdkd-T2" in summary
    kd_section = summary[summary.index("Students' KD weight at the end"):]
    assert {r[0] for r in map(_cells, kd_section.splitlines()[4:7])} == {"hdkd-seed0", "hdkd-seed1", "hdkd-T2-seed0"}
    at_once = {r[0]: r[3] for r in rows if "-seed" in r[0] and len(r) > 3 and r[1].startswith("cpu")}
    assert at_once == {"ce-seed0": "2", "ce-seed1": "2", "hdkd-seed0": "2", "hdkd-seed1": "2", "hdkd-T2-seed0": "1"}
    commands = [l for l in summary.splitlines() if l.startswith("python -m hdkdlib.study")]
    assert len(commands) == 2 and "--jobs 2" in commands[0] and "--tag T2" in commands[1]
    assert sum(l.startswith("python -m hdkdlib.train") for l in summary.splitlines()) == 5
    assert summary.rstrip().endswith("### Observations\n\nA hand-written reading.")
    readme = (tmp_path / "results" / "README.md").read_text()
    assert readme.index("| inline |") < readme.index("| parallel |")
    assert not list((tmp_path / "results").rglob("*.png"))
    drawn = study.draw_figures(Study(tmp_path / "results" / "parallel"), tmp_path / "figures")  # what --figures does
    assert sorted(p.name for p in drawn) == ["anytime.png", "weights-hdkd-T2.png", "weights-hdkd.png"]
    assert all(p.stat().st_size > 10_000 for p in drawn)


# --- the summary's statistics --------------------------------------------------------------------------------------
def test_paired_differences_pair_each_protocol_with_its_own_baseline():
    """dbt-n100 is paired with ce-n100, not with ce-n50 or an untagged ce; hdkd-T3 with the untagged ce and dbt;
    hdkd-n50-w50 (a switch in the n50 protocol) with ce-n50 and dbt-n50; hdkd-n50-s143 with ce-n50-s143 and ce-n50;
    the cells are mean ± sd over the seeds both variants have (hand-computed here)."""
    top1 = {("ce-n100", 0): [0.50, 0.60], ("ce-n100", 1): [0.52, 0.58], ("dbt-n100", 0): [0.55, 0.61],
            ("dbt-n100", 1): [0.56, 0.60], ("ce-n50", 0): [0.10, 0.10], ("dbt-n50", 0): [0.20, 0.30],
            ("ce", 0): [0.40, 0.40], ("dbt", 0): [0.45, 0.40], ("hdkd-T3", 0): [0.50, 0.50],
            ("hdkd-n50-w50", 0): [0.30, 0.30], ("ce-n50-s143", 0): [0.15, 0.15], ("hdkd-n50-s143", 0): [0.40, 0.40]}
    table = pd.DataFrame([{"run": f"{v}-seed{s}", "variant": v, "exit": k + 1, "top1": t}
                          for (v, s), values in top1.items() for k, t in enumerate(values)])
    lines = studysummary.paired_differences(table)
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
    top1 = {("ce", 0): [0.40, 0.50], ("ce", 3): [0.10, 0.20], ("hdkd-h4", 3): [0.333, 0.334]}
    table = pd.DataFrame([{"run": f"{v}-seed{s}", "variant": v, "exit": k + 1, "top1": t}
                          for (v, s), values in top1.items() for k, t in enumerate(values)])
    header, _, *rows = map(_cells, studysummary.per_seed_rows(table)[-1].splitlines())
    assert header == ["run", "seed 0", "seed 3"]
    assert rows == [["ce", "45.00", "15.00"], ["hdkd-h4", "", "33.35"]]


def test_only_runs_whose_weights_learned_get_a_weights_table():
    records = {"hdkd-seed0": {"config": {"method": "hdkd", "freeze_weights_from": ""}},
               "hdkd-frozen-seed0": {"config": {"method": "hdkd", "freeze_weights_from": "init"}},
               "hdkd-old-seed0": {"config": {"method": "hdkd"}},  # begun before the setting existed
               "dbt-seed0": {"config": {"method": "dbt", "freeze_weights_from": ""}}}
    assert list(studysummary.weight_learning_runs(records)) == ["hdkd-seed0", "hdkd-old-seed0"]


def test_students_kd_weight_sums_each_students_teachers():
    """The rules' "students' KD weight": per student exit its KD weights summed over its teachers (CE weights and
    the last exit left out), then the mean over students 1-4 against the same at the start (hand-computed)."""
    num_exits = 6
    start = {f"ce{i}": 1.0 for i in range(1, 7)}
    start.update({f"kd{i}<-{j}": 0.1 for i in range(1, 6) for j in range(i + 1, 7)})
    final = dict(start, **{"kd1<-6": 0.5, "kd1<-2": 0.3, "kd4<-5": 0.0, "kd5<-6": 2.0, "ce1": 9.0})
    per_student = studysummary.kd_weight_per_student(final, num_exits)
    np.testing.assert_allclose(per_student, [0.3 + 3 * 0.1 + 0.5, 0.4, 0.3, 0.1, 2.0])
    lines = studysummary.students_kd_rows({"hdkd-seed0": final}, {"hdkd-seed0": start}, num_exits)
    header, _, row = (_cells(l) for l in lines[-1].splitlines())
    assert header == ["run", "exit 1", "exit 2", "exit 3", "exit 4", "exit 5", "students 1-4", "start", "end / start"]
    early_end, early_start = (1.1 + 0.4 + 0.3 + 0.1) / 4, (0.5 + 0.4 + 0.3 + 0.2) / 4
    assert row == ["hdkd-seed0", "1.100", "0.400", "0.300", "0.100", "2.000", f"{early_end:.3f}", f"{early_start:.3f}",
                   f"{early_end / early_start:.0%}"]


def test_fit_reached_reads_the_last_epoch():
    rows = [{"train_top1": [0.1, 0.2, 0.3]}, {"train_top1": [0.912, 0.5, 0.9876]}]
    assert studysummary.fit_reached(rows) == "91.2 / 98.8"


def test_epochs_within_a_time_budget():
    rows = [dict(method="ce", meta_interval=None, batch_size=64, mode="step+graph", images_per_s=1000.0),
            dict(method="hdkd", meta_interval=1, batch_size=64, mode="step+graph", images_per_s=500.0),
            dict(method="hdkd", meta_interval=10, batch_size=64, mode="step+graph", images_per_s=900.0),
            dict(method="ce", meta_interval=None, batch_size=64, mode="eager", images_per_s=10.0)]
    # one epoch of ce + dbt + hdkd, 2 seeds, 45,000 images: 2 * (45 + 45 + 90) s = 360 s; 60 minutes -> 10 epochs
    assert study.epochs_within(60, {"rows": rows}, ["ce", "dbt", "hdkd"], [0, 1], 45_000) == 10
    assert study.epochs_within(60, {"rows": rows}, ["hdkd"], [0], 45_000, meta_interval=8) == 60  # 72, capped
    assert study.epochs_within(1, {"rows": rows}, ["ce", "dbt", "hdkd"], [0, 1], 45_000) == 4     # too little: 4


def test_epochs_auto_from_bad_records_is_one_line(tmp_path, capsys):
    """--epochs auto reads a begun run's config.json, or the speeds file: either one hand-edited or from older code
    is one line naming it, not a KeyError or StopIteration traceback."""
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        (root / "train" / c / "0.png").write_bytes(b"")
    common = ["--name", "s", "--results", str(tmp_path / "results"), "--data-root", str(root), "--methods", "ce",
              "--seeds", "0", "--epochs", "auto", "--arch", "toy_mlp", "--device", "cpu", "--val-per-class", "0",
              "--n-per-class", "1"]
    speeds = tmp_path / "speeds.json"
    speeds.write_text(json.dumps({"rows": [dict(method="hdkd", meta_interval=1, batch_size=64, mode="eager",
                                                images_per_s=5.0)]}))
    assert study.main(common + ["--runs", str(tmp_path / "none"), "--throughput", str(speeds)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--epochs auto cannot read the speeds in {speeds} (ValueError: no CE row" in err
    speeds.write_text(json.dumps({"rows": [{"method": "ce"}]}))
    assert study.main(common + ["--runs", str(tmp_path / "none"), "--throughput", str(speeds)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the speeds" in err and "KeyError" in err, err
    begun = tmp_path / "runs" / "ce-seed0"
    begun.mkdir(parents=True)
    (begun / "config.json").write_text(json.dumps({"config": {"arch": "toy_mlp"}}))
    assert study.main(common + ["--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json records None: give --epochs N" in err, err
    assert not (tmp_path / "results" / "s").exists()


def _tables(text: str):
    """The markdown tables of a text: lists of rows of stripped cells, header first, the |---| line dropped."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                current.append(_cells(line))
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.parametrize("name", STUDIES)
def test_per_seed_cells_quoted_in_notes_are_the_records_numbers(name):
    """NOTES.md's hand-made tables quote the records: in a table of seeds (first column), a column headed by one
    variant's name in backticks (not a difference) holds that variant's mean test top-1 over exits at that seed."""
    target = Study(ROOT / "results" / name)
    table = studyrecords.per_exit(target.runs())
    means = (100 * table.assign(seed=table["run"].map(studyrecords.seed_of)).groupby(["variant", "seed"]).top1.mean())
    checked = 0
    notes = (target.path / "NOTES.md").read_text() if (target.path / "NOTES.md").exists() else ""
    for header, *rows in _tables(notes):
        if header[0] != "seed":
            continue
        for col, title in enumerate(header):
            quoted = title.split("`")[1] if title.count("`") == 2 and "−" not in title else None
            if quoted not in means.index.get_level_values(0):
                continue
            for row in rows:
                seed = row[0].strip("*").split(" ")[0]
                if seed.isdigit() and row[col].strip("*"):
                    assert row[col].strip("*") == f"{means.loc[(quoted, int(seed))]:.2f}", (title, row)
                    checked += 1
    if name == "cifar10-cpu-control":
        assert checked >= 30  # the step-size and frozen-weights tables


RUNNING = "running"  # the README's evidence cell of an arm still training
NOT_RUN = "not run"  # an HDKD cell at a setting its protocol did not run it at (tin100: HDKD at lr 0.2 only)


def test_readme_evidence_cells_are_paired_tests_of_the_studies():
    """Each "mean [low, high]" cell of the README's evidence table is a paired test row of some study's summary,
    and each method's mean is that of one of its variants in some study's per-exit table."""
    readme = (ROOT / "README.md").read_text()
    evidence = next(t for t in _tables(readme) if t[0][:2] == ["protocol (train + val per class, epochs)", "seeds"])
    summaries = [_tables((ROOT / "results" / n / "SUMMARY.md").read_text()) for n in STUDIES]
    tested = {(r[2], r[4]) for tables in summaries for t in tables
              if t[0][:5] == ["difference", "seeds", "mean", "SE", "95% interval"] for r in t[1:]}
    means = {(r[0].split("-")[0], r[-1]) for tables in summaries for t in tables
             if t[0][:3] == ["run", "seeds", "exit 1"] and t[0][-1] == "mean" for r in t[1:]}
    assert evidence[0][2:5] == ["ce", "dbt", "hdkd"] and evidence[0][5:] == ["dbt − ce", "hdkd − ce"]
    for row in evidence[1:]:
        if row[4].split(" (")[0] in (RUNNING, NOT_RUN):  # no HDKD number, nor its difference
            assert row[6] == row[4].split(" (")[0], row
        for method, cell in zip(("ce", "dbt", "hdkd"), row[2:5]):
            assert cell.split(" (")[0] in (RUNNING, NOT_RUN) and method == "hdkd" or \
                (method, cell.split(" (")[0]) in means, (method, cell)
    cells = [c.split(" (")[0] for row in evidence[1:] for c in row[5:] if c not in (RUNNING, NOT_RUN)]
    assert len(cells) >= 6
    for cell in cells:
        mean, interval = cell.replace("−", "-").split(" ", 1)
        assert (mean, interval) in tested, cell


def test_differences_at_two_learning_rates_are_also_pooled_per_seed():
    """tin100-cpu-control's C1: per seed, the mean over lr 0.1 and 0.2 of DBT − CE at that lr, tested (hand-computed);
    a seed missing at one lr is left out of the pooled difference."""
    top1 = {("ce-n20-lr01", 0): [0.40, 0.42], ("ce-n20-lr01", 1): [0.41, 0.41], ("ce-n20-lr01", 2): [0.40, 0.40],
            ("dbt-n20-lr01-s100", 0): [0.41, 0.43], ("dbt-n20-lr01-s100", 1): [0.43, 0.43],
            ("dbt-n20-lr01-s100", 2): [0.40, 0.44],
            ("ce-n20-lr02", 0): [0.39, 0.39], ("ce-n20-lr02", 1): [0.42, 0.40],
            ("dbt-n20-lr02-s100", 0): [0.42, 0.42], ("dbt-n20-lr02-s100", 1): [0.41, 0.41]}
    table = pd.DataFrame([{"run": f"{v}-seed{s}", "variant": v, "exit": k + 1, "top1": t}
                          for (v, s), values in top1.items() for k, t in enumerate(values)])
    rows, tests = studysummary.paired_frames(table)
    name = "dbt-n20-lr*-s100 − ce-n20-lr* (mean over lr01, lr02)"
    assert list(rows["difference"]) == ["dbt-n20-lr01-s100 − ce-n20-lr01", "dbt-n20-lr02-s100 − ce-n20-lr02", name]
    # seed 0: lr01 (+1, +1), lr02 (+3, +3) -> +2, +2; seed 1: lr01 (+2, +2), lr02 (-1, +1) -> +0.5, +1.5
    pooled = rows.set_index("difference").loc[name]
    assert pooled["seeds"] == 2 and pooled["exit 1"] == f"{np.mean([2, 0.5]):+.2f} ± {np.std([2, 0.5], ddof=1):.2f}"
    per_seed = np.array([2.0, 1.0])  # the mean over exits at seeds 0 and 1
    test = tests.set_index("difference").loc[name]
    assert test["mean"] == f"{per_seed.mean():+.2f}" and test["SE"] == f"{per_seed.std(ddof=1) / np.sqrt(2):.2f}"
    # each method at its held-out-best lr (C3): here DBT at lr02 against CE at lr01
    held_out = {"ce-n20-lr01": 50.0, "ce-n20-lr02": 40.0, "dbt-n20-lr01-s100": 30.0, "dbt-n20-lr02-s100": 45.0}
    rows, tests = studysummary.paired_frames(table, held_out=held_out)
    best = rows.set_index("difference").loc["dbt-n20-lr02-s100 − ce-n20-lr01 (each at its held-out-best lr)"]
    d = np.array([2.0, 0.0])  # exit 1 at seeds 0 and 1: 0.42 − 0.40, 0.41 − 0.41
    assert best["seeds"] == 2 and best["exit 1"] == f"{d.mean():+.2f} ± {d.std(ddof=1):.2f}"
    # the secondary reading: the mean over the first exits only (here exit 1: pooled +2 and +0.5)
    early = studysummary.paired_frames(table, exits=(1,))[1].set_index("difference").loc[name]
    assert early["mean"] == "+1.25"


def test_the_hdkd_arms_pair_with_the_control_arms_at_their_lr():
    """tin100-cpu-control's H1-H3: HDKD at one lr (tags n20-lr02-s100-t1 and -t2.5) is paired with CE and DBT at
    that lr only, never pooled over lrs nor with the other lr's arms (hand-computed cells)."""
    top1 = {("ce-n20-lr01", 0): [0.40, 0.40], ("ce-n20-lr02", 0): [0.30, 0.30], ("dbt-n20-lr01-s100", 0): [0.41, 0.41],
            ("dbt-n20-lr02-s100", 0): [0.35, 0.35], ("hdkd-n20-lr02-s100-t1", 0): [0.36, 0.38],
            ("hdkd-n20-lr02-s100-t2.5", 0): [0.31, 0.31]}
    table = pd.DataFrame([{"run": f"{v}-seed{s}", "variant": v, "exit": k + 1, "top1": t}
                          for (v, s), values in top1.items() for k, t in enumerate(values)])
    rows = studysummary.paired_frames(table)[0].set_index("difference")
    hdkd = [r for r in rows.index if r.startswith("hdkd")]
    assert hdkd == ["hdkd-n20-lr02-s100-t1 − ce-n20-lr02", "hdkd-n20-lr02-s100-t1 − dbt-n20-lr02-s100",
                    "hdkd-n20-lr02-s100-t2.5 − ce-n20-lr02", "hdkd-n20-lr02-s100-t2.5 − dbt-n20-lr02-s100"]
    assert list(rows.loc["hdkd-n20-lr02-s100-t1 − ce-n20-lr02", ["exit 1", "exit 2", "mean over exits"]]) == \
        ["+6.00", "+8.00", "+7.00"]
    assert rows.loc["hdkd-n20-lr02-s100-t2.5 − dbt-n20-lr02-s100", "mean over exits"] == "-4.00"


def test_a_run_of_another_protocol_is_never_mixed_into_a_variant(tmp_path):
    """A run of the same variant name trained with other settings (here 4 epochs against 3) is refused, naming
    the setting, and nothing is written; another device or thread count is the same protocol (GPU seeds pool)."""
    target = Study(tmp_path / "results" / "s")
    target.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "runs", "ce-seed0", [0.1, 0.2]))])
    before = {p.name: p.read_bytes() for p in target.path.iterdir()}
    other = _run_copy(tmp_path / "runs", "ce-seed1", [0.3, 0.4], epochs=4)
    with pytest.raises(StudyRecordError, match=r"run ce-seed1 has other settings than the ce runs .*\(epochs: 4, not 3\)"
                                               r".*nothing was written"):
        target.add([studyrecords.record_from_run_folder(other)])
    assert {p.name: p.read_bytes() for p in target.path.iterdir()} == before
    gpu = _run_copy(tmp_path / "runs", "ce-seed2", [0.3, 0.4])
    _set_config(gpu, device="cuda", threads=8, bf16=False)
    assert target.add([studyrecords.record_from_run_folder(gpu)]) == ["ce-seed2"]
    bf16 = _run_copy(tmp_path / "runs", "ce-seed3", [0.3, 0.4])  # bf16 changes the numbers: another protocol
    _set_config(bf16, device="cuda", bf16=True)
    with pytest.raises(StudyRecordError, match=r"run ce-seed3 has other settings .*\(bf16: True, not False\)"):
        target.add([studyrecords.record_from_run_folder(bf16)])
    # a setting added to the library since the variant's first runs counts at the value that reproduces those runs
    target.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "runs", "dbt-seed0", [0.1, 0.2]))])
    share = _run_copy(tmp_path / "runs", "dbt-seed1", [0.3, 0.4])
    _set_config(share, kd_share=0.3)
    with pytest.raises(StudyRecordError, match=r"run dbt-seed1 has other settings .*\(kd_share: 0.3, not 0.0\)"):
        target.add([studyrecords.record_from_run_folder(share)])
    # a setting only one of them knows (a record from a newer library) is named, not a KeyError
    newer = _run_copy(tmp_path / "runs", "dbt-seed2", [0.3, 0.4])
    _set_config(newer, future_setting=3)
    with pytest.raises(StudyRecordError, match=r"run dbt-seed2 has other settings .*\(future_setting: 3, not None\)"):
        target.add([studyrecords.record_from_run_folder(newer)])


def test_paired_test_rows_print_p_values_a_reader_can_quote():
    """p to three decimals; one under 0.0005 prints as < 0.001, never as 0.000 (a p of zero is impossible):
    d = 1, 1.01, ..., 1.05 has t = 40 on 5 df (one-sided p about 1e-7); d = 1, 2, 3, 4 has p 0.0152 (by hand)."""
    tight = studysummary.paired_test_row("a − b", pd.Series([1.0, 1.01, 1.02, 1.03, 1.04, 1.05]))
    assert tight["p (one-sided, > 0)"] == tight["p (two-sided)"] == "< 0.001"
    assert tight["p (sign-flip, > 0)"] == "0.016"  # 1/64: the smallest six seeds can give
    assert studysummary.paired_test_row("a − b", pd.Series([1.0, 2, 3, 4]))["p (one-sided, > 0)"] == "0.015"


def _with_data(folder: Path, sha256: str) -> Path:
    """The run copy as trained on data of that fingerprint (results.json's "data", as train writes it)."""
    record = json.loads((folder / "results.json").read_text())
    record["data"] = {"root": "/data/x", "of": "decoded pixels and labels", "sha256": sha256}
    (folder / "results.json").write_text(json.dumps(record))
    return folder


def test_a_run_on_other_data_is_never_mixed_into_a_study(tmp_path):
    """The data's fingerprint is recorded, and a run whose data differ from any run's of the study (another
    variant's too: the summary pairs variants by seed) is refused, nothing written; records of commits that wrote
    no fingerprint are compared by their settings alone; the same data from another folder pools."""
    a, b = "a" * 64, "b" * 64
    target = Study(tmp_path / "results" / "s")
    first = _with_data(_run_copy(tmp_path / "runs", "ce-seed0", [0.1, 0.2]), a)
    target.add([studyrecords.record_from_run_folder(first)])
    assert target.record(target.runs(), "ce-seed0")["data_sha256"] == a
    before = {p.name: p.read_bytes() for p in target.path.iterdir()}
    for run in ("ce-seed1", "dbt-seed0"):
        other = _with_data(_run_copy(tmp_path / "runs", run, [0.3, 0.4]), b)
        with pytest.raises(StudyRecordError, match=rf"run {run} trained on other data than ce-seed0 .*sha256 "
                                                   r"bbbbbbbbbbbb\.\.\., not aaaaaaaaaaaa.*nothing was written"):
            target.add([studyrecords.record_from_run_folder(other)])
        assert {p.name: p.read_bytes() for p in target.path.iterdir()} == before
    older = _run_copy(tmp_path / "runs", "dbt-seed1", [0.3, 0.4])  # no fingerprint recorded
    same = _with_data(_run_copy(tmp_path / "runs", "dbt-seed2", [0.3, 0.4]), a)
    assert target.add([studyrecords.record_from_run_folder(f) for f in (older, same)]) == ["dbt-seed1", "dbt-seed2"]
    runs = target.runs()
    assert runs.set_index("run")["data_sha256"].isna().tolist() == [False, True, False]
    # a damaged fingerprint in runs.csv is refused on reading, one line
    text = (target.path / studyrecords.RUNS).read_text().replace(a, "not-a-digest", 1)
    (target.path / studyrecords.RUNS).write_text(text)
    with pytest.raises(StudyRecordError, match="ce-seed0's data_sha256 'not-a-digest' is no sha256 digest"):
        target.runs()


def test_a_run_copy_whose_results_are_another_runs_is_refused(tmp_path):
    """results.json copied in from another run (other settings than config.json's) is no record of this run; a
    speed setting changed by a resume (threads) is the same run."""
    folder = _run_copy(tmp_path / "runs", "ce-seed0", [0.1, 0.2])
    record = json.loads((folder / "results.json").read_text())
    (folder / "results.json").write_text(json.dumps({**record, "config": {**record["config"], "threads": 4}}))
    assert studyrecords.record_from_run_folder(folder)[0]["run"] == "ce-seed0"
    (folder / "results.json").write_text(json.dumps({**record, "config": {**record["config"], "lr": 0.2}}))
    with pytest.raises(StudyRecordError, match=r"ce-seed0: results.json is not the result of the run config.json "
                                               r"began \(lr differ\): copy the whole run folder again"):
        studyrecords.record_from_run_folder(folder)


def test_the_study_lock_is_never_opened_through_a_link(tmp_path):
    """A link in the lock's place would have the lock create or truncate its target: refused, target unchanged."""
    target = Study(tmp_path / "results" / "s")
    target.path.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (target.path / studyrecords.LOCK).symlink_to(victim)
    with pytest.raises(StudyRecordError, match=r"\.lock is a link \(to .*victim.txt\).*remove the link"):
        target.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "runs", "ce-seed0", [0.1, 0.2]))])
    assert victim.read_text() == "keep me" and not (target.path / studyrecords.RUNS).exists()


def test_bad_data_or_settings_for_a_study_are_one_line(tmp_path, capsys):
    """Training in-process (--jobs 1) meets the data's and the settings' checks: one line each, exit 2, nothing
    recorded."""
    (tmp_path / "empty").mkdir()
    common = ["--name", "s", "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"),
              "--methods", "ce", "--seeds", "0", "--epochs", "1", "--arch", "toy_mlp", "--device", "cpu"]
    for extra, words in ((["--data-root", str(tmp_path / "empty")], "train not found"),
                         (["--data-root", str(tmp_path / "empty"), "--out", "x"], "cannot set out per run"),
                         # names runs.csv could not hold: refused before anything trains, not after
                         (["--data-root", str(tmp_path / "empty"), "--seeds", "-1"],
                          "run name 'ce-seed-1' cannot be recorded in runs.csv"),
                         (["--data-root", str(tmp_path / "empty"), "--tag", "T 3"],
                          "run name 'ce-T 3-seed0' cannot be recorded")):
        capsys.readouterr()
        assert study.main(common + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "results" / "s").exists()


def test_records_are_kept_where_the_summary_cannot_be_written(tmp_path, capsys, monkeypatch):
    """A lent GPU lacks tabulate (pandas' to_markdown): a merge or a study run there records its runs and exits 0,
    saying the summary is left for --summarize-only, not a traceback and exit 1 after the record is written."""
    theirs = tmp_path / "wt" / "results" / "s"
    _run_copy(theirs, "ce-seed0", [0.1, 0.2])

    def no_tabulate(_):
        raise ImportError("Missing optional dependency 'tabulate'")
    monkeypatch.setattr(study, "write_summaries", no_tabulate)
    assert study.main(["--name", "s", "--results", str(tmp_path / "main"), "--merge-from", str(tmp_path / "wt")]) == 0
    assert "summary not written (Missing optional dependency 'tabulate')" in capsys.readouterr().err
    assert list(Study(tmp_path / "main" / "s").runs()["run"]) == ["ce-seed0"]
    with pytest.raises(ImportError, match="tabulate"):  # where the summary is the whole job, it is an error
        study.main(["--name", "s", "--results", str(tmp_path / "main"), "--summarize-only"])

    def no_scipy(_):
        raise ImportError("No module named 'scipy'")
    monkeypatch.setattr(study, "write_summaries", no_scipy)  # any other missing module is not passed over
    with pytest.raises(ImportError, match="scipy"):
        study.main(["--name", "s", "--results", str(tmp_path / "main"), "--merge-from", str(tmp_path / "wt")])


def test_held_out_means_and_final_temperatures_per_variant():
    last = {"dbt-a-seed0": {"val_top1": [0.2, 0.4], "temperature": 2.0},
            "dbt-a-seed1": {"val_top1": [0.4, 0.6], "temperature": 3.0},
            "dbt-a-seed2": {"val_top1": [0.1, 0.1], "temperature": 10.0}, "ce-seed0": {"val_top1": [0.5, 0.5]}}
    means = studysummary.held_out_means(last)
    assert means["ce"] == pytest.approx(50.0) and means["dbt-a"] == pytest.approx(100 * (0.3 + 0.5 + 0.1) / 3)
    header, _, row = map(_cells, studysummary.temperature_rows(last)[-1].splitlines())
    assert header == ["run", "seeds", "median", "min", "max"] and row == ["dbt-a", "3", "3.00", "2.00", "10.00"]


def test_two_studies_summarising_at_once_leave_an_index_of_both(tmp_path, monkeypatch):
    """results/README.md is written by each study's summary. Study a's index is computed, then study b records a run
    and summarises before a's index is written: the index last written must list b's run (b waits for a's)."""
    a, b = Study(tmp_path / "results" / "a"), Study(tmp_path / "results" / "b")
    a.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "runs", "ce-seed0", [0.1, 0.2]))])
    computed, b_done, index = threading.Event(), threading.Event(), studysummary.index

    def slow_index(studies):
        text = index(studies)
        if not computed.is_set():  # a's index: hold it until b has summarised (or 3 s, while b waits for the lock)
            computed.set()
            b_done.wait(3)
        return text
    monkeypatch.setattr(studysummary, "index", slow_index)

    def summarise_b():
        computed.wait(60)
        b.add([studyrecords.record_from_run_folder(_run_copy(tmp_path / "runs-b", "dbt-seed0", [0.3, 0.4]))])
        study.write_summaries(b)
        b_done.set()
    thread = threading.Thread(target=summarise_b)
    thread.start()
    study.write_summaries(a)
    thread.join(60)
    assert b_done.is_set()
    assert (tmp_path / "results" / "README.md").read_text() == index([a, b])
    assert "| b | 1 | dbt (1) |" in index([a, b])
