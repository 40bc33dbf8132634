"""Exits on one small member of every torchvision classification family (issue 26): heads that match the
layout of each exit node's output (NCHW maps, NHWC maps, token sequences), the exit contract, real early exit,
and per-exit costs that add up to the plain backbone's own count. Small inputs and narrow configurations keep
each case to a second or two on a CPU."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import convnext, densenet, maxvit, regnet, resnet, swin_transformer, vision_transformer

from hdkdlib import cost, evaluation, models
from hdkdlib.models.backbone import detect_layout

CLASSES = 7


def _family(name):
    """(backbone, exit nodes, input size, expected layouts) of a small member of the family."""
    if name == "resnet":
        return torchvision.models.resnet18(num_classes=CLASSES), ["layer1", "layer2", "layer3", "layer4"], 32, ["nchw"] * 4
    if name == "resnext":
        net = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=CLASSES)
        return net, ["layer1", "layer3", "layer4"], 32, ["nchw"] * 3
    if name == "densenet":
        net = densenet.DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, bn_size=2, num_classes=CLASSES)
        return net, ["features.denseblock1", "features.denseblock2", "features.norm5"], 32, ["nchw"] * 3
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=CLASSES), ["features.3", "features.6", "features.18"], 32, ["nchw"] * 3
    if name == "mobilenet_v3":
        return torchvision.models.mobilenet_v3_small(num_classes=CLASSES), ["features.3", "features.8", "features.12"], 32, ["nchw"] * 3
    if name == "efficientnet":
        return torchvision.models.efficientnet_b0(num_classes=CLASSES), ["features.2", "features.4", "features.8"], 32, ["nchw"] * 3
    if name == "regnet":
        net = torchvision.models.regnet_x_400mf(num_classes=CLASSES)
        return net, ["trunk_output.block1", "trunk_output.block3", "trunk_output.block4"], 32, ["nchw"] * 3
    if name == "convnext":
        net = convnext.ConvNeXt([convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, 64, 1),
                                 convnext.CNBlockConfig(64, None, 1)], num_classes=CLASSES)
        return net, ["features.1", "features.3", "features.5"], 32, ["nchw"] * 3
    if name == "vit":
        net = vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2,
                                                   hidden_dim=32, mlp_dim=64, num_classes=CLASSES)
        nodes = [f"encoder.layers.encoder_layer_{i}" for i in (0, 1, 3)]
        return net, nodes, 32, ["tokens_cls"] * 3
    if name == "swin":
        net = swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1],
                                               num_heads=[1, 1, 2, 2], window_size=[2, 2], num_classes=CLASSES)
        return net, ["features.1", "features.3", "features.5", "features.7"], 64, ["nhwc"] * 4
    if name == "maxvit":
        net = maxvit.MaxVit(input_size=(64, 64), stem_channels=8, partition_size=2, block_channels=[8, 16],
                            block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=CLASSES)
        return net, ["blocks.0", "blocks.1"], 64, ["nchw"] * 2
    raise KeyError(name)


FAMILIES = ["resnet", "resnext", "densenet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "regnet", "convnext",
            "vit", "swin", "maxvit"]


def _built(name):
    torch.manual_seed(0)
    backbone, nodes, size, layouts = _family(name)
    model = models.BackboneExits(backbone, nodes, CLASSES, input_shape=(3, size, size)).eval()
    return backbone.eval(), model, size, layouts


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gets_heads_that_fit_its_features(family):
    backbone, model, size, layouts = _built(family)
    assert model.layouts == layouts
    x = torch.randn(6, 3, size, size)
    with torch.no_grad():
        full = model(x)
        stepwise = list(model.exits(x))
    assert len(full) == len(stepwise) == model.num_exits
    for a, b in zip(full, stepwise):
        assert a.shape == (6, CLASSES) and torch.equal(a, b)
    # every head's linear layer reads the feature dimension (channels or token width), nothing else
    with torch.no_grad():
        features = torchvision.models.feature_extraction.create_feature_extractor(backbone, model.exit_nodes)(x[:1])
    for node, layout, head in zip(model.exit_nodes, layouts, model.heads):
        linear = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
        shape = features[node].shape
        assert linear.in_features == shape[{"nchw": 1, "nhwc": 3, "tokens_cls": 2}[layout]]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exits_early_as_simulated_and_costs_what_the_backbone_costs(family):
    backbone, model, size, _ = _built(family)
    x = torch.randn(12, 3, size, size)
    probs, _ = evaluation.predict(model, [(x, torch.zeros(12, dtype=torch.long))])
    with torch.no_grad():  # thresholds from other images: a median of these very confidences is one sample's own,
        # which another batch size can round to either side (seen on AVX-512 machines)
        conf = torch.stack([torch.softmax(z, 1).max(1).values for z in model(torch.randn(12, 3, size, size))])
    thresholds = [conf[k].median().item() for k in range(model.num_exits - 1)] + [0.0]
    simulated = evaluation.apply_thresholds(probs, torch.zeros(12, dtype=torch.long), thresholds,
                                            [1.0] * model.num_exits)
    real = evaluation.early_exit_predict(model, x, thresholds, batch_size=5)
    assert torch.equal(real["exit_index"], simulated["exit_index"])
    assert torch.equal(real["predictions"], probs.argmax(2).gather(0, real["exit_index"].view(1, -1)).squeeze(0))
    rows = cost.per_exit(model, (3, size, size))  # the default for backbones: every multiply-accumulate
    flops = [r["flops"] for r in rows]
    assert all(a < b for a, b in zip(flops, flops[1:]))
    # the plain backbone up to the last exit node, counted by torch's own flop counter (its classifier, which a
    # network with exits does not run, left out: mobilenet_v3's is a 1024-wide hidden layer)
    trunk = torchvision.models.feature_extraction.create_feature_extractor(backbone, model.exit_nodes[-1:])
    with torch.no_grad(), cost.flop_counter() as counter:
        trunk(torch.zeros(1, 3, size, size))
    plain = counter.get_total_flops() / 2
    assert plain <= flops[-1] <= 1.03 * plain, (flops[-1], plain)  # our heads add a few percent at most
    # parameters by ownership: attention's in_proj, ViT's class token and position embedding, Swin's relative-
    # position tables are read without calling a module, so forward hooks would miss them
    counts = [r["params"] for r in rows]
    assert all(a < b for a, b in zip(counts, counts[1:])) and counts[-1] == sum(p.numel() for p in model.parameters())


def test_swin_stages_are_channels_last_and_priced_as_such():
    """Today's bug: Swin's [N, H, W, C] stages were taken as [N, C, H, W] (a head on H channels pooling over W
    and C) and its first exits priced at a sliver of their cost."""
    backbone, model, size, _ = _built("swin")
    assert [h[-1][-1].in_features for h in model.heads] == [16, 32, 64, 128]
    first = cost.per_exit(model, (3, size, size))[0]["flops"]
    with torch.no_grad(), cost.flop_counter() as counter:
        torchvision.models.feature_extraction.create_feature_extractor(backbone, ["features.1"])(
            torch.zeros(1, 3, size, size))
    assert first >= counter.get_total_flops() / 2  # at least the backbone up to that stage


def test_layouts_that_do_not_fit_are_caught_with_the_node_named():
    backbone, nodes, size, _ = _family("convnext")
    with pytest.raises(ValueError, match=r"exit node 'features.1': layout tokens_cls needs a 3-d output, got \[1, 16"):
        models.BackboneExits(backbone, nodes, CLASSES, input_shape=(3, size, size), layout="tokens_cls")
    with pytest.raises(ValueError, match=r"unknown layout 'nwhc' for exit node 'features.1'; valid: nchw, nhwc"):
        models.BackboneExits(backbone, nodes, CLASSES, input_shape=(3, size, size), layout="nwhc")
    with pytest.raises(ValueError, match="layout gives 2 layouts for 3 exit nodes"):
        models.BackboneExits(backbone, nodes, CLASSES, input_shape=(3, size, size), layout=["nchw", "nchw"])
    with pytest.raises(ValueError, match=r"exit node 'n' outputs shape \[1, 8, 8, 8\], which could be \[N, C, H, W\] "
                                         r"or \[N, H, W, C\] for input \[3, 32, 32\]: give layout="):
        detect_layout("n", torch.zeros(1, 8, 8, 8), (3, 32, 32))
    with pytest.raises(ValueError, match=r"exit node 'n' outputs a tuple, not a feature map or token sequence"):
        detect_layout("n", (torch.zeros(1, 3),), (3, 32, 32))
    with pytest.raises(ValueError, match=r"exit node 'n' outputs a 1-d tensor \[5\], not a feature map"):
        detect_layout("n", torch.zeros(5), (3, 32, 32))
    assert detect_layout("n", torch.zeros(1, 24, 8, 4), (3, 64, 32)) == "nchw"  # non-square input
    assert detect_layout("n", torch.zeros(1, 8, 4, 24), (3, 64, 32)) == "nhwc"
    # channels equal to a spatial size: the output for an input twice the size tells them apart
    assert detect_layout("n", torch.zeros(1, 8, 8, 8), (3, 32, 32), lambda: torch.zeros(1, 8, 16, 16)) == "nchw"
    assert detect_layout("n", torch.zeros(1, 8, 8, 8), (3, 32, 32), lambda: torch.zeros(1, 16, 16, 8)) == "nhwc"
    assert detect_layout("n", torch.zeros(1, 16, 32), (3, 32, 32)) == "tokens_mean"


@pytest.mark.parametrize("grad", [True, False])
def test_attention_is_priced_on_a_cpu(grad):
    """One ViT encoder block, hand-counted: q, k, v and output projections 4 L E^2, the MLP 2 L E M, and both
    attention products 2 L^2 E. torch's counter alone prices none of the attention on a CPU (and, under no_grad,
    where nn.MultiheadAttention takes its fused fast path, not even the projections)."""
    L, E, M = 17, 32, 64
    block = vision_transformer.EncoderBlock(num_heads=2, hidden_dim=E, mlp_dim=M, dropout=0.0,
                                            attention_dropout=0.0).eval()
    with torch.set_grad_enabled(grad), cost.flop_counter() as counter:
        block(torch.zeros(1, L, E))
    assert counter.get_total_flops() / 2 == 4 * L * E * E + 2 * L * E * M + 2 * L * L * E
