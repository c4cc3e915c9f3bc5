"""hessian_diag and its sibling estimators against independent oracles.

Oracles: the float64 Hessian from ``torch.func.hessian`` (or, for tied weights, one double-backward per unit vector
through the model itself); the GGN from ``torch.func.jacrev`` of the logits; plain autograd gradients (per batch, per
point) for squared_grad, fisher and grad_abs; for the restricted HVP the rows/columns S of that Hessian. Statistical
checks are z-scores with a Bonferroni bound over the N coordinates (family-wise alpha = 1e-3; the seeds are fixed,
so a test either always passes or always fails).
"""

import importlib
import logging
import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import sapsel_kernels as sk
from sapsel_kernels import Checkpoint, NonFiniteError, ProbeConfig, StopRule, hessian_diag
from sapsel_kernels.hessian import DiagEstimate, auto_hvp_order
from sapsel_kernels.hvp import HVP, RestrictedHVP

hvp_mod = importlib.import_module("sapsel_kernels.hvp")
est_mod = importlib.import_module("sapsel_kernels.estimators")

ALPHA = 1e-3


def zcrit(n_tests: int) -> float:
    return NormalDist().inv_cdf(1 - ALPHA / (2 * n_tests))


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def cnn(bn=False):
    layers = [nn.Conv2d(1, 2, 3)]
    if bn:
        layers.append(nn.BatchNorm2d(2))
    layers += [nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)]
    return nn.Sequential(*layers).double()


def batch(n=24, img=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64) if img else torch.randn(n, 5, generator=g,
                                                                                              dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def exact_hessian(model, loss_fn, batches):
    """Dense float64 Hessian of the mean over batches, via torch.func.hessian over the flat trainable parameters."""
    space = sk.ParamSpace(model)
    flat0 = space.gather(dtype=torch.float64)

    def f(flat):
        ps = {n: flat[o:o + c].view(s) for n, o, c, s in zip(space.names, space.offsets, space.numels, space.shapes)}

        def call(x):
            return torch.func.functional_call(model, ps, (x,))

        return sum(loss_fn(call, b) for b in batches) / len(batches)

    was = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no forward-mode AD
            return torch.func.hessian(f)(flat0)
    finally:
        model.train(was)


def hutchinson_zscores(est, H):
    d = torch.diagonal(H)
    var1 = (H ** 2).sum(1) - d ** 2  # exact variance of one sample: sum_{j != i} H_ij^2
    sd = (var1 / est.n_probes).sqrt()
    err = est.mean.double() - d
    tol = 1e-5 * d.abs().max()  # float32 accumulation, for coordinates with zero variance
    return err.abs() / (sd + tol), var1


# ------------------------------------------------------------------------------------------------ the oracle tests
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hutchinson_unbiased_vs_exact_hessian(kind):
    torch.manual_seed(0)
    model = mlp() if kind == "mlp" else cnn()
    data = batch(img=kind == "cnn")
    H = exact_hessian(model, ce, [data])
    est = hessian_diag(model, ce, data, n_probes=512, seed=3, probes=ProbeConfig(per_pass=32))
    assert est.n_probes == 512 and est.mean.dtype == torch.float32 and est.mean.shape == (H.shape[0],)
    z, var1 = hutchinson_zscores(est, H)
    assert float(z.max()) < zcrit(H.shape[0]), float(z.max())
    # the reported per-sample variance estimates sum_{j!=i} H_ij^2. Sample variance of y = sum_j a_j z_j (Rademacher)
    # has Var ~ (E y^4 - sigma^4) / m with E y^4 = 3 sigma^4 - 2 sum a^4 (exact fourth moment).
    d = torch.diagonal(H)
    a4 = (H ** 4).sum(1) - d ** 4
    sd_var = ((2 * var1 ** 2 - 2 * a4).clamp_min(0) / est.n_probes).sqrt()
    zv = (est.var.double() - var1).abs() / (sd_var + 1e-6 * var1.max())
    # sample variances are skewed at m = 512: allow 1.5x the normal-approximation bound
    assert float(zv.max()) < 1.5 * zcrit(H.shape[0]), float(zv.max())
    # the bound has teeth: with 4 probes the error is ~sqrt(512/4) = 11x larger
    few = hessian_diag(model, ce, data, n_probes=4, seed=3)
    assert float((few.mean.double() - d).abs().max()) > 3 * float((est.mean.double() - d).abs().max())


def test_hutchinson_two_batches_is_hessian_of_the_mean():
    model = mlp()
    data = [batch(16, seed=1), batch(7, seed=2)]  # unequal sizes: each batch still weighs 1/2
    H = exact_hessian(model, ce, data)
    est = hessian_diag(model, ce, data, n_probes=256, seed=5, probes=ProbeConfig(per_pass=32))
    z, _ = hutchinson_zscores(est, H)
    assert float(z.max()) < zcrit(H.shape[0])
    ex = hessian_diag(model, ce, data, estimator="exact")
    torch.testing.assert_close(ex.mean.double(), torch.diagonal(H), rtol=1e-5, atol=1e-7)


def test_fwd_rev_equals_rev_rev_and_batched_equals_sequential():
    model = cnn()
    data = batch(img=True)
    a = hessian_diag(model, ce, data, n_probes=12, hvp="fwd_rev", seed=1, probes=ProbeConfig(per_pass=4))
    b = hessian_diag(model, ce, data, n_probes=12, hvp="rev_rev", seed=1, probes=ProbeConfig(per_pass=4))
    c = hessian_diag(model, ce, data, n_probes=12, hvp="rev_rev", seed=1, probes=ProbeConfig(per_pass=1))
    d = hessian_diag(model, ce, data, n_probes=12, hvp="fwd_rev", seed=1, probes=ProbeConfig(per_pass=12))
    assert a.info["hvp"] == "fwd_rev" and b.info["hvp"] == "rev_rev"
    # same probes; Hz agree to float64 rounding, so the float32 accumulators agree to a few float32 ulps
    for other in (b, c, d):
        torch.testing.assert_close(other.mean, a.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.m2, a.m2, rtol=1e-4, atol=1e-6)


def test_same_seed_same_estimate_different_seed_different():
    model, data = mlp(), batch()
    a = hessian_diag(model, ce, data, n_probes=8, seed=11)
    b = hessian_diag(model, ce, data, n_probes=8, seed=11)
    c = hessian_diag(model, ce, data, n_probes=8, seed=12)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)
    assert not torch.equal(a.mean, c.mean)


