import json
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hdkdlib import cost, models

# docs/method.md, "Networks": the reference op counter's cumulative MFLOPs and params (M) per exit.
REFERENCE = {
    "msdnet_cifar_anytime": (100, [15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94],
                             [0.434, 0.877, 1.275, 1.696, 2.178, 2.603, 3.068]),
    "msdnet_cifar_budget": (100, [6.86, 14.35, 27.54, 41.71, 58.48], [0.300, 0.650, 1.018, 1.492, 2.079]),
    "msdnet_imagenet_step4": (1000, [339.90, 685.46, 1008.16, 1254.47, 1360.53], None),
    "msdnet_imagenet_step6": (1000, [514.66, 1171.18, 1844.52, 2501.40, 2742.06], None),
    "msdnet_imagenet_step7": (1000, [615.69, 1436.39, 2283.21, 2967.42, 3253.79], None),
}


def _close(ours, ref, rel=0.005):
    return all(abs(a - b) <= rel * b for a, b in zip(ours, ref)) and len(ours) == len(ref)


def test_cli_json_matches_reference_cifar_anytime():
    out = subprocess.run([sys.executable, "-m", "hdkdlib", "info", "msdnet_cifar_anytime", "--num-classes", "100",
                          "--json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert [r["exit"] for r in rows] == list(range(1, 8))
    _, mflops, params = REFERENCE["msdnet_cifar_anytime"]
    assert _close([r["mflops"] for r in rows], mflops)
    assert _close([r["params"] / 1e6 for r in rows], params)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_msdnet_cost_matches_reference(name):
    num_classes, mflops, params = REFERENCE[name]
    model = models.build(name, num_classes)
    rows = cost.per_exit(model, model.input_shape)
    assert _close([r["flops"] / 1e6 for r in rows], mflops), [r["flops"] / 1e6 for r in rows]
    if params:
        assert _close([r["params"] / 1e6 for r in rows], params)
    assert rows[-1]["params"] == sum(p.numel() for p in model.parameters())


# Phuong & Lampert's 11-exit CIFAR-100 MSDNet, built from their own code and counted with torch's flop counter
# (multiply-accumulates, conv and linear), every earlier head included: docs/method.md, "Networks".
DBT11_MMACS = [15.33, 30.83, 51.33, 65.21, 82.33, 102.69, 131.60, 148.72, 169.08, 192.69, 209.66]
DBT11_PARAMS_M = [0.367, 0.777, 1.141, 1.518, 1.960, 2.467, 2.927, 3.369, 3.876, 4.447, 5.068]


def test_dbt11_matches_phuong_and_lampert_network():
    out = subprocess.run([sys.executable, "-m", "hdkdlib", "info", "msdnet_cifar_dbt11", "--num-classes", "100",
                          "--convention", "macs", "--json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert [r["exit"] for r in rows] == list(range(1, 12))
    assert _close([r["mflops"] for r in rows], DBT11_MMACS), [r["mflops"] for r in rows]
    assert _close([r["params"] / 1e6 for r in rows], DBT11_PARAMS_M), [r["params"] for r in rows]
    model = models.build("msdnet_cifar_dbt11", 100)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.bias is not None and torch.all(m.bias == 0) for m in convs)  # biases, initialised to 0
    # their layout: scales of 6/12/24 planes per unit, the finest two pruned in the last two layers, 128-wide heads
    layout = model.layout()
    assert layout[0]["channels"] == [6, 12, 24]
    assert [r["scales"] for r in layout if r["kind"] == "dense layer"][-2:] == [[1, 2], [2]]
    assert all(h.linear.in_features == 128 for h in model.heads)


def test_macs_convention_uses_flop_counter_and_is_close_to_msdnet_rules():
    model = models.build("msdnet_cifar_anytime", 100)
    msd = cost.exit_flops(model, model.input_shape, "msdnet")
    macs = cost.exit_flops(model, model.input_shape, "macs")
    # The two differ only by ReLU/pooling ops (counted by the msdnet rules) and the Linear bias.
    assert all(m < d < 1.03 * m for m, d in zip(macs, msd))
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, 32, 32))
    assert macs[-1] == pytest.approx(counter.get_total_flops() / 2)


def test_msdnet_rules_count_a_pooling_window_by_its_height_and_width():
    """A window given as (kh, kw) costs kh * kw additions per output element, not kh^2 (hand count below)."""
    x = torch.zeros(1, 4, 12, 12)
    for pool, per_output in ((torch.nn.AvgPool2d((2, 3)), 6), (torch.nn.MaxPool2d(2), 4), (torch.nn.AvgPool2d(3), 9)):
        out = pool(x)
        assert cost._msdnet_ops(pool, x, out) == out[0].numel() * per_output


@pytest.mark.parametrize("name,shape", [("msdnet_cifar_anytime", (3, 3, 32, 32)), ("msdnet_cifar_budget", (2, 3, 32, 32)),
                                        ("msdnet_cifar_dbt11", (2, 3, 32, 32)),
                                        ("resnet18_exits", (2, 3, 64, 64)), ("toy_mlp", (5, 2))])
def test_exit_by_exit_equals_full_forward(name, shape):
    model = models.build(name, 10).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        full = model(x)
        stepwise = list(model.exits(x))
    assert len(full) == model.num_exits == len(stepwise)
    for a, b in zip(full, stepwise):
        assert a.shape == (shape[0], 10)
        assert torch.equal(a, b)


def test_stopping_early_really_skips_the_rest():
    model = models.build("msdnet_cifar_anytime", 100).eval()
    x = torch.zeros(1, 3, 32, 32)
    flops = []
    for k in range(1, model.num_exits + 1):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            gen = model.exits(x)
            for _ in range(k):
                next(gen)
        flops.append(counter.get_total_flops())
    assert all(a < b for a, b in zip(flops, flops[1:]))
    assert flops[0] < 0.25 * flops[-1]
    # and the flop counter agrees with the per-exit cost table (macs convention = flops / 2)
    assert [f / 2 for f in flops] == pytest.approx(cost.exit_flops(model, (3, 32, 32), "macs"))


def test_backbone_exits_share_backbone_modules_and_stop_early():
    import torchvision
    backbone = torchvision.models.resnet18()
    model = models.BackboneExits(backbone, ["layer1", "layer2", "layer3", "layer4"], 10, input_shape=(3, 64, 64))
    backbone_params = {id(p) for n, p in backbone.named_parameters() if not n.startswith("fc.")}
    model_params = {id(p) for p in model.parameters()}
    assert backbone_params <= model_params  # the backbone's own tensors, not copies
    called = []
    backbone.layer3[0].conv1.register_forward_hook(lambda *a: called.append("layer3"))  # fx calls leaves
    gen = model.exits(torch.randn(1, 3, 64, 64))
    next(gen), next(gen)
    assert called == []
    next(gen)
    assert called == ["layer3"]


def test_resnet50_exits_trains_one_step_on_cpu():
    model = models.build("resnet50_exits", 5)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    loss = sum(torch.nn.functional.cross_entropy(z, y) for z in model(x))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        after = sum(torch.nn.functional.cross_entropy(z, y) for z in model(x))
    assert torch.isfinite(after)


@pytest.mark.parametrize("name,shape", [("msdnet_cifar_anytime", (2, 3, 32, 32)), ("msdnet_cifar_dbt11", (2, 3, 32, 32)),
                                        ("resnet18_exits", (2, 3, 64, 64)), ("toy_mlp", (4, 2))])
def test_no_graph_breaks(name, shape):
    torch._dynamo.reset()
    model = models.build(name, 10)
    explanation = torch._dynamo.explain(model)(torch.randn(*shape))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_msdnet_initialisation():
    model = models.build("msdnet_cifar_anytime", 100)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, torch.nn.Linear):
            assert torch.all(m.bias == 0)
    big = max((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), key=lambda m: m.weight.numel())
    n = big.kernel_size[0] * big.kernel_size[1] * big.out_channels
    assert big.weight.std().item() == pytest.approx((2.0 / n) ** 0.5, rel=0.05)


