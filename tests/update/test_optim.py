"""SparseSAM / SparseSGD / SparseAdamW against independent oracles.

* selection = all: davda54/sam semantics written out in the test (e = rho g/||g||, ASAM e = rho T^2 g/||T g||,
  T = |w| + eta; restore; base step) with torch.optim.SGD / AdamW taking the base step;
* partial selection: dense SAM on the selected sub-vector only (a leaf tensor spliced into the flat parameters with
  functional_call), torch.optim doing the base step on it - i.e. the mask applied to gradient, weight decay and
  momentum; with ``normalize="full"`` the norm comes from the full gradient (SSAM);
* bitwise: coordinates outside S never change; a resumed state_dict continues the identical trajectory; an inf/NaN
  in either pass leaves every parameter and all state exactly as before.

Models are float64 where the comparison is to torch.optim: the kernels then compute in float64 too and any
disagreement above 1e-10 is a formula error, not rounding.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import sapsel_kernels as sk
from sapsel_kernels import use_backend
from sapsel_kernels.errors import NonFiniteError
from sapsel_kernels.optim import SparseAdamW, SparseSAM, SparseSGD, frozen_bn_stats

RHO, ETA = 0.05, 0.01


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _data(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _base_opt(base, params, lr, kw):
    return torch.optim.SGD(params, lr=lr, **kw) if base == "sgd" else torch.optim.AdamW(params, lr=lr, **kw)


BASES = [
    ("sgd", dict(momentum=0.9, weight_decay=0.01)),
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("sgd", dict()),
    ("adamw", dict(weight_decay=0.1, betas=(0.8, 0.95))),
]


# ---------------------------------------------------------------------------------- selection = all: davda54 oracle
def _davda54_steps(model, batch, base, kw, lr, adaptive, steps):
    """SAM/ASAM exactly as davda54/sam defines it (dense, all parameters), written independently of the package."""
    params = list(model.parameters())
    opt = _base_opt(base, params, lr, kw)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, batch).backward()
        with torch.no_grad():
            scaled = [((p.abs() + ETA) if adaptive else 1.0) * p.grad for p in params]
            norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2)
            old = [p.detach().clone() for p in params]
            for p in params:
                # davda54: e = (T^2 if adaptive else 1) * g * rho / (||T g|| + 1e-12), here with ASAM's T = |w| + eta
                e = (((p.abs() + ETA) ** 2) if adaptive else 1.0) * p.grad * (RHO / (norm + 1e-12))
                p.add_(e)
        opt.zero_grad()
        _loss(model, batch).backward()
        with torch.no_grad():
            for p, o in zip(params, old):
                p.copy_(o)
        opt.step()


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("base,kw", BASES, ids=["sgd-mom-wd", "sgd-nesterov", "sgd-plain", "adamw"])
def test_selection_all_equals_published_sam(base, kw, adaptive):
    batch = _data()
    ours, ref = _model(), _model()
    space = sk.ParamSpace(ours)
    sel = sk.Selection.from_indices(torch.arange(space.numel), space=space)
    lr = 0.1 if base == "sgd" else 0.01
    opt = SparseSAM(ours, sel, base=base, lr=lr, rho=RHO, adaptive=adaptive, eta=ETA, **kw)
    for _ in range(4):
        opt.step(lambda: _loss(ours, batch).backward())
        assert not opt.last_step_skipped
    _davda54_steps(ref, batch, base, kw, lr, adaptive, 4)
    diff = (_flat(ours) - _flat(ref)).abs().max().item()
    moved = (_flat(ref) - _flat(_model())).abs().max().item()
    assert moved > 1e-3  # the oracle really moved
    assert diff < 1e-12, diff


# ---------------------------------------------------------------------------------- partial selection oracle
def _subvector_sam(model, batch, idx, base, kw, lr, adaptive, normalize, steps):
    """Dense SAM on the selected sub-vector only; torch.optim steps a leaf holding the k selected values."""
    space = sk.ParamSpace(model)
    theta = space.gather(dtype=torch.float64).clone()
    sel = theta[idx].clone().requires_grad_(True)
    opt = _base_opt(base, [sel], lr, kw)

    def grad_at(s_val):
        th = theta.index_put((idx,), s_val).requires_grad_(True)
        out = torch.func.functional_call(model, space.views(th), (batch[0],))
        (g,) = torch.autograd.grad(F.cross_entropy(out, batch[1]), th)
        return th.detach(), g

    for _ in range(steps):
        th, g = grad_at(sel.detach())
        t = (th.abs() + ETA) if adaptive else torch.ones_like(th)
        if normalize == "full":
            norm = (t * g).norm()
        else:
            norm = (t[idx] * g[idx]).norm()
        e = (t[idx] ** 2) * g[idx] * (RHO / (norm + 1e-12))
        _, g2 = grad_at(sel.detach() + e)
        sel.grad = g2[idx].clone()
        opt.step()
    return theta.index_put((idx,), sel.detach())


@pytest.mark.parametrize("normalize,adaptive", [("selected", False), ("selected", True), ("full", False),
                                                ("full", True)])
@pytest.mark.parametrize("base,kw", BASES[:2] + BASES[3:], ids=["sgd-mom-wd", "sgd-nesterov", "adamw"])
def test_partial_selection_equals_masked_dense_sam(base, kw, normalize, adaptive):
    batch = _data()
    ours = _model()
    space = sk.ParamSpace(ours)
    idx = torch.randperm(space.numel)[:20].sort().values
    lr = 0.1 if base == "sgd" else 0.01
    opt = SparseSAM(ours, idx, base=base, lr=lr, rho=RHO, adaptive=adaptive, eta=ETA, normalize=normalize, **kw)
    for _ in range(4):
        opt.step(lambda: _loss(ours, batch).backward())
    exp = _subvector_sam(_model(), batch, idx, base, kw, lr, adaptive, normalize, 4)
    assert (exp[idx] - _flat(_model())[idx]).abs().max() > 1e-4
    assert (_flat(ours) - exp).abs().max().item() < 1e-12


@pytest.mark.parametrize("base,kw", [BASES[0], BASES[3]], ids=["sgd", "adamw"])
def test_sparse_sgd_adamw_equal_torch_on_subvector(base, kw):
    batch = _data()
    ours = _model()
    space = sk.ParamSpace(ours)
    idx = torch.randperm(space.numel)[:25].sort().values
    cls = SparseSGD if base == "sgd" else SparseAdamW
    opt = cls(ours, idx, lr=0.05, **kw)
    ref = _model()
    theta = space.gather(dtype=torch.float64).clone()
    sel = theta[idx].clone().requires_grad_(True)
    ropt = _base_opt(base, [sel], 0.05, kw)
    for _ in range(5):
        opt.zero_grad()
        _loss(ours, batch).backward()
        opt.step()
        th = theta.index_put((idx,), sel)
        out = torch.func.functional_call(ref, sk.ParamSpace(ref).views(th), (batch[0],))
        ropt.zero_grad()
        F.cross_entropy(out, batch[1]).backward()
        ropt.step()
    assert (_flat(ours) - theta.index_put((idx,), sel.detach())).abs().max().item() < 1e-12


# ---------------------------------------------------------------------------------- every backend, float32
@pytest.mark.parametrize("base,kw", [BASES[1], BASES[3]], ids=["sgd-nesterov", "adamw"])
def test_backends_agree_with_oracle(backend, base, kw):
    batch = _data(torch.float32)
    ours = _model(torch.float32)
    space = sk.ParamSpace(ours)
    idx = torch.randperm(space.numel)[:30].sort().values
    lr = 0.1 if base == "sgd" else 0.01
    opt = SparseSAM(ours, idx, base=base, lr=lr, rho=RHO, adaptive=True, eta=ETA, **kw)
    for _ in range(3):
        opt.step(lambda: _loss(ours, batch).backward())
    with use_backend("reference"):
        exp = _subvector_sam(_model(torch.float64), _data(), idx, base, kw, lr, True, "selected", 3)
    # float32 kernels vs a float64 oracle over 3 steps: errors of a few float32 ulps of O(1) values per step
    assert (_flat(ours).double() - exp).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------- bitwise guarantees
@pytest.mark.parametrize("kind", ["sam-sgd", "sam-adamw", "asam-sgd-full", "sgd", "adamw"])
def test_outside_selection_bitwise_unchanged(kind):
    model = _model(torch.float32)
    batch = _data(torch.float32)
    space = sk.ParamSpace(model)
    idx = torch.randperm(space.numel)[: space.numel // 10].sort().values
    if kind.startswith("sam") or kind.startswith("asam"):
        opt = SparseSAM(model, idx, base="adamw" if "adamw" in kind else "sgd", lr=0.05, adaptive=kind.startswith("a"),
                        normalize="full" if "full" in kind else "selected", weight_decay=0.5,
                        **({} if "adamw" in kind else {"momentum": 0.9}))
    elif kind == "sgd":
        opt = SparseSGD(model, idx, lr=0.05, momentum=0.9, weight_decay=0.5)
    else:
        opt = SparseAdamW(model, idx, lr=0.05, weight_decay=0.5)
    before = _flat(model).clone()
    for _ in range(30):
        if isinstance(opt, SparseSAM):
            opt.step(lambda: _loss(model, batch).backward())
        else:
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()
    after = _flat(model)
    mask = torch.ones(space.numel, dtype=torch.bool)
    mask[idx] = False
    assert torch.equal(after[mask], before[mask])
    assert bool((after[idx] != before[idx]).all())
    # state is O(k): every state tensor has k entries in total per kind
    sizes = [v.numel() for st in opt.state.values() for key, v in st.items() if isinstance(v, torch.Tensor)]
    assert sum(sizes) % idx.numel() == 0 and sum(sizes) <= 4 * idx.numel()


def _train(opt, model, batch, steps):
    for _ in range(steps):
        if isinstance(opt, SparseSAM):
            opt.step(lambda: _loss(model, batch).backward())
        else:
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()


def _make(kind, model, idx):
    if kind == "sam-sgd":
        return SparseSAM(model, idx, base="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    if kind == "sam-adamw":
        return SparseSAM(model, idx, base="adamw", lr=0.01, adaptive=True)
    if kind == "sgd":
        return SparseSGD(model, idx, lr=0.05, momentum=0.9)
    return SparseAdamW(model, idx, lr=0.01)


@pytest.mark.parametrize("kind", ["sam-sgd", "sam-adamw", "sgd", "adamw"])
def test_state_dict_round_trip_identical_trajectory(kind):
    batch = _data(torch.float32)
    model = _model(torch.float32)
    idx = torch.randperm(sk.ParamSpace(model).numel)[:40].sort().values
    opt = _make(kind, model, idx)
    _train(opt, model, batch, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(opt, model, batch, 3)
    buf.seek(0)
    ck = torch.load(buf)
    model2 = _model(torch.float32, seed=5)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ck["model"])
    opt2 = _make(kind, model2, idx)
    opt2.load_state_dict(ck["opt"])
    _train(opt2, model2, batch, 3)
    assert torch.equal(_flat(model), _flat(model2))
    for p, q in zip(opt.space.params, opt2.space.params):
        for key, v in opt.state[p].items():
            w = opt2.state[q][key]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def test_load_state_dict_rejects_other_selection():
    model = _model(torch.float32)
    opt = SparseSGD(model, torch.tensor([1, 2, 3]), lr=0.1, momentum=0.9)
    _train(opt, model, _data(torch.float32), 1)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="selection"):
        SparseSGD(model, torch.tensor([1, 2, 4]), lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="SparseSGD"):
        SparseAdamW(model, torch.tensor([1, 2, 3])).load_state_dict(sd)


# ---------------------------------------------------------------------------------- non-finite gradients
def _snapshot(opt, model):
    st = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
          for p, s in opt.state.items()}
    return _flat(model).clone(), st


def _same(opt, model, snap):
    flat, st = snap
    if not torch.equal(_flat(model), flat):
        return False
    for p, s in opt.state.items():
        for k, v in s.items():
            w = st[id(p)].get(k)
            if isinstance(v, torch.Tensor) and not torch.equal(v, w):
                return False
            if not isinstance(v, torch.Tensor) and v != w:
                return False
    return True


def _sam_with_state(base, model, idx, batch):
    opt = SparseSAM(model, idx, base=base, lr=0.05, weight_decay=0.1, **({"momentum": 0.9} if base == "sgd" else {}))
    _train(opt, model, batch, 2)  # state exists
    return opt


def _poisoning_closure(model, batch, which_pass, flat_index, bad, scaler=None):
    """A SAM closure whose ``which_pass``-th call puts ``bad`` into model[0].weight's gradient at ``flat_index``."""
    calls = []

    def closure():
        loss = _loss(model, batch)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        calls.append(1)
        if len(calls) == which_pass:
            model[0].weight.grad.view(-1)[flat_index] = bad
        return loss

    return closure


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which_pass", [1, 2])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_nonfinite_in_either_sam_pass_raises_and_changes_nothing(bad, which_pass, base):
    # outside AMP a NaN/Inf is an error (NonFiniteError), raised with every parameter and all state as before
    model = _model(torch.float32)
    batch = _data(torch.float32)
    idx = torch.arange(0, sk.ParamSpace(model).numel, 3)
    opt = _sam_with_state(base, model, idx, batch)
    snap = _snapshot(opt, model)
    with pytest.raises(NonFiniteError, match=r"0\.weight\[0, 3\]"):
        opt.step(_poisoning_closure(model, batch, which_pass, int(idx[1]), bad))
    assert _same(opt, model, snap)
    _train(opt, model, batch, 1)  # and it recovers
    assert not opt.last_step_skipped and not _same(opt, model, snap)


