import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hdkdlib import cost, evaluation as E, models, objectives, toy


def _loop_budgeted(val_probs, val_y, test_probs, test_y, flops, p):
    """The MSDNet reference protocol, sample by sample (no vectorisation)."""
    K, N, _ = val_probs.shape
    share = [p ** k for k in range(1, K + 1)]
    share = [s / sum(share) for s in share]
    conf = val_probs.max(2).values.tolist()
    order = [sorted(range(N), key=lambda i: -conf[k][i]) for k in range(K)]
    filtered = [False] * N
    T = [1e8] * K
    for k in range(K - 1):
        out_n = math.floor(N * share[k])
        count = 0
        for i in order[k]:
            if not filtered[i]:
                count += 1
                if count == out_n:
                    T[k] = conf[k][i]
                    break
        for i in range(N):
            filtered[i] = filtered[i] or conf[k][i] >= T[k]
    T[K - 1] = -1e8
    tconf, tpred = test_probs.max(2)
    M = test_probs.shape[1]
    correct, counts = 0, [0] * K
    for i in range(M):
        for k in range(K):
            if tconf[k][i].item() >= T[k]:
                correct += int(tpred[k][i].item() == test_y[i].item())
                counts[k] += 1
                break
    return correct / M, [c / M for c in counts], sum(c / M * f for c, f in zip(counts, flops)), T


def _random_probs(K, N, C, seed, ties):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, N, C, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, K).view(K, 1, 1)
    if ties:
        logits = (logits * 2).round() / 2  # many samples share exactly the same confidence
    return torch.softmax(logits, 2), torch.randint(0, C, (N,), generator=g)


@pytest.mark.parametrize("seed", range(8))
def test_budgeted_equals_the_reference_loop(seed):
    ties = seed % 2 == 0
    vp, vy = _random_probs(4, 120, 5, seed, ties)
    tp, ty = _random_probs(4, 90, 5, seed + 100, ties)
    flops = [10.0, 25.0, 45.0, 70.0]
    rows = E.budgeted(vp, vy, tp, ty, flops)
    assert [r["p"] for r in rows] == [k / 20 for k in range(1, 40)]
    for r in rows:
        acc, fractions, exp_flops, T = _loop_budgeted(vp, vy, tp, ty, flops, r["p"])
        assert r["accuracy"] == pytest.approx(acc, abs=1e-12)
        assert r["exit_fractions"] == pytest.approx(fractions, abs=1e-12)
        assert r["flops"] == pytest.approx(exp_flops, rel=1e-12)
        assert [min(t, 1e8) if t > 0 else max(t, -1e8) for t in r["thresholds"]] == pytest.approx(T)
        assert sum(r["exit_fractions"]) == pytest.approx(1.0)


def test_a_huge_p_sends_everyone_to_the_last_exit_instead_of_overflowing():
    # p^k overflows a float for p = 1e120 and k >= 3; the shares are the same ratios p^(k-K): 1e-360
    # underflows to 0, and 1e-240 and 1e-120 are below any count, so every sample goes on to the last exit.
    assert E.exit_shares(1e120, 4).tolist() == pytest.approx([0.0, 1e-240, 1e-120, 1.0], rel=1e-12, abs=0)
    total = 1e3 + 1e6 + 1e9
    assert E.exit_shares(1e3, 3).tolist() == pytest.approx([1e3 / total, 1e6 / total, 1e9 / total], rel=1e-12)
    vp, vy = _random_probs(4, 120, 5, 0, False)
    (row,) = E.budgeted(vp, vy, vp, vy, [10.0, 25.0, 45.0, 70.0], ps=[1e120])
    assert row["exit_fractions"] == [0.0, 0.0, 0.0, 1.0] and row["flops"] == 70.0


@pytest.fixture(scope="module")
def trained_toy():
    torch.manual_seed(0)
    x, y = toy.spirals(1500, seed=0)
    model = models.build("toy_mlp", 3, width=32, num_exits=4)
    toy.fit(model, objectives.build("ce", 4), (x[:800], y[:800]), None, steps=200, lr=0.05, progress=False)
    val = E.predict(model, [(x[800:1100], y[800:1100])])
    test = E.predict(model, [(x[1100:], y[1100:])])
    return model, x[1100:], y[1100:], val, test


