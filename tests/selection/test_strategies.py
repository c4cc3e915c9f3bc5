"""select_parameters / parameter_scores: every strategy against an independent oracle on a tiny float64 model.

Oracles: torch.func.hessian (exact diagonal), torch.func.grad / vmap (per-point gradients, hence the empirical
Fisher), a stable sort for the top-k sets (the test data has no tie at the boundary, asserted), and
``math.ceil(fraction * N)`` for the budget rule.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, vmap

import sapsel_kernels as sk
from sapsel_kernels.selection import resolve_k, select
from sapsel_kernels.space import ParamSpace
from sapsel_kernels.strategies import (STRATEGIES, last_layer_indices, parameter_scores, select_parameters,
                                       strategy_arguments)

from tests.helpers.models import C, D_IN, Tiny, loss_fn


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.randn(20, D_IN, dtype=torch.float64)
    y = torch.randint(0, C, (20,))
    zi = torch.arange(5)
    return model, (x[zi], (y[zi] + 1) % C), (x[zi], y[zi]), (x, y)


def _summed(model):
    names = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]

    def unflat(theta):
        out, off = {}, 0
        for n, s, k in names:
            out[n] = theta[off:off + k].view(s)
            off += k
        return out

    def summed(theta, x, y):
        return F.cross_entropy(functional_call(model, unflat(theta), (x,)), y, reduction="sum")

    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), summed


def _topk_set(scores, k, largest=True):
    v, i = torch.sort(scores, descending=largest, stable=True)
    assert v[k - 1] != v[k], "test data has a tie at the selection boundary"
    return set(i[:k].tolist())


def _exact_diag_mean(model, data):
    theta0, summed = _summed(model)
    return torch.diagonal(hessian(summed)(theta0, *data)) / data[0].shape[0]


def _fisher(model, data):
    """Diagonal empirical Fisher: mean over points of the squared per-point gradient (float64)."""
    theta0, summed = _summed(model)
    per = vmap(grad(lambda t, x, y: summed(t, x[None], y[None])), in_dims=(None, 0, 0))
    return (per(theta0, *data) ** 2).mean(0)


# ------------------------------------------------------------------------------------------- the budget rule
def test_budget_rule_is_resolve_k():
    # DigitsCNN of the labels demo: 7,178 parameters. fraction 0.001 -> ceil(7.178) = 8 everywhere
    from sapsel_kernels.demo.labels import DigitsCNN

    model = DigitsCNN()
    sp = ParamSpace(model)
    assert sp.numel == 7178
    scores = torch.randn(sp.numel)
    assert select(scores, fraction=0.001).k == 8
    assert select_parameters(model, "random", 0.001).k == 8
    assert select_parameters(model, "random", 0.001, scores=None).k == resolve_k(sp.numel, fraction=0.001)
    for b in (1e-9, 0.0105, 0.01, 0.05, 0.1, 0.5, 1.0):
        assert select_parameters(model, "random", b).k == min(sp.numel, max(1, math.ceil(b * sp.numel - 1e-6))), b
        assert select_parameters(model, "random", b).k == select(scores, fraction=b).k, b


def test_budget_int_and_errors(setup):
    model, aff, cor, train = setup
    n = ParamSpace(model).numel
    assert select_parameters(model, "random", 7).k == 7
    assert select_parameters(model, "random", n).k == n
    assert select_parameters(model, "random", 0.1).k == math.ceil(0.1 * n)
    for bad in (0.0, 1.5, -0.1, float("nan"), 0, -3, n + 1):
        with pytest.raises(ValueError):
            select_parameters(model, "random", bad)
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError):
            select_parameters(model, "random", bad)
    with pytest.raises(ValueError):
        select_parameters(model, "all", 0.0)  # validated even where it is ignored


# ------------------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("strategy,source,largest", [
    ("hessian", "train", True), ("hessian_smallest", "train", False),
    ("hessian_affected", "affected", True), ("hessian_corrected", "corrected", True)])
def test_hessian_strategies_pick_extreme_exact_diagonal(setup, strategy, source, largest):
    model, aff, cor, train = setup
    data = {"train": train, "affected": aff, "corrected": cor}[source]
    arg = {"train": "data"}.get(source, source)
    k = 6
    sel = select_parameters(model, strategy, k, loss_fn=loss_fn, estimator="exact", **{arg: data})
    oracle = _exact_diag_mean(model, data).float()
    assert set(sel.indices.tolist()) == _topk_set(oracle, k, largest)
    assert sel.k == k and sel.space_signature == ParamSpace(model).signature
    assert sel.indices.dtype == torch.int64 and bool((sel.indices[1:] > sel.indices[:-1]).all())


def test_hessian_ratio_is_the_ratio_of_exact_diagonals(setup):
    """hessian_ratio = max(diag H_Z, 0) / max(diag H_D, 1e-2 · mean(max(diag H_D, 0))), from torch.func.hessian;
    with Hutchinson both estimates use the same seed, and the cost counts both."""
    from sapsel_kernels.strategies import RATIO_FLOOR

    model, aff, cor, train = setup
    hz, hd = _exact_diag_mean(model, aff), _exact_diag_mean(model, train)
    assert bool((hd < 0).any()) and bool((hz < 0).any()), "the fixture must exercise both clamps"
    floor = RATIO_FLOOR * hd.clamp(min=0).mean()
    assert bool((hd.clamp(min=0) < floor).any()), "the fixture must exercise the floor"
    oracle = hz.clamp(min=0) / hd.clamp(min=floor)
    scores, cost = parameter_scores(model, "hessian_ratio", loss_fn=loss_fn, affected=aff, data=train,
                                    estimator="exact")
    torch.testing.assert_close(scores, oracle.float(), rtol=1e-4, atol=1e-6)
    assert cost["n_gradients"] == 5 + 20 and cost["n_hvps"] == 0
    k = 6
    sel = select_parameters(model, "hessian_ratio", k, loss_fn=loss_fn, affected=aff, data=train, estimator="exact")
    assert set(sel.indices.tolist()) == _topk_set(oracle.float(), k)
    # Hutchinson: the ratio of the two hessian_diag estimates (same seed), 8 probes per point of each
    s2, c2 = parameter_scores(model, "hessian_ratio", loss_fn=loss_fn, affected=aff, data=train, n_probes=8, seed=4)
    ez = sk.hessian_diag(model, loss_fn, aff, n_probes=8, seed=4).mean
    ed = sk.hessian_diag(model, loss_fn, train, n_probes=8, seed=4).mean
    f2 = RATIO_FLOOR * float(ed.clamp(min=0).mean())
    torch.testing.assert_close(s2, (ez.clamp(min=0) / ed.clamp(min=f2)).float())
    assert c2["n_hvps"] == 8 * (5 + 20) and c2["n_gradients"] == 0
    with pytest.raises(ValueError, match="needs data"):
        parameter_scores(model, "hessian_ratio", loss_fn=loss_fn, affected=aff)
    with pytest.raises(ValueError, match="needs affected"):
        parameter_scores(model, "hessian_ratio", loss_fn=loss_fn, data=train)


class _Bag(torch.nn.Module):
    """An embedding bag and a classifier: the rows of tokens a batch does not contain get an exactly zero gradient."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 3)
        self.fc = torch.nn.Linear(3, C)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids)).mean(1))