def test_estimate_bit_identical_across_backends(backend):
    # probes and accumulation are bit-identical on every path, so the whole estimate is
    model, data = mlp(), batch()
    with sk.use_backend("reference"):
        want = hessian_diag(model, ce, data, n_probes=6, seed=2, probes=ProbeConfig(per_pass=3))
    got = hessian_diag(model, ce, data, n_probes=6, seed=2, probes=ProbeConfig(per_pass=3))
    assert torch.equal(got.mean, want.mean) and torch.equal(got.m2, want.m2)


# ------------------------------------------------------------------------------------------------ long runs
PP4 = ProbeConfig(per_pass=4)


def test_resume_equals_uninterrupted(tmp_path):
    model, data = mlp(), batch()
    full = hessian_diag(model, ce, data, n_probes=24, seed=4, probes=PP4)
    ck = tmp_path / "h.ckpt"
    part = hessian_diag(model, ce, data, n_probes=8, seed=4, probes=PP4, checkpoint=Checkpoint(ck))
    assert part.n_probes == 8
    res = hessian_diag(model, ce, data, n_probes=24, seed=4, probes=PP4, checkpoint=Checkpoint(ck, resume=True))
    assert res.n_probes == 24 and res.info["resumed_at"] == 8
    assert torch.equal(res.mean, full.mean) and torch.equal(res.m2, full.m2)
    with pytest.raises(ValueError, match="seed"):
        hessian_diag(model, ce, data, n_probes=24, seed=5, probes=PP4, checkpoint=Checkpoint(ck, resume=True))
    with pytest.raises(ValueError, match="vectorize"):  # vmapped HVPs round differently: refuse, do not mix
        hessian_diag(model, ce, data, n_probes=24, seed=4, probes=ProbeConfig(per_pass=4, vectorize=True),
                     checkpoint=Checkpoint(ck, resume=True))
    with pytest.raises(ValueError, match="probes_per_pass"):
        hessian_diag(model, ce, data, n_probes=24, seed=4, probes=ProbeConfig(per_pass=8),
                     checkpoint=Checkpoint(ck, resume=True))
    with pytest.raises(ValueError, match="hvp"):  # the run settled on rev_rev (CPU auto order)
        hessian_diag(model, ce, data, n_probes=24, seed=4, probes=PP4, hvp="fwd_rev",
                     checkpoint=Checkpoint(ck, resume=True))
    with pytest.raises(ValueError, match="stable_k"):  # the top-k state would start from nothing
        hessian_diag(model, ce, data, n_probes=24, seed=4, probes=PP4, stop=StopRule(stable_k=3),
                     checkpoint=Checkpoint(ck, resume=True))


def test_resume_refuses_other_weights(tmp_path):
    model, data = mlp(), batch()
    ck = tmp_path / "h.ckpt"
    hessian_diag(model, ce, data, n_probes=8, seed=4, probes=PP4, checkpoint=Checkpoint(ck))
    other = mlp()  # same names and shapes (same signature), other weights
    assert sk.ParamSpace(other).signature == sk.ParamSpace(model).signature
    with pytest.raises(ValueError, match="fingerprint.*weights differ"):
        hessian_diag(other, ce, data, n_probes=16, seed=4, probes=PP4, checkpoint=Checkpoint(ck, resume=True))
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3  # one weight moved
    with pytest.raises(ValueError, match="weights differ"):
        hessian_diag(model, ce, data, n_probes=16, seed=4, probes=PP4, checkpoint=Checkpoint(ck, resume=True))


def test_bad_checkpoint_files_give_value_error(tmp_path):
    model, data = mlp(), batch()
    bad = tmp_path / "bad.ckpt"
    for content in (b"not a torch file", b""):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="cannot read"):
            hessian_diag(model, ce, data, n_probes=8, checkpoint=Checkpoint(bad, resume=True))
    torch.save(SimpleNamespace(a=1), bad)  # a pickled object: weights_only=True refuses to run its code
    with pytest.raises(ValueError, match="cannot read"):
        hessian_diag(model, ce, data, n_probes=8, checkpoint=Checkpoint(bad, resume=True))
    torch.save({"format": "something else"}, bad)
    with pytest.raises(ValueError, match="not a hessian_diag checkpoint"):
        hessian_diag(model, ce, data, n_probes=8, checkpoint=Checkpoint(bad, resume=True))
    good = tmp_path / "good.ckpt"
    hessian_diag(model, ce, data, n_probes=8, probes=PP4, checkpoint=Checkpoint(good))
    d = torch.load(good, weights_only=True)
    d["mean"] = d["mean"][:-1]  # truncated accumulator
    torch.save(d, bad)
    with pytest.raises(ValueError, match="corrupt"):
        hessian_diag(model, ce, data, n_probes=8, probes=PP4, checkpoint=Checkpoint(bad, resume=True))
    # resume=True without a file starts afresh and writes one
    fresh = tmp_path / "fresh.ckpt"
    est = hessian_diag(model, ce, data, n_probes=8, probes=PP4, checkpoint=Checkpoint(fresh, resume=True))
    assert est.n_probes == 8 and fresh.exists() and "resumed_at" not in est.info


