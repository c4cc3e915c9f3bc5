"""Pure-PyTorch references of the probe ops: Rademacher probes and the fused Hutchinson (Welford) accumulation.

Numerics contract shared bit for bit by the three paths (reference, ``csrc/probes.cpp``, ``kernels/probes.py``):

* z_i for (seed, probe p, global flat index i) is the Philox Rademacher stream of ``reference/philox.py``;
* one sample is x_i = z_i * Hz_i, formed in float32 (Hz is first rounded to float32; z = +-1 makes the product exact);
* Welford update with n = count + 1 samples and ``inv = float32(1 / n)`` (the double quotient rounded once to
  float32)::

      delta = x - mean              (float32)
      mean' = mean + delta * inv    (two float32 roundings: product, then sum; never fused into an FMA)
      m2'   = m2 + delta * (x - mean')

  so every path performs the same sequence of correctly rounded float32 operations and gives the same bits;
* the batched form consumes rows j = 0..m-1 of Hz as probes p + j with counts count + j, in that order: bit-identical
  to m sequential single-probe calls.
"""

import torch

from .philox import check_seed_probe, rademacher_ref

HZ_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_GLOBAL_INDEX = 2**62


def _inv_count(count: int) -> float:
    """float32(1 / count) rounded exactly as the C++ and Triton paths do (double quotient -> float32)."""
    return float(torch.tensor(1.0 / count, dtype=torch.float64).to(torch.float32))


def _check_range(name: str, offset: int, n: int) -> None:
    # global flat indices live in [0, 2^62) on every path (csrc/common.h: kMaxGlobalIndex): the int64 group arithmetic
    # of the kernels, (g + 1) * 128 and offset + n, then cannot overflow
    if not (offset >= 0 and offset + n <= MAX_GLOBAL_INDEX):
        raise ValueError(f"{name}: offset must be >= 0 and offset + numel <= 2^62, got offset {offset} for {n} "
                         "elements")


