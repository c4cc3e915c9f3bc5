"""Exact global top-k over N fp32 scores: ours vs torch.topk vs the cat + topk + mask pipeline users write today.

Providers, side by side in one group per (N, k):

* ``torch_topk``      ``torch.topk(scores, k, sorted=False)`` on the flat vector (indices unordered);
* ``cat_topk_mask``   the global-selection pipeline of SSAM/SalUn-style code: ``torch.cat`` of the per-parameter
                      score tensors (8 tensors of N/8), ``topk``, scatter into a bool mask, split into per-parameter
                      masks;
* ``sapsel``          ``torch.ops.sapsel.topk_select(scores, k)`` (exact radix select; ascending int64 indices and the
                      threshold, deterministic ties);
* ``sapsel_pipeline`` ``sapsel_kernels.select(list_of_scores, k, space=...)`` + ``Selection.masks(space)``: the same
                      job as ``cat_topk_mask`` through our API.

extra_info: N, k, ``gbps`` (4N bytes / median time: one streaming read of the scores as the unit),
``ratio_torch_topk_over_this`` (torch_topk's median / this provider's; the torch_topk row of the group runs first),
``peak_extra_bytes`` (peak memory above the live inputs during one call, outputs included: CUDA from
``torch.cuda.max_memory_allocated``; CPU from the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
during one call made after ``malloc_trim(0)`` with glibc's mmap threshold at 64 KiB, so that freed-and-reused heap
memory cannot hide an allocation; ``None`` where that is not available; memory allocated but never touched is not
counted) and ``peak_extra_method``.

Sizes: N = 1e6 and 1e7 by default; also 1e8 with ``SAPSEL_BENCH_FULL=1``; ``SAPSEL_BENCH_QUICK=1``: N = 1e6 only.
k = 0.1%, 1%, 10% of N. Run: ``python -m pytest bench/test_bench_topk.py --benchmark-only``.
"""

import os

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels import ParamSpace

if os.environ.get("SAPSEL_BENCH_QUICK") == "1":
    SIZES = [10**6]
else:
    SIZES = [10**6, 10**7] + ([10**8] if os.environ.get("SAPSEL_BENCH_FULL") == "1" else [])
FRACTIONS = [0.001, 0.01, 0.1]
PROVIDERS = ["torch_topk", "cat_topk_mask", "sapsel", "sapsel_pipeline"]  # torch_topk first: the ratio needs it
N_TENSORS = 8
DEVICE = os.environ.get("SAPSEL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
_MEDIANS = {}
_DATA = {}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _data(n):
    if n not in _DATA:
        _DATA.clear()
        g = torch.Generator(device=DEVICE).manual_seed(0)
        flat = torch.randn(n, device=DEVICE, generator=g)
        parts = [t.clone() for t in flat.split(n // N_TENSORS)]  # separate per-parameter tensors (the cat copies)
        space = ParamSpace({f"layer{i}.weight": torch.empty(p.shape, device=DEVICE, requires_grad=True)
                            for i, p in enumerate(parts)})
        _DATA[n] = (flat, parts, space)
    return _DATA[n]


def _fn(provider, n, k):
    flat, parts, space = _data(n)
    if provider == "torch_topk":
        return lambda: torch.topk(flat, k, sorted=False)
    if provider == "sapsel":
        return lambda: torch.ops.sapsel.topk_select(flat, k, True)
    if provider == "cat_topk_mask":
        def pipeline():
            s = torch.cat([p.reshape(-1) for p in parts])
            idx = torch.topk(s, k, sorted=False).indices
            mask = torch.zeros(s.numel(), dtype=torch.bool, device=s.device).scatter_(0, idx, True)
            return [m.view_as(p) for m, p in zip(mask.split([p.numel() for p in parts]), parts)]
        return pipeline
    if provider == "sapsel_pipeline":
        return lambda: sk.select(parts, k=k, space=space).masks(space)
    raise ValueError(provider)


def _mallopt_mmap_threshold(nbytes):
    """glibc: serve allocations >= nbytes by mmap (returned to the OS on free), so that RSS tracks live memory."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _rss_hwm_reset():
    """Return freed heap pages to the OS (malloc_trim) and reset the process's peak RSS; returns the current RSS in
    bytes, or None if that is not possible here."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss_hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def _peak_extra(fn):
    """(bytes, method) of the peak memory one call adds on top of what is live before it."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak), "torch.cuda.max_memory_allocated"
    # Without this (and the malloc_trim in _rss_hwm_reset), glibc reuses freed heap memory that is still resident
    # and the RSS delta reads ~0.
    if not _mallopt_mmap_threshold(64 * 1024):
        return None, "unavailable"
    try:
        base = _rss_hwm_reset()
        if base is None:
            return None, "unavailable"
        out = fn()
        peak = _rss_hwm() - base
        del out
    finally:
        _mallopt_mmap_threshold(32 * 1024 * 1024)  # glibc's ceiling for its dynamic threshold
    return int(peak), "process peak RSS (VmHWM) delta, glibc mmap threshold 64 KiB"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("frac", FRACTIONS)
@pytest.mark.parametrize("n", SIZES)
def test_topk(benchmark, n, frac, provider):
    k = int(n * frac)
    fn = _fn(provider, n, k)

    def run():
        out = fn()
        _sync()
        return out

    benchmark.group = f"topk N={n:.0e} k={frac:g}N {DEVICE}"
    rounds = 3 if n >= 10**8 else (5 if n >= 10**7 else 15)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    _MEDIANS[(n, frac, provider)] = med
    peak, method = _peak_extra(run)
    info = benchmark.extra_info
    info.update(N=n, k=k, device=DEVICE, gbps=round(4 * n / med / 1e9, 2), peak_extra_bytes=peak,
                peak_extra_method=method)
    ref = _MEDIANS.get((n, frac, "torch_topk"))
    if ref is not None:
        info["ratio_torch_topk_over_this"] = round(ref / med, 2)
