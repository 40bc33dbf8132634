"""The sync-free training step (hdkdlib.step.TrainStep) against the step it replaced (tests/legacy: backward(),
torch.optim's step, per-parameter loops, cloned BatchNorm buffers): same loss, parameters, optimizer state,
BatchNorm statistics and loss weights from the same state, for every optimizer the bilevel update mirrors; and
what makes it fast on a GPU, counted on the CPU: no host syncs, no tensors built from Python lists, and few ops."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from hdkdlib import bilevel, evaluation, models, objectives
from hdkdlib.step import CapturedStep, TrainStep
from legacy import bilevel as legacy_bilevel
from legacy import step as legacy_step

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=True),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=True),
    "sgd-plain": lambda p: torch.optim.SGD(p, lr=0.05, foreach=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-3, foreach=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2, foreach=True),
}


def _op_count():
    spec = importlib.util.spec_from_file_location("op_count", ROOT / "benchmarks" / "op_count.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHAPES = {"msdnet_cifar_anytime": (3, 32, 32), "toy_mlp": (6,)}


def _batches(n=3, batch=8, classes=10, seed=1, arch="msdnet_cifar_anytime"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *SHAPES[arch], generator=g, dtype=torch.float64),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def _pair(method, optimizer, meta_cls, arch="msdnet_cifar_anytime"):
    torch.manual_seed(0)
    # float64: the two steps' arithmetic differs in kernels and order, and float32 rounding of small parameters
    # (a bias near 0 after one step) would hide nothing but blur the 1e-6 bound
    options = dict(in_features=6, width=16, num_exits=4, batch_norm=True) if arch == "toy_mlp" else {}
    model = models.build(arch, 10, input_shape=SHAPES[arch], **options).double().train()
    objective = objectives.build(method, model.num_exits).double()
    opt = OPTIMIZERS[optimizer](model.parameters())
    meta = meta_cls(model, objective, lr=0.01) if list(objective.parameters()) else None
    return model, objective, opt, meta


def _assert_rel(a, b, what, rel=1e-6):
    """Equal within `rel` of the larger magnitude: the new step runs the same arithmetic in other kernels
    (foreach, one cross-entropy over all exits, FMA in a fused add), so rounding differs."""
    scale = max(a.abs().max().item(), b.abs().max().item())
    # plus 1e-14: a state entry that is 0 in one step and 1e-17 in the other (a gradient that cancels) is equal
    assert (a - b).abs().max().item() <= rel * scale + 1e-14, (what, (a - b).abs().max().item(), scale)


@pytest.mark.parametrize("method, optimizer, arch", [
    *(("hdkd", o, "toy_mlp") for o in OPTIMIZERS), *(("ce", o, "toy_mlp") for o in OPTIMIZERS),
    ("hdkd", "sgd-nesterov", "msdnet_cifar_anytime"), ("dbt", "sgd", "msdnet_cifar_anytime")])
def test_the_step_agrees_with_the_step_it_replaced(method, optimizer, arch):
    """Two steps (the first creates the optimizer's state, the second reads it) from the same start: loss,
    parameters, optimizer state, BatchNorm buffers and loss weights within 1e-6 relative (a multi-exit MLP with
    BatchNorm for every optimizer; MSDNet for two cases)."""
    new = _pair(method, optimizer, bilevel.MetaStep, arch)
    old = _pair(method, optimizer, legacy_bilevel.MetaStep, arch)
    step = TrainStep(new[0], new[1], new[2], new[3])
    train, val, _ = _batches(arch=arch)
    for _ in range(2):
        loss_new, _ = step(train, val if new[3] else None)
        loss_old, _ = legacy_step.train_step(old[0], old[1], old[2], train, old[3], val if old[3] else None)
        _assert_rel(loss_new, loss_old, "loss")
        for (n, a), b in zip(new[0].state_dict().items(), old[0].state_dict().values()):
            _assert_rel(a.double(), b.double(), n)  # parameters and BatchNorm buffers
        for p_new, p_old in zip(new[0].parameters(), old[0].parameters()):
            s_new, s_old = new[2].state[p_new], old[2].state[p_old]
            assert set(s_new) == set(s_old)
            for key in s_old:
                _assert_rel(torch.as_tensor(s_new[key]).double(), torch.as_tensor(s_old[key]).double(), key)
        if new[3] is not None:
            _assert_rel(new[1].weights().detach(), old[1].weights().detach(), "loss weights")


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-nesterov", "adam", "adamw"])
def test_the_finite_difference_hypergradient_agrees_with_the_one_it_replaced(optimizer):
    """From a state with optimizer history: within 5e-3 (relative norm) of the old finite differences, whose
    probe length and norm were computed in other precisions (the differences are O(eps^2) apart)."""
    model, objective, opt, _ = _pair("hdkd", optimizer, bilevel.MetaStep)
    train, val, more = _batches()
    step = TrainStep(model, objective, opt)
    step(more)
    names = {id(p): n for n, p in model.named_parameters()}
    loss = objectives.ValidationLoss(model.num_exits, kind="ce")
    new = bilevel._hypergradient(model, objective, train, val, step=bilevel.VirtualStep.of(opt, names), val_loss=loss,
                                 method="finite_difference", eps=None)[0][0]
    old = legacy_bilevel._hypergradient(model, objective, train, val, step=legacy_bilevel.VirtualStep.of(opt, names),
                                        val_loss=loss, method="finite_difference", eps=None)[0][0]
    assert old.abs().max() > 1e-6
    assert ((new - old).norm() / old.norm()).item() < 5e-3


def test_functional_passes_leave_the_batchnorm_statistics_untouched():
    """The weight update's passes normalise by batch statistics without writing the running ones: after a
    weight update the buffers are bit for bit those the real pass left."""
    model, objective, opt, meta = _pair("hdkd", "sgd", bilevel.MetaStep)
    train, val, _ = _batches()
    before = copy.deepcopy(dict(model.named_buffers()))
    step = TrainStep(model, objective, opt, meta)
    loss, logits, grads = step.gradients(*train)
    after_real = copy.deepcopy(dict(model.named_buffers()))
    assert any(not torch.equal(before[n], b) for n, b in after_real.items())  # the real pass did update them
    meta.update(train, val, logits, grads, step.update)
    for n, b in model.named_buffers():
        assert torch.equal(after_real[n], b), n


def test_the_learning_rate_is_a_tensor_the_schedule_fills():
    model, objective, opt, _ = _pair("ce", "sgd", bilevel.MetaStep)
    step = TrainStep(model, objective, opt)
    lr = step.lr
    step.set_lr(0.01)
    assert step.lr is lr and lr.item() == pytest.approx(0.01) and opt.param_groups[0]["lr"] == 0.01
    start = [p.detach().clone() for p in model.parameters()]
    train = _batches(1)[0]
    step(train)
    reference = _pair("ce", "sgd", bilevel.MetaStep)
    reference[2].param_groups[0]["lr"] = 0.01
    legacy_step.train_step(reference[0], reference[1], reference[2], train)
    for p, q, s in zip(model.parameters(), reference[0].parameters(), start):
        _assert_rel(p.detach() - s, q.detach() - s, "update at lr 0.01", rel=1e-5)
    with pytest.raises(ValueError, match="lr must be > 0"):
        step.set_lr(0.0)
    # a float64 network steps by the lr itself, not by its float32 rounding (0.3 -> 0.30000001192...)
    model64 = _pair("ce", "sgd", bilevel.MetaStep)[0].double()
    opt64 = torch.optim.SGD(model64.parameters(), lr=0.3)
    step64 = TrainStep(model64, objective.double(), opt64)
    assert step64.lr.dtype == torch.float64 and step64.lr.item() == 0.3


@pytest.mark.parametrize("method", ["ce", "dbt", "hdkd"])
def test_the_step_reads_nothing_on_the_host(method):
    """No host sync and no tensor built from Python values inside a step (the weight update every step), and
    the HDKD step at most 3x the compute ops of a CE step (three passes and a half where CE has one)."""
    counts = _op_count().step_counts(method, batch=4, classes=10)["step"]
    assert counts["syncs"] == 0 and counts["list_tensors"] == 0, counts
    if method == "hdkd":
        ce = _op_count().step_counts("ce", batch=4, classes=10)["step"]
        assert counts["compute"] <= 3.0 * ce["compute"], (counts, ce)


def test_early_exit_syncs_once_per_exit():
    counts = _op_count().early_exit_syncs(batch=64, classes=10)
    assert 0 < counts["syncs"] <= counts["exits"], counts
    assert counts["list_tensors"] == 0


def test_the_op_counter_sees_syncs_and_list_tensors():
    """The counter itself: an item(), a boolean mask and torch.tensor([...]) are each counted."""
    counter = _op_count().OpCounter()
    x = torch.randn(5)
    with counter:
        x.sum().item()
        x[x > 0]
        torch.tensor([1.0, 2.0])
    totals = counter.totals()
    assert totals["syncs"] == 2 and totals["list_tensors"] == 1, totals


def _toy(method="hdkd", seed=0):
    torch.manual_seed(seed)
    model = models.build("toy_mlp", 3, in_features=4, width=8, num_exits=3, batch_norm=True).train()
    objective = objectives.build(method, 3, check_inputs=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    meta = bilevel.MetaStep(model, objective, check_finite=False) if list(objective.parameters()) else None
    return model, objective, opt, meta


def test_the_captured_steps_bookkeeping_on_the_cpu():
    """The captured mode's bookkeeping, without capture: eager warm-up steps of each kind, then one static set
    of buffers per kind (with and without the weight update), the lr a tensor refilled between epochs, and a
    batch of another size run eagerly: every step bit for bit the plain step's."""
    captured, plain = _toy(), _toy()
    step = CapturedStep(TrainStep(*captured), capture=False, warmup=2)
    reference = TrainStep(*plain)
    g = torch.Generator().manual_seed(1)
    for i in range(9):
        if i == 4:  # a new epoch: the schedule refills the lr both steps read
            step.set_lr(0.02), reference.set_lr(0.02)
        n = 5 if i == 7 else 8  # a last partial batch
        batch = (torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
        val = (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) if i % 3 == 0 else None
        loss, _ = step(batch, val)
        assert torch.equal(loss, reference(batch, val)[0]), i
    for p, q in zip(captured[0].parameters(), plain[0].parameters()):
        assert torch.equal(p, q)
    assert torch.equal(captured[1].gamma, plain[1].gamma)
    assert sorted(step.static) == ["plain", "update"]
    assert all(t.shape[0] == 8 for t in step.static["plain"][0])  # the partial batch never entered a static buffer
    assert step.step.lr.item() == pytest.approx(0.02)


def test_cuda_graphs_asked_for_without_a_gpu_say_so_and_run_eagerly(tmp_path, capsys):
    from hdkdlib.train import TrainConfig, prepare
    from hdkdlib.data import GpuLoader
    from hdkdlib.data.bundle import DataBundle
    x, y = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8), torch.arange(32) % 10
    stats = dict(mean=(0.5,) * 3, std=(0.25,) * 3, device=torch.device("cpu"))
    bundle = DataBundle(GpuLoader(x, y, 8, train=True, **stats), GpuLoader(x, y, 8, train=True, **stats),
                        None, None, 10, (3, 32, 32))
    cfg = TrainConfig(arch="toy_mlp", method="ce", device="cpu", cuda_graphs="on", progress=False, batch_size=8)
    trainer = prepare(cfg, data_bundle=bundle)
    assert trainer.step_mode == "eager" and trainer._config_record()["step_mode"] == "eager"
    assert "cuda_graphs on needs one CUDA device" in capsys.readouterr().err


def test_a_capture_that_fails_is_recorded_as_eager_in_every_epochs_line(tmp_path, monkeypatch, capsys):
    """config.json keeps the mode asked for (captured); once capturing fails and the step falls back to eager,
    each epoch's line in metrics.jsonl says how its steps ran, with the reason. The failure is simulated: no CPU
    can capture a CUDA graph."""
    import json
    from hdkdlib import train
    from hdkdlib.train import Trainer, TrainConfig

    class FailingCapture(CapturedStep):  # CapturedStep's own failure path: failed set, one line, eager from then on
        def __init__(self, step, capture, say):
            super().__init__(step, capture=False, say=say)

        def _graphed(self, kind, inputs):
            self.failed = "RuntimeError: operation not permitted when stream is capturing"
            self.say(f"the training step cannot be captured as a CUDA graph ({self.failed}); training eagerly")
            return None

    def cfg(out):
        return TrainConfig(dataset="synthetic", arch="toy_mlp", method="ce", epochs=2, batch_size=16, lr=0.05,
                           device="cpu", progress=False, out=str(out)).validate()

    train.run(cfg(tmp_path / "eager"))
    with monkeypatch.context() as m:
        m.setattr(Trainer, "step_mode", property(lambda self: "captured"))
        m.setattr(train, "CapturedStep", FailingCapture)
        train.run(cfg(tmp_path / "failed"))
    assert "cannot be captured as a CUDA graph" in capsys.readouterr().err
    lines = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step_mode"] for row in lines("eager")] == ["eager", "eager"]
    assert [row["step_mode"] for row in lines("failed")] == \
        ["eager (capture failed: RuntimeError: operation not permitted when stream is capturing)"] * 2
    assert json.loads((tmp_path / "failed" / "config.json").read_text())["step_mode"] == "captured"


def test_cuda_graphs_auto_captures_only_an_uncompiled_step_on_one_gpu():
    """auto: CUDA graphs on one GPU when nothing is compiled (a compiled network may capture graphs itself);
    a compiled step is never captured; CPUs and DDP run eagerly. Decided from the settings alone (no GPU needed)."""
    from types import SimpleNamespace
    from hdkdlib.train import TrainConfig, Trainer
    mode = lambda device, world_size=1, **settings: Trainer.step_mode.func(SimpleNamespace(
        cfg=TrainConfig(**settings).validate(), device=torch.device(device), world_size=world_size, rank=0))
    assert mode("cuda") == "captured" and mode("cuda", cuda_graphs="off") == "eager"
    assert mode("cuda", compile="network") == "eager" and mode("cuda", compile="network", cuda_graphs="on") == "captured"
    assert mode("cuda", compile="step") == "compiled"
    assert mode("cpu") == mode("cuda", world_size=2) == "eager"


def test_the_hdkd_step_compiles_as_one_graph():
    """No graph break in the whole step, weight update included (a break would split it into graphs that
    neither torch.compile nor a CUDA graph can treat as one)."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip(f"torch {torch.__version__} cannot trace torch.autograd.grad (a graph break by design)")
    model, objective, opt, meta = _toy()
    step = TrainStep(model, objective, opt, meta)
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explained = torch._dynamo.explain(step.__call__)(batch, batch)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


class _LegacySteps:
    """The Trainer as it stepped before the sync-free step: torch.optim's step, the old weight update (its Adam
    with a host-side step count), the lr set in the optimizer's groups."""

    def __init__(self, trainer):
        self.trainer = trainer
        if trainer.meta is not None:
            new = trainer.meta
            trainer.meta = legacy_bilevel.MetaStep(new.model, new.objective, lr=new.lr, method=new.method,
                                                   val_loss=new.val_loss, check_finite=False,
                                                   hypergrad_norm=new.hypergrad_norm, horizon=new.horizon)

    def set_lr(self, lr):
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, batch, val_batch=None):
        t = self.trainer
        return legacy_step.train_step(t.net, t.objective, t.optimizer, batch, t.meta if val_batch is not None
                                      else None, val_batch)


