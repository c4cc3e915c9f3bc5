"""Feature/label unlearning restricted to a selected parameter subset S, and the strategies that pick S.

``unlearn`` applies one of Warnecke et al.'s update rules (NDSS 2023) to the coordinates in S only:

* the affected training points Z (as trained on) and their corrected versions Z̃ (same inputs, fixed labels/features)
  define ``G = Σ_{z∈Z̃} ∇ℓ(z, θ*) − Σ_{z∈Z} ∇ℓ(z, θ*)``, a SUM over points. ``loss_fn`` returns the MEAN loss of a
  batch (API contract), so each batch's gradient is multiplied by its number of points (``_batch_len``);
* ``first_order``:   θ_S ← θ_S − τ·G_S;
* ``second_order``:  θ_S ← θ_S − (H_SS + λI)⁻¹ G_S, solved by conjugate gradient with Hessian-vector products
  restricted to S. H is the Hessian of the SUMMED training loss (Warnecke's scale, consistent with G being a sum):
  H = (n_train / n_h) · Σ_b |b| ∇²L_mean(b) over the given Hessian batches (the corrected training data, or a
  subsample of n_h points of it). λ (``damping``) is on that same summed scale; ``damping / n_train`` is the
  equivalent damping of the mean-loss Hessian;
* ``diag_newton``:   θ_S ← θ_S − G_S / (n_train · max(d_S, 0) + λ), d = diagonal of the MEAN training-loss Hessian
  (a Hutchinson estimate from ``hessian_diag`` unless given); negative estimates are clipped to 0 (the damping keeps
  the division finite);
* ``sam_finetune``:  ``SparseSAM`` on the corrected points (plus, optionally, retained training points) for n steps;
* ``gradient_ascent``: SGD on S minimising L_mean(Z̃) − L_mean(Z) (ascent on Z, descent on Z̃) for n steps.

Invariants: coordinates outside S are bit-for-bit unchanged (the final write is θ* with S replaced); any NaN/Inf in
the parameters, G, the solve or along an iterative run leaves the model exactly as it was and raises ValueError.

``select_parameters`` builds S for every strategy of the comparison at an equal budget k (see its docstring).
"""

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from .space import ParamSpace

__all__ = ["unlearn", "UnlearnReport", "select_parameters", "parameter_scores", "STRATEGIES", "METHODS",
           "summed_gradient", "cg_solve"]

METHODS = ("first_order", "second_order", "diag_newton", "sam_finetune", "gradient_ascent")
STRATEGIES = ("hessian", "hessian_smallest", "hessian_affected", "hessian_corrected", "all", "last_layer", "random",
              "grad_abs", "fisher")


# ====================================================================== data helpers
def _is_batch(obj) -> bool:
    """A batch is a tensor, a dict, or a tuple/list whose first element is a tensor; anything else iterable is a
    sequence of batches."""
    if isinstance(obj, (torch.Tensor, dict)):
        return True
    if isinstance(obj, (tuple, list)) and len(obj) > 0 and isinstance(obj[0], torch.Tensor):
        return True
    return False


def as_batches(data) -> List[Any]:
    """``data`` (one batch or an iterable of batches) -> list of batches."""
    if data is None:
        return []
    if _is_batch(data):
        return [data]
    return list(data)


def _batch_len(batch) -> int:
    """Number of points in a batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        batch = list(batch.values())
    for t in batch:
        if isinstance(t, torch.Tensor):
            return int(t.shape[0]) if t.dim() else 1
    raise TypeError("cannot infer the number of points in a batch: no tensor in it")


def _n_points(batches) -> int:
    return sum(_batch_len(b) for b in batches)


def _slice_batch(batch, idx: torch.Tensor):
    """Select points ``idx`` of a tuple/list/dict/tensor batch (every tensor with the batch's leading size)."""
    n = _batch_len(batch)
    if isinstance(batch, torch.Tensor):
        return batch[idx]
    if isinstance(batch, dict):
        return {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
                for k, v in batch.items()}
    out = [(t[idx] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t) for t in batch]
    return type(batch)(out) if isinstance(batch, tuple) else out


def _points(batches) -> Iterable[Any]:
    """Yield single-point batches (for per-sample squared gradients)."""
    for b in batches:
        for i in range(_batch_len(b)):
            yield _slice_batch(b, torch.tensor([i]))


# ====================================================================== gradients and HVPs
def _flat(grads, space: ParamSpace, dtype) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                      for g, p in zip(grads, space.params)])