def test_hessian_flat_is_the_flattest_training_curvature_among_coordinates_z_touches():
    """hessian_flat: the k smallest |diag H_D| (torch.func.hessian) among the coordinates where ∇L(Z) ≠ 0
    (torch.func.grad); Z holds tokens 0-2 only, so the embedding rows 3-6 are never chosen while Z's coordinates
    remain."""
    torch.manual_seed(3)
    model = _Bag().double()
    ids = torch.randint(0, 7, (24, 4))
    y = torch.randint(0, C, (24,))
    z_ids = torch.randint(0, 3, (5, 4))
    z_y = torch.randint(0, C, (5,))
    bag_loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    names = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def summed(theta, x, t):
        out, off = {}, 0
        for n, shape, k in names:
            out[n] = theta[off:off + k].view(shape)
            off += k
        return F.cross_entropy(functional_call(model, out, (x,)), t, reduction="sum")

    d = torch.diagonal(hessian(summed)(theta0, ids, y)) / 24
    gz = grad(summed)(theta0, z_ids, z_y)
    touched = gz != 0
    assert 0 < int(touched.sum()) < theta0.numel() - 9, "the fixture must leave rows untouched"
    k = 5
    oracle = torch.where(touched, -d.abs(), torch.full_like(d, -1e9))
    sel = select_parameters(model, "hessian_flat", k, loss_fn=bag_loss, data=[(ids, y)], affected=[(z_ids, z_y)],
                            estimator="exact")
    assert set(sel.indices.tolist()) == _topk_set(oracle.float(), k)
    assert bool(touched[sel.indices].all())
    scores, cost = parameter_scores(model, "hessian_flat", loss_fn=bag_loss, data=[(ids, y)],
                                    affected=[(z_ids, z_y)], estimator="exact")
    assert cost["n_gradients"] == 24 + 5
    assert bool((scores[~touched] < scores[touched].min()).all())
    with pytest.raises(ValueError, match="needs affected"):
        parameter_scores(model, "hessian_flat", loss_fn=bag_loss, data=[(ids, y)])


