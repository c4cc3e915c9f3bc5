"""Philox4x32-10 and the Rademacher probe layout in pure PyTorch (int64 arithmetic, any device).

Bit-exact twin of ``csrc/common.h`` and ``kernels/philox.py``. The probe for (seed, probe p, global flat index i):

* group g = i >> 7 (one Philox call serves 128 consecutive flat indices), lane = i & 127;
* words = Philox4x32-10(counter = (g mod 2^32, g >> 32, p, 0), key = (seed mod 2^32, seed >> 32));
* z_i = +1 if bit (lane & 31) of word (lane >> 5) is set, else -1.

So a probe depends only on (seed, p, i): not on the tensor layout, the chunking, the batching or the backend.
"""

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
GROUP_SHIFT = 7
GROUP = 1 << GROUP_SHIFT


def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit halves of the 64-bit product a * m for 32-bit a (int64 tensor) without int64 overflow."""
    ah, al = a >> 16, a & 0xFFFF
    mh, ml = m >> 16, m & 0xFFFF
    mid = ah * ml + al * mh  # < 2^33
    t = al * ml + ((mid & 0xFFFF) << 16)  # < 2^33
    lo = t & MASK32
    hi = (ah * mh + (mid >> 16) + (t >> 32)) & MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values; returns four int64 tensors of uint32 values."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + W0) & MASK32
        k1 = (k1 + W1) & MASK32
    return c0, c1, c2, c3


def check_seed_probe(seed: int, probe: int):
    if not (0 <= int(seed) < 2**63):
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    if not (0 <= int(probe) < 2**32):
        raise ValueError(f"probe index must be in [0, 2^32), got {probe}")


def rademacher_ref(n: int, offset: int, probe: int, seed: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """z for global flat indices [offset, offset + n) of probe ``probe`` under ``seed``; values in {-1, +1}."""
    check_seed_probe(seed, probe)
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be >= 0, got n={n}, offset={offset}")
    if n == 0:
        return torch.empty(0, device=device, dtype=dtype)
    g0 = offset >> GROUP_SHIFT
    g1 = (offset + n - 1) >> GROUP_SHIFT
    g = torch.arange(g0, g1 + 1, device=device, dtype=torch.int64)
    zero = torch.zeros_like(g)
    words = philox4x32_10(g & MASK32, g >> 32, zero + int(probe), zero, int(seed) & MASK32, (int(seed) >> 32) & MASK32)
    w = torch.stack(words, dim=1)  # [G, 4]
    bits = (w.unsqueeze(-1) >> torch.arange(32, device=device, dtype=torch.int64)) & 1  # [G, 4, 32]
    bits = bits.reshape(-1)[offset - (g0 << GROUP_SHIFT):][:n]
    return (bits * 2 - 1).to(dtype)
