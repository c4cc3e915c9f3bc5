"""The estimators of ``hessian_diag`` that read the data once: "grad_abs", "squared_grad", "fisher", "exact".

Each function takes the model (already in estimation mode), a :class:`~sapsel_kernels.data.Loss`, a sequence of
batches and the ParamSpace, and returns an :class:`Estimate` (float32 flat [N] mean and M2, sample count, info);
``hessian.hessian_diag`` wraps it into a DiagEstimate. Also home of :class:`Welford`, the float32 accumulator every
sampling estimator folds its samples into, and of :class:`Comm`, the data-parallel side of every estimator (a
process group whose ranks each hold a shard of the batches, or a single process).
"""

import contextlib
import logging
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from ..data import batch_size, slice_batch
from ..errors import NonFiniteError, check_finite
from .hvp import LossModule, gradient
from .modes import hf_checkpointing
from ..registry import Registry

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


# Elements per step of the Welford fold and of the rank merge: the float32 temporaries of one step (the sample in
# float32, its deviation, the scaled deviation, the second deviation) stay at 4 x 16 MiB whatever N is; the merge's
# float64 temporaries at 2 x 32 MiB.
_FOLD_CHUNK = 1 << 22


class Welford:
    """Float32 flat accumulators (mean, M2) over ``count`` samples, one Welford step per sample.

    Peak extra memory of a fold: four float32 chunks of 2^22 elements (64 MiB), whatever N is; the sample itself is
    never copied whole (a float64 or 16-bit sample is converted chunk by chunk)."""

    def __init__(self, n: int, device, variance: bool = True):
        self.mean = torch.zeros(n, dtype=torch.float32, device=device)
        # variance=False: the running mean alone (N float32, not 2N); m2 is None and the estimate has no stderr
        self.m2 = torch.zeros_like(self.mean) if variance else None
        self.count = 0

    def _fold(self, lo: int, x: torch.Tensor, square: bool) -> None:
        """One Welford step on positions [lo, lo + x.numel()) of the accumulators (``count`` not advanced)."""
        c = self.count + 1
        for a in range(0, x.numel(), _FOLD_CHUNK):
            xs = x[a:a + _FOLD_CHUNK]
            # a float64 sample is squared before rounding (like fisher's float64 squares); others in float32
            xs = (xs * xs).to(torch.float32) if square and xs.dtype == torch.float64 else xs.to(torch.float32)
            if square and x.dtype != torch.float64:
                xs = xs * xs
            mu = self.mean[lo + a:lo + a + xs.numel()]
            delta = xs - mu
            mu.add_(delta / c)
            if self.m2 is not None:
                self.m2[lo + a:lo + a + xs.numel()].add_(delta.mul_(xs - mu))

    def add(self, x: torch.Tensor) -> None:
        """Fold one flat sample (any float dtype; converted to float32 chunk by chunk)."""
        self._fold(0, x.reshape(-1), False)
        self.count += 1

    def add_squares(self, tensors, offsets) -> None:
        """Fold one sample given as per-parameter tensors (ParamSpace order, flat offsets ``offsets``) of which the
        sample is the elementwise SQUARE, squared in float32 (in float64 for float64 tensors, then rounded): no flat
        copy of the sample is built."""
        for t, off in zip(tensors, offsets):
            self._fold(off, t.reshape(-1), True)
        self.count += 1

    def add_parts(self, parts) -> None:
        """Fold one sample given as ``(offset, tensor)`` parts that cover [0, N) (any float dtype, each converted to
        float32 chunk by chunk): the bits of :meth:`add` on their concatenation, without building it."""
        for off, x in parts:
            self._fold(off, x.reshape(-1), False)
        self.count += 1

    def add_rows(self, xs: torch.Tensor) -> None:
        """Fold the rows of an [m, N] tensor, in order."""
        for x in xs:
            self.add(x)


# ============================================================================================ Ctrl-C and ranks
def _noting(handler) -> bool:
    return getattr(handler, "_sapsel_note_sigint", False)