def test_msdnet_torch_init_keeps_pytorchs_defaults_in_every_layer_and_head_reset():
    """init="torch": what MSDNet's PyTorch code runs (its init loop reaches no layer): every convolution keeps
    PyTorch's kaiming-uniform draw, |w| <= 1/sqrt(fan_in) with sd bound/sqrt(3), Linear biases their uniform draw;
    a second stage's new classifiers are drawn the same way."""
    torch.manual_seed(0)
    model = models.build("msdnet_cifar_anytime", 100, init="torch")
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            bound = 1 / (m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]) ** 0.5
            assert m.weight.abs().max().item() <= bound
    big = max((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), key=lambda m: m.weight.numel())
    bound = 1 / (big.in_channels * big.kernel_size[0] * big.kernel_size[1]) ** 0.5
    assert big.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    classifiers = [[m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1] for head in model.heads]
    before = [c.bias.detach().clone() for c in classifiers]
    model.freeze_stages_and_reset_heads("classifiers")
    for k, (linear, old) in enumerate(zip(classifiers, before)):
        assert linear.bias.abs().min().item() > 0 and linear.bias.abs().max().item() <= 1 / linear.in_features ** 0.5
        assert torch.equal(linear.bias, old) == (k == model.num_exits - 1)  # drawn anew, the teacher's kept
    with pytest.raises(ValueError, match="unknown MSDNet init 'kaiming'; valid: rule, torch"):
        models.build("msdnet_cifar_anytime", 10, init="kaiming")


