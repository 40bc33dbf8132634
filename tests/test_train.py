import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hdkdlib import data, objectives, resume, train
from hdkdlib.config import config_to_dict
from hdkdlib.paths import DiskFull
from hdkdlib.runfolder import RunFolder, RunFolderDamaged, RunFolderMismatch
from hdkdlib.resume import resolve
from hdkdlib.train import TrainConfig, TrainingInterrupted, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    data.write_fake_cifar(root, "cifar10", n_train=400, n_test=100, seed=0)
    return root


def _cfg(fake_root, out, **kw):
    values = dict(dataset="cifar10", data_root=str(fake_root), split_dir=str(fake_root / "splits"), arch="toy_mlp",
                  method="hdkd", n_per_class=24, val_per_class=6, epochs=3, batch_size=16, lr=0.05, meta_schedule="fixed", meta_lr=0.01,
                  eval_batch_size=64, out=str(out), progress=False, device="cpu", check_every=5)
    values.update(kw)
    return TrainConfig(**values)


def _resume(cfg):
    """What --resume does with cfg's run folder: the settings resolved against it, then the run continued."""
    plan = resolve(cfg, "continue")
    trainer = train.prepare(plan.cfg)
    trainer.fit(plan.action)
    return trainer


def _metrics(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # timings differ between any two runs
        r.pop("images_per_s"), r.pop("epoch_seconds")
    return rows


def _interrupt(trainer, when):
    """Train until when(trainer) holds after a step, then stop as the SIGTERM handler does; the error raised."""
    original = trainer.train_step

    def step_then_signal(x, y):
        loss = original(x, y)
        if when(trainer):
            trainer.request_stop(signal.SIGTERM)
        return loss

    trainer.train_step = step_then_signal
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit()
    return stopped.value


def test_interrupt_and_resume_is_bit_identical(fake_root, tmp_path):
    full = train.prepare(_cfg(fake_root, tmp_path / "full"))
    full.fit()

    broken = train.prepare(_cfg(fake_root, tmp_path / "resumed"))
    stop_at = len(broken.data.train) + 4  # mid-epoch 2
    stopped = _interrupt(broken, lambda t: t.step == stop_at)
    assert re.search("epoch 2, batch 4; checkpoint saved.*--resume", str(stopped)), stopped
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 4, stop_at)
    began = json.loads((tmp_path / "resumed" / "config.json").read_text())
    (tmp_path / "resumed" / "config.json").write_text(json.dumps({**began, "git_commit": "0123abcd (began)"}))

    resumed = _resume(_cfg(fake_root, tmp_path / "resumed"))
    # config.json keeps the commit the run began with and adds the resuming code's (here: this checkout's)
    from hdkdlib import runinfo
    record = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert record["git_commit"] == "0123abcd (began)" and record["config"] == began["config"]
    assert record["resumed"] == [{"epochs_done": 1, "batch": 4, "git_commit": runinfo.git_commit(), "packages": began["packages"],
                                  "device": began["device"], "threads_used": began["threads_used"],
                                  "step_mode": "eager"}]
    assert "resumed" not in json.loads((tmp_path / "full" / "config.json").read_text())
    assert resumed.evaluate()["resumed"] == record["resumed"] and full.evaluate()["resumed"] == []
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(full.objective.gamma, resumed.objective.gamma)
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "resumed")
    assert len(_metrics(tmp_path / "full")) == 3


def test_run_folder_guards(fake_root, tmp_path):
    out = tmp_path / "run"
    train.prepare(_cfg(fake_root, out, epochs=1)).fit()  # trained, not evaluated: as if killed during the evaluation
    with pytest.raises(FileExistsError, match="holds a run trained but not evaluated: rerun with --resume to evaluate"):
        train.run(_cfg(fake_root, out, epochs=1), resume="new")
    with pytest.raises(ValueError, match=r"holds a run with other settings \(lr\)"):
        _resume(_cfg(fake_root, out, epochs=1, lr=0.2))
    record = json.loads((out / "config.json").read_text())
    del record["config"]["alpha"]  # a run folder from before a setting existed: its default applies
    (out / "config.json").write_text(json.dumps(record))
    _resume(_cfg(fake_root, out, epochs=1, compile="network"))  # engine options may change
    good = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(good[: len(good) // 3])
    (out / "checkpoint.prev.pt").write_bytes(good)
    resumed = _resume(_cfg(fake_root, out, epochs=1))  # the truncated checkpoint.pt is skipped, after saying so; the intact .prev is used
    assert resumed.epoch == 1
    assert (out / "checkpoint.prev.pt").read_bytes() == good  # nothing good was overwritten
    # both unreadable: the run is trained, so its network is model.pt, evaluated as it is; nothing deleted
    # (an interrupted run with no readable checkpoint is one line: test_a_damaged_record_is_one_line_...)
    (out / "checkpoint.prev.pt").write_bytes(good[:100])
    (out / "checkpoint.pt").write_bytes(good[:100])
    resumed = _resume(_cfg(fake_root, out, epochs=1))
    model = torch.load(out / "model.pt", weights_only=True)
    assert resumed.epoch == 1 and all(torch.equal(v, model[k]) for k, v in resumed.model.state_dict().items())
    assert (out / "checkpoint.pt").read_bytes() == good[:100] == (out / "checkpoint.prev.pt").read_bytes()


def test_nan_stops_training_without_touching_the_last_good_checkpoint(fake_root, tmp_path):
    out = tmp_path / "run"
    trainer = train.prepare(_cfg(fake_root, out, epochs=3, method="ce"))
    original = trainer.train_step

    def poisoned(x, y):
        if trainer.epoch == 1:
            x = x * float("nan")
        return original(x, y)

    trainer.train_step = poisoned
    with pytest.raises(FloatingPointError, match="non-finite loss .* epoch 2"):
        trainer.fit()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_config_errors_name_the_setting(fake_root, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'hdkdd'; valid: ce, dbt"):
        _cfg(fake_root, tmp_path, method="hdkdd").validate()
    with pytest.raises(ValueError, match="unknown arch"):
        _cfg(fake_root, tmp_path, arch="msdnet").validate()
    assert main(["--dataset", "cifar100", "--data-root", str(tmp_path / "none"), "--no-download", "--epochs", "1",
                 "--device", "cpu"]) == 2


def test_results_and_config_record(fake_root, tmp_path):
    out = tmp_path / "run"
    trainer = train.prepare(_cfg(fake_root, out, epochs=1))
    trainer.fit()
    res = trainer.evaluate()
    saved = json.loads((out / "results.json").read_text())
    assert [r["exit"] for r in saved["anytime"]] == [1, 2, 3, 4] and len(saved["budgeted"]) == 39
    assert saved["cost_convention"] == "msdnet"  # what its "flops" count (a backbone's: multiply-accumulates)
    assert saved["config"]["method"] == "hdkd" and saved["git_commit"] and saved["packages"]["torch"]
    assert len(saved["weights_history"]) == 1 and res["split"]["checksum"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["lr"] == 0.05 and "cpu" in cfg["device"] and cfg["tf32"] is None  # GPU runs: their TF32 use
    assert cfg["config"]["threads"] == 0 and cfg["threads_used"] == 1  # auto: the toy MLP trains on one thread
    train.prepare(_cfg(fake_root, "", threads=2))
    assert torch.get_num_threads() == 2  # an explicit count is kept


def test_a_resumed_rank_other_than_0_counts_its_epoch_sums_from_zero(fake_root, tmp_path):
    """A checkpoint holds rank 0's training sums of the epoch so far; every rank taking them would count rank 0's
    images W times in the epoch's training loss and top-1, and the other ranks' would still be missing."""
    trainer = train.prepare(_cfg(fake_root, tmp_path / "run", epochs=1))
    trainer._acc = {k: v + 3 for k, v in trainer._acc.items()}
    state = trainer.state_dict()
    trainer.load_checkpoint(state)
    assert all(bool((v == 3).all()) for v in trainer._acc.values())
    trainer.rank = 1  # what another process of the run restores
    trainer.load_checkpoint(state)
    assert all(bool((v == 0).all()) for v in trainer._acc.values())


def test_two_process_ddp_equals_one_process_with_the_global_batch(fake_root, tmp_path):
    common = ["--dataset", "cifar10", "--data-root", str(fake_root), "--split-dir", str(fake_root / "splits"),
              "--arch", "toy_mlp", "--method", "hdkd", "--n-per-class", "24", "--val-per-class", "6", "--epochs", "2",
              "--lr", "0.05", "--meta-schedule", "fixed", "--meta-lr", "0.01", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "hdkdlib.train", *common, "--no-eval", "--batch-size", "16",
                             "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "hdkdlib.train", *common, "--batch-size", "8", "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] > 0
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["objective"]["gamma"], b["objective"]["gamma"], rtol=1e-4, atol=1e-5)
    # the recorded training metrics are the global batch's, not rank 0's half (the networks agree to summation
    # order, so the loss to 1e-4; an image may flip its argmax at a near tie: top-1 within one image of the 240)
    for one, two in zip(*(RunFolder(tmp_path / n).metrics() for n in ("one", "two"))):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
        assert two["train_top1"] == pytest.approx(one["train_top1"], abs=1.01 / 240)
    # the evaluation was sharded across the two ranks and gathered: it equals one process's on the same network
    from hdkdlib.train import load_run
    sharded = json.loads((tmp_path / "two" / "results.json").read_text())
    whole = load_run(tmp_path / "two", device="cpu").evaluate(write=False)
    assert [r["top1"] for r in sharded["anytime"]] == pytest.approx([r["top1"] for r in whole["anytime"]], abs=1e-9)
    for key in ("accuracy", "flops"):
        assert [r[key] for r in sharded["budgeted"]] == pytest.approx([r[key] for r in whole["budgeted"]], rel=1e-9)
    assert sharded["world_size"] == 2 and len(sharded["budgeted"]) == len(whole["budgeted"]) > 0


def test_run_reuses_a_finished_run_and_freezing_keeps_weights_fixed(fake_root, tmp_path):
    from hdkdlib.train import run
    cfg = _cfg(fake_root, tmp_path / "a", epochs=1)
    trainer, results = run(cfg)
    stamp = (tmp_path / "a" / "model.pt").stat().st_mtime_ns
    again, cached = run(_cfg(fake_root, tmp_path / "a", epochs=1))
    assert cached == json.loads(json.dumps(results, default=float))  # what was written, read back
    assert (tmp_path / "a" / "model.pt").stat().st_mtime_ns == stamp  # not retrained
    from hdkdlib.notebook import what_was_done
    assert what_was_done(trainer).startswith("trained 1 epoch in ")  # notebook 03's training cell says which
    assert what_was_done(again).startswith("loaded the finished run from ")
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), again.model.parameters()))

    frozen_cfg = _cfg(fake_root, tmp_path / "frozen", epochs=1, freeze_weights_from=str(tmp_path / "a" / "results.json"))
    frozen, res = run(frozen_cfg)
    assert frozen.meta is None
    for name, w in results["weights"].items():
        assert res["weights"][name] == pytest.approx(w, rel=1e-5)
    with pytest.raises(ValueError, match="needs a method with learned weights"):
        train.prepare(_cfg(fake_root, tmp_path / "x", method="dkd", freeze_weights_from=str(tmp_path / "a" / "results.json")))


