"""hvp="fd": the central finite-difference HVP from two gradients, against torch.func.hessian on tiny float64 models
(an MLP, a conv net with BatchNorm in eval mode, a GPT-2 with SDPA attention), against rev_rev in float32, its cost
(two gradients per probe) and hvp="auto" falling back to it when neither double backward nor forward AD exists."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian

import sapsel_kernels as sk
from sapsel_kernels.hvp import HVP, FallbackHVP
from sapsel_kernels.space import ParamSpace


def _dense_hessian(model, loss_fn, batch):
    sp = ParamSpace(model)
    names = list(sp.names)
    theta = torch.cat([p.detach().reshape(-1) for p in sp.params])

    def f(t):
        out, off = {}, 0
        for n, p in zip(names, sp.params):
            out[n] = t[off:off + p.numel()].view_as(p)
            off += p.numel()
        return loss_fn(lambda *a: functional_call(model, out, a), batch)

    return hessian(f)(theta)


def _flat(parts, j):
    return torch.cat([t[j].reshape(-1) for t in parts])


def _probes(sp, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 2, (m, *p.shape), generator=g) * 2 - 1).to(dtype) for p in sp.params]


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.fc = torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(F.max_pool2d(torch.tanh(self.bn(self.c(x))), 2).flatten(1))


def _cases():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    conv = _Conv().double().eval()
    with torch.no_grad():
        conv.bn.running_mean.uniform_(-0.2, 0.2)
        conv.bn.running_var.uniform_(0.5, 1.5)
    xc, yc = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    ce = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    return [("mlp", mlp, ce, (x, y)), ("conv_bn", conv, ce, (xc, yc))]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_fd_equals_the_dense_hessian_product_in_float64(case):
    _, model, loss_fn, batch = case
    sp = ParamSpace(model)
    H = _dense_hessian(model, loss_fn, batch)
    V = _probes(sp, 3, torch.float64)
    out = HVP(model, loss_fn, sp, "fd")(V, batch)
    for j in range(3):
        expect = H @ _flat(V, j)
        torch.testing.assert_close(_flat(out, j), expect, rtol=1e-6, atol=1e-8)


def test_fd_on_a_gpt2_with_sdpa_attention():
    """SDPA attention on CPU has no double backward here (torch 2.13: "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); fd runs on it and equals
    rev_rev on the same weights with eager attention."""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    eager = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw, attn_implementation="eager")).double().eval()
    sdpa = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw, attn_implementation="sdpa")).double().eval()
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 20, (2, 6))
    lm = lambda m, b: m(b, labels=b).loss  # noqa: E731
    V = _probes(ParamSpace(eager), 2, torch.float64, seed=1)
    rr = HVP(eager, lm, ParamSpace(eager), "rev_rev", vectorize=False)(V, ids)
    fd = HVP(sdpa, lm, ParamSpace(sdpa), "fd")(V, ids)
    for j in range(2):
        a, b = _flat(rr, j), _flat(fd, j)
        assert float((a - b).norm() / a.norm()) < 1e-4  # the O(ε²) bias: 2e-5 measured at float64's step


def test_fd_in_float32_agrees_with_rev_rev_and_costs_two_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x, y = torch.randn(64, 5), torch.randint(0, 4, (64,))
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        return F.cross_entropy(m(b[0]), b[1])

    sp = ParamSpace(model)
    V = _probes(sp, 4, torch.float32)
    rr = HVP(model, loss_fn, sp, "rev_rev", vectorize=False)(V, (x, y))
    calls.clear()
    fd = HVP(model, loss_fn, sp, "fd")(V, (x, y))
    assert len(calls) == 2 * 4  # two gradients (forward + backward) per probe, no double backward
    for j in range(4):
        a, b = _flat(rr, j), _flat(fd, j)
        assert float((a - b).norm() / a.norm()) < 1e-3
    # hessian_diag(hvp="fd") with the same probes as rev_rev: the same estimate up to the difference error
    e1 = sk.hessian_diag(model, loss_fn, [(x, y)], n_probes=16, seed=5, hvp="rev_rev")
    e2 = sk.hessian_diag(model, loss_fn, [(x, y)], n_probes=16, seed=5, hvp="fd")
    assert e2.info["hvp"] == "fd"
    assert float((e1.mean - e2.mean).norm() / e1.mean.norm()) < 1e-3


class _Attention(torch.nn.Module):
    """One causal self-attention layer through F.scaled_dot_product_attention (``math=False``) or written out."""

    def __init__(self, sdpa: bool):
        super().__init__()
        self.sdpa = sdpa
        self.q, self.k, self.v, self.o = (torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4),
                                          torch.nn.Linear(4, 3))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.sdpa:
            h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
        else:
            t = x.shape[1]
            s = (q @ k.transpose(1, 2)) / 2.0  # sqrt(4)
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            h = torch.softmax(s, -1) @ v
        return self.o(h.mean(1))


def test_auto_falls_back_to_fd_when_no_second_derivative_exists():
    """CPU SDPA (torch 2.13) has neither a double backward nor forward AD: hvp="auto" ends at fd, whose product
    equals rev_rev on the same layer written out."""
    torch.manual_seed(0)
    model = _Attention(sdpa=True).double()
    ref = _Attention(sdpa=False).double()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ce = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    sp = ParamSpace(model)
    V = _probes(sp, 2, torch.float64)
    for mode in ("rev_rev", "fwd_rev"):
        try:
            HVP(model, ce, sp, mode, vectorize=False)(V, (x, y))
        except (RuntimeError, NotImplementedError):
            continue
        pytest.skip(f"this torch has a {mode} HVP through SDPA on CPU: nothing to fall back from")
    engine = FallbackHVP(model, ce, sp, "auto")
    out = engine(V, (x, y))
    assert engine.mode == "fd" and "rev_rev" in engine.fallback_reason and "fwd_rev" in engine.fallback_reason
    expect = HVP(ref, ce, ParamSpace(ref), "rev_rev", vectorize=False)(V, (x, y))
    for j in range(2):
        a, b = _flat(expect, j), _flat(out, j)
        assert float((a - b).norm() / a.norm()) < 1e-5
    # hessian_diag itself runs in estimation mode, which selects the math SDPA backend: rev_rev works there
    est = sk.hessian_diag(model, ce, [(x, y)], n_probes=4)
    assert est.info["hvp"] == "rev_rev"
    assert sk.hessian_diag(model, ce, [(x, y)], n_probes=4, hvp="fd").info["hvp"] == "fd"
