"""Benchmark models and baselines for bench/test_bench_hessian.py (not a test module)."""

import time

import torch
import torch.nn.functional as F
from torch import nn


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


class Block(nn.Module):
    """Pre-norm transformer block with F.scaled_dot_product_attention (math backend forced by hessian_diag)."""

    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(h)
        return x + self.ff(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=64, d=64, heads=4, ff=128, layers=2, t=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(t, d))
        self.blocks = nn.Sequential(*[Block(d, heads, ff) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.blocks(self.emb(idx) + self.pos[: idx.shape[1]])
        return self.head(h).flatten(0, 1)


def lm_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y.flatten())


def make(name, full=False, device="cpu"):
    """(model, loss_fn, batch) for 'mlp' | 'cnn_bn' | 'transformer'."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        w = 512 if full else 256
        model = nn.Sequential(nn.Linear(784, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))
        b = 128 if full else 64
        batch = (torch.randn(b, 784, generator=g), torch.randint(0, 10, (b,), generator=g))
        loss = ce
    elif name == "cnn_bn":
        c = 32 if full else 16
        model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(2 * c * 8 * 8, 10))
        b = 64 if full else 8
        batch = (torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g))
        loss = ce
    elif name == "transformer":
        model = TinyLM(d=128 if full else 64, ff=256 if full else 128, layers=4 if full else 1)
        b = 16 if full else 4
        batch = (torch.randint(0, 64, (b, 32), generator=g), torch.randint(0, 64, (b, 32), generator=g))
        loss = lm_loss
    else:
        raise ValueError(name)
    model = model.to(device).eval()
    batch = tuple(t.to(device) for t in batch)
    return model, loss, batch


# ------------------------------------------------------------------------------------------------ baselines
def loop_hutchinson(model, loss_fn, batch, m):
    """What users write today (PyHessian / pytorch-optimizer style): one create_graph gradient, randint_like probes,
    a second autograd.grad per probe, per-tensor multiply-add."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    diag = [torch.zeros_like(p) for p in params]
    for i in range(m):
        vs = [torch.randint_like(p, high=2) * 2 - 1 for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=i < m - 1)
        for d, v, hv in zip(diag, vs, hvs):
            d.add_(v * hv, alpha=1.0 / m)
    return diag


def dense_hutchinson(model, loss_fn, batch, m):
    """curvlinops style: a dense N x m Rademacher matrix, vmap(jvp(grad)) over all m columns, mean of Z (.) HZ.
    (Run under the math SDPA backend like every provider: the fused CPU/GPU attention kernels lack forward AD.)"""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    n_total = sum(p.numel() for p in params.values())
    Z = torch.randint(0, 2, (n_total, m), device=next(iter(params.values())).device).to(torch.float32) * 2 - 1

    def loss_of(ps):
        return loss_fn(lambda x: torch.func.functional_call(model, ps, (x,)), batch)

    gf = torch.func.grad(loss_of)

    def hvp(t):
        return torch.func.jvp(gf, (params,), (t,))[1]

    cols, off = {}, 0
    for n in names:
        k = params[n].numel()
        cols[n] = Z[off:off + k].T.reshape(m, *params[n].shape)
        off += k
    HZ = torch.func.vmap(hvp)(cols)
    HZ = torch.cat([HZ[n].reshape(m, -1) for n in names], 1).T  # [N, m]
    return (Z * HZ).mean(1)


def gradient_once(model, loss_fn, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss_fn(model, batch), params)


# ------------------------------------------------------------------------------------------------ measuring
def peak_memory_bytes(fn, device):
    """Peak extra bytes held by torch tensors while fn() runs.

    CUDA: the caching allocator's peak (``max_memory_allocated``) minus the allocation before. CPU: a timeline of the
    profiler's memory records (allocations charged to the op that made them, frees as ``[memory]`` records), summed
    in time order; its maximum. Both count tensor memory only (no allocator caching, no Python objects).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    pts = []
    for e in prof.events():
        if e.name == "[memory]":
            pts.append((e.time_range.start, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage:
            pts.append((e.time_range.start, e.self_cpu_memory_usage))
    pts.sort()
    cur = peak = 0
    for _, b in pts:
        cur += b
        peak = max(peak, cur)
    return peak


def timeit(fn, device, reps=3):
    """Minimum wall time of fn() over reps runs (after one warm-up), synchronising CUDA. The minimum: on a shared
    machine interference only ever adds time."""
    fn()
    ts = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return min(ts)


def run_provider(provider, model, loss, batch, m):
    import sapsel_kernels as sk

    if provider == "ours":
        return sk.hessian_diag(model, loss, batch, n_probes=m, seed=0, progress=False)
    if provider == "ours_alt":  # the mode hvp="auto" does not pick on this device, vmapped over the probes
        dev = next(model.parameters()).device
        from sapsel_kernels.hessian import auto_hvp_order

        alt = auto_hvp_order(dev)[1]
        return sk.hessian_diag(model, loss, batch, n_probes=m, seed=0, hvp=alt, probes=sk.ProbeConfig(vectorize=True),
                               progress=False)
    if provider == "loop":
        return loop_hutchinson(model, loss, batch, m)
    return dense_hutchinson(model, loss, batch, m)