def test_freezing_at_init_keeps_the_start_a_learning_run_moves_from(fake_root, tmp_path):
    """freeze_weights_from init: the no-learning ablation trains with the weights a learning run starts from
    (same seed and init), and they stay there; the learning run's own weights leave them."""
    from hdkdlib.train import run
    cfg = _cfg(fake_root, tmp_path / "frozen", epochs=1, freeze_weights_from="init")
    frozen, res = run(cfg)
    start = objectives.build(cfg.method, frozen.model.num_exits, **cfg.objective_options()).named_weights()
    assert frozen.meta is None and not any(p.requires_grad for p in frozen.objective.parameters())
    assert res["weights"] == pytest.approx(start, rel=1e-6)
    assert [line["weights"] for line in frozen.folder.metrics()] == [pytest.approx(start, rel=1e-6)]
    _, learned = run(_cfg(fake_root, tmp_path / "learning", epochs=1))
    assert max(abs(learned["weights"][n] - w) for n, w in start.items()) > 1e-3
    with pytest.raises(ValueError, match="freeze_weights_from: init needs a method with learned weights"):
        train.prepare(_cfg(fake_root, tmp_path / "x", method="dbt", freeze_weights_from="init"))


def test_a_loss_scale_under_sgd_is_the_lr_times_it_with_weight_decay_over_it(fake_root, tmp_path):
    """With SGD (momentum, weight decay, step schedule) a factor s on the loss trains exactly as lr x s and weight
    decay / s: the trainer has no step that depends on the lr's absolute size. So CE "at DBT's loss scale" (where
    ce takes no loss_scale) is CE with --lr 0.1 s --weight-decay 1e-4 / s (issue 23's step-size control)."""
    from hdkdlib.train import run
    s = 2.0
    common = dict(method="dbt", epochs=2, optimizer="sgd", lr_schedule="step", lr_milestones=(1,), warmup_epochs=0)
    scaled, _ = run(_cfg(fake_root, tmp_path / "scaled", loss_scale=s, lr=0.05, weight_decay=1e-3, **common))
    stepped, _ = run(_cfg(fake_root, tmp_path / "stepped", loss_scale=1.0, lr=0.05 * s, weight_decay=1e-3 / s,
                          **common))
    for p, q in zip(scaled.model.parameters(), stepped.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert [r["val_top1"] for r in scaled.folder.metrics()] == [r["val_top1"] for r in stepped.folder.metrics()]
    plain, _ = run(_cfg(fake_root, tmp_path / "plain", loss_scale=1.0, lr=0.05, weight_decay=1e-3, **common))
    assert max((p - q).abs().max() for p, q in zip(plain.model.parameters(), scaled.model.parameters())) > 1e-3


def test_a_warm_up_trains_exactly_as_frozen_weights_until_it_ends(fake_root, tmp_path):
    """During meta_warmup the weight update is off and nothing else differs: the run matches the no-learning
    ablation bit for bit (the real-data runs showed this over 60 epochs), and parts ways once the weights learn."""
    from hdkdlib.train import run
    warm, _ = run(_cfg(fake_root, tmp_path / "warm", epochs=2, meta_warmup=0.5))
    frozen, _ = run(_cfg(fake_root, tmp_path / "frozen", epochs=2, freeze_weights_from="init"))
    w, f = warm.folder.metrics(), frozen.folder.metrics()
    keys = ("train_loss", "train_top1", "val_loss", "val_top1", "weights")
    assert [w[0][k] for k in keys] == [f[0][k] for k in keys]
    assert w[1]["weights"] != f[1]["weights"] and w[1]["train_loss"] != f[1]["train_loss"]


def test_results_name_the_commit_the_run_began_with(fake_root, tmp_path):
    """A run evaluated after the code moved on records the commit it was trained with, and the one that evaluated it."""
    from hdkdlib import runinfo
    trainer = train.prepare(_cfg(fake_root, tmp_path / "run", epochs=1))
    trainer.fit()
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    record["git_commit"] = "0123abcd (the commit when the run began)"
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    results = trainer.evaluate()
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["git_commit"] == written["git_commit"] == "0123abcd (the commit when the run began)"
    assert written["evaluated_with"]["git_commit"] == runinfo.git_commit()
    assert written["packages"] == record["packages"]


def test_cli_args_reproduce_the_config(fake_root, tmp_path):
    from hdkdlib.train import _parser, cli_args, config_from_dict
    cfg = _cfg(fake_root, tmp_path, bf16=True, lr_milestones=(1, 2), temperature=2.0).validate()
    parsed = {k: v for k, v in vars(_parser().parse_args(cli_args(cfg))).items()
              if v is not None and k not in ("resume", "no_eval", "debug")}
    assert config_from_dict(parsed) == cfg


def test_quick_mode_resolution(tmp_path, monkeypatch):
    from hdkdlib.notebook import resolve_data
    monkeypatch.setenv("HDKD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HDKD_DATA", str(tmp_path / "data"))
    quick = resolve_data("cifar100", "auto", epochs=1)
    assert quick["quick"] and quick["n_per_class"] == 3 and Path(quick["split_dir"]).parent == Path(quick["data_root"])
    x, y, _ = data.load_cifar(quick["data_root"], "cifar100")  # a fake copy in the exact on-disk format
    assert len(y) == 600 and y.bincount().tolist() == [6] * 100
    paper = resolve_data("cifar100", "auto", epochs=300)
    assert not paper["quick"] and paper["data_root"] == str(tmp_path / "data") and paper["n_per_class"] == 0
    assert resolve_data("cifar10", "/elsewhere", epochs=1) == {"quick": False, "data_root": "/elsewhere", "n_per_class": 0}


def test_msdnet_init_reaches_the_network_and_is_refused_for_other_networks(fake_root):
    rule, torch_init = (train.prepare(_cfg(fake_root, "", arch="msdnet_cifar_anytime", msdnet_init=init).validate())
                        for init in ("rule", "torch"))
    linears = [[m for m in t.model.modules() if isinstance(m, torch.nn.Linear)] for t in (rule, torch_init)]
    assert all(m.bias.abs().max() == 0 for m in linears[0]) and all(m.bias.abs().min() > 0 for m in linears[1])
    with pytest.raises(ValueError, match="msdnet_init sets an MSDNet's initial weights, and toy_mlp is not one: drop it"):
        _cfg(fake_root, "", msdnet_init="torch").validate()
    assert "msdnet_init" in resume.unused_settings(config_to_dict(_cfg(fake_root, "")))  # a toy run ignores it


def test_image_folder_batches_are_seeded_sharded_and_resumable(tmp_path):
    from hdkdlib.data.bundle import HostLoader as _HostLoader
    data.write_fake_image_folder(tmp_path, classes=list("abcd"), n_per_class=(6, 2))
    ds = data.image_folder(tmp_path, "train", train=False)

    def loader(rank=0, world=1, batch=4):
        return _HostLoader(ds, list(range(24)), batch, train=True, seed=0, workers=0, device=torch.device("cpu"),
                           rank=rank, world_size=world, channels_last=False)

    whole = [y for _, y in loader(batch=4).batches(0)]
    stepped = loader(batch=4)
    assert all(torch.equal(stepped.batch_at(0, b)[1], whole[b]) for b in range(len(whole)))
    assert torch.equal(stepped.batch_at(0, 2)[1], whole[2])  # jumping back (a resumed run) is fine too
    assert list(loader().batches(0, start=len(whole))) == []  # resumed after the last step: the epoch is done
    halves = [loader(rank=r, world=2, batch=2) for r in (0, 1)]
    for b, y in enumerate(whole):
        assert torch.equal(torch.cat([h.batch_at(0, b)[1] for h in halves]), y)  # two ranks = one global batch
    assert not all(torch.equal(p, q) for p, q in zip(whole, [y for _, y in loader().batches(1)]))


def test_image_folder_crops_leave_every_generator_as_it_was(tmp_path, monkeypatch):
    """Each image's crop is seeded from its place in the epoch; in the main process (workers 0) on a GPU, seeding
    through torch.manual_seed would also reseed the GPU's generator (dropout's), unrestored, on every image."""
    from hdkdlib.data.bundle import HostLoader as _HostLoader
    data.write_fake_image_folder(tmp_path, classes=list("ab"), n_per_class=(4, 1), size=24)
    ds = data.image_folder(tmp_path, "train")
    host = _HostLoader(ds, list(range(8)), 4, train=True, seed=2, workers=0, device=torch.device("cpu"), rank=0,
                       world_size=1, channels_last=False)
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    torch.manual_seed(12345)
    calls.clear()
    state = torch.get_rng_state()
    first = next(iter(host.batches(1)))[0]
    assert calls == [] and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(next(iter(host.batches(1)))[0], first)  # the crops are still the position's


def test_compiled_step_trains_like_eager(fake_root, tmp_path):
    """compile="step": forward, backward, optimizer and bilevel update under torch.compile."""
    eager = train.prepare(_cfg(fake_root, "", epochs=1))
    eager.fit()
    compiled = train.prepare(_cfg(fake_root, "", epochs=1, compile="step"))
    compiled.fit()
    assert compiled.meta_steps == eager.meta_steps > 0
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(eager.objective.gamma, compiled.objective.gamma, rtol=1e-3, atol=1e-4)


def test_imta_second_stage_trains_new_heads_on_a_frozen_network(fake_root, tmp_path):
    small = dict(arch="msdnet_cifar_budget", n_per_class=8, val_per_class=2, batch_size=16, epochs=1)
    first = train.prepare(_cfg(fake_root, tmp_path / "stage1", method="ce", gradient_equilibrium=True, **small))
    first.fit()
    second = train.prepare(_cfg(fake_root, tmp_path / "stage2", method="imta_kd", init_from=str(tmp_path / "stage1"),
                          train_heads_only=True, **small))
    trained = first.model.state_dict()
    start = {k: v.clone() for k, v in second.model.state_dict().items()}
    K = second.model.num_exits
    new = {f"heads.{k}.linear.{p}" for k in range(K - 1) for p in ("weight", "bias")}  # the students' classifiers
    assert not torch.equal(start["heads.0.linear.weight"], trained["heads.0.linear.weight"])
    assert {n for n, p in second.model.named_parameters() if p.requires_grad} == new
    # the teacher is stage 1's last exit itself, as IMTA's frozen network's: not a head that starts from scratch
    x = torch.randn(4, 3, 32, 32)
    first.model.eval(), second.model.train()
    torch.testing.assert_close(second.model(x)[-1], first.model(x)[-1], rtol=0, atol=0)
    second.fit()
    end = second.model.state_dict()
    frozen = [k for k in end if k not in new]  # stages and the heads' features: weights and BN statistics
    assert any(k.startswith("stages.") for k in frozen) and any(k.startswith(f"heads.{K - 1}.") for k in frozen)
    assert all(torch.equal(end[k], trained[k]) for k in frozen)
    assert all(not torch.equal(end[k], start[k]) for k in new if k.endswith("weight"))
    # heads_reset "all": the rule of runs begun before this one (a legacy folder resumes with it): every head anew
    legacy = train.prepare(_cfg(fake_root, tmp_path / "legacy", method="imta_kd", init_from=str(tmp_path / "stage1"),
                                train_heads_only=True, heads_reset="all", **small))
    trainable = {n for n, p in legacy.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in legacy.model.named_parameters() if n.startswith("heads.")}
    assert not torch.equal(legacy.model.state_dict()[f"heads.{K - 1}.linear.weight"],
                           trained[f"heads.{K - 1}.linear.weight"])
    with pytest.raises(ValueError, match="train_heads_only needs init_from"):
        _cfg(fake_root, tmp_path, train_heads_only=True).validate()
    # a rule it does not know is refused before anything is frozen or reset
    before = {k: v.clone() for k, v in first.model.state_dict().items()}
    with pytest.raises(ValueError, match="unknown heads_reset 'stages'; valid: classifiers, all"):
        first.model.freeze_stages_and_reset_heads("stages")
    assert all(p.requires_grad for p in first.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in first.model.state_dict().items())


def test_tf32_use_recorded_for_a_gpu_run_follows_nvidias_override(monkeypatch):
    """NVIDIA_TF32_OVERRIDE=0 keeps cuBLAS and cuDNN in float32 whatever torch's flags say: the record says so."""
    gpu = SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    assert train.Trainer._tf32(gpu) == {"convolutions": torch.backends.cudnn.allow_tf32,
                                        "matmul": torch.backends.cuda.matmul.allow_tf32}
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    assert train.Trainer._tf32(gpu) == {"convolutions": False, "matmul": False}
    assert train.Trainer._tf32(SimpleNamespace(device=torch.device("cpu"))) is None


def test_init_from_a_network_of_another_arch_is_one_line(fake_root, tmp_path, capsys):
    first, other = tmp_path / "toy", tmp_path / "msd"
    train.run(_cfg(fake_root, first, method="ce", epochs=1))
    capsys.readouterr()
    assert main(_train_argv(fake_root, other, "--epochs", "1", "--arch", "msdnet_cifar_budget",
                            "--init-from", str(first))) == 2
    line = _one_line_error(capsys)  # not torch's list of every mismatched tensor
    assert f"init_from {first}: its network is not a msdnet_cifar_budget with 10 classes" in line, line
    assert line.endswith("give a finished run of arch msdnet_cifar_budget on this dataset") and not other.exists()
    assert len(line) < 400  # the first mismatch, not every missing key


def test_weight_lr_is_set_per_run_and_meta_interval_must_fit_an_epoch(fake_root, tmp_path):
    from hdkdlib import bilevel
    trainer = train.prepare(_cfg(fake_root, "", epochs=4, meta_schedule="per_run", meta_lr=1e-3))
    steps = len(trainer.data.train)
    assert trainer.meta.optimizer.param_groups[0]["lr"] == pytest.approx(bilevel.per_run_meta_lr(4 * steps, 1.0))
    assert trainer.meta.hypergrad_norm == "lr"
    legacy = train.prepare(_cfg(fake_root, "", meta_schedule="fixed", meta_lr=0.003, hypergrad_norm="none"))
    assert legacy.meta.optimizer.param_groups[0]["lr"] == 0.003 and legacy.meta.hypergrad_norm == "none"
    with pytest.raises(ValueError, match=f"meta_interval 1000 is longer than an epoch \\({steps} steps\\): use 1..{steps}"):
        train.prepare(_cfg(fake_root, "", meta_interval=1000))


def test_meta_horizon_reaches_the_weight_update(fake_root, tmp_path):
    """meta_horizon 2 (exact) is the trainer's weight update horizon: after one epoch both runs' weights left their
    start, and those of horizon 2 differ from those of the one-step exact update started alike."""
    runs = {k: train.prepare(_cfg(fake_root, tmp_path / f"h{k}", epochs=1, meta_method="exact", meta_horizon=k))
            for k in (1, 2)}
    assert runs[1].meta.horizon == 1 and runs[2].meta.horizon == 2
    for trainer in runs.values():
        trainer.fit("start")
    w1, w2 = (torch.tensor(list(t.objective.named_weights().values())) for t in runs.values())
    start = torch.tensor(list(train.prepare(_cfg(fake_root, "", epochs=1)).objective.named_weights().values()))
    assert not torch.equal(w1, start) and not torch.equal(w2, start)
    assert (w2 - w1).abs().max() > 1e-4, (w2 - w1).abs().max()


def _cli(fake_root, out, *extra, epochs="2"):
    return [sys.executable, "-m", "hdkdlib.train", "--dataset", "cifar10", "--data-root", str(fake_root),
            "--split-dir", str(fake_root / "splits"), "--arch", "msdnet_cifar_budget", "--method", "hdkd",
            "--n-per-class", "24", "--val-per-class", "6", "--epochs", epochs, "--batch-size", "8", "--device", "cpu",
            "--threads", "1", "--no-progress", "--no-eval", "--out", str(out), *extra]


def test_a_run_killed_before_its_first_checkpoint_restarts_with_the_same_command(fake_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(fake_root, out, epochs="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # mid epoch 1: no handler, no checkpoint
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "config.json").exists() and not (out / "checkpoint.pt").exists()
    again = subprocess.run(_cli(fake_root, out, epochs="1"), capture_output=True, text=True)  # the same command
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stopped before its first checkpoint: starting it again" in again.stderr
    assert len(_metrics(out)) == 1 and (out / "model.pt").exists()


def test_two_runs_into_one_folder_one_trains_the_other_is_refused_and_sigterm_checkpoints_it(fake_root, tmp_path):
    """The second is refused while the first trains (50 epochs: it cannot finish before the second starts); then a
    real SIGTERM stops the first: exit 130, a checkpoint written, the line saying how to resume, the config the
    first wrote untouched."""
    out = tmp_path / "run"
    first = subprocess.Popen(_cli(fake_root, out, epochs="50"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:  # refused at once; a second run that was let in would train its 50 epochs: the timeout ends the test then
        deadline = time.time() + 120
        while not (out / "config.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        config = (out / "config.json").read_bytes()
        second = subprocess.run(_cli(fake_root, out, epochs="50"), capture_output=True, text=True, timeout=120)
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"run folder {out} is in use by process {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1  # one line, no traceback
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130 and "stopped by signal" in err and "--resume" in err, err[-2000:]
    assert (out / "config.json").read_bytes() == config
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] > 0  # mid-epoch or later


def test_a_moved_run_folder_is_loaded_or_resumed_where_it_now_lives(fake_root, tmp_path):
    """A clone moved elsewhere: the run folders and the split files they use, copied to another root."""
    import shutil
    from hdkdlib.train import run
    old = tmp_path / "old"
    shutil.copytree(fake_root / "splits", old / "splits")
    cfg = dict(split_dir=str(old / "splits"), epochs=2)
    run(_cfg(fake_root, old / "finished", **cfg))
    _interrupt(train.prepare(_cfg(fake_root, old / "half", **cfg)), lambda t: t.epoch == 1)  # in epoch 2
    new = tmp_path / "moved"
    shutil.copytree(old, new)
    shutil.rmtree(old)
    moved = dict(split_dir=str(new / "splits"), epochs=2)
    trainer, results = run(_cfg(fake_root, new / "finished", **moved))
    assert results["anytime"] and trainer.epoch == 2  # loaded, not retrained
    trainer, results = run(_cfg(fake_root, new / "half", **moved))
    assert trainer.epoch == 2 and len(_metrics(new / "half")) == 2
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        run(_cfg(fake_root, new / "half", lr=0.3, **moved))


def test_cli_resume_needs_out_and_takes_the_recorded_settings(fake_root, tmp_path):
    from hdkdlib.train import main
    assert main(["--resume", "--epochs", "1"]) == 2
    out = tmp_path / "run"
    assert main(_cli(fake_root, out, epochs="1")[3:]) == 0
    # --resume with only --out: the recorded settings, not the CLI's defaults (cifar100, msdnet_cifar_anytime, ...)
    assert main(["--out", str(out), "--resume", "--no-eval"]) == 0


def test_a_run_begun_under_a_former_default_continues_as_it_began(fake_root, tmp_path, capsys):
    """meta_traverse's default went from 0.25 to 1. A run folder begun at 0.25 (as every HDKD run before the
    change) is continued, and once finished loaded, at 0.25 by settings that hold today's default, and says so;
    it ends as the same run never interrupted. An explicit other value is refused."""
    from hdkdlib import train
    from hdkdlib.runfolder import RunFolder
    former = dict(epochs=2, meta_schedule="per_run", meta_lr=TrainConfig.meta_lr, meta_traverse=0.25)
    assert TrainConfig.meta_traverse == 1.0
    full = train.prepare(_cfg(fake_root, tmp_path / "full", **former))
    full.fit()

    _interrupt(train.prepare(_cfg(fake_root, tmp_path / "run", **former)), lambda t: t.step == 5)
    today = _cfg(fake_root, tmp_path / "run", **{**former, "meta_traverse": TrainConfig.meta_traverse})
    capsys.readouterr()
    plan = resolve(today, "continue")
    assert "began under a former default (meta_traverse 0.25): continuing with it" in capsys.readouterr().err
    resumed = train.prepare(plan.cfg)
    resumed.fit(plan.action)
    assert resumed.cfg.meta_traverse == 0.25 and torch.equal(full.objective.gamma, resumed.objective.gamma)
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["meta_traverse"] == 0.25

    trainer, _ = train.run(today)  # finished: loaded as it is, not retrained
    assert trainer.cfg.meta_traverse == 0.25 and RunFolder(tmp_path / "run").finished()
    with pytest.raises(ValueError, match=r"other settings \(meta_traverse\)"):
        train.run(_cfg(fake_root, tmp_path / "run", **{**former, "meta_traverse": 0.5}))
    # a folder that never reached a checkpoint does not take the former default: today's settings are checked
    fresh = RunFolder(tmp_path / "begun")
    fresh.begin(train.prepare(_cfg(fake_root, fresh.path, **former))._config_record(), "start")
    with pytest.raises(ValueError, match=r"other settings \(meta_traverse\)"):  # not continued under the former
        resolve(dataclasses.replace(today, out=str(fresh.path)), "auto")


def test_cli_bad_inputs_are_one_line_errors(fake_root, tmp_path, capsys):
    from hdkdlib.train import main
    base = ["--dataset", "cifar10", "--data-root", str(fake_root), "--split-dir", str(fake_root / "splits"),
            "--arch", "toy_mlp", "--epochs", "1", "--n-per-class", "24", "--val-per-class", "6", "--no-progress"]
    cases = [(["--device", "gpu"], "unknown device 'gpu': use auto, cpu, cuda or cuda:N"),
             (["--alpha", "5"], r"alpha must lie in [0, 1]"),
             (["--meta-traverse", "0"], "meta_traverse must lie in (0, 1]"),
             (["--meta-schedule", "cosine"], "unknown meta_schedule 'cosine'; valid: per_run, fixed"),
             (["--meta-interval", "500", "--device", "cpu"], "meta_interval 500 is longer than an epoch"),
             (["--meta-horizon", "0"], "meta_horizon must be an integer >= 1"),
             (["--lr-milestones", "-1"], "lr_milestones must be increasing epochs >= 1, got [-1]"),
             (["--lr-milestones", "1", "1"], "lr_milestones must be increasing epochs >= 1, got [1, 1]"),
             (["--lr-milestones", "5"], "lr_milestones [5] lie at or beyond the run's 1 epochs"),
             (["--method", "dbt", "--loss-scale", "1e-300"], "loss_scale must lie in [0.0001, 10000]"),
             (["--lr", "1e-300"], "lr must lie in [1e-08, 10]"),
             (["--meta-horizon", "2"], "meta_horizon 2 needs meta_method 'exact'"),
             (["--meta-horizon", "500", "--meta-method", "exact", "--device", "cpu"],
              "meta_horizon 500 is longer than an epoch"),
             (["--compile", "network", "--compile-mode", "fast", "--device", "cpu", "--out", str(tmp_path / "c")],
              "Unrecognized mode=fast")]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hdkdlib.train: error:") and message in err[0], (extra, err)


def test_cli_out_folder_that_cannot_be_written_is_a_one_line_error(fake_root, tmp_path, capsys, monkeypatch):
    """A read-only --out: one line naming the folder and what to do; nothing is trained or written."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let the file system refuse as it does for everyone else
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if str(self).startswith(str(read_only)):
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)
        monkeypatch.setattr(Path, "mkdir", mkdir)
    out = read_only / "run"
    code = main(["--dataset", "cifar10", "--data-root", str(fake_root), "--split-dir", str(fake_root / "splits"),
                 "--arch", "toy_mlp", "--epochs", "1", "--n-per-class", "24", "--val-per-class", "6", "--device", "cpu",
                 "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("hdkdlib.train: error: PermissionError:") and str(out) in err[0]
    assert "choose an --out" in err[0] and not out.exists()


# --- run folders that survive torn files and full disks (issue 27) ------------------------------------------
def _train_argv(fake_root, out, *extra):
    return ["--dataset", "cifar10", "--data-root", str(fake_root), "--split-dir", str(fake_root / "splits"),
            "--arch", "toy_mlp", "--method", "hdkd", "--n-per-class", "24", "--val-per-class", "6",
            "--batch-size", "16", "--lr", "0.05", "--eval-batch-size", "64", "--device", "cpu",
            "--meta-schedule", "fixed", "--meta-lr", "0.01", "--check-every", "5", "--no-progress", "--out", str(out),
            *extra]  # the settings of _cfg


def _train_cli(fake_root, out, *extra):
    return subprocess.run([sys.executable, "-m", "hdkdlib.train", *_train_argv(fake_root, out, *extra)],
                          capture_output=True, text=True)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_the_run_continues(fake_root, tmp_path):
    out = tmp_path / "run"
    trainer = train.prepare(_cfg(fake_root, out, epochs=3))
    _interrupt(trainer, lambda t: t.epoch == 2)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # epoch 2's line cut mid-write
    result = _train_cli(fake_root, out, "--epochs", "3", "--resume")
    assert result.returncode == 0, result.stderr
    warnings = [l for l in result.stderr.splitlines() if "cut short" in l]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0] and "dropped" in warnings[0]
    assert [r["epoch"] for r in _metrics(out)] == [1, 3]  # epoch 2 trained; only its line is lost
    assert json.loads(lines[0])["train_top1"] == _metrics(out)[0]["train_top1"]


def test_unreadable_records_are_one_line_that_names_the_file_and_never_advises_the_same_step(fake_root, tmp_path):
    out = tmp_path / "run"
    trainer = train.prepare(_cfg(fake_root, out, epochs=3))
    _interrupt(trainer, lambda t: t.epoch == 2)
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(metrics[0][:-5] + "\n" + metrics[1] + "\n")  # a damaged middle line
    result = _train_cli(fake_root, out, "--epochs", "3", "--resume")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "metrics.jsonl in" in result.stderr and "line 1 is unreadable" in result.stderr
    assert "delete that line" in result.stderr and "--resume" not in result.stderr
    (out / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    config_text = (out / "config.json").read_text()
    (out / "config.json").write_text(config_text[:40])  # torn config.json
    result = _train_cli(fake_root, out, "--epochs", "3", "--resume")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "config.json in" in result.stderr and "is unreadable" in result.stderr and "Traceback" not in result.stderr
    (out / "config.json").write_text(config_text)
    assert _train_cli(fake_root, out, "--epochs", "3", "--resume").returncode == 0  # nothing was lost meanwhile
    (out / "results.json").write_text('{"anytime": [')
    with pytest.raises(RunFolderDamaged, match=r"results.json in .* is unreadable .*delete it and run the same command "
                                               r"with --resume: the run is evaluated again from model.pt"):
        train.run(_cfg(fake_root, out, epochs=3))


def test_a_finished_run_opens_from_model_and_results_alone(fake_root, tmp_path):
    out = tmp_path / "run"
    trainer, results = train.run(_cfg(fake_root, out, epochs=1))
    named, state = trainer.objective.named_weights(), {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).unlink(missing_ok=True)
    again, results_again = train.run(_cfg(fake_root, out, epochs=1))
    assert results_again["anytime"] == results["anytime"] and again.objective.named_weights() == pytest.approx(named, rel=1e-6)
    assert all(torch.equal(v, state[k]) for k, v in again.model.state_dict().items())
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")  # unreadable: the same, after saying so
    again, _ = train.run(_cfg(fake_root, out, epochs=1))
    assert all(torch.equal(v, state[k]) for k, v in again.model.state_dict().items())


def test_a_finished_run_is_loaded_with_its_last_network_and_its_results_are_never_rewritten(fake_root, tmp_path,
                                                                                               capsys):
    """checkpoint.pt torn: the last network is model.pt, not checkpoint.prev.pt's epoch before; --resume on a
    finished run shows its recorded results and writes nothing."""
    out = tmp_path / "run"
    trainer, results = train.run(_cfg(fake_root, out, epochs=2))
    last = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:500])
    again, _ = train.run(_cfg(fake_root, out, epochs=2))
    assert again.epoch == 2 and all(torch.equal(v, last[k]) for k, v in again.model.state_dict().items())
    assert again.objective.named_weights() == pytest.approx(trainer.objective.named_weights(), rel=1e-6)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert main(_train_argv(fake_root, out, "--epochs", "2", "--resume")) == 0
    assert "holds a finished run: its recorded results" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_a_finished_runs_results_without_its_network_are_not_trained_over(fake_root, tmp_path, capsys):
    """model.pt and the checkpoints deleted (to save space): the folder is not taken for a run that stopped before
    its first checkpoint, whose restart would delete results.json and metrics.jsonl."""
    out = tmp_path / "run"
    train.run(_cfg(fake_root, out, epochs=1))
    _refused_and_kept(fake_root, out, 1, ("model.pt", "checkpoint.pt", "checkpoint.prev.pt"),
                      r"holds a finished run's results without its network .*restore model.pt", capsys)


def _refused_and_kept(fake_root, out, epochs, deleted, message, capsys):
    """With `deleted` gone from a finished run's folder, the same run is refused by message, in Python and as one
    command-line line, and every file left is kept as it was."""
    for name in deleted:
        (out / name).unlink(missing_ok=True)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(FileExistsError, match=message):
        train.run(_cfg(fake_root, out, epochs=epochs))
    capsys.readouterr()
    assert main(_train_argv(fake_root, out, "--epochs", str(epochs))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_epochs_metrics_without_a_checkpoint_are_not_trained_over(fake_root, tmp_path, capsys):
    """The checkpoints and model.pt deleted before evaluation: the folder is not taken for a run that stopped before
    its first checkpoint (which has at most epoch 1's line), whose restart would delete metrics.jsonl."""
    out = tmp_path / "run"
    train.run(_cfg(fake_root, out, epochs=2))
    assert len(_metrics(out)) == 2
    _refused_and_kept(fake_root, out, 2, ("model.pt", "checkpoint.pt", "checkpoint.prev.pt", "results.json"),
                      r"holds 2 epochs' metrics but no checkpoint or model.pt", capsys)
    # a line without its weights (edited by hand): one line naming it when the results are completed from the folder
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    del rows[1]["weights"]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"metrics.jsonl in .*: epoch 2's line holds no weights"):
        RunFolder(out).with_history({})


def test_a_checkpoint_of_another_run_or_no_checkpoint_is_passed_over_for_the_previous_one(fake_root, tmp_path):
    """checkpoint.pt copied from a run at another lr, or a model.pt copied over it: not resumed (it would go on
    silently, or stop with a KeyError); checkpoint.prev.pt is, after one warning naming why."""
    out, other = tmp_path / "run", tmp_path / "other"
    _interrupt(train.prepare(_cfg(fake_root, out, epochs=2)), lambda t: t.epoch == 1)
    _interrupt(train.prepare(_cfg(fake_root, other, epochs=2, lr=0.2)), lambda t: t.epoch == 1)
    ours = torch.load(out / "checkpoint.prev.pt", weights_only=True)
    for source, words in ((other / "checkpoint.pt", "it is the checkpoint of another run (other lr)"),
                          (other / "model.pt", "it is no checkpoint (it lacks accumulators, batch, config")):
        if not source.exists():  # an interrupted run has no model.pt yet: its network's state dict is one
            torch.save(torch.load(other / "checkpoint.pt", weights_only=True)["model"], source)
        (out / "checkpoint.pt").write_bytes(source.read_bytes())
        said = []
        resumed = train.prepare(_cfg(fake_root, out, epochs=2))
        state = resumed.folder.load_checkpoint("cpu", say=said.append, foreign=resumed._other_run)
        assert len(said) == 1 and said[0].startswith(f"warning: checkpoint.pt not loaded: {words}"), said
        assert said[0].endswith("resuming from checkpoint.prev.pt (epoch 1, batch 0)")
        assert all(torch.equal(v, ours["model"][k]) for k, v in state["model"].items())
    assert _resume(_cfg(fake_root, out, epochs=2)).epoch == 2


def test_loading_a_finished_run_checks_the_data_it_trained_on(tmp_path):
    """load_run evaluates nothing on other images than the run trained on (the data root's contents changed)."""
    root = tmp_path / "data"
    data.write_fake_cifar(root, "cifar10", n_train=400, n_test=100, seed=0)
    train.run(_cfg(root, tmp_path / "run", epochs=1))
    assert train.load_run(tmp_path / "run", device="cpu").model is not None
    shutil.rmtree(root / "cifar-10-batches-py")
    data.write_fake_cifar(root, "cifar10", n_train=400, n_test=100, seed=1)
    # the fake data of another seed has other labels, so another split: refused by its checksum first
    with pytest.raises(RunFolderMismatch, match=r"holds a run with other settings \(split \(checksum\)\)"):
        train.load_run(tmp_path / "run", device="cpu")


def test_a_resumed_cpu_run_keeps_the_thread_count_it_began_with(fake_root, tmp_path):
    """threads 0 (chosen by the model and how busy the machine is) would pick another count on resume, and a
    convolution's sums differ between thread counts; a count given on resume is used as given."""
    out = tmp_path / "run"
    _interrupt(train.prepare(_cfg(fake_root, out, epochs=2, threads=3)), lambda t: t.epoch == 1)
    before = torch.get_num_threads()
    try:
        train.prepare(resolve(_cfg(fake_root, out, epochs=2, threads=0), "continue").cfg)
        assert torch.get_num_threads() == 3
        train.prepare(resolve(_cfg(fake_root, out, epochs=2, threads=1), "continue").cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_run_killed_during_its_evaluation_says_so_and_resume_finishes_it(fake_root, tmp_path):
    out = tmp_path / "run"
    train.prepare(_cfg(fake_root, out, epochs=1)).fit()  # model.pt written, results.json not: killed while evaluating
    result = _train_cli(fake_root, out, "--epochs", "1")
    assert result.returncode == 2 and "a run trained but not evaluated: rerun with --resume to evaluate" in result.stderr
    result = _train_cli(fake_root, out, "--epochs", "1", "--resume")
    assert result.returncode == 0 and RunFolder(out).finished(), result.stderr


def test_evaluating_a_trained_run_never_trains_its_last_epoch_again(fake_root, tmp_path):
    """Trained, not evaluated, its last checkpoint damaged: the resume evaluates model.pt and the last epoch's
    weights; it does not fall back to the checkpoint before and train the last epoch again over model.pt."""
    out = tmp_path / "run"
    train.prepare(_cfg(fake_root, out, method="hdkd", epochs=2)).fit()
    kept = {name: (out / name).read_bytes() for name in ("model.pt", "metrics.jsonl", "config.json")}
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:100])
    result = _train_cli(fake_root, out, "--method", "hdkd", "--epochs", "2", "--resume")
    assert result.returncode == 0 and RunFolder(out).finished(), result.stderr
    assert {name: (out / name).read_bytes() for name in kept} == kept
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["weights"]
    assert RunFolder(out).results()["weights"] == pytest.approx(final, rel=1e-6)  # float32 parameters: 1e-6


def test_a_full_disk_is_one_line_removes_the_partial_file_and_keeps_the_last_checkpoint(fake_root, tmp_path,
                                                                                        monkeypatch):
    out = tmp_path / "run"
    trainer = train.prepare(_cfg(fake_root, out, epochs=2))
    _interrupt(trainer, lambda t: t.epoch == 1)
    good = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):  # what torch.save does on a full disk: a partial file, then
        real_save(obj, f, *args, **kwargs)          # "[enforce fail at inline_container.cc] unexpected pos"
        Path(f).write_bytes(Path(f).read_bytes()[:1000])
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 404864 vs 404752")

    monkeypatch.setattr(torch, "save", save_until_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10 ** 9, used=10 ** 9, free=4096))
    with pytest.raises(DiskFull) as caught:
        _resume(_cfg(fake_root, out, epochs=2))
    assert str(caught.value) == (f"no space left on device while writing checkpoint.pt in {out}: "
                                 "free space or choose another --out")
    assert (out / "checkpoint.pt").read_bytes() == good
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name or p.name.endswith(".new")) == []
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command goes on from the kept checkpoint
    resumed = _resume(_cfg(fake_root, out, epochs=2))
    assert resumed.epoch == 2


