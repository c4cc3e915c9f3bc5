"""torch.ops.sapsel.topk_select on every CPU path (reference, C++, Triton interpreter).

Oracles, independent of our radix code:
* torch.topk as a set oracle: the selected values equal torch.topk's values as a multiset, and with distinct values
  the index sets are equal;
* the documented tie rule checked directly from its definition (``_check_rule``): every selected score is >= the
  threshold, every unselected one <= it, and among the scores equal to the threshold the selected ones are exactly
  the lowest-index ones;
* the reference (a stable full sort of signed integer keys, not a radix select): all paths must return bit-identical
  indices and thresholds.
"""

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels.reference.topk import topk_select_ref

topk_select = torch.ops.sapsel.topk_select
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check_rule(x: torch.Tensor, k: int, largest: bool, idx: torch.Tensor, thr: torch.Tensor):
    """The contract, from its definition (float64 comparisons; ±0 compare equal)."""
    n = x.numel()
    assert idx.dtype == torch.int64 and idx.shape == (k,)
    assert thr.dim() == 0 and thr.dtype == x.dtype
    if k == 0:
        assert thr.item() == (float("inf") if largest else float("-inf"))
        return
    assert bool((idx[1:] > idx[:-1]).all()), "indices not strictly ascending"
    assert 0 <= int(idx[0]) and int(idx[-1]) < n
    xd = x.double()
    sel = torch.zeros(n, dtype=torch.bool)
    sel[idx] = True
    t = thr.double().item()
    # the threshold is the k-th selected value: torch.topk's k-th value
    kth = torch.topk(xd, k, largest=largest).values[-1].item()
    assert t == kth
    if largest:
        assert bool((xd[sel] >= t).all()) and bool((xd[~sel] <= t).all())
    else:
        assert bool((xd[sel] <= t).all()) and bool((xd[~sel] >= t).all())
    ties = (xd == t).nonzero().reshape(-1)  # ascending
    n_strict = int(((xd > t) if largest else (xd < t)).sum())
    quota = k - n_strict
    assert 0 < quota <= ties.numel()
    assert torch.equal(sel[ties], torch.arange(ties.numel()) < quota), "ties not taken lowest index first"
    if t == 0:
        assert not torch.signbit(thr.float()).item(), "a ±0 threshold must be +0.0"


