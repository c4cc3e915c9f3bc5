"""Sparse ops: functional gather/scatter-add (values, autograd, opcheck) and the fused SAM / optimizer kernels on
every backend against the reference (and the reference against plain-torch formulas)."""

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels import use_backend
from sapsel_kernels.reference import sparse as R
from sapsel_kernels.sparse import sparse_add, sparse_gather, sparse_scatter_add

# Tolerances (max abs error relative to the value scale ~1) per dtype of the *parameters*: the kernels accumulate in
# float32 (float64 for float64) like the reference, but C++/Triton may contract a*b+c into an FMA and sum norms in
# another order: a few float32 ulps (~1e-7) per op; bf16 results may land one bf16 ulp (2^-8 ~ 4e-3) apart when a
# float32 intermediate straddles a rounding boundary.
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 8e-3}


def _sorted_idx(n, k, gen=None):
    return torch.randperm(n, generator=gen)[:k].sort().values


# ------------------------------------------------------------------------------------------- functional ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gather_scatter_values(backend, dtype):
    flat = torch.randn(3000, dtype=dtype)
    idx = _sorted_idx(3000, 700)
    vals = torch.randn(700, dtype=dtype)
    assert torch.equal(sparse_gather(flat, idx), flat[idx])
    out = sparse_scatter_add(flat, idx, vals)
    exp = flat.clone()
    exp[idx] = (flat[idx].float() + vals.float()).to(dtype) if dtype != torch.float64 else flat[idx] + vals
    if backend == "triton" and dtype == torch.bfloat16:
        # Triton's *interpreter* rounds float32 -> bfloat16 toward zero (GPUs round to nearest even): 1 ulp apart.
        ulp = 2.0 ** (torch.floor(torch.log2(exp.float().abs().clamp_min(1e-30))) - 7)
        assert bool(((out.float() - exp.float()).abs() <= ulp).all())
    else:
        assert torch.equal(out, exp)
    assert torch.equal(flat[idx], sparse_gather(flat, idx))  # input untouched (out of place)
    # empty index list
    e = torch.empty(0, dtype=torch.int64)
    assert sparse_gather(flat, e).shape == (0,)
    assert torch.equal(sparse_add(flat, e, torch.empty(0, dtype=dtype)), flat)


def test_gradcheck_reference():
    with use_backend("reference"):
        theta = torch.randn(40, dtype=torch.float64, requires_grad=True)
        delta = torch.randn(9, dtype=torch.float64, requires_grad=True)
        idx = _sorted_idx(40, 9)
        assert torch.autograd.gradcheck(lambda t, d: sparse_add(t, idx, d), (theta, delta))
        assert torch.autograd.gradcheck(lambda t: sparse_gather(t, idx), (theta,))
        assert torch.autograd.gradgradcheck(lambda t, d: sparse_add(t, idx, d) ** 3, (theta, delta))
        assert torch.autograd.gradgradcheck(lambda t: sparse_gather(t, idx) ** 3, (theta,))


