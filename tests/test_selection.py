"""sapsel_kernels.select and Selection: k/fraction semantics, scopes, the ParamSpace views, persistence, bad input.

Oracle: torch.topk on the same scores (distinct values, so the index set is unique), per parameter for per_layer.
"""

import math

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels import ParamSpace, Selection, select


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _distinct(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).float() / n - 0.5  # distinct, exactly representable


def _topk_set(x, k, largest=True):
    return torch.sort(torch.topk(x, k, largest=largest).indices).values


def test_global_k_and_fraction(backend):
    x = _distinct(1000)
    s = select(x, k=37)
    assert isinstance(s, Selection) and s.k == 37 and s.numel == 1000 and s.scope == "global"
    assert torch.equal(s.indices, _topk_set(x, 37))
    assert s.threshold.item() == torch.topk(x, 37).values[-1].item()
    # fraction: k = ceil(fraction * N), at least 1, robust to float rounding of fraction * N
    assert select(x, fraction=0.1).k == 100  # 0.1 * 1000 = 100.00000000000001 in floating point
    assert select(x, fraction=0.0105).k == 11
    assert select(x, fraction=1e-9).k == 1
    assert select(x, fraction=1.0).k == 1000
    sm = select(x, k=5, largest=False)
    assert torch.equal(sm.indices, _topk_set(x, 5, largest=False)) and not sm.largest


def test_k_zero_and_all():
    x = _distinct(50)
    s0 = select(x, k=0)
    assert s0.k == 0 and s0.threshold.item() == float("inf") and not s0.mask().any()
    sa = select(x, k=50)
    assert torch.equal(sa.indices, torch.arange(50)) and sa.threshold.item() == x.min().item()


def test_ties_lowest_index_wins():
    x = torch.tensor([1.0, 2.0, 2.0, 0.0, 2.0, -0.0, 2.0])
    assert select(x, k=3).indices.tolist() == [1, 2, 4]
    # ±0 are one value: the two zeros tie, the lower index wins
    s = select(x, k=2, largest=False)
    assert s.indices.tolist() == [3, 5]
    s = select(x, k=1, largest=False)
    assert s.indices.tolist() == [3] and s.threshold.item() == 0.0


def test_space_dict_list_and_flat_agree():
    m = _model()
    sp = ParamSpace(m)
    flat = _distinct(sp.numel, 1)
    views = sp.views(flat)
    a = select(flat, k=9, space=sp)
    b = select({n: v.clone() for n, v in views.items()}, k=9, space=sp)
    c = select([v.clone() for v in views.values()], k=9, space=sp)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.indices, c.indices)
    assert a.space_signature == sp.signature
    assert torch.equal(a.indices, _topk_set(flat, 9))


