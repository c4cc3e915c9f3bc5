"""unlearn and its update rules against dense float64 formulas on a tiny model, plus the all-or-nothing contract.

Oracles: torch.func.hessian / torch.func.grad on a flat float64 parameter vector (independent of the package's
ParamSpace-based gradient and HVP code), torch.linalg.solve for (H_SS + λI)⁻¹G_S, the SAM formula written out.
Tolerances: float64 throughout; CG is run to a relative residual of 1e-13 with enough iterations for exact
convergence in exact arithmetic (≤ numel), so 1e-9 relative agreement leaves a wide margin over rounding.
"Untouched" is checked bit for bit (torch.equal) on every parameter and buffer.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian

import sapsel_kernels as sk
from sapsel_kernels import hessian as hessian_mod
from sapsel_kernels.rules import (METHODS, DiagNewton, FirstOrder, GradientAscent, SAMFinetune, SecondOrder,
                                  as_method)
from sapsel_kernels.solver import cg_solve
from sapsel_kernels.space import ParamSpace

from tests.helpers.models import C, D_IN, H, Tiny, loss_fn

# the plain Newton step (no trust region, no ratio test): what the dense-solve oracles compute
PLAIN = {"trust_radius": None, "min_ratio": None}


class WithScalars(torch.nn.Module):
    """Two 0-dim parameters (a temperature and a shift) around the tiny MLP."""

    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(D_IN, H)
        self.t = torch.nn.Parameter(torch.tensor(1.3))
        self.fc = torch.nn.Linear(H, C)
        self.s = torch.nn.Parameter(torch.tensor(-0.2))

    def forward(self, x):
        return self.fc(torch.tanh(self.t * self.l1(x) + self.s))


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(D_IN, H)
        self.bn = torch.nn.BatchNorm1d(H)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(H, C)

    def forward(self, x):
        return self.fc(self.drop(torch.tanh(self.bn(self.l1(x)))))


def _data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, dtype=torch.float64, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    zi = torch.arange(5)
    return (x[zi], (y[zi] + 1) % C), (x[zi], y[zi]), (x, y)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Tiny().double()
    aff, cor, train = _data()
    return model, aff, cor, train


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


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore(model, state):
    model.load_state_dict(state)


def _assert_state(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _G(model, affected, corrected):
    theta0, summed = _flat_fn(model)
    return grad(summed)(theta0, *corrected) - grad(summed)(theta0, *affected)


def _H_sum(model, data, scale=1.0):
    theta0, summed = _flat_fn(model)
    return scale * hessian(summed)(theta0, *data)


def _config(method, **kw):
    """A config of every method that changes S on the tiny model in few steps."""
    base = {"second_order": {"damping": 5.0}, "diag_newton": {"damping": 5.0}, "sam_finetune": {"steps": 3},
            "gradient_ascent": {"steps": 3}}.get(method, {})
    return as_method(method, **{**base, **kw})


def _train(method, train):
    """unlearn's train_data for the methods that read it (the others accept it unread: see
    test_train_arguments_are_context_every_method_accepts)."""
    return {"train_data": train} if method in ("second_order", "diag_newton") else {}


# ------------------------------------------------------------------------------------------- update rules
def test_first_order_is_minus_tau_G_on_S(setup):
    model, aff, cor, _ = setup
    th0 = _theta(model)
    G = _G(model, aff, cor)
    idx = torch.tensor([0, 3, 7, 20, 30])
    rep = sk.unlearn(model, loss_fn, aff, cor, idx, FirstOrder(tau=0.37))
    d = _theta(model) - th0
    expect = torch.zeros_like(d)
    expect[idx] = -0.37 * G[idx]
    torch.testing.assert_close(d, expect, rtol=1e-12, atol=1e-14)
    assert rep.method == "first_order" and rep.k == 5 and rep.numel == th0.numel()
    assert rep.n_changed == 5 and rep.n_gradients == 10 and rep.n_passes == 2
    assert rep.delta_norm == pytest.approx(float(d.norm()), rel=1e-12)
    assert rep.info["tau"] == 0.37 and rep.info["g_norm"] == pytest.approx(float(G[idx].norm()), rel=1e-12)


def test_summed_gradient_scales_by_batch_size(setup):
    # G is a sum over points: splitting Z and Z̃ into uneven batches gives the same update
    model, aff, cor, _ = setup
    m2 = Tiny().double()
    m2.load_state_dict(model.state_dict())
    split = lambda b: [(b[0][:2], b[1][:2]), (b[0][2:], b[1][2:])]  # noqa: E731
    sk.unlearn(model, loss_fn, aff, cor, None, FirstOrder(tau=0.1))
    sk.unlearn(m2, loss_fn, split(aff), split(cor), None, FirstOrder(tau=0.1))
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
    rep = sk.unlearn(model, loss_fn, aff, cor, idx if subset else None,
                     SecondOrder(damping=lam, cg_iters=4 * n, cg_tol=1e-13, **PLAIN), train_data=train)
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
    sk.unlearn(model, loss_fn, aff, cor, None, SecondOrder(damping=lam, cg_iters=200, cg_tol=1e-13, **PLAIN),
               train_data=[sub], n_train=20)
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
    x, info = cg_solve(lambda v: A @ v, torch.zeros(2, dtype=torch.float64))
    assert info == {"iters": 0, "residual": 0.0, "negative_curvature": False} and not x.any()


def test_cg_errors():
    A = torch.eye(2, dtype=torch.float64)
    b = torch.ones(2, dtype=torch.float64)
    with pytest.raises(sk.NonFiniteError, match="Hessian-vector product"):
        cg_solve(lambda v: v * float("nan"), b)
    with pytest.raises(sk.NonFiniteError, match="right-hand side"):
        cg_solve(lambda v: A @ v, torch.tensor([1.0, float("inf")], dtype=torch.float64))
    for bad in ({"max_iter": 0}, {"max_iter": 2.5}, {"tol": float("nan")}, {"tol": -1.0}):
        with pytest.raises(ValueError):
            cg_solve(lambda v: A @ v, b, **bad)
    with pytest.raises(ValueError, match="1-D floating"):
        cg_solve(lambda v: v, torch.ones(2, 2))


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
    rep = sk.unlearn(model, loss_fn, aff, cor, idx, DiagNewton(diag=d_mean, damping=lam), train_data=train)
    expect = torch.zeros_like(th0)
    expect[idx] = -G[idx] / (20 * d_mean[idx].clamp_min(0) + lam)
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-12, atol=1e-14)
    assert rep.info["n_clipped_negative"] == n_neg
    # with diag given, n_train alone is enough (no Hessian data needed)
    m2 = Tiny().double()
    m2.load_state_dict(_flat_state(model, th0))
    sk.unlearn(m2, loss_fn, aff, cor, idx, DiagNewton(diag=d_mean, damping=lam), n_train=20)
    torch.testing.assert_close(_theta(m2), _theta(model), rtol=0, atol=0)


def _flat_state(model, theta):
    out, off = {}, 0
    for n, p in model.named_parameters():
        out[n] = theta[off:off + p.numel()].view(p.shape).clone()
        off += p.numel()
    return out


def test_diag_newton_estimates_the_diagonal_with_hessian_diag(setup, monkeypatch):
    model, aff, cor, train = setup
    th0 = _theta(model)
    calls = []
    real = hessian_mod.hessian_diag

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(hessian_mod, "hessian_diag", spy)
    rep = sk.unlearn(model, loss_fn, aff, cor, None, DiagNewton(damping=5.0, n_probes=4, seed=3), train_data=train)
    assert calls and calls[0]["n_probes"] == 4 and calls[0]["seed"] == 3
    est = real(_copy(model, th0), loss_fn, train, n_probes=4, seed=3)
    expect = -_G(_copy(model, th0), aff, cor) / (20 * est.mean.double().clamp_min(0) + 5.0)
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-6, atol=1e-9)
    assert rep.n_hvps == 4 * 20


def _copy(model, theta):
    m = type(model)().double()
    m.load_state_dict(_flat_state(model, theta))
    return m


def test_gradient_ascent_one_step(setup):
    model, aff, cor, _ = setup
    th0, summed = _flat_fn(model)
    th0 = th0.clone()
    idx = torch.tensor([0, 4, 9, 15, 27])
    # mean losses: L(Z̃) − L(Z)
    g = (grad(summed)(th0, *cor) - grad(summed)(th0, *aff)) / 5
    sk.unlearn(model, loss_fn, aff, cor, idx, GradientAscent(lr=0.3, steps=1))
    expect = torch.zeros_like(th0)
    expect[idx] = -0.3 * g[idx]
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-10, atol=1e-13)


def test_targeted_step_scale_is_a_diagonal_preconditioner(setup):
    """Targeted(step_scale=s), one step at θ* (the NPO term's gradient there is −∇L(Z), σ(0)·2 = 1): θ_S moves by
    −lr · s ⊙ (∇L̄(Z̃) − ∇L̄(Z))_S, s in S's (ascending) order; nothing outside S moves."""
    model, aff, cor, _ = setup
    th0, summed = _flat_fn(model)
    th0 = th0.clone()
    idx = torch.tensor([0, 4, 9, 15, 27, 30])
    scale = torch.tensor([0.5, 2.0, 0.0, 1.0, 3.0, 0.25], dtype=torch.float64)
    g = (grad(summed)(th0, *cor) - grad(summed)(th0, *aff)) / 5
    sk.unlearn(model, loss_fn, aff, cor, idx, sk.Targeted(lr=0.3, steps=1, step_scale=scale))
    expect = torch.zeros_like(th0)
    expect[idx] = -0.3 * scale * g[idx]
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-10, atol=1e-13)


