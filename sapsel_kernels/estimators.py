"""The estimators of ``hessian_diag`` that read the data once: "grad_abs", "squared_grad", "fisher", "exact".

Each function takes the model (already in estimation mode), a :class:`~sapsel_kernels.data.Loss`, a sequence of
batches and the ParamSpace, and returns an :class:`Estimate` (float32 flat [N] mean and M2, sample count, info);
``hessian.hessian_diag`` wraps it into a DiagEstimate. Also home of :class:`Welford`, the float32 accumulator every
sampling estimator folds its samples into.
"""

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .data import batch_size, slice_batch
from .errors import NonFiniteError, check_finite
from .hvp import _LossModule, gradient

log = logging.getLogger("sapsel_kernels.hessian")

# Points per vmapped per-sample-gradient call, and a cap so that the [C, N] gradients, their squares and vmap's
# per-point intermediates (~3 C N elements) stay under 256 MiB. On CPU (320 points, 26k-parameter CNN + BatchNorm,
# one thread) 64 points per call took 1.42 s, 128 points 1.29 s, 16 points 1.49 s; one backward per point 3.1 s.
_FISHER_CHUNK = 64
_FISHER_CHUNK_BYTES = 1 << 28


class Estimate(NamedTuple):
    mean: torch.Tensor
    m2: torch.Tensor
    count: int
    info: dict[str, Any]


