"""The batch rule, the loss rule and NonFiniteError: one definition, the same answer at every entry point."""

import pytest
import torch
import torch.nn.functional as F

import sapsel_kernels as sk
from sapsel_kernels.data import as_batches, batch_size, iter_points, make_loss, n_points, slice_batch
from sapsel_kernels.errors import NonFiniteError, check_finite


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def _xy(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


# ============================================================================================== the batch rule
def test_one_batch_forms():
    x, y = _xy()
    assert as_batches(x) == [x]
    assert len(as_batches((x, y))) == 1
    assert len(as_batches({"x": x, "y": y})) == 1


def test_a_list_is_a_sequence_of_batches():
    x, y = _xy()
    assert len(as_batches([(x, y), (x, y)])) == 2
    ids = torch.randint(0, 10, (2, 5))
    assert as_batches([ids]) == [ids]                 # [ids] is ONE batch of token ids, not a batch [ids]
    assert len(as_batches([ids, ids])) == 2


def test_a_list_that_looks_like_one_batch_is_refused():
    x, y = _xy()
    with pytest.raises(ValueError, match=r"pass a tuple \(x, y\)"):
        as_batches([x, y])


def test_one_shot_iterators():
    x, y = _xy()
    with pytest.raises(TypeError, match="one-shot iterator"):
        as_batches(iter([(x, y)]))
    assert len(as_batches((b for b in [(x, y), (x, y)]), passes="once")) == 2


def test_empty_and_none():
    for bad in (None, [], iter([])):
        with pytest.raises(ValueError):
            as_batches(bad, passes="once")
    with pytest.raises(TypeError):
        as_batches(3.0)


def test_dataloader_passes_through_and_counts_points():
    x, y = _xy(10)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    assert as_batches(dl) is dl
    assert n_points(dl) == 10                         # a DataLoader item [x, y] is one batch because it is an item


def test_batch_size_slice_and_points():
    x, y = _xy(5)
    assert batch_size((x, y)) == 5
    assert batch_size({"attention_mask": torch.ones(2, 7), "input_ids": torch.zeros(3, 7)}) == 3
    assert batch_size(torch.tensor(1.0)) == 1
    b = slice_batch((x, y, 7), torch.tensor([1, 3]))
    assert torch.equal(b[0], x[[1, 3]]) and torch.equal(b[1], y[[1, 3]]) and b[2] == 7
    pts = list(iter_points([(x, y)]))
    assert len(pts) == 5 and all(batch_size(p) == 1 for p in pts)


def test_same_list_means_the_same_batches_in_hessian_diag_and_unlearn():
    """[(x1, y1), (x2, y2)] is two batches for hessian_diag (mean over batches) and for unlearn (sum over points)."""
    model = _mlp()
    b1, b2 = _xy(4, 1), _xy(4, 2)
    data = [b1, b2]
    est = sk.hessian_diag(model, _ce, data, estimator="exact")
    e1 = sk.hessian_diag(model, _ce, b1, estimator="exact").mean
    e2 = sk.hessian_diag(model, _ce, b2, estimator="exact").mean
    torch.testing.assert_close(est.mean, (e1 + e2) / 2)
    theta = sk.ParamSpace(model).gather(dtype=torch.float64)
    rep = sk.unlearn(model, _ce, data, data, None, method=sk.FirstOrder(tau=1.0))
    assert rep.n_changed == 0                          # G = sum over Z~ minus the same sum over Z = 0
    assert torch.equal(sk.ParamSpace(model).gather(dtype=torch.float64), theta)


# ============================================================================================== the loss rule
def test_criterion_module_equals_loss_fn():
    model = _mlp()
    x, y = _xy()
    ref = sk.hessian_diag(model, _ce, (x, y), estimator="exact").mean
    got = sk.hessian_diag(model, torch.nn.CrossEntropyLoss(), (x, y), estimator="exact").mean
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    got2 = sk.hessian_diag(model, sk.criterion(F.cross_entropy), (x, y), estimator="exact").mean
    torch.testing.assert_close(got2, ref, rtol=0, atol=0)


def test_criterion_needs_inputs_and_target():
    with pytest.raises(ValueError, match="tuple"):
        make_loss(torch.nn.MSELoss())(_mlp(), torch.randn(3, 4))


def test_loss_that_does_not_depend_on_the_parameters_is_refused():
    model = _mlp()

    def frozen(model, batch):
        with torch.no_grad():
            return _ce(model, batch)

    with pytest.raises(ValueError, match="does not depend on the model's parameters"):
        sk.hessian_diag(model, frozen, _xy(), n_probes=2)
    theta = sk.ParamSpace(model).gather(dtype=torch.float64)
    with pytest.raises(ValueError, match="does not depend"):
        sk.unlearn(model, frozen, _xy(), _xy(), None)
    assert torch.equal(sk.ParamSpace(model).gather(dtype=torch.float64), theta)


def test_loss_must_be_a_scalar():
    with pytest.raises(ValueError, match="scalar"):
        make_loss(lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))(_mlp(), _xy())
    with pytest.raises(TypeError):
        make_loss(3)