def test_hutchinson_default_is_close_to_exact(setup):
    # the default estimator (Hutchinson) ranks by an estimate of the same diagonal: its scores agree with the exact
    # diagonal within 6 standard errors per coordinate, and they are hessian_diag's
    model, aff, cor, train = setup
    scores, cost = parameter_scores(model, "hessian", loss_fn=loss_fn, data=train, n_probes=64)
    exact = _exact_diag_mean(model, train).float()
    est = sk.hessian_diag(model, loss_fn, train, n_probes=64)
    torch.testing.assert_close(scores, est.mean)
    z = (scores - exact).abs() / est.stderr.clamp_min(1e-12)
    assert float(z.max()) < 6.0
    assert cost["n_hvps"] == 64 * 20 and cost["wall_time_s"] >= 0


def test_precomputed_scores_are_reused(setup):
    model, aff, cor, train = setup
    scores, _ = parameter_scores(model, "hessian", loss_fn=loss_fn, data=train, estimator="exact")
    a = select_parameters(model, "hessian", 5, scores=scores)  # no data needed
    b = select_parameters(model, "hessian", 5, loss_fn=loss_fn, data=train, estimator="exact")
    assert torch.equal(a.indices, b.indices)
    with pytest.raises(ValueError, match="entries"):
        select_parameters(model, "hessian", 5, scores=torch.ones(3))


def test_loss_rule_criterion(setup):
    # a torch loss module works wherever loss_fn does
    model, aff, cor, train = setup
    a = select_parameters(model, "hessian", 6, loss_fn=loss_fn, data=train, estimator="exact")
    b = select_parameters(model, "hessian", 6, loss_fn=torch.nn.CrossEntropyLoss(), data=train, estimator="exact")
    assert torch.equal(a.indices, b.indices)


def test_last_layer_strategy(setup):
    model, aff, cor, train = setup
    sp = ParamSpace(model)
    ll = last_layer_indices(sp)
    lo, hi = sp.range_of("fc.weight")[0], sp.range_of("fc.bias")[1]
    assert ll.tolist() == list(range(lo, hi))
    assert last_layer_indices(sp, "l1").tolist() == list(range(0, lo))
    with pytest.raises(ValueError, match="no parameter"):
        last_layer_indices(sp, "nope")
    big = select_parameters(model, "last_layer", 0.9, loss_fn=loss_fn, data=train)
    assert big.indices.tolist() == ll.tolist()  # budget above the layer size: the whole layer only
    k = 5
    small = select_parameters(model, "last_layer", k, loss_fn=loss_fn, data=train, estimator="exact")
    d = _exact_diag_mean(model, train).float()[lo:hi]
    assert set(small.indices.tolist()) == {lo + i for i in _topk_set(d, k)}


