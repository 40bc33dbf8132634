"""hdkdlib.runfolder on its own: the readers other runs' files go through."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from hdkdlib import runfolder
from hdkdlib.config import TrainConfig
from hdkdlib.runfolder import RunFolder, RunFolderDamaged


def _record(**settings):
    cfg = TrainConfig(dataset="synthetic", arch="toy_mlp", **settings).validate()
    return {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "split": {"checksum": "abc"}}


def test_final_weights_and_network_readers(tmp_path):
    folder = RunFolder(tmp_path / "done")
    folder.write_config(_record())
    folder.write_results({"weights": {"ce1": 0.5, "kd2->1": 0.25}})
    assert runfolder.final_weights(folder.path) == runfolder.final_weights(folder.file(runfolder.RESULTS)) \
        == {"ce1": 0.5, "kd2->1": 0.25}
    assert folder.evaluated() and not folder.trained()
    folder.file(runfolder.RESULTS).write_text('{"weights": {"ce1": "x"}}')
    with pytest.raises(ValueError, match="'weights' must map term names to numbers"):
        runfolder.final_weights(folder.path)
    for bad in ("-0.5", "true", "NaN", "Infinity"):  # json.loads reads NaN and Infinity
        folder.file(runfolder.RESULTS).write_text('{"weights": {"ce1": 1.0, "ce2": %s}}' % bad)
        with pytest.raises(ValueError, match=r"results\.json: 'weights' must map term names to numbers, each finite "
                                             r"and >= 0, but 'ce2' is"):
            runfolder.final_weights(folder.path)
    folder.file(runfolder.RESULTS).write_bytes(b"\x80\x02binary pickle\xff")
    with pytest.raises(ValueError, match=r"cannot read final weights from .*results\.json \(not a JSON text file\)"):
        runfolder.final_weights(folder.path)
    folder.file(runfolder.RESULTS).write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read final weights from .*results\.json \(JSONDecodeError"):
        runfolder.final_weights(folder.path)
    with pytest.raises(FileNotFoundError, match="no finished network at .*model.pt"):
        runfolder.final_network(folder.path, "cpu")
    folder.save_model({"w": torch.ones(2)})
    assert torch.equal(runfolder.final_network(folder.path, "cpu")["w"], torch.ones(2))
    assert torch.equal(runfolder.final_network(folder.file(runfolder.MODEL), "cpu")["w"], torch.ones(2))


def test_the_recorded_commit_is_dirty_for_code_changes_but_not_for_results(tmp_path, monkeypatch):
    """Runs trained in a worktree write their metrics into its results/: that must not mark the commit they
    used as +dirty, while an edited module must."""
    import subprocess
    from hdkdlib import runinfo
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for path in ("hdkdlib/model.py", "results/cifar/RUNS.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("v1\n")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "start"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(runinfo, "code_root", lambda: tmp_path)
    assert runinfo.git_commit() == head
    (tmp_path / "results/cifar/RUNS.json").write_text("v2\n")
    assert runinfo.git_commit() == head
    (tmp_path / "hdkdlib/model.py").write_text("v2\n")
    assert runinfo.git_commit() == head + "+dirty"


def test_writers_of_one_file_at_once_each_put_a_whole_file_in_place(tmp_path):
    """Parallel runs draw one split file, and the arms of a study write its summary, at the same moment: both
    writers have their temporary file filled before either renames it. Each rename must succeed and the file
    must be one writer's whole text (a shared temporary name lost one writer's rename)."""
    import threading

    from hdkdlib.paths import atomic_write

    target, both_written, errors = tmp_path / "split.json", threading.Barrier(2, timeout=30), []

    def writer(text):
        def write(tmp):
            tmp.write_text(text)
            both_written.wait()  # neither renames before the other has written
        try:
            atomic_write(target, write)
        except Exception as e:  # noqa: BLE001 - collected to fail the test in the main thread
            errors.append(e)

    texts = ["a" * 1000, "b" * 2000]
    threads = [threading.Thread(target=writer, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]  # no temporary file left behind


def test_a_file_is_on_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """Checkpoint rotation renames the old checkpoint away first: after a power loss both names could hold empty
    files unless the new one was synced before its rename, and the folder after it."""
    import os

    from hdkdlib import paths
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    paths.atomic_write(tmp_path / "checkpoint.pt", lambda tmp: Path(tmp).write_bytes(b"new"),
                       before_replace=lambda: events.append(("rotate", "")))
    assert [e[0] for e in events] == ["fsync", "rotate", "replace", "fsync"]
    assert events[0][1].endswith(".tmp") and events[3][1] == str(tmp_path)


# --- one reader per kind of file (issue 36) ----------------------------------------------------------------
def _payload(marker):
    """An object whose unpickling would create `marker`: what a hostile or foreign file may carry."""
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    return Payload()


def test_one_json_reader_bounds_size_and_depth_and_names_the_file(tmp_path, monkeypatch):
    from hdkdlib import records
    path = tmp_path / "record.json"
    cases = [('{"x": ' + "9" * 5000 + "}", "a number longer than 4300 digits"),
             ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),  # past the parser's own stack
             ('{"x": ' + "[" * 64 + "]" * 64 + "}", "nested deeper than 64 levels"),  # past our bound alone
             (b"\x80\x02binary pickle\xff", "not a JSON text file"),
             ("{not json", "JSONDecodeError: Expecting property name")]
    for text, reason in cases:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(records.Unreadable) as caught:
            records.read_json(path)
        assert str(caught.value).startswith(f"{path} is unreadable ({reason}"), (reason, str(caught.value)[:200])
        assert caught.value.reason.startswith(reason) and "\n" not in str(caught.value)
    path.write_text('{"x": ' + "[" * 63 + "]" * 63 + "}")  # 64 levels: within the bound
    assert len(records.read_json(path)["x"]) == 1
    monkeypatch.setattr(records, "MAX_JSON_BYTES", 2 ** 20)
    path.write_text('{"x": "' + "a" * 2 ** 20 + '"}')
    with pytest.raises(records.Unreadable, match=r"record\.json is unreadable \(larger than 1 MiB"):
        records.read_json(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(records.Unreadable, match=r"record\.json is unreadable \(a directory, not a file\)"):
        records.read_json(path)


def test_one_tensor_reader_refuses_a_payload_unexecuted_and_in_our_words(tmp_path):
    from hdkdlib import records
    marker, folder = tmp_path / "EXECUTED", RunFolder(tmp_path / "run")
    folder.path.mkdir()
    model = folder.file(runfolder.MODEL)
    torch.save({"w": torch.ones(2), "extra": _payload(marker)}, model)
    ours = "is unreadable (it holds objects other than tensors (a modified or foreign file); it was not executed)"
    for load in (lambda: records.load_tensors(model), lambda: folder.load_model("cpu"),
                 lambda: runfolder.final_network(folder.path, "cpu"), lambda: runfolder.final_network(model, "cpu")):
        with pytest.raises(ValueError) as caught:
            load()
        message = str(caught.value)
        assert ours in message and "weights_only" not in message and "\n" not in message, message
    assert not marker.exists()
    torch.save([torch.ones(2)], model)
    with pytest.raises(runfolder.RunFolderDamaged, match="it holds no network's state dict"):
        folder.load_model("cpu")
    torch.save({"w": torch.ones(2)}, model)
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(runfolder.RunFolderDamaged, match=r"model\.pt in .* is unreadable \(truncated or corrupt "
                                                         r"\(RuntimeError\)\): restore it from a copy"):
        folder.load_model("cpu")
    model.unlink()
    model.mkdir()
    with pytest.raises(records.Unreadable, match=r"model\.pt is unreadable \(a directory, not a file\)"):
        records.load_tensors(model)
    model.rmdir()
    torch.save({"w": torch.ones(2), "extra": _payload(marker)}, model)  # the payload is real: an unsafe load runs it
    torch.load(model, weights_only=False)
    assert marker.exists()


def test_the_recorded_commit_is_the_codes_whatever_hdkd_root_names(tmp_path, monkeypatch):
    """HDKD_ROOT moves run folders and data, not the code: another repository there is not the commit recorded."""
    import subprocess
    from hdkdlib import runinfo
    code = subprocess.run(["git", "-C", str(runinfo.code_root()), "rev-parse", "HEAD"], capture_output=True, text=True)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path), "commit", "-q",
                    "--allow-empty", "-m", "other"], check=True)
    monkeypatch.setenv("HDKD_ROOT", str(tmp_path))
    assert runinfo.git_commit().split("+")[0] == (code.stdout.strip() or "unknown")


@pytest.mark.parametrize("record", [{"settings": {"epochs": 2}}, {"config": [1]}])
def test_a_config_json_without_a_runs_settings_is_one_line(tmp_path, record):
    """Another tool's config.json in the out folder, or one edited by hand: named, not a KeyError later."""
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(RunFolderDamaged, match=r"config.json in .* holds no run's settings \(a 'config' object\)"):
        RunFolder(tmp_path).config()