def test_budgeted_on_a_trained_model_matches_the_loop_and_trades_cost_for_accuracy(trained_toy):
    model, _, _, (vp, vy), (tp, ty) = trained_toy
    flops = cost.exit_flops(model, model.input_shape, "macs")
    rows = E.budgeted(vp, vy, tp, ty, flops)
    for r in rows[::5]:
        acc, fractions, exp_flops, _ = _loop_budgeted(vp, vy, tp, ty, flops, r["p"])
        assert (r["accuracy"], r["exit_fractions"]) == (pytest.approx(acc), pytest.approx(fractions))
    assert rows[0]["flops"] < rows[-1]["flops"]  # small p: most samples leave early


def test_leading_inputs_reads_only_the_batches_that_hold_them():
    x = torch.arange(50.0).view(25, 2)
    read = []

    def batches():
        for b in range(0, 25, 4):
            read.append(b)
            yield x[b:b + 4], torch.zeros(len(x[b:b + 4]))

    assert torch.equal(E.leading_inputs(batches(), 10), x[:10]) and read == [0, 4, 8]
    read.clear()
    assert torch.equal(E.leading_inputs(batches(), 8), x[:8]) and read == [0, 4]
    assert torch.equal(E.leading_inputs(batches(), 0), x) and torch.equal(E.leading_inputs(batches(), 99), x)
    with pytest.raises(ValueError, match="empty split"):
        E.leading_inputs([], 5)
    with pytest.raises(ValueError, match=r"must be >= 0 \(0: all of the split\), got -1"):
        E.leading_inputs(batches(), -1)


def test_real_early_exit_matches_simulation_and_spends_the_predicted_flops(trained_toy):
    model, x, y, (vp, vy), (tp, ty) = trained_toy
    macs = cost.exit_flops(model, model.input_shape, "macs")
    for p in (0.3, 1.0, 1.6):
        thresholds = E.fit_thresholds(vp, E.exit_shares(p, 4))
        simulated = E.apply_thresholds(tp, ty, thresholds, macs)
        with FlopCounterMode(display=False) as counter:
            real = E.early_exit_predict(model, x, thresholds, batch_size=128, exit_flops=macs)
        assert torch.equal(real["exit_index"], simulated["exit_index"])
        predicted = tp.argmax(2).gather(0, simulated["exit_index"].view(1, -1)).squeeze(0)
        assert torch.equal(real["predictions"], predicted)
        expected_total = simulated["flops"] * len(x)
        assert counter.get_total_flops() / 2 == pytest.approx(expected_total, rel=0.01)
        assert real["flops"] == pytest.approx(expected_total, rel=1e-9)


def test_a_confidence_equal_to_the_threshold_in_float32_leaves_only_as_the_simulation_says():
    """0.9 is not a float32 number: a confidence of float32(0.9) (just below 0.9) must not leave at threshold 0.9
    in real early exit while the simulation, which compares in float64, keeps it (the two must agree)."""
    import math
    torch.manual_seed(0)
    model = models.build("toy_mlp", 2, in_features=2, num_exits=2).eval()
    target = torch.tensor(0.9, dtype=torch.float32)
    bias = next(b.item() for b in torch.linspace(math.log(9) - 1e-5, math.log(9) + 1e-5, 2001)
                if torch.softmax(torch.tensor([[b.item(), 0.0]]), 1)[0, 0] == target)
    with torch.no_grad():  # exit 1 answers class 0 with probability float32(0.9) whatever the input
        model.heads[0].weight.zero_()
        model.heads[0].bias.copy_(torch.tensor([bias, 0.0]))
    x, y = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    probs, _ = E.predict(model, [(x, y)])
    assert probs[0].max(1).values.tolist() == [target.item()] * 4
    simulated = E.apply_thresholds(probs, y, [0.9, -math.inf], [1.0, 2.0])["exit_index"]
    assert simulated.tolist() == [1] * 4  # float32(0.9) < 0.9
    assert torch.equal(E.early_exit_predict(model, x, [0.9, -math.inf])["exit_index"], simulated)


