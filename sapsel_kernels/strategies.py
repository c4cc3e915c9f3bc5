"""Selection strategies: which k parameters ``unlearn`` may change, for every strategy of the comparison.

``parameter_scores`` computes the flat score vector a strategy ranks by (and its cost); ``select_parameters`` turns
it into a :class:`~sapsel_kernels.selection.Selection` of k coordinates, k from the package's one budget rule
(:func:`~sapsel_kernels.selection.resolve_k`: a float budget is a fraction, k = ceil(fraction · N); an int is k).
One score estimate serves every budget: pass it back as ``select_parameters(..., scores=...)``.

Scores are computed in the estimation mode of ``hessian_diag`` (eval mode, math attention), restored afterwards.

Applicability. The request's *context*, ``CONTEXT`` = loss_fn, data, affected, corrected, seed and group, is
accepted by every strategy, which reads what it needs (a loop ``for s in STRATEGIES: select_parameters(model, s,
0.05, loss_fn=f, data=d, affected=z, corrected=zt)`` runs as written); a strategy that needs a context argument
that is missing raises naming it. A strategy-specific *knob* (n_probes, estimator, fisher_points,
last_layer_prefix, hessian_diag's keyword arguments) that the chosen strategy does not read is a ValueError naming
it and the strategies that read it (``strategy_arguments`` lists them per strategy), never a silent no-op. A knob
counts as *passed* when it is given at all, even with its default value (the defaults are sentinels that print as the
documented values), except that None for ``scores`` and ``last_layer_prefix`` means "not given". With ``scores=``
no estimate is made, so every estimation knob is then an error. Applicability follows the strategy, not the budget:
``last_layer`` reads its estimation knobs although a budget of at least the layer size selects the whole layer
without an estimate.
"""

import numbers
import time
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .data import as_batches, batch_size, make_loss, n_points, slice_batch
from .errors import check_finite
from .rules import summed_gradient
from .selection import Selection, as_selection, resolve_k, select
from .space import ParamSpace

__all__ = ["STRATEGIES", "HESSIAN_STRATEGIES", "CONTEXT", "parameter_scores", "select_parameters", "last_layer_indices",
           "strategy_arguments"]

STRATEGIES = ("hessian", "hessian_smallest", "hessian_affected", "hessian_corrected", "hessian_ratio", "all",
              "last_layer", "random", "grad_abs", "ssd", "hessian_flat")
# the strategies that rank by a hessian_diag estimate (and accept its keyword arguments)
HESSIAN_STRATEGIES = ("hessian", "hessian_smallest", "last_layer", "hessian_affected", "hessian_corrected",
                      "hessian_ratio", "hessian_flat")
# hessian_ratio's floor on the training-loss diagonal, relative to its positive mean (module docstring)
RATIO_FLOOR = 1e-2


class _Default:
    """The default of a keyword argument, told apart from the same value passed explicitly (see the module
    docstring: a knob the strategy does not read is an error whenever it is passed). Prints as the value, so
    signatures and help() show the documented defaults."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _value(v):
    return v.value if isinstance(v, _Default) else v


_NONE_MEANS_UNSET = ("data", "affected", "corrected", "scores", "last_layer_prefix", "group")


def _passed(**args) -> Dict[str, Any]:
    """The arguments among ``args`` that the caller passed: not a default sentinel (and not None where None means
    "not given")."""
    return {name: v for name, v in args.items()
            if not isinstance(v, _Default) and not (v is None and name in _NONE_MEANS_UNSET)}


# The request's context: every strategy accepts these and reads what it needs (module docstring).
CONTEXT = ("loss_fn", "data", "affected", "corrected", "seed", "group")
# What parameter_scores reads per strategy ("hessian_kw": hessian_diag's extra keyword arguments).
_ESTIMATE = ("loss_fn", "seed", "n_probes", "estimator", "hessian_kw", "group")
_SCORE_ARGS: Dict[str, Tuple[str, ...]] = {
    "hessian": ("data",) + _ESTIMATE, "hessian_smallest": ("data",) + _ESTIMATE, "last_layer": ("data",) + _ESTIMATE,
    "hessian_affected": ("affected",) + _ESTIMATE, "hessian_corrected": ("corrected",) + _ESTIMATE,
    "hessian_ratio": ("affected", "data") + _ESTIMATE, "hessian_flat": ("affected", "data") + _ESTIMATE,
    "grad_abs": ("loss_fn", "affected", "group"),
    "ssd": ("loss_fn", "affected", "data", "fisher_points", "seed", "group"),
    "all": (), "random": (),
}


def strategy_arguments(strategy: str, *, scores: bool = False) -> Tuple[str, ...]:
    """The keyword arguments of :func:`select_parameters` that ``strategy`` reads (besides ``budget`` and ``space``,
    which every strategy reads), with ``scores=True`` when a precomputed score vector is passed. Any other one is a
    ValueError there. ``parameter_scores`` reads the same minus ``scores`` / ``last_layer_prefix`` (and ``seed``
    for ``random``), plus hessian_diag's keyword arguments for the hessian strategies."""
    check_strategy(strategy)
    if strategy == "all":
        return ()
    if strategy == "random":
        return ("seed",)
    own = ("scores",) + (("last_layer_prefix",) if strategy == "last_layer" else ())
    return own if scores else own + tuple(a for a in _SCORE_ARGS[strategy] if a != "hessian_kw")