def test_a_refused_checkpoint_says_in_our_words_that_it_was_not_loaded(fake_root, tmp_path):
    out = tmp_path / "run"
    trainer = train.prepare(_cfg(fake_root, out, epochs=2))
    _interrupt(trainer, lambda t: t.epoch == 1)

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["extra"] = Payload()
    torch.save(state, out / "checkpoint.pt")
    said = []
    resumed = train.prepare(_cfg(fake_root, out, epochs=2))
    state = resumed.folder.load_checkpoint("cpu", say=said.append)
    assert state["epoch"] == 1 and len(said) == 1
    assert said[0].startswith("warning: checkpoint.pt not loaded: it holds objects other than tensors (a modified or "
                              "foreign file); it was not executed; resuming from checkpoint.prev.pt")


def test_a_checkpoint_at_a_position_outside_the_run_is_not_loaded(fake_root, tmp_path):
    """A checkpoint relabelled as the last epoch, or at a batch past the epoch's end, would end the run as finished
    with its epochs untrained (exit 0): refused like a foreign one, the previous checkpoint taken; a setting stored
    as a tensor is refused too, in our words."""
    out = tmp_path / "run"
    trainer = train.prepare(_cfg(fake_root, out, epochs=2))
    _interrupt(trainer, lambda t: t.epoch == 1)
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (good["epoch"], good["batch"]) == (1, 1)
    resumed = train.prepare(_cfg(fake_root, out, epochs=2))
    batches = len(resumed.data.train)
    for change, words in (({"epoch": 2}, f"epoch 2, batch 1 lie outside its 2 epochs of {batches} batches"),
                          ({"batch": 10 ** 9}, "batch 1000000000 lie outside"),
                          ({"batch": batches + 1}, f"batch {batches + 1} lie outside"),
                          ({"epoch": 1.0}, "epoch 1.0, batch 1 lie outside"),
                          ({"config": {**good["config"], "lr": torch.tensor(0.1)}}, "checkpoint of another run")):
        torch.save({**good, **change}, out / "checkpoint.pt")
        said = []
        state = resumed.folder.load_checkpoint("cpu", say=said.append, foreign=resumed._other_run)
        assert (state["epoch"], state["batch"]) == (1, 0) and len(said) == 1 and words in said[0], said
        assert said[0].endswith("resuming from checkpoint.prev.pt (epoch 1, batch 0)")


