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


# ------------------------------------------------------------------------------------------- the budget rule
def test_resolve_k():
    from sapsel_kernels.selection import resolve_k

    assert resolve_k(1000, fraction=0.1) == 100  # 0.1 * 1000 = 100.00000000000001 in floating point
    assert resolve_k(7178, fraction=0.001) == 8  # ceil(7.178), not round
    assert resolve_k(56628, fraction=0.01) == 567  # ceil(566.28)
    assert resolve_k(10, fraction=1e-9) == 1 and resolve_k(10, fraction=1.0) == 10
    assert resolve_k(10, k=0) == 0 and resolve_k(10, k=10) == 10
    assert sk.resolve_k is resolve_k
    for kw in ({}, {"k": 1, "fraction": 0.5}):
        with pytest.raises(ValueError, match="exactly one"):
            resolve_k(10, **kw)
    for k in (-1, 11):
        with pytest.raises(ValueError, match="k must be in"):
            resolve_k(10, k=k)
    for k in (2.0, True, "3"):
        with pytest.raises(TypeError):
            resolve_k(10, k=k)
    for f in (0.0, -0.5, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fraction"):
            resolve_k(10, fraction=f)
    with pytest.raises(TypeError):
        resolve_k(10, fraction=True)


# ------------------------------------------------------------------------------------------- as_selection
def test_as_selection_indices():
    from sapsel_kernels.selection import as_selection

    sp = ParamSpace(_model())
    s = as_selection(torch.tensor([9, 2, 5], dtype=torch.int32), sp)
    assert s.indices.tolist() == [2, 5, 9] and s.indices.dtype == torch.int64 and s.indices.is_contiguous()
    assert s.numel == sp.numel and s.space_signature == sp.signature and s.matches(sp)
    assert as_selection([4, 1], sp).indices.tolist() == [1, 4]
    assert as_selection(range(3), sp).indices.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="duplicate"):
        as_selection(torch.tensor([3, 1, 3]), sp)
    with pytest.raises(IndexError):
        as_selection(torch.tensor([0, sp.numel]), sp)
    with pytest.raises(IndexError):
        as_selection(torch.tensor([-1, 2]), sp)
    with pytest.raises(TypeError):
        as_selection(torch.tensor([0.0, 1.0]), sp)
    with pytest.raises(TypeError):
        as_selection(torch.tensor([[0, 1]]), sp)
    with pytest.raises(TypeError):
        as_selection(None, sp)
    with pytest.raises(TypeError):
        as_selection("0,1", sp)
    assert as_selection(torch.zeros(0, dtype=torch.int64), sp).k == 0
    with pytest.raises(ValueError, match="empty"):
        as_selection(torch.zeros(0, dtype=torch.int64), sp, allow_empty=False)


def test_as_selection_masks():
    from sapsel_kernels.selection import as_selection

    sp = ParamSpace(_model())
    mask = torch.zeros(sp.numel, dtype=torch.bool)
    mask[[3, 17, 40]] = True
    assert as_selection(mask, sp).indices.tolist() == [3, 17, 40]
    per = {n: v.clone() for n, v in sp.views(mask).items()}
    assert as_selection(per, sp).indices.tolist() == [3, 17, 40]
    with pytest.raises(ValueError):
        as_selection(mask[:-1], sp)
    with pytest.raises(ValueError):
        as_selection(mask.reshape(1, -1), sp)
    bad = dict(per)
    bad.pop(sp.names[0])
    with pytest.raises(ValueError, match="missing"):
        as_selection(bad, sp)
    bad = dict(per)
    bad[sp.names[1]] = bad[sp.names[1]].int()
    with pytest.raises(TypeError):
        as_selection(bad, sp)
    bad = dict(per)
    bad[sp.names[1]] = bad[sp.names[1]].reshape(1, -1)
    with pytest.raises(TypeError):
        as_selection(bad, sp)


