"""Half-precision models and activation checkpointing (issue 12, parts 3 and 4), on a tiny Hugging Face GPT-2.

* bf16 / fp16: every estimate is float32 (DiagEstimate.mean / m2), agrees with the float32 model's to bf16
  rounding, and the per-pass product sums are float32 (not half); sparse updates never write outside S and every
  restore (a failed unlearn, SparseSAM's undo of the perturbation) is bit for bit in the parameter dtype.
* gradient checkpointing (non-reentrant): hessian_diag keeps it ACTIVE in its eval-mode estimation (the block's
  forward runs again in the backward) and the estimate equals the un-checkpointed one; what cannot run under it
  (fwd_rev, exact, reentrant checkpointing) raises CheckpointingError before anything runs.
"""

import functools
import warnings

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels.hessian import CheckpointingError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CFG = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gpt2(dtype=torch.float32, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CFG, **over)).to(dtype).eval()


def batch(seed: int, b: int = 4, t: int = 16) -> dict:
    ids = torch.randint(0, CFG["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def logits_fn(model, b):
    return model(input_ids=b["input_ids"]).logits


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe, -0.0 != 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_INT[a.dtype]), b.view(_INT[b.dtype]))


def untouched(model, before) -> bool:
    return all(same_bits(p.detach(), q) for p, q in zip(model.parameters(), before))


def flat(model, dtype=torch.bfloat16) -> torch.Tensor:
    return sk.ParamSpace(model).gather(dtype=dtype)


# ============================================================================================== A. half precision
# Tolerance of the bf16-vs-float32 comparison. Both models hold the SAME weights (the bf16 values, upcast exactly),
# so the difference is arithmetic alone: every op of the bf16 forward, backward and double backward rounds its
# result to 8 significant bits (unit roundoff u = 2^-8 ~ 3.9e-3). A few dozen such roundings per HVP coordinate,
# partly cancelling, measured a relative L2 error of 0.9% (~2.4 u) for hutchinson in both modes, 0.3-0.6% for the
# gradient estimators, with cosine >= 0.99996 and a top-5% overlap >= 0.995. The bounds are ~4x the measurement:
# rel < 0.04 (~10 u), cosine > 0.999, top-5% overlap >= 0.9. A bf16 ACCUMULATOR would fail them quickly: summing
# 16+ probes in bf16 loses ~log2(16) more bits per coordinate.
REL_TOL, COS_TOL, TOP_TOL = 0.04, 0.999, 0.9


def _agree(a: torch.Tensor, b: torch.Tensor) -> None:
    rel = float((a - b).norm() / b.norm())
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    k = a.numel() // 20
    top_a = set(torch.topk(a.abs(), k).indices.tolist())
    top_b = set(torch.topk(b.abs(), k).indices.tolist())
    overlap = len(top_a & top_b) / k
    assert rel < REL_TOL and cos > COS_TOL and overlap >= TOP_TOL, (rel, cos, overlap)


@pytest.fixture(scope="module")
def bf16_pair():
    mbf = gpt2(torch.bfloat16)
    m32 = gpt2()
    m32.load_state_dict({k: v.float() for k, v in mbf.state_dict().items()})
    return mbf, m32


@pytest.mark.parametrize("hvp", ["rev_rev", "fwd_rev"])
def test_bf16_hutchinson_is_float32_and_agrees_with_the_float32_model(bf16_pair, hvp):
    mbf, m32 = bf16_pair
    data = [batch(1), batch(2)]  # two batches: the per-pass products are SUMMED over batches
    est = sk.hessian_diag(mbf, None, data, n_probes=16, seed=3, hvp=hvp)
    ref = sk.hessian_diag(m32, None, data, n_probes=16, seed=3, hvp=hvp)
    assert est.info["hvp"] == hvp
    assert est.mean.dtype == est.m2.dtype == est.var.dtype == torch.float32
    _agree(est.mean, ref.mean)  # the same probes: z is a function of (seed, probe, flat index) only


@pytest.mark.parametrize("estimator", ["squared_grad", "fisher", "grad_abs", "gauss_newton"])
def test_bf16_gradient_estimators_are_float32_and_agree(bf16_pair, estimator):
    mbf, m32 = bf16_pair
    kw = {"output_fn": logits_fn, "n_probes": 4} if estimator == "gauss_newton" else {}
    data = [batch(1), batch(2)]
    est = sk.hessian_diag(mbf, None, data, estimator, **kw)
    ref = sk.hessian_diag(m32, None, data, estimator, **kw)
    assert est.mean.dtype == est.m2.dtype == torch.float32
    _agree(est.mean, ref.mean)