def test_a_resumes_record_is_written_before_its_first_checkpoint(fake_root, tmp_path, monkeypatch):
    """Every checkpoint a resume writes has that resume in config.json already: a kill between the two writes
    cannot leave epochs trained by the resuming code with no record of it."""
    out = tmp_path / "run"
    _interrupt(train.prepare(_cfg(fake_root, out, epochs=2)), lambda t: t.epoch == 1)
    real, resumes_on_disk = RunFolder.save_checkpoint, []

    def save(folder, state):
        resumes_on_disk.append(len(folder.config().get("resumed", [])))
        real(folder, state)
    monkeypatch.setattr(RunFolder, "save_checkpoint", save)
    _resume(_cfg(fake_root, out, epochs=2))
    assert resumes_on_disk and set(resumes_on_disk) == {1}
    assert json.loads((out / "config.json").read_text())["resumed"][0]["epochs_done"] == 1


def test_meta_warmup_keeps_the_start_then_learns_and_bounded_weights_resume(fake_root, tmp_path):
    """meta_warmup 0.5 of a 2-epoch run: the weights after epoch 1 are still the start, after epoch 2 they moved;
    the bounded map trains, checkpoints its trust region's centre and resumes to the same weights."""
    cfg = _cfg(fake_root, tmp_path / "w", epochs=2, meta_warmup=0.5, meta_schedule="per_run", meta_lr=1e-3)
    trainer = train.prepare(cfg)
    start = trainer.objective.named_weights()
    rows = trainer.fit()
    assert rows[0]["weights"] == pytest.approx(start, abs=0) and rows[1]["weights"] != pytest.approx(start, abs=1e-4)
    bounded = dict(epochs=2, weight_map="bounded", weight_bound=0.3)
    whole = train.prepare(_cfg(fake_root, tmp_path / "b", **bounded))
    whole.fit()
    final = whole.objective.named_weights()
    assert all(0.7 * start[k] - 1e-6 <= v <= 1.3 * start[k] + 1e-6 for k, v in final.items())
    parted = train.prepare(_cfg(fake_root, tmp_path / "c", **bounded))
    _interrupt(parted, lambda t: t.epoch == 1)
    resumed = _resume(_cfg(fake_root, tmp_path / "c", **bounded))
    assert resumed.objective.named_weights() == final


