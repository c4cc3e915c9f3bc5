"""The core of a selection, shared by :mod:`sapsel_kernels.selection` (``select``) and
:mod:`sapsel_kernels.distributed` (``select(..., group=...)``): :class:`Selection` (a set of selected flat parameter
indices), :func:`as_selection` (the one coercion), :func:`resolve_k` (the one budget rule) and :func:`topk_flat` (the
exact top-k of one flat score slice). :mod:`sapsel_kernels.selection` re-exports all of them.
"""

import math
import weakref
from collections.abc import Mapping

import torch

from ..errors import NonFiniteError
from ..space import ParamSpace

__all__ = ["Selection", "as_selection", "resolve_k", "topk_flat"]

_FORMAT = "sapsel.Selection"
_VERSION = 1


def _first_nonfinite(flat: torch.Tensor) -> int:
    bad = ~torch.isfinite(flat)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else -1


def _nonfinite_error(flat: torch.Tensor, space: ParamSpace | None, base: int = 0) -> NonFiniteError | None:
    """A NonFiniteError naming the first NaN/Inf of ``flat`` (flat position ``base`` + i), or None if there is none."""
    i = _first_nonfinite(flat)
    if i < 0:
        return None
    where = space.describe_position(base + i) if space is not None else f"flat index {base + i}"
    return NonFiniteError(f"select: score {flat[i].item()} at {where} is not finite; NaN/Inf scores cannot be ranked "
                      "(check the score estimate, e.g. for overflow)")


def resolve_k(n: int, *, k: int | None = None, fraction: float | None = None, what: str = "") -> int:
    """THE budget rule of the package: the k of one ranking over ``n`` items from exactly one of ``k`` / ``fraction``.

    * ``k``: an int in [0, n];
    * ``fraction`` in (0, 1]: ``k = ceil(fraction * n)``, at least 1 and at most n; a 1e-6 slack keeps e.g.
      ``0.1 * 1000`` (= 100.00000000000001 in floating point) at 100.

    ``select``, ``select_parameters(budget=...)`` and the stopping rules of ``hessian_diag`` all call it, so the same
    fraction gives the same k everywhere. Raises ValueError (both/neither given, out of range, NaN) or TypeError
    (a non-integer k, a bool); the messages append ``what`` (e.g. " (budget)") to the argument's name.
    """
    if (k is None) == (fraction is None):
        raise ValueError(f"give exactly one of k= or fraction={what}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k{what} must be an int, got {type(k).__name__}")
        if not 0 <= k <= n:
            raise ValueError(f"k{what} must be in [0, {n}] for {n} scores, got k={k}")
        return k
    if isinstance(fraction, bool):
        raise TypeError(f"fraction{what} must be a float in (0, 1], got a bool")
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction{what} must be in (0, 1], got {fraction}")
    return min(n, max(1, math.ceil(fraction * n - 1e-6)))


def topk_flat(flat: torch.Tensor, k: int, largest: bool, space, base: int):
    """topk_select on a flat slice, turning a NaN/Inf error into one that names the parameter and position."""
    if flat.dtype == torch.float64:  # the kernels rank 32/16-bit floats; float64 goes through the exact reference
        from ..reference.topk import rank_ref as fn
    else:
        fn = torch.ops.sapsel.topk_select
    try:
        return fn(flat, k, largest)
    except (ValueError, RuntimeError) as e:
        err = _nonfinite_error(flat, space, base) if "non-finite" in str(e) else None
        if err is not None:
            raise err from None
        raise


def _validated_indices(idx, numel: int, what: str, *, sort: bool) -> torch.Tensor:
    """THE index rule: a 1-D integer tensor -> int64 contiguous strictly ascending indices in [0, numel).

    ``sort=True`` accepts any order (sorted here); ``sort=False`` requires ascending input (a saved Selection).
    Duplicates raise ValueError, out-of-range entries IndexError, non-integer dtypes or shapes TypeError.
    Cost: O(k) (a sort when ``sort`` and the input is not already ascending) and one host sync.
    """
    idx = torch.as_tensor(idx)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool or idx.dim() > 1:
        raise TypeError(f"{what}: indices must be a 1-D integer tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    idx = idx.reshape(-1).to(torch.int64).contiguous()
    if idx.numel() == 0:
        return idx
    ascending = idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all())
    if not ascending:
        if not sort:
            raise ValueError(f"{what}: indices are not strictly ascending (a Selection holds sorted, unique "
                             "indices; a saved one that is not was corrupted or not written by Selection.save)")
        idx = torch.sort(idx).values
        dup = (idx[1:] == idx[:-1]).nonzero()
        if dup.numel():
            raise ValueError(f"{what}: duplicate index {int(idx[int(dup[0, 0])])}; a selection is a set")
    lo, hi = int(idx[0]), int(idx[-1])
    if lo < 0 or hi >= numel:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{what}: index {bad} out of range [0, {numel})")
    return idx