def test_model_output_loss_needs_labels():
    class NoLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return {"logits": x * self.w}

    with pytest.raises(ValueError, match=r"\.loss"):
        make_loss(None)(NoLoss(), torch.ones(3, 2))


# ============================================================================================== Hugging Face
def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers, transformers.GPT2LMHeadModel(cfg).eval()


def test_hf_model_needs_no_loss_function_and_batch_encoding_is_one_batch():
    """loss_fn=None uses the model's own .loss; a BatchEncoding is one batch; SDPA attention gets the math backend."""
    transformers, model = _tiny_gpt2()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(3))
    enc = transformers.BatchEncoding({"input_ids": ids, "labels": ids})
    assert len(as_batches(enc)) == 1 and batch_size(enc) == 2
    est = sk.hessian_diag(model, None, enc, n_probes=2, seed=0)
    ref = sk.hessian_diag(model, lambda m, b: m(input_ids=b["input_ids"], labels=b["labels"]).loss, enc,
                          n_probes=2, seed=0)
    assert est.info["hvp"] in ("rev_rev", "fwd_rev")
    torch.testing.assert_close(est.mean, ref.mean, rtol=0, atol=0)
    assert bool(est.mean.abs().sum() > 0)


def test_hf_list_of_token_batches_in_unlearn():
    """unlearn(..., train_data=[ids]) on a real GPT-2: [ids] is one batch of ids."""
    _, model = _tiny_gpt2()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 32, (2, 6), generator=g)
    fixed = ids.clone()
    fixed[:, -1] = (fixed[:, -1] + 1) % 32

    def lm_loss(model, batch):
        return model(input_ids=batch, labels=batch).loss

    sel = sk.select_parameters(model, "random", budget=0.01, seed=0)
    rep = sk.unlearn(model, lm_loss, [ids], [fixed], sel, method=sk.SecondOrder(damping=1.0, cg_iters=3),
                     train_data=[ids])
    assert rep.k == sel.k and rep.n_changed > 0


# ============================================================================================== NonFiniteError
def test_non_finite_error_is_a_value_error_and_names_the_parameter():
    model = _mlp()
    space = sk.ParamSpace(model)
    flat = space.gather(dtype=torch.float64)
    flat[space.offsets[2] + 4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"2\.weight\[0, 4\]"):
        check_finite(flat, "scores", space=space)
    assert issubclass(NonFiniteError, ValueError)
    check_finite([torch.full((3,), 1e38), None], "huge but finite")  # the sum overflows, the values do not


def test_every_entry_point_raises_non_finite_error():
    model = _mlp()
    x, y = _xy()
    space = sk.ParamSpace(model)
    scores = torch.randn(space.numel)
    scores[3] = float("inf")
    with pytest.raises(NonFiniteError):
        sk.select(scores, k=2, space=space)
    y_bad = (x.clone(), y)
    y_bad[0][0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        sk.hessian_diag(model, _ce, y_bad, n_probes=2)
    with pytest.raises(NonFiniteError):
        sk.unlearn(model, _ce, y_bad, (x, y), None)
    with pytest.raises(NonFiniteError):
        space.scatter(torch.full((space.numel,), float("nan"), dtype=torch.float64))


def test_a_criterion_called_as_loss_fn_gets_a_hint():
    model = _mlp()
    with pytest.raises(ValueError, match=r"sk\.criterion\(fn\)"):
        sk.hessian_diag(model, F.cross_entropy, _xy(), n_probes=2)