@contextlib.contextmanager
def defer_sigint():
    """Hold Ctrl-C while accumulators, collectives or a checkpoint are in flight; deliver it to the previous handler
    afterwards (the default handler raises KeyboardInterrupt there; :meth:`Comm.note_sigint`'s notes it). Outside
    the main thread or under a user's own SIGINT handler this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.getsignal(signal.SIGINT)
    if prev is not signal.default_int_handler and not _noting(prev):
        yield
        return
    hit = []
    signal.signal(signal.SIGINT, lambda s, f: hit.append((s, f)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, prev)
    if hit:
        prev(*hit[0])


class AgreedInterrupt(KeyboardInterrupt):
    """A Ctrl-C that some rank reported at an agreement: every rank of the group raises it at the same point."""


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class Comm:
    """The process group of a data-parallel estimate, or none (``Comm()``: one process; every collective a no-op).

    Every collective of an estimate goes through this object, in the same order on every rank:

    * :meth:`exchange`: the rank's preparation, then one ``all_gather_object`` of a small descriptor (or of the
      rank's error); a rank whose preparation raised makes every rank raise.
    * :meth:`run`: the rank's local work, then ONE ``all_reduce`` of [counts..., failed, interrupted]; when a rank
      raised, every rank raises (that rank its own exception, the others a ValueError naming it); when a rank was
      interrupted, every rank raises :class:`AgreedInterrupt`; else the counts summed over the ranks are returned.
      A rank never enters a data collective that another rank skips, so a local error cannot leave the others
      waiting for the group's timeout.
    * :meth:`sum_`: in-place ``all_reduce(SUM)`` of flat buffers; :meth:`merge`: Welford states over all ranks.
    """

    def __init__(self, group=None):
        self.group = group
        self.active = group is not None
        self.rank, self.world = (dist.get_rank(group), dist.get_world_size(group)) if self.active else (0, 1)
        self.device = torch.device("cpu")  # of the flag tensors; set to the parameters' device (NCCL needs CUDA)
        self.interrupted = False

    def exchange(self, fn: Callable[[], tuple[Any, Any]], what: str) -> tuple[Any, list]:
        """``fn() -> (value, descriptor)`` on this rank; returns (value, every rank's descriptor in rank order)."""
        if not self.active:
            value, desc = fn()
            return value, [desc]
        value, mine, err = None, None, None
        try:
            value, desc = fn()
            mine = ("ok", desc)
        except KeyboardInterrupt:
            mine = ("interrupted", None)
        except Exception as exc:  # noqa: BLE001 - every rank learns of it below; this rank re-raises it
            err, mine = exc, ("error", _first_line(exc))
        out: list = [None] * self.world
        dist.all_gather_object(out, mine, group=self.group)
        if err is not None:
            raise err
        failed = [(r, msg) for r, (state, msg) in enumerate(out) if state == "error"]
        if failed:
            r, msg = failed[0]
            raise ValueError(f"{what}: rank {r} of {self.world} failed ({msg}); every rank of the group stops")
        if any(state == "interrupted" for state, _ in out):
            raise AgreedInterrupt
        return value, [desc for _, desc in out]

    def run(self, fn: Callable[[], tuple[Any, tuple]], what: str, n_counts: int = 1) -> tuple[Any, list[int]]:
        """``fn() -> (value, counts)`` (``n_counts`` ints) on this rank; returns (value, counts summed over ranks)."""
        if not self.active:
            value, counts = fn()
            return value, list(counts)
        value, counts, err, intr = None, (0,) * n_counts, None, False
        try:
            value, counts = fn()
        except KeyboardInterrupt:
            intr = True
        except Exception as exc:  # noqa: BLE001 - every rank learns of it below; this rank re-raises it
            err = exc
        flags = torch.tensor([*counts, err is not None, intr or self.interrupted], dtype=torch.int64,
                             device=self.device)
        dist.all_reduce(flags, group=self.group)
        flags = flags.tolist()
        if flags[n_counts]:
            msgs: list = [None] * self.world
            dist.all_gather_object(msgs, None if err is None else _first_line(err), group=self.group)
            if err is not None:
                raise err
            r = next(i for i, m in enumerate(msgs) if m is not None)
            raise ValueError(f"{what}: rank {r} of {self.world} failed ({msgs[r]}); every rank of the group stops")
        if flags[n_counts + 1]:
            raise AgreedInterrupt
        return value, flags[:n_counts]

    def sum_(self, flats) -> None:
        """``all_reduce(SUM)`` in place of each tensor of ``flats`` (one collective each)."""
        if self.active:
            for f in flats:
                dist.all_reduce(f, group=self.group)

    def merge(self, acc: "Welford", total: int) -> None:
        """Replace this rank's Welford state (``acc.count`` samples) by the state over all ``total`` samples of the
        group: mean = sum_r n_r mean_r / n and M2 = sum_r [M2_r + n_r (mean_r - mean)^2] (the parallel-variance
        formula of Chan et al. for k parts: exact in exact arithmetic, no cancellation since every term is >= 0),
        in float64, rounded to float32 once, in chunks of 2^22 elements: two all_reduces per chunk, 2 x 32 MiB of
        float64 temporaries whatever N is (elementwise: with two ranks the chunking changes no bit; with more, a ring
        all-reduce's per-element summation order may follow the buffer's split, every rank still getting the same
        result). With one rank
        it returns the rank's state bit for bit (n * mean / n and M2 + 0 are exact in float64)."""
        if not self.active:
            return
        n_r = acc.count
        for a in range(0, acc.mean.numel(), _FOLD_CHUNK):
            mean_c = acc.mean[a:a + _FOLD_CHUNK]
            mean64 = mean_c.to(torch.float64)
            mu = mean64 * n_r
            dist.all_reduce(mu, group=self.group)
            mu.div_(max(total, 1))
            if acc.m2 is None:  # the mean alone (variance=False): one all_reduce per chunk
                mean_c.copy_(mu)
                continue
            m2_c = acc.m2[a:a + _FOLD_CHUNK]
            dev = mean64.sub_(mu).square_().mul_(n_r).add_(m2_c)
            dist.all_reduce(dev, group=self.group)
            mean_c.copy_(mu)
            m2_c.copy_(dev)
        acc.count = total

    @contextlib.contextmanager
    def note_sigint(self):
        """Under a group of several ranks: Ctrl-C is noted, not raised, and reported at the next :meth:`run`, so
        every rank stops after the same pass; a second Ctrl-C raises KeyboardInterrupt at once (the other ranks
        then wait for the group's timeout). A no-op for one process, outside the main thread or under a user's
        own SIGINT handler."""
        if not self.active or threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return

        def handler(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            log.warning("Ctrl-C: every rank stops after the pass in flight (Ctrl-C again to abort this rank now)")

        handler._sapsel_note_sigint = True
        prev = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, prev)


class FlatBuffers:
    """Per-parameter tensors [m, *shape] carved out of ONE contiguous flat buffer per dtype, so that per-parameter
    results are all-reduced with one collective per dtype and no copy.

    ``dtype=None``: each parameter's own dtype (parameters of one dtype share a buffer); else that dtype for all.
    Allocated once for ``rows`` rows; :meth:`views` lays m <= rows rows out at the front of each buffer (parameter k
    of a dtype group at [m * off_k, m * (off_k + n_k)): contiguous, so a row-major reshape is a view).
    """

    def __init__(self, space, rows: int, dtype: torch.dtype | None = None):
        self.space = space
        self.groups: dict[torch.dtype, list[int]] = {}
        for i, d in enumerate(space.dtypes):
            self.groups.setdefault(dtype or d, []).append(i)
        self.flats = {d: torch.empty(rows * sum(space.numels[i] for i in idx), dtype=d, device=space.device)
                      for d, idx in self.groups.items()}

    def views(self, m: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([m, *shape] views in ParamSpace order, the flat [m * N_dtype] buffers behind them)."""
        sp = self.space
        out: list = [None] * len(sp)
        flats = []
        for d, idx in self.groups.items():
            flat, off = self.flats[d], 0
            for i in idx:
                n = sp.numels[i]
                out[i] = flat[m * off:m * (off + n)].view((m, *sp.shapes[i]))
                off += n
            flats.append(flat[:m * off])
        return out, flats


LOCAL = Comm()  # the single-process default


def _flat_dtype(space) -> torch.dtype:
    return torch.float64 if torch.float64 in space.dtypes else torch.float32


def _no_batches() -> ValueError:
    return ValueError("the data yielded no batches")


def grad_abs(model, loss, batches, space, comm: Comm = LOCAL, variance: bool = True) -> Estimate:
    """|d L / d theta| for L the mean over batches of the batch-mean loss (over every rank's batches).

    The per-batch gradients are summed in float32 (float64 for float64 parameters), never in a 16-bit dtype. Peak
    extra memory: the sums (N) plus one backward's gradients (transient); the float32 sums become the result in
    place (float64 sums: + N float32 for the result); ``variance=True`` adds the all-zero M2 (N float32) that a
    single sample's estimate carries (``variance=False``: m2 None)."""
    views, flats = FlatBuffers(space, 1, dtype=_flat_dtype(space)).views(1)
    sums = [v[0] for v in views]

    def local():
        nb = 0
        for b in batches:
            g = gradient(model, loss, space, b)
            check_finite(g, "hessian_diag: a gradient", space, suffix="is the loss finite at these parameters?")
            for s, x in zip(sums, g):
                s.copy_(x) if nb == 0 else s.add_(x)
            del g  # else it lives on through the next batch's backward: one more N-length gradient at the peak
            nb += 1
        if nb == 0:
            raise _no_batches()
        return None, (nb,)

    _, (nb,) = comm.run(local, "hessian_diag(estimator='grad_abs')")
    with defer_sigint():
        comm.sum_(flats)
    for x in sums:  # in place: no N-length temporary (the sums are ours: divided in their dtype)
        x.div_(nb).abs_()
    if len(flats) == 1 and flats[0].dtype == torch.float32:
        mean = flats[0]  # one float32 buffer in ParamSpace order: it IS the result
    else:
        mean = torch.empty(space.numel, dtype=torch.float32, device=space.device)
        for x, off, n in zip(sums, space.offsets, space.numels):
            mean[off:off + n].copy_(x.reshape(-1))
    return Estimate(mean, torch.zeros_like(mean) if variance else None, 1, {"batches": nb})


def squared_grad(model, loss, batches, space, comm: Comm = LOCAL, variance: bool = True) -> Estimate:
    """Mean over batches of the squared batch-mean gradient (one backward per batch); var over batches.

    Peak extra memory: the float32 Welford accumulators (2N; ``variance=False``: the mean alone, N) plus one
    backward's gradients (transient) and the fold's 64 MiB of chunks; no flat or float64 copy of a gradient."""
    acc = Welford(space.numel, space.device, variance=variance)

    def local():
        for b in batches:
            g = gradient(model, loss, space, b)
            check_finite(g, "hessian_diag: a gradient", space, suffix="is the loss finite at these parameters?")
            acc.add_squares(g, space.offsets)  # squared in float32 per parameter: no flat copy, no float64
            del g  # else it lives on through the next batch's backward
        if acc.count == 0:
            raise _no_batches()
        return None, (acc.count,)

    _, (n,) = comm.run(local, "hessian_diag(estimator='squared_grad')")
    with defer_sigint():
        comm.merge(acc, n)
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
        self.wrapper = LossModule(model, loss)
        self.keys = ["model." + n for n in space.names]
        self.dtype = _flat_dtype(space)

    def vmapped(self, batch, lo: int, hi: int) -> list[torch.Tensor]:
        """Per-parameter [hi - lo, numel_i] per-point gradients (in the flat dtype): no [C, N] concatenation."""
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
        return [g.reshape(hi - lo, -1).to(self.dtype) for g in gs]

    def looped(self, batch, lo: int, hi: int) -> torch.Tensor:
        out = torch.empty(hi - lo, self.space.numel, dtype=self.dtype, device=self.space.device)
        for j, i in enumerate(range(lo, hi)):
            g = gradient(self.model, self.loss, self.space, slice_batch(batch, torch.tensor([i])))
            self.space.gather(g, out=out[j])
        return out


def fisher(model, loss, batches, space, progress: bool | None = None, comm: Comm = LOCAL,
           variance: bool = True) -> Estimate:
    """Diagonal empirical Fisher: mean over ALL points of (per-point gradient)^2, var = per-point variance.

    Per-point gradients come from ``torch.func.vmap(torch.func.grad(...))`` over chunks of a batch's points; if the
    model or loss cannot be vmapped (``.item()``, data-dependent shapes, in-place updates of captured tensors) the
    estimator logs why and computes them with one backward per point instead (``info["fisher_path"]`` says which).
    Both give the gradient of ``loss(model, point)`` for a single-point batch, so they agree to float rounding.
    Under a group every rank folds its own points, then the Welford states are merged (:meth:`Comm.merge`).
    Peak extra memory: the Welford accumulators (2N float32; ``variance=False``: N) plus one chunk's per-point
    gradients [C, N], squared in place, with vmap's intermediates: C is capped so that ~3 C N elements stay under
    ``_FISHER_CHUNK_BYTES`` (256 MiB), so from ~22M float32 parameters on C = 1: one per-point gradient, as in the
    loop users write.
    """
    grads = _PointGradients(model, loss, space)
    elem = torch.finfo(grads.dtype).bits // 8
    chunk = max(1, min(_FISHER_CHUNK, _FISHER_CHUNK_BYTES // max(1, 3 * space.numel * elem)))
    acc = Welford(space.numel, space.device, variance=variance)
    info: dict[str, Any] = {"fisher_path": "vmap", "batches": 0}
    if hf_checkpointing(model)[0]:  # torch.func's vmap cannot run under activation checkpointing: no failed attempt
        info.update(fisher_path="loop", fisher_fallback_reason="activation checkpointing is on (torch.func.vmap "
                                                               "cannot run under it)")

    def local():
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
                            log.warning("per-sample gradients by vmap failed (%s: %s); one backward per point "
                                        "instead", type(exc).__name__, msg)
                            info.update(fisher_path="loop", fisher_fallback_reason=f"{type(exc).__name__}: {exc}")
                    if info["fisher_path"] == "loop":
                        g = grads.looped(b, lo, hi)
                    for part in (g if isinstance(g, list) else [g]):
                        check_finite(part, "hessian_diag(estimator='fisher'): a per-point gradient",
                                     suffix="is the loss finite at these parameters?")
                    if isinstance(g, list) and hi - lo == 1:  # one point (from ~22M parameters on): its squares
                        acc.add_squares([part[0] for part in g], space.offsets)  # per parameter, no flat copy
                    elif isinstance(g, list):  # several points: one [C, N] matrix, folded row by row (same bits;
                        g = torch.cat(g, dim=1)  # per-parameter folds measured 3.3x slower on 81 small tensors)
                        acc.add_rows(g.mul_(g))
                    else:
                        acc.add_rows(g.mul_(g))  # squared in place: no second [C, N]
                    del g  # the [C, N] gradients of this chunk: freed before the next chunk's are computed
                    if bar is not None:
                        bar.update(hi - lo)
                info["batches"] += 1
        finally:
            if bar is not None:
                bar.close()
        if acc.count == 0:
            raise ValueError("the data holds no points")
        return None, (acc.count, info["batches"])

    _, (points, nb) = comm.run(local, "hessian_diag(estimator='fisher')", n_counts=2)
    with defer_sigint():
        comm.merge(acc, points)
    info.update(points=points, batches=nb)
    return Estimate(acc.mean, acc.m2, acc.count, info)


def _bar(progress, total):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="point", desc="hessian_diag[fisher]", leave=False,
                disable=(None if progress is None else not progress))


# ============================================================================================ exact
def exact(model, loss, batches, space, limit: int, comm: Comm = LOCAL, variance: bool = True) -> Estimate:
    """diag of ``torch.func.hessian`` of each batch's mean loss over the flat parameters, averaged over batches."""
    n = space.numel
    diag = torch.zeros(n, dtype=torch.float64, device=space.device)

    def local():
        if n > limit:
            raise ValueError(f"estimator='exact' builds the full N x N Hessian: N = {n:,} parameters exceeds "
                             f"exact_max_numel = {limit:,} ({n * n * 8 / 2**30:.1f} GiB in float64). Use "
                             "estimator='hutchinson', or raise exact_max_numel if you have the memory.")
        dtype = space.dtypes[0]
        if any(d != dtype for d in space.dtypes):
            raise TypeError("estimator='exact' needs all parameters in one dtype")
        wrapper = LossModule(model, loss)
        keys = ["model." + nm for nm in space.names]
        flat0 = space.gather(dtype=dtype)
        nb = 0
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
            diag.add_(d)
            nb += 1
        if nb == 0:
            raise _no_batches()
        return None, (nb,)

    _, (nb,) = comm.run(local, "hessian_diag(estimator='exact')")
    with defer_sigint():
        comm.sum_([diag])
    mean = (diag / nb).to(torch.float32)
    return Estimate(mean, torch.zeros_like(mean) if variance else None, 1, {"batches": nb})


# ============================================================================================ the registry
@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator of ``hessian_diag`` (``ESTIMATOR_REGISTRY``; docs/layout.md shows how to add one).

    * ``run(model, loss, batches, space, comm, *, variance, progress, exact_max_numel) -> Estimate``: a data-once
      estimator, which reads the data once and returns the flat float32 mean (and M2 unless ``variance`` is False);
      None for the sampled ones, which ``probe_loop.run_probe_loop`` runs (probes, seeds, stopping rules,
      checkpoints);
    * ``stochastic``: the estimate is a mean over samples (var and stderr are defined; False: they are 0);
    * ``progress``: it shows a progress bar (``hessian_diag(progress=True)`` is refused otherwise).
    """

    run: Callable[..., Estimate] | None
    stochastic: bool = True
    progress: bool = False

    @property
    def probed(self) -> bool:
        return self.run is None


ESTIMATOR_REGISTRY = Registry("estimator")


def register_estimator(name: str, spec: EstimatorSpec) -> EstimatorSpec:
    """Add an estimator; ``hessian_diag(..., estimator=name)`` then runs it. ValueError for a name already taken."""
    if not isinstance(spec, EstimatorSpec):
        raise TypeError(f"register_estimator: expected an EstimatorSpec, got {type(spec).__name__}")
    if spec.run is None and name not in ("hutchinson", "gauss_newton"):
        raise ValueError(f"register_estimator({name!r}): run=None means the probe loop's sampling, which exists "
                         "for 'hutchinson' and 'gauss_newton' only; give run= (a data-once estimator)")
    return ESTIMATOR_REGISTRY.register(name, spec)


for _name, _spec in (
        ("hutchinson", EstimatorSpec(None, progress=True)),  # Rademacher probes, HVPs: probe_loop.py
        ("gauss_newton", EstimatorSpec(None, progress=True)),  # labels sampled from the model: probe_loop.py
        ("squared_grad", EstimatorSpec(lambda m, lo, b, sp, c, *, variance, progress, exact_max_numel:
                                       squared_grad(m, lo, b, sp, c, variance=variance))),
        ("fisher", EstimatorSpec(lambda m, lo, b, sp, c, *, variance, progress, exact_max_numel:
                                 fisher(m, lo, b, sp, progress, c, variance=variance), progress=True)),
        ("grad_abs", EstimatorSpec(lambda m, lo, b, sp, c, *, variance, progress, exact_max_numel:
                                   grad_abs(m, lo, b, sp, c, variance=variance), stochastic=False)),
        ("exact", EstimatorSpec(lambda m, lo, b, sp, c, *, variance, progress, exact_max_numel:
                                exact(m, lo, b, sp, exact_max_numel, c, variance=variance), stochastic=False))):
    register_estimator(_name, _spec)
del _name, _spec
