"""What the notebooks call instead of holding logic: the shared set-up cell, the torchrun launch, the grid."""
import subprocess
from pathlib import Path

import pytest
import torch

from hdkdlib import grid, launch, notebook
from hdkdlib.config import TrainConfig, argparser, config_from_dict
from hdkdlib.runfolder import RunFolder


def test_set_up_checks_the_parameters_sets_threads_and_resolves_data(monkeypatch):
    monkeypatch.setattr("hdkdlib.distributed.idle_threads", lambda: 1)
    torch.set_num_threads(2)
    ns = {"__annotations__": {"epochs": int, "data_root": str, "dataset": str}, "epochs": 1, "data_root": "auto",
          "dataset": "synthetic"}
    params, data, quick = notebook.set_up(ns, dataset="synthetic")
    assert params == {"epochs": 1, "data_root": "auto", "dataset": "synthetic"} and torch.get_num_threads() == 1
    assert quick and data["n_per_class"] == 60 and "quick" not in data
    assert notebook.set_up(ns) == (params, {}, False)
    with pytest.raises(NameError, match="unknown parameter 'epoch'"):
        notebook.set_up({**ns, "epoch": 3})
    with pytest.raises(TypeError, match="parameter 'epochs' must be int"):
        notebook.set_up({**ns, "epochs": "3"}, dataset="synthetic")


def test_the_torchrun_command_rebuilds_the_settings_and_resumes_what_is_there(tmp_path, monkeypatch):
    cfg = TrainConfig(dataset="synthetic", arch="toy_mlp", epochs=3, lr=0.05, out=str(tmp_path / "run")).validate()
    command = launch.torchrun_command(cfg, 4)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert command[5:7] == ["-m", "hdkdlib.train"] and "--resume" not in command
    given = {k: v for k, v in vars(argparser().parse_args(command[7:])).items() if v is not None}
    assert config_from_dict(given) == cfg
    RunFolder(cfg.out).write_config({"config": {}})
    assert launch.torchrun_command(cfg, 4)[-1] == "--resume"
    with pytest.raises(ValueError, match="nproc must be >= 1"):
        launch.torchrun_command(cfg, 0)

    launched = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: launched.append(command))
    assert launch.torchrun(cfg, 2) and len(launched) == 1
    RunFolder(cfg.out).save_model({})
    RunFolder(cfg.out).write_results({})
    assert not launch.torchrun(cfg, 2) and len(launched) == 1  # finished: not launched again
    with pytest.raises(ValueError, match="needs cfg.out"):
        launch.torchrun(TrainConfig(dataset="synthetic", arch="toy_mlp"), 2)


def test_a_run_that_starts_from_another_comes_after_it(tmp_path):
    runs = grid.ablation_grid(["ce", "imta_kd"], tmp_path, variants=True)
    assert "hdkd" in runs  # the frozen variant's source, added when the methods lack it
    order = grid.run_order(runs, tmp_path)
    assert sorted(order) == sorted(runs)
    assert order.index("ce+GE") < order.index("imta 2-stage") and order.index("hdkd") < order.index("hdkd frozen")
    backwards = {"frozen": dict(method="hdkd", freeze_weights_from=str(tmp_path / "source")),
                 "source": dict(method="hdkd")}
    assert grid.run_order(backwards, tmp_path) == ["source", "frozen"]
    circle = {"a": dict(init_from=str(tmp_path / "b")), "b": dict(init_from=str(tmp_path / "a"))}
    with pytest.raises(ValueError, match="in a circle: a -> b -> a"):
        grid.run_order(circle, tmp_path)
    assert grid.folder_name("hdkd init=ds") == "hdkd_init-ds" and Path(tmp_path / grid.folder_name("x y")).name == "x_y"
