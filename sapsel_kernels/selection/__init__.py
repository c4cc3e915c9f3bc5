"""Top-k parameter selection over a flat score vector: ``select`` and the ``Selection`` it returns.

``select`` ranks scores (e.g. a Hessian-diagonal estimate) with the exact radix select ``torch.ops.sapsel.topk_select``
and returns the chosen flat indices in ascending order. The result is deterministic and identical on every backend:
selection is by value, and among scores equal to the threshold the lowest flat index wins.

``Selection``, ``as_selection`` and ``resolve_k`` are defined in :mod:`sapsel_kernels.selection.selection_core`
(shared with ``select(..., group=...)`` in :mod:`sapsel_kernels.selection.distributed`) and re-exported here.

The selection package: the second stage of the pipeline. ``select`` (this module) ranks a score vector,
``strategies`` computes the scores a strategy ranks (from ``curvature`` for the Hessian strategies) and
``distributed`` ranks them sharded over a process group.
"""

from collections.abc import Sequence

import torch

from .selection_core import Selection, as_selection, resolve_k, topk_flat  # noqa: F401  (API of this module)
from ..space import ParamSpace

Scores = torch.Tensor | dict[str, torch.Tensor] | Sequence[torch.Tensor]


def _flatten_scores(scores: Scores, space: ParamSpace | None) -> torch.Tensor:
    """One flat score vector in space order (a view/no copy when ``scores`` is already a flat contiguous tensor)."""
    if isinstance(scores, torch.Tensor):
        flat = scores.reshape(-1)
        if space is not None and flat.numel() != space.numel:
            raise ValueError(f"select: scores have {flat.numel()} elements but the space has {space.numel}")
        return flat
    if space is None:
        raise ValueError("select: per-parameter scores (a dict or list) need space= to fix their order")
    if isinstance(scores, dict):
        missing = [n for n in space.names if n not in scores]
        extra = [n for n in scores if n not in space._index]
        if missing or extra:
            raise ValueError(f"select: score dict does not match the space (missing {missing[:5]}, "
                             f"unexpected {extra[:5]})")
        parts = [scores[n] for n in space.names]
    else:
        parts = list(scores)
        if len(parts) != len(space):
            raise ValueError(f"select: expected {len(space)} score tensors (one per parameter), got {len(parts)}")
    for t, name, numel in zip(parts, space.names, space.numels):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"select: score for {name} is a {type(t).__name__}, not a tensor")
        if t.numel() != numel:
            raise ValueError(f"select: score for {name} has {t.numel()} elements, the parameter has {numel}")
    devices = {t.device for t in parts}
    if len(devices) > 1:
        raise ValueError(f"select: score tensors live on several devices {sorted(map(str, devices))}")
    dtypes = {t.dtype for t in parts}
    if len(dtypes) > 1:
        raise TypeError(f"select: score tensors have mixed dtypes {sorted(map(str, dtypes))}; cast them to one")
    return torch.cat([t.reshape(-1) for t in parts])


