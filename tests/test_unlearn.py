"""unlearn / select_parameters against dense float64 formulas on a tiny model.

Oracles: torch.func.hessian / torch.func.grad / vmap on a flat float64 parameter vector (independent of the package's
ParamSpace-based gradient and HVP code), torch.linalg.solve for (H_SS + λI)⁻¹G_S, torch.topk for the rankings.
Tolerances: float64 throughout; CG is run to a relative residual of 1e-13 with enough iterations for exact
convergence in exact arithmetic (≤ numel), so 1e-9 relative agreement leaves a wide margin over rounding.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, vmap

import sapsel_kernels as sk
from sapsel_kernels.space import ParamSpace
from sapsel_kernels.unlearn import METHODS, STRATEGIES, cg_solve, last_layer_indices, parameter_scores

D_IN, H, C = 3, 4, 3


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(D_IN, H)
        self.fc = torch.nn.Linear(H, C)

    def forward(self, x):
        return self.fc(torch.tanh(self.l1(x)))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.randn(20, D_IN, dtype=torch.float64)
    y = torch.randint(0, C, (20,))
    zi = torch.arange(5)
    y_bad = (y[zi] + 1) % C
    affected = (x[zi], y_bad)
    corrected = (x[zi], y[zi])
    train = (x, y)
    return model, affected, corrected, train


def _flat_fn(model):
    """flat float64 θ -> summed CE over a batch, through torch.func (independent of ParamSpace)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]

    def unflat(theta):
        out, off = {}, 0
        for n, s, k in zip(names, shapes, numels):
            out[n] = theta[off:off + k].view(s)
            off += k
        return out

    def summed(theta, x, y):
        return F.cross_entropy(functional_call(model, unflat(theta), (x,)), y, reduction="sum")

    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return theta0, summed


def _theta(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _G(model, affected, corrected):
    theta0, summed = _flat_fn(model)
    return grad(summed)(theta0, *corrected) - grad(summed)(theta0, *affected)


def _H_sum(model, data, scale=1.0):
    theta0, summed = _flat_fn(model)
    return scale * hessian(summed)(theta0, *data)


# ------------------------------------------------------------------------------------------- update rules
def test_first_order_is_minus_tau_G_on_S(setup):
    model, aff, cor, _ = setup
    th0 = _theta(model)
    G = _G(model, aff, cor)
    idx = torch.tensor([0, 3, 7, 20, 30])
    rep = sk.unlearn(model, loss_fn, aff, cor, idx, method="first_order", tau=0.37)
    d = _theta(model) - th0
    expect = torch.zeros_like(d)
    expect[idx] = -0.37 * G[idx]
    torch.testing.assert_close(d, expect, rtol=1e-12, atol=1e-14)
    assert rep.k == 5 and rep.n_changed == 5 and rep.n_gradients == 10
    assert rep.delta_norm == pytest.approx(float(d.norm()), rel=1e-12)


def test_summed_gradient_scales_by_batch_size(setup):
    # G is a sum over points: splitting Z and Z̃ into uneven batches gives the same update
    model, aff, cor, _ = setup
    m2 = Tiny().double()
    m2.load_state_dict(model.state_dict())
    split = lambda b: [(b[0][:2], b[1][:2]), (b[0][2:], b[1][2:])]  # noqa: E731
    sk.unlearn(model, loss_fn, aff, cor, None, method="first_order", tau=0.1)
    sk.unlearn(m2, loss_fn, split(aff), split(cor), None, method="first_order", tau=0.1)
    torch.testing.assert_close(_theta(model), _theta(m2), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("subset", [False, True])
def test_second_order_equals_dense_solve(setup, subset):
    model, aff, cor, train = setup
    th0 = _theta(model)
    n = th0.numel()
    G = _G(model, aff, cor)
    Hs = _H_sum(model, train)
    lam = float(torch.linalg.eigvalsh(Hs).min().abs()) + 1.0  # (H + λI) positive definite: plain CG converges
    idx = torch.tensor([1, 2, 5, 8, 13, 21, 22, 27, 30]) if subset else torch.arange(n)
    rep = sk.unlearn(model, loss_fn, aff, cor, idx if subset else None, method="second_order", train_data=train,
                     damping=lam, cg_iters=4 * n, cg_tol=1e-13)
    A = Hs[idx][:, idx] + lam * torch.eye(idx.numel(), dtype=torch.float64)
    expect = torch.zeros(n, dtype=torch.float64)
    expect[idx] = -torch.linalg.solve(A, G[idx])
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-9, atol=1e-12)
    assert not rep.info["negative_curvature"] and rep.info["cg_residual"] <= 1e-13
    assert rep.n_hvps == rep.info["cg_iters"] * 20


def test_second_order_subsample_is_rescaled_to_n_train(setup):
    # Hessian on a subsample of m points represents the summed loss of n_train points: H = (n_train/m) H_sub
    model, aff, cor, train = setup
    th0 = _theta(model)
    sub = (train[0][:10], train[1][:10])
    G = _G(model, aff, cor)
    Hs = _H_sum(model, sub, scale=20 / 10)
    lam = float(torch.linalg.eigvalsh(Hs).min().abs()) + 2.0
    sk.unlearn(model, loss_fn, aff, cor, None, method="second_order", train_data=[sub], n_train=20, damping=lam,
               cg_iters=200, cg_tol=1e-13)
    expect = -torch.linalg.solve(Hs + lam * torch.eye(th0.numel(), dtype=torch.float64), G)
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-9, atol=1e-12)


