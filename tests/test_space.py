"""ParamSpace: the flat int64 coordinate space over a model's trainable parameters.

Oracles: the model's own parameters (torch.cat of p.reshape(-1) in named_parameters() order), Python int arithmetic
for index maps, and object/storage identity for "no rebinding".
"""

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels import ParamSpace


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.mid = torch.nn.Linear(4, 3)
        self.frozen = torch.nn.Linear(3, 3)
        self.out = torch.nn.Linear(4, 7, bias=True)
        self.out.weight = self.emb.weight  # tied: one parameter under two names
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def test_order_tied_frozen():
    m = Tied()
    sp = ParamSpace(m)
    assert sp.names == ["emb.weight", "mid.weight", "mid.bias", "out.bias"]  # tied counted once, frozen excluded
    assert sp.numels == [28, 12, 3, 7] and sp.numel == 50
    assert sp.offsets == [0, 28, 40, 43]
    assert sp.params[0] is m.emb.weight
    flat = sp.gather()
    assert torch.equal(flat, torch.cat([m.emb.weight.reshape(-1), m.mid.weight.reshape(-1), m.mid.bias,
                                        m.out.bias]).detach())


def test_index_maps_roundtrip():
    sp = ParamSpace(Tied())
    for i in range(sp.numel):
        name, idx = sp.locate(i)
        assert sp.flat_index(name, idx) == i
        j = sp.index_of(name)
        lin = i - sp.offsets[j]
        assert sp.flat_index(name, lin) == i
        assert torch.unravel_index(torch.tensor(lin), sp.shapes[j]) == tuple(torch.tensor(v) for v in idx)
    pi = sp.param_index(torch.arange(sp.numel))
    expect = torch.cat([torch.full((n,), i) for i, n in enumerate(sp.numels)])
    assert pi.dtype == torch.int64 and torch.equal(pi, expect)
    assert sp.describe_position(29) == "mid.weight[0, 1] (flat index 29)"
    with pytest.raises(IndexError):
        sp.locate(sp.numel)
    with pytest.raises(IndexError):
        sp.param_index(torch.tensor([-1]))
    with pytest.raises(IndexError):
        sp.flat_index("mid.bias", 3)
    with pytest.raises(KeyError, match="frozen.weight"):
        sp.flat_index("frozen.weight", 0)


def test_split_indices():
    sp = ParamSpace(Tied())
    idx = torch.tensor([0, 27, 28, 45, 49])
    got = sp.split_indices(idx)
    assert list(got) == ["emb.weight", "mid.weight", "out.bias"]
    assert got["emb.weight"].tolist() == [0, 27] and got["mid.weight"].tolist() == [0]
    assert got["out.bias"].tolist() == [2, 6]
    with pytest.raises(ValueError, match="ascending"):
        sp.split_indices(torch.tensor([5, 3]))


def test_gather_scatter_in_place_without_rebinding():
    m = Tied()
    sp = ParamSpace(m)
    params_before = [p for p in sp.params]
    ptrs = [p.data_ptr() for p in sp.params]
    new = torch.arange(sp.numel, dtype=torch.float32)
    sp.scatter(new)
    for p, q, ptr in zip(sp.params, params_before, ptrs):
        assert p is q and p.data_ptr() == ptr
    assert m.out.weight is m.emb.weight and m.out.weight[0, 1].item() == 1.0  # tied view updated once
    assert torch.equal(sp.gather(), new)
    assert m.mid.weight[1, 0].item() == 28 + 4  # row-major local layout
    # gradients: None -> zeros
    assert torch.equal(sp.gather("grad"), torch.zeros(sp.numel))
    m.mid.bias.grad = torch.ones(3)
    g = sp.gather("grad")
    assert g[40:43].tolist() == [1, 1, 1] and g.sum() == 3
    # an explicit list of per-parameter tensors
    vals = [torch.full(s, float(i)) for i, s in enumerate(sp.shapes)]
    assert torch.equal(sp.gather(vals), torch.cat([v.reshape(-1) for v in vals]))
    outs = [torch.empty(s) for s in sp.shapes]
    sp.scatter(new, into=outs)
    assert torch.equal(torch.cat([o.reshape(-1) for o in outs]), new)