# --- AdamW, cosine schedules and transformers with exits (issue 26) -------------------------------------------
def test_a_transformer_with_exits_trains_under_hdkd_with_adamw_and_resumes_bit_identically(tmp_path):
    """swin_t_exits (channels-last stages) on synthetic 32 px images, recipe finetune (AdamW, cosine after a
    warm-up): the loss is finite, the learned weights move, and an interrupted run resumes to the same state."""
    def cfg(out):
        return TrainConfig(dataset="synthetic", recipe="finetune", arch="swin_t_exits", method="hdkd", epochs=2,
                           warmup_epochs=1, batch_size=10, n_per_class=1, val_per_class=2, meta_schedule="fixed",
                           meta_lr=0.01, device="cpu", progress=False, check_every=1, threads=1,
                           split_dir=str(tmp_path / "splits"), out=str(out))
    whole = train.prepare(cfg(tmp_path / "whole"))
    assert isinstance(whole.optimizer, torch.optim.AdamW) and whole.model.layouts == ["nhwc"] * 4
    start = whole.objective.named_weights()
    rows = whole.fit()
    assert all(math.isfinite(r["train_loss"]) for r in rows) and rows[-1]["weights"] != start
    assert [r["lr"] for r in rows] == [pytest.approx(1e-3 / 2), pytest.approx(1e-3)]  # warm-up, then cosine's start
    parted = train.prepare(cfg(tmp_path / "parted"))
    _interrupt(parted, lambda t: t.epoch == 1)
    resumed = _resume(cfg(tmp_path / "parted"))
    assert resumed.objective.named_weights() == whole.objective.named_weights()
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_folder_holding_a_run_without_its_config_is_never_overwritten(fake_root, tmp_path, capsys):
    """config.json deleted (or never copied): the checkpoints, model, results and metrics still make the folder a
    run's. A new run with other settings, --resume and train.run all refuse in one line naming the files, and
    every byte there stays as it was."""
    import hashlib
    out = tmp_path / "run"
    train.run(_cfg(fake_root, out, epochs=1, method="ce"))
    (out / "config.json").unlink()
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.iterdir() if f.is_file()}
    assert {"checkpoint.pt", "model.pt", "results.json", "metrics.jsonl"} <= set(before)
    args = ["--dataset", "cifar10", "--data-root", str(fake_root), "--split-dir", str(fake_root / "splits"),
            "--arch", "toy_mlp", "--epochs", "1", "--n-per-class", "24", "--val-per-class", "6", "--no-progress",
            "--device", "cpu", "--lr", "0.2", "--out", str(out)]
    for extra in ([], ["--resume"]):
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds checkpoint.pt" in err[0] and "but no config.json" in err[0], err
        assert "--resume" not in err[0]  # resuming cannot succeed without the settings
    with pytest.raises(FileExistsError, match="but no config.json"):
        train.run(_cfg(fake_root, out, epochs=1, method="ce"))
    (out / "model.pt").unlink()  # any one of the run's files is enough
    before.pop("model.pt")
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "results.json"):
        (out / name).unlink(missing_ok=True)
        before.pop(name, None)
    with pytest.raises(FileExistsError, match="holds metrics.jsonl but no config.json"):
        train.run(_cfg(fake_root, out, epochs=1, method="ce"))
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.iterdir() if f.is_file()} == before


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_folder_run_stopped_mid_epoch_resumes_bit_identically(tmp_path, workers):
    """Random crops and flips of `--dataset folder` are drawn per image from (seed, epoch, position), so a run
    stopped mid-epoch (Ctrl-C, SIGTERM) and resumed ends exactly as one that never stopped, whichever process
    decodes the images: the resumed loader starts mid-epoch with fresh workers."""
    root = tmp_path / "images"
    data.write_fake_image_folder(root, classes=list("abc"), n_per_class=(10, 2), size=40)
    cfg = dict(dataset="folder", data_root=str(root), split_dir=str(tmp_path / "splits"), arch="toy_mlp",
               method="hdkd", val_per_class=2, epochs=2, batch_size=8, lr=0.001, meta_schedule="fixed", meta_lr=0.01,
               eval_batch_size=16, progress=False, device="cpu", check_every=1, workers=workers, threads=1)
    full = train.prepare(TrainConfig(**cfg, out=str(tmp_path / "full")))
    full.fit()
    broken = train.prepare(TrainConfig(**cfg, out=str(tmp_path / "resumed")))
    stop_at = len(broken.data.train) + 1  # after the first batch of epoch 2
    _interrupt(broken, lambda t: t.step == stop_at)
    resumed = _resume(TrainConfig(**cfg, out=str(tmp_path / "resumed")))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(full.objective.gamma, resumed.objective.gamma)
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "resumed")