def test_per_param_masks_and_bitmask():
    m = _model()
    sp = ParamSpace(m)
    flat = _distinct(sp.numel, 2)
    s = select(flat, k=11, space=sp)
    pp = s.per_param(sp)
    assert list(pp) == sp.names
    flat_again = torch.cat([idx + sp.offsets[i] for i, idx in enumerate(pp.values())])
    assert torch.equal(flat_again, s.indices)
    masks = s.masks(sp)
    for (name, mk), p in zip(masks.items(), sp.params):
        assert mk.shape == p.shape and mk.dtype == torch.bool
        assert torch.equal(mk.reshape(-1).nonzero().reshape(-1), pp[name])
    mask = s.mask()
    assert mask.sum() == 11 and torch.equal(mask.nonzero().reshape(-1), s.indices)
    # bitmask: little-endian bit order within each byte
    bm = s.bitmask()
    assert bm.dtype == torch.uint8 and bm.numel() == math.ceil(sp.numel / 8)
    for i in range(sp.numel):
        assert bool((int(bm[i // 8]) >> (i % 8)) & 1) == bool(mask[i])
    assert Selection.from_indices([0, 9], 16).bitmask().tolist() == [1, 2]
    assert torch.equal(Selection.from_bitmask(bm, sp.numel, sp).indices, s.indices)


def test_per_layer_scope():
    m = _model()
    sp = ParamSpace(m)
    flat = _distinct(sp.numel, 3)
    s = select(flat, fraction=0.25, space=sp, scope="per_layer")
    assert s.scope == "per_layer" and s.threshold.shape == (len(sp),)
    pp = s.per_param(sp)
    for i, (name, off, n) in enumerate(zip(sp.names, sp.offsets, sp.numels)):
        kk = math.ceil(0.25 * n)
        assert torch.equal(pp[name], _topk_set(flat[off:off + n], kk))
        assert s.threshold[i].item() == torch.topk(flat[off:off + n], kk).values[-1].item()
    # k per layer is clamped to each tensor's size (biases have 5 and 3 elements)
    s = select(flat, k=4, space=sp, scope="per_layer")
    assert [v.numel() for v in s.per_param(sp).values()] == [4, 4, 4, 3]


def test_float64_and_half_scores():
    x = _distinct(300, 4)
    assert torch.equal(select(x.double(), k=30).indices, _topk_set(x, 30))
    assert select(x.double(), k=30).threshold.dtype == torch.float64
    assert torch.equal(select(x.to(torch.float16), k=30).indices, _topk_set(x.to(torch.float16).float(), 30))


def test_noncontiguous_and_multidim_input():
    x = _distinct(600, 5).reshape(20, 30)
    s = select(x.t(), k=10)  # flattened row-major, i.e. like x.t().contiguous().reshape(-1)
    assert torch.equal(s.indices, _topk_set(x.t().contiguous().reshape(-1), 10))


def test_save_load_to(tmp_path):
    m = _model()
    sp = ParamSpace(m)
    s = select(_distinct(sp.numel, 6), k=7, space=sp)
    p = tmp_path / "sel.pt"
    s.save(p)
    t = Selection.load(p, space=sp)
    assert torch.equal(t.indices, s.indices) and torch.equal(t.threshold, s.threshold)
    assert (t.k, t.numel, t.space_signature, t.largest, t.scope) == (s.k, s.numel, s.space_signature, True, "global")
    assert torch.equal(s.to("cpu").indices, s.indices)
    other = ParamSpace(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="elements|another"):
        Selection.load(p, space=other)
    torch.save({"foo": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a saved"):
        Selection.load(tmp_path / "x.pt")


def test_space_mismatch_detected():
    sp = ParamSpace(_model())
    s = select(_distinct(sp.numel), k=3, space=sp)
    sp2 = ParamSpace({"a": torch.zeros(sp.numel, requires_grad=True)})  # same size, other layout
    with pytest.raises(ValueError, match="another parameter space"):
        s.per_param(sp2)
    with pytest.raises(ValueError, match="elements"):
        s.masks(ParamSpace(torch.nn.Linear(2, 2)))


def test_from_indices():
    s = Selection.from_indices(torch.tensor([9, 2, 5]), 10)
    assert s.indices.tolist() == [2, 5, 9] and s.threshold is None and s.k == 3
    with pytest.raises(ValueError, match="duplicate"):
        Selection.from_indices([1, 1], 10)
    with pytest.raises(IndexError):
        Selection.from_indices([10], 10)
    with pytest.raises(IndexError):
        Selection.from_indices([-1], 10)
    with pytest.raises(TypeError):
        Selection.from_indices(torch.tensor([1.0]), 10)
    sp = ParamSpace(_model())
    assert Selection.from_indices([0], space=sp).numel == sp.numel
    with pytest.raises(ValueError, match="numel or space"):
        Selection.from_indices([0])


def test_bad_input_errors():
    x = _distinct(100)
    with pytest.raises(ValueError, match="exactly one"):
        select(x)
    with pytest.raises(ValueError, match="exactly one"):
        select(x, k=3, fraction=0.1)
    with pytest.raises(ValueError, match="k must be in"):
        select(x, k=-1)
    with pytest.raises(ValueError, match="k must be in"):
        select(x, k=101)
    with pytest.raises(TypeError, match="int"):
        select(x, k=2.0)
    with pytest.raises(TypeError, match="int"):
        select(x, k=True)
    for f in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            select(x, fraction=f)
    with pytest.raises(ValueError, match="empty"):
        select(torch.empty(0), k=0)
    with pytest.raises(TypeError, match="float32"):
        select(torch.arange(10), k=1)
    with pytest.raises(ValueError, match="scope"):
        select(x, k=1, scope="layer")
    with pytest.raises(ValueError, match="space"):
        select(x, k=1, scope="per_layer")
    with pytest.raises(ValueError, match="space"):
        select([x], k=1)


def test_bad_space_inputs():
    sp = ParamSpace(_model())
    views = sp.views(_distinct(sp.numel))
    with pytest.raises(ValueError, match="elements"):
        select(_distinct(sp.numel + 1), k=1, space=sp)
    d = dict(views)
    d.pop(sp.names[0])
    with pytest.raises(ValueError, match="missing"):
        select(d, k=1, space=sp)
    with pytest.raises(ValueError, match="expected 4"):
        select(list(views.values())[:3], k=1, space=sp)
    parts = list(views.values())
    parts[1] = parts[1].to(torch.float16)
    with pytest.raises(TypeError, match="mixed dtypes"):
        select(parts, k=1, space=sp)
    parts = [v.clone() for v in views.values()]
    parts[2] = torch.empty(parts[2].shape, device="meta")
    with pytest.raises(ValueError, match="several devices"):
        select(parts, k=1, space=sp)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_names_parameter(backend, bad):
    sp = ParamSpace(_model())
    flat = _distinct(sp.numel)
    pos = sp.offsets[2] + 7  # the second Linear's weight (shape [3, 5]): local (1, 2)
    flat[pos] = bad
    with pytest.raises(ValueError, match=r"2\.weight\[1, 2\]"):
        select(flat, k=3, space=sp)
    with pytest.raises(ValueError, match=r"2\.weight\[1, 2\]"):
        select(flat, fraction=0.5, space=sp, scope="per_layer")
    with pytest.raises(ValueError, match=f"flat index {pos}"):
        select(flat, k=3)


def test_select_under_compile():
    torch._dynamo.reset()

    def f(x):
        s = select(x, fraction=0.01)
        return s.indices, s.threshold, s.mask()

    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = _distinct(2000, 9)
    for a, b in zip(g(x), f(x)):
        assert torch.equal(a, b)


def test_lazy_export():
    assert sk.select is select and sk.Selection is Selection
