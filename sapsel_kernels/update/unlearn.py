"""Feature/label unlearning restricted to a selected parameter subset S: ``unlearn`` and its report.

``unlearn`` applies one update rule of :mod:`sapsel_kernels.rules` (``FirstOrder``, ``SecondOrder``, ``DiagNewton``,
``SAMFinetune``, ``GradientAscent``; Warnecke et al., NDSS 2023) to the coordinates in S. This module owns what is
common to every rule:

* validation, before anything is computed: the method config, S (``selection.as_selection``: empty -> ValueError),
  the batches (``data.as_batches``), the loss (``data.make_loss``), Z and Z̃ of equal size, finite parameters;
* the estimation mode of ``hessian_diag`` (every module in eval mode, math attention; restored afterwards) unless
  ``estimation_mode=False``;
* the all-or-nothing write. The model's selected values (k numbers) and its buffers are snapshotted first; on ANY
  failure (NaN/Inf, an exception in the loss, Ctrl-C) both are restored, so the model is exactly as before. A direct
  rule's update is written into S with one ``index_copy_`` per parameter; an iterative rule moves S through the
  sparse optimizers, which never write outside S. Coordinates outside S are therefore never written, and the
  report's ``n_changed`` / ``delta_norm`` are computed on S alone.

Buffers (BatchNorm running statistics, ...) are bit-for-bit unchanged after every call, except after a successful
``sam_finetune`` / ``gradient_ascent`` with ``estimation_mode=False`` on a model in train mode: fine-tuning in train
mode updates running statistics, as training does.
"""

import contextlib
import hashlib
import numbers
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..data import as_batches, make_loss
from ..errors import check_finite
from ..curvature.hessian import check_agreement, comm_for, unwrap_model
from .rules import Coords, Problem, as_method, count_batches, norm_float64
from ..selection import as_selection
from ..space import ParamSpace

__all__ = ["unlearn", "UnlearnReport"]


@dataclass
class UnlearnReport:
    """What one ``unlearn`` call did and cost.

    ``n_gradients``: per-point loss gradients evaluated (a backward over a batch of b points counts b);
    ``n_hvps``: per-point Hessian-vector products (same counting); ``n_passes``: backward passes of any kind;
    ``delta_norm``: ‖θ_after − θ*‖₂ over S (the only coordinates that can change), accumulated in float64 from the
    values as stored (exact differences for float32 and narrower parameters; correct to float64 rounding);
    ``n_changed``: coordinates whose stored value changed; ``k``: size of S; ``numel``: N; ``info``: method-specific
    (G_S norm, CG iterations and residual, step size, damping, ...).
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
    patch: Any = field(default=None, repr=False, compare=False)  # a patch.Patch with return_patch=True

    def to_dict(self) -> Dict[str, Any]:
        """The report without the patch (save that with ``report.patch.save(path)``)."""
        return {k: v for k, v in asdict(replace(self, patch=None)).items() if k != "patch"}


# ====================================================================================================== snapshots
def _buffer_refs(model: torch.nn.Module) -> List[Tuple[torch.nn.Module, str, torch.Tensor]]:
    out = []
    for mod in model.modules():
        for name, b in mod.named_buffers(recurse=False):
            out.append((mod, name, b))
    return out


def _snapshot_buffers(model: torch.nn.Module):
    with torch.no_grad():
        return [(mod, name, b, b.detach().clone()) for mod, name, b in _buffer_refs(model)]


def _restore_buffers(saved) -> None:
    with torch.no_grad():
        for mod, name, ref, value in saved:
            if getattr(mod, name, None) is not ref:  # the module rebound the buffer: put the original back
                setattr(mod, name, ref)
            ref.copy_(value)


def _digest(*tensors: torch.Tensor) -> str:
    """sha1 of the tensors' bytes (O(k) for S's indices or θ_S): what the ranks of a group compare."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ====================================================================================================== unlearn
