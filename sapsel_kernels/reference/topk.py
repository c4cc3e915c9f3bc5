"""Exact top-k selection in pure PyTorch: the fallback on every device and the oracle for the C++/Triton paths.

Contract shared by every backend of ``sapsel::topk_select`` (see ``ops/topk.py``):

* the k largest (``largest=True``) or k smallest scores are selected **by value**; among scores equal to the
  threshold, the **lowest flat index wins**; -0.0 and +0.0 are the same value;
* ``indices``: int64, shape [k], strictly ascending;
* ``threshold``: 0-dim, dtype of the scores, the value of the k-th selected element (the smallest selected value for
  ``largest=True``, the largest for ``largest=False``); a tie at ±0 reports +0.0. For k = 0 it is +inf
  (``largest``) / -inf (smallest): "nothing is at or beyond it";
* NaN or ±Inf anywhere in the scores is an error (``ValueError`` naming the first offending position), whatever k.

This path works differently from the radix kernels on purpose (so it can serve as their oracle): it maps the floats
to *signed* integers with the same order (sign-magnitude -> two's complement), then takes a stable descending sort
of the keys, whose first k entries are exactly "largest values, lowest index first among equals". It costs a full
sort: O(N log N) time and ~16 bytes/element of scratch.
"""

import torch

_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
           torch.float64: torch.int64}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def signed_key(x: torch.Tensor) -> torch.Tensor:
    """Signed integer key with the order of the float values (the same width as the float; -0.0 -> key of +0.0).

    Non-negative floats keep their bit pattern; for negative floats every bit but the sign is flipped, so larger
    magnitudes become smaller integers. Finite inputs only (NaN would get a key too, but no meaningful one).
    """
    it = _INT_OF[x.dtype]
    info = torch.iinfo(it)
    b = x.view(it).masked_fill(x.view(it) == info.min, 0)  # -0.0 -> +0.0
    # branch-free: the arithmetic shift is all ones for negative keys (flip the magnitude bits), zero otherwise.
    # Same keys as two torch.where (checked on every 16-bit pattern), 0.26 vs 0.31 s for 1e7 float32 on the 2-core
    # CPU machine under load; it is the sharded select's main local cost
    return b ^ ((b >> (info.bits - 1)) & info.max)


def check_finite_ref(x: torch.Tensor, what: str = "scores") -> None:
    """Raise ValueError naming the first NaN/Inf position of the 1-D tensor ``x``."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"topk_select: non-finite score {x[i].item()} at index {i} of {what} "
                         f"(NaN/Inf cannot be ranked; fix the scores first)")


def check_topk_args(scores: torch.Tensor, k: int) -> None:
    """The argument checks every backend applies (and the fake kernel): 1-D float32/float16/bfloat16, 0 <= k <= N."""
    if scores.dim() != 1:
        raise ValueError(f"topk_select: scores must be 1-D (a flat score vector), got shape {tuple(scores.shape)}")
    if scores.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"topk_select: scores must be float32, float16 or bfloat16, got {scores.dtype}")
    n = scores.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"topk_select: k must be in [0, {n}] for {n} scores, got k={k}")


def empty_threshold(scores: torch.Tensor, largest: bool) -> torch.Tensor:
    return torch.full((), float("inf") if largest else float("-inf"), dtype=scores.dtype, device=scores.device)


def topk_select_ref(scores: torch.Tensor, k: int, largest: bool = True):
    """Reference ``topk_select``: (indices int64 [k] ascending, threshold 0-dim in the scores' dtype).

    scores: 1-D float32/float16/bfloat16, any device; non-contiguous input is fine.
    """
    check_topk_args(scores, k)
    return rank_ref(scores, k, largest)


def rank_ref(scores: torch.Tensor, k: int, largest: bool = True):
    """``topk_select_ref`` without the dtype restriction (float64 too; used by ``select`` for float64 scores)."""
    if scores.dim() != 1 or not 0 <= k <= scores.shape[0]:
        check_topk_args(scores.float(), k)
    x = scores.contiguous()
    check_finite_ref(x)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device), empty_threshold(x, largest)
    key = signed_key(x)
    if not largest:
        key = ~key  # exact order reversal on integers (~a = -a - 1); equal values stay equal
    # stable sort: among equal keys the original (ascending index) order is kept -> lowest index first
    _, order = torch.sort(key, descending=True, stable=True)
    chosen = order[:k]
    last = chosen[k - 1]
    idx, _ = torch.sort(chosen)
    thr = x[last].clone()
    if thr.item() == 0:
        thr = torch.zeros((), dtype=x.dtype, device=x.device)  # a ±0 tie reports +0.0
    return idx, thr.reshape(())