def _check_passed(fn: str, strategy: str, passed: Dict[str, Any], reads: Tuple[str, ...], scores: bool) -> None:
    for name in passed:
        if name in reads or name in CONTEXT:  # the request's context: accepted by every strategy
            continue
        if scores and name in _SCORE_ARGS[strategy]:
            raise ValueError(f"{fn}: {name} does not apply when scores= is given (no estimate is made)")
        users = [s for s in STRATEGIES if name in _SCORE_ARGS[s] or name in strategy_arguments(s)]
        label = "hessian_diag keyword arguments" if name == "hessian_kw" else name
        raise ValueError(f"{fn}: {label} does not apply to strategy {strategy!r}; it is read by "
                         f"{', '.join(map(repr, users))}")


def check_strategy(strategy) -> None:
    if strategy not in STRATEGIES:
        hint = " ('fisher' is now called 'ssd')" if strategy == "fisher" else ""
        raise ValueError(f"unknown selection strategy {strategy!r}{hint}; choose one of {STRATEGIES}")


def _output_head(model, space: ParamSpace) -> Optional[torch.Tensor]:
    """Flat indices of the model's output head when it declares one (Hugging Face ``get_output_embeddings()``), by
    tensor identity: with tied embeddings the head's weight IS the input embedding, which ``named_parameters``
    lists once, under the embedding's name (GPT-2: ``transformer.wte.weight``), so the last-named parameter
    (``ln_f``) is not the last layer. None when the model declares no head or its tensors are not in ``space``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module):
        return None
    pos = {id(p): i for i, p in enumerate(space.params)}
    parts = [torch.arange(space.offsets[pos[id(p)]], space.offsets[pos[id(p)]] + p.numel(), dtype=torch.int64)
             for p in head.parameters(recurse=False) if id(p) in pos]
    if not parts:
        return None
    return torch.sort(torch.cat(parts)).values.to(space.device)


def last_layer_indices(space: ParamSpace, prefix: Optional[str] = None, model=None) -> torch.Tensor:
    """Flat int64 indices (ascending, on ``space.device``) of the last layer: the output head that ``model``
    declares (``get_output_embeddings()``, Hugging Face; tied embeddings included), else every parameter whose module
    prefix (the name up to the last '.') equals the last parameter's, e.g. ``fc.weight`` and ``fc.bias`` (or
    ``prefix`` when given: it wins over the declared head). Raises ValueError when no parameter belongs to that
    layer. Memory: the layer's size in int64."""
    if prefix is None and model is not None:
        head = _output_head(model, space)
        if head is not None:
            return head
    if prefix is None:
        prefix = space.names[-1].rsplit(".", 1)[0] if "." in space.names[-1] else space.names[-1]
    parts = []
    for name, off, n in zip(space.names, space.offsets, space.numels):
        if name == prefix or name.rsplit(".", 1)[0] == prefix:
            parts.append(torch.arange(off, off + n, dtype=torch.int64))
    if not parts:
        raise ValueError(f"no parameter belongs to layer {prefix!r}")
    return torch.cat(parts).to(space.device)


