"""Sparse patches: the change an unlearning request made, stored as what changed instead of a whole checkpoint.

A :class:`Patch` holds, per parameter tensor it touches, the int64 flat indices of the changed entries, their new
values and their old values (each in the parameter's own dtype, so apply and revert are bit-exact), plus the
fingerprints (:meth:`~sapsel_kernels.space.ParamSpace.fingerprint`) of the model before and after and its
ParamSpace signature. On disk it is one safetensors file: three tensors per parameter (``<name>::indices``,
``<name>::new``, ``<name>::old``) and the metadata (format, fingerprints, signature, package version). Its size is
k × (8 + 2 × bytes per value) plus a header of the names.

* ``sk.apply_patch(model, patch)`` checks that the model is the patch's base (its fingerprint, and the old values at
  every index, bit for bit) and writes the new values; ``sk.revert_patch(model, patch)`` checks that the model is
  the patched one and writes the old values back. Either refuses a model that does not match with a ValueError and
  modifies nothing.
* ``sk.diff_patch(base, model)`` builds the patch between two models of the same architecture (O(N) compare);
  ``unlearn(..., return_patch=True)`` and ``forget`` build it from the selection alone (O(k)).
"""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..space import ParamSpace, index_copy_flat

__all__ = ["Patch", "apply_patch", "revert_patch", "diff_patch", "PATCH_FORMAT"]