def test_all_and_random_control(setup):
    model, aff, cor, train = setup
    n = ParamSpace(model).numel
    assert select_parameters(model, "all", 0.1).indices.tolist() == list(range(n))
    r1 = select_parameters(model, "random", 7, seed=3)
    r2 = select_parameters(model, "random", 7, seed=3)
    r3 = select_parameters(model, "random", 7, seed=4)
    assert torch.equal(r1.indices, r2.indices) and not torch.equal(r1.indices, r3.indices)
    assert r1.k == 7 and len(set(r1.indices.tolist())) == 7
    # the random control has the size of the strategy it controls, at every budget
    for b in (0.05, 0.2, 7):
        h = select_parameters(model, "hessian", b, loss_fn=loss_fn, data=train, estimator="exact")
        assert select_parameters(model, "random", b, seed=1).k == h.k
    assert parameter_scores(model, "random")[0] is None and parameter_scores(model, "all")[0] is None


def test_grad_abs(setup):
    model, aff, cor, train = setup
    theta0, summed = _summed(model)
    g = (grad(summed)(theta0, *aff) / 5).abs().float()
    ga = select_parameters(model, "grad_abs", 6, loss_fn=loss_fn, affected=aff)
    assert set(ga.indices.tolist()) == _topk_set(g, 6)
    # uneven batches: the mean over points, not over batches
    split = [(aff[0][:2], aff[1][:2]), (aff[0][2:], aff[1][2:])]
    s, cost = parameter_scores(model, "grad_abs", loss_fn=loss_fn, affected=split)
    torch.testing.assert_close(s, g, rtol=1e-6, atol=1e-7)
    assert cost["n_gradients"] == 5


def test_ssd_is_the_ratio_of_empirical_fishers(setup):
    model, aff, cor, train = setup
    ratio = (_fisher(model, aff) / _fisher(model, train)).float()
    sel = select_parameters(model, "ssd", 6, loss_fn=loss_fn, affected=aff, data=train)
    assert set(sel.indices.tolist()) == _topk_set(ratio, 6)
    scores, cost = parameter_scores(model, "ssd", loss_fn=loss_fn, affected=aff, data=train)
    torch.testing.assert_close(scores, ratio, rtol=1e-4, atol=0)
    assert cost["n_gradients"] == 5 + 20
    # batching does not matter (a mean over points), and the F_D sample is fisher_points points drawn with seed
    split = [(train[0][:7], train[1][:7]), (train[0][7:], train[1][7:])]
    s2, _ = parameter_scores(model, "ssd", loss_fn=loss_fn, affected=aff, data=split)
    torch.testing.assert_close(s2, scores, rtol=1e-5, atol=0)
    s3, c3 = parameter_scores(model, "ssd", loss_fn=loss_fn, affected=aff, data=split, fisher_points=8, seed=2)
    keep = torch.sort(torch.randperm(20, generator=torch.Generator().manual_seed(2))[:8]).values
    sub = (train[0][keep], train[1][keep])
    torch.testing.assert_close(s3, (_fisher(model, aff) / _fisher(model, sub)).float(), rtol=1e-4, atol=0)
    assert c3["n_gradients"] == 5 + 8