def test_cg_stops_on_negative_curvature():
    A = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    x, info = cg_solve(lambda v: A @ v, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert info["negative_curvature"] and torch.equal(x, torch.zeros(2, dtype=torch.float64))
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    x, info = cg_solve(lambda v: A @ v, b, tol=1e-14)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-12, atol=1e-14)
    assert info["iters"] <= 2  # CG is exact in n steps


def test_diag_newton_divides_by_clipped_diagonal(setup):
    model, aff, cor, train = setup
    th0 = _theta(model)
    G = _G(model, aff, cor)
    d_mean = torch.diagonal(_H_sum(model, train)) / 20  # diag of the MEAN training loss
    d_mean[0] = -abs(float(d_mean[0]))  # a negative estimate must be clipped to 0
    idx = torch.arange(0, th0.numel(), 2)
    n_neg = int((d_mean[idx] < 0).sum())
    assert n_neg >= 1
    lam = 0.5
    rep = sk.unlearn(model, loss_fn, aff, cor, idx, method="diag_newton", train_data=train, diag=d_mean, damping=lam)
    expect = torch.zeros_like(th0)
    expect[idx] = -G[idx] / (20 * d_mean[idx].clamp_min(0) + lam)
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-12, atol=1e-14)
    assert rep.info["n_clipped_negative"] == n_neg


def test_gradient_ascent_one_step(setup):
    model, aff, cor, _ = setup
    th0, summed = _flat_fn(model)
    th0 = th0.clone()
    idx = torch.tensor([0, 4, 9, 15, 27])
    # mean losses: L(Z̃) − L(Z)
    g = (grad(summed)(th0, *cor) - grad(summed)(th0, *aff)) / 5
    sk.unlearn(model, loss_fn, aff, cor, idx, method="gradient_ascent", lr=0.3, steps=1)
    expect = torch.zeros_like(th0)
    expect[idx] = -0.3 * g[idx]
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-10, atol=1e-13)


def test_sam_finetune_one_step_matches_sam_formula(setup):
    model, aff, cor, _ = setup
    th0, summed = _flat_fn(model)
    th0 = th0.clone()
    idx = torch.tensor([1, 5, 6, 12, 19, 29])
    mask = torch.zeros_like(th0)
    mask[idx] = 1
    lr, rho = 0.2, 0.05
    gl = lambda t: grad(summed)(t, *cor) / 5  # noqa: E731  (mean loss on Z̃)
    g = gl(th0) * mask
    e = rho * g / g.norm()
    expect = -lr * gl(th0 + e) * mask
    rep = sk.unlearn(model, loss_fn, aff, cor, idx, method="sam_finetune", lr=lr, rho=rho, steps=1)
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-9, atol=1e-12)
    assert rep.n_gradients == 10 and rep.info["moved_outside_selection"] == 0