def test_gradient_equilibrium_divides_stage_gradients_by_exits_depending_on_them():
    torch.manual_seed(1)
    plain = models.build("toy_mlp", 3, num_exits=4)
    balanced = models.build("toy_mlp", 3, num_exits=4, gradient_equilibrium=True)
    balanced.load_state_dict(plain.state_dict())
    x = torch.randn(8, 2)
    w = torch.randn(4)

    def stage_grads(model):
        grads = {}
        def capture(j):
            def hook(module, inputs, output):  # returns None, so the output is left as it is
                output[0].register_hook(lambda g: grads.__setitem__(j, g.clone()))
            return hook

        for j, stage in enumerate(model.stages):
            stage.register_forward_hook(capture(j))
        sum(wk * z.square().sum() for wk, z in zip(w, model(x))).backward()
        return grads

    g_plain, g_bal = stage_grads(plain), stage_grads(balanced)
    K = 4
    for j in range(K):  # IMTA: 1/(K-j) at head j, (K-j-1) onwards => stage j's gradient / (K - j)
        torch.testing.assert_close(g_bal[j], g_plain[j] / (K - j))


@pytest.mark.parametrize("name,shape", [("toy_mlp", (4, 2)), ("resnet18_exits", (2, 3, 32, 32))])
def test_gradient_equilibrium_gives_each_exits_gradient_at_the_input_one_kth(name, shape):
    """IMTA's factors telescope: exit k's gradient reaches the input through 1/(K-k) at its head and
    (K-j-1)/(K-j) at every earlier exit j, so 1/K of what it is without the rule, for every exit and network
    (a torchvision backbone passes an exit's feature on twice: both copies are scaled). Not MSDNet: as in IMTA's
    code, only the coarsest scale (its heads' input) is scaled, and the finer scales carry gradient on unscaled.
    Tolerance: float32 rounding of the multiplications."""
    options = dict(num_exits=4) if name == "toy_mlp" else {}
    torch.manual_seed(0)
    plain = models.build(name, 3, **options)
    balanced = models.build(name, 3, gradient_equilibrium=True, **options)
    balanced.load_state_dict(plain.state_dict())
    x = torch.randn(shape)
    K = plain.num_exits
    for k in range(K):
        grads = []
        for model in (plain, balanced):
            xi = x.clone().requires_grad_()
            model(xi)[k].square().sum().backward()
            grads.append(xi.grad)
        torch.testing.assert_close(grads[1], grads[0] / K, rtol=1e-4, atol=1e-6 * grads[0].abs().max().item())


