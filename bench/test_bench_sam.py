"""Optimizer-step time of SAM on a selected subset: ours vs dense masked SAM vs torch's full-model optimizers.

Timed: one SAM step's optimizer work = perturb (norm + w += e) and restore + base update; forward/backward are
excluded (the gradients are fixed random tensors). Providers, side by side in one group per (N, selection, base):

* ``sparse``        SparseSAM (our fused kernels; k = fraction * N coordinates touched);
* ``dense_masked``  SAM as users write it with a mask (davda54/sam + a float mask): clone every parameter, multiply
                    the gradient by the mask, dense norm, dense perturbation, restore, dense base optimizer step;
* ``torch_foreach`` / ``torch_fused``: torch.optim.SGD / AdamW's step alone on the full model (no SAM at all): the
                    cost floor of any dense method.

extra_info: N, k, ``time_ratio_dense_over_sparse`` (on the sparse rows: dense masked SAM median / ours, and ``_min``
the ratio of the minima; the dense row of the same group must have run first, which the parametrization order
ensures), optimizer-state bytes of each
provider and the ratio of dense AdamW's state (2 x 4 bytes x N) to ours, without and with the selection's k int64
indices (our optimizers hold views of them, not copies).

Sizes: N = 1e7 by default; N = 1e8 with ``SAPSEL_BENCH_FULL=1``. ``SAPSEL_BENCH_QUICK=1`` uses N = 1e6 (smoke run).
Run: ``python -m pytest bench/test_bench_sam.py --benchmark-only``.
"""

import os

import pytest
import torch

from sapsel_kernels.optim import SparseSAM

if os.environ.get("SAPSEL_BENCH_QUICK") == "1":
    SIZES = [10 ** 6]
else:
    SIZES = [10 ** 7] + ([10 ** 8] if os.environ.get("SAPSEL_BENCH_FULL") == "1" else [])
FRACTIONS = [0.001, 0.01, 0.1]
BASES = ["sgd", "adamw"]
PROVIDERS = ["dense_masked", "torch_foreach", "torch_fused", "sparse"]  # dense first: the sparse row needs its time
N_TENSORS = 8  # parameters of N / 8 elements each (a model with a few large layers)
RHO, LR = 0.05, 1e-3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_MEDIANS = {}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _params(n):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ps = []
    for _ in range(N_TENSORS):
        p = torch.randn(n // N_TENSORS, device=DEVICE, generator=g).requires_grad_(True)
        p.grad = torch.randn(n // N_TENSORS, device=DEVICE, generator=g)
        ps.append(p)
    return ps


def _base_kwargs(base):
    return dict(momentum=0.9, weight_decay=1e-4) if base == "sgd" else dict(weight_decay=1e-2)


def _torch_opt(base, params, **extra):
    kw = _base_kwargs(base)
    return (torch.optim.SGD if base == "sgd" else torch.optim.AdamW)(params, lr=LR, **kw, **extra)


def _state_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def _dense_masked_sam(params, masks, base):
    """davda54/sam with a float mask, as users write it (old weights cloned, masked grads, dense base step)."""
    opt = _torch_opt(base, params)
    old = {}

    def step():
        with torch.no_grad():
            grad_norm = torch.norm(torch.stack([(p.grad * m).norm(2) for p, m in zip(params, masks)]), 2)
            scale = RHO / (grad_norm + 1e-12)
            for p, m in zip(params, masks):
                old[p] = p.data.clone()
                p.add_(p.grad * m * scale)
            # (second forward/backward would run here)
            for p, m in zip(params, masks):
                p.data = old[p]
                p.grad.mul_(m)
        opt.step()
        _sync()

    step()  # materialise the optimizer state
    return step, lambda: _state_bytes(opt) + sum(p.numel() * p.element_size() for p in params)  # + the clones


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("n", SIZES)
def test_sam_step(benchmark, n, fraction, base, provider):
    torch.manual_seed(0)
    params = _params(n)
    k = int(n * fraction)
    benchmark.group = f"sam-step {base} N={n:.0e} sel={fraction:g} ({DEVICE})"
    info = {"N": n, "k": k, "fraction": fraction, "base": base, "device": DEVICE,
            "threads": torch.get_num_threads()}
    if provider == "sparse":
        idx = torch.randperm(n, device=DEVICE)[:k].sort().values
        opt = SparseSAM(params, idx, base=base, lr=LR, rho=RHO, **_base_kwargs(base))

        def fn():
            opt.first_step()
            opt.second_step()
            _sync()

        fn()
        state = opt.state_bytes()  # moments/momentum + saved weights; the indices are views of the selection's
        with_idx = opt.state_bytes(include_indices=True)
        info.update(state_bytes=state, state_bytes_with_indices=with_idx)
        dense_adamw = 2 * 4 * n
        info.update(dense_adamw_state_over_ours=dense_adamw / state,
                    dense_adamw_state_over_ours_with_indices=dense_adamw / with_idx)
    elif provider == "dense_masked":
        g = torch.Generator(device=DEVICE).manual_seed(1)
        sel = torch.randperm(n, device=DEVICE, generator=g)[:k]
        flat_mask = torch.zeros(n, device=DEVICE)
        flat_mask[sel] = 1.0
        masks = list(flat_mask.split(n // N_TENSORS))
        fn, state_fn = _dense_masked_sam(params, masks, base)
        info.update(state_bytes=state_fn(), mask_bytes=n * 4)
    else:
        try:
            opt = _torch_opt(base, params, **({"foreach": True} if provider == "torch_foreach" else {"fused": True}))
            opt.step()
        except (RuntimeError, ValueError) as exc:  # fused not supported for this device/dtype in this torch
            pytest.skip(f"{provider}: {exc}")

        def fn():
            opt.step()
            _sync()

        info.update(state_bytes=_state_bytes(opt))
    # ours is ~100x cheaper: more rounds cost nothing and steady the median on a shared machine
    rounds = (10 if provider == "sparse" else 3) if n >= 10 ** 8 else (25 if provider == "sparse" else 7)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    st = benchmark.stats.stats
    _MEDIANS[(n, fraction, base, provider)] = (st.median, st.min)
    dense = _MEDIANS.get((n, fraction, base, "dense_masked"))
    if provider == "sparse" and dense is not None:
        # median ratio, and min ratio (the steadier estimate when other jobs preempt the benchmark)
        info["time_ratio_dense_over_sparse"] = dense[0] / st.median
        info["time_ratio_dense_over_sparse_min"] = dense[1] / st.min
        for other in ("torch_foreach", "torch_fused"):
            if (n, fraction, base, other) in _MEDIANS:
                info[f"time_ratio_{other}_over_sparse"] = _MEDIANS[(n, fraction, base, other)][0] / st.median
    benchmark.extra_info.update(info)
