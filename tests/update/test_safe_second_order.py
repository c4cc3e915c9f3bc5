"""The second-order rule on non-convex models: Steihaug-CG inside a trust region plus a ratio test on the true loss.

Oracles: the Cauchy-point decrease every trust-region step must reach (Nocedal & Wright, Thm. 4.4 / Steihaug 1983),
the dense solve when the radius does not bind, and a BatchNorm CNN where the plain truncated-CG step (today's rule
with both safeguards off) sends test accuracy to chance.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sapsel_kernels as sk
from sapsel_kernels.rules import SecondOrder
from sapsel_kernels.solver import cg_solve, steihaug_cg


def _q(A, b, x):
    return float(0.5 * x @ A @ x - b @ x)


def _cauchy(A, b, radius):
    bab = float(b @ A @ b)
    bn = float(b.norm())
    tau = 1.0 if bab <= 0 else min(bn ** 3 / (radius * bab), 1.0)
    return tau * radius * b / bn


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shift", [-3.0, 0.5, 5.0])  # indefinite, barely PD, well conditioned
@pytest.mark.parametrize("radius", [0.05, 0.5, 5.0])
def test_steihaug_reaches_cauchy_decrease_and_stays_inside(seed, shift, radius):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = (m + m.T) / 2 + shift * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x, info = steihaug_cg(lambda v: A @ v, b, radius, max_iter=50, tol=1e-12)
    assert float(x.norm()) <= radius * (1 + 1e-9)
    assert _q(A, b, x) <= _q(A, b, _cauchy(A, b, radius)) + 1e-10
    assert info["bx"] == pytest.approx(float(b @ x), rel=1e-9, abs=1e-12)
    assert info["xAx"] == pytest.approx(float(x @ A @ x), rel=1e-7, abs=1e-9)
    if info["negative_curvature"]:
        assert info["boundary"] and float(x.norm()) == pytest.approx(radius, rel=1e-9)
    if bool(torch.linalg.eigvalsh(A).min() > 0):
        exact = torch.linalg.solve(A, b)
        if float(exact.norm()) < radius * 0.999:  # the radius does not bind: the Newton step itself
            torch.testing.assert_close(x, exact, rtol=1e-8, atol=1e-10)
            assert not info["boundary"]


def _textbook_truncated_cg(A, b, max_iter=50, tol=1e-6):
    """Hestenes-Stiefel CG from x = 0 that stops at pᵀAp <= 0 and returns the iterate so far (Nocedal & Wright,
    Alg. 5.2 with the truncation of Alg. 7.1 without a radius), written out here as the oracle."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    for _ in range(max_iter):
        ap = A @ p
        if float(p @ ap) <= 0:
            return x, True
        alpha = float(r @ r) / float(p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        if float(r_new.norm()) <= tol * float(b.norm()):
            return x, False
        p = r_new + (float(r_new @ r_new) / float(r @ r)) * p
        r = r_new
    return x, False


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shift", [-1.0, 4.0])  # indefinite (truncation may happen), positive definite
def test_steihaug_without_radius_is_truncated_cg(seed, shift):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(8, 8, generator=g, dtype=torch.float64)
    A = (m + m.T) / 2 + shift * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    want, truncated = _textbook_truncated_cg(A, b)
    for fn in (lambda: steihaug_cg(lambda v: A @ v, b, math.inf), lambda: cg_solve(lambda v: A @ v, b)):
        x, info = fn()
        torch.testing.assert_close(x, want, rtol=1e-10, atol=1e-12)
        assert info["negative_curvature"] == truncated and not info.get("boundary", False)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_steihaug_refuses_bad_radius(bad):
    with pytest.raises(ValueError, match="radius"):
        steihaug_cg(lambda v: v, torch.ones(3), bad)


@pytest.mark.parametrize("kw", [{"trust_radius": 0.0}, {"trust_radius": -1.0}, {"trust_radius": float("inf")},
                                {"min_ratio": float("nan")}, {"backtracks": -1}])
def test_config_validation(kw):
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        SecondOrder(**kw)


# ------------------------------------------------------------------------------------------ the ratio test
class Cliff(nn.Module):
    """One weight w; the training loss is quadratic near w* = 1 and quartic beyond: a Newton step from the quadratic
    model overshoots into the quartic wall."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=torch.float64))


def cliff_loss(model, batch):
    x, y = batch  # y: 0 = a training point, 1 = an affected point as trained on, 2 = corrected
    w = model.w[0]
    d = w - 1.0
    per = torch.where(y == 0, 0.5 * d ** 2 + 50.0 * d ** 4, torch.where(y == 1, 0.0 * w, -3.0 * w))
    return (per * x).mean()


def _cliff_data():
    ones = torch.ones(4, dtype=torch.float64)
    return (ones, torch.ones(4, dtype=torch.long)), (ones, torch.full((4,), 2)), [(ones, torch.zeros(4).long())]


def test_ratio_test_shortens_a_step_the_quadratic_model_overestimates():
    aff, cor, train = _cliff_data()
    plain = Cliff()
    sk.unlearn(plain, cliff_loss, aff, cor, None, SecondOrder(damping=0.0, trust_radius=None, min_ratio=None),
               train_data=train)
    # the plain Newton step: G = −12, H = 4: w → 1 + 3 (the quartic wall makes that a loss of ~1e4)
    assert float(plain.w.detach()) == pytest.approx(4.0)
    safe = Cliff()
    rep = sk.unlearn(safe, cliff_loss, aff, cor, None, SecondOrder(damping=0.0, trust_radius=None),
                     train_data=train)
    assert rep.info["accepted"] and rep.info["step_scale"] < 1 and rep.info["ratio"] >= 0.1
    assert rep.info["trials"] >= 2
    assert float(safe.w.detach()) == pytest.approx(1.0 + 3.0 * rep.info["step_scale"])

    def f(w):  # the function the ratio test reads: T + Σℓ(Z̃) − Σℓ(Z), with T's linear term 0 at w = 1
        d = w - 1.0
        return 4 * (0.5 * d ** 2 + 50.0 * d ** 4) - 12.0 * w

    assert f(float(safe.w.detach())) < f(1.0) < f(float(plain.w.detach()))


def test_ratio_test_rejects_everything_leaves_model_untouched():
    aff, cor, train = _cliff_data()
    m = Cliff()
    rep = sk.unlearn(m, cliff_loss, aff, cor, None, SecondOrder(damping=0.0, trust_radius=None, backtracks=0),
                     train_data=train)
    assert not rep.info["accepted"] and rep.info["step_scale"] == 0.0 and rep.n_changed == 0
    assert float(m.w.detach()) == 1.0


# ------------------------------------------------------------------------------------------ a real CNN
class BNCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def poisoned_cnn():
    pytest.importorskip("sklearn")
    from sapsel_kernels.demo.labels import load_digits_split, poison_labels

    torch.manual_seed(0)
    sp = load_digits_split(0)
    xtr, ytr = sp["train"]
    yp, idx = poison_labels(ytr, 0.2, 0)
    torch.manual_seed(0)
    m = BNCNN()
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(m(xtr[b]), yp[b]).backward()
            opt.step()
    m.eval()
    return m, sp, yp, idx


def _acc(m, x, y):
    with torch.no_grad():
        return float((m(x).argmax(1) == y).float().mean())


def test_bn_cnn_plain_newton_step_wrecks_the_model_the_safe_rule_does_not(poisoned_cnn):
    """The new user's report: 20% flipped digits, a BatchNorm CNN, 1% hessian selection. The plain truncated-CG step
    (both safeguards off) meets negative curvature / near-singular directions and sets test accuracy to chance; the
    default rule keeps the step inside ‖θ_S‖ and checks it against the loss."""
    m, sp, yp, idx = poisoned_cnn
    (xtr, ytr), (xte, yte) = sp["train"], sp["test"]
    crit = nn.CrossEntropyLoss()
    sel = sk.select_parameters(m, "hessian", 0.01, loss_fn=crit, data=[(xtr, yp)])
    before = _acc(m, xte, yte)
    args = dict(affected=(xtr[idx], yp[idx]), corrected=(xtr[idx], ytr[idx]), selection=sel,
                train_data=[(xtr[:512], ytr[:512])], n_train=len(xtr))
    plain = copy.deepcopy(m)
    sk.unlearn(plain, crit, method=SecondOrder(trust_radius=None, min_ratio=None), **args)
    assert _acc(plain, xte, yte) < 0.3  # the failure is real on this fixture (0.873 -> 0.100 measured)
    safe = copy.deepcopy(m)
    rep = sk.unlearn(safe, crit, method=SecondOrder(), **args)
    theta_s = torch.cat([p.detach().reshape(-1) for p in m.parameters()])[sel.indices]
    assert rep.delta_norm <= 1.0 * float(theta_s.norm()) * (1 + 1e-5)
    assert rep.info["accepted"] and rep.info["ratio"] >= 0.1
    assert _acc(safe, xte, yte) > before - 0.1  # 0.889 measured
    # and it repairs: the affected points' true labels come back (0.36 -> 0.50 measured)
    assert _acc(safe, xtr[idx], ytr[idx]) > _acc(m, xtr[idx], ytr[idx]) + 0.08


# ------------------------------------------------------------------------------------------ a saddle
class Saddle(nn.Module):
    """Two weights at a saddle of the training loss: T(w) = Σ_points ½(w0² − w1²) + ¼w1⁴ has H = diag(1, −1) at
    w = 0 (negative curvature along w1) and is bounded below (minima at w1 = ±1)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))


