"""Functional, autograd-compatible sparse ops over a flat parameter vector and ascending int64 indices.

They let SAM or an unlearning update be written functionally, e.g. with ``torch.func.functional_call``::

    theta = space.gather()                       # flat [N]
    theta_p = sparse_add(theta, sel, delta)      # theta + scatter(delta at sel.indices), differentiable
    params = {n: v for n, v in space.views(theta_p).items()}
    loss = loss_fn_functional(params, batch)

* ``flat``/``theta``: 1-D float tensor [N]; ``idx``: a Selection or int64 [k], strictly ascending, in [0, N);
  ``vals``/``delta``: [k], same dtype and device as ``flat``.
* Gradients: d sparse_gather / d flat scatters the cotangent back to ``idx``; d sparse_add / d theta is the identity,
  d sparse_add / d delta gathers the cotangent at ``idx``. Twice differentiable (the backward uses the same ops).
* ``check=True`` validates ``idx`` (one O(k) pass and a host sync); pass ``check=False`` in hot loops once the
  indices are known to be valid (e.g. they come from a Selection). Invalid indices with check=False are undefined
  behaviour on the C++/Triton paths.
"""

import torch

from . import ops  # noqa: F401  (registers torch.ops.sapsel.*)
from .ops.sparse import _check_flat_idx

__all__ = ["sparse_gather", "sparse_scatter_add", "sparse_add"]


def _indices(idx) -> torch.Tensor:
    return idx.indices if hasattr(idx, "indices") and not isinstance(idx, torch.Tensor) else idx


def _validate(flat: torch.Tensor, idx: torch.Tensor, vals=None, check=True) -> None:
    _check_flat_idx(flat, idx, vals)
    if check and idx.numel():
        if int(idx.min()) < 0 or int(idx.max()) >= flat.shape[0]:
            raise IndexError(f"indices out of range [0, {flat.shape[0]})")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("indices must be strictly ascending (sorted, no duplicates)")


def sparse_gather(flat: torch.Tensor, idx, check: bool = True) -> torch.Tensor:
    """``flat[idx]`` -> [k] (differentiable w.r.t. ``flat``)."""
    idx = _indices(idx)
    _validate(flat, idx, None, check)
    return torch.ops.sapsel.sparse_gather(flat, idx)


def sparse_scatter_add(flat: torch.Tensor, idx, vals: torch.Tensor, check: bool = True) -> torch.Tensor:
    """A copy of ``flat`` with ``vals`` added at ``idx`` (differentiable w.r.t. ``flat`` and ``vals``)."""
    idx = _indices(idx)
    _validate(flat, idx, vals, check)
    return torch.ops.sapsel.sparse_scatter_add(flat, idx, vals)


def sparse_add(theta: torch.Tensor, idx, delta: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``theta + scatter(delta at idx)``: the sparse update of a flat parameter vector (differentiable w.r.t. theta
    and delta). Same op as :func:`sparse_scatter_add`, named for its use."""
    return sparse_scatter_add(theta, idx, delta, check)