def check_probe_args(like: torch.Tensor, offset: int, probe: int, seed: int, batched: bool,
                     name: str = "rademacher_probe"):
    """All input checks of rademacher_probe / rademacher_fill (metadata and ints only: the fakes run them too)."""
    if not like.is_floating_point():
        raise TypeError(f"{name}: the tensor must be floating, got {like.dtype}")
    if batched and like.dim() < 1:
        raise ValueError(f"{name}(batched=True): the tensor needs a leading probe dimension")
    m = like.shape[0] if batched else 1
    _check_range(name, offset, like.numel() // m if m else 0)
    check_seed_probe(seed, probe)
    if m and probe + m - 1 >= 2**32:
        raise ValueError(f"{name}: probes {probe}..{probe + m - 1} exceed the probe range [0, 2^32)")


def check_accumulate_args(name: str, mean, m2, hz, offset: int, probe: int, seed: int, count: int, batched: bool):
    """All input checks of hutchinson_accumulate[_batched]; raises before anything is written."""
    for t, tn in ((mean, "mean"), (m2, "m2")):
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: {tn} must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: {tn} must be contiguous")
    if mean.shape != m2.shape:
        raise ValueError(f"{name}: mean and m2 must have the same shape, got {tuple(mean.shape)} and {tuple(m2.shape)}")
    if hz.dtype not in HZ_DTYPES:
        raise TypeError(f"{name}: hz must be float32/float64/float16/bfloat16, got {hz.dtype}")
    if not (mean.device == m2.device == hz.device):
        raise ValueError(f"{name}: mean, m2 and hz must be on one device, got {mean.device}, {m2.device}, {hz.device}")
    n = mean.numel()
    if batched:
        if hz.dim() < 1:
            raise ValueError(f"{name}: hz must be [m, ...] with m probes in the leading dimension")
        m = hz.shape[0]
        row_numel = hz[0].numel() if m else n
        if row_numel != n:
            raise ValueError(f"{name}: each row of hz must have mean.numel() = {n} elements, "
                             f"got hz of shape {tuple(hz.shape)}")
    else:
        m = 1
        if hz.numel() != n:
            raise ValueError(f"{name}: hz has {hz.numel()} elements, mean has {n}")
    _check_range(name, offset, n)
    if not 0 <= count <= MAX_GLOBAL_INDEX - m:
        raise ValueError(f"{name}: count (samples already accumulated) must be in [0, 2^62 - m), got {count}")
    check_seed_probe(seed, probe)
    if m and probe + m - 1 >= 2**32:
        raise ValueError(f"{name}: probes {probe}..{probe + m - 1} exceed the probe range [0, 2^32)")
    return m, n


def rademacher_probe_ref(like: torch.Tensor, offset: int, probe: int, seed: int, batched: bool = False):
    """z shaped and typed like ``like``: flat element i of ``like`` gets the probe value of global index offset + i.

    ``batched=True``: ``like`` is [m, ...]; row j is probe ``probe + j`` over the same global indices.
    """
    check_probe_args(like, offset, probe, seed, batched)
    if not batched:
        return rademacher_ref(like.numel(), offset, probe, seed, device=like.device, dtype=like.dtype).view(like.shape)
    n = like[0].numel() if like.shape[0] else 0
    rows = [rademacher_ref(n, offset, probe + j, seed, device=like.device, dtype=like.dtype)
            for j in range(like.shape[0])]
    out = torch.stack(rows) if rows else torch.empty(0, n, device=like.device, dtype=like.dtype)
    return out.view(like.shape)


def rademacher_fill_ref(out: torch.Tensor, offset: int, probe: int, seed: int, batched: bool = False) -> None:
    """In-place form of ``rademacher_probe``: ``out`` (any floating dtype and layout) receives the probe values.
    Lets a caller reuse one probe buffer across passes (no fresh allocation, no page faults)."""
    check_probe_args(out, offset, probe, seed, batched, "rademacher_fill")
    out.copy_(rademacher_probe_ref(out, offset, probe, seed, batched))


def _welford_(mean: torch.Tensor, m2: torch.Tensor, hz_row: torch.Tensor, offset: int, probe: int, seed: int,
              count: int):
    """One in-place Welford step on flat float32 views; the exact op sequence of the contract above."""
    z = rademacher_ref(mean.numel(), offset, probe, seed, device=mean.device, dtype=torch.float32)
    h = hz_row.reshape(-1).to(torch.float32)
    x = torch.where(z > 0, h, -h)
    inv = torch.tensor(_inv_count(count + 1), dtype=torch.float32, device=mean.device)
    delta = x - mean
    step = delta * inv
    new_mean = mean + step
    dev = x - new_mean
    prod = delta * dev
    new_m2 = m2 + prod
    mean.copy_(new_mean)
    m2.copy_(new_m2)


def hutchinson_accumulate_ref(mean, m2, hz, offset: int, probe: int, seed: int, count: int) -> None:
    """In place: fold the sample x = z (.) Hz of probe ``probe`` into the Welford state (mean, m2) of
    ``count`` previous samples. mean, m2: float32, contiguous, any shape with n elements covering global flat
    indices [offset, offset + n); hz: n elements, float32/float64/float16/bfloat16."""
    check_accumulate_args("hutchinson_accumulate", mean, m2, hz, offset, probe, seed, count, batched=False)
    if mean.numel():
        _welford_(mean.view(-1), m2.view(-1), hz, offset, probe, seed, count)


def hutchinson_accumulate_batched_ref(mean, m2, hz, offset: int, probe: int, seed: int, count: int) -> None:
    """Batched form: hz is [m, ...] (row j = H z for probe ``probe + j``); equivalent, bit for bit, to m calls of
    ``hutchinson_accumulate`` with (probe + j, count + j)."""
    m, _ = check_accumulate_args("hutchinson_accumulate_batched", mean, m2, hz, offset, probe, seed, count,
                                 batched=True)
    if not mean.numel():
        return
    mf, vf = mean.view(-1), m2.view(-1)
    # Work on copies so that a failure half way leaves the caller's state untouched.
    wm, wv = mf.clone(), vf.clone()
    for j in range(m):
        _welford_(wm, wv, hz[j], offset, probe + j, seed, count + j)
    mf.copy_(wm)
    vf.copy_(wv)