def _subsample_points(batches, max_points: Optional[int], seed: int):
    """At most ``max_points`` points of ``batches`` drawn uniformly without replacement (``seed``), as a list of
    sub-batches (one per source batch that keeps a point, points in their original order); all of them when
    ``max_points`` is None or not smaller than the number of points."""
    sizes = [batch_size(b) for b in batches]
    total = sum(sizes)
    if max_points is None or total <= max_points:
        return batches, total
    g = torch.Generator().manual_seed(int(seed))
    keep = torch.sort(torch.randperm(total, generator=g)[:max_points]).values
    out, off = [], 0
    for b, n in zip(batches, sizes):
        local = keep[(keep >= off) & (keep < off + n)] - off
        if local.numel():
            out.append(slice_batch(b, local))
        off += n
    return out, int(keep.numel())


def parameter_scores(model, strategy: str, *, loss_fn=_Default(None), data=None, affected=None, corrected=None,
                     seed: int = _Default(0), n_probes: int = _Default(32), estimator: str = _Default("hutchinson"),
                     fisher_points: Optional[int] = _Default(512), space: Optional[ParamSpace] = None,
                     group=None, **hessian_kw) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
    """The flat float32 score vector [N] a score-based strategy ranks by (None for ``all`` / ``random``), and its
    cost ``{"wall_time_s", "n_gradients", "n_hvps"}`` (per-point counts, as in UnlearnReport).

    * hessian / hessian_smallest / last_layer: diag of the training-loss Hessian at θ* on ``data``
      (``hessian_diag(..., estimator=estimator, n_probes=n_probes, seed=seed, **hessian_kw)``);
    * hessian_affected / hessian_corrected: the same on Z (``affected``) / Z̃ (``corrected``);
    * hessian_ratio: max(diag H_Z, 0) / max(diag H_D, f), the curvature of the loss on Z over the curvature of the
      training loss (both estimated as above, with the same probes' seed), with the floor f = ``RATIO_FLOOR`` × the
      mean of max(diag H_D, 0): near θ* moving coordinate i by δ costs about ½·H_D,ii·δ² of training loss, so this
      ranks by what a move does to Z per unit of what it costs the rest (the floor keeps estimator noise around 0
      in the denominator from deciding the ranking; the Hessian counterpart of ssd's Fisher ratio);
    * hessian_flat (the "flat" reading of the paper's selection): −|diag H_D| on the coordinates where the mean
      gradient of the loss on Z is not exactly 0 (the coordinates Z touches), and a value below every one of those
      elsewhere: the k flattest coordinates of the training loss among those Z moves. On a language model the
      untouched ones are, e.g., embedding rows of tokens Z does not contain; on a CNN nearly every coordinate is
      touched. Costs the training-loss estimate plus one gradient over Z;
    * grad_abs (SalUn): |∇L_mean(Z)|, the magnitude of the mean gradient over the affected points;
    * ssd (Selective Synaptic Dampening's importance ratio): F_Z / (F_D + 1e-12·mean(F_D)), with F the diagonal
      EMPIRICAL Fisher (mean over points of the squared per-point gradient, ``hessian_diag(estimator="fisher")``)
      on Z and on the training data D (``fisher_points`` points of it drawn with ``seed``; None = all):
      parameters specialised to Z.

    ``loss_fn`` (default None: the model's own ``.loss``): anything ``data.make_loss`` accepts; data arguments follow
    the batch rule (``data.as_batches``). Defaults: ``seed=0``, ``n_probes=32``, ``estimator="hutchinson"``,
    ``fisher_points=512``; the hessian strategies hand ``seed`` / ``n_probes`` / ``hessian_kw`` to ``hessian_diag``
    only when they are passed (so its own applicability rules judge them for the estimator).
    ``group`` (a torch.distributed ProcessGroup; collective): every rank passes the same replicated model and its
    OWN shard of the data; the scores, the same on every rank, are those of the concatenated data (the hessian
    strategies and ssd through ``hessian_diag(group=)``, with ``fisher_points`` drawn from each rank's shard;
    grad_abs sums the gradient and the point count over the ranks: N values in one all_reduce); the cost counts are
    the group's. FSDP2-sharded models raise NotImplementedError here (use ``hessian_diag`` and
    ``select(..., group=)``, which shard the scores).
    Raises ValueError for an unknown strategy, missing inputs or a knob the strategy does not read (module
    docstring; ``all`` / ``random`` read none), NonFiniteError for NaN/Inf scores.
    Peak extra memory: the [N] score vector plus the estimator's own (hessian_diag: about 2N float32 accumulators and
    probe buffers; hessian_ratio and ssd: two of those in turn, plus one [N] vector; grad_abs: one [N] accumulator
    and one backward's gradients).
    """
    check_strategy(strategy)
    passed = _passed(loss_fn=loss_fn, seed=seed, n_probes=n_probes, estimator=estimator, fisher_points=fisher_points,
                     data=data, affected=affected, corrected=corrected, group=group)
    if hessian_kw:
        passed["hessian_kw"] = hessian_kw
    _check_passed("parameter_scores", strategy, passed, _SCORE_ARGS[strategy], scores=False)
    loss_fn, seed, estimator, fisher_points = _value(loss_fn), _value(seed), _value(estimator), _value(fisher_points)
    space = space or ParamSpace(model)
    space.check_belongs_to(model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model,
                           "select_parameters / parameter_scores")
    from .distributed import is_dtensor

    if any(is_dtensor(p) for p in space.params):
        raise NotImplementedError("parameter_scores / select_parameters: FSDP2 (fully_shard) models hold sharded "
                                  "parameters; estimate with sk.hessian_diag(model, loss, data, 'squared_grad' | "
                                  "'grad_abs' | 'gauss_newton') and rank with sk.select(est.mean, ..., "
                                  "space=est.space, group=...), which keep the scores sharded")
    t0 = time.perf_counter()
    cost = {"n_gradients": 0, "n_hvps": 0}
    group_points = 0  # gradients already counted over the group (added after the per-rank counts are summed)
    if strategy in ("all", "random"):
        cost["wall_time_s"] = time.perf_counter() - t0
        return None, cost

    def need(x, what):
        if x is None:
            raise ValueError(f"strategy {strategy!r} needs {what}")
        return as_batches(x, passes="many", what=what)

    from . import hessian

    loss = make_loss(loss_fn)
    if strategy in HESSIAN_STRATEGIES:
        src = {"hessian_affected": [(affected, "affected")], "hessian_corrected": [(corrected, "corrected")],
               "hessian_ratio": [(affected, "affected"), (data, "data (the training data)")]}.get(
            strategy, [(data, "data (the training data)")])
        sources = [need(*x) for x in src]  # every input checked before the first estimate
        touched_by = need(affected, "affected") if strategy == "hessian_flat" else None
        kw = {name: passed[name] for name in ("n_probes", "seed", "group") if name in passed}
        diags = []
        for batches in sources:
            est = hessian.hessian_diag(model, loss, batches, estimator=estimator, space=space, **kw, **hessian_kw)
            diags.append(est.mean.reshape(-1).to(torch.float32))
            if estimator in ("hutchinson", "gauss_newton"):
                cost["n_hvps"] += int(getattr(est, "n_probes", _value(n_probes))) * n_points(batches)
            else:
                cost["n_gradients"] += n_points(batches)
            del est
        if strategy == "hessian_ratio":
            hz, hd = diags
            floor = RATIO_FLOOR * float(hd.clamp(min=0).mean()) + torch.finfo(hd.dtype).tiny
            scores = hz.clamp_(min=0).div_(hd.clamp_(min=floor))
        elif strategy == "hessian_flat":
            flat = diags[0].abs_()
            g, group_points = _mean_gradient(model, space, loss, touched_by, group, strategy)
            below = -(2.0 * float(flat.max()) + 1.0) if flat.numel() else -1.0  # under every touched coordinate
            scores = torch.where(g.to(flat.device) != 0, flat.neg(), torch.full_like(flat, below))
            del g, flat
        else:
            (scores,) = diags
    elif strategy == "grad_abs":
        g, group_points = _mean_gradient(model, space, loss, need(affected, "affected"), group, strategy)
        scores = g.abs_()
    elif strategy == "ssd":
        bz = need(affected, "affected")
        bd = need(data, "data (the training data)")
        bd, nd = _subsample_points(bd, fisher_points, seed)
        fz = hessian.hessian_diag(model, loss, bz, estimator="fisher", space=space, group=group).mean.reshape(-1)
        fd = hessian.hessian_diag(model, loss, bd, estimator="fisher", space=space, group=group).mean.reshape(-1)
        scores = (fz / (fd + 1e-12 * float(fd.mean()) + torch.finfo(fd.dtype).tiny)).to(torch.float32)
        cost["n_gradients"] = n_points(bz) + nd
    else:  # a name added to STRATEGIES without its branch here: never fall through to another strategy
        raise NotImplementedError(f"parameter_scores: strategy {strategy!r} is listed in STRATEGIES but has no "
                                  "implementation")
    if group is not None:  # the group's cost
        comm = hessian.comm_for(group)
        comm.device = space.device
        _, totals = comm.run(lambda: (None, (cost["n_gradients"], cost["n_hvps"])), "parameter_scores", n_counts=2)
        cost["n_gradients"], cost["n_hvps"] = totals
    cost["n_gradients"] += group_points
    if scores.numel() != space.numel:
        raise ValueError(f"score vector has {scores.numel()} entries, the model has {space.numel}")
    check_finite(scores, f"strategy {strategy!r}: the scores", space=space, suffix="they cannot be ranked")
    cost["wall_time_s"] = time.perf_counter() - t0
    return scores, cost