def saddle_loss(model, batch):
    x, y = batch  # y: 0 = a training point, 1 = affected (as trained on), 2 = corrected
    w0, w1 = model.w[0], model.w[1]
    train = 0.5 * (w0 ** 2 - w1 ** 2) + 0.25 * w1 ** 4
    per = torch.where(y == 0, train, torch.where(y == 1, 0.0 * w0, -(w0 + w1)))
    return (per * x).mean()


def _saddle_data(n=4):
    ones = torch.ones(n, dtype=torch.float64)
    return (ones, torch.ones(n).long()), (ones, torch.full((n,), 2)), [(ones, torch.zeros(n).long())]


def _saddle_objective(w):  # the corrected training objective: T (4 points) + Σℓ(Z̃) − Σℓ(Z)
    w0, w1 = float(w[0]), float(w[1])
    return 4 * (0.5 * (w0 ** 2 - w1 ** 2) + 0.25 * w1 ** 4) - 4 * (w0 + w1)


@pytest.mark.parametrize("damping", [0.0, 4.004])
def test_at_a_saddle_the_plain_step_fails_and_the_safe_one_descends(damping):
    """λ = 0: H + λI is indefinite, and plain truncated CG stops at its first direction with no update at all.
    λ = 4.004 (just above the −4 of the summed H): H + λI is positive definite but nearly singular along w1, and the
    plain Newton step there is 1000× too long (w1 = 1000: the quartic term makes the objective ~2.5e11). The default
    rule meets negative curvature (or the radius), stays within ‖θ_S‖-scaled bounds and lowers the objective."""
    aff, cor, train = _saddle_data()
    plain = Saddle()
    with torch.no_grad():
        plain.w[0] = 0.5  # at the saddle along w1; ‖θ_S‖ = 0.5 sets the trust radius's scale
    safe = copy.deepcopy(plain)
    start = _saddle_objective(plain.w.detach())
    rp = sk.unlearn(plain, saddle_loss, aff, cor, None, SecondOrder(damping=damping, trust_radius=None,
                                                                     min_ratio=None), train_data=train)
    rs = sk.unlearn(safe, saddle_loss, aff, cor, None, SecondOrder(damping=damping), train_data=train)
    f_plain, f_safe = _saddle_objective(plain.w.detach()), _saddle_objective(safe.w.detach())
    if damping == 0.0:  # the first CG direction has pᵀ(H + λI)p = 0: truncated CG returns x = 0, no update
        assert rp.info["negative_curvature"] and rp.n_changed == 0 and f_plain == start
        assert rs.info["negative_curvature"]
    else:  # w1 = 1000: the plain step made things far worse
        assert float(plain.w.detach()[1]) > 100 and f_plain > start + 1e6
    assert rs.info["accepted"] and f_safe < start
    assert rs.info["boundary"] and rs.delta_norm <= rs.info["trust_radius"] * (1 + 1e-9)