@pytest.mark.parametrize("which_pass", [1, 2])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_nonfinite_in_either_sam_pass_under_grad_scaler_skips(which_pass, base):
    # the AMP contract: skipped, nothing changed, the scale lowered
    model = _model(torch.float32)
    batch = _data(torch.float32)
    idx = torch.arange(0, sk.ParamSpace(model).numel, 3)
    opt = _sam_with_state(base, model, idx, batch)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
    snap = _snapshot(opt, model)
    closure = _poisoning_closure(model, batch, which_pass, int(idx[1]), float("inf"), scaler)
    closure()
    assert opt.first_step(zero_grad=True, grad_scaler=scaler) == (which_pass != 1)
    closure()
    s0 = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert opt.last_step_skipped and _same(opt, model, snap) and scaler.get_scale() < s0


def test_exception_in_second_pass_restores_exactly():
    model = _model(torch.float32)
    batch = _data(torch.float32)
    opt = SparseSAM(model, torch.arange(0, 50, 2), lr=0.1, momentum=0.9)
    _train(opt, model, batch, 1)
    snap = _snapshot(opt, model)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("data loader failed")
        loss = _loss(model, batch)
        loss.backward()
        return loss

    with pytest.raises(KeyError):
        opt.step(closure)
    assert _same(opt, model, snap)
    # by hand: first_step then restore() is also exact, and the optimizer is usable afterwards
    opt.zero_grad()
    _loss(model, batch).backward()
    assert opt.first_step(zero_grad=True) and not torch.equal(_flat(model), snap[0])
    opt.restore()
    assert _same(opt, model, snap)
    _train(opt, model, batch, 1)
    assert not opt.last_step_skipped