def test_targeted_project_drops_the_conflicting_component(setup):
    """Targeted(project=True) against the definition on torch.func gradients (L̄ = mean CE, R the retained batch):
    g_f = ∇ (2/β)·softplus(β·(L̄*(Z) − L̄(Z)))_S, g_r = ∇ (L̄(Z̃) + L̄(R))_S. A forget step moves θ_S by
    −lr·(g_f − (g_f·g_r/|g_r|²)·g_r + g_r) where g_f·g_r < 0 and by −lr·(g_f + g_r) where not; a repair step (the
    monitor says the first block left the budget) by −lr·(g_r − (g_r·g_f/|g_f|²)·g_f) where they conflict. Nothing
    outside S moves. Both signs of g_f·g_r are exercised (S chosen from the coordinates where they disagree or
    agree at θ*)."""
    model, aff, cor, train = setup
    th0, summed = _flat_fn(model)
    th0 = th0.clone()
    state0 = _state(model)
    beta, lr = 0.5, 0.3
    l_star = summed(th0, *aff) / 5

    def g_forget(th):
        return grad(lambda t: (2 / beta) * F.softplus(beta * (l_star - summed(t, *aff) / 5)))(th)

    def g_rest(th):
        return grad(summed)(th, *cor) / 5 + grad(summed)(th, *train) / len(train[0])

    def proj(a, b):  # a without its component along b where they conflict
        d = torch.dot(a, b)
        return a - d / torch.dot(b, b) * b if d < 0 else a

    gf, gr = g_forget(th0), g_rest(th0)
    for conflict in (True, False):
        pick = torch.nonzero(gf * gr < 0 if conflict else gf * gr > 0).flatten()[:6]
        assert len(pick) == 6
        _restore(model, state0)
        sk.unlearn(model, loss_fn, aff, cor, pick, sk.Targeted(lr=lr, steps=1, beta=beta, retain=[train],
                                                               project=True))
        a, b = gf[pick], gr[pick]
        assert (torch.dot(a, b) < 0) == conflict
        expect = torch.zeros_like(th0)
        expect[pick] = -lr * (proj(a, b) + b)
        torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-10, atol=1e-13)
    # a forget step over the budget, then one repair step back within it (kept: the target is met)
    pick = torch.nonzero(gf * gr < 0).flatten()[:6]
    verdicts = iter([(True, 10.0), (False, 5.0), (True, 0.5)])

    def monitor(step):
        ok, score = next(verdicts)
        return {"within_budget": ok, "done": score < 1, "score": score}

    _restore(model, state0)
    rep = sk.unlearn(model, loss_fn, aff, cor, pick, sk.Targeted(lr=lr, steps=2, beta=beta, retain=[train],
                                                                 check_every=1, repair_steps=1, monitor=monitor,
                                                                 project=True))
    assert [(h["phase"], h["accepted"]) for h in rep.info["history"]] == [
        ("start", True), ("forget", False), ("repair", True)]
    th1 = th0.clone()
    th1[pick] -= lr * (proj(gf[pick], gr[pick]) + gr[pick])
    gf1, gr1 = g_forget(th1)[pick], g_rest(th1)[pick]
    assert torch.dot(gf1, gr1) < 0  # the repair's projection is exercised too
    th2 = th1.clone()
    th2[pick] -= lr * proj(gr1, gf1)
    torch.testing.assert_close(_theta(model), th2, rtol=1e-10, atol=1e-13)
    # the forget step read Z, Z̃ and R; the repair step Z̃, R and Z (for the forget term's direction)
    assert rep.n_gradients == 2 * (len(aff[0]) + len(cor[0]) + len(train[0]))
    # a repair whose gradient agrees with the forget term's is not projected (S where they agree after step 1)
    agree = torch.nonzero(gf * gr > 0).flatten()[:6]
    verdicts = iter([(True, 10.0), (False, 5.0), (True, 0.5)])
    _restore(model, state0)
    sk.unlearn(model, loss_fn, aff, cor, agree, sk.Targeted(lr=lr, steps=2, beta=beta, retain=[train], check_every=1,
                                                            repair_steps=1, monitor=monitor, project=True))
    th1 = th0.clone()
    th1[agree] -= lr * (gf[agree] + gr[agree])
    gf1, gr1 = g_forget(th1)[agree], g_rest(th1)[agree]
    assert torch.dot(gf1, gr1) > 0
    th1[agree] -= lr * gr1
    torch.testing.assert_close(_theta(model), th1, rtol=1e-10, atol=1e-13)
    with pytest.raises(TypeError, match="project must be a bool"):
        sk.Targeted(project=1)
    with pytest.raises(ValueError, match="project needs rho=0"):
        sk.Targeted(project=True, rho=0.1)


