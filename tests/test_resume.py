"""hdkdlib.resume: settings settled before training starts, and the rules for run folders made earlier."""
import dataclasses
import json

import pytest

from hdkdlib import resume
from hdkdlib.config import TrainConfig
from hdkdlib.runfolder import RunFolder


def _settings(out, **settings):
    return {"dataset": "synthetic", "arch": "toy_mlp", "out": str(out), **settings}


def _record(**settings):
    cfg = TrainConfig(dataset="synthetic", arch="toy_mlp", **settings).validate()
    return {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "split": {"checksum": "abc"}}


def test_resolve_with_each_mode(tmp_path, capsys):
    folder = RunFolder(tmp_path / "run")
    plan = resume.resolve(_settings(folder.path), "auto")  # a new folder: begun without a word
    assert plan.action == "start" and isinstance(plan.cfg, TrainConfig)
    folder.begin(_record(out=str(folder.path)), plan.action)
    assert folder.exists() and capsys.readouterr().err == ""
    with pytest.raises(FileNotFoundError, match=r"nothing to resume in .*new \(no run began there\): check --out, "
                                                r"or leave out --resume to start a new run"):
        resume.resolve(_settings(tmp_path / "new"), "continue")  # a mistyped --out: not a new run of the defaults
    assert not (tmp_path / "new").exists()

    folder.save_checkpoint({"epoch": 0, "batch": 3})
    with pytest.raises(FileExistsError, match="an interrupted run: continue it with the same command plus --resume"):
        resume.resolve(_settings(folder.path), "new")
    assert resume.resolve(_settings(folder.path), "auto").action == "continue"  # continue what is there
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        resume.resolve(_settings(folder.path, lr=0.2), "continue")
    moved = resume.resolve(_settings(folder.path, threads=1, split_dir="moved"), "continue")  # places, speed may change
    assert moved.action == "continue" and moved.cfg.threads == 1
    only_out = resume.resolve({"out": str(folder.path)}, "continue")  # --resume takes the recorded settings
    assert (only_out.cfg.dataset, only_out.cfg.arch) == ("synthetic", "toy_mlp")
    other_split = {**_record(), "split": {"checksum": "def"}}
    with pytest.raises(ValueError, match=r"split \(checksum\)"):
        folder.begin(other_split, "continue")
    with pytest.raises(ValueError, match="resume must be one of new, continue, auto, got True"):
        resume.resolve(_settings(folder.path), True)


def test_a_folder_that_never_reached_a_checkpoint_starts_again(tmp_path, capsys):
    folder = RunFolder(tmp_path / "run")
    folder.begin(_record(), "start")
    folder.append_metrics({"epoch": 1, "weights": {}})
    assert resume.resolve(_settings(folder.path), "new").action == "start"
    folder.begin(_record(), "start")
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert folder.metrics() == [] and folder.exists()


def test_settings_a_run_does_not_use_may_change_its_default():
    """A run folder begun under another default of a setting the run never uses (the weight update's, for fixed
    weights; meta_traverse under a fixed weight lr; meta_lr under the per-run one) still resumes; a setting
    the run does use is still refused."""
    def differ(old, new):
        return resume.settings_differ(_record(**old)["config"], _record(**new)["config"])

    weight_update = {"meta_traverse": 0.25, "meta_interval": 2, "val_loss": "ce", "alpha": 0.3, "hypergrad_norm": "none"}
    assert differ({"method": "ce", **weight_update}, {"method": "ce"}) == []
    assert differ({"method": "dbt", "meta_schedule": "fixed", "meta_lr": 0.01}, {"method": "dbt"}) == []
    assert differ({"method": "hdkd", "meta_traverse": 0.25}, {"method": "hdkd"}) == ["meta_traverse"]
    assert differ({"method": "hdkd", **weight_update}, {"method": "hdkd"}) == sorted(weight_update)
    fixed = {"method": "hdkd", "meta_schedule": "fixed"}
    assert differ({**fixed, "meta_traverse": 0.25}, fixed) == []
    assert differ({**fixed, "meta_lr": 0.01}, fixed) == ["meta_lr"]
    assert differ({"method": "ce", "lr": 0.2}, {"method": "hdkd"}) == ["lr", "method"]


def test_a_whole_number_is_the_same_setting_as_its_float(tmp_path):
    """temperature=3 from Python and --temperature 3 (3.0) from the command line are one setting: the run resumes;
    3 against 3.5 and a bool against 1 still differ; a record's lists and maps compare by value too."""
    def differ(old, new):
        return resume.settings_differ(_record(**old)["config"], _record(**new)["config"])

    assert differ({"method": "dbt", "temperature": 3, "lr": 1}, {"method": "dbt", "temperature": 3.0, "lr": 1.0}) == []
    assert differ({"method": "dbt", "temperature": 3}, {"method": "dbt", "temperature": 3.5}) == ["temperature"]
    assert resume.comparable({"a": [1, 2.5], "b": 60}) == resume.comparable({"b": 60.0, "a": [1.0, 2.5]})
    assert resume.comparable(True) != resume.comparable(1) and resume.comparable(float("nan")) == "NaN"
    folder = RunFolder(tmp_path / "run")
    folder.begin(_record(method="dbt", temperature=3), "start")
    folder.save_checkpoint({"epoch": 0, "batch": 3})
    plan = resume.resolve(_settings(folder.path, method="dbt", temperature=3.0), "continue")
    assert plan.action == "continue" and plan.cfg.temperature == 3


def test_a_second_stage_begun_before_heads_reset_keeps_resetting_every_head(tmp_path, capsys):
    """IMTA's second stage once re-initialised every head; its run folders (no heads_reset recorded) resume under
    that rule with the same command; any other run ignores the setting, whatever its record says."""
    stage2 = {"method": "imta_kd", "init_from": "stage1", "train_heads_only": True}
    record = _record(**stage2)
    del record["config"]["heads_reset"]
    folder = RunFolder(tmp_path / "run")
    folder.begin(record, "start")
    folder.save_checkpoint({"epoch": 0, "batch": 3})
    plan = resume.resolve(_settings(folder.path, **stage2), "auto")
    assert plan.action == "continue" and plan.cfg.heads_reset == "all"
    assert resume.resolve({"out": str(folder.path)}, "continue").cfg.heads_reset == "all"
    assert "began under a former default (heads_reset all): continuing with it" in capsys.readouterr().err
    plain = _record(method="ce")["config"]
    del plain["heads_reset"]
    assert resume.settings_differ(plain, _record(method="ce")["config"]) == []


def test_a_run_resumes_only_in_as_many_processes_as_it_began(tmp_path):
    """batch_size is per process: another process count changes the global batch, and a mid-epoch checkpoint's
    batch index would point elsewhere in the epoch order. Evaluating it elsewhere is fine."""
    folder = RunFolder(tmp_path / "run")
    folder.begin({**_record(), "world_size": 2}, "start")
    folder.save_checkpoint({"epoch": 0, "batch": 3})
    with pytest.raises(ValueError, match=r"trained in 2 process\(es\), this resume has 1: batch_size is per process, .*"
                                         r"resume with 2 \(torchrun --nproc-per-node 2"):
        folder.begin({**_record(), "world_size": 1}, "continue")
    folder.begin({**_record(), "world_size": 2}, "continue")
    folder.begin({**_record(), "world_size": 1}, "load")
    assert json.loads((folder.path / "config.json").read_text())["world_size"] == 2  # nothing rewritten
