"""The package's one error type for NaN/Inf, and the one check that raises it.

Every NaN/Inf condition -- scores that cannot be ranked, a Hessian-vector product that overflowed, a parameter, a
gradient or an update that is not finite -- raises :class:`NonFiniteError`, always before anything is modified.
It subclasses ``ValueError``, so ``except ValueError`` keeps working. The one documented exception is the sparse
optimizers' GradScaler contract: an inf/NaN gradient under AMP skips the step (torch.optim/AMP semantics) and sets
``last_step_skipped``.

The raw ``torch.ops.sapsel`` ops raise a plain ``ValueError`` for non-finite input (the C++ extension cannot raise a
Python subclass, and all three backends raise the same type); the Python API above them (``select``, ...) turns it
into a NonFiniteError that names the parameter.
"""

from collections.abc import Callable, Sequence

import torch

__all__ = ["NonFiniteError", "check_finite"]


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN or Inf; raised before anything was modified."""


def _first_bad(t: torch.Tensor) -> int:
    bad = ~torch.isfinite(t.reshape(-1))
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else -1


def check_finite(tensors: torch.Tensor | Sequence[torch.Tensor | None], what: str, space=None,
                 suffix: str = "nothing was modified", where: Callable[[int], str] | None = None) -> None:
    """Raise :class:`NonFiniteError` if any of ``tensors`` (a tensor or a list; None entries are skipped) holds
    NaN/Inf.

    Cost: one fused reduction per tensor (a finite sum proves every element finite); the element-wise pass runs only
    when a sum is not finite (a sum of huge finite values can overflow). No N-length temporaries on the fast path.
    The message names the first bad element: through ``space`` (``name[i, j] (flat index f)``) when the tensors are
    flat ParamSpace vectors or one tensor per parameter of the space; through ``where(j)`` (j: the flat position in a
    single tensor, e.g. a [k] vector on a selection) when given; else its position.
    """
    single = isinstance(tensors, torch.Tensor)
    ts = [tensors] if single else list(tensors)
    for i, t in enumerate(ts):
        if t is None or t.numel() == 0:
            continue
        if not t.is_floating_point() and not t.is_complex():
            continue
        if bool(torch.isfinite(t.sum())):
            continue
        j = _first_bad(t)
        if j < 0:
            continue  # the sum overflowed, every element is finite
        value = t.reshape(-1)[j].item()
        if where is not None and single:
            loc = where(j)
        elif space is not None and single and t.numel() == space.numel:
            loc = space.describe_position(j)
        elif space is not None and not single and len(ts) == len(space):
            loc = space.describe_position(space.offsets[i] + j)
        else:
            loc = f"element {j}" + ("" if single else f" of tensor {i}")
        raise NonFiniteError(f"{what} contains NaN/Inf ({value} at {loc}); {suffix}")