def test_ctrl_c_keeps_estimate_and_resumes(tmp_path):
    model, data = mlp(), batch()
    full = hessian_diag(model, ce, data, n_probes=16, seed=6, probes=PP4, hvp="fwd_rev")
    calls = {"n": 0}

    def flaky(m, b):
        calls["n"] += 1
        if calls["n"] == 3:  # during the third pass (fwd_rev calls loss_fn once per pass)
            raise KeyboardInterrupt
        return ce(m, b)

    ck = tmp_path / "h.ckpt"
    part = hessian_diag(model, flaky, data, n_probes=16, seed=6, probes=PP4, hvp="fwd_rev", checkpoint=Checkpoint(ck))
    assert part.info["stopped_by"] == "interrupted" and part.n_probes == 8
    assert model.training  # restored after the interrupt
    res = hessian_diag(model, ce, data, n_probes=16, seed=6, probes=PP4, hvp="fwd_rev",
                       checkpoint=Checkpoint(ck, resume=True))
    assert torch.equal(res.mean, full.mean) and torch.equal(res.m2, full.m2)


def test_gauss_newton_resume_equals_uninterrupted(tmp_path):
    model, data = mlp(), batch(12)
    out = lambda m, b: m(b[0])  # noqa: E731
    full = hessian_diag(model, ce, data, "gauss_newton", n_probes=12, seed=3, probes=PP4, output_fn=out)
    ck = tmp_path / "g.ckpt"
    hessian_diag(model, ce, data, "gauss_newton", n_probes=4, seed=3, probes=PP4, output_fn=out,
                 checkpoint=Checkpoint(ck, every=2))
    res = hessian_diag(model, ce, data, "gauss_newton", n_probes=12, seed=3, probes=PP4, output_fn=out,
                       checkpoint=Checkpoint(ck, resume=True))
    assert res.n_probes == 12 and res.info["hvp"] is None
    assert torch.equal(res.mean, full.mean) and torch.equal(res.m2, full.m2)


def test_adaptive_stopping():
    model, data = mlp(), batch()
    est = hessian_diag(model, ce, data, n_probes=8, seed=1, probes=ProbeConfig(per_pass=16),
                       stop=StopRule(rtol=0.3, max_probes=400))
    assert est.info["stopped_by"] == "rtol"
    rse = float(est.stderr.norm() / est.mean.norm())
    assert rse < 0.3 and est.n_probes < 400
    # without the rule's help the same cap is reached
    cap = hessian_diag(model, ce, data, n_probes=8, seed=1, probes=PP4, stop=StopRule(rtol=1e-9, max_probes=16))
    assert cap.info["stopped_by"] == "max_probes" and cap.n_probes == 16
    # max_probes defaults to 8 * n_probes
    dflt = hessian_diag(model, ce, data, n_probes=2, seed=1, probes=PP4, stop=StopRule(rtol=1e-9))
    assert dflt.info["stopped_by"] == "max_probes" and dflt.n_probes == 16
    top = hessian_diag(model, ce, data, n_probes=8, seed=1, probes=PP4,
                       stop=StopRule(stable_k=5, turnover_tol=0.2, patience=2, max_probes=2000), progress=True)
    assert top.info["stopped_by"] == "topk_stable" and top.n_probes < 2000
    last = [h["turnover"] for h in top.info["history"][-2:]]
    assert all(t <= 0.2 for t in last)
    # min_probes holds the rule back
    late = hessian_diag(model, ce, data, n_probes=8, seed=1, probes=PP4,
                        stop=StopRule(rtol=10.0, min_probes=20, max_probes=2000))
    assert late.info["stopped_by"] == "rtol" and late.n_probes == 20


def test_stable_fraction_uses_the_budget_rule():
    model, data = mlp(), batch()
    n = sk.ParamSpace(model).numel  # 57
    fraction = 0.13  # 0.13 * 57 = 7.41: round() gives 7, the package's budget rule (ceil) 8
    assert round(fraction * n) == 7 and sk.resolve_k(n, fraction=fraction) == 8
    est = hessian_diag(model, ce, data, n_probes=4, probes=PP4, stop=StopRule(stable_fraction=fraction))
    assert est.info["stable_k"] == 8
    with pytest.raises(ValueError, match="stable_k"):
        hessian_diag(model, ce, data, stop=StopRule(stable_k=n + 1))


# ------------------------------------------------------------------------------------------------ real models
def test_batchnorm_uses_eval_statistics_and_restores_mode():
    model = cnn(bn=True)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    data = batch(img=True)
    H = exact_hessian(model, ce, [data])  # the eval-mode (running statistics) Hessian
    est = hessian_diag(model, ce, data, n_probes=256, seed=2, probes=ProbeConfig(per_pass=32))
    z, _ = hutchinson_zscores(est, H)
    assert float(z.max()) < zcrit(H.shape[0])
    assert model.training and model[1].training
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k  # running statistics untouched (no batch-statistics update)