def summed_gradient(space: ParamSpace, model, loss_fn, batches, dtype=None) -> Tuple[torch.Tensor, int]:
    """Σ over points of ∇ℓ: Σ_b |b|·∇loss_fn(model, b). Returns (flat gradient, number of points)."""
    dtype = dtype or space.dtypes[0]
    total = torch.zeros(space.numel, dtype=dtype, device=space.device)
    n = 0
    for b in batches:
        nb = _batch_len(b)
        loss = loss_fn(model, b)
        g = torch.autograd.grad(loss, space.params, allow_unused=True)
        total += nb * _flat(g, space, dtype)
        n += nb
    return total, n


class _RestrictedHessian:
    """v_S -> (H v)_S for H = scale · Σ_b |b| ∇²L_mean(b), with v zero outside S.

    With ``cache_graph`` the first-order graph of each batch is built once and reused by every product (one
    double-backward per product and batch): fast for the small models and subsamples used here, but it keeps one
    graph per batch alive (use ``cache_graph=False`` for big models: each product then redoes forward+backward).
    """

    def __init__(self, space, model, loss_fn, batches, idx, scale, cache_graph=True):
        self.space, self.model, self.loss_fn, self.batches = space, model, loss_fn, batches
        self.idx, self.scale, self.cache = idx, scale, cache_graph
        self.n_products = 0
        self.n_point_products = 0
        self._graphs = None

    def _grads(self):
        if self.cache and self._graphs is not None:
            return self._graphs
        out = []
        for b in self.batches:
            loss = self.loss_fn(self.model, b) * _batch_len(b)
            g = torch.autograd.grad(loss, self.space.params, create_graph=True, allow_unused=True)
            out.append(g)
        if self.cache:
            self._graphs = out
        return out

    def __call__(self, v_s: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.space.numel, dtype=v_s.dtype, device=v_s.device)
        full[self.idx] = v_s
        views = self.space.views(full)
        acc = torch.zeros(self.space.numel, dtype=v_s.dtype, device=v_s.device)
        for g in self._grads():
            dot = sum((gi * views[name].to(gi.dtype)).sum() for gi, name in zip(g, self.space.names)
                      if gi is not None)
            hv = torch.autograd.grad(dot, self.space.params, retain_graph=self.cache, allow_unused=True)
            acc += _flat(hv, self.space, v_s.dtype)
        self.n_products += 1
        self.n_point_products += _n_points(self.batches)
        return self.scale * acc[self.idx]


def cg_solve(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, max_iter: int = 50,
             tol: float = 1e-6) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Conjugate gradient for A x = b (A symmetric, given as ``matvec``), from x = 0.

    Stops when ‖r‖ ≤ tol·‖b‖, after ``max_iter`` products, or on non-positive curvature pᵀAp ≤ 0 (A not positive
    definite along p: the iterate so far is returned, as truncated CG does; at the first step that is x = 0, i.e. no
    update). Accumulates in b's dtype. Returns (x, info{iters, residual, negative_curvature}).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = torch.dot(r, r)
    bnorm = float(torch.sqrt(rr))
    info = {"iters": 0, "residual": 1.0 if bnorm > 0 else 0.0, "negative_curvature": False}
    if bnorm == 0.0:
        return x, info
    for it in range(max_iter):
        ap = matvec(p)
        pap = torch.dot(p, ap)
        info["iters"] = it + 1
        if not torch.isfinite(pap):
            raise ValueError("cg_solve: the Hessian-vector product produced NaN/Inf")
        if float(pap) <= 0.0:
            info["negative_curvature"] = True
            break
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = torch.dot(r, r)
        info["residual"] = float(torch.sqrt(rr_new)) / bnorm
        if info["residual"] <= tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, info


# ====================================================================== selections
def _selection_cls():
    from .selection import Selection

    return Selection