def test_scatter_rejects_nonfinite_before_writing():
    m = Tied()
    sp = ParamSpace(m)
    before = sp.gather().clone()
    bad = torch.zeros(sp.numel)
    bad[-1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sp.scatter(bad)
    assert torch.equal(sp.gather(), before)
    with pytest.raises(ValueError, match="shape"):
        sp.scatter(torch.zeros(sp.numel + 1))


def test_views_no_copy():
    sp = ParamSpace(Tied())
    flat = torch.randn(2, sp.numel)
    v = sp.views(flat)
    assert v["mid.weight"].shape == (2, 3, 4)
    v["mid.bias"][1, 2] = 42.0
    assert flat[1, 42].item() == 42.0


def test_signature():
    a, b = ParamSpace(torch.nn.Linear(3, 4)), ParamSpace(torch.nn.Linear(3, 4))
    c = ParamSpace(torch.nn.Linear(4, 3))
    assert a.signature == b.signature != c.signature


def test_int64_offsets_past_2_31():
    # meta tensors: the sizes exist, the memory does not
    big = torch.nn.Parameter(torch.empty(2**31 + 5, device="meta"))
    tail = torch.nn.Parameter(torch.empty(3, 2**30, device="meta"))
    sp = ParamSpace({"big": big, "tail": tail})
    assert sp.offsets == [0, 2**31 + 5] and sp.numel == 2**31 + 5 + 3 * 2**30
    i = 2**31 + 5 + 2 * 2**30 + 17
    assert sp.locate(i) == ("tail", (2, 17))
    assert sp.flat_index("tail", (2, 17)) == i
    assert sp.param_index(torch.tensor([2**31 + 4, 2**31 + 5, i])).tolist() == [0, 1, 1]
    got = sp.split_indices(torch.tensor([3, 2**31 + 4, i]))
    assert got["big"].tolist() == [3, 2**31 + 4] and got["tail"].tolist() == [2 * 2**30 + 17]


def test_construction_errors():
    with pytest.raises(ValueError, match="no trainable"):
        ParamSpace(torch.nn.ReLU())
    with pytest.raises(ValueError, match="several devices"):
        ParamSpace({"a": torch.zeros(2, requires_grad=True), "b": torch.zeros(2, device="meta", requires_grad=True)})
    with pytest.raises(TypeError):
        ParamSpace({"a": 3})
    sp = ParamSpace([torch.zeros(2, requires_grad=True), ("named", torch.zeros(3, requires_grad=True))])
    assert sp.names == ["param0", "named"]


class WithScalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3))
        self.t = torch.nn.Parameter(torch.tensor(7.0))  # 0-dim
        self.b = torch.nn.Parameter(torch.tensor([8.0, 9.0]))


def test_zero_dim_parameters_views_masks_locate():
    m = WithScalar()
    sp = ParamSpace(m)
    assert sp.names == ["w", "t", "b"] and sp.shapes[1] == () and sp.numels == [6, 1, 2] and sp.offsets == [0, 6, 7]
    flat = sp.gather()
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    v = sp.views(flat)
    assert v["t"].shape == () and v["t"].item() == 7.0
    v["t"].fill_(-1.0)  # a view, not a copy
    assert flat[6].item() == -1.0
    batched = sp.views(torch.zeros(4, sp.numel))
    assert batched["t"].shape == (4,) and batched["w"].shape == (4, 2, 3)
    assert sp.locate(6) == ("t", ()) and sp.locate(7) == ("b", (0,))
    assert sp.flat_index("t", 0) == 6 and sp.flat_index("t", ()) == 6
    with pytest.raises(IndexError):
        sp.flat_index("t", 1)
    assert sp.describe_position(6) == "t[] (flat index 6)"
    got = sp.split_indices(torch.tensor([6, 8]))
    assert got["t"].tolist() == [0] and got["b"].tolist() == [1]
    sel = sk.Selection.from_indices(torch.tensor([1, 6]), space=sp)
    masks = sel.masks(sp)
    assert masks["t"].shape == () and bool(masks["t"]) and masks["w"].sum() == 1 and not masks["b"].any()
    sp.scatter(torch.arange(sp.numel, dtype=torch.float32))
    assert m.t.item() == 6.0 and m.t.shape == ()


def test_fingerprint_tracks_values():
    torch.manual_seed(0)
    a = torch.nn.Linear(40, 30)
    b = torch.nn.Linear(40, 30)
    b.load_state_dict(a.state_dict())
    fa = ParamSpace(a).fingerprint()
    assert isinstance(fa, str) and fa == ParamSpace(a).fingerprint() == ParamSpace(b).fingerprint()
    assert ParamSpace(a).signature == ParamSpace(b).signature
    with torch.no_grad():
        b.weight[17, 3] += 1e-3  # one weight, not on the sampled stride: caught by the per-tensor sums
    assert ParamSpace(b).fingerprint() != fa
    with torch.no_grad():
        b.weight[17, 3] -= 1e-3
        b.bias[0] = -b.bias[0]  # same norm, other sum
    assert ParamSpace(b).fingerprint() != fa
    c = ParamSpace({"x": a.weight, "y": a.bias})
    assert c.fingerprint() != fa  # the names are part of it
    s = ParamSpace(WithScalar())
    assert s.fingerprint() == ParamSpace(WithScalar()).fingerprint()


def test_same_tensors():
    m = Tied()
    a, b = ParamSpace(m), ParamSpace(list(m.parameters()))
    assert a.same_tensors(b) and a.signature != b.signature
    assert not a.same_tensors(ParamSpace(Tied()))


def test_fingerprint_sees_a_tiny_sparse_edit():
    lin = torch.nn.Linear(1000, 1000)
    space = ParamSpace(lin)
    before = space.fingerprint()
    with torch.no_grad():
        lin.weight.view(-1)[:10] += 1e-7   # far below what a sum or a norm in float32 resolves
    assert space.fingerprint() != before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fingerprint_sees_two_swapped_weights(dtype):
    # plain sums, norms and strided samples are blind to a permutation; the position-weighted sum is not
    torch.manual_seed(0)
    m = torch.nn.Linear(40, 30).to(dtype)
    f0 = ParamSpace(m).fingerprint()
    for i, j in ((3, 17), (0, 1), (5, 1000), (64, 128)):
        with torch.no_grad():
            w = m.weight.view(-1)
            a, b = w[i].clone(), w[j].clone()
            assert a != b
            w[i], w[j] = b, a
            assert ParamSpace(m).fingerprint() != f0, (i, j)
            w[i], w[j] = a, b
        assert ParamSpace(m).fingerprint() == f0