def test_resuming_on_other_images_is_refused_naming_both(tmp_path, capsys):
    """--resume with --data-root at other images under the same class names and counts: the run's config.json
    records its data's fingerprint, and the resume is refused in one line naming both roots; nothing changes.
    The same images copied elsewhere resume."""
    import hashlib
    import shutil
    first, other = tmp_path / "first", tmp_path / "other"
    data.write_fake_image_folder(first, classes=list("ab"), n_per_class=(8, 2), size=8, seed=0)
    data.write_fake_image_folder(other, classes=list("ab"), n_per_class=(8, 2), size=8, seed=1)
    out = tmp_path / "run"
    args = ["--dataset", "folder32", "--data-root", str(first), "--split-dir", str(tmp_path / "splits"), "--arch",
            "toy_mlp", "--method", "ce", "--epochs", "2", "--batch-size", "4", "--val-per-class", "2", "--no-progress",
            "--device", "cpu", "--out", str(out)]
    run = train.prepare(TrainConfig(dataset="folder32", data_root=str(first), split_dir=str(tmp_path / "splits"),
                                    arch="toy_mlp", method="ce", epochs=2, batch_size=4, val_per_class=2,
                                    progress=False, device="cpu", out=str(out)).validate())
    _interrupt(run, lambda t: t.step == 3)  # mid-epoch 1
    recorded = json.loads((out / "config.json").read_text())["data"]
    assert recorded["root"] == str(first) and len(recorded["sha256"]) == 64
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.iterdir() if f.is_file()}
    with_other = [str(other) if a == str(first) else a for a in args]
    assert main(with_other + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on other data" in err[0] and str(first) in err[0] and str(other) in err[0], err
    assert "--resume" not in err[0]
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.iterdir() if f.is_file()} == before
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)  # new modification times, same images
    assert main([str(moved) if a == str(first) else a for a in args] + ["--resume"]) == 0
    from hdkdlib.data.bundle import files_fingerprint  # --dataset folder: the files, not decoded
    tree = {r: files_fingerprint(r, data.image_folder(r, "train"), data.image_folder(r, "val")) for r in (first, other,
                                                                                                           moved)}
    assert tree[first]["sha256"] == tree[moved]["sha256"] != tree[other]["sha256"]