def test_as_selection_of_a_selection():
    from sapsel_kernels.selection import as_selection

    m = _model()
    sp = ParamSpace(m)
    s = select(_distinct(sp.numel), k=5, space=sp)
    assert as_selection(s, sp) is s  # already canonical: no copy
    with pytest.raises(ValueError, match="elements"):
        as_selection(s, ParamSpace(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="another parameter space"):
        as_selection(s, ParamSpace({"a": torch.zeros(sp.numel, requires_grad=True)}))


def test_selection_matched_by_tensor_identity():
    # a selection built on the model's space is recognised by a space over the same tensors without names
    # (model.parameters()), and not by another model's tensors under the same synthetic names
    from sapsel_kernels.selection import as_selection

    m = _model()
    sp = ParamSpace(m)
    s = select(_distinct(sp.numel), k=5, space=sp)
    bare = ParamSpace(list(m.parameters()))
    assert bare.signature != sp.signature
    assert s.matches(bare) and as_selection(s, bare).k == 5
    named = s.resolve_space(bare)
    assert named.names == sp.names and named.same_tensors(bare)
    other = ParamSpace(list(_model().parameters()))
    assert not s.matches(other)
    with pytest.raises(ValueError, match="without names"):
        s.check_space(other)
    # the reverse: built on bare tensors, used with the model's named space
    s2 = sk.Selection.from_indices(torch.tensor([1, 2]), space=bare)
    assert s2.matches(sp) and as_selection(s2, sp).indices.tolist() == [1, 2]
    assert not s2.matches(ParamSpace(_model()))


# ------------------------------------------------------------------------------------------- Selection.load validation
def _saved(tmp_path, **changes):
    sp = ParamSpace(_model())
    d = select(_distinct(sp.numel), k=6, space=sp).state_dict()
    d.update(changes)
    p = tmp_path / "sel.pt"
    torch.save(d, p)
    return p, sp


def test_load_validates(tmp_path):
    p, sp = _saved(tmp_path)
    assert Selection.load(p, space=sp).k == 6
    good = Selection.load(p).indices
    cases = [
        (dict(indices=good.flip(0)), ValueError, "ascending"),  # unsorted
        (dict(indices=torch.cat([good[:2], good[1:]])), ValueError, "ascending"),  # duplicated
        (dict(indices=torch.cat([good[:-1], torch.tensor([sp.numel])])), IndexError, "out of range"),
        (dict(indices=torch.cat([torch.tensor([-1]), good[1:]])), IndexError, "out of range"),
        (dict(indices=good.double()), TypeError, "integer"),  # wrong dtype
        (dict(indices=good.reshape(2, 3)), TypeError, "1-D"),
        (dict(indices=[1, 2]), ValueError, "indices"),
        (dict(numel=-1), ValueError, "numel"),
        (dict(numel=3.5), ValueError, "numel"),
        (dict(version=99), ValueError, "version"),
        (dict(threshold=torch.zeros(2, 2)), ValueError, "threshold"),
        (dict(space_signature=7), ValueError, "signature"),
    ]
    for change, exc, msg in cases:
        p, _ = _saved(tmp_path, **change)
        with pytest.raises(exc, match=msg):
            Selection.load(p)


def test_load_corrupt_files(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"\x00\x01 not a torch file at all")
    with pytest.raises(ValueError, match="not a readable"):
        Selection.load(p)
    p, sp = _saved(tmp_path)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(ValueError, match="not a readable"):
        Selection.load(p)
    with pytest.raises(ValueError):
        Selection.load(tmp_path / "missing.pt")


def test_as_selection_python_lists_follow_the_tensor_rules():
    from sapsel_kernels.selection import as_selection

    space = sk.ParamSpace(torch.nn.Linear(3, 2))
    assert as_selection([False, True] + [False] * 6, space).indices.tolist() == [1]  # a bool list is a mask
    with pytest.raises(TypeError):
        as_selection([0.7, 2.2], space)                                              # never truncated to [0, 2]
    assert as_selection([5, 1], space).indices.tolist() == [1, 5]
    assert as_selection([], space).k == 0


def test_as_selection_checks_hand_built_selections():
    from sapsel_kernels.selection import Selection, as_selection

    space = sk.ParamSpace(torch.nn.Linear(3, 2))
    for idx in ([1, 1, 2], [3, 1]):
        with pytest.raises(ValueError, match="strictly ascending"):
            as_selection(Selection(torch.tensor(idx), space.numel, space_signature=space.signature), space)
    with pytest.raises(IndexError):
        as_selection(Selection(torch.tensor([2, 99]), space.numel), space)