def test_early_exit_on_msdnet_skips_stages_for_confident_samples():
    torch.manual_seed(0)
    model = models.build("msdnet_cifar_budget", 10).eval()
    x = torch.randn(16, 3, 32, 32)
    probs, _ = E.predict(model, [(x, torch.zeros(16, dtype=torch.long))])
    conf = probs.max(2).values
    thresholds = [conf[0].median().item(), 0.0, 0.0, 0.0, float("-inf")]  # half leave at exit 1, the rest at 2
    macs = cost.exit_flops(model, (3, 32, 32), "macs")
    with FlopCounterMode(display=False) as counter:
        real = E.early_exit_predict(model, x, thresholds, exit_flops=macs)
    n1 = int((real["exit_index"] == 0).sum())
    assert n1 >= 8 and set(real["exit_index"].tolist()) <= {0, 1}
    assert counter.get_total_flops() / 2 == pytest.approx(n1 * macs[0] + (16 - n1) * macs[1], rel=0.01)


def test_anytime_against_brute_force():
    probs, y = _random_probs(3, 50, 7, 0, False)
    rows = E.anytime(probs, y, [1.0, 2.0, 3.0])
    for k, row in enumerate(rows):
        ranked = probs[k].argsort(1, descending=True)
        assert row["top1"] == pytest.approx(sum(int(ranked[i, 0] == y[i]) for i in range(50)) / 50)
        assert row["top5"] == pytest.approx(sum(int(y[i] in ranked[i, :5]) for i in range(50)) / 50)
        assert row["flops"] == k + 1


def test_bad_inputs():
    probs, y = _random_probs(3, 20, 4, 0, False)
    with pytest.raises(ValueError, match="not probabilities .*pass softmax outputs, not logits"):
        E.budgeted(probs * 2, y, probs, y, [1, 2, 3])
    with pytest.raises(ValueError, match=r"val_targets shaped \[19\] for 20 samples"):
        E.budgeted(probs, y[:19], probs, y, [1, 2, 3])
    with pytest.raises(ValueError, match="exit counts differ: val 3, test 3, exit_flops 2"):
        E.budgeted(probs, y, probs, y, [1, 2])
    with pytest.raises(ValueError, match="empty test split"):
        E.budgeted(probs, y, probs[:, :0], y[:0], [1, 2, 3])
    with pytest.raises(ValueError, match=r"must be \[K, N, C\]"):
        E.anytime(probs[0], y)
    # a label outside the classes (or a float label) would be scored as a miss: refused, as are NaN thresholds,
    # which no confidence reaches (nobody would leave there)
    for labels, shown in ((torch.where(y == 0, 4, y), "from 1 to 4"), (y - 1, "from -1 to 2"),
                          (y.double(), "torch.float64")):
        with pytest.raises(ValueError, match=f"test_targets must be class indices 0..3 for 4 classes, got .*{shown}"):
            E.anytime(probs, labels)
    with pytest.raises(ValueError, match="val_targets must be class indices"):
        E.budgeted(probs, y + 4, probs, y, [1, 2, 3])
    nan = [0.5, float("nan"), -float("inf")]
    with pytest.raises(ValueError, match="hold a NaN, which no confidence reaches"):
        E.apply_thresholds(probs, y, nan, [1, 2, 3])
    model = models.build("toy_mlp", 4, in_features=2, num_exits=3).eval()
    with pytest.raises(ValueError, match="hold a NaN"):
        E.early_exit_predict(model, torch.randn(5, 2), nan)
    with pytest.raises(ValueError, match="3 exits but 2 exit_flops"):  # said before the model runs
        E.early_exit_predict(model, torch.randn(5, 2), [0.5, 0.5, -math.inf], exit_flops=[1.0, 2.0])
    assert E.apply_thresholds(probs, y, [float("inf")] * 2 + [0.0], [1, 2, 3])["exit_fractions"] == [0, 0, 1]


def test_threshold_explorer_updates_with_the_sliders(trained_toy):
    from hdkdlib.widgets import threshold_explorer
    model, _, _, _, (tp, ty) = trained_toy
    flops = cost.exit_flops(model, model.input_shape)
    box = threshold_explorer(tp, ty, flops, show=False)
    sliders = [c for c in box.children if hasattr(c, "value") and isinstance(c.value, float)]
    assert len(sliders) == 3
    for s in sliders:
        s.value = 1.0  # nobody is that confident: all leave at the last exit
    result = box.result()
    assert result["exit_fractions"][-1] == pytest.approx(1.0)
    assert f"{100 * result['accuracy']:.2f}%" in box.children[-2].value
    picture = box.children[-1].value
    sliders[0].value = 0.0  # everybody leaves at exit 1
    assert box.result()["exit_fractions"][0] == pytest.approx(1.0)
    assert "leaving per exit: 100%" in box.children[-2].value
    assert box.children[-1].value != picture and box.children[-1].value[:4] == b"\x89PNG"  # the histogram too