def test_ssd_floor_is_ssd_with_a_floor_on_the_training_fisher():
    """ssd_floor: F_Z / max(F_D, SSD_FLOOR * mean F_D), the Fishers from per-point gradients (vmap / grad). Z holds
    token 6, which D never contains: F_D is exactly 0 on its embedding row, where ssd's ratio explodes and ranks
    that row first; with the floor the ranking follows F_Z there."""
    from sapsel_kernels.strategies import SSD_FLOOR

    torch.manual_seed(5)
    model = _Bag().double()
    ids = torch.randint(0, 6, (24, 4))
    y = torch.randint(0, C, (24,))
    z_ids = torch.cat([torch.full((5, 1), 6), torch.randint(0, 6, (5, 3))], 1)
    z_y = torch.randint(0, C, (5,))
    bag_loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    theta0, summed = _summed(model)
    per = vmap(grad(lambda t, x, yy: summed(t, x[None], yy[None])), in_dims=(None, 0, 0))
    fz = (per(theta0, z_ids, z_y) ** 2).mean(0)
    fd = (per(theta0, ids, y) ** 2).mean(0)
    floor = SSD_FLOOR * float(fd.mean())
    assert bool((fd[18:21] == 0).all()) and bool((fz[18:21] > 0).all()), "row 6 is Z's alone"
    assert int((fd < floor).sum()) > 3, "the floor must bind off row 6 too"
    oracle = (fz / fd.clamp(min=floor)).float()
    kw = dict(loss_fn=bag_loss, affected=[(z_ids, z_y)], data=[(ids, y)], fisher_points=None)
    scores, cost = parameter_scores(model, "ssd_floor", **kw)
    torch.testing.assert_close(scores, oracle, rtol=1e-4, atol=0)
    assert cost["n_gradients"] == 5 + 24
    sel = select_parameters(model, "ssd_floor", 5, **kw)
    assert set(sel.indices.tolist()) == _topk_set(oracle, 5)
    # ssd itself ranks the row D never uses above everything; the floored ratio does not have to
    plain, _ = parameter_scores(model, "ssd", **kw)
    assert set(torch.topk(plain, 3).indices.tolist()) == {18, 19, 20}
    assert float(scores[18:21].max()) < float(plain[18:21].min())
    with pytest.raises(ValueError, match="needs data"):
        parameter_scores(model, "ssd_floor", loss_fn=bag_loss, affected=[(z_ids, z_y)])


def test_strategy_names_and_errors(setup):
    model, aff, cor, train = setup
    assert STRATEGIES == ("hessian", "hessian_smallest", "hessian_affected", "hessian_corrected", "hessian_ratio",
                          "all", "last_layer", "random", "grad_abs", "ssd", "hessian_flat", "ssd_floor")
    with pytest.raises(ValueError, match="unknown selection strategy"):
        select_parameters(model, "magic", 3)
    with pytest.raises(ValueError, match="now called 'ssd'"):
        select_parameters(model, "fisher", 3, loss_fn=loss_fn, affected=aff, data=train)
    with pytest.raises(ValueError, match="needs data"):
        select_parameters(model, "hessian", 3, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="needs affected"):
        select_parameters(model, "grad_abs", 3, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="needs data"):
        select_parameters(model, "ssd", 3, loss_fn=loss_fn, affected=aff)
    with pytest.raises(TypeError, match="one-shot"):
        select_parameters(model, "hessian", 3, loss_fn=loss_fn, data=iter([train]))
    with pytest.raises(ValueError, match="hessian_diag keyword arguments does not apply to strategy 'grad_abs'"):
        parameter_scores(model, "grad_abs", loss_fn=loss_fn, affected=aff, hvp="rev_rev")
    s, _ = parameter_scores(model, "hessian", loss_fn=loss_fn, data=train, n_probes=4, hvp="rev_rev")
    assert s.shape == (ParamSpace(model).numel,)
    assert sk.select_parameters is select_parameters and sk.parameter_scores is parameter_scores


# ------------------------------------------------------------------------------------------- applicability
SCORE_BASED = ("hessian", "hessian_smallest", "hessian_affected", "hessian_corrected", "last_layer", "grad_abs",
               "ssd", "ssd_floor")