def _fp16_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).half()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16-gpt2", "fp16-mlp"])
def test_half_hutchinson_sums_the_batch_products_in_float32(dtype):
    """[b, b, b] must give the bits of [b]: h + h + h = 3h and 3h / 3 = h are exact in float32 (h has 8 or 11
    significant bits), while a half-precision sum rounds 3h (10 or 13 bits) and then the division. fp16 runs on an
    MLP: GPT-2's LayerNorm double backward overflows float16 on CPU (NaN HVP, NonFiniteError), in either mode."""
    if dtype == torch.bfloat16:
        model, loss, b = gpt2(dtype), None, batch(1)
    else:
        g = torch.Generator().manual_seed(0)
        model, loss = _fp16_mlp(), torch.nn.CrossEntropyLoss()
        b = (torch.randn(32, 4, generator=g).half(), torch.randint(0, 3, (32,), generator=g))
    one = sk.hessian_diag(model, loss, [b], n_probes=8, seed=1, hvp="rev_rev")
    three = sk.hessian_diag(model, loss, [b, b, b], n_probes=8, seed=1, hvp="rev_rev")
    assert one.mean.dtype == torch.float32
    assert same_bits(one.mean, three.mean) and same_bits(one.m2, three.m2)


def test_bf16_grad_abs_sums_the_batch_gradients_in_float32():
    model = gpt2(torch.bfloat16)
    b = batch(1)
    one = sk.hessian_diag(model, None, [b], "grad_abs")
    three = sk.hessian_diag(model, None, [b, b, b], "grad_abs")
    assert same_bits(one.mean, three.mean)


@pytest.fixture(scope="module")
def bf16_selection():
    model = gpt2(torch.bfloat16)
    est = sk.hessian_diag(model, None, batch(1), n_probes=8, hvp="rev_rev")
    sel = sk.select(est.mean.abs(), fraction=0.05, space=est.space)
    mask = torch.zeros(est.space.numel, dtype=torch.bool)
    mask[sel.indices] = True
    return model.state_dict(), sel, mask


def _fresh_bf16(state) -> torch.nn.Module:
    model = gpt2(torch.bfloat16)
    model.load_state_dict(state)
    return model


def test_bf16_unlearn_first_order_writes_only_S(bf16_selection):
    state, sel, mask = bf16_selection
    model = _fresh_bf16(state)
    before = flat(model).clone()
    rep = sk.unlearn(model, None, batch(1), batch(2), sel, method=sk.FirstOrder(tau=1e-2))
    after = flat(model)
    assert same_bits(before[~mask], after[~mask])
    assert rep.n_changed > 0 and int((before[mask] != after[mask]).sum()) == rep.n_changed
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def _failing_loss(fail_at: int, how: str, model_ref: dict):
    """The model's loss that raises (or returns NaN) from its ``fail_at``-th call on; records whether the weights had
    already been moved when it failed (so that the restore is really exercised)."""
    calls = {"n": 0, "moved": None}

    def loss(model, b):
        calls["n"] += 1
        if calls["n"] >= fail_at:
            if calls["moved"] is None:
                calls["moved"] = not untouched(model, model_ref["before"])
            if how == "raise":
                raise RuntimeError("forced failure")
            return model(**b).loss * float("nan")
        return model(**b).loss

    return loss, calls


@pytest.mark.parametrize("method,fail_at", [("first_order", 2), ("sam_finetune", 6), ("gradient_ascent", 6)])
@pytest.mark.parametrize("how", ["raise", "nan"])
def test_bf16_failed_unlearn_restores_every_parameter_bit_for_bit(bf16_selection, method, fail_at, how):
    state, sel, _ = bf16_selection
    model = _fresh_bf16(state)
    ref = {"before": snapshot(model)}
    loss, calls = _failing_loss(fail_at, how, ref)
    rule = {"first_order": sk.FirstOrder(tau=1e-2), "sam_finetune": sk.SAMFinetune(),
            "gradient_ascent": sk.GradientAscent()}[method]
    with pytest.raises((RuntimeError, sk.NonFiniteError)):
        sk.unlearn(model, loss, batch(1), batch(2), sel, method=rule)
    assert calls["n"] >= fail_at
    if method != "first_order":  # an iterative rule had written S before the failure
        assert calls["moved"]
    assert untouched(model, ref["before"])


def _sam_loss(model):
    loss = model(**batch(1)).loss
    loss.backward()
    return loss


