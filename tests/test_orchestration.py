"""What the notebooks call instead of holding logic: the shared set-up cell, the torchrun launch, the grid."""
import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch

from hdkdlib import grid, launch, notebook
from hdkdlib.config import TrainConfig, argparser, config_from_dict, config_to_dict
from hdkdlib.runfolder import RunFolder, RunFolderMismatch


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


def test_set_up_takes_relative_path_parameters_from_the_project_root(tmp_path, monkeypatch):
    """Notebooks print runs/03_cifar100/<run>; pasted into run_dir it must name that folder whether the kernel
    starts in notebooks/ (JupyterLab, make run) or elsewhere. Absolute paths, "" and "auto" stay as given."""
    monkeypatch.setattr("hdkdlib.distributed.idle_threads", lambda: 1)
    monkeypatch.setenv("HDKD_ROOT", str(tmp_path / "project"))
    monkeypatch.chdir(tmp_path)
    declared = {"data_root": str, "out_dir": str, "run_dir": str, "seed": int}
    ns = {"__annotations__": declared, "data_root": "auto", "out_dir": "runs/03_cifar100/x",
          "run_dir": str(tmp_path / "abs"), "seed": 0}
    params = notebook.set_up(ns).params
    assert params["out_dir"] == ns["out_dir"] == str(tmp_path / "project" / "runs" / "03_cifar100" / "x")
    assert params["run_dir"] == str(tmp_path / "abs") and params["data_root"] == "auto"
    ns = {"__annotations__": declared, "data_root": "data/tin", "out_dir": "", "run_dir": "", "seed": 0}
    assert notebook.set_up(ns).params == {"data_root": str(tmp_path / "project" / "data" / "tin"), "out_dir": "",
                                          "run_dir": "", "seed": 0}


def test_notebook_run_folders_are_named_by_their_epochs(tmp_path, monkeypatch):
    """03/04's default run folder carries the epochs: `-p epochs 300` after a 30-epoch run gets its own folder, not
    the other run's settings refused. A run begun in the former default folder (no epochs in its name) with these
    epochs goes on there (it stays resumable); one with other epochs, or a damaged one, is left alone."""
    import json
    monkeypatch.setenv("HDKD_RUNS", str(tmp_path / "runs"))
    nb = tmp_path / "runs" / "03_cifar100"

    def folder(epochs, seed=0, quick=False):
        return notebook.run_folder("03_cifar100", "cifar100-msdnet-hdkd", epochs, seed, quick)
    assert folder(30) == str(nb / "cifar100-msdnet-hdkd-e30-seed0")
    assert folder(300, 1, True) == str(nb / "cifar100-msdnet-hdkd-e300-seed1-quick")
    former = nb / "cifar100-msdnet-hdkd-seed0"
    former.mkdir(parents=True)
    (former / "config.json").write_text(json.dumps({"config": {"epochs": 30, "seed": 0}}))
    assert folder(30) == str(former)
    assert folder(300) == str(nb / "cifar100-msdnet-hdkd-e300-seed0")
    (former / "config.json").write_text("{not json")
    assert folder(30) == str(nb / "cifar100-msdnet-hdkd-e30-seed0")
    assert (former / "config.json").read_text() == "{not json"


def test_set_up_can_run_again_in_a_live_kernel(monkeypatch):
    """Running the set-up cell a second time (after an edit of the parameters cell) must not take the names the
    cells after it made (a loop variable, params) for misspelt papermill parameters; the first check still does."""
    monkeypatch.setattr("hdkdlib.distributed.idle_threads", lambda: 1)
    ns = {"__annotations__": {"epochs": int, "seeds": str}, "epochs": 1, "seeds": "0,1"}
    params = notebook.set_up(ns).params
    ns.update(m="ce", method_list=["ce"], params=params, epochs=2)  # later cells ran; the parameter was edited
    assert notebook.set_up(ns).params == {"epochs": 2, "seeds": "0,1"}
    fresh = {"__annotations__": {"epochs": int, "seeds": str}, "epochs": 1, "seeds": "0,1", "m": "ce"}
    with pytest.raises(NameError, match="unknown parameter 'm'"):
        notebook.set_up(fresh)
    # papermill's -p seeds 3 arrives as an int: a str parameter takes it as "3" (bools stay refused)
    assert notebook.set_up({"__annotations__": {"seeds": str}, "seeds": 3}).params == {"seeds": "3"}
    with pytest.raises(TypeError, match="parameter 'seeds' must be str, got bool"):
        notebook.set_up({"__annotations__": {"seeds": str}, "seeds": True})