NOT_READ = [  # (strategy, a knob it does not read, passed with its default value: an error)
    ("ssd", {"n_probes": 32}), ("ssd", {"estimator": "hutchinson"}),
    ("ssd_floor", {"n_probes": 32}), ("ssd_floor", {"estimator": "hutchinson"}),
    ("grad_abs", {"n_probes": 32}), ("grad_abs", {"estimator": "hutchinson"}),
    ("grad_abs", {"fisher_points": 512}), ("hessian", {"fisher_points": 512}),
    ("hessian_smallest", {"fisher_points": None}), ("hessian", {"last_layer_prefix": "fc"}),
    ("hessian_flat", {"fisher_points": 512}),
    ("random", {"n_probes": 32}), ("random", {"estimator": "hutchinson"}), ("all", {"fisher_points": 512}),
]


def _inputs(setup):
    model, aff, cor, train = setup
    return {"loss_fn": loss_fn, "data": train, "affected": aff, "corrected": cor}


def test_the_request_context_is_accepted_by_every_strategy(setup):
    """The loop users write: the whole context of an unlearning request, every strategy, one call. Each reads what
    it needs; the result equals the call with only what it reads."""
    from sapsel_kernels.strategies import CONTEXT

    model, aff, cor, train = setup
    ctx = {"loss_fn": loss_fn, "data": train, "affected": aff, "corrected": cor, "seed": 0, "group": None}
    assert set(ctx) == set(CONTEXT)
    for s in STRATEGIES:
        sel = sk.select_parameters(model, s, 0.2, **ctx)
        own = {k: v for k, v in ctx.items() if k in strategy_arguments(s)}
        assert torch.equal(sel.indices, sk.select_parameters(model, s, 0.2, **own).indices), s
        scores, _ = sk.parameter_scores(model, s, **ctx)
        assert (scores is None) == (s in ("all", "random"))
    # context with precomputed scores: accepted and unread
    scores = torch.rand(ParamSpace(model).numel, generator=torch.Generator().manual_seed(0))
    assert sk.select_parameters(model, "hessian", 3, scores=scores, **ctx).k == 3


@pytest.mark.parametrize("strategy,extra", NOT_READ, ids=[f"{s}-{next(iter(e))}" for s, e in NOT_READ])
def test_an_argument_the_strategy_does_not_read_is_an_error(setup, strategy, extra):
    model, aff, cor, train = setup
    named = {"@aff": aff, "@cor": cor, "@train": train}
    extra = {k: named.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}
    (name,) = extra
    needed = {k: v for k, v in _inputs(setup).items() if k in strategy_arguments(strategy) and k not in extra}
    with pytest.raises(ValueError, match=rf"select_parameters: {name} does not apply to strategy '{strategy}'"):
        select_parameters(model, strategy, 3, **needed, **extra)
    if name != "last_layer_prefix":
        with pytest.raises(ValueError, match=rf"parameter_scores: {name} does not apply to strategy '{strategy}'"):
            parameter_scores(model, strategy, **needed, **extra)


@pytest.mark.parametrize("strategy", SCORE_BASED)
def test_with_scores_no_estimation_argument_applies(setup, strategy):
    model, aff, cor, train = setup
    scores = torch.rand(ParamSpace(model).numel, generator=torch.Generator().manual_seed(0))
    sel = select_parameters(model, strategy, 3, scores=scores)  # needs nothing else
    assert sel.k == 3
    for extra in ({"n_probes": 32}, {"estimator": "hutchinson"}, {"fisher_points": 512}):
        (name,) = extra
        if name in strategy_arguments(strategy):  # read for the estimate, which scores= replaces
            match = rf"{name} does not apply when scores= is given"
        else:  # never read by this strategy
            match = rf"{name} does not apply to strategy '{strategy}'"
        with pytest.raises(ValueError, match=match):
            select_parameters(model, strategy, 3, scores=scores, **extra)