class Selection:
    """A set of selected flat parameter indices.

    Attributes:
        indices: int64 [k], strictly ascending flat indices (ParamSpace order), on the device of the scores.
        threshold: 0-dim tensor (global scope: the k-th selected score), a [P] tensor (per_layer: one per parameter
            tensor, +inf/-inf where none was selected) or None (``from_indices``).
        k: number of selected indices. numel: size N of the flat space.
        space_signature: ``ParamSpace.signature`` of the space the indices refer to, or None.
        largest, scope: how the selection was made (informational).

    A Selection built with a ``space`` also remembers that space's parameter tensors (weak references) and names, so
    it is recognised by an optimizer given the same tensors without names (``model.parameters()``).
    """

    def __init__(self, indices: torch.Tensor, numel: int, threshold: torch.Tensor | None = None, *,
                 space_signature: str | None = None, largest: bool = True, scope: str = "global",
                 space: ParamSpace | None = None):
        self.indices = indices
        self.numel = int(numel)
        self.threshold = threshold
        self.space_signature = space_signature
        self.largest = bool(largest)
        self.scope = scope
        self._names = list(space.names) if space is not None else None
        self._refs = [weakref.ref(p) for p in space.params] if space is not None else None

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    def __len__(self) -> int:
        return self.k

    def __repr__(self) -> str:
        thr = None if self.threshold is None else (self.threshold.item() if self.threshold.dim() == 0 else "per-layer")
        return (f"Selection(k={self.k:,} of {self.numel:,}, {self.scope}, largest={self.largest}, threshold={thr}, "
                f"device={self.indices.device})")

    def _copy_meta(self, indices, threshold) -> "Selection":
        out = Selection(indices, self.numel, threshold, space_signature=self.space_signature, largest=self.largest,
                        scope=self.scope)
        out._names, out._refs = self._names, self._refs
        return out

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_indices(cls, indices, numel: int | None = None, space: ParamSpace | None = None) -> "Selection":
        """A Selection from explicitly chosen flat indices (any order, sorted here; duplicates raise ValueError,
        out-of-range indices IndexError). ``numel`` defaults to ``space.numel``; with both given they must agree."""
        if numel is None:
            if space is None:
                raise ValueError("Selection.from_indices: give numel or space")
            numel = space.numel
        if space is not None and numel != space.numel:
            raise ValueError(f"Selection.from_indices: numel={numel} but the space has {space.numel} elements")
        idx = _validated_indices(indices, numel, "Selection.from_indices", sort=True)
        if space is not None:
            idx = idx.to(space.device)
        return cls(idx, numel, None, space_signature=space.signature if space is not None else None,
                   scope="explicit", space=space)

    @classmethod
    def from_mask(cls, mask, space: ParamSpace) -> "Selection":
        """A Selection from a bool mask: flat [N], or a dict {name: bool tensor shaped like the parameter}."""
        if isinstance(mask, Mapping):
            missing = [n for n in space.names if n not in mask]
            extra = [n for n in mask if n not in space._index]
            if missing or extra:
                raise ValueError(f"mask dict does not match the space (missing {missing[:5]}, unexpected {extra[:5]})")
            for name, shape in zip(space.names, space.shapes):
                m = mask[name]
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != shape:
                    raise TypeError(f"mask for {name} must be a bool tensor of shape {tuple(shape)}")
            mask = torch.cat([mask[n].reshape(-1).to(space.device) for n in space.names])
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("a selection mask must be a bool tensor")
        if mask.numel() != space.numel or mask.dim() != 1:
            raise ValueError(f"a flat selection mask must have shape ({space.numel},), got {tuple(mask.shape)}")
        idx = mask.nonzero().reshape(-1)
        return cls(idx.to(space.device), space.numel, None, space_signature=space.signature, scope="explicit",
                   space=space)

    @classmethod
    def from_bitmask(cls, bits: torch.Tensor, numel: int, space: ParamSpace | None = None) -> "Selection":
        """Inverse of ``bitmask()``."""
        if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
            raise ValueError(f"Selection.from_bitmask: expected uint8 of length {(numel + 7) // 8}")
        shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
        m = ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()
        return cls.from_indices(m.nonzero().reshape(-1), numel, space)

    # ------------------------------------------------------------------ the space it belongs to
    def _same_tensors(self, space: ParamSpace) -> bool:
        if self._refs is None or len(self._refs) != len(space.params):
            return False
        return all(r() is p for r, p in zip(self._refs, space.params))

    def matches(self, space: ParamSpace) -> bool:
        """True when ``space`` is the space this selection was made in: same size, and the same parameter names and
        shapes (signature) or the very same parameter tensors."""
        if space.numel != self.numel:
            return False
        return self.space_signature is None or self.space_signature == space.signature or self._same_tensors(space)

    def check_space(self, space: ParamSpace) -> None:
        """Raise ValueError if ``space`` is not the space this selection was made in (see :meth:`matches`)."""
        if space.numel != self.numel:
            raise ValueError(f"Selection covers {self.numel} elements but the space has {space.numel}; it was built "
                             "for another model")
        if not self.matches(space):
            hint = ""
            if all(n == f"param{i}" for i, n in enumerate(space.names)):
                hint = (" The parameters were given without names (e.g. model.parameters()) and are not the tensors "
                        "the selection was built on: pass the model, or the ParamSpace the selection was made in.")
            raise ValueError("Selection was made for another parameter space (names/shapes differ: signature "
                             f"{self.space_signature} != {space.signature}).{hint}")

    def resolve_space(self, space: ParamSpace) -> ParamSpace:
        """``space`` after :meth:`check_space`; when it holds this selection's own tensors under synthetic names
        (``param0``, ...), a ParamSpace over the same tensors with the selection's names (so state dicts and error
        messages use the model's names)."""
        self.check_space(space)
        if self._names is not None and self.space_signature != space.signature and self._same_tensors(space):
            return ParamSpace(dict(zip(self._names, space.params)))
        return space

    # ------------------------------------------------------------------ views
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
        return self._copy_meta(self.indices.to(device), thr)

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
        """Read a saved selection and validate it (format, int64 strictly ascending indices in [0, numel), threshold
        shape); with ``space``, check that it was made for that space. Raises ValueError / IndexError / TypeError."""
        try:
            d = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - not a torch file, truncated, or holding pickled code
            raise ValueError(f"{path}: not a readable saved Selection ({type(exc).__name__}: {exc})") from None
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a saved sapsel Selection")
        if not isinstance(d.get("version"), int) or d["version"] > _VERSION:
            raise ValueError(f"{path}: Selection format version {d.get('version')!r} is not readable by this package")
        numel = d.get("numel")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"{path}: numel must be a non-negative int, got {numel!r}")
        if not isinstance(d.get("indices"), torch.Tensor):
            raise ValueError(f"{path}: indices missing")
        idx = _validated_indices(d["indices"], numel, f"{path}", sort=False)
        thr = d.get("threshold")
        if thr is not None and (not isinstance(thr, torch.Tensor) or thr.dim() > 1):
            raise ValueError(f"{path}: threshold must be None, a 0-dim or a 1-D tensor")
        sig = d.get("space_signature")
        if sig is not None and not isinstance(sig, str):
            raise ValueError(f"{path}: space_signature must be a string or None")
        sel = cls(idx, numel, thr, space_signature=sig, largest=bool(d.get("largest", True)),
                  scope=str(d.get("scope", "explicit")))
        if space is not None:
            sel.check_space(space)
            sel._names, sel._refs = list(space.names), [weakref.ref(p) for p in space.params]
        return sel