def unlearn(model: torch.nn.Module, loss_fn, affected, corrected, selection, method="first_order", *,
            train_data=None, n_train: Optional[int] = None, space: Optional[ParamSpace] = None,
            estimation_mode: bool = True, group=None, return_patch: bool = False) -> UnlearnReport:
    """Unlearn the affected points Z (replaced by their corrections Z̃) by updating only the coordinates in S.

    Args:
        model: trained at θ*; modified IN PLACE, on the coordinates in S only.
        loss_fn: ``loss_fn(model, batch) -> scalar MEAN loss of the batch``, a torch loss module, ``criterion(fn)``
            or None (the model's own ``.loss``): the package's loss rule (``data.make_loss``).
        affected, corrected: Z and Z̃ under the batch rule (one batch, or a list / DataLoader of batches), the same
            number of points. Iterative methods cycle through them, so they must be re-iterable (not a generator).
        selection: anything ``as_selection`` accepts (a Selection, flat int indices in any order, a bool mask flat or
            per parameter), or None for all parameters. Empty -> ValueError.
        method: a method config (``FirstOrder(tau=...)``, ``SecondOrder(...)``, ``DiagNewton(...)``,
            ``SAMFinetune(...)``, ``GradientAscent(...)``) or its name in ``rules.METHODS`` (the config with defaults).
        train_data: the corrected training data (batches; a subsample is fine) for second_order's Hessian and
            diag_newton's estimate (required by both; with ``DiagNewton(diag=...)`` it is optional and only counted,
            as the default of ``n_train``); its Hessian is rescaled to ``n_train`` points. It is read once to count
            its points and batches (the rule reuses the counts), then by the rule.
        n_train: number of training points the summed-loss Hessian represents (default: the points in train_data).
            ``train_data`` and ``n_train`` are the request's context, accepted by every method (so one call serves a
            loop over methods): second_order and diag_newton read them, the others never touch them, and a
            ``DiagNewton(diag=...)`` given both uses ``n_train`` and leaves train_data unread. What was not read is
            listed in ``report.info["unread"]``.
        space: the model's ParamSpace (built when None).
        estimation_mode: run in ``hessian_diag``'s estimation mode (eval mode for every module, math attention),
            restored afterwards. False: in the model's own mode (then iterative methods on a model in train mode
            update BatchNorm statistics like training does; direct methods restore them).
        return_patch: also return the change as a :class:`~sapsel_kernels.patch.Patch` (``report.patch``: the
            changed coordinates' indices, new and old values, and the weights fingerprints before and after; save it
            with ``report.patch.save(path)``, undo it with ``sk.revert_patch``). Costs two fingerprints (O(N)
            reductions) and O(k) memory.
        group: a torch.distributed ProcessGroup (e.g. ``dist.group.WORLD``) or None (one process). Given, the call
            is collective: every rank passes the same model (replicated, or wrapped in DistributedDataParallel: its
            ``.module`` is used, DDP's own hooks never run), selection and method, and its OWN shard of Z, Z̃ and
            train_data (at least one point each). Direct rules sum G_S and second_order's restricted Hessian
            products over the ranks (k values per all_reduce); diag_newton estimates with ``hessian_diag(group=)``;
            ``n_train`` defaults to the train points of every rank. Iterative rules average the gradient AT S over
            the ranks after each backward (k values; like DDP, one batch per rank per step, so equal shards give one
            process's step on the concatenated batch; targeted's NPO term stays per rank's batch), and the
            ``Targeted(monitor=)`` decisions are group rank 0's. The ranks first compare the method, the space, k
            and O(k) digests of S and θ_S; a disagreement, an empty shard or an error on any rank raises on every
            rank (that rank its own error, the others a ValueError naming it), each rank restoring its model. The
            report's counts are the group's. A DDP model with ``group=None`` raises ValueError.

    Returns:
        UnlearnReport.

    Raises:
        TypeError / ValueError before anything is computed: a bad method or config, mismatched Z/Z̃ sizes, an empty
        or invalid selection (IndexError out of range), missing train_data, a bad n_train, a one-shot iterator
        read several times.
        NonFiniteError (a ValueError): NaN/Inf in the parameters, G_S, the solve, an update or an iterate -- before
        anything is written (direct methods) or after a full restore (iterative methods). KeyboardInterrupt and any
        other exception propagate after the same restore; an interrupted ``hessian_diag`` inside diag_newton raises
        KeyboardInterrupt (its partial estimate is never used).

    Peak extra memory, in N (trainable parameters) and k (= |S|): O(k) kept by unlearn itself (S's indices, the
    snapshot of θ_S, G_S, the update; CG: 5 vectors of k) plus a copy of the buffers; transient, per backward, the
    gradient tensors autograd returns (N, parameter dtype) and for second_order one tangent and one product of N per
    HVP plus the cached first-order graphs (``cache_graph``); diag_newton without ``diag`` adds ``hessian_diag``'s
    accumulators (about 2N float32); iterative methods hold ``.grad`` (N) and the optimizer state (k to 3k). The
    report reads θ_S once more (k, the working dtype) and reduces in float64 chunks (at most 16 MiB of float64
    scratch and k bools; never a [k] float64 copy).
    """
    comm = comm_for(group)

    def prepare():
        nonlocal n_train
        n_train_given = n_train
        rule = as_method(method)
        if not isinstance(estimation_mode, bool):
            raise TypeError(f"estimation_mode must be a bool, got {type(estimation_mode).__name__}")
        if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, numbers.Integral)
                                    or n_train < 1):
            raise ValueError(f"n_train must be an int >= 1, got {n_train!r}")
        use = rule.train_use()
        # train_data and n_train are the request's context: every method accepts them and reads what it needs
        unread = [arg for arg, value in (("train_data", train_data), ("n_train", n_train))
                  if value is not None and (use is None or (arg == "train_data" and use == "n_train"
                                                            and n_train is not None))]
        inner, space_ = unwrap_model(model, space, "unlearn")
        if inner is not model and not comm.active:
            raise ValueError("unlearn: a DistributedDataParallel model needs group= (its process group, e.g. "
                             "torch.distributed.group.WORLD): each rank then passes its own shard of Z and Z̃; "
                             "without it the replicas would diverge")
        loss = make_loss(loss_fn)
        if selection is None:
            sel = as_selection(torch.arange(space_.numel, device=space_.device), space_)
        else:
            sel = as_selection(selection, space_, allow_empty=False)
        passes = "many" if rule.iterative else "once"
        z = as_batches(affected, passes=passes, what="affected")
        zt = as_batches(corrected, passes=passes, what="corrected")
        (nz, _), (nzt, _) = count_batches(z), count_batches(zt)
        if nz == 0 or nz != nzt:
            raise ValueError(f"affected ({nz} points) and corrected ({nzt} points) must be non-empty and of equal "
                             "size")
        train, train_points, train_batches = None, None, None
        if use == "hessian":
            if train_data is None:
                what = "the Hessian" if rule.name == "second_order" else "the Hessian diagonal (or give diag=)"
                raise ValueError(f"{rule.name} needs train_data (the corrected training data or a subsample) for "
                                 f"{what}")
            train = as_batches(train_data, passes="many", what="train_data")
            train_points, train_batches = count_batches(train)  # the one counting pass; the rule reuses the counts
            if train_points == 0:
                raise ValueError("train_data holds no points")
            n_train = int(n_train) if n_train is not None else train_points
        elif use == "n_train" and n_train is None:
            if train_data is None:
                raise ValueError(f"{rule.name} with diag= needs n_train (or train_data, whose points it counts)")
            n_train, _ = count_batches(as_batches(train_data, passes="once", what="train_data"))
            if n_train == 0:
                raise ValueError("train_data holds no points")
        with torch.no_grad():
            check_finite([p.detach() for p in space_.params], "unlearn: the model's parameters", space=space_,
                         suffix="the model was left untouched")
        coords = Coords(space_, sel)
        prob = Problem(model=inner, loss=loss, space=space_, coords=coords, affected=z, corrected=zt, train=train,
                       n_train=int(n_train) if n_train is not None else None, train_points=train_points,
                       train_batches=train_batches, comm=comm)
        rule.prepare(prob)
        if unread:
            prob.info["unread"] = unread  # context the method does not use (never iterated)
        desc = None
        if comm.active:  # what every rank must agree on (O(k) hashes of S and of θ_S), and its own counts
            desc = {"agree": {"method": repr(rule), "parameters": space_.numel, "space": space_.signature,
                              "k": coords.k, "selection": _digest(coords.indices),
                              "theta_S": _digest(*coords.snapshot()), "n_train": n_train_given},
                    "points": nz, "train_points": train_points, "n_train": n_train}
        return (rule, prob), desc

    (rule, prob), descs = comm.exchange(prepare, "unlearn")
    if comm.active:
        check_agreement(descs, "unlearn")
        comm.device = prob.space.device
        if prob.train_points is not None:
            prob.train_points_total = sum(d["train_points"] for d in descs)
        if descs[0]["agree"]["n_train"] is None and prob.n_train is not None:
            prob.n_train = sum(d["n_train"] for d in descs)  # default: the points of train_data on every rank
    coords, space = prob.coords, prob.space
    model = prob.model
    from ..curvature.modes import estimation_mode as _estimation_mode

    if not isinstance(return_patch, bool):
        raise TypeError(f"return_patch must be a bool, got {type(return_patch).__name__}")
    if return_patch and rule.iterative and not estimation_mode and any(
            b.is_floating_point() for b in model.buffers()):
        raise ValueError(f"return_patch=True with {rule.name} and estimation_mode=False: the model's buffers "
                         "(BatchNorm statistics) may change, and a patch holds parameters only; use "
                         "estimation_mode=True or sk.diff_patch on a copy")
    base_fp = space.fingerprint() if return_patch else None
    theta_s = coords.snapshot()  # k values in the parameters' dtypes: the restore is bit-exact
    old_s = coords.read()
    buffers = _snapshot_buffers(model)
    t0 = time.perf_counter()
    try:
        with _estimation_mode(model) if estimation_mode else contextlib.nullcontext():
            if rule.iterative:
                grads = [p.grad for p in space.params]  # the caller's .grad tensors, handed back untouched
                for p in space.params:
                    p.grad = None
                try:
                    rule.run(prob)
                finally:
                    for p, g in zip(space.params, grads):
                        p.grad = g
                coords.check_finite(coords.read(), f"unlearn: the {rule.name} iterate", suffix="the model was restored")
            else:
                delta = rule.delta(prob)
                coords.check_finite(delta, f"unlearn: the {rule.name} update")
                new_s = old_s + delta.to(old_s.dtype)
                coords.check_finite(new_s, f"unlearn: θ_S + the {rule.name} update")
                _restore_buffers(buffers)  # a direct rule never changes buffers, whatever mode the model is in
                coords.write(new_s)
    except BaseException:
        coords.restore(theta_s)
        _restore_buffers(buffers)
        raise
    wall = time.perf_counter() - t0
    if comm.active:  # the report's cost is the group's: every rank's gradients, HVPs and passes
        _, totals = comm.run(lambda: (None, (prob.counts["grad"], prob.counts["hvp"], prob.counts["passes"])),
                             "unlearn", n_counts=3)
        prob.counts.update(grad=totals[0], hvp=totals[1], passes=totals[2])
        prob.info["world_size"] = comm.world
    new = coords.read()  # [k] in coords.dtype, like old_s: the report below is O(k), no [k] float64 copy
    patch = None
    if return_patch:
        from .patch import patch_from_snapshot

        patch = patch_from_snapshot(space, coords.parts, theta_s, base_fp, info={"method": rule.name})
    return UnlearnReport(patch=patch, method=rule.name, k=coords.k, numel=space.numel, wall_time_s=wall,
                         n_gradients=prob.counts["grad"], n_hvps=prob.counts["hvp"], n_passes=prob.counts["passes"],
                         delta_norm=norm_float64(new, old_s), n_changed=int(torch.ne(new, old_s).sum()),
                         info=prob.info)