def _selection_from_indices(indices: torch.Tensor, space: ParamSpace):
    indices = torch.sort(indices.to(torch.int64)).values
    return _selection_cls().from_indices(indices, space.numel, space=space)


def _topk_selection(scores: torch.Tensor, k: int, space: ParamSpace, largest=True):
    from .selection import select

    return select(scores, k=k, largest=largest, space=space)


def _selection_indices(selection, space: ParamSpace) -> torch.Tensor:
    """Selection | int64 index tensor | bool mask | None -> ascending unique int64 flat indices (validated)."""
    if selection is None:
        return torch.arange(space.numel, device=space.device)
    if isinstance(selection, torch.Tensor):
        if selection.dtype == torch.bool:
            if selection.shape != (space.numel,):
                raise ValueError(f"selection mask must have shape ({space.numel},), got {tuple(selection.shape)}")
            return torch.nonzero(selection).reshape(-1).to(space.device)
        idx = selection.reshape(-1).to(torch.int64)
    else:
        sig = getattr(selection, "space_signature", None)
        if sig is not None and sig != space.signature:
            raise ValueError("selection was built for another model/parameter space "
                             f"(signature {sig} != {space.signature})")
        numel = getattr(selection, "numel", space.numel)
        if numel != space.numel:
            raise ValueError(f"selection addresses {numel} parameters, the model has {space.numel}")
        idx = selection.indices.reshape(-1).to(torch.int64)
    if idx.numel() == 0:
        raise ValueError("selection is empty: nothing to update")
    if int(idx.min()) < 0 or int(idx.max()) >= space.numel:
        raise ValueError(f"selection indices out of range [0, {space.numel})")
    idx = torch.unique(idx.cpu()).to(space.device)  # sorted, duplicates would double-count a coordinate
    return idx


# ====================================================================== report
@dataclass
class UnlearnReport:
    """What one ``unlearn`` call did and cost.

    ``n_gradients``: per-point loss gradients evaluated (a backward over a batch of b points counts b);
    ``n_hvps``: per-point Hessian-vector products (same counting); ``n_passes``: backward passes of any kind;
    ``delta_norm``: ‖θ_after − θ*‖₂ (float64); ``n_changed``: coordinates whose value changed;
    ``k``: size of S; ``info``: method-specific (CG iterations and residual, step size, damping, ...).
    """

    method: str
    k: int
    numel: int
    wall_time_s: float
    n_gradients: int
    n_hvps: int
    n_passes: int
    delta_norm: float
    n_changed: int
    info: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ====================================================================== unlearn
def _check_finite(t: torch.Tensor, what: str):
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"unlearn: {what} contains NaN/Inf; the model was left untouched")