class _StopAfterFirstEpoch(Exception):
    pass


@pytest.mark.parametrize("method", ["ce", "hdkd"])
def test_a_run_begun_before_the_new_step_resumes_and_ends_as_it_would_have(tmp_path, monkeypatch, method):
    """A run folder whose first epoch (and checkpoint) the old step wrote, continued by the new step, ends where
    the old step alone would have ended: the checkpoint's optimizer state (torch.optim's, the weights' Adam with a
    float32 step count on the host) is read as it was. Float32 on the CPU: the two steps round differently (one
    cross-entropy call, foreach kernels), so parameters agree to 1e-4 relative, not bit for bit."""
    from hdkdlib import train
    from hdkdlib.resume import resolve
    from hdkdlib.train import Trainer, TrainConfig

    def cfg(out):
        # the second epoch at lr x 0.01: the two steps' rounding differences grow with the lr, and the tolerances
        # below bound them at this one
        return TrainConfig(dataset="synthetic", arch="toy_mlp", method=method, epochs=2, batch_size=16, lr=0.05,
                           lr_milestones=(1,), lr_gamma=0.01, device="cpu", progress=False, out=str(out),
                           meta_schedule="fixed", meta_lr=0.01).validate()

    def legacy_step_function(self):
        if self._step is None:
            self._step = self._call = _LegacySteps(self)
            self._step.set_lr(self.cfg.lr_at(self.epoch))
        return self._step

    with monkeypatch.context() as m:  # the old code, all the way
        m.setattr(Trainer, "step_function", legacy_step_function)
        reference, _ = train.run(cfg(tmp_path / "old"))
    with monkeypatch.context() as m:  # the old code for the first epoch, then a stop
        m.setattr(Trainer, "step_function", legacy_step_function)
        saved = Trainer.save_checkpoint

        def save_then_stop(self):
            saved(self)
            raise _StopAfterFirstEpoch
        m.setattr(Trainer, "save_checkpoint", save_then_stop)
        with pytest.raises(_StopAfterFirstEpoch):
            train.run(cfg(tmp_path / "mixed"))
    checkpoint = torch.load(tmp_path / "mixed" / "checkpoint.pt", weights_only=False)
    if method == "hdkd":  # the old weights' Adam: its step count a float32 tensor on the host
        steps = [s["step"] for s in checkpoint["meta_optimizer"]["state"].values()]
        assert all(t.dtype == torch.float32 for t in steps)
    plan = resolve(cfg(tmp_path / "mixed"), "continue")
    assert plan.action == "continue"
    resumed = train.prepare(plan.cfg)
    resumed.fit(plan.action)
    assert len(resumed.folder.metrics()) == 2
    for p, q in zip(resumed.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    first_old, first_mixed = reference.folder.metrics()[0], resumed.folder.metrics()[0]
    assert first_old["train_loss"] == first_mixed["train_loss"]  # the same old code wrote both first epochs
    last_old, last_mixed = reference.folder.metrics()[1], resumed.folder.metrics()[1]
    assert last_mixed["train_loss"] == pytest.approx(last_old["train_loss"], rel=1e-4)
    if method == "hdkd":
        for name, w in last_old["weights"].items():
            assert last_mixed["weights"][name] == pytest.approx(w, rel=1e-3), name