@pytest.mark.parametrize("method", METHODS)
def test_outside_selection_never_changes(setup, method):
    model, aff, cor, train = setup
    th0 = _theta(model)
    idx = torch.tensor([2, 3, 11, 25])
    kw = {"train_data": train, "damping": 5.0} if method in ("second_order", "diag_newton") else {}
    sk.unlearn(model, loss_fn, aff, cor, idx, method=method, steps=3, **kw)
    th = _theta(model)
    out = torch.ones_like(th, dtype=torch.bool)
    out[idx] = False
    assert torch.equal(th[out], th0[out])
    assert not torch.equal(th[idx], th0[idx])


@pytest.mark.parametrize("method", METHODS)
def test_nan_leaves_model_untouched_and_raises(setup, method):
    model, aff, cor, train = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = (cor[0].clone(), cor[1])
    bad[0][1, 0] = float("nan")
    kw = {"train_data": train, "damping": 5.0} if method in ("second_order", "diag_newton") else {}
    with pytest.raises(ValueError, match="NaN"):
        sk.unlearn(model, loss_fn, aff, bad, None, method=method, steps=2, **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        model.l1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sk.unlearn(model, loss_fn, aff, cor, None, method=method, steps=2, **kw)


def test_bad_inputs_raise_before_modifying(setup):
    model, aff, cor, _ = setup
    th0 = _theta(model)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        sk.unlearn(model, loss_fn, aff, cor, method="newton")
    with pytest.raises(ValueError, match="equal size"):
        sk.unlearn(model, loss_fn, aff, (cor[0][:3], cor[1][:3]))
    with pytest.raises(ValueError, match="out of range"):
        sk.unlearn(model, loss_fn, aff, cor, torch.tensor([0, 10_000]))
    with pytest.raises(ValueError, match="tau must be finite"):
        sk.unlearn(model, loss_fn, aff, cor, tau=float("nan"))
    with pytest.raises(ValueError, match="needs train_data"):
        sk.unlearn(model, loss_fn, aff, cor, method="second_order")
    other = sk.Selection.from_indices(torch.tensor([0, 1]), space=ParamSpace(torch.nn.Linear(3, 50)))
    with pytest.raises(ValueError):
        sk.unlearn(model, loss_fn, aff, cor, other)
    assert torch.equal(_theta(model), th0)


# ------------------------------------------------------------------------------------------- strategies
def _topk_set(scores, k, largest=True):
    v, i = torch.sort(scores, descending=largest, stable=True)
    assert v[k - 1] != v[k], "test data has a tie at the selection boundary"
    return set(i[:k].tolist())


def _exact_diag_mean(model, data):
    return torch.diagonal(_H_sum(model, data)) / data[0].shape[0]


@pytest.mark.parametrize("strategy,source,largest", [
    ("hessian", "train", True), ("hessian_smallest", "train", False),
    ("hessian_affected", "affected", True), ("hessian_corrected", "corrected", True)])
def test_hessian_strategies_pick_extreme_exact_diagonal(setup, strategy, source, largest):
    model, aff, cor, train = setup
    data = {"train": train, "affected": aff, "corrected": cor}[source]
    k = 6
    sel = sk.select_parameters(model, strategy, k, loss_fn=loss_fn, data=train, affected=aff, corrected=cor,
                               estimator="exact")
    oracle = _exact_diag_mean(model, data).float()
    assert set(sel.indices.tolist()) == _topk_set(oracle, k, largest)
    assert sel.k == k and sel.space_signature == ParamSpace(model).signature


def test_hutchinson_default_is_close_to_exact(setup):
    # the default estimator (Hutchinson, 32 probes) must rank by an estimate of the same diagonal: its scores agree
    # with the exact diagonal within 6 standard errors per coordinate
    model, aff, cor, train = setup
    scores, cost = parameter_scores(model, "hessian", loss_fn=loss_fn, data=train, n_probes=64)
    exact = _exact_diag_mean(model, train).float()
    est = sk.hessian_diag(model, loss_fn, train, n_probes=64)
    torch.testing.assert_close(scores, est.mean)
    z = (scores - exact).abs() / est.stderr.clamp_min(1e-12)
    assert float(z.max()) < 6.0
    assert cost["n_hvps"] == 64 * 20


def test_last_layer_strategy(setup):
    model, aff, cor, train = setup
    sp = ParamSpace(model)
    ll = last_layer_indices(sp)
    lo, hi = sp.range_of("fc.weight")[0], sp.range_of("fc.bias")[1]
    assert ll.tolist() == list(range(lo, hi))
    big = sk.select_parameters(model, "last_layer", 0.9, loss_fn=loss_fn, data=train)
    assert big.indices.tolist() == ll.tolist()  # budget above the layer size: the whole layer only
    k = 5
    small = sk.select_parameters(model, "last_layer", k, loss_fn=loss_fn, data=train, estimator="exact")
    d = _exact_diag_mean(model, train).float()[lo:hi]
    assert set(small.indices.tolist()) == {lo + i for i in _topk_set(d, k)}


def test_all_random_grad_abs_fisher(setup):
    model, aff, cor, train = setup
    n = ParamSpace(model).numel
    assert sk.select_parameters(model, "all", 0.1).indices.tolist() == list(range(n))
    r1 = sk.select_parameters(model, "random", 7, seed=3)
    r2 = sk.select_parameters(model, "random", 7, seed=3)
    r3 = sk.select_parameters(model, "random", 7, seed=4)
    assert torch.equal(r1.indices, r2.indices) and not torch.equal(r1.indices, r3.indices)
    assert r1.k == 7 and len(set(r1.indices.tolist())) == 7
    theta0, summed = _flat_fn(model)
    g = (grad(summed)(theta0, *aff) / 5).abs().float()
    ga = sk.select_parameters(model, "grad_abs", 6, loss_fn=loss_fn, affected=aff)
    assert set(ga.indices.tolist()) == _topk_set(g, 6)
    # fisher: mean squared per-point gradient on Z over the same on the training data
    per = vmap(grad(lambda t, x, y: summed(t, x[None], y[None])), in_dims=(None, 0, 0))
    fz = (per(theta0, *aff) ** 2).mean(0)
    fd = (per(theta0, *train) ** 2).mean(0)
    ratio = (fz / fd).float()
    fi = sk.select_parameters(model, "fisher", 6, loss_fn=loss_fn, affected=aff, data=train)
    assert set(fi.indices.tolist()) == _topk_set(ratio, 6)


def test_budget_and_strategy_errors(setup):
    model, aff, cor, train = setup
    n = ParamSpace(model).numel
    assert sk.select_parameters(model, "random", 0.1).k == round(0.1 * n)
    assert sk.select_parameters(model, "random", 1e-9).k == 1
    for bad in (0.0, 1.5, 0, n + 1):
        with pytest.raises(ValueError):
            sk.select_parameters(model, "random", bad)
    with pytest.raises(ValueError, match="unknown selection strategy"):
        sk.select_parameters(model, "magic", 3)
    with pytest.raises(ValueError, match="needs"):
        sk.select_parameters(model, "hessian", 3, loss_fn=loss_fn)
    assert set(STRATEGIES) >= {"hessian", "all", "last_layer", "random", "grad_abs", "fisher"}


# ------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(setup, method):
    # the same float32 model on CPU and CUDA, a Selection built on CPU (moved by unlearn/select as needed):
    # every rule gives the same update up to float32 reduction-order differences
    model, aff, cor, train = setup
    cpu = Tiny()
    cpu.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    gpu = Tiny().cuda()
    gpu.load_state_dict(cpu.state_dict())
    f32 = lambda b, dev: (b[0].float().to(dev), b[1].to(dev))  # noqa: E731
    idx = torch.tensor([1, 2, 5, 8, 13, 21, 22, 27, 30])
    d = torch.rand(ParamSpace(cpu).numel)
    outs = []
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        kw = {"train_data": f32(train, dev), "damping": 5.0, "diag": d.to(dev)} if method in (
            "second_order", "diag_newton") else {}
        if method == "second_order":
            kw.pop("diag")
        sel = sk.Selection.from_indices(idx.to(dev), space=ParamSpace(m))
        sk.unlearn(m, loss_fn, f32(aff, dev), f32(cor, dev), sel, method=method, steps=3, **kw)
        outs.append(_theta(m).cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
