"""Figures a reader can read: no legend over the data, whole-number epochs, few ticks with the cost's unit."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from hdkdlib import cost, plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _extent(artist, fig):
    fig.canvas.draw()
    return artist.get_window_extent(fig.canvas.get_renderer())


def test_decision_boundaries_paint_each_class_in_its_own_colour():
    """Class c is pastel colour c in every panel, also in one whose exit never predicts class 0 (each panel's own
    colour scale would paint class 1 there in class 0's colour)."""
    import numpy as np
    import seaborn as sns
    import torch
    axis = torch.linspace(-1, 1, 4)
    y = torch.tensor([0, 1, 2])
    preds = [torch.tensor([[0, 1, 2, 2]] * 4), torch.tensor([[1, 1, 2, 2]] * 4)]  # exit 2 never predicts class 0
    fig, axes = plt.subplots(1, 2)
    plots.decision_boundaries(axes, axis, preds, torch.zeros(3, 2), y)
    pastel = np.array(sns.color_palette("pastel", 3))
    for ax, pred in zip(axes, preds):
        image = ax.images[0]
        rgb = image.to_rgba(image.get_array())[..., :3]
        assert np.allclose(rgb, pastel[pred.numpy()], atol=1 / 255)


def test_weight_trajectories_legend_sits_beside_the_curves():
    names = ["ce1", "ce2", "ce3", "ce4", "kd1<-2", "kd1<-3", "kd1<-4", "kd2<-3", "kd2<-4", "kd3<-4"]
    history = {"step": [10, 20, 30], "weights": [{n: 0.1 * (i + 1) * s for i, n in enumerate(names)} for s in (1, 2, 3)]}
    fig, ax = plt.subplots(figsize=(5, 3))
    plots.weight_trajectories(history, ax=ax)
    legend, axes = _extent(ax.get_legend(), fig), _extent(ax, fig)
    assert legend.x0 >= axes.x1  # right of the plotting area: it covers no curve
    _assert_readable_and_distinct(ax.get_legend())


def _assert_readable_and_distinct(legend):
    """A legend readable at 100% zoom whose entries differ in colour or dash pattern, pair by pair."""
    from matplotlib.colors import to_hex
    assert all(t.get_fontsize() >= 9 for t in legend.get_texts())
    looks = [(to_hex(h.get_color()), str(h.get_linestyle()), str(h.get_dashes() if hasattr(h, "get_dashes") else ""))
             for h in legend.legend_handles]
    assert len(set(looks)) == len(looks), looks
    greys = [c for c, _, _ in looks if len({c[1:3], c[3:5], c[5:7]}) == 1 and c not in ("#000000",)]
    assert len(greys) <= 1, greys  # at most one grey line (the training accuracy), never several


def test_weights_by_student_epochs_are_whole_numbers():
    initial = {"ce1": 0.5, "ce2": 0.5, "kd1<-2": 0.5}
    axes = plots.weights_by_student([[{"ce1": 0.6, "ce2": 0.4, "kd1<-2": 0.3}]], 2, initial=initial)
    fig = axes[0].figure
    fig.canvas.draw()
    ticks = [t for t in axes[0].get_xticks() if axes[0].get_xlim()[0] <= t <= axes[0].get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize("flops", [[497.0, 1.4e3, 3.8e3], [15.1e6, 40e6, 75.9e6], [0.34e9, 1.36e9, 2.9e9]])
def test_budgeted_curve_ticks_are_few_and_in_the_unit_of_the_cost(flops):
    rows = [{"p": p, "accuracy": 0.5 + 0.1 * i, "flops": f} for i, (p, f) in enumerate(zip((0.1, 1.0, 1.9), flops))]
    fig, ax = plt.subplots(figsize=(4, 3))
    plots.budgeted_curves({"hdkd": rows}, ax=ax)
    fig.canvas.draw()
    _, prefix = cost.si_scale(max(flops))
    assert f"average {prefix}FLOPs per test image" == ax.get_xlabel()
    low, high = ax.get_xlim()
    labels = [t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if low <= x <= high]
    assert 2 <= len(labels) <= 7 and all(len(label) <= 5 for label in labels)  # readable, not 0.00050.0010...


def test_costs_are_named_by_what_they_count():
    """Exits on torchvision backbones count MACs (cost_convention "macs"), MSDNets the reference's FLOPs: axes
    and tables say which. Curves in ms and in counts share no axis: refused, naming them."""
    from hdkdlib import notebook
    assert cost.unit("macs") == "MACs" and cost.unit("msdnet") == cost.unit(None) == "FLOPs"
    with pytest.raises(ValueError, match="unknown cost convention 'gmacs'"):
        cost.unit("gmacs")
    rows = [{"p": 0.1, "accuracy": 0.5, "flops": 2e9}, {"p": 1.0, "accuracy": 0.6, "flops": 4e9}]
    fig, axes = plt.subplots(1, 3)
    plots.budgeted_curves({"resnet": rows}, ax=axes[0], unit="MACs")
    assert axes[0].get_xlabel() == "average GMACs per test image"
    table = [{"exit": 1, "flops": 2e9, "top1": 0.5, "top5": 0.7}, {"exit": 2, "flops": 4e9, "top1": 0.6, "top5": 0.8}]
    plots.anytime_curves(pd.DataFrame(table).assign(method="hdkd"), ax=axes[1], unit="MACs")
    assert axes[1].get_xlabel() == "cumulative GMACs of the exit"
    assert list(notebook.anytime_table(table, unit="MACs").columns)[0] == "MMACs"
    assert list(notebook.budget_table(rows, unit="MACs").columns)[0] == "MMACs/img"
    with pytest.raises(ValueError, match="in ms per image, b in FLOPs: draw them on separate axes"):
        plots.budgeted_curves({"a": [{**r, "ms": 1.0} for r in rows], "b": rows}, ax=axes[2])


def test_weights_by_student_draws_each_exits_training_accuracy_beside_its_weights():
    history = [{"ce1": 0.6, "ce2": 0.4, "kd1<-2": 0.3}, {"ce1": 0.5, "ce2": 0.5, "kd1<-2": 0.1}]
    top1 = [[[0.20, 0.30], [0.90, 0.95]]]  # one run, two epochs, two exits
    axes = plots.weights_by_student([history], 2, train_top1=top1)
    for exit_index, ax in enumerate(axes[:2]):
        twins = [a for a in ax.figure.axes if a is not ax and a.bbox.bounds == ax.bbox.bounds]
        assert len(twins) == 1 and twins[0].get_ylim() == (0, 100)
        (line,) = twins[0].get_lines()
        assert list(line.get_xdata()) == [1, 2]
        assert list(line.get_ydata()) == pytest.approx([100 * top1[0][0][exit_index], 100 * top1[0][1][exit_index]])


def test_weights_by_student_has_one_legend_clear_of_every_panel_and_its_labels():
    num_exits = 7
    names = [f"ce{i}" for i in range(1, 8)] + [f"kd{i}<-{j}" for i in range(1, 8) for j in range(i + 1, 8)]
    history = [{n: 0.5 / (e + 1) for n in names} for e in range(120)]
    top1 = [[[e / 120] * num_exits for e in range(1, 121)]]
    axes = plots.weights_by_student([history, history], num_exits, train_top1=top1)
    fig = axes[0].figure
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["CE"] + [f"KD from {j}" for j in range(2, 8)] + ["train top-1"]
    _assert_readable_and_distinct(legend)
    nine = plots.weights_by_student([[{f"kd1<-{j}": 0.1 for j in range(2, 10)}]], 9, train_top1=[[[0.5] * 9]])
    _assert_readable_and_distinct(nine[0].figure.legends[0])  # an eighth teacher is no second grey line
    box = _extent(legend, fig)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:  # the panels and their right-hand (training top-1) axes, with tick and axis labels
        if ax.get_visible():
            assert not ax.get_tightbbox(renderer).overlaps(box)
            assert ax.get_legend() is None
    ticks = [_extent(t, fig) for t in axes[4].get_xticklabels() if t.get_text()]  # a bottom-row panel, 120 epochs
    assert len(ticks) >= 3 and not any(a.overlaps(b) for a, b in zip(ticks, ticks[1:]))
