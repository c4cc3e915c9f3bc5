"""Top-k parameter selection over a flat score vector: ``select`` and the ``Selection`` it returns.

``select`` ranks scores (e.g. a Hessian-diagonal estimate) with the exact radix select ``torch.ops.sapsel.topk_select``
and returns the chosen flat indices in ascending order. The result is deterministic and identical on every backend:
selection is by value, and among scores equal to the threshold the lowest flat index wins.
"""

import math
from collections.abc import Sequence

import torch

from .space import ParamSpace

_FORMAT = "sapsel.Selection"
_VERSION = 1

Scores = torch.Tensor | dict[str, torch.Tensor] | Sequence[torch.Tensor]


def _first_nonfinite(flat: torch.Tensor) -> int:
    bad = ~torch.isfinite(flat)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else -1


def _nonfinite_error(flat: torch.Tensor, space: ParamSpace | None, base: int = 0) -> ValueError | None:
    """A ValueError naming the first NaN/Inf of ``flat`` (flat position ``base`` + i), or None if there is none."""
    i = _first_nonfinite(flat)
    if i < 0:
        return None
    where = space.describe_position(base + i) if space is not None else f"flat index {base + i}"
    return ValueError(f"select: score {flat[i].item()} at {where} is not finite; NaN/Inf scores cannot be ranked "
                      "(check the score estimate, e.g. for overflow)")


def _k_from(k, fraction, n: int, what: str) -> int:
    """The k of one ranking over ``n`` scores from exactly one of ``k`` / ``fraction``."""
    if (k is None) == (fraction is None):
        raise ValueError("select: give exactly one of k= or fraction=")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"select: k must be an int, got {type(k).__name__}")
        if not 0 <= k <= n:
            raise ValueError(f"select: k must be in [0, {n}] for {n} scores{what}, got k={k}")
        return k
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"select: fraction must be in (0, 1], got {fraction}")
    # k = ceil(fraction * n), at least 1; the 1e-6 slack keeps e.g. 0.1 * 1000 (= 100.00000000000001) at 100
    return min(n, max(1, math.ceil(fraction * n - 1e-6)))


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


def _rank(flat: torch.Tensor, k: int, largest: bool, space, base: int):
    """topk_select on a flat slice, turning a NaN/Inf error into one that names the parameter and position."""
    if flat.dtype == torch.float64:  # the kernels rank 32/16-bit floats; float64 goes through the exact reference
        from .reference.topk import rank_ref as fn
    else:
        fn = torch.ops.sapsel.topk_select
    try:
        return fn(flat, k, largest)
    except (ValueError, RuntimeError) as e:
        err = _nonfinite_error(flat, space, base) if "non-finite" in str(e) else None
        if err is not None:
            raise err from None
        raise


