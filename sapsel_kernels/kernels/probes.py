"""Triton kernels of the probe ops: Rademacher probes and the fused Hutchinson (Welford) accumulation.

Bit-exact twins of ``reference/probes.py`` and ``csrc/probes.cpp`` (see the numerics contract there). The launchers
pass ``enable_fp_fusion=False`` on GPUs: the Welford update ``mean + delta * inv`` must stay two float32 roundings
(an FMA would change the bits); the reciprocals 1/(count+j+1) are rounded on the host once, as on the other paths.
"""

import torch
import triton
import triton.language as tl

from ..reference.probes import check_accumulate_args, check_probe_args
from .philox import SCALAR_KEYS, rademacher_block

GROUPS = 8  # Philox groups (x128 elements) per program: 1024 elements, 4 KiB of float32 per row of Hz


def _launch_opts(device: torch.device):
    # The interpreter runs numpy ops (no fusion, and it rejects backend options); GPUs need fusion off.
    return {} if device.type == "cpu" else {"enable_fp_fusion": False}


@triton.jit(do_not_specialize=SCALAR_KEYS)
def _rademacher_probe_kernel(out_ptr, n, offset, probe, seed_lo, seed_hi, GROUPS: tl.constexpr):
    # One program owns GROUPS*128 consecutive global flat indices (aligned to a Philox group) of one probe row.
    # Grid: (cdiv(#groups, GROUPS), m). Output float32; masked outside [offset, offset + n). int64 offsets.
    pid = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    g0 = offset // 128 + pid * GROUPS
    z = rademacher_block(g0, probe + j, seed_lo, seed_hi, GROUPS)
    flat = (g0 + tl.arange(0, GROUPS).to(tl.int64))[:, None] * 128 + tl.arange(0, 128)[None, :]
    pos = flat - offset
    mask = (pos >= 0) & (pos < n)
    tl.store(out_ptr + j * n + pos, z, mask=mask)


@triton.jit(do_not_specialize=SCALAR_KEYS)
def _hutchinson_accumulate_kernel(mean_ptr, m2_ptr, hz_ptr, inv_ptr, n, offset, probe, seed_lo, seed_hi,
                                  M: tl.constexpr, GROUPS: tl.constexpr):
    # One program owns GROUPS*128 consecutive global flat indices (aligned to a Philox group): it loads mean/m2
    # once, folds the M rows of Hz (row j = probe + j, read once each) in order, and stores mean/m2 once.
    # M is a constexpr: one compile per probes-per-pass value (typically 1-2 values per run); a runtime loop bound
    # would also do on GPUs but the interpreter (numpy 2.x) cannot take one.
    # Grid: (cdiv(#groups, GROUPS),). Accumulation in float32; masked outside [offset, offset + n); int64 offsets.
    pid = tl.program_id(0).to(tl.int64)
    g0 = offset // 128 + pid * GROUPS
    flat = (g0 + tl.arange(0, GROUPS).to(tl.int64))[:, None] * 128 + tl.arange(0, 128)[None, :]
    pos = flat - offset
    mask = (pos >= 0) & (pos < n)
    mu = tl.load(mean_ptr + pos, mask=mask, other=0.0)
    v = tl.load(m2_ptr + pos, mask=mask, other=0.0)
    for j in range(M):
        jj = j + tl.zeros((), dtype=tl.int64)  # int64 on every path (j is an int32 tensor on GPUs)
        z = rademacher_block(g0, probe + jj, seed_lo, seed_hi, GROUPS)
        h = tl.load(hz_ptr + jj * n + pos, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(z > 0, h, -h)
        inv = tl.load(inv_ptr + jj)
        delta = x - mu
        step = delta * inv
        mu = mu + step
        dev = x - mu
        prod = delta * dev
        v = v + prod
    tl.store(mean_ptr + pos, mu, mask=mask)
    tl.store(m2_ptr + pos, v, mask=mask)


def _grid_groups(n: int, offset: int) -> int:
    n_groups = (offset + n - 1) // 128 - offset // 128 + 1
    return triton.cdiv(n_groups, GROUPS)


def _fill_f32(out: torch.Tensor, m: int, offset: int, probe: int, seed: int) -> None:
    n = out.numel() // m
    _rademacher_probe_kernel[(_grid_groups(n, offset), m)](out, n, offset, probe, seed & 0xFFFFFFFF,
                                                          (seed >> 32) & 0xFFFFFFFF, GROUPS=GROUPS)


def rademacher_probe(like: torch.Tensor, offset: int, probe: int, seed: int, batched: bool = False) -> torch.Tensor:
    """Launcher of ``_rademacher_probe_kernel``: z shaped and typed like ``like`` (batched: row j = probe + j)."""
    check_probe_args(like, offset, probe, seed, batched, "rademacher_probe")
    m = like.shape[0] if batched else 1
    out = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    if out.numel() == 0:
        return out.to(like.dtype)
    _fill_f32(out, m, offset, probe, seed)
    return out if like.dtype == torch.float32 else out.to(like.dtype)


def rademacher_fill(out: torch.Tensor, offset: int, probe: int, seed: int, batched: bool = False) -> None:
    """In-place launcher: ``out`` receives the probe values (written directly when float32 and contiguous)."""
    check_probe_args(out, offset, probe, seed, batched, "rademacher_fill")
    m = out.shape[0] if batched else 1
    if out.numel() == 0:
        return
    if out.dtype == torch.float32 and out.is_contiguous():
        _fill_f32(out, m, offset, probe, seed)
    else:
        out.copy_(rademacher_probe(out, offset, probe, seed, batched))


def _accumulate(name, mean, m2, hz, offset, probe, seed, count, batched):
    m, n = check_accumulate_args(name, mean, m2, hz, offset, probe, seed, count, batched)
    if n == 0 or m == 0:
        return
    hz = hz.contiguous()
    inv = torch.tensor([1.0 / (count + j + 1) for j in range(m)], dtype=torch.float64).to(torch.float32)
    inv = inv.to(mean.device)
    _hutchinson_accumulate_kernel[(_grid_groups(n, offset),)](
        mean, m2, hz, inv, n, offset, probe, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, M=m, GROUPS=GROUPS,
        **_launch_opts(mean.device))


def hutchinson_accumulate(mean, m2, hz, offset: int, probe: int, seed: int, count: int) -> None:
    """Launcher of ``_hutchinson_accumulate_kernel`` for one probe (in place on mean, m2)."""
    _accumulate("hutchinson_accumulate", mean, m2, hz, offset, probe, seed, count, batched=False)


def hutchinson_accumulate_batched(mean, m2, hz, offset: int, probe: int, seed: int, count: int) -> None:
    """Launcher for hz [m, ...]: probes probe..probe+m-1, counts count..count+m-1, in one pass over mean/m2."""
    _accumulate("hutchinson_accumulate_batched", mean, m2, hz, offset, probe, seed, count, batched=True)