def test_bf16_sparse_sam_step_writes_only_S_and_restores_exactly(bf16_selection):
    state, sel, mask = bf16_selection
    model = _fresh_bf16(state)
    opt = sk.SparseSAM(model, sel, lr=1e-2, rho=0.05)
    before = flat(model).clone()
    opt.step(lambda: _sam_loss(model))
    after = flat(model)
    assert same_bits(before[~mask], after[~mask]) and bool((before[mask] != after[mask]).any())

    # first_step perturbs S only; restore() puts the bf16 values back bit for bit
    start = snapshot(model)
    opt.zero_grad()
    _sam_loss(model)
    opt.first_step(zero_grad=True)
    mid = flat(model)
    assert same_bits(after[~mask], mid[~mask]) and bool((after[mask] != mid[mask]).any())
    opt.restore()
    assert untouched(model, start)

    # a closure that raises in the second pass: the perturbation is undone bit for bit
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("second pass fails")
        return _sam_loss(model)

    with pytest.raises(RuntimeError, match="second pass fails"):
        opt.step(closure)
    assert untouched(model, start)


def test_bf16_sparse_sam_second_step_updates_from_the_exactly_restored_weights(bf16_selection):
    """SAM's fused restore + SGD update equals an SGD step with the same (perturbed-point) gradient taken from the
    unperturbed bf16 weights: the saved w_S are restored bit for bit before the update."""
    state, sel, mask = bf16_selection
    sam_model, sgd_model = _fresh_bf16(state), _fresh_bf16(state)
    sam = sk.SparseSAM(sam_model, sel, lr=1e-2, rho=0.05)
    sam.zero_grad()
    _sam_loss(sam_model)
    sam.first_step(zero_grad=True)
    _sam_loss(sam_model)
    grads = [None if p.grad is None else p.grad.clone() for p in sam_model.parameters()]
    sam.second_step()
    for p, g in zip(sgd_model.parameters(), grads):
        p.grad = g
    sk.SparseSGD(sgd_model, sel, lr=1e-2).step()
    assert untouched(sam_model, snapshot(sgd_model))
    a, b = flat(sam_model), flat(_fresh_bf16(state))
    assert same_bits(a[~mask], b[~mask])


@pytest.mark.parametrize("cls", [sk.SparseSGD, sk.SparseAdamW])
def test_bf16_sparse_sgd_adamw_write_only_S_with_float32_state(bf16_selection, cls):
    state, sel, mask = bf16_selection
    model = _fresh_bf16(state)
    opt = cls(model, sel, lr=1e-2, **({"momentum": 0.9} if cls is sk.SparseSGD else {}))
    before = flat(model).clone()
    for _ in range(2):
        opt.zero_grad()
        _sam_loss(model)
        opt.step()
    after = flat(model)
    assert same_bits(before[~mask], after[~mask]) and bool((before[mask] != after[mask]).any())
    assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