def test_explorer_displays_one_bundle_with_widget_png_and_text_views():
    """IPython's formatter, as the kernel sends it: one output whose bundle holds the widget view, a PNG of the
    state (histogram and numbers in one picture) and the numbers as text; front ends pick one of them."""
    import base64

    from IPython.core.formatters import DisplayFormatter

    from hdkdlib import widgets
    probs = torch.softmax(torch.randn(3, 40, 4, generator=torch.Generator().manual_seed(0)) * 3, 2)
    targets = torch.arange(40) % 4
    flops = [2.0e3, 4.0e3, 8.0e3]
    box = widgets.threshold_explorer(probs, targets, flops, thresholds=[0.7, 0.9, float("-inf")], show=False)
    data, _ = DisplayFormatter().format(box)
    assert set(data) == {"application/vnd.jupyter.widget-view+json", "image/png", "text/plain"}
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == box.model_id
    result = E.apply_thresholds(probs, targets, [0.7, 0.9, float("-inf")], flops)
    assert data["text/plain"] == f"{widgets.summary(result, flops)} (thresholds 0.70, 0.90)"
    assert "kFLOPs" in data["text/plain"]  # a cost of thousands: kFLOPs
    picture = base64.b64decode(data["image/png"])
    assert picture[:4] == b"\x89PNG" and picture == widgets.state_png(result, flops, [0.7, 0.9, float("-inf")])
    box.children[1].value = 0.0  # the bundle shows the state at the time it is displayed
    moved, _ = DisplayFormatter().format(box)
    assert moved["image/png"] != data["image/png"] and "leaving per exit: 100% 0% 0%" in moved["text/plain"]
    assert all("<style" not in str(child.value) for child in box.children if isinstance(child.value, str))
    # 4 classes: a threshold below 1/4 acts as 0, so the sliders span 1/4 to just above 1 (none leaves); a start
    # below is raised to 1/4
    low = widgets.threshold_explorer(probs, targets, flops, thresholds=[0.0, 0.5, float("-inf")], show=False)
    assert [(s.min, s.max) for s in low.children[1:3]] == [(0.25, widgets.NEVER)] * 2 and low.children[1].value == 0.25
    assert "run the cell to move them" in box.children[0].value  # a reopened notebook's sliders need the kernel
    # 3 classes: 1/3 is off the 0.01 grid, which would shift every position (0.3433, ..., 1.0033: 1.00 unreachable);
    # the sliders start at 0.33, where every sample still leaves, and 1.00 is a position
    three = torch.softmax(torch.randn(3, 40, 3, generator=torch.Generator().manual_seed(1)) * 3, 2)
    box = widgets.threshold_explorer(three, targets % 3, flops, thresholds=[0.0, 1.0, float("-inf")], show=False)
    slider = box.children[1]
    positions = [slider.min + k * slider.step for k in range(round((slider.max - slider.min) / slider.step) + 1)]
    assert slider.min == 0.33 and any(p == pytest.approx(1.0, abs=1e-12) for p in positions)
    assert positions[-1] == pytest.approx(widgets.NEVER, abs=1e-12) and box.children[2].value == 1.0
    assert box.thresholds()[0] == float("-inf") and box.result()["exit_fractions"][0] == 1.0


def test_the_explorer_evaluates_the_thresholds_it_is_given_at_the_ends_of_its_sliders():
    """fit_thresholds gives inf where no sample should leave, and a saturated float32 softmax reaches 1.0 exactly:
    a slider clamped to 1 would let those samples leave. The ends of the sliders are inf and -inf."""
    from hdkdlib import widgets
    probs = torch.softmax(torch.randn(3, 40, 4, generator=torch.Generator().manual_seed(0)) * 3, 2)
    probs[1, :30] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # saturated at exit 2
    targets, flops = torch.arange(40) % 4, [1.0, 2.0, 3.0]
    for given in ([0.5, float("inf"), float("-inf")], [float("-inf"), 0.7, float("-inf")], [0.25, 0.5, float("-inf")],
                  [0.9, 1.0, float("-inf")]):
        box = widgets.threshold_explorer(probs, targets, flops, thresholds=given, show=False)
        expected = E.apply_thresholds(probs, targets, given, flops)
        assert box.result()["exit_fractions"] == expected["exit_fractions"], given
    assert box.result()["exit_fractions"][1] > 0  # a threshold of 1.0 itself lets the saturated samples leave