def _mean_gradient(model, space: ParamSpace, loss, batches, group, strategy: str) -> Tuple[torch.Tensor, int]:
    """∇L_mean over ``batches`` (under ``group``: over every rank's points), flat float32 [N], and the point count,
    in estimation mode. One [N] accumulator plus one backward's gradients."""
    from . import hessian

    comm = hessian.comm_for(group)
    comm.device = space.device  # where the flag buffers go (CUDA for NCCL)
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def local():
        with hessian.estimation_mode(inner):
            g, n, _ = summed_gradient(space, inner, loss, batches, dtype=torch.float32)
        return g, (n,)

    g, (n,) = comm.run(local, f"parameter_scores(strategy={strategy!r})")
    comm.sum_([g])  # Σ over every rank's points (n: summed by run)
    return g.div_(n), n


def budget_k(budget, n: int) -> int:
    """THE budget rule (``resolve_k``): an int budget is k, a real one a fraction in (0, 1]; k >= 1 here."""
    if isinstance(budget, bool):
        raise TypeError("budget must be a fraction in (0, 1] or an int k, got a bool")
    if isinstance(budget, numbers.Integral):
        k = resolve_k(n, k=int(budget), what=" (budget)")
    elif isinstance(budget, numbers.Real):
        k = resolve_k(n, fraction=float(budget), what=" (budget)")
    else:
        raise TypeError(f"budget must be a fraction in (0, 1] or an int k, got {type(budget).__name__}")
    if k < 1:
        raise ValueError(f"budget k={k}: a strategy must select at least one of the {n} parameters")
    return k