@pytest.mark.parametrize("bad, err, match", [
    (dict(step_scale=[1.0, 2.0]), TypeError, "step_scale must be a 1-D floating tensor"),
    (dict(step_scale=torch.ones(2, 2)), TypeError, "step_scale must be a 1-D floating tensor"),
    (dict(step_scale=torch.tensor([1.0, -1.0])), ValueError, "finite and >= 0"),
    (dict(step_scale=torch.tensor([1.0, float("nan")])), ValueError, "finite and >= 0"),
    (dict(step_scale=torch.ones(2), base="adamw"), ValueError, "base='sgd'"),
    (dict(step_scale=torch.ones(2), rho=0.1), ValueError, "rho=0"),
])
def test_targeted_step_scale_is_checked(bad, err, match):
    with pytest.raises(err, match=match):
        sk.Targeted(**bad)


def test_targeted_step_scale_of_another_size_is_refused_before_any_change(setup):
    model, aff, cor, _ = setup
    state = _state(model)
    with pytest.raises(ValueError, match="step_scale has 3 entries for a selection of k=2"):
        sk.unlearn(model, loss_fn, aff, cor, torch.tensor([1, 2]), sk.Targeted(steps=1, step_scale=torch.ones(3)))
    _assert_state(model, state)


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
    rep = sk.unlearn(model, loss_fn, aff, cor, idx, SAMFinetune(lr=lr, rho=rho, steps=1))
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-9, atol=1e-12)
    assert rep.n_gradients == 10 and rep.n_changed == 6


@pytest.mark.parametrize("method", METHODS)
def test_outside_selection_never_changes(setup, method):
    model, aff, cor, train = setup
    th0 = _theta(model)
    idx = torch.tensor([2, 3, 11, 25])
    sk.unlearn(model, loss_fn, aff, cor, idx, _config(method), **_train(method, train))
    th = _theta(model)
    out = torch.ones_like(th, dtype=torch.bool)
    out[idx] = False
    assert torch.equal(th[out], th0[out])
    assert not torch.equal(th[idx], th0[idx])


@pytest.mark.parametrize("method", METHODS)
def test_parameters_without_selected_entries_are_never_written(setup, method):
    # the final write touches S only: a tensor with no selected coordinate sees no in-place op at all
    model, aff, cor, train = setup
    sp = ParamSpace(model)
    lo, hi = sp.range_of("fc.weight")
    idx = torch.arange(lo, hi)[::3]
    versions = {n: p._version for n, p in model.named_parameters()}
    rep = sk.unlearn(model, loss_fn, aff, cor, idx, _config(method), **_train(method, train))
    assert rep.k == idx.numel() and rep.n_changed == idx.numel()
    for n, p in model.named_parameters():
        if n != "fc.weight":
            assert p._version == versions[n], n


@pytest.mark.parametrize("method", METHODS)
def test_report_is_the_change_on_S(setup, method):
    model, aff, cor, train = setup
    th0 = _theta(model)
    idx = torch.tensor([0, 6, 13, 25, 30])
    rep = sk.unlearn(model, loss_fn, aff, cor, idx, _config(method), **_train(method, train))
    d = _theta(model) - th0
    assert rep.n_changed == int((d != 0).sum())
    assert rep.delta_norm == pytest.approx(float(d.norm()), rel=1e-12)