def _msdnet_with_statistics(seed=0):
    torch.manual_seed(seed)
    model = models.build("msdnet_cifar_anytime", 10).eval()
    for m in model.modules():  # trained-looking BatchNorm statistics, so that folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model


def test_folded_batchnorm_predicts_as_the_original_and_early_exit_as_the_simulation():
    from hdkdlib import inference
    model = _msdnet_with_statistics()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference.fast_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    x = torch.randn(48, 3, 32, 32)
    with torch.no_grad():
        ref, got = model(x), fast(x)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * a.abs().max().item())
        assert torch.equal(a.argmax(1), b.argmax(1))
    probs = torch.stack([torch.softmax(z, 1) for z in got])
    with torch.no_grad():  # thresholds from other images, so that no sample sits exactly on one
        calibration = torch.stack([torch.softmax(z, 1) for z in fast(torch.randn(48, 3, 32, 32))])
    thresholds = E.fit_thresholds(calibration, E.exit_shares(1.0, fast.num_exits))
    real = E.early_exit_predict(fast, x, thresholds, batch_size=16)
    sim = E.apply_thresholds(probs, torch.zeros(48, dtype=torch.long), thresholds, [1.0] * fast.num_exits)
    assert torch.equal(real["exit_index"], sim["exit_index"])
    assert torch.equal(real["predictions"], probs.max(2).indices.gather(0, sim["exit_index"].view(1, -1))[0])
    with pytest.raises(ValueError, match="eval mode"):
        inference.fold_batchnorm(model.train())