class Welford:
    """Float32 flat accumulators (mean, M2) over ``count`` samples, one Welford step per sample."""

    def __init__(self, n: int, device):
        self.mean = torch.zeros(n, dtype=torch.float32, device=device)
        self.m2 = torch.zeros_like(self.mean)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold one flat sample (any float dtype; converted to float32 first)."""
        x = x.to(torch.float32)
        delta = x - self.mean
        self.mean.add_(delta / (self.count + 1))
        self.m2.add_(delta * (x - self.mean))
        self.count += 1

    def add_rows(self, xs: torch.Tensor) -> None:
        """Fold the rows of an [m, N] tensor, in order."""
        for x in xs:
            self.add(x)


def _flat_dtype(space) -> torch.dtype:
    return torch.float64 if torch.float64 in space.dtypes else torch.float32


def _mean_gradient(model, loss, batches, space):
    acc, nb = None, 0
    for b in batches:
        g = gradient(model, loss, space, b)
        check_finite(g, "hessian_diag: a gradient", space, suffix="is the loss finite at these parameters?")
        acc = g if acc is None else [a + x for a, x in zip(acc, g)]
        nb += 1
    return [a / nb for a in acc], nb


def grad_abs(model, loss, batches, space) -> Estimate:
    """|d L / d theta| for L the mean over batches of the batch-mean loss."""
    g, nb = _mean_gradient(model, loss, batches, space)
    mean = space.gather([x.abs() for x in g])
    return Estimate(mean, torch.zeros_like(mean), 1, {"batches": nb})


def squared_grad(model, loss, batches, space) -> Estimate:
    """Mean over batches of the squared batch-mean gradient (one backward per batch); var over batches."""
    acc = Welford(space.numel, space.device)
    for b in batches:
        g = gradient(model, loss, space, b)
        check_finite(g, "hessian_diag: a gradient", space, suffix="is the loss finite at these parameters?")
        acc.add(space.gather([x * x for x in g], dtype=torch.float64))
    return Estimate(acc.mean, acc.m2, acc.count, {"batches": acc.count})


# ============================================================================================ empirical Fisher
def _leaves(batch):
    """(top-level items of a batch, rebuild(items) -> a batch of the same kind); the same nesting level that
    ``data.slice_batch`` cuts."""
    if isinstance(batch, torch.Tensor):
        return [batch], lambda xs: xs[0]
    if isinstance(batch, Mapping):
        keys = list(batch.keys())

        def rebuild_map(xs):
            out = dict(zip(keys, xs))
            try:
                return type(batch)(out)
            except Exception:  # noqa: BLE001 - a Mapping type without a dict constructor
                return out

        return [batch[k] for k in keys], rebuild_map
    return list(batch), (tuple if isinstance(batch, tuple) else list)


class _PointGradients:
    """Per-point gradients of one batch: ``torch.func.vmap(grad)`` over the points (each point seen by the model as
    a batch of one, exactly like ``data.iter_points``), or one backward per point."""

    def __init__(self, model, loss, space):
        self.model, self.loss, self.space = model, loss, space
        self.wrapper = _LossModule(model, loss)
        self.keys = ["model." + n for n in space.names]
        self.dtype = _flat_dtype(space)

    def vmapped(self, batch, lo: int, hi: int) -> torch.Tensor:
        n = batch_size(batch)
        leaves, rebuild = _leaves(batch)
        mapped = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n]
        if not mapped:
            raise ValueError("no tensor of the batch has the batch size as its leading dimension")
        wrapper, keys = self.wrapper, self.keys

        def loss_one(ps, xs):
            items = list(leaves)
            for i, x in zip(mapped, xs):
                items[i] = x.unsqueeze(0)
            return torch.func.functional_call(wrapper, dict(zip(keys, ps)), (rebuild(items),), strict=False)

        primals = tuple(p.detach() for p in self.space.params)
        xs = tuple(leaves[i][lo:hi] for i in mapped)
        gs = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0))(primals, xs)
        return torch.cat([g.reshape(hi - lo, -1).to(self.dtype) for g in gs], dim=1)

    def looped(self, batch, lo: int, hi: int) -> torch.Tensor:
        out = torch.empty(hi - lo, self.space.numel, dtype=self.dtype, device=self.space.device)
        for j, i in enumerate(range(lo, hi)):
            g = gradient(self.model, self.loss, self.space, slice_batch(batch, torch.tensor([i])))
            self.space.gather(g, out=out[j])
        return out


def fisher(model, loss, batches, space, progress: bool | None = None) -> Estimate:
    """Diagonal empirical Fisher: mean over ALL points of (per-point gradient)^2, var = per-point variance.

    Per-point gradients come from ``torch.func.vmap(torch.func.grad(...))`` over chunks of a batch's points; if the
    model or loss cannot be vmapped (``.item()``, data-dependent shapes, in-place updates of captured tensors) the
    estimator logs why and computes them with one backward per point instead (``info["fisher_path"]`` says which).
    Both give the gradient of ``loss(model, point)`` for a single-point batch, so they agree to float rounding.
    """
    grads = _PointGradients(model, loss, space)
    elem = torch.finfo(grads.dtype).bits // 8
    chunk = max(1, min(_FISHER_CHUNK, _FISHER_CHUNK_BYTES // max(1, 3 * space.numel * elem)))
    acc = Welford(space.numel, space.device)
    info: dict[str, Any] = {"fisher_path": "vmap", "batches": 0}
    bar = _bar(progress, sum(batch_size(b) for b in batches) if isinstance(batches, list) else None)
    try:
        for b in batches:
            n = batch_size(b)
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                if info["fisher_path"] == "vmap":
                    try:
                        g = grads.vmapped(b, lo, hi)
                    except (KeyboardInterrupt, NonFiniteError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - no vmap rule somewhere: one backward per point
                        msg = str(exc).splitlines()[0] if str(exc) else ""
                        log.warning("per-sample gradients by vmap failed (%s: %s); one backward per point instead",
                                    type(exc).__name__, msg)
                        info.update(fisher_path="loop", fisher_fallback_reason=f"{type(exc).__name__}: {exc}")
                if info["fisher_path"] == "loop":
                    g = grads.looped(b, lo, hi)
                check_finite(g, "hessian_diag(estimator='fisher'): a per-point gradient",
                             suffix="is the loss finite at these parameters?")
                acc.add_rows(g * g)
                if bar is not None:
                    bar.update(hi - lo)
            info["batches"] += 1
    finally:
        if bar is not None:
            bar.close()
    info["points"] = acc.count
    return Estimate(acc.mean, acc.m2, acc.count, info)


def _bar(progress, total):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="point", desc="hessian_diag[fisher]", leave=False,
                disable=(None if progress is None else not progress))


# ============================================================================================ exact
def exact(model, loss, batches, space, limit: int) -> Estimate:
    """diag of ``torch.func.hessian`` of each batch's mean loss over the flat parameters, averaged over batches."""
    n = space.numel
    if n > limit:
        raise ValueError(f"estimator='exact' builds the full N x N Hessian: N = {n:,} parameters exceeds "
                         f"exact_max_numel = {limit:,} ({n * n * 8 / 2**30:.1f} GiB in float64). Use "
                         "estimator='hutchinson', or raise exact_max_numel if you have the memory.")
    dtype = space.dtypes[0]
    if any(d != dtype for d in space.dtypes):
        raise TypeError("estimator='exact' needs all parameters in one dtype")
    wrapper = _LossModule(model, loss)
    keys = ["model." + nm for nm in space.names]
    flat0 = space.gather(dtype=dtype)
    diag, nb = torch.zeros(n, dtype=torch.float64, device=space.device), 0
    for b in batches:
        def f(flat, b=b):
            ps = {k: flat[o:o + c].view(tuple(s)) for k, o, c, s in
                  zip(keys, space.offsets, space.numels, space.shapes)}
            return torch.func.functional_call(wrapper, ps, (b,), strict=False)

        h = torch.func.hessian(f)(flat0)
        d = torch.diagonal(h).to(torch.float64, copy=True)
        del h  # N x N: freed before the next batch builds its own
        check_finite(d, "hessian_diag(estimator='exact'): the Hessian diagonal", space,
                     suffix="is the loss finite at these parameters?")
        diag += d
        nb += 1
    mean = (diag / nb).to(torch.float32)
    return Estimate(mean, torch.zeros_like(mean), 1, {"batches": nb})