def test_ratio_test_does_not_reject_a_correct_step_over_float32_rounding():
    """Least squares, where the quadratic model is exact (ρ = 1 in exact arithmetic). In float32 over 20,000 training
    points f − f0 is below the rounding of the summed losses; the test must keep the full Newton step instead of
    backtracking on noise (without the noise floor this draw's step was cut to α = 1/64)."""
    g = torch.Generator().manual_seed(1)  # a draw where the old test backtracked 3 times (α = 1/64)
    d = 50
    x = torch.randn(20_000, d, generator=g)
    y = x @ torch.randn(d, generator=g) + torch.randn(20_000, generator=g)
    model = nn.Linear(d, 1)
    with torch.no_grad():  # at the least-squares solution, like a trained model
        sol = torch.linalg.lstsq(torch.cat([x, torch.ones(20_000, 1)], 1).double(), y.double()[:, None]).solution
        model.weight.copy_(sol[:d].T.float())
        model.bias.copy_(sol[d].float())
    mse = lambda m, b: ((m(b[0])[:, 0] - b[1]) ** 2).mean()  # noqa: E731
    train = [(x[i:i + 500], y[i:i + 500]) for i in range(0, 20_000, 500)]
    z, zt = (x[:1], y[:1]), (x[:1], y[:1] + 0.01)
    plain, safe = copy.deepcopy(model), copy.deepcopy(model)
    sk.unlearn(plain, mse, z, zt, None, SecondOrder(trust_radius=None, min_ratio=None), train_data=train)
    rep = sk.unlearn(safe, mse, z, zt, None, SecondOrder(trust_radius=None), train_data=train)
    assert rep.info["accepted"] and rep.info["step_scale"] == 1.0 and rep.info["trials"] == 1, rep.info
    for a, b in zip(plain.parameters(), safe.parameters()):
        assert torch.equal(a, b)
