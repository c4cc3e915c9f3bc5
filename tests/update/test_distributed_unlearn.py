"""``unlearn(..., group=)`` over torch.distributed (gloo, CPU, world sizes 2 and 4): every rank passes its own shard
of Z, Z̃ (and train_data); the result must be the single-process result on the concatenated data.

* direct rules (first_order, second_order, diag_newton with and without ``diag``): G_S and the restricted Hessian
  products are sums over points, all-reduced over k values: equal to one process up to the order of the float sum;
* iterative rules (sam_finetune, gradient_ascent): each step's gradient at S is averaged over the ranks, one batch
  per rank, so with equal shards a step equals one process on the concatenated batch;
* targeted: its NPO term is per batch (nonlinear), so the oracle is a hand-written loop over the ranks' shards
  (SGD on the mean over the shards of each shard's objective gradient), independent of the package's optimizers;
* the strategies' scores (``parameter_scores`` / ``select_parameters(group=)``: hessian, grad_abs, ssd) equal one
  process on the concatenated data;
* bad input fails on EVERY rank with the model untouched, and nothing hangs.

Everything is float64, so "equal" means within 1e-12 (the summation order differs) and the replicas bit-identical.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import sapsel_kernels as sk
from tests.helpers.dist import run_world


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()


def _data():
    g = torch.Generator().manual_seed(3)
    xz = torch.randn(8, 5, generator=g, dtype=torch.float64)
    yz = torch.randint(0, 3, (8,), generator=g)
    xt = torch.randn(16, 5, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (16,), generator=g)
    return (xz, yz), (xz, (yz + 1) % 3), (xt, yt)


def _selection(model):
    space = sk.ParamSpace(model)
    scores = torch.cos(torch.arange(space.numel, dtype=torch.float64) * 0.37).abs()
    return sk.select(scores, fraction=0.25, space=space)


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _shard(batch, rank, world):
    n = batch[0].shape[0] // world
    return tuple(t[rank * n:(rank + 1) * n] for t in batch)


# the direct and iterative methods with their config; train_data where the rule needs it
CASES = {
    "first_order": (sk.FirstOrder(tau=0.05), False),
    "second_order": (sk.SecondOrder(damping=2.0, cg_iters=8), True),
    "diag_newton_diag": (None, False),  # built per call: DiagNewton(diag=...) with n_train
    "diag_newton": (sk.DiagNewton(n_probes=4, seed=5, damping=1.0), True),
    "sam_finetune": (sk.SAMFinetune(steps=3, lr=0.2, rho=0.05), False),
    "gradient_ascent": (sk.GradientAscent(steps=3, lr=0.1), False),
}


def _diag(model):
    space = sk.ParamSpace(model)
    return torch.linspace(0.01, 0.5, space.numel, dtype=torch.float64)


def _call(model, z, zt, train, name, group=None):
    method, needs_train = CASES[name]
    kw = {}
    if name == "diag_newton_diag":
        method, kw = sk.DiagNewton(diag=_diag(model), damping=1.0), {"n_train": 16}
    elif needs_train:
        kw["train_data"] = train
    sel = _selection(model.module if hasattr(model, "module") else model)
    return sk.unlearn(model, _ce, z, zt, sel, method, group=group, **kw)


STRATEGY_CASES = {"hessian": {"n_probes": 6, "seed": 3}, "grad_abs": {}, "ssd": {"fisher_points": None}}


def _strategy_data(strategy, kw, z, train):
    if strategy == "grad_abs":
        return {"affected": z}
    if strategy == "ssd":
        return {"affected": z, "data": train, **kw}
    return {"data": [train], **kw}


def _single(name):
    model = _model()
    z, zt, train = _data()
    rep = _call(model, z, zt, train, name)
    return _flat(model), rep


def _targeted_oracle(world, steps, lr, beta):
    """SGD on S, by hand: each step θ_S -= lr · mean_r ∇_S obj_r(θ) with obj_r = CE(Z̃_r) + (2/β) softplus(β (L*_r -
    CE(Z_r))), L*_r = CE(Z_r) at θ* (no package code but the selection)."""
    model = _model()
    z, zt, _ = _data()
    mask = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.bool)
    mask[_selection(model).indices] = True
    params = list(model.parameters())
    shards = [(_shard(z, r, world), _shard(zt, r, world)) for r in range(world)]
    with torch.no_grad():
        ref = [float(_ce(model, zr)) for zr, _ in shards]
    for _ in range(steps):
        g = torch.zeros_like(mask, dtype=torch.float64)
        for (zr, ztr), lr_ref in zip(shards, ref):
            obj = _ce(model, ztr) + (2 / beta) * F.softplus(beta * (lr_ref - _ce(model, zr)))
            g += torch.cat([t.reshape(-1) for t in torch.autograd.grad(obj, params)])
        g /= world
        with torch.no_grad():
            flat = _flat(model) - lr * torch.where(mask, g, torch.zeros_like(g))
            torch.nn.utils.vector_to_parameters(flat, params)
    return _flat(model)


def _worker(rank, world, wrap_ddp):
    group = dist.group.WORLD
    z, zt, train = _data()
    zr, ztr, tr = _shard(z, rank, world), _shard(zt, rank, world), _shard(train, rank, world)
    out = {}

    def wrapped():
        m = _model()
        return (torch.nn.parallel.DistributedDataParallel(m) if wrap_ddp else m), m

    def record(model, plain, rep):
        theta = _flat(plain)
        every = [torch.empty_like(theta) for _ in range(world)]
        dist.all_gather(every, theta)
        return {"theta": theta, "replicas_equal": all(torch.equal(t, theta) for t in every),
                "counts": (rep.n_gradients, rep.n_hvps, rep.n_passes), "changed": rep.n_changed}

    for name in CASES:
        model, plain = wrapped()
        out[name] = record(model, plain, _call(model, zr, ztr, tr, name, group))
    model, plain = wrapped()
    rep = sk.unlearn(model, _ce, zr, ztr, _selection(plain), sk.Targeted(steps=4, lr=0.3, beta=2.0), group=group)
    out["targeted"] = record(model, plain, rep)

    # the monitor's decision is group rank 0's, whatever the others' monitors say: the replicas stay equal
    def monitor(step):
        return {"within_budget": rank == 0 or step < 2, "done": False, "score": float(-step)}

    model, plain = wrapped()
    rep = sk.unlearn(model, _ce, zr, ztr, _selection(plain),
                     sk.Targeted(steps=6, lr=0.3, check_every=2, monitor=monitor), group=group)
    out["monitor"] = record(model, plain, rep)
    out["monitor"]["history"] = [h["accepted"] for h in rep.info["history"]]

    # the strategies' scores over the ranks' shards (replicated model): those of the concatenated data
    out["strategies"] = {}
    for strategy, kw in STRATEGY_CASES.items():
        model, plain = wrapped()
        scores, cost = sk.parameter_scores(model, strategy, loss_fn=_ce, group=group,
                                           **_strategy_data(strategy, kw, zr, tr))
        sel = sk.select_parameters(model, strategy, 0.2, loss_fn=_ce, group=group,
                                   **_strategy_data(strategy, kw, zr, tr))
        out["strategies"][strategy] = (scores, sel.indices, cost["n_gradients"], cost["n_hvps"])

    # bad input: an error on every rank, the model untouched
    errors = {}

    def attempt(key, fn):
        model, plain = wrapped()
        before = _flat(plain).clone()
        try:
            fn(model, plain)
            errors[key] = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors[key] = (type(e).__name__, str(e))
        errors[key + "_untouched"] = torch.equal(_flat(plain), before)

    empty = (zr[0][:0], zr[1][:0])
    attempt("no_data", lambda m, p: sk.unlearn(m, _ce, empty if rank == 1 else zr, empty if rank == 1 else ztr,
                                                _selection(p), "first_order", group=group))
    other = sk.select(torch.arange(sk.ParamSpace(_model()).numel, dtype=torch.float64), k=10 + rank)
    attempt("selection", lambda m, p: sk.unlearn(m, _ce, zr, ztr, other, "first_order", group=group))
    nan_z = (zr[0].clone().fill_(float("nan")), zr[1]) if rank == world - 1 else zr
    attempt("nan_first_order", lambda m, p: sk.unlearn(m, _ce, nan_z, ztr, _selection(p), "first_order",
                                                       group=group))
    attempt("nan_gradient_ascent", lambda m, p: sk.unlearn(m, _ce, nan_z, ztr, _selection(p),
                                                           sk.GradientAscent(steps=3), group=group))
    if wrap_ddp:
        attempt("ddp_without_group", lambda m, p: sk.unlearn(m, _ce, zr, ztr, _selection(p), "first_order"))
    out["errors"] = errors
    return out


def _check(results, world, wrap_ddp):
    for name in CASES:
        ref, rep = _single(name)
        for rank, res in enumerate(results):
            r = res[name]
            assert r["replicas_equal"], f"{name}: replicas diverged (world {world})"
            torch.testing.assert_close(r["theta"], ref, rtol=1e-12, atol=1e-12, msg=f"{name} rank {rank} w{world}")
            assert r["changed"] == rep.n_changed > 0, name
            # the report's cost is the group's: the same points and products as one process
            assert r["counts"][:2] == (rep.n_gradients, rep.n_hvps), (name, r["counts"], rep)
    z, _, train = _data()
    for strategy, kw in STRATEGY_CASES.items():
        model = _model()
        ref, cost = sk.parameter_scores(model, strategy, loss_fn=_ce, **_strategy_data(strategy, kw, z, train))
        ref_sel = sk.select_parameters(model, strategy, 0.2, loss_fn=_ce, **_strategy_data(strategy, kw, z, train))
        for res in results:
            scores, idx, n_grad, n_hvp = res["strategies"][strategy]
            # float32 scores; grad_abs sums float32 gradients in another order (cancellation near 0: atol)
            torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()), msg=strategy)
            assert torch.equal(idx, ref_sel.indices), strategy
            assert (n_grad, n_hvp) == (cost["n_gradients"], cost["n_hvps"]), strategy
    oracle = _targeted_oracle(world, steps=4, lr=0.3, beta=2.0)
    for res in results:
        assert res["targeted"]["replicas_equal"]
        torch.testing.assert_close(res["targeted"]["theta"], oracle, rtol=1e-12, atol=1e-12)
        assert res["monitor"]["replicas_equal"]
        assert res["monitor"]["history"] == results[0]["monitor"]["history"]
        assert all(res["monitor"]["history"]), res["monitor"]["history"]  # rank 0 accepts every block
    for rank, res in enumerate(results):
        e = res["errors"]
        for key in ("no_data", "selection", "nan_first_order", "nan_gradient_ascent") + \
                (("ddp_without_group",) if wrap_ddp else ()):
            assert e[key] is not None, f"{key}: rank {rank} raised nothing"
            assert e[key + "_untouched"], f"{key}: rank {rank}'s model was modified"
        assert e["no_data"][0] == "ValueError"
        assert ("non-empty" in e["no_data"][1]) if rank == 1 else ("rank 1 of" in e["no_data"][1]), e["no_data"]
        assert e["selection"][0] == "ValueError" and "disagree" in e["selection"][1] and "selection" in \
            e["selection"][1], e["selection"]
        assert e["nan_first_order"][0] == "NonFiniteError", e["nan_first_order"]
        bad = world - 1
        if rank == bad:
            assert e["nan_gradient_ascent"][0] == "NonFiniteError", e["nan_gradient_ascent"]
        else:
            assert e["nan_gradient_ascent"][0] == "ValueError" and f"rank {bad} of" in e["nan_gradient_ascent"][1]
        if wrap_ddp:
            assert e["ddp_without_group"][0] == "ValueError" and "group=" in e["ddp_without_group"][1]


def test_unlearn_under_ddp_world2_equals_one_process():
    _check(run_world(_worker, 2, True), 2, True)


def test_unlearn_replicated_world4_equals_one_process():
    _check(run_world(_worker, 4, False), 4, False)
