"""Conjugate gradient for the restricted Newton system of ``unlearn(method="second_order")``.

``cg_solve(matvec, b)`` solves ``A x = b`` for a symmetric A that is only available as a product ``v -> A v`` (here
``(H_SS + λI) v_S`` through restricted Hessian-vector products), starting from x = 0. It never forms A and keeps
four vectors of b's size (x, r, p, A p): with b = G_S that is 4k entries for a selection of k coordinates.
"""

import math
from typing import Any, Callable, Dict, Tuple

import torch

from ..errors import NonFiniteError

__all__ = ["cg_solve", "steihaug_cg"]


def _start(name: str, b: torch.Tensor, max_iter, tol):
    """Both solvers' argument checks and CG's initial state from x = 0: (x, r = b, p = b, rr = bᵀb, ‖b‖)."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{name}: max_iter must be an int >= 1, got {max_iter!r}")
    if not (math.isfinite(float(tol)) and float(tol) >= 0):
        raise ValueError(f"{name}: tol must be finite and >= 0, got {tol!r}")
    if b.dim() != 1 or not b.is_floating_point():
        raise ValueError(f"{name}: b must be a 1-D floating tensor, got {b.dtype} of shape {tuple(b.shape)}")
    r = b.clone()
    rr = torch.dot(r, r)
    if not bool(torch.isfinite(rr)):
        raise NonFiniteError(f"{name}: the right-hand side b contains NaN/Inf (or its norm overflows); nothing was "
                             "modified")
    return torch.zeros_like(b), r, r.clone(), rr, float(torch.sqrt(rr))


def cg_solve(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, max_iter: int = 50,
             tol: float = 1e-6) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Conjugate gradient for ``A x = b`` (A symmetric, given as ``matvec``), from x = 0.

    Args:
        matvec: ``v -> A v`` for a 1-D tensor v shaped like ``b`` (same dtype and device in and out).
        b: 1-D floating tensor [k]; the iteration runs in its dtype.
        max_iter: at most this many products (an int >= 1).
        tol: stop when ``||r|| <= tol * ||b||`` (finite, >= 0; 0 runs all ``max_iter`` products unless the residual
            reaches exactly 0).

    Stops on convergence, after ``max_iter`` products, or on non-positive curvature ``pᵀAp <= 0`` (A is not positive
    definite along p): the iterate so far is returned, as truncated CG does; at the first step that is x = 0, i.e. no
    update. ``b = 0`` returns x = 0 without a product.

    Returns:
        ``(x, info)``: x [k] in b's dtype; info = {"iters": products used, "residual": ||r|| / ||b|| (0.0 for b = 0),
        "negative_curvature": bool}.

    Raises:
        NonFiniteError: ``b`` or a product ``A p`` holds NaN/Inf (nothing is returned: the caller has not modified
            anything yet). ValueError: bad ``max_iter`` / ``tol`` / ``b``.

    Peak extra memory: 4 vectors of b's size plus whatever ``matvec`` allocates.
    """
    x, info = _truncated_cg("cg_solve", matvec, b, math.inf, max_iter, tol)
    return x, {k: info[k] for k in ("iters", "residual", "negative_curvature")}


def steihaug_cg(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, radius: float, max_iter: int = 50,
                tol: float = 1e-6) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Steihaug-Toint truncated CG: approximately ``min q(x) = ½ xᵀAx − bᵀx`` subject to ``‖x‖ ≤ radius``, from x = 0.

    The CG iterates of a positive-definite system grow in norm, so the iteration stops at the first of: convergence
    (``‖r‖ ≤ tol·‖b‖``), ``max_iter`` products, the iterate leaving the ball (the step is cut at the boundary), or
    non-positive curvature ``pᵀAp <= 0`` (the step follows p, a descent direction of q, to the boundary: an indefinite
    A never yields an unbounded step). ``radius = inf`` is plain truncated CG (:func:`cg_solve`'s behaviour: on
    non-positive curvature the iterate so far is returned).

    Args:
        matvec, b, max_iter, tol: as in :func:`cg_solve`.
        radius: the trust radius, > 0 (``math.inf`` for none).

    Returns:
        ``(x, info)``: info as :func:`cg_solve`'s plus ``"boundary"`` (the step was cut at ``radius``), ``"bx"`` = bᵀx
        and ``"xAx"`` = xᵀAx (floats, so that ``q(αx) = ½α²·xAx − α·bx`` of any scaled step costs no product).

    Raises:
        as :func:`cg_solve`; ValueError for ``radius <= 0`` or NaN.

    Peak extra memory: 4 vectors of b's size (x, r, p, A p) plus whatever ``matvec`` allocates.
    """
    if not (float(radius) > 0):
        raise ValueError(f"steihaug_cg: radius must be > 0 (math.inf for none), got {radius!r}")
    return _truncated_cg("steihaug_cg", matvec, b, float(radius), max_iter, tol)


def _truncated_cg(name: str, matvec, b: torch.Tensor, radius: float, max_iter, tol):
    """CG from x = 0 with Steihaug's stops (see :func:`steihaug_cg`); ``radius = inf`` is plain truncated CG."""
    x, r, p, rr, bnorm = _start(name, b, max_iter, tol)
    info: Dict[str, Any] = {"iters": 0, "residual": 1.0 if bnorm > 0 else 0.0, "negative_curvature": False,
                            "boundary": False, "bx": 0.0, "xAx": 0.0}
    if bnorm == 0.0:
        return x, info

    def to_boundary(x, p):  # τ >= 0 with ‖x + τp‖ = radius (x is inside the ball)
        xp, pp, xx = float(torch.dot(x, p)), float(torch.dot(p, p)), float(torch.dot(x, x))
        return (-xp + math.sqrt(max(xp * xp - pp * (xx - radius * radius), 0.0))) / pp

    for it in range(max_iter):
        ap = matvec(p)
        pap = torch.dot(p, ap)
        info["iters"] = it + 1
        if not bool(torch.isfinite(pap)):
            raise NonFiniteError(f"{name}: the Hessian-vector product produced NaN/Inf; nothing was modified")
        if float(pap) <= 0.0:
            info["negative_curvature"] = True
            if math.isfinite(radius):
                tau = to_boundary(x, p)
                x = x + tau * p
                r = r - tau * ap
                info["boundary"] = True
            break
        alpha = rr / pap
        if math.isfinite(radius) and float(torch.linalg.vector_norm(x + alpha * p)) >= radius:
            tau = to_boundary(x, p)
            x = x + tau * p
            r = r - tau * ap
            info["boundary"] = True
            info["residual"] = float(torch.linalg.vector_norm(r)) / bnorm
            break
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = torch.dot(r, r)
        info["residual"] = float(torch.sqrt(rr_new)) / bnorm
        if info["residual"] <= tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    if info["boundary"]:
        info["residual"] = float(torch.linalg.vector_norm(r)) / bnorm
    bx, rx = float(torch.dot(b, x)), float(torch.dot(r, x))
    info.update(bx=bx, xAx=bx - rx)  # A x = b − r
    return x, info