@pytest.mark.parametrize("part,value", [("split", "abc"), ("data", [1]), ("resumed", 5), ("resumed", [1])])
def test_a_config_json_whose_parts_have_other_shapes_is_one_line(tmp_path, part, value):
    """The parts a resume reads and adds to, edited by hand: named, not an AttributeError or TypeError later."""
    (tmp_path / "config.json").write_text(json.dumps({"config": {"epochs": 2}, part: value}))
    with pytest.raises(RunFolderDamaged, match=rf"config.json in .*: its '{part}' is .*, not (an object|a list)"):
        RunFolder(tmp_path).config()
    (tmp_path / "config.json").write_text(json.dumps({"config": {}, "split": {}, "data": None, "resumed": []}))
    assert RunFolder(tmp_path).config()["data"] is None  # the shapes runs write pass


@pytest.mark.parametrize("anytime", ["none", [{"exit": 1}], [1, 2], {"exit": 1, "top1": 0.5}])
def test_results_json_whose_exits_have_other_shapes_is_one_line(tmp_path, anytime):
    (tmp_path / "results.json").write_text(json.dumps({"anytime": anytime}))
    with pytest.raises(RunFolderDamaged, match=r"results.json in .*: its 'anytime' is not a list of exits' results"):
        RunFolder(tmp_path).results()
    (tmp_path / "results.json").write_text(json.dumps({"anytime": [{"exit": 1, "top1": 0.5, "flops": 3}]}))
    assert RunFolder(tmp_path).results()["anytime"][0]["top1"] == 0.5