def select(scores: Scores, k: int | None = None, fraction: float | None = None, largest: bool = True,
           scope: str = "global", space: ParamSpace | None = None, *, group=None, gather: bool = False) -> "Selection":
    """Select the k largest (or smallest) scores, globally or within each parameter tensor.

    Args:
        scores: a flat score tensor (any shape is flattened row-major; non-contiguous input is copied), float32 /
            float16 / bfloat16 (float64 is ranked by the pure-PyTorch reference); or, with ``space``, a dict
            name -> tensor or a list of per-parameter tensors (same numel as the parameters; one device, one dtype).
        k: number of scores to select (global scope), or per parameter tensor (per_layer scope, clamped to each
            tensor's size). 0 <= k <= N.
        fraction: instead of k, a fraction in (0, 1]: k = ceil(fraction * N) (at least 1) over the N scores in scope.
        largest: True selects the largest scores, False the smallest.
        scope: "global" (one ranking over all scores) or "per_layer" (one ranking per parameter tensor; needs space).
        space: the ParamSpace the scores live in: orders dict/list scores, names parameters in errors, and stamps
            the selection with ``space.signature``.
        group: a torch.distributed process group (e.g. ``torch.distributed.group.WORLD``): the scores are SHARDED,
            this rank passes its contiguous range of the global flat vector (rank r holds positions
            [start_r, start_r + n_r), ranks in order; n_r = 0 is allowed) and the call is a collective over
            ``group``. The result is bit-identical to ``select`` on the concatenated scores. With ``space`` =
            ``ParamSpace`` of an FSDP2 ``fully_shard`` model, each rank passes instead the scores of its own shards
            (a dict / list of per-parameter DTensors or local shards, or their flat concatenation): the same
            selection of the global index space. Global scope only (per_layer raises NotImplementedError).
            ``space``, if given, is the GLOBAL space. See ``sapsel_kernels.distributed`` (layout, bytes sent)
            and docs/topk.md. None: single process (``torch.distributed.group.WORLD`` is None until
            ``init_process_group``: initialise first).
        gather: with ``group``: also all-gather the indices so that every rank holds the full selection.

    Returns:
        Selection with int64 ascending flat indices. Ties at the threshold: lowest flat index wins; -0.0 == +0.0.
        With ``group``: a ``distributed.ShardedSelection`` whose ``indices`` are this rank's part of the selection
        as GLOBAL flat indices (the full selection with ``gather=True``), ``local_indices`` the same as positions in
        this rank's tensor, ``numel`` the global N, ``threshold`` the global one; errors are raised on every rank.

    Raises:
        ValueError: k/fraction missing, both given or out of range; empty scores; NaN/Inf scores (naming the
            parameter and local index through ``space``, or the flat position); per_layer without a space;
            scores not matching the space; score tensors on several devices.
        TypeError: unsupported or mixed dtypes, non-integer k.

    Peak extra memory: the output (8k bytes of indices) plus the top-k op's scratch (C++: at most N/8 bytes); a dict
    or list of scores is concatenated into one flat copy (N scores), as is non-contiguous input.
    """
    if group is not None:
        from .distributed import select_sharded

        return select_sharded(scores, k, fraction, largest, scope, space, group=group, gather=gather)
    if gather:
        raise ValueError("select: gather=True needs group= (a process group over which the scores are sharded)")
    if scope not in ("global", "per_layer"):
        raise ValueError(f"select: scope must be 'global' or 'per_layer', got {scope!r}")
    flat = _flatten_scores(scores, space)
    n = flat.numel()
    if n == 0:
        raise ValueError("select: no scores (empty input)")
    if flat.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"select: scores must be float32, float16, bfloat16 or float64, got {flat.dtype}")
    flat = flat.contiguous()
    sig = space.signature if space is not None else None
    if scope == "global":
        kk = resolve_k(n, k=k, fraction=fraction)
        idx, thr = topk_flat(flat, kk, largest, space, 0)
        return Selection(idx, n, thr, space_signature=sig, largest=largest, scope="global", space=space)
    if space is None:
        raise ValueError("select: scope='per_layer' needs space= (the parameter boundaries)")
    if k is not None:
        if fraction is not None:
            raise ValueError("give exactly one of k= or fraction=")
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 0:
            raise ValueError(f"select: k must be >= 0 (per parameter tensor), got k={k}")
    parts, thrs = [], []
    for off, numel, name in zip(space.offsets, space.numels, space.names):
        kk = min(k, numel) if k is not None else resolve_k(numel, fraction=fraction, what=f" in {name}")
        idx, thr = topk_flat(flat[off:off + numel], kk, largest, space, off)
        parts.append(idx + off)
        thrs.append(thr)
    idx = torch.cat(parts)  # ascending: each part is ascending and the offsets increase
    return Selection(idx, n, torch.stack(thrs), space_signature=sig, largest=largest, scope="per_layer", space=space)


__all__: list[str] = ["Selection", "select", "as_selection", "resolve_k"]