def select_parameters(model, strategy: str = "hessian", budget: Union[int, float] = 0.01, *, loss_fn=_Default(None),
                      data=None, affected=None, corrected=None, seed: int = _Default(0),
                      scores: Optional[torch.Tensor] = None, last_layer_prefix: Optional[str] = None,
                      space: Optional[ParamSpace] = None, n_probes: int = _Default(32),
                      estimator: str = _Default("hutchinson"),
                      fisher_points: Optional[int] = _Default(512), group=None) -> Selection:
    """Build the parameter subset S for one strategy at budget k.

    Args:
        budget: a fraction in (0, 1] of the N trainable parameters (k = ceil(fraction · N), at least 1: the package's
            budget rule ``resolve_k``, the same k as ``select(fraction=...)``) or an int k in [1, N].
        strategy:
            * ``hessian`` (default): the k largest entries of diag(H) of the training loss at θ* (on ``data``);
            * ``hessian_smallest``: the k smallest (signed) entries of the same diagonal;
            * ``hessian_affected`` / ``hessian_corrected``: the k largest diag(H) of the loss on Z / on Z̃;
            * ``hessian_ratio``: the k largest max(diag H_Z, 0) / max(diag H_D, floor): curvature on Z per unit of
              training-loss curvature (see ``parameter_scores``; two estimates);
            * ``all``: every parameter (the budget is validated, then ignored: k = N);
            * ``last_layer``: the last layer's parameters (see ``last_layer_indices``); when k is smaller than the
              layer, its k largest diag(H) entries (training loss); when k is larger, the whole layer only
              (|S| = layer size < k: the only strategy that may return fewer than k);
            * ``random``: k uniformly random coordinates (``seed``): the control at the same size;
            * ``grad_abs``: SalUn's saliency, the k largest |∇L(Z)|;
            * ``ssd``: the k largest SSD importance ratios F_Z / F_D (see ``parameter_scores``);
            * ``hessian_flat``: the "flat" reading of the paper: the k smallest |diag H| of the training loss among
              the coordinates the gradient of the loss on Z touches (see ``parameter_scores``).
        scores: a precomputed score vector from ``parameter_scores`` for this strategy (skips the estimate, so one
            estimate serves several budgets; then no estimation argument applies).
        loss_fn (default None: the model's own loss), data, affected, corrected, n_probes (32), estimator
            ("hutchinson"), fisher_points (512), seed (0): handed to ``parameter_scores`` when passed; ``seed`` also
            draws ``random``'s coordinates. last_layer_prefix: ``last_layer`` only. group: a process group; every
            rank passes its own shard of the data and gets the same selection (see ``parameter_scores``).
        Which arguments each strategy reads: ``strategy_arguments(strategy)``; the context (``CONTEXT``) is accepted
        by every strategy, and passing another knob is a ValueError (the
        rule is in the module docstring).

    Returns:
        A Selection over the model's ParamSpace (int64 ascending indices on its device).

    Raises:
        ValueError (unknown strategy, missing inputs, a knob the strategy does not read, budget out of range),
        TypeError (budget type), NonFiniteError (NaN/Inf scores).

    Peak extra memory: ``parameter_scores``' (unless ``scores`` is given) plus O(k) for the ranking (``random``: a
    permutation of N int64).
    """
    check_strategy(strategy)
    estimate = _passed(loss_fn=loss_fn, seed=seed, n_probes=n_probes, estimator=estimator,
                       fisher_points=fisher_points, data=data, affected=affected, corrected=corrected, group=group)
    passed = {**estimate, **_passed(scores=scores, last_layer_prefix=last_layer_prefix)}
    _check_passed("select_parameters", strategy, passed, strategy_arguments(strategy, scores=scores is not None),
                  scores=scores is not None)
    space = space or ParamSpace(model)
    space.check_belongs_to(model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model,
                           "select_parameters / parameter_scores")
    k = budget_k(budget, space.numel)
    if strategy == "all":
        return as_selection(torch.arange(space.numel, device=space.device), space)
    if strategy == "random":
        g = torch.Generator().manual_seed(int(_value(seed)))
        return as_selection(torch.randperm(space.numel, generator=g)[:k].to(space.device), space)
    ll = None
    if strategy == "last_layer":
        ll = last_layer_indices(space, last_layer_prefix, model=model)
        if k >= ll.numel():
            return as_selection(ll, space)
    if scores is None:
        scores, _ = parameter_scores(model, strategy, space=space, **estimate)
    scores = scores.reshape(-1).to(torch.float32)
    if scores.numel() != space.numel:
        raise ValueError(f"scores have {scores.numel()} entries, the model has {space.numel} parameters")
    if ll is not None:
        # top-k among the layer's own scores, mapped back to flat indices
        local = select(scores[ll.to(scores.device)], k=k, largest=True).indices
        return as_selection(ll[local.to(ll.device)], space)
    return select(scores, k=k, largest=(strategy != "hessian_smallest"), space=space)
