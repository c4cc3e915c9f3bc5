"""Philox4x32-10 and the Rademacher probe layout in Triton; bit-exact twin of reference/philox.py and csrc/common.h.

``rademacher_block`` is the device function fused kernels call: given int64 global flat offsets laid out as a
[GROUPS, 128] block (row r holds group g0 + r), it returns the float32 probe values in that layout.
"""

import torch
import triton
import triton.language as tl

# Kernels taking the probe index and the seed halves as plain ints must not let the GPU launcher specialise them:
# an int argument equal to 1 becomes a constexpr there, and ``.to(tl.uint32)`` on it fails to compile (seed 1 and
# probe 1 are everyday values). The interpreter never specialises, so only tests/ops/test_triton_gpu_compile.py sees it.
SCALAR_KEYS = ["probe", "seed_lo", "seed_hi"]


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors; key (k0, k1) uint32 scalars or tensors."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def rademacher_groups(group, probe, seed_lo, seed_hi):
    """Four uint32 Philox words for int64 group indices ``group`` (any shape) of probe ``probe``."""
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + probe.to(tl.uint32)
    c3 = tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def rademacher_block(g0, probe, seed_lo, seed_hi, GROUPS: tl.constexpr):
    """Probe values (float32 in {-1, +1}) for flat indices (g0 + r) * 128 + c, as a [GROUPS, 128] block."""
    rows = g0 + tl.arange(0, GROUPS).to(tl.int64)
    w0, w1, w2, w3 = rademacher_groups(rows, probe, seed_lo, seed_hi)
    lane = tl.arange(0, 128)
    word = lane // 32
    shift = (lane % 32).to(tl.uint32)
    w = tl.where(word[None, :] == 0, w0[:, None],
                 tl.where(word[None, :] == 1, w1[:, None], tl.where(word[None, :] == 2, w2[:, None], w3[:, None])))
    bit = (w >> shift[None, :]) & 1
    return bit.to(tl.float32) * 2.0 - 1.0


@triton.jit(do_not_specialize=SCALAR_KEYS)
def _rademacher_kernel(out_ptr, n, offset, probe, seed_lo, seed_hi, GROUPS: tl.constexpr):
    # One program owns GROUPS * 128 consecutive global flat indices starting at a group boundary; int64 offsets.
    pid = tl.program_id(0).to(tl.int64)
    g_first = offset // 128
    g0 = g_first + pid * GROUPS
    z = rademacher_block(g0, probe, seed_lo, seed_hi, GROUPS)
    flat = (g0 + tl.arange(0, GROUPS).to(tl.int64))[:, None] * 128 + tl.arange(0, 128)[None, :]
    pos = flat - offset
    mask = (pos >= 0) & (pos < n)
    tl.store(out_ptr + pos, z, mask=mask)


def rademacher(n: int, offset: int, probe: int, seed: int, device="cuda") -> torch.Tensor:
    """float32 probe values for global flat indices [offset, offset + n) (launcher of ``_rademacher_kernel``)."""
    out = torch.empty(n, device=device, dtype=torch.float32)
    if n == 0:
        return out
    groups = 8
    n_groups = (offset + n - 1) // 128 - offset // 128 + 1
    grid = (triton.cdiv(n_groups, groups),)
    _rademacher_kernel[grid](out, n, offset, probe, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, GROUPS=groups)
    return out
