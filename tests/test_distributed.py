"""Evaluation under torchrun: every rank evaluates its block of a split and the blocks are gathered. The
gathered result must be exactly what one process computes, uneven blocks and padding included."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hdkdlib import distributed, evaluation, models
from hdkdlib.data.bundle import HostLoader
from hdkdlib.data.gpu import GpuLoader

N, BATCH, CLASSES = 37, 8, 10  # 37 images: blocks of 19 and 18, the last batch of each block short


def _split():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, 3, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def _loaders(rank, world):
    images, labels = _split()
    gpu = GpuLoader(images, labels, BATCH, mean=(0.5,) * 3, std=(0.25,) * 3, train=False, device="cpu",
                    rank=rank, world_size=world)
    dataset = torch.utils.data.TensorDataset(images.float() / 255, labels)
    host = HostLoader(dataset, range(N), BATCH, train=False, seed=0, workers=0, device=torch.device("cpu"),
                      rank=rank, world_size=world, channels_last=False)
    return gpu, host


def _model():
    torch.manual_seed(0)
    return models.build("toy_mlp", CLASSES, input_shape=(3, 8, 8))


def _evaluate(rank, world):
    model, out = _model(), {}
    for name, loader in zip(("gpu", "host"), _loaders(rank, world)):
        probs, targets = evaluation.predict(model, loader)
        out[name] = {"probs": probs, "targets": targets, "metrics": evaluation.per_exit_metrics(model, loader)}
    # rows of different lengths (rank r contributes r + 1 rows), along dim 1 as predictions are gathered
    out["ragged"] = distributed.gather_rows(torch.full((2, rank + 1, 3), float(rank)), dim=1)
    return out


def _worker(rank, world, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = _evaluate(rank, world)
        out["block"] = len(_loaders(rank, world)[0].labels)
        out["temperature"] = _annealed(_confident_half()[4 * rank:4 * rank + 4])  # this rank's half of the batch
        torch.save(out, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _annealed(last_logits) -> float:
    """DBT's temperature after one step on these last-exit logits."""
    from hdkdlib import objectives
    obj = objectives.build("dbt", 2)
    obj.after_step([torch.zeros(len(last_logits), 4), last_logits])
    return float(obj.temperature)


def _confident_half():
    """Last-exit logits of 8 samples: the first 4 confident (max-probability near 1), the last 4 uniform; the
    batch's mean max-probability is about 0.62, above DBT's threshold 0.5, one half's 1.0, the other's 0.25."""
    return torch.cat([torch.tensor([[20.0, 0, 0, 0]]).repeat(4, 1), torch.zeros(4, 4)])


def test_shard_blocks_cover_the_items_in_order():
    for n in range(0, 25):
        for world in range(1, 6):
            blocks = [distributed.shard(n, r, world) for r in range(world)]
            assert [i for a, b in blocks for i in range(a, b)] == list(range(n))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1  # none empty while n >= world


def test_two_process_evaluation_and_annealing_equal_one_process(tmp_path):
    """Evaluation blocks gathered; DBT's temperature decided on the global batch (each rank deciding on its own
    half would give rank 0 T = 1.05 and rank 1 T = 1: the ranks would drift apart)."""
    one = _evaluate(0, 1)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in (0, 1):
        two = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert two["block"] == (19, 18)[rank]  # each rank held only its block
        for name in ("gpu", "host"):
            torch.testing.assert_close(two[name]["probs"], one[name]["probs"], rtol=0, atol=1e-6)
            assert torch.equal(two[name]["targets"], one[name]["targets"])  # every image once, in order
            for key in ("loss", "top1", "top5"):
                torch.testing.assert_close(torch.tensor(two[name]["metrics"][key]),
                                           torch.tensor(one[name]["metrics"][key]), rtol=0, atol=1e-6)
        assert two["temperature"] == _annealed(_confident_half()) == pytest.approx(1.05)
        expected = torch.cat([torch.full((2, 1, 3), 0.0), torch.full((2, 2, 3), 1.0)], dim=1)
        assert torch.equal(two["ragged"], expected)


def test_cpu_threads_sets_and_restores():
    before = torch.get_num_threads()
    with distributed.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with distributed.cpu_threads(0):  # 0: left as it is
        assert torch.get_num_threads() == before


def test_auto_threads_one_for_small_models_else_the_idle_cores(monkeypatch):
    assert 0 <= distributed.idle_cores(0.05) <= (__import__("os").cpu_count() or 1) + 1e-9
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    for idle, expected in ((8.0, 8), (12.0, 8), (2.6, 3), (0.2, 1)):
        monkeypatch.setattr(distributed, "idle_cores", lambda seconds=0.2, idle=idle: idle)
        assert distributed.auto_threads(distributed.SMALL_STEP_FLOPS * 10) == expected
        assert distributed.auto_threads(distributed.SMALL_STEP_FLOPS / 10) == 1  # a toy: one thread, busy or not


def test_toy_fit_trains_on_one_thread_and_gives_the_threads_back():
    from hdkdlib import objectives, toy
    seen = []
    objective = objectives.build("ce", 2)
    objective.after_step = lambda logits: seen.append(torch.get_num_threads())
    model = models.build("toy_mlp", 3, width=8, num_exits=2)
    x, y = toy.spirals(60)
    with distributed.cpu_threads(2):
        toy.fit(model, objective, (x, y), steps=3, progress=False)
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2


def test_only_cpu_and_existing_cuda_devices_are_accepted():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    for name in ("gpu", "meta", "xpu", "lazy", "cpu:3"):
        with pytest.raises(ValueError, match=f"unknown device '{name}': use auto, cpu, cuda or cuda:N"):
            distributed.resolve_device(name)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"this machine has \d+ CUDA device"):
            distributed.resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="no CUDA device is available"):
            distributed.resolve_device("cuda:0")