def unlearn(model: torch.nn.Module, loss_fn: Callable, affected, corrected, selection=None,
            method: str = "first_order", *, tau: float = 1e-3, train_data=None, n_train: Optional[int] = None,
            damping: Optional[float] = None, cg_iters: int = 50, cg_tol: float = 1e-6, cache_graph: bool = True,
            diag=None, n_probes: int = 32, seed: int = 0, steps: int = 20, lr: float = 1e-2, rho: float = 0.05,
            retain=None, base: str = "sgd", space: Optional[ParamSpace] = None) -> UnlearnReport:
    """Unlearn the affected points Z (replaced by their corrections Z̃) by updating only the coordinates in S.

    Args:
        model: trained at θ*; modified IN PLACE (coordinates in S only). Put it in eval mode yourself if it has
            dropout/BatchNorm: the HVPs and gradients are taken in whatever mode it is in.
        loss_fn: ``loss_fn(model, batch) -> scalar`` MEAN loss of the batch.
        affected, corrected: Z and Z̃, each one batch or an iterable of batches, same number of points.
        selection: a ``Selection``, int64 flat indices, a flat bool mask, or None (= all parameters).
        method: one of ``METHODS`` (see the module docstring for the formulas).
        tau: first_order step size (on the summed-gradient scale: the step is τ·G with G a sum over points).
        train_data: the corrected training data (batches) for second_order's HVPs and diag_newton's estimate
            (a subsample is fine; the Hessian is rescaled to ``n_train`` points).
        n_train: number of training points the summed-loss Hessian represents (default: points in train_data).
        damping: λ on the summed-loss scale (default 0.01·n_train, i.e. 0.01 on the mean-loss scale).
        cg_iters, cg_tol, cache_graph: conjugate-gradient controls (second_order).
        diag: diag_newton: a DiagEstimate or flat tensor of the MEAN training-loss Hessian diagonal; estimated with
            ``hessian_diag(model, loss_fn, train_data, n_probes=n_probes, seed=seed)`` when None (its loss is the mean
            over batches: give equal-size batches, or one batch, for the mean over points).
        steps, lr, rho, retain, base: sam_finetune / gradient_ascent: number of steps, learning rate, SAM radius,
            retained (unaffected) training batches mixed into sam_finetune's batches (cycled), base optimizer.
        space: ParamSpace of the model (built when None).

    Returns:
        UnlearnReport.

    Raises:
        ValueError before anything is modified on: unknown method, mismatched Z/Z̃ sizes, an empty/out-of-range
        selection, NaN/Inf in θ*, G, the solve or any iterate (the model is restored in the last case).
    """
    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; choose one of {METHODS}")
    if not math.isfinite(float(tau)):
        raise ValueError(f"tau must be finite, got {tau}")
    if int(steps) < 0 or int(cg_iters) < 1:
        raise ValueError(f"steps must be >= 0 and cg_iters >= 1, got steps={steps}, cg_iters={cg_iters}")
    space = space or ParamSpace(model)
    idx = _selection_indices(selection, space)
    z, zt = as_batches(affected), as_batches(corrected)
    nz, nzt = _n_points(z), _n_points(zt)
    if nz == 0 or nz != nzt:
        raise ValueError(f"affected ({nz} points) and corrected ({nzt} points) must be non-empty and of equal size")
    theta0 = space.gather(dtype=None)
    _check_finite(theta0, "the model's parameters")
    t0 = time.perf_counter()
    counts = {"grad": 0, "hvp": 0, "passes": 0}
    info: Dict[str, Any] = {}

    if method in ("first_order", "second_order", "diag_newton"):
        g_new, _ = summed_gradient(space, model, loss_fn, zt)
        g_old, _ = summed_gradient(space, model, loss_fn, z)
        counts["grad"] += nz + nzt
        counts["passes"] += len(z) + len(zt)
        G = g_new - g_old
        _check_finite(G, "G = Σ∇ℓ(Z̃) − Σ∇ℓ(Z)")
        g_s = G[idx]
        info["g_norm"] = float(g_s.double().norm())
        if method == "first_order":
            delta = -tau * g_s
            info["tau"] = tau
        else:
            hb = as_batches(train_data)
            if not hb:
                raise ValueError(f"{method} needs train_data (the corrected training data or a subsample)")
            n_h = _n_points(hb)
            n_train = int(n_train or n_h)
            lam = float(damping) if damping is not None else 0.01 * n_train
            if not lam >= 0:
                raise ValueError(f"damping must be >= 0, got {damping}")
            info.update(damping=lam, n_train=n_train, n_hessian_points=n_h)
            if method == "second_order":
                hess = _RestrictedHessian(space, model, loss_fn, hb, idx, n_train / n_h, cache_graph)
                x, cg = cg_solve(lambda v: hess(v) + lam * v, g_s, max_iter=cg_iters, tol=cg_tol)
                delta = -x
                counts["hvp"] += hess.n_point_products
                counts["passes"] += hess.n_products * len(hb) + (len(hb) if cache_graph else 0)
                info.update(cg_iters=cg["iters"], cg_residual=cg["residual"],
                            negative_curvature=cg["negative_curvature"])
                del hess
            else:
                if diag is None:
                    from .hessian import hessian_diag

                    est = hessian_diag(model, loss_fn, hb, n_probes=n_probes, seed=seed)
                    d = est.mean
                    counts["hvp"] += n_probes * n_h
                    counts["passes"] += n_probes * len(hb)
                else:
                    d = diag.mean if hasattr(diag, "mean") and not isinstance(diag, torch.Tensor) else diag
                d = d.reshape(-1).to(device=space.device, dtype=g_s.dtype)
                if d.numel() != space.numel:
                    raise ValueError(f"diag has {d.numel()} entries, the model has {space.numel} parameters")
                denom = n_train * d[idx].clamp_min(0) + lam
                if not bool((denom > 0).all()):
                    raise ValueError("diag_newton: zero denominator (diagonal estimate 0 and damping 0)")
                delta = -g_s / denom
                info["n_clipped_negative"] = int((d[idx] < 0).sum())
        _check_finite(delta, f"the {method} update")
        theta = theta0.clone()
        theta[idx] += delta.to(theta.dtype)
        space.scatter(theta)
    else:
        try:
            _iterative(method, space, model, loss_fn, z, zt, idx, steps=steps, lr=lr, rho=rho,
                       retain=as_batches(retain), base=base, counts=counts, info=info)
            theta_run = space.gather(dtype=None)
            _check_finite(theta_run, f"the {method} iterate")
        except BaseException:
            space.scatter(theta0)
            raise
        # Outside S exactly θ*, whatever the optimizer did there (it should have done nothing).
        theta = theta0.clone()
        theta[idx] = theta_run[idx]
        space.scatter(theta)
        info["moved_outside_selection"] = int((theta_run != theta0).sum() - (theta_run[idx] != theta0[idx]).sum())

    wall = time.perf_counter() - t0
    diff = theta.double() - theta0.double()
    return UnlearnReport(method=method, k=int(idx.numel()), numel=space.numel, wall_time_s=wall,
                         n_gradients=counts["grad"], n_hvps=counts["hvp"], n_passes=counts["passes"],
                         delta_norm=float(diff.norm()), n_changed=int((diff != 0).sum()), info=info)