def test_grads_all_backends(backend):
    theta = torch.randn(500, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(50, dtype=torch.float64, requires_grad=True)
    idx = _sorted_idx(500, 50)
    w = torch.randn(500, dtype=torch.float64)
    (sparse_add(theta, idx, delta) * w).sum().backward()
    assert torch.equal(theta.grad, w) and torch.equal(delta.grad, w[idx])
    theta.grad = None
    (sparse_gather(theta, idx) * w[:50]).sum().backward()
    exp = torch.zeros(500, dtype=torch.float64)
    exp[idx] = w[:50]
    assert torch.equal(theta.grad, exp)


def test_functional_sam_with_functional_call():
    # SAM's perturbed loss written functionally: grad at theta + scatter(e) equals grad at the perturbed model.
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    space = sk.ParamSpace(model)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    idx = _sorted_idx(space.numel, 11)
    theta = space.gather(dtype=torch.float64)
    e = torch.randn(11, dtype=torch.float64) * 0.1

    def loss_of(flat):
        out = torch.func.functional_call(model, space.views(flat), (x,))
        return ((out - y) ** 2).mean()

    t = theta.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(loss_of(sparse_add(t, idx, e)), t)
    t2 = theta.clone()
    t2[idx] += e
    t2.requires_grad_(True)
    (g2,) = torch.autograd.grad(loss_of(t2), t2)
    assert torch.allclose(g1, g2, rtol=0, atol=1e-14)


def test_bad_indices(backend):
    # the ops validate every call themselves (the full battery is tests/ops/test_ops_fuzz.py)
    flat = torch.randn(10)
    with pytest.raises(IndexError, match=r"sparse_gather: idx\[1\] = 10 is out of range \[0, 10\)"):
        sparse_gather(flat, torch.tensor([2, 10]))
    with pytest.raises(IndexError, match=r"idx\[1\] = 1000000000000 is out of range"):
        sparse_gather(flat, torch.tensor([0, 10**12, 1]))  # unsorted: only the ends were checked once (a segfault)
    with pytest.raises(ValueError, match="ascending"):
        sparse_gather(flat, torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="ascending"):
        sparse_add(flat, torch.tensor([2, 2]), torch.ones(2))
    with pytest.raises(ValueError, match="int64"):
        sparse_gather(flat, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        sparse_add(flat, torch.tensor([1, 2]), torch.ones(3))
    with pytest.raises(ValueError, match="match"):
        sparse_add(flat, torch.tensor([1, 2]), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        sparse_gather(flat, torch.tensor([1, 0, 3, 0])[::2])


def test_bad_indices_in_a_later_tensor_write_nothing(backend):
    """sam_perturb on a 1000-element parameter with [0, 1100, 1]: rejected (it used to write element 1100 of the
    base buffer); the valid first tensor is not half-updated either."""
    base = torch.randn(3000)
    params = [base[:1000], base[1000:2000]]
    grads = [torch.randn(1000), torch.randn(1000)]
    idx = [torch.tensor([3, 500]), torch.tensor([1000, 2100, 1001])]
    saved = [torch.zeros(2), torch.zeros(3)]
    before = base.clone(), [s.clone() for s in saved]
    with pytest.raises(IndexError, match=r"sam_perturb: idx\[1\]\[1\] = 2100 is out of range \[1000, 2000\)"):
        torch.ops.sapsel.sam_perturb(params, grads, idx, [0, 1000], saved, 1.0, 0.0, False)
    assert torch.equal(base, before[0]) and all(torch.equal(a, b) for a, b in zip(saved, before[1]))


def test_meta_tensors_get_the_metadata_checks():
    """The fake kernels apply the metadata contract (values need data: the real kernels check those)."""
    flat = torch.empty(10, device="meta")
    assert torch.ops.sapsel.sparse_gather(flat, torch.empty(4, dtype=torch.int64, device="meta")).shape == (4,)
    with pytest.raises(ValueError, match="int64"):
        torch.ops.sapsel.sparse_gather(flat, torch.empty(4, dtype=torch.int32, device="meta"))
    params = [torch.empty(5, device="meta")]
    idx = [torch.empty(3, dtype=torch.int64, device="meta")]
    with pytest.raises(ValueError, match=r"saved\[0\] must be contiguous 1-D with 3 entries"):
        torch.ops.sapsel.sam_perturb(params, params, idx, [0], [torch.empty(2, device="meta")], 1.0, 0.0, False)
    with pytest.raises(ValueError, match="step must be >= 1"):
        torch.ops.sapsel.sparse_adamw_step(params, params, idx, [0], [torch.empty(3, device="meta")] * 2,
                                           [torch.empty(3, device="meta")], [], 0.1, 0.9, 0.99, 1e-8, 0.0, 0, 1.0)


# ------------------------------------------------------------------------------------------- optimizer kernels
def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(300,), (17, 40), (5,)]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    # indices are global (offset by the tensor's position in a flat space), as the optimizers pass them
    offsets = [1000, 1300, 1980]
    idx = [_sorted_idx(300, 120, g) + 1000, _sorted_idx(680, 333, g) + 1300, torch.empty(0, dtype=torch.int64)]
    a = R.acc_dtype(dtype)
    st = {
        "buf": [torch.randn(i.numel(), generator=g).to(a) for i in idx],
        "v": [torch.rand(i.numel(), generator=g).to(a) for i in idx],
        "saved": [torch.randn(i.numel(), generator=g).to(dtype) for i in idx],
    }
    return params, grads, idx, offsets, st


def _clone(xs):
    return [x.clone() for x in xs]


def _run(op, dtype, **kw):
    """Run op on a fresh case; returns every mutated tensor, flattened into one list."""
    params, grads, idx, offs, st = _case(dtype)
    p, buf, v, saved = _clone(params), _clone(st["buf"]), _clone(st["v"]), _clone(st["saved"])
    if op == "perturb":
        sv = [torch.empty_like(s) for s in saved]
        torch.ops.sapsel.sam_perturb(p, grads, idx, offs, sv, 0.37, kw["eta"], kw["adaptive"])
        return p + sv
    if op == "sgd":
        torch.ops.sapsel.sparse_sgd_step(p, grads, idx, offs, buf if kw["momentum"] else [],
                                         saved if kw["saved"] else [], 0.1, kw["momentum"],
                                         0.2 if not kw["nesterov"] else 0.0, 0.03, kw["nesterov"], kw["first"], 0.5)
        return p + buf
    if op == "adamw":
        torch.ops.sapsel.sparse_adamw_step(p, grads, idx, offs, buf, v, saved if kw["saved"] else [], 0.01, 0.9, 0.99,
                                           1e-8, 0.1, kw["step"], 0.25)
        return p + buf + v
    raise ValueError(op)


KERNEL_CASES = [
    ("perturb", dict(eta=0.0, adaptive=False)),
    ("perturb", dict(eta=0.01, adaptive=True)),
    ("sgd", dict(momentum=0.0, nesterov=False, first=False, saved=False)),
    ("sgd", dict(momentum=0.9, nesterov=False, first=True, saved=True)),
    ("sgd", dict(momentum=0.9, nesterov=True, first=False, saved=False)),
    ("sgd", dict(momentum=0.9, nesterov=False, first=False, saved=True)),
    ("adamw", dict(step=1, saved=False)),
    ("adamw", dict(step=7, saved=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op,kw", KERNEL_CASES, ids=[f"{o}-{i}" for i, (o, _) in enumerate(KERNEL_CASES)])
def test_kernels_agree_with_reference(backend, dtype, op, kw):
    if backend == "reference":
        pytest.skip("the reference is the oracle here (it is checked against torch.optim in test_optim.py)")
    got = _run(op, dtype, **kw)
    with use_backend("reference"):
        exp = _run(op, dtype, **kw)
    for a, b in zip(got, exp):
        assert a.dtype == b.dtype
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=TOL[dtype] * scale), op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqnorm_all_backends(backend, dtype):
    params, grads, idx, offs, _ = _case(dtype)
    for adaptive in (False, True):
        for full in (False, True):
            got = torch.ops.sapsel.sam_grad_sqnorm(grads, params, idx, offs, 0.01, adaptive, full)
            # plain-torch formula (independent of the reference module)
            exp = []
            for g, w, ix, off in zip(grads, params, idx, offs):
                ix = ix - off
                gg, ww = (g.reshape(-1), w.reshape(-1)) if full else (g.reshape(-1)[ix], w.reshape(-1)[ix])
                t = ww.double().abs() + 0.01 if adaptive else 1.0
                exp.append(float(((gg.double() * t) ** 2).sum()))
            assert got.dtype == dtype
            assert torch.allclose(got.double(), torch.tensor(exp, dtype=torch.float64), rtol=TOL[dtype] * 10, atol=0)


def test_cpp_chunks_split_across_tensors():
    """The C++ kernels split the entries of all tensors (here 50005, over two 32768-entry grains) into per-thread
    chunks whose boundary falls inside a tensor, with empty tensors between; results must not depend on it."""
    if not sk.ext_loaded():
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(3)
    sizes, ks = [50000, 10, 60000, 3000], [20000, 0, 30000, 5]
    offs = [0, 50000, 50010, 110010]
    params = [torch.randn(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g) for n in sizes]
    idx = [_sorted_idx(n, k, g) + o for n, k, o in zip(sizes, ks, offs)]
    state = [torch.randn(k, generator=g) for k in ks]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = {}
        for be in ("cpp", "reference"):
            with use_backend(be):
                p, sv, buf, m, v = _clone(params), [torch.empty(k) for k in ks], _clone(state), _clone(state), \
                    [s.abs() for s in state]
                sq = torch.ops.sapsel.sam_grad_sqnorm(grads, p, idx, offs, 0.0, False, False)
                torch.ops.sapsel.sam_perturb(p, grads, idx, offs, sv, 0.3, 0.0, False)
                torch.ops.sapsel.sparse_sgd_step(p, grads, idx, offs, buf, sv, 0.1, 0.9, 0.0, 0.01, True, False, 1.0)
                torch.ops.sapsel.sparse_adamw_step(p, grads, idx, offs, m, v, [], 0.01, 0.9, 0.99, 1e-8, 0.1, 2, 1.0)
                outs[be] = (sq, p + sv + buf + m + v)
    finally:
        torch.set_num_threads(threads)
    exp_sq = torch.tensor([float((gr.double()[ix - o] ** 2).sum()) for gr, ix, o in zip(grads, idx, offs)],
                          dtype=torch.float64)
    assert torch.allclose(outs["cpp"][0].double(), exp_sq, rtol=1e-5, atol=0)
    for a, b in zip(outs["cpp"][1], outs["reference"][1]):
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=0, atol=TOL[torch.float32] * scale)


def test_kernels_touch_only_selected(backend):
    params, grads, idx, offs, st = _case(torch.float32)
    before = _clone(params)
    torch.ops.sapsel.sparse_adamw_step(params, grads, idx, offs, st["buf"], st["v"], [], 0.1, 0.9, 0.99, 1e-8, 0.5, 3,
                                       1.0)
    torch.ops.sapsel.sam_perturb(params, grads, idx, offs, _clone(st["saved"]), 1.0, 0.01, True)
    for p, b, ix, off in zip(params, before, idx, offs):
        ix = ix - off
        mask = torch.ones(p.numel(), dtype=torch.bool)
        mask[ix] = False
        assert torch.equal(p.reshape(-1)[mask], b.reshape(-1)[mask])
        assert not torch.equal(p.reshape(-1)[ix], b.reshape(-1)[ix]) or ix.numel() == 0


def test_cpp_rejects_bad_input_before_writing():
    if not sk.ext_loaded():
        pytest.skip("extension not built")
    params, grads, idx, offs, st = _case(torch.float32)
    before = _clone(params)
    bad_bufs = st["buf"][:2] + [torch.zeros(3)]  # wrong size for the last tensor
    with use_backend("cpp"), pytest.raises(ValueError, match="momentum_buffers"):
        torch.ops.sapsel.sparse_sgd_step(params, grads, idx, offs, bad_bufs, [], 0.1, 0.9, 0.0, 0.0, False, False, 1.0)
    with use_backend("cpp"), pytest.raises(IndexError):
        torch.ops.sapsel.sam_perturb(params, grads, [idx[0], idx[1], torch.tensor([1990])], offs,
                                     _clone(st["saved"][:2]) + [torch.zeros(1)], 1.0, 0.0, False)  # 1990 - 1980 >= 5
    for p, b in zip(params, before):
        assert torch.equal(p, b)


# ------------------------------------------------------------------------------------------- version counters
def test_perturb_invalidates_saved_graph(backend):
    """Like a torch.optim step, an in-place sparse op bumps the version counter: backward through a graph that saved
    the old weights raises instead of silently using the perturbed ones."""
    w = torch.randn(20, requires_grad=True)
    y = (w * w).sum()  # saves w
    with torch.no_grad():
        torch.ops.sapsel.sam_perturb([w], [torch.ones(20)], [torch.tensor([1, 5, 7])], [0], [torch.empty(3)], 0.1,
                                     0.0, False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_every_mutated_tensor_is_bumped(backend):
    params, grads, idx, offs, st = _case(torch.float32)
    saved, buf, m, v = _clone(st["saved"]), _clone(st["buf"]), _clone(st["buf"]), _clone(st["v"])
    calls = [
        (lambda: torch.ops.sapsel.sam_perturb(params, grads, idx, offs, saved, 0.1, 0.0, False), params + saved),
        (lambda: torch.ops.sapsel.sparse_sgd_step(params, grads, idx, offs, buf, [], 0.1, 0.9, 0.0, 0.0, False, False,
                                                  1.0), params + buf),
        (lambda: torch.ops.sapsel.sparse_adamw_step(params, grads, idx, offs, m, v, [], 0.1, 0.9, 0.99, 1e-8, 0.0, 1,
                                                    1.0), params + m + v),
    ]
    untouched = grads + idx
    for call, mutated in calls:
        before = [t._version for t in mutated]
        other = [t._version for t in untouched]
        call()
        assert all(t._version > b for t, b in zip(mutated, before))
        assert [t._version for t in untouched] == other
    # a rejected call wrote nothing and bumps nothing
    before = [t._version for t in params]
    with pytest.raises(ValueError):
        torch.ops.sapsel.sam_perturb(params, grads, idx, offs, saved[:2], 0.1, 0.0, False)
    assert [t._version for t in params] == before


# ------------------------------------------------------------------------------------------- opcheck
def _opcheck_samples():
    params, grads, idx, offs, st = _case(torch.float32)
    flat = torch.randn(50)
    fi = torch.tensor([0, 3, 17, 49])
    return {
        "sparse_gather": (flat, fi),
        "sparse_scatter_add": (flat, fi, torch.randn(4)),
        "sam_grad_sqnorm": (grads, params, idx, offs, 0.01, True, False),
        "sam_perturb": (params, grads, idx, offs, st["saved"], 0.5, 0.01, True),
        "sparse_sgd_step": (params, grads, idx, offs, st["buf"], st["saved"], 0.1, 0.9, 0.0, 0.01, True, False, 1.0),
        "sparse_adamw_step": (params, grads, idx, offs, st["buf"], st["v"], [], 0.1, 0.9, 0.99, 1e-8, 0.01, 2, 1.0),
    }


@pytest.mark.parametrize("name", ["sparse_gather", "sparse_scatter_add", "sam_grad_sqnorm", "sam_perturb",
                                  "sparse_sgd_step", "sparse_adamw_step"])
def test_opcheck(name):
    args = _opcheck_samples()[name]
    torch.library.opcheck(getattr(torch.ops.sapsel, name), args)
    if name in ("sparse_gather", "sparse_scatter_add"):
        args64 = tuple(a.double().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                       for a in args)
        torch.library.opcheck(getattr(torch.ops.sapsel, name), args64)
