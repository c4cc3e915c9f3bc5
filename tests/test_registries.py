"""One registry per extension point (estimators, strategies, rules, forget objectives): a name that is not
registered raises naming the point and listing the names (nothing falls through), a name registered twice raises,
and an entry added from outside the package runs end to end through the public calls, checked against an oracle
written here."""

import pytest
import torch
import torch.nn.functional as F

import sapsel_kernels as sk
from sapsel_kernels.estimators import ESTIMATOR_REGISTRY, Estimate, EstimatorSpec, register_estimator
from sapsel_kernels.forget import OBJECTIVE_REGISTRY, Objective, register_objective
from sapsel_kernels.rules import RULE_REGISTRY, FirstOrder, register_rule
from sapsel_kernels.strategies import STRATEGY_REGISTRY, Strategy, register_strategy

# the built-in names, written out (the public tuples are derived from the registries: comparing with them would
# compare the registry with itself)
REGISTRIES = [(ESTIMATOR_REGISTRY, "estimator",
               ("hutchinson", "gauss_newton", "squared_grad", "fisher", "grad_abs", "exact")),
              (STRATEGY_REGISTRY, "selection strategy",
               ("hessian", "hessian_smallest", "hessian_affected", "hessian_corrected", "hessian_ratio", "all",
                "last_layer", "random", "grad_abs", "ssd", "hessian_flat", "ssd_floor")),
              (RULE_REGISTRY, "unlearning method",
               ("first_order", "second_order", "diag_newton", "sam_finetune", "gradient_ascent", "targeted")),
              (OBJECTIVE_REGISTRY, "forget objective", ("npo", "uniform", "calibrated"))]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))


@pytest.mark.parametrize("reg,kind,names", REGISTRIES)
def test_unknown_and_duplicate_names_raise(reg, kind, names):
    assert reg.names() == names
    assert sk.hessian.ESTIMATORS == ESTIMATOR_REGISTRY.names() and sk.strategies.STRATEGIES == STRATEGY_REGISTRY.names()
    assert sk.rules.METHODS == RULE_REGISTRY.names()
    with pytest.raises(ValueError, match=f"unknown {kind} 'nope'; choose one of"):
        reg["nope"]
    assert "nope" not in reg and [] not in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.register(names[0], reg[names[0]])


def test_public_calls_refuse_unknown_names():
    m = _model()
    with pytest.raises(ValueError, match="estimator must be one of"):
        sk.hessian_diag(m, _ce, [_data()], estimator="nope")
    with pytest.raises(ValueError, match="unknown selection strategy"):
        sk.select_parameters(m, "nope", 0.1)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        sk.rules.as_method("nope")
    with pytest.raises(ValueError, match="objective must be one of"):
        sk.forget(m, lambda t: [1, 2], "a 1234", "1234", update=sk.UpdateConfig(objective="nope"))


def test_an_added_strategy_runs_through_select_parameters():
    """|θ| (weight magnitude), added from outside: select_parameters ranks by it; oracle: torch.topk."""
    def magnitude(ctx):
        return ctx.space.gather(dtype=torch.float32).abs(), 0

    register_strategy("magnitude", Strategy(reads=(), score=magnitude))
    try:
        m = _model()
        sel = sk.select_parameters(m, "magnitude", 5)
        flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).abs()
        assert set(sel.indices.tolist()) == set(torch.topk(flat, 5).indices.tolist())
        # its applicability follows its reads: a knob it does not read is refused
        with pytest.raises(ValueError, match="n_probes does not apply"):
            sk.select_parameters(m, "magnitude", 5, n_probes=3)
        with pytest.raises(TypeError, match="expected a sapsel_kernels.strategies.Strategy"):
            register_strategy("bad", object())
    finally:
        STRATEGY_REGISTRY.unregister("magnitude")
    assert "magnitude" not in STRATEGY_REGISTRY


def test_an_added_estimator_runs_through_hessian_diag():
    """The squared mean gradient, added as a data-once estimator; oracle: autograd on the concatenated batch."""
    def squared_mean_grad(model, loss, batches, space, comm, *, variance, progress, exact_max_numel):
        (b,) = list(batches)
        g = torch.autograd.grad(loss(model, b), space.params)
        mean = torch.cat([x.reshape(-1) for x in g]).float() ** 2
        return Estimate(mean, torch.zeros_like(mean) if variance else None, 1, {})

    register_estimator("sq_mean_grad", EstimatorSpec(squared_mean_grad, stochastic=False))
    try:
        m, d = _model(), _data()
        est = sk.hessian_diag(m, _ce, [d], estimator="sq_mean_grad")
        g = torch.autograd.grad(_ce(m, d), list(m.parameters()))
        torch.testing.assert_close(est.mean, torch.cat([x.reshape(-1) for x in g]) ** 2)
        assert torch.equal(est.stderr, torch.zeros_like(est.mean))  # declared deterministic
        with pytest.raises(ValueError, match="does not apply"):
            sk.hessian_diag(m, _ce, [d], estimator="sq_mean_grad", n_probes=4)
        with pytest.raises(ValueError, match="probe loop"):
            register_estimator("sampled", EstimatorSpec(None))
    finally:
        ESTIMATOR_REGISTRY.unregister("sq_mean_grad")


def test_an_added_rule_runs_through_unlearn():
    """Half a first-order step, added as a rule: unlearn(method=name) equals FirstOrder(tau / 2)."""
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True, kw_only=True)
    class HalfStep(FirstOrder):
        name: ClassVar[str] = "half_step"

        def delta(self, prob):
            return super().delta(prob) / 2

    register_rule(HalfStep)
    try:
        d = _data()
        z, zt = (d[0][:4], d[1][:4]), (d[0][:4], (d[1][:4] + 1) % 3)
        a, b = _model(), _model()
        sel = sk.select(torch.arange(sk.ParamSpace(a).numel, dtype=torch.float32), k=10)
        sk.unlearn(a, _ce, z, zt, sel, method=HalfStep(tau=0.2))
        sk.unlearn(b, _ce, z, zt, sel, method=FirstOrder(tau=0.1))
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q)
        assert isinstance(sk.rules.as_method("half_step", tau=0.2), HalfStep)
    finally:
        RULE_REGISTRY.unregister("half_step")


def test_objective_options_follow_the_entry():
    register_objective("npo_again", Objective(OBJECTIVE_REGISTRY["npo"].build, many_secrets=False))
    try:
        m = _model()
        with pytest.raises(ValueError, match="per_token applies to objective='npo' only, not 'npo_again'"):
            sk.forget(m, lambda t: [1, 2], "a 1234", "1234",
                      update=sk.UpdateConfig(objective="npo_again", per_token=True))
    finally:
        OBJECTIVE_REGISTRY.unregister("npo_again")