def _selection_for_optim(idx: torch.Tensor, space: ParamSpace):
    return _selection_from_indices(idx, space)


def _iterative(method, space, model, loss_fn, z, zt, idx, *, steps, lr, rho, retain, base, counts, info):
    """sam_finetune / gradient_ascent: ``steps`` optimizer steps restricted to S (issue 4's sparse optimizers)."""
    from .optim import SparseSAM, SparseSGD

    sel = _selection_for_optim(idx, space)
    info.update(steps=steps, lr=lr)
    if method == "sam_finetune":
        opt = SparseSAM(model, sel, base=base, lr=lr, rho=rho)
        info["rho"] = rho
        # Each step sees one corrected batch (cycled) and, if given, one retained batch (cycled).
        for s in range(steps):
            b = [zt[s % len(zt)]] + ([retain[s % len(retain)]] if retain else [])
            npts = _n_points(b)

            def closure(b=b):
                loss = sum(loss_fn(model, bi) * _batch_len(bi) for bi in b) / npts
                if not math.isfinite(float(loss.detach())):
                    # SparseSAM would silently skip the step; unlearn's contract is to restore and raise
                    raise ValueError("unlearn: sam_finetune loss became NaN/Inf; the model was left untouched")
                loss.backward()
                return loss

            opt.zero_grad()
            closure()
            opt.first_step()
            opt.zero_grad()
            closure()
            opt.second_step()
            opt.zero_grad()
            if getattr(opt, "last_step_skipped", False):
                raise ValueError("unlearn: sam_finetune hit a NaN/Inf gradient; the model was left untouched")
            counts["grad"] += 2 * npts
            counts["passes"] += 2 * len(b)
    else:
        opt = SparseSGD(model, sel, lr=lr)
        for s in range(steps):
            bz, bzt = z[s % len(z)], zt[s % len(zt)]
            opt.zero_grad()
            loss = loss_fn(model, bzt) - loss_fn(model, bz)
            if not math.isfinite(float(loss.detach())):
                raise ValueError("unlearn: gradient_ascent loss became NaN/Inf; the model was left untouched")
            loss.backward()
            for p in space.params:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    raise ValueError("unlearn: gradient_ascent hit a NaN/Inf gradient; the model was left untouched")
            opt.step()
            opt.zero_grad()
            counts["grad"] += _batch_len(bz) + _batch_len(bzt)
            counts["passes"] += 1