# --- nothing lost, nothing silently wrong (issue 36) ---------------------------------------------------------
def _files(folder):
    """Each file's digest (a directory: "dir") under folder; the lock holds only the last process's pid."""
    import hashlib
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(folder).rglob("*")) if p.name != ".lock"}


def _payload(marker):
    """An object whose unpickling would create `marker`: what a hostile or foreign file may carry."""
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    return Payload()


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hdkdlib.train: error: "), err
    return err[0]


def test_a_model_with_a_pickle_payload_is_refused_unexecuted_in_our_words_on_every_path(fake_root, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "EXECUTED"
    train.run(_cfg(fake_root, out, epochs=1))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # model.pt is then the run's only network
        (out / name).unlink(missing_ok=True)
    state = torch.load(out / "model.pt", weights_only=True)
    torch.save({**state, "extra": _payload(marker)}, out / "model.pt")
    before = _files(out)
    ours = "is unreadable (it holds objects other than tensors (a modified or foreign file); it was not executed)"
    assert main(_train_argv(fake_root, out, "--epochs", "1", "--resume")) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"hdkdlib.train: error: model.pt in {out} {ours}: restore it from a copy of the run folder")
    assert "weights_only" not in line, line
    other = tmp_path / "heads"
    assert main(_train_argv(fake_root, other, "--epochs", "1", "--init-from", str(out))) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"hdkdlib.train: error: init_from: {out / 'model.pt'}") and ours in line, line
    assert "give --init-from a finished run" in line and "weights_only" not in line and not other.exists()
    for load in (lambda: train.run(_cfg(fake_root, out, epochs=1)), lambda: train.load_run(out, device="cpu")):
        with pytest.raises(RunFolderDamaged) as caught:
            load()
        assert f"model.pt in {out} {ours}" in str(caught.value) and "weights_only" not in str(caught.value)
    assert not marker.exists() and _files(out) == before