def test_a_torchvision_backbones_batchnorms_are_folded_in_its_fx_graphs():
    """resnet18_exits' segments are torch.fx graphs, not nn.Sequential: torch.fx's fusion folds all 20 of its
    BatchNorms; the logits agree with the original's to float32 rounding of the folded weights."""
    from hdkdlib import inference
    torch.manual_seed(0)
    model = models.build("resnet18_exits", 10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    fast = inference.fast_copy(model, fold_bn=False)
    assert inference.fold_batchnorm(fast) == 20
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), fast(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_latency_is_cumulative_per_image_and_budgets_take_any_cost():
    model = models.build("toy_mlp", 3, num_exits=3)
    seconds = cost.latency(model, (2,), batch_size=8, repeats=2, warmup=1)
    assert len(seconds) == 3 and all(b > a for a, b in zip([0.0] + seconds, seconds))  # cumulative, positive
    with pytest.raises(ValueError, match="repeats >= 1"):
        cost.latency(model, (2,), repeats=0)
    # a channels-last network is timed on channels-last inputs, as it is fed (benchmarks/early_exit.py's fast+cl)
    images = models.build("msdnet_cifar_anytime", 10).eval()
    seen = []
    images.stages[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    cost.latency(images, (3, 32, 32), batch_size=2, repeats=1, warmup=0, memory_format=torch.channels_last)
    cost.latency(images, (3, 32, 32), batch_size=2, repeats=1, warmup=0)
    assert seen == [True, False]
    g = torch.Generator().manual_seed(0)
    val = torch.softmax(torch.randn(3, 50, 4, generator=g), 2)
    y = torch.randint(0, 4, (50,), generator=g)
    ms = E.budgeted(val, y, val, y, [0.5, 1.0, 2.0], cost_key="ms")
    flops = E.budgeted(val, y, val, y, [5e5, 1e6, 2e6])
    for a, b in zip(ms, flops):  # the same thresholds and exits, priced in another unit
        assert a["accuracy"] == b["accuracy"] and a["ms"] == pytest.approx(b["flops"] / 1e6)
        assert "flops" not in a


def test_cost_units_follow_the_magnitude():
    cases = {1e2: "100 FLOPs", 497: "497 FLOPs", 4.97e3: "4.97 kFLOPs", 15.14e6: "15.1 MFLOPs", 75.94e6: "75.9 MFLOPs",
             1.36e9: "1.36 GFLOPs", 1e10: "10 GFLOPs", 999: "999 FLOPs", 1000: "1 kFLOPs"}
    for value, text in cases.items():
        assert cost.format_cost(value) == text
    assert cost.format_cost(3.2e6, unit="params") == "3.2 Mparams"
    assert cost.si_scale(5e5) == (1e3, "k")


def test_evaluation_takes_arrays_and_lists_alike_and_refuses_bad_budgets():
    import numpy as np
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 40, 5, generator=g, dtype=torch.float64), 2)
    y = torch.randint(0, 5, (40,), generator=g)
    flops = [1.0, 2.0, 3.0]
    reference = E.budgeted(probs, y, probs, y, flops)
    for convert in (lambda t: t.numpy(), lambda t: t.tolist()):
        assert E.budgeted(convert(probs), convert(y), convert(probs), convert(y), flops) == reference
        assert E.anytime(convert(probs), convert(y)) == E.anytime(probs, y)
    assert E.budgeted(probs, y, probs, y, flops, ps=np.array([0.5, 1.0])) == [reference[9], reference[19]]
    for bad in ([0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="ps must be finite and > 0"):
            E.budgeted(probs, y, probs, y, flops, ps=bad)


def test_stage_graphs_predict_as_batched_early_exit_one_input_at_a_time():
    """StageGraphs (one input, a stage at a time; eager on the CPU) gives every sample the prediction and exit of
    early_exit_predict on the whole batch, and refuses inputs it was not built for."""
    from hdkdlib import inference
    torch.manual_seed(0)
    model = models.build("msdnet_cifar_budget", 10).eval()
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():  # thresholds from other images, so that no sample sits exactly on one
        conf = torch.stack([torch.softmax(z, 1).max(1).values for z in model(torch.randn(24, 3, 32, 32))])
    thresholds = [float(conf[k].median()) for k in range(model.num_exits - 1)] + [0.0]
    batched = E.early_exit_predict(model, x, thresholds, batch_size=12)
    graphs = inference.StageGraphs(model)
    one_by_one = [graphs.predict(x[i:i + 1], thresholds) for i in range(len(x))]
    assert [p for p, _ in one_by_one] == batched["predictions"].tolist()
    assert [k for _, k in one_by_one] == batched["exit_index"].tolist()
    assert len(set(k for _, k in one_by_one)) > 1  # the thresholds send samples to several exits
    with pytest.raises(ValueError, match="one input at a time"):
        graphs.predict(x[:2], thresholds)
    with pytest.raises(ValueError, match="built for inputs"):
        graphs.predict(x[:1].double(), thresholds)
    with pytest.raises(ValueError, match="hold a NaN"):
        graphs.predict(x[:1], [float("nan")] + thresholds[1:])
    with pytest.raises(ValueError, match="eval mode"):
        inference.StageGraphs(model.train())
    with pytest.raises(ValueError, match="eval mode"):  # put in train mode after it was built: BatchNorm would move
        graphs.predict(x[:1], thresholds)
    model.eval()


def test_stage_graphs_keep_nothing_of_a_capture_that_failed():
    """A stage whose capture fails (out of memory, an op a graph cannot hold) leaves no half-built StageGraphs: the
    next predict builds every stage again, and thresholds above 1 send the input to the last exit, not to the last
    stage built. CUDA's graph calls are stood in for (capture runs the stage eagerly), so this runs on a CPU."""
    import contextlib
    from unittest import mock

    from hdkdlib import inference
    torch.manual_seed(0)
    model = models.build("toy_mlp", 3).eval()
    x = torch.randn(1, *model.input_shape)
    graphs = inference.StageGraphs(model, capture=True)
    stage = graphs._stage

    def failing(k, state):
        if k == 2:
            raise RuntimeError("CUDA out of memory (simulated) while capturing stage 2")
        return stage(k, state)

    class Stand:  # a stream, or a graph whose replay keeps the outputs its capture computed (same input here)
        def wait_stream(self, other):
            pass

        def replay(self):
            pass

    cuda = dict(graph_pool_handle=lambda: None, Stream=Stand, current_stream=Stand, CUDAGraph=Stand,
                stream=lambda s: contextlib.nullcontext(), graph=lambda *a, **k: contextlib.nullcontext())
    thresholds = [1.1] * (model.num_exits - 1) + [0.0]  # no confidence reaches 1.1: only the last exit takes it
    with mock.patch.multiple(torch.cuda, **cuda):
        graphs._stage = failing
        with pytest.raises(RuntimeError, match="simulated"):
            graphs.predict(x, thresholds)
        assert graphs.static_input is None and graphs.stages == []
        graphs._stage = stage
        assert graphs.predict(x, thresholds)[1] == model.num_exits - 1
        assert len(graphs.stages) == model.num_exits