def select(scores: Scores, k: int | None = None, fraction: float | None = None, largest: bool = True,
           scope: str = "global", space: ParamSpace | None = None) -> "Selection":
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

    Returns:
        Selection with int64 ascending flat indices. Ties at the threshold: lowest flat index wins; -0.0 == +0.0.

    Raises:
        ValueError: k/fraction missing, both given or out of range; empty scores; NaN/Inf scores (naming the
            parameter and local index through ``space``, or the flat position); per_layer without a space;
            scores not matching the space; score tensors on several devices.
        TypeError: unsupported or mixed dtypes, non-integer k.
    """
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
        kk = _k_from(k, fraction, n, "")
        idx, thr = _rank(flat, kk, largest, space, 0)
        return Selection(idx, n, thr, space_signature=sig, largest=largest, scope="global")
    if space is None:
        raise ValueError("select: scope='per_layer' needs space= (the parameter boundaries)")
    if k is not None:
        _k_from(k, fraction, max(k, 0) if isinstance(k, int) else 0, "")  # type/sign/both checks; clamped below
    parts, thrs = [], []
    for off, numel, name in zip(space.offsets, space.numels, space.names):
        kk = min(k, numel) if k is not None else _k_from(None, fraction, numel, f" in {name}")
        idx, thr = _rank(flat[off:off + numel], kk, largest, space, off)
        parts.append(idx + off)
        thrs.append(thr)
    idx = torch.cat(parts)  # ascending: each part is ascending and the offsets increase
    return Selection(idx, n, torch.stack(thrs), space_signature=sig, largest=largest, scope="per_layer")


class Selection:
    """A set of selected flat parameter indices.

    Attributes:
        indices: int64 [k], strictly ascending flat indices (ParamSpace order), on the device of the scores.
        threshold: 0-dim tensor (global scope: the k-th selected score), a [P] tensor (per_layer: one per parameter
            tensor, +inf/-inf where none was selected) or None (``from_indices``).
        k: number of selected indices. numel: size N of the flat space.
        space_signature: ``ParamSpace.signature`` of the space the indices refer to, or None.
        largest, scope: how the selection was made (informational).
    """

    def __init__(self, indices: torch.Tensor, numel: int, threshold: torch.Tensor | None = None, *,
                 space_signature: str | None = None, largest: bool = True, scope: str = "global"):
        self.indices = indices
        self.numel = int(numel)
        self.threshold = threshold
        self.space_signature = space_signature
        self.largest = bool(largest)
        self.scope = scope

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    def __len__(self) -> int:
        return self.k

    def __repr__(self) -> str:
        thr = None if self.threshold is None else (self.threshold.item() if self.threshold.dim() == 0 else "per-layer")
        return (f"Selection(k={self.k:,} of {self.numel:,}, {self.scope}, largest={self.largest}, threshold={thr}, "
                f"device={self.indices.device})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_indices(cls, indices, numel: int | None = None, space: ParamSpace | None = None) -> "Selection":
        """A Selection from explicitly chosen flat indices (any order, no duplicates; sorted here).

        ``numel`` defaults to ``space.numel``; with both given they must agree.
        """
        if numel is None:
            if space is None:
                raise ValueError("Selection.from_indices: give numel or space")
            numel = space.numel
        if space is not None and numel != space.numel:
            raise ValueError(f"Selection.from_indices: numel={numel} but the space has {space.numel} elements")
        idx = torch.as_tensor(indices)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dim() > 1:
            raise TypeError(f"Selection.from_indices: indices must be a 1-D integer tensor, got {idx.dtype} "
                            f"of shape {tuple(idx.shape)}")
        idx = torch.sort(idx.reshape(-1).to(torch.int64))[0]
        if idx.numel():
            if int(idx[0]) < 0 or int(idx[-1]) >= numel:
                raise IndexError(f"Selection.from_indices: indices must lie in [0, {numel})")
            if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
                raise ValueError("Selection.from_indices: duplicate indices")
        return cls(idx, numel, None, space_signature=space.signature if space is not None else None,
                   scope="explicit")

    @classmethod
    def from_bitmask(cls, bits: torch.Tensor, numel: int, space: ParamSpace | None = None) -> "Selection":
        """Inverse of ``bitmask()``."""
        if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
            raise ValueError(f"Selection.from_bitmask: expected uint8 of length {(numel + 7) // 8}")
        shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
        m = ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()
        return cls.from_indices(m.nonzero().reshape(-1), numel, space)

    # ------------------------------------------------------------------ views
    def check_space(self, space: ParamSpace) -> None:
        """Raise ValueError if ``space`` is not the space this selection was made in."""
        if space.numel != self.numel:
            raise ValueError(f"Selection covers {self.numel} elements but the space has {space.numel}")
        if self.space_signature is not None and self.space_signature != space.signature:
            raise ValueError("Selection was made for another parameter space (names/shapes differ: signature "
                             f"{self.space_signature} != {space.signature})")

    def per_param(self, space: ParamSpace) -> dict[str, torch.Tensor]:
        """{name: int64 ascending local linear indices} for every parameter of ``space`` (empty where none)."""
        self.check_space(space)
        got = space.split_indices(self.indices)
        empty = self.indices.new_empty(0)
        return {name: got.get(name, empty) for name in space.names}

    def masks(self, space: ParamSpace) -> dict[str, torch.Tensor]:
        """{name: bool tensor shaped like the parameter}, True where selected (on the indices' device)."""
        self.check_space(space)
        return space.views(self.mask())

    def mask(self) -> torch.Tensor:
        """Flat bool [numel], True at the selected indices."""
        m = torch.zeros(self.numel, dtype=torch.bool, device=self.indices.device)
        m[self.indices] = True
        return m

    def bitmask(self) -> torch.Tensor:
        """Packed uint8 [ceil(numel / 8)]: bit j (value 1 << j, little-endian within the byte) of byte b is
        flat index 8 * b + j; padding bits of the last byte are 0."""
        nbytes = (self.numel + 7) // 8
        acc = torch.zeros(nbytes, dtype=torch.int32, device=self.indices.device)
        acc.index_add_(0, self.indices >> 3, (1 << (self.indices & 7)).to(torch.int32))  # indices are unique
        return acc.to(torch.uint8)

    def to(self, device) -> "Selection":
        thr = None if self.threshold is None else self.threshold.to(device)
        return Selection(self.indices.to(device), self.numel, thr, space_signature=self.space_signature,
                         largest=self.largest, scope=self.scope)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "indices": self.indices.cpu(), "numel": self.numel,
                "threshold": None if self.threshold is None else self.threshold.cpu(),
                "space_signature": self.space_signature, "largest": self.largest, "scope": self.scope}

    def save(self, path) -> None:
        """torch.save of ``state_dict()`` (tensors on CPU); ``Selection.load`` reads it with weights_only=True."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, map_location="cpu", space: ParamSpace | None = None) -> "Selection":
        """Read a saved selection; with ``space``, check that it was made for that space."""
        d = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a saved sapsel Selection")
        if d.get("version", 0) > _VERSION:
            raise ValueError(f"{path}: Selection format version {d['version']} is newer than this package's")
        sel = cls(d["indices"], d["numel"], d["threshold"], space_signature=d["space_signature"],
                  largest=d["largest"], scope=d["scope"])
        if space is not None:
            sel.check_space(space)
        return sel


__all__: list[str] = ["Selection", "select"]