# ============================================================================================== B. checkpointing
def _checkpointed(reentrant=False, **over) -> torch.nn.Module:
    model = gpt2(**over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        kwargs = {} if reentrant is None else {"use_reentrant": reentrant}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()  # checkpointing is for training: the usual state of such a model


class _ForwardCounter:
    """Counts the forwards of the first block's MLP (inside the checkpointed region: recomputation runs it again)."""

    def __init__(self, model):
        self.n = 0
        model.transformer.h[0].mlp.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1


def _model_state(model):
    mods = list(model.modules())
    return ([m.training for m in mods], [getattr(m, "gradient_checkpointing", None) for m in mods],
            [m.__dict__.get("_gradient_checkpointing_func") for m in mods], model.config.use_cache)


CKPT_CASES = [("hutchinson", {"hvp": "rev_rev", "n_probes": 2}), ("hutchinson", {"n_probes": 2}),
              ("hutchinson", {"hvp": "rev_rev", "n_probes": 2, "probes": sk.ProbeConfig(vectorize=True)}),
              ("squared_grad", {}), ("grad_abs", {}), ("fisher", {}),
              ("gauss_newton", {"output_fn": logits_fn, "n_probes": 2})]


@pytest.mark.parametrize("estimator,kw", CKPT_CASES, ids=[f"{e}-{k.get('hvp', 'auto')}-{i}"
                                                          for i, (e, k) in enumerate(CKPT_CASES)])
def test_checkpointed_estimate_equals_the_plain_one_and_checkpointing_is_active(estimator, kw):
    plain, ckpt = gpt2(), _checkpointed()  # the same weights; ckpt in train mode with GPT-2's dropout 0.1
    n_plain, n_ckpt = _ForwardCounter(plain), _ForwardCounter(ckpt)
    state = _model_state(ckpt)
    data = [batch(1), batch(2)]
    ref = sk.hessian_diag(plain, None, data, estimator, **kw)
    est = sk.hessian_diag(ckpt, None, data, estimator, **kw)
    # float32 tolerance; measured: bit-identical (dropout is off in both, the recomputation replays the same ops)
    torch.testing.assert_close(est.mean, ref.mean, rtol=1e-5, atol=1e-5 * float(ref.mean.abs().max()))
    assert n_ckpt.n > n_plain.n  # the block's forward ran again in the backward: checkpointing was ON
    assert est.info["checkpointed_layers"] == 2
    if estimator == "hutchinson":
        assert est.info["hvp"] == "rev_rev"  # "auto" picks the mode that works under checkpointing
    assert _model_state(ckpt) == state  # flags, checkpoint functions and config restored


def test_checkpointing_is_kept_on_for_a_model_in_eval_mode():
    ckpt = _checkpointed().eval()
    counter = _ForwardCounter(ckpt)
    sk.hessian_diag(ckpt, None, batch(1), "squared_grad")
    assert counter.n == 2  # forward + recomputation
    assert not any(m.training for m in ckpt.modules())


def test_unlearn_under_checkpointing_equals_the_plain_run(bf16_selection):
    _, sel, _ = bf16_selection
    plain, ckpt = gpt2(), _checkpointed()
    counter = _ForwardCounter(ckpt)
    for model in (plain, ckpt):
        sk.unlearn(model, None, batch(1), batch(2), sel, method=sk.FirstOrder(tau=1e-2))
    assert counter.n == 4  # two gradients, each a forward and a recomputation
    assert untouched(ckpt, snapshot(plain))


@pytest.mark.parametrize("estimator,kw,names", [
    ("hutchinson", {"hvp": "fwd_rev"}, ["hvp='fwd_rev'", "hvp='rev_rev'", "gradient_checkpointing_disable"]),
    ("exact", {}, ["estimator='exact'", "gradient_checkpointing_disable"])])
def test_torch_func_paths_are_refused_under_checkpointing_before_anything_runs(estimator, kw, names):
    model = _checkpointed()
    counter, before, state = _ForwardCounter(model), snapshot(model), _model_state(model)
    with pytest.raises(CheckpointingError) as info:
        sk.hessian_diag(model, None, batch(1), estimator, **kw)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert all(n in str(info.value) for n in names), str(info.value)
    assert counter.n == 0 and untouched(model, before) and _model_state(model) == state


@pytest.mark.parametrize("reentrant", [True, None], ids=["use_reentrant=True", "use_reentrant-not-given"])
@pytest.mark.parametrize("estimator,kw", [("hutchinson", {"hvp": "rev_rev"}), ("hutchinson", {"hvp": "fwd_rev"}),
                                          ("hutchinson", {}), ("squared_grad", {})])
def test_reentrant_checkpointing_is_refused_with_the_fix(reentrant, estimator, kw):
    model = _checkpointed(reentrant=reentrant)
    counter, before, state = _ForwardCounter(model), snapshot(model), _model_state(model)
    with pytest.raises(CheckpointingError, match=r"use_reentrant': False"):
        sk.hessian_diag(model, None, batch(1), estimator, **kw)
    assert counter.n == 0 and untouched(model, before) and _model_state(model) == state


class _OwnReentrant(torch.nn.Module):
    """A model that calls torch.utils.checkpoint itself, reentrant: invisible to the up-front check."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.block, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.block(t)), self.inp(x), use_reentrant=True)
        return self.out(h)


@pytest.mark.parametrize("estimator,kw", [("hutchinson", {"hvp": "rev_rev"}), ("hutchinson", {}),
                                          ("squared_grad", {}), ("gauss_newton", {"output_fn": None})])
def test_reentrant_checkpointing_in_user_code_raises_the_clear_error(estimator, kw):
    model = _OwnReentrant()
    x, y = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])
    if estimator == "gauss_newton":
        kw = {"output_fn": lambda m, b: m(b[0])}
    before = snapshot(model)
    with pytest.raises(CheckpointingError, match="use_reentrant=False"):
        sk.hessian_diag(model, torch.nn.CrossEntropyLoss(), (x, y), estimator, **kw)
    assert untouched(model, before) and model.training


def test_estimation_mode_restores_the_checkpointing_state_after_an_error():
    model = _checkpointed()
    state = _model_state(model)

    def loss(m, b):
        m(**b)
        raise KeyError("loss fails")

    with pytest.raises(KeyError):
        sk.hessian_diag(model, loss, batch(1), "squared_grad")
    assert _model_state(model) == state



def test_checkpointing_that_eval_mode_would_switch_off_silently_is_refused():
    """The flag on a transformers module without any GradientCheckpointingLayer (older transformers / remote code,
    whose layer loop checkpoints only ``if self.gradient_checkpointing and self.training``) cannot be kept on."""
    model = gpt2()
    model.transformer.gradient_checkpointing = True
    model.transformer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint,
                                                                       use_reentrant=False)
    with pytest.raises(CheckpointingError, match="silently be off.*gradient_checkpointing_disable"):
        sk.hessian_diag(model, None, batch(1), "squared_grad")
