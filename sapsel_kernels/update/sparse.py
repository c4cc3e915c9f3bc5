"""Functional, autograd-compatible sparse ops over a flat parameter vector and ascending int64 indices.

They let SAM or an unlearning update be written functionally, e.g. with ``torch.func.functional_call``::

    theta = space.gather()                       # flat [N]
    theta_p = sparse_add(theta, sel, delta)      # theta + scatter(delta at sel.indices), differentiable
    params = {n: v for n, v in space.views(theta_p).items()}
    loss = loss_fn_functional(params, batch)

* ``flat``/``theta``: 1-D float tensor [N] (float32/float64/float16/bfloat16); ``idx``: a Selection or an int64
  tensor [k], 1-D, contiguous, strictly ascending, in [0, N), on ``flat``'s device; ``vals``/``delta``: [k], same
  dtype and device as ``flat``.
* Errors: the ops (``torch.ops.sapsel.sparse_gather`` / ``sparse_scatter_add``) validate every call on every backend
  -- an entry out of range raises IndexError, unsorted or duplicated entries, a wrong dtype, shape or device raise
  ValueError -- so there is no unchecked fast path to opt into. On the reference and Triton paths the check costs one
  host sync per call (and per backward); on the C++ path one sequential pass over ``idx``.
* Gradients: d sparse_gather / d flat scatters the cotangent back to ``idx``; d sparse_add / d theta is the identity,
  d sparse_add / d delta gathers the cotangent at ``idx``. Twice differentiable (the backward uses the same ops).
"""

import torch

from .. import ops  # noqa: F401  (registers torch.ops.sapsel.*)

__all__ = ["sparse_gather", "sparse_scatter_add", "sparse_add"]


def _indices(idx) -> torch.Tensor:
    return idx.indices if hasattr(idx, "indices") and not isinstance(idx, torch.Tensor) else idx


def sparse_gather(flat: torch.Tensor, idx) -> torch.Tensor:
    """``flat[idx]`` -> [k] in ``flat``'s dtype (differentiable w.r.t. ``flat``).

    Peak extra memory: the k-entry output (plus a contiguous copy of ``flat`` if it is strided); the backward
    allocates one N-element gradient.
    """
    return torch.ops.sapsel.sparse_gather(flat, _indices(idx))


def sparse_scatter_add(flat: torch.Tensor, idx, vals: torch.Tensor) -> torch.Tensor:
    """A copy of ``flat`` with ``vals`` added at ``idx`` -> [N] (differentiable w.r.t. ``flat`` and ``vals``).

    The sum is formed in float32 (float64 for float64) and rounded once. Peak extra memory: the output, one copy of
    ``flat`` (N elements).
    """
    return torch.ops.sapsel.sparse_scatter_add(flat, _indices(idx), vals)


def sparse_add(theta: torch.Tensor, idx, delta: torch.Tensor) -> torch.Tensor:
    """``theta + scatter(delta at idx)``: the sparse update of a flat parameter vector (differentiable w.r.t. theta
    and delta). Same op as :func:`sparse_scatter_add`, named for its use; one copy of ``theta`` (N elements)."""
    return sparse_scatter_add(theta, idx, delta)