def test_dropout_is_off_during_estimation():
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double().train()
    ref = nn.Sequential(model[0], model[1], model[3])  # the same parameters without dropout
    data = batch()
    a = hessian_diag(model, ce, data, n_probes=8, seed=3)
    b = hessian_diag(ref, ce, data, n_probes=8, seed=3)
    assert torch.equal(a.mean, b.mean)
    assert model.training and model[2].training


class TinyAttention(nn.Module):
    def __init__(self, d=4, classes=3):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x [B, T, d]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return self.head(h.mean(1))


def test_attention_model_math_backend():
    model = TinyAttention().double()
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(8, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
    H = exact_hessian(model, ce, [data])
    for mode in ("fwd_rev", "rev_rev"):
        est = hessian_diag(model, ce, data, n_probes=256, seed=1, hvp=mode, probes=ProbeConfig(per_pass=32))
        z, _ = hutchinson_zscores(est, H)
        assert float(z.max()) < zcrit(H.shape[0]), mode


def test_tied_and_frozen_parameters():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied: one parameter, two uses
            self.frozen = nn.Linear(4, 3)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.frozen(torch.tanh(self.b(torch.tanh(self.a(x)))))

    model = M().double()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
    space = sk.ParamSpace(model)
    assert space.names == ["a.weight", "a.bias", "b.bias"] and space.numel == 24
    # oracle: one double backward per coordinate through the model itself (autograd handles the tying)
    loss = ce(model, data)
    gr = torch.autograd.grad(loss, space.params, create_graph=True)
    gflat = torch.cat([x.reshape(-1) for x in gr])
    H = torch.stack([torch.cat([r.reshape(-1) for r in torch.autograd.grad(gflat[i], space.params,
                                                                          retain_graph=True)])
                     for i in range(space.numel)])
    for mode in ("fwd_rev", "rev_rev"):
        est = hessian_diag(model, ce, data, n_probes=256, seed=8, hvp=mode, probes=ProbeConfig(per_pass=32))
        z, _ = hutchinson_zscores(est, H)
        assert float(z.max()) < zcrit(space.numel), mode
    ex = hessian_diag(model, ce, data, estimator="exact")
    torch.testing.assert_close(ex.mean.double(), torch.diagonal(H), rtol=1e-5, atol=1e-7)


def test_auto_order_cpu_prefers_rev_rev():
    assert auto_hvp_order(torch.device("cpu")) == ("rev_rev", "fwd_rev")
    assert auto_hvp_order(torch.device("cuda")) == ("fwd_rev", "rev_rev")  # a device object only: no CUDA init
    model, data = cnn(), batch(img=True)
    est = hessian_diag(model, ce, data, n_probes=8, seed=1, hvp="auto")
    assert est.info["hvp"] == "rev_rev" and "hvp_fallback_reason" not in est.info
    assert torch.equal(est.mean, hessian_diag(model, ce, data, n_probes=8, seed=1, hvp="rev_rev").mean)


def test_auto_falls_back_to_rev_rev(caplog, monkeypatch):
    class NoJvp(torch.autograd.Function):  # double-differentiable, but no forward-mode rule
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.tanh()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - x.tanh() ** 2)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.l2(NoJvp.apply(self.l1(x)))

    # the order auto uses on accelerators, here on CPU: forward-over-reverse first
    monkeypatch.setattr(hvp_mod, "auto_hvp_order", lambda device: ("fwd_rev", "rev_rev"))
    model, data = M().double(), batch()
    with caplog.at_level(logging.WARNING, logger="sapsel_kernels.hvp"):
        est = hessian_diag(model, ce, data, n_probes=8, seed=1, hvp="auto")
    assert est.info["hvp"] == "rev_rev" and est.info["hvp_fallback_reason"].startswith("fwd_rev:")
    assert any("falling back" in r.message for r in caplog.records)
    ref = hessian_diag(model, ce, data, n_probes=8, seed=1, hvp="rev_rev")
    assert torch.equal(est.mean, ref.mean)


def test_auto_falls_back_to_fwd_rev(caplog, monkeypatch):
    # No built-in op lacks a double backward while having forward AD, so the failure is injected: the first
    # double backward raises as such an op would.
    def no_double_backward(self, tangents, batch):
        raise RuntimeError("derivative for some_op_backward is not implemented")

    monkeypatch.setattr(HVP, "_rev_rev", no_double_backward)
    model, data = mlp(), batch()
    with caplog.at_level(logging.WARNING, logger="sapsel_kernels.hvp"):
        est = hessian_diag(model, ce, data, n_probes=8, seed=1, hvp="auto")
    assert est.info["hvp"] == "fwd_rev" and "some_op_backward" in est.info["hvp_fallback_reason"]
    assert any("falling back to forward-over-reverse" in r.message for r in caplog.records)
    assert torch.equal(est.mean, hessian_diag(model, ce, data, n_probes=8, seed=1, hvp="fwd_rev").mean)