def test_bad_input_messages():
    with pytest.raises(ValueError, match="valid names: .*msdnet_cifar_anytime"):
        models.build("msdnet_cifar", 100)
    model = models.build("msdnet_cifar_anytime", 100)
    with pytest.raises(ValueError, match=r"32x32"):
        model(torch.randn(1, 3, 64, 64))
    import torchvision
    for bad, shown in ((dict(n_blocks=0), "{'n_blocks': 0}"), (dict(step=0), "{'step': 0}"),
                       (dict(growth=0), "{'growth': 0}")):
        with pytest.raises(ValueError, match=f"MSDNet needs n_blocks, .* >= 1, got {re.escape(shown)}"):
            models.build("msdnet_cifar_anytime", 10, **bad)
    # half of a coarser scale's new channels come from the finer scale: an odd count would lose one there
    with pytest.raises(ValueError, match=r"growth x gr_factor\[s\] must be even .* growth 3 and gr_factor \[1, 3, 3\] "
                                         r"at scale 1: choose an even growth"):
        models.build("msdnet_cifar_anytime", 10, growth=3, gr_factor=(1, 3, 3), bn_factor=(1, 3, 3))
    odd_but_fine = models.build("msdnet_cifar_anytime", 10, growth=3, gr_factor=(1, 2, 4), bn_factor=(1, 2, 4))
    assert len(odd_but_fine(torch.randn(2, 3, 32, 32))) == odd_but_fine.num_exits  # odd only at scale 0: it runs
    with pytest.raises(ValueError, match="available nodes: .*layer1.0.conv1"):
        models.BackboneExits(torchvision.models.resnet18(), ["layer9"], 10)
    out = subprocess.run([sys.executable, "-m", "hdkdlib", "info", "nope"], capture_output=True, text=True)
    assert out.returncode != 0 and "valid names" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "hdkdlib", "info", "toy_mlp", "--num-classes", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--num-classes must be >= 1, got 0" in bad.stderr
    # --help is a question, not a mistake: the usage on stdout and exit 0; no command at all is one (exit 2)
    asked = subprocess.run([sys.executable, "-m", "hdkdlib", "--help"], capture_output=True, text=True)
    assert asked.returncode == 0 and "python -m hdkdlib info NAME" in asked.stdout and not asked.stderr
    bare = subprocess.run([sys.executable, "-m", "hdkdlib"], capture_output=True, text=True)
    assert bare.returncode == 2 and "python -m hdkdlib info NAME" in bare.stderr


def test_input_sizes_are_checked_at_every_entry_point():
    from hdkdlib import evaluation
    with pytest.raises(ValueError, match=r"takes images of 17-48 px \(input_size\), got 224.*msdnet_imagenet"):
        models.build("msdnet_cifar_anytime", 10, input_size=224)
    assert models.build("msdnet_cifar_anytime", 10, input_size=48).input_size == 48  # inside the range: built
    model = models.build("msdnet_cifar_budget", 10).eval()
    small = torch.randn(2, 3, 28, 28)
    for call in (lambda: model(small), lambda: model.run_exit(0, small),
                 lambda: evaluation.early_exit_predict(model, small, [0.5] * 5)):
        with pytest.raises(ValueError, match=r"takes images shaped \[N, 3, 32, 32\], got \[2, 3, 28, 28\]"):
            call()


def test_backbone_exit_nodes_are_checked():
    import torchvision
    net = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="exit_nodes names layer1 more than once"):
        models.BackboneExits(net, ["layer1", "layer2", "layer1"], 10)
    with pytest.raises(ValueError, match=r"got the string 'layer1': write exit_nodes=\['layer1'\]"):
        models.BackboneExits(net, "layer1", 10)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nodes'; did you mean exit_nodes=?"):
        models.build("resnet18_exits", 10, nodes=["layer1"])