def test_arguments_the_strategy_reads_are_accepted(setup):
    # every argument listed by strategy_arguments is accepted, with defaults passed explicitly; None for a data
    # argument means "not given"
    model, aff, cor, train = setup
    values = {**_inputs(setup), "seed": 0, "n_probes": 4, "estimator": "exact", "fisher_points": 512,
              "last_layer_prefix": "fc", "group": None}  # group=None: one process (test_distributed_unlearn)
    for strategy in STRATEGIES:
        reads = strategy_arguments(strategy)
        kw = {k: v for k, v in values.items() if k in reads}
        if kw.get("estimator") == "exact":
            kw.pop("n_probes")  # hessian_diag's own rule: n_probes other than 32 only for the stochastic estimators
        sel = select_parameters(model, strategy, 3, **kw, **{k: None for k in ("data", "affected", "corrected")
                                                             if k not in reads})
        assert sel.k == (ParamSpace(model).numel if strategy == "all" else 3), strategy
    assert strategy_arguments("all") == () and strategy_arguments("random") == ("seed",)
    assert strategy_arguments("ssd") == ("scores", "loss_fn", "affected", "data", "fisher_points", "seed", "group")
    assert strategy_arguments("hessian", scores=True) == ("scores",)
    assert strategy_arguments("last_layer", scores=True) == ("scores", "last_layer_prefix")
    with pytest.raises(ValueError, match="unknown selection strategy"):
        strategy_arguments("fisher")
    # the signature shows the documented defaults
    import inspect

    sig = inspect.signature(select_parameters).parameters
    assert [repr(sig[n].default) for n in ("loss_fn", "seed", "n_probes", "estimator", "fisher_points")] == \
        ["None", "0", "32", "'hutchinson'", "512"]


def test_nonfinite_scores_raise(setup):
    model, aff, cor, train = setup
    bad = (train[0].clone(), train[1])
    bad[0][0, 0] = float("nan")
    with pytest.raises(sk.NonFiniteError):
        select_parameters(model, "grad_abs", 3, loss_fn=loss_fn, affected=bad)
    with pytest.raises(sk.NonFiniteError):
        select_parameters(model, "hessian", 3, scores=torch.full((ParamSpace(model).numel,), float("nan")))


def test_scores_in_estimation_mode():
    # BatchNorm in train mode: the scores are those of the eval-mode model, and the mode and buffers are restored
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    s_train, _ = parameter_scores(model, "grad_abs", loss_fn=loss_fn, affected=(x, y))
    assert model.training and all(torch.equal(b, bufs[n]) for n, b in model.named_buffers())
    model.eval()
    s_eval, _ = parameter_scores(model, "grad_abs", loss_fn=loss_fn, affected=(x, y))
    assert torch.equal(s_train, s_eval)


def test_last_layer_is_the_tied_output_head_of_a_hf_model():
    """GPT-2 ties lm_head.weight to transformer.wte.weight, which named_parameters lists once, first; the last-named
    parameter is ln_f. last_layer must mean the output head (the tied matrix), not ln_f."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    sp = ParamSpace(model)
    assert model.lm_head.weight is model.transformer.wte.weight and sp.names[-1].startswith("transformer.ln_f")
    ll = last_layer_indices(sp, model=model)
    assert ll.tolist() == list(range(sp.offsets[0], sp.offsets[0] + 32 * 8))  # the (tied) head's 256 weights
    assert last_layer_indices(sp).numel() == 2 * 8  # without the model: the last-named layer, ln_f
    assert last_layer_indices(sp, "transformer.ln_f", model=model).numel() == 16  # an explicit prefix wins
    sel = select_parameters(model, "last_layer", 1.0)
    assert sel.indices.tolist() == ll.tolist()


@pytest.mark.parametrize("budget,exc", [(0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                        (2**70, ValueError), (-1, ValueError), (True, TypeError)])
def test_a_bad_budget_names_budget(setup, budget, exc):
    model = setup[0]
    with pytest.raises(exc, match="budget"):
        select_parameters(model, "random", budget)