def _data(kind: str, n: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        x = torch.randn(n, generator=g)
    elif kind == "ties":  # a handful of distinct values: huge tie groups at every threshold
        x = torch.randint(-3, 4, (n,), generator=g).float() * 0.5
    elif kind == "equal":
        x = torch.full((n,), 1.25)
    elif kind == "zeros":  # +0.0 and -0.0 mixed: one value
        x = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    elif kind == "negative":
        x = -torch.rand(n, generator=g) - 1e-3
    elif kind == "subnormal":  # smallest subnormals of the dtype, both signs, and zeros
        tiny = torch.finfo(dtype).smallest_normal
        x = (torch.randint(-4, 5, (n,), generator=g).float() * tiny / 8).to(dtype).float()
    elif kind == "wide":  # magnitudes from tiny to huge (within the dtype's range)
        e = torch.randint(-14, 15, (n,), generator=g).float()
        x = torch.sign(torch.randn(n, generator=g)) * torch.exp2(e) * (1 + torch.rand(n, generator=g))
    else:
        raise ValueError(kind)
    return x.to(dtype)


def _ks(n):
    return sorted({0, 1, min(2, n), n // 3, n - 1, n} - {-1})


KINDS = ["randn", "ties", "equal", "zeros", "negative", "subnormal", "wide"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_and_rule(backend, kind, dtype):
    g = torch.Generator().manual_seed(hash((kind, str(dtype))) % 2**31)
    sizes = [1, 2, 7, 1000, 4099]  # interpreter-sized; the C++ multi-chunk paths are covered by the tests below
    for n in sizes:
        x = _data(kind, n, dtype, g)
        for k in _ks(n):
            for largest in (True, False):
                idx, thr = topk_select(x, k, largest)
                if backend != "reference":  # bit-identical to the reference (which is checked by the rule below)
                    ridx, rthr = topk_select_ref(x, k, largest)
                    assert torch.equal(idx, ridx), (n, k, largest)
                    assert torch.equal(thr.reshape(1).view(torch.uint8), rthr.reshape(1).view(torch.uint8))
                if n <= 4099:
                    _check_rule(x, k, largest, idx, thr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_set_oracle_torch_topk(dtype):
    # distinct values (a permutation of exactly representable integers): the index set is torch.topk's
    n = {torch.float32: 300_001, torch.float16: 2000, torch.bfloat16: 256}[dtype]  # integers exact in dtype
    x = (torch.randperm(n).float() - n / 2).to(dtype)
    for k in (1, 17, n // 10, n // 2, n - 1):
        for largest in (True, False):
            idx, thr = topk_select(x, k, largest)
            ref = torch.topk(x, k, largest=largest, sorted=False).indices
            assert torch.equal(idx, torch.sort(ref).values)
            assert thr.item() == torch.topk(x, k, largest=largest).values[-1].item()


def test_paths_bit_identical():
    from tests.helpers.backends import available_cpu_backends

    g = torch.Generator().manual_seed(7)
    x = torch.randn(30_011, generator=g)
    x[::7] = x[3]  # a tie group across the whole range
    results = {}
    for b in available_cpu_backends():
        with sk.use_backend(b):
            results[b] = [topk_select(x, k, lg) for k in (1, 4289, 4290, 15000) for lg in (True, False)]
    base = results["reference"]
    for b, r in results.items():
        for (i, t), (ri, rt) in zip(r, base):
            assert torch.equal(i, ri) and torch.equal(t, rt), b


@pytest.mark.parametrize("n", [2**20 + 3, 3_000_017])
def test_cpp_large_against_oracles(n):
    """Many chunks, the sparse (candidate-keeping) and dense passes of the C++ path."""
    if not sk.ext_loaded():
        pytest.skip("C++ extension not built")
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    x[n // 2:n // 2 + 1000] = x[n // 3]  # a tie group straddling chunk boundaries
    with sk.use_backend("cpp"):
        for k in (1, n // 1000, n // 100, n // 10, n // 2):
            for largest in (True, False):
                idx, thr = topk_select(x, k, largest)
                vals = torch.topk(x, k, largest=largest, sorted=True).values
                assert thr.item() == vals[-1].item()
                assert torch.equal(torch.sort(x[idx], descending=largest).values, vals)
                assert bool((idx[1:] > idx[:-1]).all())
        idx, thr = topk_select(x, n // 3, True)
        assert torch.equal(idx, topk_select_ref(x, n // 3, True)[0])


def test_cpp_1e7():
    if not sk.ext_loaded():
        pytest.skip("C++ extension not built")
    n = 10**7
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    with sk.use_backend("cpp"):
        idx, _ = topk_select(x, n // 100, True)
    ref = torch.topk(x, n // 100, sorted=False).indices
    assert torch.equal(idx, torch.sort(ref).values)


def test_threshold_selects_a_tie_exactly():
    # a tie exactly at the threshold, quota in the middle of the group
    x = torch.tensor([5.0, 3.0, 3.0, 9.0, 3.0, 1.0, 3.0])
    for b in _backends():
        with sk.use_backend(b):
            idx, thr = topk_select(x, 3, True)
            assert idx.tolist() == [0, 1, 3] and thr.item() == 3.0
            idx, thr = topk_select(x, 4, False)
            assert idx.tolist() == [1, 2, 4, 5] and thr.item() == 3.0


def _backends():
    from tests.helpers.backends import available_cpu_backends

    return available_cpu_backends()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_is_an_error_naming_the_index(backend, bad, dtype):
    x = torch.randn(5000).to(dtype)
    x[4321] = bad
    x[4400] = bad
    for k in (0, 10, 5000):
        with pytest.raises(ValueError, match="index 4321"):
            topk_select(x, k, True)
        with pytest.raises(ValueError, match="index 4321"):
            topk_select(x, k, False)


def test_bad_arguments(backend):
    x = torch.randn(10)
    with pytest.raises(ValueError, match="k must be in"):
        topk_select(x, 11)
    with pytest.raises(ValueError, match="k must be in"):
        topk_select(x, -1)
    with pytest.raises(TypeError, match="float32"):
        topk_select(x.double(), 1)
    with pytest.raises(TypeError, match="float32"):
        topk_select(torch.arange(10), 1)
    with pytest.raises(ValueError, match="1-D"):
        topk_select(x.reshape(2, 5), 1)


def test_empty_and_noncontiguous(backend):
    e = torch.empty(0)
    idx, thr = topk_select(e, 0)
    assert idx.shape == (0,) and idx.dtype == torch.int64 and thr.item() == float("inf")
    base = torch.randn(3000)
    x = base[::3]  # non-contiguous view: same answer as its contiguous copy
    assert not x.is_contiguous()
    for k in (0, 7, 1000):
        a, ta = topk_select(x, k)
        b, tb = topk_select(x.contiguous(), k)
        assert torch.equal(a, b) and torch.equal(ta, tb)


def test_opcheck(backend):
    x = torch.randn(1000)
    x[::10] = 0.5
    for k, largest in ((0, True), (37, True), (120, False), (1000, True)):
        torch.library.opcheck(topk_select, (x, k, largest))
    torch.library.opcheck(topk_select, (torch.randn(300).to(torch.bfloat16), 5, True))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def pipeline(scores, k: int):
        s = scores.abs() * 2.0
        idx, thr = torch.ops.sapsel.topk_select(s, k, True)
        mask = torch.zeros_like(s, dtype=torch.bool).index_fill_(0, idx, True)
        return idx, thr, mask

    # aot_eager: Dynamo + AOTAutograd tracing through the fake kernel, as inductor does, without its ~20 s C++ build
    f = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    x = torch.randn(5000)
    idx, thr, mask = f(x, 50)
    ridx, rthr, rmask = pipeline(x, 50)
    assert torch.equal(idx, ridx) and torch.equal(thr, rthr) and torch.equal(mask, rmask)
    idx2, _, _ = f(torch.randn(7000), 70)  # new size: recompiles or runs dynamic, still correct
    assert idx2.shape == (70,)


@pytest.mark.slow
def test_int64_indices_past_2_31():
    """N = 2^31 + 1000 float16 scores (4.3 GB): indices above 2^31 come back exactly (C++ path)."""
    if not sk.ext_loaded():
        pytest.skip("C++ extension not built")
    n = 2**31 + 1000
    x = torch.zeros(n, dtype=torch.float16)
    hot = [5, 2**31 - 1, 2**31, 2**31 + 7, n - 1]
    for i, h in enumerate(hot):
        x[h] = float(i + 1)
    x[n - 2] = -1.0
    with sk.use_backend("cpp"):
        idx, thr = topk_select(x, 5, True)
        assert idx.tolist() == hot and thr.item() == 1.0
        # ties: the 0.0 group is ~all of x; lowest indices win, after the 5 larger ones
        idx, thr = topk_select(x, 10, True)
        assert idx.tolist() == sorted([0, 1, 2, 3, 4] + hot) and thr.item() == 0.0
        idx, thr = topk_select(x, 1, False)
        assert idx.tolist() == [n - 2] and thr.item() == -1.0


# ---------------------------------------------------------------------------------------------------- CUDA (Triton)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_bit_identical_to_cpu(dtype):
    """The CUDA (Triton) path selects exactly what the CPU path selects: same indices, same threshold bits."""
    g = torch.Generator().manual_seed(11)
    for kind in KINDS:
        for n in (1, 7, 4099, 1_000_003):
            x = _data(kind, n, dtype, g)
            xc = x.cuda()
            for k in _ks(n):
                for largest in (True, False):
                    i, t = topk_select(xc, k, largest)
                    ri, rt = topk_select(x, k, largest)
                    assert i.is_cuda and torch.equal(i.cpu(), ri), (kind, n, k, largest)
                    assert torch.equal(t.cpu().reshape(1).view(torch.uint8), rt.reshape(1).view(torch.uint8))


@pytest.mark.gpu
@needs_cuda
def test_cuda_1e8_against_torch_topk():
    n = 10**8
    x = torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    for k in (n // 1000, n // 100, n // 10):
        idx, thr = topk_select(x, k, True)
        ref = torch.topk(x, k, sorted=False).indices
        assert torch.equal(idx, torch.sort(ref).values)
        assert thr.item() == x[ref].min().item()


@pytest.mark.gpu
@needs_cuda
def test_cuda_int64_indices_past_2_31():
    n = 2**31 + 1000
    x = torch.zeros(n, dtype=torch.float16, device="cuda")
    hot = [5, 2**31 - 1, 2**31, 2**31 + 7, n - 1]
    x[torch.tensor(hot, device="cuda")] = torch.arange(1, 6, device="cuda", dtype=torch.float16)
    x[n - 2] = -1.0
    idx, thr = topk_select(x, 5, True)
    assert idx.tolist() == hot and thr.item() == 1.0
    idx, thr = topk_select(x, 10, True)
    assert idx.tolist() == sorted([0, 1, 2, 3, 4] + hot) and thr.item() == 0.0
    idx, thr = topk_select(x, 1, False)
    assert idx.tolist() == [n - 2] and thr.item() == -1.0


@pytest.mark.gpu
@needs_cuda
def test_cuda_nonfinite_and_opcheck():
    x = torch.randn(100_000, device="cuda")
    x[77_777] = float("nan")
    with pytest.raises(ValueError, match="index 77777"):
        topk_select(x, 10, True)
    y = torch.randn(5000, device="cuda")
    for k, largest in ((0, True), (50, True), (500, False), (5000, True)):
        torch.library.opcheck(topk_select, (y, k, largest))


@pytest.mark.parametrize("k,exc", [(2**70, ValueError), (-1, ValueError), (11, ValueError), (2.0, TypeError),
                                   (True, TypeError)])
def test_topk_select_wrapper_names_k(k, exc):
    from sapsel_kernels.ops.topk import topk_select

    with pytest.raises(exc, match="topk_select: k must be"):
        topk_select(torch.rand(10), k)