def test_vectorize_false_equals_vmapped():
    model, data = cnn(), batch(img=True)
    for mode in ("fwd_rev", "rev_rev"):
        a = hessian_diag(model, ce, data, n_probes=8, seed=2, hvp=mode, probes=ProbeConfig(vectorize=True))
        b = hessian_diag(model, ce, data, n_probes=8, seed=2, hvp=mode, probes=ProbeConfig(vectorize=False))
        assert a.info["vectorize"] is True and b.info["vectorize"] is False
        torch.testing.assert_close(b.mean, a.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.m2, a.m2, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ siblings
def test_exact_estimator_and_size_guard():
    model, data = cnn(), batch(img=True)
    H = exact_hessian(model, ce, [data])
    ex = hessian_diag(model, ce, data, estimator="exact")
    torch.testing.assert_close(ex.mean.double(), torch.diagonal(H), rtol=1e-5, atol=1e-7)
    assert torch.equal(ex.var, torch.zeros_like(ex.mean))
    with pytest.raises(ValueError, match="exact_max_numel"):
        hessian_diag(model, ce, data, estimator="exact", exact_max_numel=10)


def test_grad_abs_and_squared_grad_definitions():
    model = mlp()
    data = [batch(8, seed=s) for s in range(3)]
    space = sk.ParamSpace(model)
    grads = []
    for b in data:
        model.zero_grad()
        ce(model, b).backward()
        grads.append(space.gather("grad", dtype=torch.float64))
    G = torch.stack(grads)
    ga = hessian_diag(model, ce, data, estimator="grad_abs")
    torch.testing.assert_close(ga.mean.double(), G.mean(0).abs(), rtol=1e-5, atol=1e-8)
    sq = hessian_diag(model, ce, data, estimator="squared_grad")
    assert sq.n_probes == 3 and sq.info["batches"] == 3
    torch.testing.assert_close(sq.mean.double(), (G ** 2).mean(0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(sq.var.double(), (G ** 2).var(0), rtol=1e-4, atol=1e-9)


def per_point_gradients(model, loss_fn, batches):
    """[n_points, N] float64 oracle: one autograd backward per point, through the model itself."""
    space = sk.ParamSpace(model)
    was = model.training
    model.eval()
    rows = []
    try:
        for x, y in batches:
            for i in range(x.shape[0]):
                gs = torch.autograd.grad(loss_fn(model, (x[i:i + 1], y[i:i + 1])), space.params)
                rows.append(torch.cat([g.reshape(-1) for g in gs]).double())
    finally:
        model.train(was)
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn"])
def test_fisher_is_mean_squared_per_point_gradient(kind, monkeypatch):
    model = mlp() if kind == "mlp" else cnn(bn=True)
    data = [batch(9, img=kind != "mlp", seed=1), batch(4, img=kind != "mlp", seed=2)]  # points weigh equally
    G = per_point_gradients(model, ce, data)
    fi = hessian_diag(model, ce, data, estimator="fisher")
    assert fi.n_probes == 13 and fi.info["points"] == 13 and fi.info["fisher_path"] == "vmap"
    assert fi.mean.dtype == torch.float32 and fi.m2.dtype == torch.float32
    torch.testing.assert_close(fi.mean.double(), (G ** 2).mean(0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(fi.var.double(), (G ** 2).var(0), rtol=1e-4, atol=1e-9)
    # one backward per point when vmap cannot run the model: same numbers to float rounding, logged
    def no_vmap(self, batch, lo, hi):
        raise RuntimeError("vmap: no batching rule for some_op")

    monkeypatch.setattr(est_mod._PointGradients, "vmapped", no_vmap)
    lo = hessian_diag(model, ce, data, estimator="fisher")
    assert lo.info["fisher_path"] == "loop" and "some_op" in lo.info["fisher_fallback_reason"]
    torch.testing.assert_close(lo.mean, fi.mean, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(lo.m2, fi.m2, rtol=1e-5, atol=1e-12)


def test_fisher_falls_back_on_a_model_vmap_cannot_run():
    class ItemModel(nn.Module):  # .item() has no vmap rule
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x) * (1.0 + 0.0 * float(x.abs().max().item()))

    model = ItemModel().double()
    data = [batch(6, seed=3)]
    fi = hessian_diag(model, ce, data, estimator="fisher")
    assert fi.info["fisher_path"] == "loop"
    G = per_point_gradients(model, ce, data)
    torch.testing.assert_close(fi.mean.double(), (G ** 2).mean(0), rtol=1e-5, atol=1e-9)


def test_fisher_dict_batches_and_one_shot_iterators():
    model = mlp()
    x, y = batch(10, seed=4)
    ref = hessian_diag(model, ce, (x, y), estimator="fisher")
    dict_loss = lambda m, b: F.cross_entropy(m(b["x"]), b["y"])  # noqa: E731
    as_dict = hessian_diag(model, dict_loss, {"x": x, "y": y, "note": "kept as is"}, estimator="fisher")
    torch.testing.assert_close(as_dict.mean, ref.mean, rtol=1e-6, atol=1e-12)
    it = hessian_diag(model, ce, iter([(x[:5], y[:5]), (x[5:], y[5:])]), estimator="fisher")  # read once
    torch.testing.assert_close(it.mean, ref.mean, rtol=1e-6, atol=1e-12)


def test_gauss_newton_bartlett_vs_exact_ggn():
    model, (x, y) = mlp(), batch(12)
    space = sk.ParamSpace(model)
    # GGN of the mean cross-entropy: (1/B) sum_i J_i^T (diag p_i - p_i p_i^T) J_i, J_i = d logits_i / d theta
    flat0 = space.gather(dtype=torch.float64)

    def logits_of(flat):
        ps = {n: flat[o:o + c].view(s) for n, o, c, s in zip(space.names, space.offsets, space.numels, space.shapes)}
        return torch.func.functional_call(model, ps, (x,))

    J = torch.func.jacrev(logits_of)(flat0)  # [B, C, N]
    p = torch.softmax(logits_of(flat0), -1).detach()
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn_diag = torch.einsum("bcn,bcd,bdn->n", J, A, J) / x.shape[0]
    est = hessian_diag(model, ce, (x, y), n_probes=400, estimator="gauss_newton", seed=2,
                       probes=ProbeConfig(per_pass=100), output_fn=lambda m, b: m(b[0]))
    assert bool((est.mean >= 0).all())  # PSD diagonal
    z = (est.mean.double() - ggn_diag).abs() / (est.stderr.double() + 1e-7 * ggn_diag.max())
    # stderr is itself estimated (400 samples, heavy-tailed squares): 1.5x the Bonferroni bound
    assert float(z.max()) < 1.5 * zcrit(space.numel), float(z.max())
    with pytest.raises(ValueError, match="output_fn"):
        hessian_diag(model, ce, (x, y), estimator="gauss_newton")


# ------------------------------------------------------------------------------------------------ API
def test_bad_arguments_and_nan_loss():
    model, data = mlp(), batch()
    with pytest.raises(ValueError, match="estimator"):
        hessian_diag(model, ce, data, estimator="diag")
    with pytest.raises(ValueError, match="n_probes is keyword-only"):
        hessian_diag(model, ce, data, 64)
    with pytest.raises(ValueError, match="hvp"):
        hessian_diag(model, ce, data, hvp="fast")
    with pytest.raises(ValueError, match="n_probes"):
        hessian_diag(model, ce, data, n_probes=0)
    with pytest.raises(ValueError, match="seed"):
        hessian_diag(model, ce, data, seed=-1)
    with pytest.raises(TypeError, match="Checkpoint"):
        hessian_diag(model, ce, data, checkpoint="h.ckpt")
    with pytest.raises(TypeError, match="StopRule"):
        hessian_diag(model, ce, data, stop={"rtol": 0.1})
    for mode in ("rev_rev", "fwd_rev"):
        with pytest.raises(NonFiniteError, match="Hessian-vector product contains NaN"):
            hessian_diag(model, lambda m, b: ce(m, b) * float("nan"), data, n_probes=2, hvp=mode)
    assert model.training


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="ProbeConfig.per_pass"):
        ProbeConfig(per_pass=0)
    with pytest.raises(TypeError, match="ProbeConfig.vectorize"):
        ProbeConfig(vectorize=1)
    with pytest.raises(ValueError, match="ProbeConfig.memory_cap_bytes"):
        ProbeConfig(memory_cap_bytes=0)
    with pytest.raises(TypeError):
        ProbeConfig(8)  # keyword-only
    for kw, field in ((dict(rtol=0.0), "rtol"), (dict(rtol=float("nan")), "rtol"), (dict(rtol=math.inf), "rtol"),
                      (dict(stable_k=0), "stable_k"), (dict(stable_fraction=1.5), "stable_fraction"),
                      (dict(stable_fraction=0.0), "stable_fraction"),
                      (dict(stable_k=3, turnover_tol=-0.1), "turnover_tol"), (dict(stable_k=3, patience=0), "patience"),
                      (dict(rtol=0.1, max_probes=0), "max_probes"), (dict(rtol=0.1, min_probes=0), "min_probes"),
                      (dict(rtol=0.1, min_probes=9, max_probes=8), "min_probes")):
        with pytest.raises(ValueError, match=f"StopRule.*{field}"):
            StopRule(**kw)
    with pytest.raises(TypeError, match="StopRule.stable_k"):
        StopRule(stable_k=2.0)
    with pytest.raises(TypeError, match="StopRule.largest"):
        StopRule(stable_k=2, largest=0)
    with pytest.raises(ValueError, match="not both"):
        StopRule(stable_k=2, stable_fraction=0.1)
    with pytest.raises(ValueError, match="needs a criterion"):
        StopRule(max_probes=64)  # a fixed budget is n_probes=
    with pytest.raises(ValueError, match="top-k criterion"):
        StopRule(rtol=0.1, patience=5)  # patience would be a silent no-op
    with pytest.raises(TypeError, match="Checkpoint.path"):
        Checkpoint(3)
    with pytest.raises(ValueError, match="Checkpoint.every"):
        Checkpoint("h.ckpt", every=0)
    with pytest.raises(TypeError, match="Checkpoint.resume"):
        Checkpoint("h.ckpt", resume="yes")
    ck = Checkpoint("h.ckpt", every=2)  # the path may be positional
    assert ck.path == "h.ckpt" and ck.every == 2 and not ck.resume
    with pytest.raises(Exception):  # frozen
        ck.every = 3
    assert sk.ProbeConfig is ProbeConfig and sk.StopRule is StopRule and sk.Checkpoint is Checkpoint


def test_inapplicable_arguments_raise():
    model, data = mlp(), batch()
    out = lambda m, b: m(b[0])  # noqa: E731
    once = ("squared_grad", "fisher", "grad_abs", "exact")
    for est in once:
        # ProbeConfig(variance=...) applies to every estimator; its probe fields only to the probed ones
        for kw in (dict(probes=ProbeConfig(per_pass=2)), dict(probes=ProbeConfig(vectorize=True)),
                   dict(stop=StopRule(rtol=0.1)), dict(checkpoint=Checkpoint("x")),
                   dict(n_probes=8), dict(seed=3), dict(hvp="rev_rev"), dict(output_fn=out)):
            with pytest.raises(ValueError, match="does not apply"):
                hessian_diag(model, ce, data, est, **kw)
    for est in ("squared_grad", "grad_abs", "exact"):
        with pytest.raises(ValueError, match="progress"):
            hessian_diag(model, ce, data, est, progress=True)
        hessian_diag(model, ce, data, est, progress=False)  # no bar is what happens anyway
    for est in ("hutchinson", "gauss_newton", "fisher", "squared_grad", "grad_abs"):
        with pytest.raises(ValueError, match="exact_max_numel"):
            hessian_diag(model, ce, data, est, exact_max_numel=10, **({"output_fn": out} if est == "gauss_newton"
                                                                        else {}))
    with pytest.raises(ValueError, match="does not apply"):
        hessian_diag(model, ce, data, "hutchinson", output_fn=out)
    with pytest.raises(ValueError, match="does not apply"):
        hessian_diag(model, ce, data, "gauss_newton", hvp="rev_rev", output_fn=out)
    with pytest.raises(ValueError, match="vectorize"):
        hessian_diag(model, ce, data, "gauss_newton", probes=ProbeConfig(vectorize=True), output_fn=out)
    # the defaults are accepted everywhere, and n_probes / seed given at their defaults too
    for est in once:
        hessian_diag(model, ce, data, est, n_probes=32, seed=0, hvp="auto")


def test_loss_and_data_forms():
    model, (x, y) = mlp(), batch()
    ref = hessian_diag(model, ce, (x, y), n_probes=4, seed=9)
    # a torch loss module (PyHessian / curvlinops habit) is criterion(model(*inputs), target)
    crit = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), n_probes=4, seed=9)
    assert torch.equal(crit.mean, ref.mean) and torch.equal(crit.m2, ref.m2)

    class HFLike(nn.Module):  # computes its own loss: model(**batch).loss
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, input_ids=None, labels=None):
            logits = self.net(input_ids)
            return SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, labels))

    hf = HFLike(model)
    for est in ("hutchinson", "fisher", "exact"):
        kw = {"n_probes": 4, "seed": 9} if est == "hutchinson" else {}
        a = hessian_diag(hf, None, {"input_ids": x, "labels": y}, est, **kw)
        b = hessian_diag(model, ce, (x, y), est, **kw)
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match=".loss"):
        hessian_diag(model, None, x, n_probes=4)  # loss_fn=None and an output without .loss
    # a loss that does not depend on the parameters is an error, not a silent all-zero diag(H)
    def detached(m, b):
        with torch.no_grad():
            return ce(m, b)

    for est in ("hutchinson", "fisher", "squared_grad", "grad_abs", "exact"):
        with pytest.raises(ValueError, match="does not depend on the model's parameters"):
            hessian_diag(model, detached, (x, y), est)
    with pytest.raises(ValueError, match="does not depend"):
        hessian_diag(model, detached, (x, y), hvp="fwd_rev", n_probes=2)
    # batches: (x, y) is one batch, a list of tuples several; one-shot iterators only where data is read once
    as_list = hessian_diag(model, ce, [(x[:12], y[:12]), (x[12:], y[12:])], n_probes=4, seed=9)
    gen = ((x[i:i + 12], y[i:i + 12]) for i in (0, 12))
    with pytest.raises(TypeError, match="one-shot iterator"):
        hessian_diag(model, ce, gen, n_probes=4, seed=9)
    with pytest.raises(TypeError, match="one-shot iterator"):
        hessian_diag(model, ce, iter([(x, y)]), "gauss_newton", output_fn=lambda m, b: m(b[0]))
    sq_list = hessian_diag(model, ce, [(x[:12], y[:12]), (x[12:], y[12:])], "squared_grad")
    sq_gen = hessian_diag(model, ce, ((x[i:i + 12], y[i:i + 12]) for i in (0, 12)), "squared_grad")
    assert torch.equal(sq_list.mean, sq_gen.mean) and as_list.n_probes == 4
    with pytest.raises(ValueError, match="tuple"):
        hessian_diag(model, ce, [x, y], n_probes=4)  # ambiguous: [x, y] as one batch must be (x, y)