# ====================================================================== selection strategies
def _budget_to_k(budget: Union[int, float], numel: int) -> int:
    if isinstance(budget, bool):
        raise TypeError("budget must be a fraction in (0, 1] or an int k")
    if isinstance(budget, int):
        k = budget
    else:
        b = float(budget)
        if not (0.0 < b <= 1.0):
            raise ValueError(f"budget fraction must be in (0, 1], got {budget}")
        k = max(1, int(round(b * numel)))
    if not 1 <= k <= numel:
        raise ValueError(f"budget k={k} out of range [1, {numel}]")
    return k


def last_layer_indices(space: ParamSpace, prefix: Optional[str] = None) -> torch.Tensor:
    """Flat indices of the last layer: every parameter whose module prefix (name up to the last '.') equals the
    last parameter's, e.g. ``fc.weight`` and ``fc.bias`` (or ``prefix`` when given)."""
    if prefix is None:
        prefix = space.names[-1].rsplit(".", 1)[0] if "." in space.names[-1] else space.names[-1]
    parts = []
    for name, off, n in zip(space.names, space.offsets, space.numels):
        if name == prefix or name.rsplit(".", 1)[0] == prefix:
            parts.append(torch.arange(off, off + n, dtype=torch.int64))
    if not parts:
        raise ValueError(f"no parameter belongs to layer {prefix!r}")
    return torch.cat(parts).to(space.device)


def _sq_grad_mean(space, model, loss_fn, batches, max_points=None, seed=0) -> Tuple[torch.Tensor, int]:
    """Mean over points of (∇ℓ_i)² (diagonal empirical Fisher), from one backward per point."""
    pts = list(_points(batches))
    if max_points is not None and len(pts) > max_points:
        g = torch.Generator().manual_seed(seed)
        pts = [pts[i] for i in torch.randperm(len(pts), generator=g)[:max_points].tolist()]
    acc = torch.zeros(space.numel, dtype=torch.float64, device=space.device)
    for p in pts:
        gr = torch.autograd.grad(loss_fn(model, p), space.params, allow_unused=True)
        acc += _flat(gr, space, torch.float64) ** 2
    return (acc / max(len(pts), 1)).to(torch.float32), len(pts)