# ------------------------------------------------------------------------------------------- method configs
def test_method_names_and_configs(setup):
    model, aff, cor, train = setup
    assert METHODS == ("first_order", "second_order", "diag_newton", "sam_finetune", "gradient_ascent", "targeted")
    assert as_method("first_order") == FirstOrder() and FirstOrder().tau == 1e-3
    assert SecondOrder() == SecondOrder(damping=None, cg_iters=50, cg_tol=1e-6, cache_graph=True)
    assert DiagNewton().n_probes == 32 and DiagNewton().seed == 0 and DiagNewton().diag is None
    assert SAMFinetune() == SAMFinetune(steps=20, lr=1e-2, rho=0.05, base="sgd")
    assert GradientAscent() == GradientAscent(steps=20, lr=1e-2)
    assert sk.FirstOrder is FirstOrder and sk.SAMFinetune is SAMFinetune
    # a name means the config with defaults: the same update as the explicit default config
    m2 = Tiny().double()
    m2.load_state_dict(model.state_dict())
    sk.unlearn(model, loss_fn, aff, cor, None, "first_order")
    sk.unlearn(m2, loss_fn, aff, cor, None, FirstOrder())
    assert torch.equal(_theta(model), _theta(m2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        FirstOrder().tau = 1.0
    with pytest.raises(TypeError):
        FirstOrder(0.1)  # keyword-only
    with pytest.raises(TypeError):
        FirstOrder(damping=1.0)  # an argument that does not apply to the method
    with pytest.raises(TypeError):
        as_method("first_order", steps=3)
    assert as_method(SecondOrder(cg_iters=3), damping=2.0) == SecondOrder(cg_iters=3, damping=2.0)


@pytest.mark.parametrize("bad", [
    lambda: FirstOrder(tau=float("nan")), lambda: FirstOrder(tau=float("inf")), lambda: FirstOrder(tau=-1.0),
    lambda: SecondOrder(damping=-1.0), lambda: SecondOrder(damping=float("nan")), lambda: SecondOrder(cg_iters=0),
    lambda: SecondOrder(cg_tol=-1e-3), lambda: DiagNewton(damping=-0.1), lambda: DiagNewton(n_probes=0),
    lambda: DiagNewton(seed=-1), lambda: SAMFinetune(steps=-1), lambda: SAMFinetune(lr=float("nan")),
    lambda: SAMFinetune(rho=-0.1), lambda: SAMFinetune(base="adam"), lambda: GradientAscent(steps=-2),
    lambda: GradientAscent(lr=-1.0)])
def test_config_validation_value_errors(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("bad", [
    lambda: FirstOrder(tau="0.1"), lambda: FirstOrder(tau=True), lambda: SecondOrder(cg_iters=2.5),
    lambda: SecondOrder(cache_graph=1), lambda: SAMFinetune(steps=2.0), lambda: DiagNewton(diag=[1.0, 2.0])])
def test_config_validation_type_errors(bad):
    with pytest.raises(TypeError):
        bad()


@pytest.mark.parametrize("config", [SAMFinetune(steps=0), GradientAscent(steps=0), FirstOrder(tau=0.0)])
def test_zero_steps_and_zero_tau_are_no_ops(setup, config):
    model, aff, cor, _ = setup
    state = _state(model)
    rep = sk.unlearn(model, loss_fn, aff, cor, None, config)
    _assert_state(model, state)
    assert rep.n_changed == 0 and rep.delta_norm == 0.0


def test_old_keyword_arguments_are_gone(setup):
    model, aff, cor, train = setup
    for kw in ({"tau": 0.1}, {"damping": 1.0}, {"steps": 2}, {"cg_iters": 3}, {"diag": None}, {"lr": 0.1}):
        with pytest.raises(TypeError):
            sk.unlearn(model, loss_fn, aff, cor, None, "first_order", **kw)


# ------------------------------------------------------------------------------------------- input validation
def test_bad_inputs_raise_before_modifying(setup):
    model, aff, cor, _ = setup
    th0 = _theta(model)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        sk.unlearn(model, loss_fn, aff, cor, None, method="newton")
    with pytest.raises(TypeError, match="class"):
        sk.unlearn(model, loss_fn, aff, cor, None, method=FirstOrder)
    with pytest.raises(TypeError):
        sk.unlearn(model, loss_fn, aff, cor, None, method=3)
    with pytest.raises(ValueError, match="equal size"):
        sk.unlearn(model, loss_fn, aff, (cor[0][:3], cor[1][:3]), None)
    with pytest.raises(IndexError, match="out of range"):
        sk.unlearn(model, loss_fn, aff, cor, torch.tensor([0, 10_000]))
    with pytest.raises(ValueError, match="duplicate"):
        sk.unlearn(model, loss_fn, aff, cor, torch.tensor([3, 1, 3]))
    with pytest.raises(ValueError, match="empty"):
        sk.unlearn(model, loss_fn, aff, cor, torch.zeros(0, dtype=torch.int64))
    with pytest.raises(TypeError):
        sk.unlearn(model, loss_fn, aff, cor, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="needs train_data"):
        sk.unlearn(model, loss_fn, aff, cor, None, method="second_order")
    with pytest.raises(ValueError, match="needs train_data"):
        sk.unlearn(model, loss_fn, aff, cor, None, method="diag_newton")
    with pytest.raises(ValueError, match="needs train_data"):
        sk.unlearn(model, loss_fn, aff, cor, None, DiagNewton(), n_train=20)
    with pytest.raises(ValueError, match="diag has"):
        sk.unlearn(model, loss_fn, aff, cor, None, DiagNewton(diag=torch.ones(3)), n_train=20)
    with pytest.raises(ValueError, match="n_train"):
        sk.unlearn(model, loss_fn, aff, cor, None, FirstOrder(), n_train=0)
    with pytest.raises(TypeError, match="estimation_mode"):
        sk.unlearn(model, loss_fn, aff, cor, None, estimation_mode="yes")
    other = sk.Selection.from_indices(torch.tensor([0, 1]), space=ParamSpace(torch.nn.Linear(3, 50)))
    with pytest.raises(ValueError):
        sk.unlearn(model, loss_fn, aff, cor, other)
    assert torch.equal(_theta(model), th0)


@pytest.mark.parametrize("method", ["first_order", "sam_finetune", "gradient_ascent"])
def test_train_arguments_are_context_every_method_accepts(setup, method):
    # train_data / n_train are the request's context: methods that do not read them accept them, never iterate
    # train_data, give the same result as without them, and list them in info["unread"]
    model, aff, cor, train = setup
    state = _state(model)
    ref = sk.unlearn(model, loss_fn, aff, cor, None, _config(method))
    after = _theta(model)
    assert "unread" not in ref.info
    for kw in ({"train_data": _Reads([train])}, {"n_train": 5}, {"train_data": _Reads([train]), "n_train": 5}):
        _restore(model, state)
        rep = sk.unlearn(model, loss_fn, aff, cor, None, _config(method), **kw)
        assert torch.equal(_theta(model), after)
        assert rep.info["unread"] == list(kw)
        if "train_data" in kw:
            assert kw["train_data"].reads == 0
    with pytest.raises(ValueError, match="n_train must be an int >= 1"):
        sk.unlearn(model, loss_fn, aff, cor, None, _config(method), n_train=0)  # context is still validated


def test_a_loop_over_methods_with_one_call():
    # the loop users write: one call with the whole context, every method
    torch.manual_seed(0)
    model = Tiny().double()
    aff, cor, train = _data(seed=0)
    state = _state(model)
    for m in METHODS:
        _restore(model, state)
        cfg = _config(m)
        rep = sk.unlearn(model, loss_fn, aff, cor, None, cfg, train_data=train)
        assert rep.method == m


def test_diag_newton_with_diag_needs_only_n_train(setup):
    # with diag= the rule reads no training data: train_data alone supplies n_train (its points)
    model, aff, cor, train = setup
    th0 = _theta(model)
    d = torch.full((ParamSpace(model).numel,), 0.1, dtype=torch.float64)
    rep = sk.unlearn(model, loss_fn, aff, cor, None, DiagNewton(diag=d, damping=1.0), train_data=iter([train]))
    assert rep.info["n_train"] == 20 and "n_hessian_points" not in rep.info and rep.n_hvps == 0
    after = _theta(model)
    m2 = _copy(model, th0)
    sk.unlearn(m2, loss_fn, aff, cor, None, DiagNewton(diag=d, damping=1.0), n_train=20)
    assert torch.equal(_theta(m2), after)
    state = _state(model)
    # both given: n_train wins and train_data is not read
    m3 = _copy(model, th0)
    reads = _Reads([train])
    rep = sk.unlearn(m3, loss_fn, aff, cor, None, DiagNewton(diag=d, damping=1.0), train_data=reads, n_train=20)
    assert torch.equal(_theta(m3), after) and reads.reads == 0 and rep.info["unread"] == ["train_data"]
    with pytest.raises(ValueError, match="needs n_train"):
        sk.unlearn(model, loss_fn, aff, cor, None, DiagNewton(diag=d))
    _assert_state(model, state)


class _Reads:
    """Re-iterable batches like a DataLoader (each read is a pass of I/O), counting how often they are read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def test_train_data_is_counted_once(setup, monkeypatch):
    model, aff, cor, train = setup
    split = [(train[0][:8], train[1][:8]), (train[0][8:], train[1][8:])]
    # second_order, cache_graph: one count in unlearn + one in RestrictedHVP.__init__ (hvp.py) + one graph build
    for kw in ({}, {"n_train": 40}):
        data = _Reads(split)
        rep = sk.unlearn(_copy(model, _theta(model)), loss_fn, aff, cor, None,
                         SecondOrder(damping=5.0, cg_iters=3, min_ratio=None), train_data=data, **kw)
        assert data.reads == 3, kw
        assert rep.info["n_hessian_points"] == 20 and rep.info["n_train"] == kw.get("n_train", 20)
        assert rep.n_passes == 2 + 2 * rep.info["cg_iters"] + 2 and rep.n_hvps == 20 * rep.info["cg_iters"]
        assert rep.n_gradients == 2 * len(aff[1])
        # the ratio test adds one gradient pass over train_data (g_T) and, per trial and once at θ*, one forward
        # pass over train_data (2 batches), Z and Z̃
        data = _Reads(split)
        rep = sk.unlearn(_copy(model, _theta(model)), loss_fn, aff, cor, None, SecondOrder(damping=5.0, cg_iters=3),
                         train_data=data, **kw)
        t = rep.info["trials"]
        assert t >= 1 and data.reads == 3 + 1 + (1 + t), kw
        assert rep.n_passes == 2 + 2 * rep.info["cg_iters"] + 2 + 2 + 4 * (1 + t)
        assert rep.n_gradients == 2 * len(aff[1]) + 20
    # diag_newton: one count in unlearn, everything else is hessian_diag's own reading
    data = _Reads(split)
    inside = []
    real = hessian_mod.hessian_diag

    def spy(*a, **kw):
        before = data.reads
        est = real(*a, **kw)
        inside.append(data.reads - before)
        return est

    monkeypatch.setattr(hessian_mod, "hessian_diag", spy)
    rep = sk.unlearn(model, loss_fn, aff, cor, None, DiagNewton(damping=5.0, n_probes=3), train_data=data)
    assert data.reads - inside[0] == 1
    assert rep.n_hvps == 3 * 20 and rep.n_passes == 2 + 3 * 2 and rep.info["n_hessian_points"] == 20


def test_report_makes_no_float64_copy_of_S(monkeypatch):
    # float32 model, S = every parameter (k = N): the report reduces in float64 chunks, never a [k] float64 buffer.
    # Every op's outputs are recorded (TorchDispatchMode); on a float32 model any float64 tensor is the report's.
    from torch.utils._python_dispatch import TorchDispatchMode

    from sapsel_kernels import rules

    class Float64Outputs(TorchDispatchMode):
        sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    self.sizes.append(t.numel())
            return out

    monkeypatch.setattr(rules, "_CHUNK", 256)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 200)  # N = 13,000
    x, y = torch.randn(4, 64), torch.randint(0, 200, (4,))
    with Float64Outputs() as mode:
        rep = sk.unlearn(model, torch.nn.CrossEntropyLoss(), (x, y), (x, (y + 1) % 200), None, FirstOrder(tau=0.5))
    assert mode.sizes and max(mode.sizes) <= 256  # chunks of the report (g_norm, delta_norm), never k = 13,000
    assert rep.n_changed > 0 and rep.delta_norm > 0


def test_report_norm_is_float64_for_float32():
    # delta_norm and g_norm accumulate in float64 over exact float64 differences of the stored float32 values, over
    # several chunks; oracle: math.fsum of the exact float64 squares (correctly rounded)
    import math

    from sapsel_kernels.rules import norm_float64

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2 * 2**20 + 5, generator=g) + 1.0
    b = a + torch.rand(a.numel(), generator=g) * 1e-3
    exact = lambda d: math.sqrt(math.fsum((d * d).tolist()))  # noqa: E731  (the squares are exact in float64 here)
    assert norm_float64(b, a) == pytest.approx(exact(b.double() - a.double()), rel=1e-13)
    assert norm_float64(a) == pytest.approx(exact(a.double()), rel=1e-13)
    assert norm_float64(torch.zeros(0)) == 0.0


def test_selection_forms_agree(setup):
    # an unsorted index tensor, a list, a flat bool mask, a dict of masks and a Selection are one S
    model, aff, cor, _ = setup
    sp = ParamSpace(model)
    idx = torch.tensor([30, 2, 17, 5])
    mask = torch.zeros(sp.numel, dtype=torch.bool)
    mask[idx] = True
    forms = [idx, idx.tolist(), mask, sp.views(mask), sk.Selection.from_indices(idx, space=sp)]
    outs = []
    for sel in forms:
        m = Tiny().double()
        m.load_state_dict(model.state_dict())
        rep = sk.unlearn(m, loss_fn, aff, cor, sel, FirstOrder(tau=0.2))
        assert rep.k == 4
        outs.append(_theta(m))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_selection_matched_by_tensor_identity(setup):
    # a selection built on model.parameters() (synthetic names) addresses the same tensors as the model's space
    model, aff, cor, _ = setup
    sel = sk.Selection.from_indices(torch.tensor([1, 4]), space=ParamSpace(list(model.parameters())))
    rep = sk.unlearn(model, loss_fn, aff, cor, sel, FirstOrder(tau=0.1))
    assert rep.n_changed == 2


def test_batch_rule_and_loss_rule(setup):
    # a criterion (nn.CrossEntropyLoss) instead of loss_fn(model, batch); a one-shot iterator is fine for a direct
    # rule (read once) and refused for an iterative one (cycled)
    model, aff, cor, _ = setup
    m2 = Tiny().double()
    m2.load_state_dict(model.state_dict())
    sk.unlearn(model, loss_fn, aff, cor, None, FirstOrder(tau=0.1))
    sk.unlearn(m2, torch.nn.CrossEntropyLoss(), iter([aff]), (b for b in [cor]), None, FirstOrder(tau=0.1))
    torch.testing.assert_close(_theta(model), _theta(m2), rtol=1e-12, atol=1e-14)
    th = _theta(model)
    with pytest.raises(TypeError, match="one-shot"):
        sk.unlearn(model, loss_fn, iter([aff]), [cor], None, GradientAscent(steps=2))
    with pytest.raises(TypeError, match="one-shot"):
        sk.unlearn(model, loss_fn, aff, cor, None, SAMFinetune(steps=2, retain=iter([cor])))
    with pytest.raises(ValueError, match="does not depend"):
        sk.unlearn(model, lambda m, b: loss_fn(m, b).detach(), aff, cor, None, FirstOrder())
    assert torch.equal(_theta(model), th)


class TinyCausalLM(torch.nn.Module):
    """GPT-2-like interface: int64 ids [B, T] -> logits [B, T, V]."""

    def __init__(self, vocab=5, d=3):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.mix = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.mix(torch.cumsum(h, dim=1) / torch.arange(1, ids.shape[1] + 1)[:, None]))
        return self.head(h)


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("method", ["second_order", "diag_newton"])
def test_train_data_as_a_list_of_one_batch_of_ids(method):
    # [ids] is ONE batch of token ids under the batch rule, as for a GPT-2-like model's training data
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    ids = torch.randint(0, 5, (6, 9))
    z, zt = ids[:2], ids[:2].clone()
    zt[:, 4] = (zt[:, 4] + 1) % 5
    th0 = _theta(model)
    names = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]

    def summed(t, x):  # the summed loss over the sequences of x, through torch.func
        out, off = {}, 0
        for n, shape, k in names:
            out[n] = t[off:off + k].view(shape)
            off += k
        return x.shape[0] * lm_loss(lambda i: functional_call(model, out, (i,)), x)

    Hs = hessian(summed)(th0, ids)
    G = grad(summed)(th0, zt) - grad(summed)(th0, z)
    lam = float(torch.linalg.eigvalsh(Hs).min().abs()) + 1.0
    n = th0.numel()
    cfg = SecondOrder(damping=lam, cg_iters=4 * n, cg_tol=1e-13, **PLAIN) if method == "second_order" else \
        DiagNewton(damping=lam, n_probes=4)
    rep = sk.unlearn(model, lm_loss, [z], [zt], None, cfg, train_data=[ids])
    assert rep.info["n_train"] == 6 and rep.info["n_hessian_points"] == 6 and rep.n_changed > 0
    if method == "second_order":
        expect = -torch.linalg.solve(Hs + lam * torch.eye(n, dtype=torch.float64), G)
        torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-8, atol=1e-11)


# ------------------------------------------------------------------------------------------- 0-dim parameters
@pytest.mark.parametrize("method", METHODS)
def test_zero_dim_parameters_in_every_rule(method):
    torch.manual_seed(1)
    model = WithScalars().double()
    aff, cor, train = _data(seed=1)
    sp = ParamSpace(model)
    t_idx, s_idx = sp.range_of("t")[0], sp.range_of("s")[0]
    idx = torch.tensor([sp.range_of("l1.weight")[0] + 1, t_idx, sp.range_of("fc.weight")[0] + 3, s_idx])
    th0 = _theta(model)
    rep = sk.unlearn(model, loss_fn, aff, cor, idx, _config(method), **_train(method, train))
    th = _theta(model)
    assert rep.n_changed == 4 and th[t_idx] != th0[t_idx] and th[s_idx] != th0[s_idx]
    out = torch.ones_like(th, dtype=torch.bool)
    out[idx] = False
    assert torch.equal(th[out], th0[out])


def test_zero_dim_second_order_equals_dense_solve():
    torch.manual_seed(2)
    model = WithScalars().double()
    aff, cor, train = _data(seed=2)
    sp = ParamSpace(model)
    idx = torch.tensor([sp.range_of("l1.weight")[0] + 1, sp.range_of("l1.weight")[0] + 4, sp.range_of("t")[0],
                        sp.range_of("fc.bias")[0], sp.range_of("s")[0]])
    th0 = _theta(model)
    G = _G(model, aff, cor)
    Hs = _H_sum(model, train)
    lam = float(torch.linalg.eigvalsh(Hs).min().abs()) + 1.0
    sk.unlearn(model, loss_fn, aff, cor, idx, SecondOrder(damping=lam, cg_iters=50, cg_tol=1e-13, **PLAIN),
               train_data=train)
    expect = torch.zeros_like(th0)
    expect[idx] = -torch.linalg.solve(Hs[idx][:, idx] + lam * torch.eye(5, dtype=torch.float64), G[idx])
    torch.testing.assert_close(_theta(model) - th0, expect, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("method", METHODS)
def test_nan_leaves_model_untouched_and_raises(setup, method):
    model, aff, cor, train = setup
    state = _state(model)
    bad = (cor[0].clone(), cor[1])
    bad[0][1, 0] = float("nan")
    with pytest.raises(sk.NonFiniteError, match="NaN"):
        sk.unlearn(model, loss_fn, aff, bad, None, _config(method), **_train(method, train))
    _assert_state(model, state)
    with torch.no_grad():
        model.l1.weight[0, 0] = float("inf")
    state = _state(model)
    with pytest.raises(sk.NonFiniteError, match=r"l1\.weight\[0, 0\]"):
        sk.unlearn(model, loss_fn, aff, cor, None, _config(method), **_train(method, train))
    _assert_state(model, state)


@pytest.mark.parametrize("method", ["sam_finetune", "gradient_ascent"])
def test_iterate_diverging_late_is_fully_restored(setup, method):
    # the loss is finite for the first steps (S has already moved) and NaN afterwards: everything is restored
    model, aff, cor, _ = setup
    state = _state(model)
    calls = [0]

    def flaky(m, b):
        calls[0] += 1
        out = loss_fn(m, b)
        return out * float("nan") if calls[0] > 6 else out

    with pytest.raises(sk.NonFiniteError, match=rf"unlearn: the {method} loss.* contains NaN/Inf \(nan at step 4 of "
                                                r"10\); the model was restored"):
        sk.unlearn(model, flaky, aff, cor, None, _config(method, steps=10))
    assert calls[0] > 6
    _assert_state(model, state)


def test_nan_in_given_diag_raises(setup):
    model, aff, cor, train = setup
    state = _state(model)
    d = torch.ones(ParamSpace(model).numel, dtype=torch.float64)
    d[7] = float("nan")
    with pytest.raises(sk.NonFiniteError, match="diag"):
        sk.unlearn(model, loss_fn, aff, cor, None, DiagNewton(diag=d, damping=1.0), train_data=train)
    _assert_state(model, state)
    # outside S the diagonal is not read
    rep = sk.unlearn(model, loss_fn, aff, cor, torch.tensor([1, 2]), DiagNewton(diag=d, damping=1.0), n_train=20)
    assert rep.n_changed == 2


def test_nan_coordinate_is_named_by_errors_check_finite(setup, monkeypatch):
    # the [k] vectors on S are checked by errors.check_finite itself (where= maps a position in S to the parameter
    # and index): its NonFiniteError propagates as it is, with no second scan to name the coordinate
    from sapsel_kernels import rules

    model, aff, cor, _ = setup
    raised = []
    real = rules.check_finite

    def spy(*a, **kw):
        try:
            real(*a, **kw)
        except sk.NonFiniteError as e:
            raised.append(e)
            raise

    monkeypatch.setattr(rules, "check_finite", spy)
    sp = ParamSpace(model)
    d = torch.ones(sp.numel, dtype=torch.float64)
    bad = sp.range_of("fc.weight")[0] + 5  # fc.weight[1, 1] (4 inputs per row)
    d[bad] = float("nan")
    with pytest.raises(sk.NonFiniteError) as ei:
        sk.unlearn(model, loss_fn, aff, cor, torch.tensor([0, 3, bad]), DiagNewton(diag=d, damping=1.0), n_train=20)
    assert raised and ei.value is raised[-1]
    assert str(ei.value) == (f"unlearn: the Hessian diagonal diag contains NaN/Inf (nan at fc.weight[1, 1] (flat index "
                             f"{bad})); the model was left untouched")


def test_zero_denominator_raises(setup):
    model, aff, cor, train = setup
    state = _state(model)
    with pytest.raises(ValueError, match="zero denominator"):
        sk.unlearn(model, loss_fn, aff, cor, None, DiagNewton(diag=torch.zeros(ParamSpace(model).numel), damping=0.0),
                   n_train=20)
    _assert_state(model, state)


# ------------------------------------------------------------------------------------------- modes and buffers
def _bn_setup():
    torch.manual_seed(3)
    model = BNNet().double()
    aff, cor, train = _data(seed=3)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(train[0])
    return model, aff, cor, train


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_bn_buffers_bit_identical_after_success(method):
    model, aff, cor, train = _bn_setup()
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    rep = sk.unlearn(model, loss_fn, aff, cor, None, _config(method), **_train(method, train))
    assert rep.n_changed > 0
    for n, b in model.named_buffers():
        assert torch.equal(b, bufs[n]), n
    assert all(m.training for m in model.modules())  # the mode is restored


def test_estimation_mode_is_eval_mode():
    # the default update equals the one computed on the same model in eval mode (BN running statistics, no dropout)
    model, aff, cor, train = _bn_setup()
    m2 = BNNet().double()
    m2.load_state_dict(model.state_dict())
    m2.eval()
    sk.unlearn(model, loss_fn, aff, cor, None, FirstOrder(tau=0.3))
    sk.unlearn(m2, loss_fn, aff, cor, None, FirstOrder(tau=0.3), estimation_mode=False)
    assert torch.equal(_theta(model), _theta(m2))


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_failure_restores_buffers(method):
    # without estimation mode the forward passes in train mode write BatchNorm statistics (NaN for a NaN input);
    # the failure restores them bit for bit
    model, aff, cor, train = _bn_setup()
    state = _state(model)
    bad = (cor[0].clone(), cor[1])
    bad[0][1, 0] = float("nan")
    with pytest.raises(sk.NonFiniteError):
        sk.unlearn(model, loss_fn, aff, bad, None, _config(method), **_train(method, train), estimation_mode=False)
    _assert_state(model, state)
    assert torch.isfinite(model.bn.running_mean).all()


@pytest.mark.parametrize("method", ["first_order", "second_order", "diag_newton"])
def test_direct_rules_never_change_buffers_even_in_train_mode(method):
    model, aff, cor, train = _bn_setup()
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    torch.manual_seed(0)  # dropout masks
    sk.unlearn(model, loss_fn, aff, cor, None, _config(method), **_train(method, train), estimation_mode=False)
    for n, b in model.named_buffers():
        assert torch.equal(b, bufs[n]), n


def test_iterative_rules_in_train_mode_may_update_buffers():
    # documented: fine-tuning in train mode (estimation_mode=False) updates running statistics like training
    model, aff, cor, train = _bn_setup()
    before = model.bn.running_mean.clone()
    sk.unlearn(model, loss_fn, aff, cor, None, GradientAscent(steps=2), estimation_mode=False)
    assert not torch.equal(model.bn.running_mean, before)


@pytest.mark.parametrize("method", ["sam_finetune", "gradient_ascent"])
def test_iterative_rules_hand_back_the_callers_grads(setup, method):
    model, aff, cor, _ = setup
    g = torch.full_like(model.fc.bias, 7.0)
    model.fc.bias.grad = g
    sk.unlearn(model, loss_fn, aff, cor, None, _config(method))
    assert model.fc.bias.grad is g and torch.equal(g, torch.full_like(g, 7.0))
    assert model.l1.weight.grad is None


# ------------------------------------------------------------------------------------------- interrupts
def test_interrupted_diag_estimate_propagates(setup, monkeypatch):
    model, aff, cor, train = setup
    state = _state(model)
    real = hessian_mod.hessian_diag

    def interrupted(*a, **kw):
        est = real(*a, **kw)
        est.info["stopped_by"] = "interrupted"  # what hessian_diag returns after Ctrl-C: a partial estimate
        return est

    monkeypatch.setattr(hessian_mod, "hessian_diag", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sk.unlearn(model, loss_fn, aff, cor, None, DiagNewton(damping=1.0, n_probes=2), train_data=train)
    _assert_state(model, state)

    def raising(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(hessian_mod, "hessian_diag", raising)
    with pytest.raises(KeyboardInterrupt):
        sk.unlearn(model, loss_fn, aff, cor, None, DiagNewton(damping=1.0), train_data=train)
    _assert_state(model, state)


def _interrupt_config(method):
    cfg = _config(method, steps=6) if method in ("sam_finetune", "gradient_ascent") else _config(method)
    return as_method(cfg, n_probes=16) if method == "diag_newton" else cfg


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_interrupt_anywhere_leaves_the_model_exactly_as_before(method, where):
    # Ctrl-C in the first, a middle or the last loss evaluation of a call (in the gradients, the CG products, the
    # Hessian estimate, or mid-run of an iterative rule after S has moved): KeyboardInterrupt propagates, and the
    # parameters, buffers and module modes are exactly as before
    model, aff, cor, train = _bn_setup()
    calls = [0]
    at = [0]

    def counting(m, b):
        calls[0] += 1
        if calls[0] == at[0]:
            raise KeyboardInterrupt
        return loss_fn(m, b)

    probe = BNNet().double()
    probe.load_state_dict(model.state_dict())
    probe.train()
    sk.unlearn(probe, counting, aff, cor, None, _interrupt_config(method), **_train(method, [train, train]),
               estimation_mode=False)
    total = calls[0]
    at[0] = {"first": 1, "middle": max(1, total // 2), "last": total}[where]
    calls[0] = 0
    state = _state(model)
    with pytest.raises(KeyboardInterrupt):
        sk.unlearn(model, counting, aff, cor, None, _interrupt_config(method), **_train(method, [train, train]),
                   estimation_mode=False)
    _assert_state(model, state)
    assert all(m.training for m in model.modules())


def test_interrupt_during_the_final_write_restores(setup, monkeypatch):
    from sapsel_kernels import rules

    model, aff, cor, _ = setup
    state = _state(model)
    real = rules.Coords._index_copy
    calls = [0]

    def flaky(p, loc, v):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        real(p, loc, v)

    monkeypatch.setattr(rules.Coords, "_index_copy", staticmethod(flaky))
    with pytest.raises(KeyboardInterrupt):
        sk.unlearn(model, loss_fn, aff, cor, None, FirstOrder(tau=0.5))
    monkeypatch.undo()
    _assert_state(model, state)


# ------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(setup, method):
    # the same float32 model on CPU and CUDA, a Selection built on CPU (moved by unlearn as needed): every rule
    # gives the same update up to float32 reduction-order differences
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
        cfg = _config(method, diag=d.to(dev)) if method == "diag_newton" else _config(method)
        sel = sk.Selection.from_indices(idx, space=ParamSpace(cpu))  # built on the CPU model's space
        sk.unlearn(m, loss_fn, f32(aff, dev), f32(cor, dev), sel, cfg, **_train(method, f32(train, dev)))
        outs.append(_theta(m).cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