def test_non_finite_raises_non_finite_error_for_every_estimator():
    model, data = mlp(), batch()
    nan_loss = lambda m, b: ce(m, b) * float("nan")  # noqa: E731
    for est in ("squared_grad", "fisher", "grad_abs", "exact"):
        with pytest.raises(NonFiniteError, match="NaN"):
            hessian_diag(model, nan_loss, data, est)
    with pytest.raises(NonFiniteError, match="logits"):
        hessian_diag(model, ce, data, "gauss_newton", output_fn=lambda m, b: m(b[0]) * float("inf"))
    assert issubclass(NonFiniteError, ValueError)


def test_save_load_views(tmp_path):
    model, data = cnn(), batch(img=True)
    est = hessian_diag(model, ce, data, n_probes=4, seed=9)
    views = est.views()
    assert list(views) == [n for n, p in model.named_parameters()]
    for (n, p), v in zip(model.named_parameters(), views.values()):
        assert v.shape == p.shape
    est.save(tmp_path / "e.pt")
    back = DiagEstimate.load(tmp_path / "e.pt", space=model)
    assert torch.equal(back.mean, est.mean) and torch.equal(back.var, est.var) and back.n_probes == 4
    with pytest.raises(ValueError, match="signature"):
        DiagEstimate.load(tmp_path / "e.pt", space=mlp())
    assert math.isnan(float(hessian_diag(model, ce, data, n_probes=1).var[0]))
    # unreadable / foreign / malformed files: ValueError
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        DiagEstimate.load(tmp_path / "junk.pt")
    torch.save({"format": "sapsel.DiagEstimate/2", "mean": "x"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="corrupt"):
        DiagEstimate.load(tmp_path / "bad.pt")
    # a format-1 file names the cheap estimator "fisher": it is read as "squared_grad"
    d = torch.load(tmp_path / "e.pt", weights_only=True)
    d.update(format="sapsel.DiagEstimate/1", estimator="fisher")
    torch.save(d, tmp_path / "old.pt")
    assert DiagEstimate.load(tmp_path / "old.pt").estimator == "squared_grad"


class WithScalar(nn.Module):
    """A model holding a 0-dim nn.Parameter (a learned temperature)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.temp = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return self.lin(x) * self.temp


def test_scalar_parameter_everywhere():
    model = WithScalar().double()
    data = batch(16, seed=5)
    space = sk.ParamSpace(model)
    t = space.index_of("temp")
    assert space.shapes[t] == () and space.numel == 19
    H = exact_hessian(model, ce, [data])
    ex = hessian_diag(model, ce, data, "exact")
    torch.testing.assert_close(ex.mean.double(), torch.diagonal(H), rtol=1e-5, atol=1e-7)
    assert ex.views()["temp"].shape == ()
    for mode in ("fwd_rev", "rev_rev"):
        est = hessian_diag(model, ce, data, n_probes=256, seed=2, hvp=mode, probes=ProbeConfig(per_pass=32))
        z, _ = hutchinson_zscores(est, H)
        assert float(z.max()) < zcrit(space.numel), mode
        assert est.views("stderr")["temp"].shape == ()
    G = per_point_gradients(model, ce, [data])
    fi = hessian_diag(model, ce, data, "fisher")
    torch.testing.assert_close(fi.mean.double(), (G ** 2).mean(0), rtol=1e-5, atol=1e-9)
    for est in ("squared_grad", "grad_abs"):
        assert hessian_diag(model, ce, data, est).views()["temp"].shape == ()
    gn = hessian_diag(model, ce, data, "gauss_newton", n_probes=4, output_fn=lambda m, b: m(b[0]))
    assert gn.views()["temp"].shape == () and bool(torch.isfinite(gn.mean).all())
    idx = torch.tensor([space.offsets[t], space.numel - 1])  # the scalar and one bias
    hv = RestrictedHVP(model, ce, space, [data], idx)
    v = torch.tensor([0.3, -1.2], dtype=torch.float64)
    torch.testing.assert_close(hv(v), data[0].shape[0] * H[idx][:, idx] @ v, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------ restricted HVP
def test_restricted_hvp_vs_func_hessian():
    model = mlp()
    data = [batch(9, seed=1), batch(4, seed=2)]
    space = sk.ParamSpace(model)
    # Hessian of the SUMMED loss: sum_b |b| * H(mean loss of b)
    Hsum = sum(b[0].shape[0] * exact_hessian(model, ce, [b]) for b in data)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(space.numel, generator=g)[:11]  # unsorted, spans several parameter tensors
    Hs = Hsum[idx][:, idx]
    model.eval()
    for cache in (True, False):
        hv = RestrictedHVP(model, ce, space, data, idx, scale=2.5, cache_graph=cache)
        for _ in range(3):  # the scratch buffer is reused: every product must stand alone
            v = torch.randn(idx.numel(), generator=g, dtype=torch.float64)
            out = hv(v)
            assert out.shape == (11,) and out.dtype == torch.float64
            torch.testing.assert_close(out, 2.5 * Hs @ v, rtol=1e-9, atol=1e-12)
        assert hv.n_products == 3 and hv.n_point_products == 3 * 13
    # float32 v on a float64 model: summed in v's dtype
    hv = RestrictedHVP(model, ce, space, data, idx)
    v = torch.randn(idx.numel(), generator=g)
    torch.testing.assert_close(hv(v).double(), Hs @ v.double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="duplicate"):
        RestrictedHVP(model, ce, space, data, torch.tensor([1, 1]))
    with pytest.raises(IndexError):
        RestrictedHVP(model, ce, space, data, torch.tensor([space.numel]))
    with pytest.raises(TypeError):
        RestrictedHVP(model, ce, space, data, torch.tensor([True, False]))
    with pytest.raises(TypeError, match="one-shot"):
        RestrictedHVP(model, ce, space, iter(data), idx)
    with pytest.raises(NonFiniteError):
        RestrictedHVP(model, lambda m, b: ce(m, b) * float("nan"), space, data, idx)(torch.ones(11,
                                                                                                  dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_estimate_matches_cpu():
    # same probes on both devices; HVPs differ only by float64 rounding, so the float32 estimates agree closely
    model, (x, y) = cnn(bn=True), batch(img=True)
    cpu = hessian_diag(model, ce, (x, y), n_probes=16, seed=4)
    gm = cnn(bn=True).cuda()
    gm.load_state_dict(model.state_dict())
    gpu = hessian_diag(gm, ce, (x.cuda(), y.cuda()), n_probes=16, seed=4, probes=ProbeConfig(per_pass=8))
    torch.testing.assert_close(gpu.mean.cpu(), cpu.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.m2.cpu(), cpu.m2, rtol=1e-4, atol=1e-6)