def test_a_damaged_record_is_one_line_that_never_advises_resuming_into_the_same_failure(fake_root, tmp_path, capsys,
                                                                                       monkeypatch):
    """A file of the run folder that is a directory, or a JSON record too deep or holding a 5,000-digit number:
    one line naming the file and what to restore, never --resume (which would fail the same way), and every byte
    in the folder as it was. The undamaged run then resumes."""
    pristine = tmp_path / "run"
    _interrupt(train.prepare(_cfg(fake_root, pristine, epochs=2)), lambda t: t.epoch == 1)  # epoch 2 begun

    def directory(name):
        def damage(out):
            (out / name).unlink()
            (out / name).mkdir()
        return damage

    def insert(name, text):
        def damage(out):
            record = (out / name).read_text()
            (out / name).write_text(record.replace('"', text + '"', 1) if name == "config.json" else text + record)
        return damage

    def truncate(out):
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            (out / name).write_bytes((out / name).read_bytes()[:100])

    deep = "[" * 100_000 + "]" * 100_000
    cases = [(directory("config.json"), "config.json in {out} is a directory, not a file: move it out of the way"),
             (directory("checkpoint.pt"), "checkpoint.pt in {out} is a directory, not a file: move it out of the way"),
             (insert("config.json", '"big": ' + "9" * 5000 + ', '),
              "config.json in {out} is unreadable (a number longer than 4300 digits): restore it from a copy"),
             (insert("config.json", '"deep": ' + deep + ', '),
              "config.json in {out} is unreadable (nested deeper than 64 levels): restore it from a copy"),
             (insert("metrics.jsonl", '{"epoch": 0, "deep": ' + deep + "}\n"),
              "metrics.jsonl in {out}: line 1 is unreadable (nested deeper than 64 levels): delete that line"),
             (truncate, "cannot resume {out}: no readable checkpoint (checkpoint.pt not loaded: truncated or corrupt")]
    for number, (damage, message) in enumerate(cases):
        out = tmp_path / f"case{number}"
        shutil.copytree(pristine, out)
        damage(out)
        before = _files(out)
        # files read only once the run is under way (not when its settings are resolved) fail under --resume
        for extra in (["--resume"], []) if number < 4 else (["--resume"],):
            assert main(_train_argv(fake_root, out, "--epochs", "2", *extra)) == 2
            line = _one_line_error(capsys)
            assert message.format(out=out) in line and "--resume" not in line and "Traceback" not in line, line
        assert _files(out) == before, message
    before = _files(pristine)
    assert main(_train_argv(fake_root, pristine, "--epochs", "2", "--resume", "--lr", "0.3")) == 2
    line = _one_line_error(capsys)  # a refused setting: resuming with the same command would be refused again
    assert "other settings (lr)" in line and "is kept" not in line and _files(pristine) == before, line
    real_check = train.Trainer._check_finite

    def non_finite(self):
        raise FloatingPointError("non-finite loss or loss weights: training stopped")
    monkeypatch.setattr(train.Trainer, "_check_finite", non_finite)
    assert main(_train_argv(fake_root, pristine, "--epochs", "2", "--resume", "--no-eval")) == 2
    line = _one_line_error(capsys)  # a bit-identical resume meets the same non-finite loss
    assert "non-finite" in line and "is kept" not in line and _files(pristine) == before, line
    monkeypatch.setattr(train.Trainer, "_check_finite", real_check)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # a failure while training: here, and only here, resuming helps
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    assert main(_train_argv(fake_root, pristine, "--epochs", "2", "--resume", "--no-eval")) == 2
    line = _one_line_error(capsys)
    assert "no space left" in line and "is kept: continue with the same command plus --resume" in line, line
    monkeypatch.setattr(torch, "save", real_save)
    assert main(_train_argv(fake_root, pristine, "--epochs", "2", "--resume", "--no-eval")) == 0
    assert [r["epoch"] for r in _metrics(pristine)] == [1, 2] and RunFolder(pristine).trained()


def test_out_or_hdkd_runs_naming_a_file_is_one_line_naming_the_setting(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine\n")
    synthetic = ["--dataset", "synthetic", "--arch", "toy_mlp", "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert main(synthetic + ["--out", str(mine)]) == 2
    assert _one_line_error(capsys) == (f"hdkdlib.train: error: run folder {mine} is a file, not a folder: choose "
                                       "another out folder (--out)")
    assert main(synthetic + ["--out", str(mine / "run"), "--resume"]) == 2
    assert _one_line_error(capsys) == (f"hdkdlib.train: error: run folder {mine / 'run'} lies under {mine}, a file, "
                                       "not a folder: choose another out folder (--out)")
    monkeypatch.setenv("HDKD_RUNS", str(mine))  # where the synthetic data set's split file goes
    assert main(synthetic + ["--out", str(tmp_path / "run")]) == 2
    assert _one_line_error(capsys) == (f"hdkdlib.train: error: HDKD_RUNS {mine} is a file (or lies under one), not a "
                                       "folder: set HDKD_RUNS to a folder")
    assert mine.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_compiled_step_of_a_stochastic_network_with_finite_differences_is_refused(fake_root, tmp_path, monkeypatch):
    """The probes replay one random state (torch.random.fork_rng), which torch.compile(fullgraph=True) cannot
    trace: with dropout or stochastic depth, compile 'step' is refused before anything is written; compile
    'network' and the exact hypergradient keep working."""
    monkeypatch.setattr("hdkdlib.bilevel.draws_random_numbers", lambda model: True)
    with pytest.raises(ValueError, match="compile 'step' cannot give the finite-difference probes the same dropout"):
        train.prepare(_cfg(fake_root, tmp_path / "refused", compile="step"))
    assert not (tmp_path / "refused").exists()
    assert train.prepare(_cfg(fake_root, tmp_path / "exact", compile="step", meta_method="exact")).meta.same_draws
    assert train.prepare(_cfg(fake_root, tmp_path / "network", compile="network")).meta.same_draws