@pytest.mark.parametrize("cls", [SparseSGD, SparseAdamW])
def test_nonfinite_sgd_adamw_raises_and_changes_nothing(cls):
    model = _model(torch.float32)
    batch = _data(torch.float32)
    opt = cls(model, torch.tensor([0, 5, 9, 40]), lr=0.1)
    _train(opt, model, batch, 2)
    snap = _snapshot(opt, model)
    opt.zero_grad()
    _loss(model, batch).backward()
    model[0].weight.grad.view(-1)[9] = float("nan")
    with pytest.raises(NonFiniteError, match=r"nan at 0\.weight\[1, 3\] \(flat index 9\)"):
        opt.step()
    assert _same(opt, model, snap)
    # under a GradScaler the same gradient skips the step (found by the scaler, handed over as found_inf)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    opt.zero_grad()
    scaler.scale(_loss(model, batch)).backward()
    model[0].weight.grad.view(-1)[9] = float("nan")
    scaler.step(opt)
    scaler.update()
    assert opt.last_step_skipped and _same(opt, model, snap) and scaler.get_scale() < 4.0
    # an inf outside the selection is never read: the step proceeds
    opt.zero_grad()
    _loss(model, batch).backward()
    model[0].weight.grad.view(-1)[10] = float("inf")
    opt.step()
    assert not opt.last_step_skipped and not _same(opt, model, snap)