def test_a_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("precious notes")
    (tmp_path / ".lock").symlink_to(tmp_path / "notes.txt")
    with pytest.raises(RunFolderDamaged, match=r"\.lock is a link \(to .*notes.txt\): its lock would write into "
                                               r"the target; remove the link"):
        RunFolder(tmp_path).acquire()
    assert (tmp_path / "notes.txt").read_text() == "precious notes"
    (tmp_path / ".lock").unlink()
    folder = RunFolder(tmp_path)
    folder.acquire()
    assert (tmp_path / ".lock").read_text() == str(os.getpid())
    folder.release()


def test_a_restart_killed_midway_leaves_a_folder_that_starts_again(tmp_path, monkeypatch):
    """A run that stopped before its first checkpoint is forgotten file by file; killed after the first removal,
    the folder must not be left with metrics but no config.json, which every later start refuses."""
    record = {"config": dataclasses.asdict(TrainConfig(dataset="synthetic", arch="toy_mlp").validate())}
    folder = RunFolder(tmp_path / "run")
    folder.begin(record, "start")
    folder.append_metrics({"epoch": 1, "weights": {}})
    real_unlink, removed = Path.unlink, []

    def killed_after_one(path, missing_ok=False):
        if removed:
            raise KeyboardInterrupt  # the kill
        real_unlink(path, missing_ok=missing_ok)
        removed.append(path.name)
    monkeypatch.setattr(Path, "unlink", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        folder.begin(record, "start")
    monkeypatch.setattr(Path, "unlink", real_unlink)
    folder.begin(record, "start")  # the same command again starts the run
    assert folder.config() is not None and folder.metrics() == []


def test_results_store_round_trip(tmp_path):
    for method, acc in (("ce", 0.5), ("hdkd", 0.6)):
        RunFolder(tmp_path / method).write_results({"config": {"method": method, "arch": "a", "dataset": "d", "seed": 0},
                                                    "anytime": [{"exit": 1, "top1": acc, "top5": 0.9, "flops": 1e6}]})
    table = runfolder.load_results(str(tmp_path / "*"))
    assert table.sort_values("method")[["method", "top1"]].values.tolist() == [["ce", 0.5], ["hdkd", 0.6]]
    assert not list(tmp_path.glob("*/*.tmp"))