def parameter_scores(model, strategy: str, *, loss_fn=None, data=None, affected=None, corrected=None, seed: int = 0,
                     n_probes: int = 32, estimator: str = "hutchinson", fisher_points: Optional[int] = 512,
                     space: Optional[ParamSpace] = None, **hessian_kw) -> Tuple[Optional[torch.Tensor], Dict]:
    """The flat float32 score vector a score-based strategy ranks by (None for ``all``/``random``), plus cost info
    {"wall_time_s", "n_gradients", "n_hvps"} (per-point counts, as in UnlearnReport).

    * hessian / hessian_smallest / last_layer: diag of the training-loss Hessian at θ* on ``data``
      (``hessian_diag(..., estimator=estimator, n_probes=n_probes, seed=seed)``);
    * hessian_affected / hessian_corrected: the same on Z (``affected``) / Z̃ (``corrected``);
    * grad_abs (SalUn): |∇L_mean(Z)|, the forget loss's gradient magnitude on the affected points;
    * fisher (SSD-like): F_Z / (F_D + 1e-12·mean(F_D)), F = mean squared per-point gradient (diagonal empirical
      Fisher) on Z and on the training data D (subsampled to ``fisher_points``): parameters specialised to Z.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {STRATEGIES}")
    space = space or ParamSpace(model)
    t0 = time.perf_counter()
    cost = {"n_gradients": 0, "n_hvps": 0}
    scores = None

    def need(x, what):
        if x is None or not as_batches(x):
            raise ValueError(f"strategy {strategy!r} needs {what}")
        if loss_fn is None:
            raise ValueError(f"strategy {strategy!r} needs loss_fn")
        return as_batches(x)

    if strategy in ("hessian", "hessian_smallest", "last_layer", "hessian_affected", "hessian_corrected"):
        src = {"hessian_affected": (affected, "affected"), "hessian_corrected": (corrected, "corrected")}.get(
            strategy, (data, "data (the training data)"))
        batches = need(*src)
        from .hessian import hessian_diag

        est = hessian_diag(model, loss_fn, batches, n_probes=n_probes, estimator=estimator, seed=seed, **hessian_kw)
        scores = est.mean.reshape(-1).to(torch.float32)
        cost["n_hvps"] = n_probes * _n_points(batches)
    elif strategy == "grad_abs":
        batches = need(affected, "affected")
        g, n = summed_gradient(space, model, loss_fn, batches, dtype=torch.float32)
        scores = (g / n).abs()
        cost["n_gradients"] = n
    elif strategy == "fisher":
        bz = need(affected, "affected")
        bd = need(data, "data (the training data)")
        fz, nz = _sq_grad_mean(space, model, loss_fn, bz)
        fd, nd = _sq_grad_mean(space, model, loss_fn, bd, max_points=fisher_points, seed=seed)
        scores = fz / (fd + 1e-12 * float(fd.mean()) + torch.finfo(torch.float32).tiny)
        cost["n_gradients"] = nz + nd
    if scores is not None:
        if scores.numel() != space.numel:
            raise ValueError(f"score vector has {scores.numel()} entries, the model has {space.numel}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"strategy {strategy!r}: scores contain NaN/Inf")
    cost["wall_time_s"] = time.perf_counter() - t0
    return scores, cost


def select_parameters(model, strategy: str = "hessian", budget: Union[int, float] = 0.01, *, loss_fn=None,
                      data=None, affected=None, corrected=None, seed: int = 0, scores: Optional[torch.Tensor] = None,
                      last_layer_prefix: Optional[str] = None, space: Optional[ParamSpace] = None, **kw):
    """Build the parameter subset S for one strategy at budget k.

    Args:
        budget: a fraction in (0, 1] of the trainable parameters (k = max(1, round(fraction·numel))) or an int k.
        strategy:
            * ``hessian`` (default): the k largest entries of diag(H) of the training loss at θ* (on ``data``);
            * ``hessian_smallest``: the k smallest (signed) entries of the same diagonal;
            * ``hessian_affected`` / ``hessian_corrected``: the k largest diag(H) of the loss on Z / on Z̃;
            * ``all``: every parameter (budget ignored, k = numel);
            * ``last_layer``: the last layer's parameters (see ``last_layer_indices``); when k is smaller than the
              layer, its k largest diag(H) entries (training loss); when k is larger, the whole layer only
              (|S| = layer size < k: the only strategy that may return fewer than k);
            * ``random``: k uniformly random coordinates (``seed``);
            * ``grad_abs``: SalUn's saliency, the k largest |∇L(Z)|;
            * ``fisher``: SSD-like, the k largest F_Z / F_D ratios (see ``parameter_scores``).
        scores: a precomputed score vector from ``parameter_scores`` for this strategy (skips the estimate, so one
            estimate serves several budgets).
        **kw: passed to ``parameter_scores`` (n_probes, estimator, fisher_points, hessian_diag options).

    Returns:
        A ``Selection`` over the model's ParamSpace (indices ascending).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {STRATEGIES}")
    space = space or ParamSpace(model)
    k = _budget_to_k(budget, space.numel)
    if strategy == "all":
        return _selection_from_indices(torch.arange(space.numel, device=space.device), space)
    if strategy == "random":
        g = torch.Generator().manual_seed(int(seed))
        return _selection_from_indices(torch.randperm(space.numel, generator=g)[:k].to(space.device), space)
    if strategy == "last_layer":
        ll = last_layer_indices(space, last_layer_prefix)
        if k >= ll.numel():
            return _selection_from_indices(ll, space)
    if scores is None:
        scores, _ = parameter_scores(model, strategy, loss_fn=loss_fn, data=data, affected=affected,
                                     corrected=corrected, seed=seed, space=space, **kw)
    scores = scores.reshape(-1).to(torch.float32)
    if strategy == "last_layer":
        # top-k among the layer's own scores, mapped back to flat indices
        local = _topk_selection(scores[ll.to(scores.device)], k, None, largest=True).indices
        return _selection_from_indices(ll[local.to(ll.device)], space)
    return _topk_selection(scores, k, space, largest=(strategy != "hessian_smallest"))