def test_the_torchrun_command_rebuilds_the_settings_and_resumes_what_is_there(tmp_path, monkeypatch):
    cfg = TrainConfig(dataset="synthetic", arch="toy_mlp", epochs=3, lr=0.05, out=str(tmp_path / "run")).validate()
    command = launch.torchrun_command(cfg, 4)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert command[5:7] == ["-m", "hdkdlib.train"] and "--resume" not in command
    given = {k: v for k, v in vars(argparser().parse_args(command[7:])).items() if v is not None}
    assert config_from_dict(given) == cfg
    RunFolder(cfg.out).write_config({"config": config_to_dict(cfg)})
    assert launch.torchrun_command(cfg, 4)[-1] == "--resume"
    with pytest.raises(ValueError, match="nproc must be >= 1"):
        launch.torchrun_command(cfg, 0)

    launched = []
    monkeypatch.setattr(launch, "run_to_end", launched.append)
    assert launch.torchrun(cfg, 2) and len(launched) == 1
    RunFolder(cfg.out).save_model({})
    RunFolder(cfg.out).write_results({})
    assert not launch.torchrun(cfg, 2) and len(launched) == 1  # finished: not launched again
    with pytest.raises(RunFolderMismatch, match="epochs"):  # finished with other settings: said, not passed over
        launch.torchrun(dataclasses.replace(cfg, epochs=4), 2)
    # a folder begun with other settings: refused before launching (resumed, the processes would take the folder's
    # lr for the one the command leaves at its default)
    other = dataclasses.replace(cfg, lr=0.1, out=str(tmp_path / "other"))
    RunFolder(other.out).write_config({"config": config_to_dict(dataclasses.replace(other, lr=0.05))})
    with pytest.raises(RunFolderMismatch, match="lr"):
        launch.torchrun(other, 2)
    assert len(launched) == 1
    with pytest.raises(ValueError, match="needs cfg.out"):
        launch.torchrun(TrainConfig(dataset="synthetic", arch="toy_mlp"), 2)


def test_an_interrupted_launch_stops_its_processes_with_sigterm(tmp_path):
    """Stopping the notebook while torchrun trains asks it to stop with SIGTERM (passed on to the ranks, which
    save a checkpoint), not SIGKILL (which left the ranks training on); the interrupt still reaches the notebook.
    A process that ignores SIGTERM is killed after the grace period; a failed one is a CalledProcessError."""
    import signal
    import sys
    import time
    script = ("import signal, sys, time, pathlib\n"
              "def stop(*_):\n    pathlib.Path(sys.argv[1]).write_text('terminated')\n    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, stop if sys.argv[2] == 'obey' else signal.SIG_IGN)\n"
              "pathlib.Path(sys.argv[1] + '.started').write_text('')\ntime.sleep(60)\n")

    def interrupted(mark, mode, grace):
        def interrupt(*_):  # once the process listens for SIGTERM (a busy machine may take seconds to start it)
            if not Path(f"{mark}.started").exists():
                return signal.setitimer(signal.ITIMER_REAL, 0.2)
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        start = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                launch.run_to_end([sys.executable, "-c", script, str(mark), mode], grace=grace)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        return time.monotonic() - start

    assert interrupted(tmp_path / "obeys", "obey", grace=30) < 30
    assert (tmp_path / "obeys").read_text() == "terminated"
    assert interrupted(tmp_path / "ignores", "ignore", grace=1) < 30  # killed after the grace period, not 60 s
    assert not (tmp_path / "ignores").exists()
    with pytest.raises(subprocess.CalledProcessError):
        launch.run_to_end([sys.executable, "-c", "raise SystemExit(3)"])


def test_the_grids_validation_objectives_are_different_losses():
    """Each variant of the weights' validation objective (and the default, balanced at alpha 0.5) computes a
    loss of its own on the same logits, after the same EMA updates: no ablation reruns another."""
    from hdkdlib import objectives
    from hdkdlib.config import TrainConfig
    torch.manual_seed(0)
    logits, y = [torch.randn(16, 5) for _ in range(3)], torch.randint(0, 5, (16,))
    runs = grid.ablation_grid(["hdkd"], "runs")
    values = {}
    for name in ["hdkd", *(n for n, s in runs.items() if {"val_loss", "alpha"} & set(s))]:
        cfg = TrainConfig(dataset="synthetic", arch="toy_mlp", **runs[name]).validate()
        loss = objectives.ValidationLoss(3, kind=cfg.val_loss, alpha=cfg.alpha)
        for scale in (1.0, 0.7):  # the EMAs move
            loss.update(torch.stack([torch.nn.functional.cross_entropy(scale * z, y) for z in logits]).detach())
        values[name] = float(loss(logits, y))
    assert len(values) == 3, values
    assert len({round(v, 6) for v in values.values()}) == len(values), values


def test_a_batch_given_in_all_is_split_evenly_over_the_processes():
    assert launch.batch_per_process(256, 1) == 256 and launch.batch_per_process(256, 8) == 32
    assert launch.batch_per_process(255, 3) == 85
    with pytest.raises(ValueError, match="256 images in all do not split evenly over 3 processes .*multiple of 3, "
                                         "e.g. 255"):
        launch.batch_per_process(256, 3)
    with pytest.raises(ValueError, match="do not split evenly over 8 .* e.g. 8"):
        launch.batch_per_process(4, 8)
    with pytest.raises(ValueError, match="must be >= 1"):
        launch.batch_per_process(256, 0)


def test_a_run_that_starts_from_another_comes_after_it(tmp_path, monkeypatch):
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
    # a relative root and absolute settings (or the other way round) name the same folders
    monkeypatch.chdir(tmp_path)
    relative = {"frozen": dict(method="hdkd", freeze_weights_from=str(tmp_path / "runs" / "source")),
                "source": dict(method="hdkd")}
    assert grid.run_order(relative, "runs") == ["source", "frozen"]
    with pytest.raises(ValueError, match="grid runs 'hdkd T=3' and 'hdkd_T-3' would share the folder hdkd_T-3"):
        grid.run_order({"hdkd T=3": {}, "hdkd_T-3": {}}, tmp_path)
    for bad in ("a/b", "..", ""):
        with pytest.raises(ValueError, match="makes no folder of its own"):
            grid.folder_name(bad)
