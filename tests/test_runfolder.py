"""hdkdlib.runfolder on its own: beginning a run in a folder, and the readers other runs' files go through."""
import dataclasses
import json

import pytest
import torch

from hdkdlib import runfolder
from hdkdlib.config import TrainConfig
from hdkdlib.runfolder import RunFolder


def _record(**settings):
    cfg = TrainConfig(dataset="synthetic", arch="toy_mlp", **settings).validate()
    return {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "split": {"checksum": "abc"}}


def test_begin_with_resume_true_none_false(tmp_path):
    said = []
    folder = RunFolder(tmp_path / "run")
    folder.begin(_record(), resume=None, say=said.append)  # a new folder: begun without a word
    assert folder.exists() and said == []
    RunFolder(tmp_path / "new").begin(_record(), resume=True, say=said.append)
    assert said == [f"nothing to resume in {tmp_path / 'new'}: starting a new run there"]

    folder.save_checkpoint({"epoch": 0, "batch": 3})
    with pytest.raises(FileExistsError, match="an interrupted run: continue it with the same command plus --resume"):
        folder.begin(_record(), resume=False)
    folder.begin(_record(), resume=None)  # continue what is there
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        folder.begin(_record(lr=0.2), resume=True)
    folder.begin(_record(out="elsewhere", threads=1, split_dir="moved"), resume=True)  # places and speed may change
    other_split = {**_record(), "split": {"checksum": "def"}}
    with pytest.raises(ValueError, match=r"split \(checksum\)"):
        folder.begin(other_split, resume=True)


def test_a_folder_that_never_reached_a_checkpoint_starts_again(tmp_path):
    said = []
    folder = RunFolder(tmp_path / "run")
    folder.begin(_record(), resume=None)
    folder.append_metrics({"epoch": 1, "weights": {}})
    folder.begin(_record(), resume=False, say=said.append)
    assert "stopped before its first checkpoint" in said[0] and folder.metrics() == [] and folder.exists()


def test_final_weights_and_network_readers(tmp_path):
    folder = RunFolder(tmp_path / "done")
    folder.begin(_record(), resume=None)
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


def test_settings_a_run_does_not_use_may_change_its_default(tmp_path):
    """A run folder begun under another default of a setting the run never uses (the weight update's, for fixed
    weights; meta_traverse under a fixed weight lr; meta_lr under the per-run one) still resumes; a setting
    the run does use is still refused."""
    def differ(old, new):
        folder = RunFolder(tmp_path / f"run{len(list(tmp_path.iterdir()))}")
        folder.begin(_record(**old), resume=None)
        return folder.settings_differ(_record(**new))

    weight_update = {"meta_traverse": 0.25, "meta_interval": 2, "val_loss": "ce", "alpha": 0.3, "hypergrad_norm": "none"}
    assert differ({"method": "ce", **weight_update}, {"method": "ce"}) == []
    assert differ({"method": "dbt", "meta_schedule": "fixed", "meta_lr": 0.01}, {"method": "dbt"}) == []
    assert differ({"method": "hdkd", "meta_traverse": 0.25}, {"method": "hdkd"}) == ["meta_traverse"]
    assert differ({"method": "hdkd", **weight_update}, {"method": "hdkd"}) == sorted(weight_update)
    fixed = {"method": "hdkd", "meta_schedule": "fixed"}
    assert differ({**fixed, "meta_traverse": 0.25}, fixed) == []
    assert differ({**fixed, "meta_lr": 0.01}, fixed) == ["meta_lr"]
    assert differ({"method": "ce", "lr": 0.2}, {"method": "hdkd"}) == ["lr", "method"]