PATCH_FORMAT = "sapsel.patch/1"
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` (so that -0.0 != 0.0 and comparisons are exact)."""
    return t.view(_BITS[t.element_size()])


def _space(model_or_space) -> ParamSpace:
    return model_or_space if isinstance(model_or_space, ParamSpace) else ParamSpace(model_or_space)


@dataclass(frozen=True)
class Patch:
    """The change of a model, per parameter name: ``entries[name] = (indices int64 [m], new [m], old [m])`` with the
    indices ascending flat positions in that tensor and the values in its dtype. ``base`` / ``result``: the
    fingerprints before and after; ``signature``: the ParamSpace signature (names, shapes, dtypes)."""

    entries: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    base: str
    result: str
    signature: str
    version: str = ""
    info: Dict[str, str] = field(default_factory=dict)

    @property
    def k(self) -> int:
        """Number of changed entries."""
        return sum(int(i.numel()) for i, _, _ in self.entries.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the index and value tensors (the file adds a header)."""
        return sum(i.numel() * 8 + n.numel() * n.element_size() * 2 for i, n, _ in self.entries.values())

    # ------------------------------------------------------------------------------------------------ file
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the patch as a safetensors file (written to ``path + '.tmp'`` and renamed: never half a file)."""
        from safetensors.torch import save_file

        tensors = {}
        for name, (i, n, o) in self.entries.items():
            tensors[f"{name}::indices"] = i.detach().to("cpu", torch.int64).contiguous()
            tensors[f"{name}::new"] = n.detach().cpu().contiguous()
            tensors[f"{name}::old"] = o.detach().cpu().contiguous()
        meta = {"format": PATCH_FORMAT, "base": self.base, "result": self.result, "signature": self.signature,
                "version": self.version, "names": json.dumps(list(self.entries)), "info": json.dumps(self.info)}
        tmp = f"{os.fspath(path)}.tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Patch":
        """Read a patch file; ValueError for a file that is not one, or a corrupt one (naming the file and the
        problem)."""
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != PATCH_FORMAT:
                    raise ValueError(f"{path}: not a sapsel patch (format {meta.get('format')!r}, expected "
                                     f"{PATCH_FORMAT!r})")
                names = json.loads(meta["names"])
                entries = {}
                for name in names:
                    i, n, o = (f.get_tensor(f"{name}::{part}") for part in ("indices", "new", "old"))
                    if i.dtype != torch.int64 or i.dim() != 1 or n.shape != i.shape or o.shape != i.shape \
                            or n.dtype != o.dtype:
                        raise ValueError(f"{path}: corrupt patch entry {name!r}")
                    entries[name] = (i, n, o)
            patch = cls(entries=entries, base=meta["base"], result=meta["result"], signature=meta["signature"],
                        version=meta.get("version", ""), info=json.loads(meta.get("info", "{}")))
        except ValueError as exc:  # json.JSONDecodeError is one too
            if str(exc).startswith(f"{path}:"):
                raise
            raise ValueError(f"{path}: corrupt sapsel patch ({exc})") from exc
        except KeyError as exc:
            raise ValueError(f"{path}: corrupt sapsel patch (no {exc} in its metadata)") from exc
        except Exception as exc:  # noqa: BLE001 - safetensors' header and I/O errors all mean "not readable"
            raise ValueError(f"{path}: cannot read a sapsel patch ({type(exc).__name__}: {exc})") from exc
        return patch

    # ------------------------------------------------------------------------------------------------ use
    def apply(self, model) -> None:
        """Write the new values into ``model`` (see :func:`apply_patch`)."""
        _write(self, model, forward=True)

    def revert(self, model) -> None:
        """Write the old values back (see :func:`revert_patch`)."""
        _write(self, model, forward=False)


def _check(patch: Patch, space: ParamSpace, forward: bool) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    what = "apply" if forward else "revert"
    if space.signature != patch.signature:
        raise ValueError(f"{what}_patch: the model's parameters (names, shapes, dtypes) differ from the patch's "
                         "base model; nothing was modified")
    for name, (_, n, _) in patch.entries.items():
        p = space.params[space.index_of(name)]
        if n.dtype != p.dtype:
            raise ValueError(f"{what}_patch: {name!r} is {p.dtype} in the model, {n.dtype} in the patch (load the "
                             "model in the dtype it was patched in); nothing was modified")
    fp = space.fingerprint()
    expect = patch.base if forward else patch.result
    if fp != expect:
        state = "the unpatched base" if forward else "the patched model"
        raise ValueError(f"{what}_patch: this model is not {state} the patch was made for (weights fingerprint {fp}, "
                         f"expected {expect}); nothing was modified")
    plan = []
    for name, (i, n, o) in patch.entries.items():
        p = space.params[space.index_of(name)]
        if i.numel() and (int(i.min()) < 0 or int(i.max()) >= p.numel()):
            raise ValueError(f"{what}_patch: an index of {name!r} is outside its {p.numel()} entries; nothing was "
                             "modified")
        flat = p.detach().reshape(-1)
        idx = i.to(p.device)
        have, want_now = flat.index_select(0, idx), (o if forward else n).to(p.device)
        if not torch.equal(_bits(have), _bits(want_now)):
            raise ValueError(f"{what}_patch: the values of {name!r} at the patch's indices are not the "
                             f"{'old' if forward else 'new'} ones; nothing was modified")
        plan.append((p, idx, (n if forward else o).to(p.device)))
    return plan


def _write(patch: Patch, model, forward: bool) -> None:
    space = _space(model)
    plan = _check(patch, space, forward)  # every check before the first write
    with torch.no_grad():
        for p, idx, values in plan:
            index_copy_flat(p, idx, values)


def apply_patch(model, patch: Union[Patch, str, os.PathLike]) -> Patch:
    """Apply ``patch`` (a Patch or a patch file) to ``model`` in place, bit-exactly. The model must be the patch's
    base: same parameter names, shapes and dtypes, the base's weights fingerprint, and the old values at every
    index; otherwise ValueError and nothing is modified. Returns the Patch."""
    patch = patch if isinstance(patch, Patch) else Patch.load(patch)
    patch.apply(model)
    return patch


def revert_patch(model, patch: Union[Patch, str, os.PathLike]) -> Patch:
    """Undo ``patch`` on ``model`` in place, bit-exactly; the model must be the patched one (fingerprint and new
    values), otherwise ValueError and nothing is modified. Returns the Patch."""
    patch = patch if isinstance(patch, Patch) else Patch.load(patch)
    patch.revert(model)
    return patch


def diff_patch(base, model, info: Optional[Dict[str, str]] = None) -> Patch:
    """The patch that turns ``base`` into ``model`` (two models, or ParamSpaces, with the same signature): every entry
    whose bits differ. Cost O(N) compares; memory O(changed) plus one parameter's mask at a time."""
    sb, sm = _space(base), _space(model)
    if sb.signature != sm.signature:
        raise ValueError("diff_patch: the two models' parameters (names, shapes, dtypes) differ")
    entries = {}
    with torch.no_grad():
        for name, pb, pm in zip(sb.names, sb.params, sm.params):
            fb, fm = pb.detach().reshape(-1), pm.detach().reshape(-1).to(pb.device)
            idx = torch.nonzero(_bits(fb) != _bits(fm)).reshape(-1)
            if idx.numel():
                entries[name] = (idx.cpu(), fm.index_select(0, idx).cpu(), fb.index_select(0, idx).cpu())
    return _make(entries, sb.fingerprint(), sm.fingerprint(), sb.signature, info)


def patch_from_snapshot(space: ParamSpace, parts, old_values: List[torch.Tensor], base: str,
                        info: Optional[Dict[str, str]] = None) -> Patch:
    """The patch of a change confined to known coordinates: ``parts`` as :class:`~sapsel_kernels.rules.Coords`
    holds them (one ``(position, parameter, local indices, start, stop)`` per touched tensor) and ``old_values``
    their values before (one tensor per part, the parameter's dtype); only the entries whose bits changed are kept.
    ``base``: the fingerprint before. O(k)."""
    entries = {}
    with torch.no_grad():
        for (pos, p, loc, _, _), old in zip(parts, old_values):
            new = p.detach().reshape(-1).index_select(0, loc)
            changed = torch.nonzero(_bits(new) != _bits(old)).reshape(-1)
            if changed.numel():
                entries[space.names[pos]] = (loc.index_select(0, changed).cpu(), new.index_select(0, changed).cpu(),
                                             old.index_select(0, changed).cpu())
    return _make(entries, base, space.fingerprint(), space.signature, info)


def _make(entries, base, result, signature, info) -> Patch:
    from ..version import __version__

    ordered = {}
    for name, (i, n, o) in entries.items():
        order = torch.argsort(i)
        ordered[name] = (i[order].to(torch.int64), n[order], o[order])
    return Patch(entries=ordered, base=base, result=result, signature=signature, version=__version__,
                 info=dict(info or {}))