def as_selection(obj, space: ParamSpace, *, allow_empty: bool = True, what: str = "selection") -> Selection:
    """THE selection coercion, used by every entry point (unlearn, the sparse optimizers, the strategies).

    Accepts:
    * a :class:`Selection` (checked against ``space``, see :meth:`Selection.check_space`);
    * an integer index tensor (or a list of ints) of flat ParamSpace indices, in ANY order (sorted here);
      duplicates raise ValueError, out-of-range indices IndexError;
    * a bool mask: flat [N], or a dict {parameter name: bool tensor shaped like it}.

    Returns a Selection whose ``indices`` are int64, 1-D, contiguous, strictly ascending and on ``space.device``.
    ``allow_empty=False`` raises ValueError for an empty one. Peak extra memory: O(k) (an N-byte mask for mask input).
    """
    if obj is None:
        raise TypeError(f"{what} is None")
    if space.device.type == "meta" or (isinstance(obj, torch.Tensor) and obj.is_meta) or (
            isinstance(obj, Selection) and obj.indices.is_meta):
        raise ValueError(f"{what}: on the meta device (no values): a selection needs real indices and a model with "
                         "materialised parameters (model.to_empty(device=...) and load_state_dict first)")
    if isinstance(obj, (list, tuple, range)):
        # no dtype here: a Python bool list is a mask and a float list is refused below, never cast to indices
        items = list(obj)
        obj = torch.as_tensor(items) if items else torch.empty(0, dtype=torch.int64)
    if isinstance(obj, Selection):
        obj.check_space(space)
        # a Selection can be built by hand: its indices get the same O(k) check as any other input
        idx = _validated_indices(obj.indices, space.numel, what, sort=False)
        own = obj.indices
        if own.dtype != torch.int64 or own.dim() != 1 or not own.is_contiguous() or own.device != space.device:
            obj = obj._copy_meta(idx.to(space.device).contiguous(), obj.threshold)
        sel = obj
    elif isinstance(obj, Mapping) or (isinstance(obj, torch.Tensor) and obj.dtype == torch.bool):
        sel = Selection.from_mask(obj, space)
    elif isinstance(obj, torch.Tensor):
        idx = _validated_indices(obj, space.numel, what, sort=True)
        sel = Selection(idx.to(space.device), space.numel, None, space_signature=space.signature, scope="explicit",
                        space=space)
    else:
        raise TypeError(f"{what} must be a Selection, an integer index tensor or a bool mask, got {type(obj).__name__}")
    if not allow_empty and sel.k == 0:
        raise ValueError(f"{what} is empty: nothing to update")
    return sel
