"""``torch.ops.sapsel.topk_select``: exact top-k over a flat score vector (radix select).

Schema: ``topk_select(Tensor scores, int k, bool largest=True) -> (Tensor indices, Tensor threshold)``

* scores: 1-D float32/float16/bfloat16, any length (int64-safe past 2^31); non-contiguous input is copied first;
* indices: int64 [k], strictly ascending flat positions of the selected scores;
* threshold: 0-dim, scores' dtype: the k-th selected value (+inf / -inf for k = 0; a ±0 tie reports +0.0).

Selection is by value with the deterministic tie rule "among scores equal to the threshold, the lowest index wins",
so every backend (C++, Triton, reference) returns the identical index set. NaN/±Inf in the scores raise ValueError
naming the first offending index, whatever k. See ``reference/topk.py`` for the full contract.
"""

import torch

from ..reference.topk import check_topk_args, topk_select_ref
from ._lib import define_op


def _fake(scores, k, largest=True):
    check_topk_args(scores, k)
    return scores.new_empty((k,), dtype=torch.int64), scores.new_empty(())


_op = define_op(
    "topk_select",
    "(Tensor scores, int k, bool largest=True) -> (Tensor indices, Tensor threshold)",
    reference=topk_select_ref,
    fake=_fake,
    cpp="topk_select_cpu",
    triton="topk:topk_select",
)


def topk_select(scores: torch.Tensor, k: int, largest: bool = True):
    """``torch.ops.sapsel.topk_select`` with its arguments checked in Python first, so that a bad ``k`` (a bool, a
    float, a value the schema's int64 cannot hold such as 2**70, or one outside [0, N]) is a TypeError / ValueError
    naming ``k`` rather than the dispatcher's cast error. Returns (indices int64 [k] ascending, threshold 0-dim)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"topk_select: k must be an int, got {type(k).__name__}")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"topk_select: scores must be a tensor, got {type(scores).__name__}")
    if scores.dim() == 1 and not 0 <= k <= scores.shape[0]:
        raise ValueError(f"topk_select: k must be in [0, {scores.shape[0]}] for {scores.shape[0]} scores, got k={k}")
    if not isinstance(largest, bool):
        raise TypeError(f"topk_select: largest must be a bool, got {type(largest).__name__}")
    return _op(scores, k, largest)
