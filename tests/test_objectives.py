import math

import pytest
import torch
import torch.nn.functional as F

from hdkdlib import models, objectives as O


def _logits(K=4, N=6, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, C, generator=g, dtype=torch.float64).requires_grad_() for _ in range(K)]


def test_registry_and_term_counts():
    assert set(O.names()) == {"ce", "dbt", "imta_kd", "dkd", "hmsdnet", "hdbt", "hdkd"}
    K = 5
    counts = {n: len(O.build(n, K).term_names) for n in O.names()}
    assert counts == {"ce": K, "hmsdnet": K, "dbt": 2 * K - 1, "hdbt": 2 * K - 1, "imta_kd": 2 * K - 1,
                      "dkd": K + K * (K - 1) // 2, "hdkd": K + K * (K - 1) // 2}
    with pytest.raises(ValueError, match="valid names: ce, dbt"):
        O.build("hdkdd", 3)


def test_parameters_are_exactly_the_learned_weights():
    for name in O.names():
        obj = O.build(name, 4)
        params = list(obj.parameters())
        if name in O.LEARNED:
            assert len(params) == 1 and params[0] is obj.gamma and params[0].numel() == len(obj.term_names)
            assert torch.all(obj.weights() > 0)
        else:
            assert params == []


def test_ce_sum_is_sum_of_cross_entropies():
    z, y = _logits(), torch.tensor([0, 1, 2, 3, 4, 0])
    expected = sum(F.cross_entropy(zi, y) for zi in z)
    torch.testing.assert_close(O.build("ce", 4)(z, y), expected)


def test_kd_is_zero_when_student_equals_teacher():
    z = _logits(K=1)[0]
    same = [z, z.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()]
    kd = O.dense_kd_terms(same, T=3.0)
    assert torch.allclose(kd, torch.zeros(3, dtype=kd.dtype), atol=1e-12)


def test_no_gradient_reaches_the_teacher_through_kd():
    student, teacher = _logits(K=2)
    O.kd_kl(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0
    z = _logits(K=3)
    kd = O.dense_kd_terms(z, T=2.0)
    kd[O.dense_pairs(3).index((0, 2))].backward()  # student 1, teacher 3
    no_grad = [t.grad is None or bool(torch.all(t.grad == 0)) for t in z]
    assert no_grad == [False, True, True]  # only the student moves


def test_dense_kd_vectorised_equals_pairwise_loop_and_hand_kl():
    z = _logits(K=4)
    kd = O.dense_kd_terms(z, T=3.0)
    loop = torch.stack([O.kd_kl(z[i], z[j], 3.0) for i, j in O.dense_pairs(4)])
    torch.testing.assert_close(kd, loop)
    # KL by hand for one pair, one class-sum per sample, batch mean, times T^2
    i, j, T = 0, 3, 3.0
    p = torch.softmax(z[j].detach() / T, 1)
    q = torch.softmax(z[i].detach() / T, 1)
    hand = T * T * sum(sum(p[n, c] * math.log(p[n, c] / q[n, c]) for c in range(5)) for n in range(6)) / 6
    assert kd[O.dense_pairs(4).index((i, j))].item() == pytest.approx(float(hand), rel=1e-10)


def test_dense_kd_terms_stay_float32_under_bf16_autocast():
    """A term is the difference of two sums of about log C: under autocast the einsum would run in bf16 and leave
    terms of about 0.1 some 10% off (100 classes). Computed in float32, they agree with the float64 terms to
    float32 rounding of the inputs (bf16 logits, as an autocast forward gives, are the same numbers upcast)."""
    g = torch.Generator().manual_seed(0)
    base = 2 * torch.randn(64, 100, generator=g)
    z = [(base + 0.3 * torch.randn(64, 100, generator=g)).bfloat16() for _ in range(7)]
    reference = O.dense_kd_terms([t.double() for t in z], 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kd = O.dense_kd_terms(z, 1.0)
    assert kd.dtype == torch.float32
    torch.testing.assert_close(kd.double(), reference, rtol=1e-4, atol=1e-5)


def test_dbt_matches_hand_computed_formula():
    # two exits, two classes, one sample: everything by hand with math.
    z1, z2 = [2.0, 0.0], [0.0, 1.0]
    y = 1
    C, T, K = 0.5, 1.0, 2

    def log_softmax(v, t=1.0):
        m = [a / t for a in v]
        s = math.log(sum(math.exp(a) for a in m))
        return [a - s for a in m]

    ce1, ce2 = -log_softmax(z1)[y], -log_softmax(z2)[y]
    p2 = [math.exp(a) for a in log_softmax(z2, T)]
    soft_ce = -sum(p * l for p, l in zip(p2, log_softmax(z1, T)))
    expected = (2 * 5 / K) * ((1 - C) * ce1 + C * T * T * soft_ce + (1 - C) * ce2)
    obj = O.build("dbt", 2).double()
    logits = [torch.tensor([z1], dtype=torch.float64), torch.tensor([z2], dtype=torch.float64)]
    assert obj(logits, torch.tensor([y])).item() == pytest.approx(expected, rel=1e-12)


def test_dbt_temperature_annealing_rule():
    obj = O.build("dbt", 2)
    confident = [torch.zeros(4, 3), torch.tensor([[5.0, 0, 0]] * 4)]  # last exit's max-prob 0.987 at T=1
    unsure = [torch.zeros(4, 3), torch.zeros(4, 3)]                   # max-prob 1/3
    obj.after_step(unsure)
    assert obj.temperature.item() == 1.0
    obj.after_step(confident)
    assert obj.temperature.item() == pytest.approx(1.05)
    obj.after_step(confident)
    assert obj.temperature.item() == pytest.approx(1.05 ** 2)
    # at large T the teacher's softened confidence drops to <= 0.5 and T stops growing
    for _ in range(200):
        obj.after_step(confident)
    T = obj.temperature.item()
    p = torch.softmax(torch.tensor([5.0, 0, 0]) / T, 0).max().item()
    assert p <= 0.5 < torch.softmax(torch.tensor([5.0, 0, 0]) / (T / 1.05), 0).max().item()
    assert "temperature" in obj.state_dict()  # checkpointed with the run


def test_imta_kd_weights_and_kl_form():
    g, T = 0.9, 3.0
    obj = O.build("imta_kd", 3, gamma=g, temperature=T).double()
    z, y = _logits(K=3), torch.tensor([0, 1, 2, 3, 4, 0])
    expected = ((1 - g) * F.cross_entropy(z[0], y) + g * O.kd_kl(z[0], z[2], T)
                + (1 - g) * F.cross_entropy(z[1], y) + g * O.kd_kl(z[1], z[2], T) + F.cross_entropy(z[2], y))
    torch.testing.assert_close(obj(z, y), expected)


def test_learned_weight_initialisations():
    K = 4
    n_kd = K * (K - 1) // 2
    ds = O.build("hdkd", K, init="ds").weights()
    assert torch.allclose(ds[:K], torch.ones(K), atol=1e-2) and torch.all(ds[K:] < 2e-3)
    dbt = O.build("hdkd", K, init="dbt").named_weights()
    assert dbt["ce1"] == pytest.approx(0.5, rel=1e-2) and dbt["kd1<-4"] == pytest.approx(0.5, rel=1e-2)
    assert dbt["kd1<-2"] < 2e-3
    uni = O.build("hdkd", K, init="uniform", weight_map="softplus").weights()
    torch.testing.assert_close(uni, torch.ones(K + n_kd))
    r1, r2 = (O.build("hdkd", K, init="random", seed=s).weights() for s in (1, 2))
    assert r1.sum().item() == pytest.approx(K + n_kd, rel=1e-5) and not torch.allclose(r1, r2)
    with pytest.raises(ValueError, match="valid: dbt, ds, uniform, random"):
        O.build("hdkd", K, init="zeros")


def test_softplus_total_keeps_the_initial_total_and_round_trips():
    obj = O.build("hdkd", 4, weight_map="softplus_total")  # dbt init: CE 0.5, KD from the last 0.5, others 1e-3
    start = obj.weights().detach().clone()
    assert float(start.sum()) == pytest.approx(4 * 0.5 + 3 * 0.5 + 3 * 1e-3, rel=1e-6)
    torch.testing.assert_close(start, O.build("hdkd", 4, weight_map="softplus").weights().detach())
    with torch.no_grad():
        obj.gamma.add_(torch.linspace(-3, 3, len(obj.gamma)))  # any parameters: the same total, shares moved
    assert float(obj.weights().detach().sum()) == pytest.approx(float(start.sum()), rel=1e-6)
    assert not torch.allclose(obj.weights(), start)
    obj.set_weights([1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])  # a new total, kept from then on
    torch.testing.assert_close(obj.weights(), torch.tensor([1.0, 2, 3, 4, .5, .5, .5, .5, .5, .5]))


def test_weights_stay_positive_under_any_parameters():
    for wmap in O.WEIGHT_MAPS:
        obj = O.build("hdkd", 3, weight_map=wmap)
        with torch.no_grad():
            obj.gamma.copy_(torch.tensor([-50.0, 50, 0, -20, 3, 1]))
        w = obj.weights()
        assert torch.all(w >= 0) and torch.all(torch.isfinite(w))


def test_bad_inputs_raise_clear_errors():
    obj = O.build("hdkd", 3)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="built for 3 exits but got 2"):
        obj([torch.randn(2, 4)] * 2, y)
    with pytest.raises(ValueError, match="empty batch"):
        obj([torch.randn(0, 4)] * 3, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\]"):
        obj([torch.randn(2, 4)] * 3, torch.tensor([0, 7]))
    bad = [torch.randn(2, 4), torch.full((2, 4), float("nan")), torch.randn(2, 4)]
    with pytest.raises(FloatingPointError, match="non-finite terms: .*ce2"):
        obj(bad, y)


def test_balanced_validation_loss_by_hand():
    z, y = _logits(K=2), torch.tensor([0, 1, 2, 3, 4, 0])
    ce = torch.stack([F.cross_entropy(zi, y) for zi in z]).detach()
    val = O.ValidationLoss(2, kind="balanced", alpha=0.5).double()
    val.update(ce * 2)  # the running expectation is twice the current loss
    expected = 0.5 * ce.sum() + 0.5 * sum(math.log1p(math.exp(c / (2 * c) - 1)) for c in ce.tolist())
    assert val(z, y).item() == pytest.approx(expected.item(), rel=1e-10)
    val.update(ce)
    torch.testing.assert_close(val.ema, 0.9 * 2 * ce + 0.1 * ce)
    assert O.ValidationLoss(2)(z, y).item() == pytest.approx(ce.sum().item())


def test_training_with_dense_kd_lowers_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 2)
    y = (x[:, 0] * x[:, 1] > 0).long()  # XOR-like: needs depth
    model = models.build("toy_mlp", 2, num_exits=3, width=16)
    obj = O.build("dkd", 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first = O.ce_terms(model(x), y).sum().item()
    for _ in range(150):
        opt.zero_grad()
        obj(model(x), y).backward()
        opt.step()
    # The KD terms themselves grow as the teachers sharpen (they start near 0 with all exits
    # uniform), so the classification part is what must fall.
    assert O.ce_terms(model(x), y).sum().item() < 0.5 * first
    assert (model(x)[-1].argmax(1) == y).float().mean() > 0.9


def test_what_the_training_log_records_besides_the_weights():
    """DBT's and HDBT's annealed temperature goes into each epoch's metrics line; fixed temperatures do not."""
    dbt = O.build("dbt", 3)
    assert dbt.state_for_log() == {"temperature": 1.0}
    confident = [torch.tensor([[20.0, 0.0]]).repeat(4, 1)] * 3
    dbt.after_step(confident)
    assert dbt.state_for_log()["temperature"] == pytest.approx(1.05)
    assert O.build("hdbt", 3).state_for_log() == {"temperature": 1.0}
    assert O.build("ce", 3).state_for_log() == {} and O.build("dkd", 3).state_for_log() == {}


def test_loss_scale_multiplies_the_whole_loss_and_lines_hdbt_up_with_dbt():
    """loss_scale is one factor on the whole loss: with DBT's 2*5/K, HDBT at its start computes DBT's loss exactly
    (same terms, weights and temperature), so the scale is not a hidden difference between them; for hdkd it
    multiplies the default loss; bad values and methods without a scale are refused in one line."""
    from hdkdlib.config import TrainConfig
    K, torch_gen = 4, torch.Generator().manual_seed(3)
    logits = [torch.randn(8, 5, generator=torch_gen) for _ in range(K)]
    y = torch.randint(0, 5, (8,), generator=torch_gen)

    def loss(method, **cfg):
        return O.build(method, K, **TrainConfig(method=method, **cfg).validate().objective_options())(logits, y)
    assert torch.allclose(loss("hdbt", loss_scale=2 * 5 / K), loss("dbt"), rtol=1e-6)
    assert not torch.allclose(loss("hdbt"), loss("dbt"), rtol=1e-3)  # at the learned methods' own scale, 1
    assert torch.allclose(loss("hdkd", loss_scale=3.0), 3 * loss("hdkd"), rtol=1e-6)
    assert torch.allclose(loss("dbt", loss_scale=1.0) * 2 * 5 / K, loss("dbt"), rtol=1e-6)
    with pytest.raises(ValueError, match=r"loss_scale must lie in \[0.0001, 10000\] .*or be 0 \(the objective's own\), "
                                         r"got -1"):
        TrainConfig(method="hdkd", loss_scale=-1.0).validate()
    with pytest.raises(ValueError, match="loss_scale applies to dbt and the learned-weight methods .* not ce"):
        TrainConfig(method="ce", loss_scale=2.0).validate()