def test_grad_scaler_equivalence_and_skip():
    batch = _data(torch.float32)
    m1, m2 = _model(torch.float32), _model(torch.float32)
    idx = torch.arange(0, sk.ParamSpace(m1).numel, 2)
    o1 = SparseSAM(m1, idx, base="sgd", lr=0.1, momentum=0.9)
    o2 = SparseSAM(m2, idx, base="sgd", lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    for _ in range(3):
        o1.step(lambda: _loss(m1, batch).backward())
        scaler.scale(_loss(m2, batch)).backward()
        o2.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(_loss(m2, batch)).backward()
        scaler.step(o2)
        scaler.update()
        o2.zero_grad()
    # power-of-two scaling is exact; only the 1e-12 norm epsilon sees the scale -> float32 rounding at most
    assert (_flat(m1) - _flat(m2)).abs().max().item() < 1e-6
    # an overflow in the second pass: scaler.step skips, nothing changes, the scale is lowered
    snap = _snapshot(o2, m2)
    scaler.scale(_loss(m2, batch)).backward()
    o2.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(_loss(m2, batch)).backward()
    m2[2].bias.grad[0] = float("inf")  # found by the scaler's own check, handed to the optimizer as found_inf
    s0 = scaler.get_scale()
    scaler.step(o2)
    scaler.update()
    assert o2.last_step_skipped and _same(o2, m2, snap) and scaler.get_scale() < s0


# ---------------------------------------------------------------------------------- API details
def test_selection_mismatch_and_bad_selection():
    model = _model(torch.float32)
    other = torch.nn.Linear(3, 3)
    space_other = sk.ParamSpace(other)
    sel_other = sk.Selection.from_indices(torch.tensor([0, 1]), space=space_other)
    with pytest.raises(ValueError, match="another model"):
        SparseSAM(model, sel_other, lr=0.1)
    fake = sk.Selection(torch.tensor([0, 1]), sk.ParamSpace(model).numel, space_signature="deadbeefdeadbeef")
    with pytest.raises(ValueError, match="another parameter space"):
        SparseSGD(model, fake, lr=0.1)
    own = sk.Selection.from_indices(torch.tensor([0, 1]), space=sk.ParamSpace(model))
    # the same tensors in another order are another space
    with pytest.raises(ValueError, match="another parameter space"):
        SparseSGD(list(model.parameters())[::-1], own, lr=0.1)
    SparseSGD(model.parameters(), own.indices, lr=0.1)  # same order: raw indices are accepted
    with pytest.raises(ValueError, match="duplicate"):
        SparseSGD(model, torch.tensor([3, 1, 3]), lr=0.1)
    with pytest.raises(IndexError, match="range"):
        SparseSGD(model, torch.tensor([1, 10 ** 6]), lr=0.1)
    with pytest.raises(TypeError, match="integer"):
        SparseSGD(model, torch.tensor([1.0, 2.0]), lr=0.1)
    with pytest.raises(TypeError, match="unknown"):
        SparseSAM(model, torch.tensor([1]), lr=0.1, betas=(0.9, 0.9))
    with pytest.raises(RuntimeError, match="first_step"):
        SparseSAM(model, torch.tensor([1]), lr=0.1).second_step()


def test_real_selection_and_empty_selection():
    model = _model(torch.float32)
    batch = _data(torch.float32)
    space = sk.ParamSpace(model)
    scores = torch.rand(space.numel)
    sel = sk.select(scores, fraction=0.1, space=space)
    opt = SparseSAM(model, sel, lr=0.1)
    _train(opt, model, batch, 1)
    assert opt.k == sel.k and not opt.last_step_skipped
    before = _flat(model).clone()
    opt0 = SparseSAM(model, torch.empty(0, dtype=torch.int64), lr=0.1, momentum=0.9)
    _train(opt0, model, batch, 2)
    assert torch.equal(_flat(model), before) and opt0.state_bytes() == 0


def test_param_groups_and_scheduler():
    model = _model(torch.float32)
    batch = _data(torch.float32)
    groups = [{"params": list(model[0].parameters()), "lr": 0.0}, {"params": list(model[2].parameters())}]
    n0 = sum(p.numel() for p in model[0].parameters())
    n = n0 + sum(p.numel() for p in model[2].parameters())
    opt = SparseSGD(groups, torch.arange(n), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = _flat(model).clone()
    _train(opt, model, batch, 2)
    sched.step()
    after = _flat(model)
    assert torch.equal(after[:n0], before[:n0]) and not torch.equal(after[n0:], before[n0:])
    assert opt.param_groups[1]["lr"] == 0.05


def test_bf16_params_fp32_state():
    model = _model(torch.bfloat16)
    batch = _data(torch.bfloat16)
    idx = torch.arange(0, sk.ParamSpace(model).numel, 4)
    opt = SparseSAM(model, idx, base="adamw", lr=0.01)
    _train(opt, model, batch, 2)
    st = next(iter(opt.state.values()))
    assert st["exp_avg"].dtype == torch.float32 and all(v.dtype == torch.bfloat16 for v in opt._saved.values())
    opt2 = SparseSAM(model, idx, base="adamw", lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    st2 = next(iter(opt2.state.values()))
    assert st2["exp_avg"].dtype == torch.float32 and torch.equal(st2["exp_avg"], st["exp_avg"])


def test_batchnorm_stats_updated_once():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    batch = _data(torch.float32)
    opt = SparseSAM(model, torch.arange(10), lr=0.1)
    opt.step(lambda: _loss(model, batch).backward())
    ref(batch[0])  # one train-mode forward = one statistics update
    assert torch.allclose(model[1].running_mean, ref[1].running_mean, atol=1e-7, rtol=0)
    assert int(model[1].num_batches_tracked) == 1
    with frozen_bn_stats(model):
        model(batch[0] * 3)
    assert int(model[1].num_batches_tracked) == 1
    assert torch.allclose(model[1].running_mean, ref[1].running_mean, atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------- torch.optim conventions, faults
def _subvector_oracle(ours, opt, make_ref_opt, idx, batch, steps):
    """``opt`` (sparse, on ``ours``) against a torch optimizer stepping a leaf that holds the k selected values."""
    ref = _model()
    space = sk.ParamSpace(ref)
    theta = space.gather(dtype=torch.float64).clone()
    sel = theta[idx].clone().requires_grad_(True)
    ropt = make_ref_opt([sel])
    for _ in range(steps):
        opt.zero_grad()
        _loss(ours, batch).backward()
        opt.step()
        out = torch.func.functional_call(ref, space.views(theta.index_put((idx,), sel)), (batch[0],))
        ropt.zero_grad()
        F.cross_entropy(out, batch[1]).backward()
        ropt.step()
    exp = theta.index_put((idx,), sel.detach())
    assert (exp[idx] - _flat(_model())[idx]).abs().max() > 1e-4  # the oracle really moved
    return (_flat(ours) - exp).abs().max().item()


@pytest.mark.parametrize("args", [(0.1, 0.9, 0.2, 0.01, False), (0.1, 0.9, 0.0, 0.05, True), (0.05, 0.5, 0.5, 0.0)],
                         ids=["dampening-wd", "nesterov", "no-nesterov-arg"])
def test_sparse_sgd_positional_arguments_equal_torch_sgd(args):
    # SparseSGD(params, selection, lr, momentum, dampening, weight_decay, nesterov): torch.optim.SGD's order
    batch = _data()
    ours = _model()
    idx = torch.randperm(sk.ParamSpace(ours).numel)[:25].sort().values
    opt = SparseSGD(ours, idx, *args)
    assert _subvector_oracle(ours, opt, lambda ps: torch.optim.SGD(ps, *args), idx, batch, 5) < 1e-12


def test_sparse_adamw_and_sam_positional_arguments():
    batch = _data()
    ours = _model()
    idx = torch.randperm(sk.ParamSpace(ours).numel)[:25].sort().values
    args = (0.01, (0.8, 0.95), 1e-6, 0.1)  # lr, betas, eps, weight_decay: torch.optim.AdamW's order
    opt = SparseAdamW(ours, idx, *args)
    assert _subvector_oracle(ours, opt, lambda ps: torch.optim.AdamW(ps, *args), idx, batch, 5) < 1e-12
    a, b = _model(), _model()
    sam_pos = SparseSAM(a, idx, "adamw", 0.01, 0.1, True, 0.02)  # base, lr, rho, adaptive, eta
    sam_kw = SparseSAM(b, idx, base="adamw", lr=0.01, rho=0.1, adaptive=True, eta=0.02)
    _train(sam_pos, a, batch, 2)
    _train(sam_kw, b, batch, 2)
    assert torch.equal(_flat(a), _flat(b)) and not torch.equal(_flat(a), _flat(_model()))


def test_defaults_are_torch_optim_defaults():
    model = _model(torch.float32)
    idx = torch.tensor([0, 1])
    g = SparseSGD(model, idx).param_groups[0]
    assert (g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"]) == (1e-3, 0, 0, 0, False)
    g = SparseAdamW(model, idx).param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 1e-2)
    g = SparseSAM(model, idx).param_groups[0]  # lr=None: the base optimizer's default
    assert (g["lr"], g["rho"], g["adaptive"], g["eta"]) == (1e-3, 0.05, False, 0.01)


NAN = float("nan")
_BAD_HPARAMS = [
    (SparseSGD, dict(lr=NAN), "lr"), (SparseSGD, dict(lr=float("inf")), "lr"), (SparseSGD, dict(lr=-1e-3), "lr"),
    (SparseSGD, dict(momentum=NAN), "momentum"), (SparseSGD, dict(momentum=-0.1), "momentum"),
    (SparseSGD, dict(dampening=NAN), "dampening"), (SparseSGD, dict(dampening=-0.5), "dampening"),
    (SparseSGD, dict(weight_decay=NAN), "weight_decay"), (SparseSGD, dict(weight_decay=-1.0), "weight_decay"),
    (SparseSGD, dict(nesterov=True), "Nesterov"), (SparseSGD, dict(momentum=0.9, dampening=0.1, nesterov=True),
                                                   "Nesterov"),
    (SparseSGD, dict(lr=torch.tensor([0.1, 0.2])), "lr"),
    (SparseSGD, dict(lr=torch.tensor(0.1, requires_grad=True)), "lr"),
    (SparseAdamW, dict(eps=NAN), "eps"), (SparseAdamW, dict(eps=-1e-8), "eps"),
    (SparseAdamW, dict(weight_decay=NAN), "weight_decay"), (SparseAdamW, dict(weight_decay=float("inf")),
                                                            "weight_decay"),
    (SparseAdamW, dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    (SparseAdamW, dict(betas=(0.9, NAN)), "beta parameter at index 1"),
    (SparseAdamW, dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (SparseAdamW, dict(betas=(0.9,)), "betas"),
    (SparseSAM, dict(rho=NAN), "rho"), (SparseSAM, dict(rho=-0.05), "rho"), (SparseSAM, dict(eta=NAN), "eta"),
    (SparseSAM, dict(eta=-0.01), "eta"), (SparseSAM, dict(norm_eps=NAN), "norm_eps"),
    (SparseSAM, dict(norm_eps=-1.0), "norm_eps"), (SparseSAM, dict(momentum=NAN), "momentum"),
    (SparseSAM, dict(base="adamw", eps=NAN), "eps"), (SparseSAM, dict(base="adamw", betas=(0.9, 1.0)), "beta"),
    (SparseSAM, dict(lr=NAN), "lr"),
]


@pytest.mark.parametrize("cls,kw,name", _BAD_HPARAMS, ids=[f"{c.__name__}-{list(k.items())[-1]}" for c, k, _ in
                                                           _BAD_HPARAMS])
def test_invalid_hyperparameters_rejected_like_torch_optim(cls, kw, name):
    model = _model(torch.float32)
    with pytest.raises(ValueError, match=name):
        cls(model, torch.tensor([0, 1]), **kw)


def test_hyperparameters_revalidated_at_every_step_and_tensor_lr():
    model = _model(torch.float32)
    batch = _data(torch.float32)
    idx = torch.arange(0, 50, 2)
    opt = SparseSGD(model, idx, lr=0.1, momentum=0.9)
    _train(opt, model, batch, 1)
    snap = _snapshot(opt, model)
    opt.param_groups[0]["momentum"] = NAN  # e.g. a broken scheduler
    with pytest.raises(ValueError, match="Invalid momentum value: nan"):
        _train(opt, model, batch, 1)
    assert _same(opt, model, snap)
    # SAM: a NaN lr set between the two steps -> the perturbation is undone, then the error
    sam = SparseSAM(model, idx, lr=0.1, momentum=0.9)
    _train(sam, model, batch, 1)
    snap = _snapshot(sam, model)
    sam.zero_grad()
    _loss(model, batch).backward()
    assert sam.first_step(zero_grad=True)
    _loss(model, batch).backward()
    sam.param_groups[0]["lr"] = NAN
    with pytest.raises(ValueError, match="Invalid lr value: nan"):
        sam.second_step()
    assert _same(sam, model, snap)
    # a 1-element Tensor lr (torch.optim's tensor lr, e.g. for schedulers) equals the float lr
    m1, m2 = _model(torch.float32), _model(torch.float32)
    o1 = SparseAdamW(m1, idx, lr=torch.tensor(0.01))
    o2 = SparseAdamW(m2, idx, lr=0.01)
    _train(o1, m1, batch, 3)
    _train(o2, m2, batch, 3)
    assert torch.equal(_flat(m1), _flat(m2))


def test_bare_parameters_masks_and_unsorted_indices():
    # torch.optim's habit: SparseSAM(model.parameters(), sel) with sel built on ParamSpace(model)
    batch = _data(torch.float32)
    models = [_model(torch.float32) for _ in range(5)]
    space = sk.ParamSpace(models[0])
    perm = torch.randperm(space.numel)[:30]
    sel = sk.Selection.from_indices(perm, space=space)
    mask = torch.zeros(space.numel, dtype=torch.bool)
    mask[perm] = True
    opts = [SparseSAM(models[0], sel, lr=0.1, momentum=0.9),
            SparseSAM(models[1].parameters(), sel.indices, lr=0.1, momentum=0.9),  # same order: raw indices
            SparseSAM(models[2], perm, lr=0.1, momentum=0.9),  # any order: sorted by as_selection
            SparseSAM(models[3], mask, lr=0.1, momentum=0.9),
            SparseSAM(models[4], space.views(mask), lr=0.1, momentum=0.9)]  # dict name -> mask
    for m, o in zip(models, opts):
        assert o.k == 30 and torch.equal(o.selection.indices, sel.indices)
        _train(o, m, batch, 3)
    for m in models[1:]:
        assert torch.equal(_flat(m), _flat(models[0]))
    # the selection's own tensors given bare: the space takes the selection's names (state dicts interchange)
    m = _model(torch.float32)
    own = sk.Selection.from_indices(perm, space=sk.ParamSpace(m))
    bare = SparseSAM(m.parameters(), own, lr=0.1, momentum=0.9)
    assert bare.space.names == space.names
    _train(bare, m, batch, 3)
    assert torch.equal(_flat(m), _flat(models[0]))
    opts[0].load_state_dict(bare.state_dict())


def _snapshot_groups(opt):
    return copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def test_load_state_dict_checks_dtypes_and_layout_before_changing_anything():
    batch64, batch32 = _data(), _data(torch.float32)
    m64, m32 = _model(), _model(torch.float32)
    idx = torch.arange(0, sk.ParamSpace(m64).numel, 5)
    o64, o32 = SparseAdamW(m64, idx, lr=0.01), SparseAdamW(m32, idx, lr=0.02)
    _train(o64, m64, batch64, 2)
    _train(o32, m32, batch32, 1)
    snap, groups = _snapshot(o32, m32), _snapshot_groups(o32)
    sd64 = o64.state_dict()
    assert "device" not in str(sd64["sapsel"])  # the device type does not matter, the dtypes do
    with pytest.raises(ValueError, match=r"'0\.weight' in torch\.float64.*torch\.float32"):
        o32.load_state_dict(sd64)
    assert _same(o32, m32, snap) and _snapshot_groups(o32) == groups
    # without the dtype list (or a tampered tensor) every state tensor is checked against what would be allocated
    sd = copy.deepcopy(sd64)
    del sd["sapsel"]["dtypes"]
    with pytest.raises(ValueError, match=r"state\['0\.weight'\]\['exp_avg'\] is torch\.float64"):
        o32.load_state_dict(sd)
    sd = copy.deepcopy(o32.state_dict())
    sd["param_groups"][0]["lr"] = 0.5
    sd["state"][2]["exp_avg_sq"] = sd["state"][2]["exp_avg_sq"][:-1]
    with pytest.raises(ValueError, match=r"state\['2\.weight'\]\['exp_avg_sq'\].*shape"):
        o32.load_state_dict(sd)
    sd = copy.deepcopy(o32.state_dict())
    sd["state"][1]["exp_avg"][0] = NAN
    with pytest.raises(NonFiniteError, match=r"'0\.bias'.*'exp_avg'"):
        o32.load_state_dict(sd)
    sd = copy.deepcopy(o32.state_dict())
    sd["state"][0]["exp_avg_sq"][0] = -1.0
    with pytest.raises(ValueError, match="negative"):
        o32.load_state_dict(sd)
    sd = copy.deepcopy(o32.state_dict())
    del sd["state"][0]["exp_avg"]
    with pytest.raises(ValueError, match="keys"):
        o32.load_state_dict(sd)
    sd = copy.deepcopy(o32.state_dict())
    sd["param_groups"][0]["eps"] = NAN
    with pytest.raises(ValueError, match="eps"):
        o32.load_state_dict(sd)
    assert _same(o32, m32, snap) and _snapshot_groups(o32) == groups
    _train(o32, m32, batch32, 1)  # still usable, and a float32 checkpoint loads
    o32.load_state_dict(o32.state_dict())
    with pytest.raises(ValueError, match="base"):  # SAM: an SGD-base state is not an AdamW-base one
        SparseSAM(m32, idx, base="adamw").load_state_dict(SparseSAM(m32, idx, momentum=0.9).state_dict())


@pytest.mark.parametrize("finish", ["scaler.step", "unscale_ then scaler.step"])
def test_grad_scaler_first_pass_overflow_lowers_scale(finish):
    # first pass inf, second pass finite: the scaler must still see the overflow and lower its scale
    batch = _data(torch.float32)
    model = _model(torch.float32)
    idx = torch.arange(0, sk.ParamSpace(model).numel, 2)
    opt = SparseSAM(model, idx, base="sgd", lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    _train(opt, model, batch, 1)
    snap = _snapshot(opt, model)
    scaler.scale(_loss(model, batch)).backward()
    model[0].weight.grad.view(-1)[int(idx[1])] = float("inf")
    assert opt.first_step(zero_grad=True, grad_scaler=scaler) is False
    scaler.scale(_loss(model, batch)).backward()  # finite: the unperturbed point
    if finish != "scaler.step":
        scaler.unscale_(opt)
    s0 = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < s0
    assert opt.last_step_skipped and _same(opt, model, snap)
    opt.zero_grad()
    scaler.scale(_loss(model, batch)).backward()  # the loop goes on normally
    assert opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(_loss(model, batch)).backward()
    scaler.step(opt)
    scaler.update()
    assert not opt.last_step_skipped and not _same(opt, model, snap)


def test_second_step_without_scaler_step_is_refused_and_restores():
    batch = _data(torch.float32)
    model = _model(torch.float32)
    opt = SparseSAM(model, torch.arange(0, 40, 2), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = _flat(model).clone()
    scaler.scale(_loss(model, batch)).backward()
    assert opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(_loss(model, batch)).backward()
    with pytest.raises(RuntimeError, match="scaler.step"):
        opt.second_step()  # the gradients are still scaled by 2^10
    assert torch.equal(_flat(model), before)


def test_multi_group_nonfinite_in_last_group_writes_nothing():
    batch = _data(torch.float32)
    model = _model(torch.float32)
    named = list(model.named_parameters())  # (name, parameter) pairs in groups, as torch.optim accepts them
    groups = [{"params": named[:2]}, {"params": named[2:], "lr": 0.01}]
    n = sk.ParamSpace(model).numel
    for make in (lambda: SparseSGD(groups, torch.arange(n), lr=0.1, momentum=0.9),
                 lambda: SparseAdamW(groups, torch.arange(n), lr=0.1),
                 lambda: SparseSAM(groups, torch.arange(n), lr=0.1, momentum=0.9)):
        opt = make()
        _train(opt, model, batch, 1)
        snap = _snapshot(opt, model)
        if isinstance(opt, SparseSAM):
            def closure():
                _loss(model, batch).backward()
                model[2].bias.grad[1] = NAN

            with pytest.raises(NonFiniteError, match=r"2\.bias\[1\]"):
                opt.step(closure)
        else:
            opt.zero_grad()
            _loss(model, batch).backward()
            model[2].bias.grad[1] = NAN
            with pytest.raises(NonFiniteError, match=r"2\.bias\[1\]"):
                opt.step()
        assert _same(opt, model, snap)


@pytest.mark.parametrize("kind", ["sgd", "sam", "asam-full"])
def test_huge_finite_gradients_are_not_mistaken_for_overflow(kind):
    # 1e20^2 overflows the float32 sum of squares; the entries are finite, so this is a step, not a NaN/Inf error
    model = _model(torch.float32)
    idx = torch.arange(0, sk.ParamSpace(model).numel, 4)
    if kind == "sgd":
        opt = SparseSGD(model, idx, lr=1e-22)
    else:
        opt = SparseSAM(model, idx, lr=1e-22, rho=1e-3, adaptive=kind.startswith("asam"),
                        normalize="full" if "full" in kind else "selected")
    before = _flat(model).clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e20)
    if kind == "sgd":
        opt.step()
    else:
        assert opt.first_step()
        assert not torch.equal(_flat(model), before)  # perturbed by rho * g / ||g||, ||g|| from float64
        assert opt.second_step()
    assert not opt.last_step_skipped and bool(torch.isfinite(_flat(model)).all())
    assert not torch.equal(_flat(model)[idx], before[idx])


class _ScalarModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.temperature = torch.nn.Parameter(torch.tensor(1.5))
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x) * self.temperature


@pytest.mark.parametrize("kind", ["sgd", "adamw", "sam", "asam-full"])
def test_zero_dim_parameter(kind):
    batch = _data(torch.float32)
    model = _ScalarModel()
    space = sk.ParamSpace(model)
    masks = {n: torch.zeros(s, dtype=torch.bool) for n, s in zip(space.names, space.shapes)}
    masks["temperature"] = torch.tensor(True)
    masks["lin.bias"][1] = True
    params = model.parameters() if kind != "sgd" else model  # bare parameters get the mask's space via the dict
    if kind == "sgd":
        opt = SparseSGD(params, masks, lr=0.1, momentum=0.9)
    elif kind == "adamw":
        opt = SparseAdamW(sk.ParamSpace(model), masks, lr=0.1)
    else:
        opt = SparseSAM(model, masks, lr=0.1, adaptive=kind.startswith("asam"),
                        normalize="full" if "full" in kind else "selected")
    assert opt.k == 2
    t0, b0, w0 = model.temperature.item(), model.lin.bias.detach().clone(), model.lin.weight.detach().clone()
    _train(opt, model, batch, 2)
    assert model.temperature.item() != t0 and model.lin.bias[1] != b0[1]
    assert model.lin.bias[0] == b0[0] and torch.equal(model.lin.weight, w0)
    opt.load_state_dict(opt.state_dict())
    snap = _snapshot(opt, model)
    opt.zero_grad()
    _loss(model, batch).backward()
    model.temperature.grad.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"temperature\[\] \(flat index 0\)"):
        opt.first_step() if isinstance(opt, SparseSAM) else opt.step()
    assert _same(opt, model, snap)


@pytest.mark.parametrize("fn", [SparseSGD, SparseAdamW, SparseSAM, SparseSAM.first_step, SparseSAM.second_step],
                         ids=["SGD", "AdamW", "SAM", "first_step", "second_step"])
def test_docstrings_document_arguments_and_peak_memory(fn):
    import inspect

    doc = inspect.getdoc(fn)
    assert "Peak extra memory" in doc
    if inspect.isclass(fn):
        names = [n for n in inspect.signature(fn.__init__).parameters if n not in ("self", "base_kwargs")]
        missing = [n for n in names if n not in doc]
        assert not missing, missing
        assert " k " in doc or "k values" in doc or "k float32" in doc


# ---------------------------------------------------------------------------------- CUDA (bench/gpu_check.sh)
_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@_cuda
@pytest.mark.parametrize("base,kw", [BASES[1], BASES[3]], ids=["sgd-nesterov", "adamw"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_cuda_triton_matches_cpu_reference(base, kw, adaptive):
    torch.backends.cuda.matmul.allow_tf32 = False
    batch = _data(torch.float32)
    cpu, gpu = _model(torch.float32), _model(torch.float32).cuda()
    gbatch = (batch[0].cuda(), batch[1].cuda())
    n = sk.ParamSpace(cpu).numel
    idx = torch.randperm(n)[: n // 5].sort().values
    lr = 0.1 if base == "sgd" else 0.01
    o_cpu = SparseSAM(cpu, idx, base=base, lr=lr, adaptive=adaptive, **kw)
    o_gpu = SparseSAM(gpu, idx.cuda(), base=base, lr=lr, adaptive=adaptive, **kw)
    with use_backend("reference"):
        _train(o_cpu, cpu, batch, 3)
    _train(o_gpu, gpu, gbatch, 3)
    # float32 forward/backward on two devices differ in summation order: a few ulps of O(1) values per step
    assert (_flat(gpu).cpu() - _flat(cpu)).abs().max().item() < 1e-5


@pytest.mark.gpu
@_cuda
def test_cuda_functional_ops_and_bf16_rounding():
    from sapsel_kernels.sparse import sparse_add, sparse_gather

    flat = torch.randn(100_000, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(100_000, device="cuda")[:5000].sort().values
    d = torch.randn(5000, device="cuda", dtype=torch.bfloat16)
    exp = flat.clone()
    exp[idx] = (flat[idx].float() + d.float()).bfloat16()  # round to nearest even, as the GPU kernel must
    assert torch.equal(sparse_add(flat, idx, d), exp)
    assert torch.equal(sparse_gather(flat, idx), flat[idx])
    t = torch.randn(300, device="cuda", dtype=torch.float64, requires_grad=True)
    dd = torch.randn(7, device="cuda", dtype=torch.float64, requires_grad=True)
    ii = torch.tensor([0, 3, 50, 51, 100, 200, 299], device="cuda")
    assert torch.autograd.gradcheck(lambda a, b: sparse_add(a, ii, b), (t, dd))


@pytest.mark.gpu
@_cuda
def test_cuda_int64_offsets_past_2_31():
    # One fp16 parameter of 2^31 + 1024 elements (4 GiB + grad 4 GiB): indices past 2^31 must address correctly.
    n = 2 ** 31 + 1024
    p = torch.zeros(n, dtype=torch.float16, device="cuda", requires_grad=True)
    p.grad = torch.ones_like(p)
    idx = torch.tensor([7, 2 ** 31 - 1, 2 ** 31, n - 1], device="cuda")
    opt = SparseSGD([p], idx, lr=1.0)
    opt.step()
    assert torch.equal(p.detach()[idx].float().cpu(), -torch.ones(4))
    assert float(p.detach().float().abs().sum()) == 4.0
