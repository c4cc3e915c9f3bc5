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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from ..data import as_batches, batch_size, make_loss, n_points, slice_batch
from ..errors import check_finite
from ..registry import Registry
from ..update.rules import summed_gradient
from . import Selection, as_selection, resolve_k, select
from ..space import ParamSpace

__all__ = ["STRATEGIES", "HESSIAN_STRATEGIES", "CONTEXT", "STRATEGY_REGISTRY", "Strategy", "register_strategy",
           "parameter_scores", "select_parameters", "last_layer_indices", "strategy_arguments"]

# hessian_ratio's floor on the training-loss diagonal, relative to its positive mean (module docstring)
RATIO_FLOOR = 1e-2
# ssd_floor's floor on the training data's Fisher diagonal, relative to its mean (parameter_scores' docstring)
SSD_FLOOR = 1e-2


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
def strategy_arguments(strategy: str, *, scores: bool = False) -> Tuple[str, ...]:
    """The keyword arguments of :func:`select_parameters` that ``strategy`` reads (besides ``budget`` and ``space``,
    which every strategy reads), with ``scores=True`` when a precomputed score vector is passed. Any other one is a
    ValueError there. ``parameter_scores`` reads the same minus ``scores`` / ``last_layer_prefix`` (and ``seed``
    for ``random``), plus hessian_diag's keyword arguments for the hessian strategies."""
    check_strategy(strategy)  # (its hints: 'fisher' is now 'ssd')
    entry = STRATEGY_REGISTRY[strategy]
    if entry.score is None:
        return entry.select_reads
    own = ("scores",) + entry.select_reads
    return own if scores else own + tuple(a for a in entry.reads if a != "hessian_kw")


def _check_passed(fn: str, strategy: str, passed: Dict[str, Any], reads: Tuple[str, ...], scores: bool) -> None:
    for name in passed:
        if name in reads or name in CONTEXT:  # the request's context: accepted by every strategy
            continue
        if scores and name in STRATEGY_REGISTRY[strategy].reads:
            raise ValueError(f"{fn}: {name} does not apply when scores= is given (no estimate is made)")
        users = [s for s in STRATEGY_REGISTRY if name in STRATEGY_REGISTRY[s].reads or name in strategy_arguments(s)]
        label = "hessian_diag keyword arguments" if name == "hessian_kw" else name
        raise ValueError(f"{fn}: {label} does not apply to strategy {strategy!r}; it is read by "
                         f"{', '.join(map(repr, users))}")


def check_strategy(strategy) -> None:
    if strategy not in STRATEGY_REGISTRY:
        hint = " ('fisher' is now called 'ssd')" if strategy == "fisher" else ""
        raise ValueError(f"unknown selection strategy {strategy!r}{hint}; choose one of {STRATEGY_REGISTRY.names()}")


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
    * ssd_floor: F_Z / max(F_D, f) with f = ``SSD_FLOOR`` × mean(F_D), the same Fishers as ssd: ssd with
      hessian_ratio's floor. ssd's ratio is unbounded where F_D ≈ 0 (on an untied input embedding, the rows of
      tokens only the secrets contain), and the top-k then sits on a few such rows; the floor ranks those rows by
      F_Z like any coordinate the training data barely uses (docs/forget.md, "The fixture matrix").

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
    entry = STRATEGY_REGISTRY[strategy]
    passed = _passed(loss_fn=loss_fn, seed=seed, n_probes=n_probes, estimator=estimator, fisher_points=fisher_points,
                     data=data, affected=affected, corrected=corrected, group=group)
    if hessian_kw:
        passed["hessian_kw"] = hessian_kw
    _check_passed("parameter_scores", strategy, passed, entry.reads, scores=False)
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
    if entry.score is None:
        cost["wall_time_s"] = time.perf_counter() - t0
        return None, cost
    from ..curvature import hessian

    ctx = ScoreContext(strategy=strategy, model=model, space=space, loss=make_loss(loss_fn), data=data,
                       affected=affected, corrected=corrected, group=group, estimator=estimator, seed=seed,
                       n_probes=_value(n_probes), fisher_points=fisher_points, hessian_kw=hessian_kw,
                       estimate_kw={name: passed[name] for name in ("n_probes", "seed", "group") if name in passed},
                       cost=cost)
    # group_points: gradients already counted over the group (added after the per-rank counts are summed)
    scores, group_points = entry.score(ctx)
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
    from ..curvature import hessian

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
    entry = STRATEGY_REGISTRY[strategy]

    def get_scores() -> torch.Tensor:
        s = scores if scores is not None else parameter_scores(model, strategy, space=space, **estimate)[0]
        s = s.reshape(-1).to(torch.float32)
        if s.numel() != space.numel:
            raise ValueError(f"scores have {s.numel()} entries, the model has {space.numel} parameters")
        return s

    if entry.select is not None:
        return entry.select(SelectRequest(model=model, space=space, k=k, seed=_value(seed),
                                          last_layer_prefix=last_layer_prefix), get_scores)
    return select(get_scores(), k=k, largest=entry.largest, space=space)


# ============================================================================================ the registry
@dataclass
class ScoreContext:
    """What a strategy's score function reads: the request (``model``, ``space``, ``loss``, the data arguments as
    passed, ``group``), the knobs (``estimator``, ``seed``, ``n_probes``, ``fisher_points``, ``hessian_kw``;
    ``estimate_kw``: those of n_probes / seed / group that were passed, for hessian_diag) and ``cost``, the counters
    it adds its gradients and HVPs to."""

    strategy: str
    model: Any
    space: ParamSpace
    loss: Any
    data: Any
    affected: Any
    corrected: Any
    group: Any
    estimator: str
    seed: int
    n_probes: int
    fisher_points: Optional[int]
    hessian_kw: Dict[str, Any]
    estimate_kw: Dict[str, Any]
    cost: Dict[str, Any]

    def need(self, x, what: str):
        """``x`` as re-iterable batches; ValueError naming it when it was not given."""
        if x is None:
            raise ValueError(f"strategy {self.strategy!r} needs {what}")
        return as_batches(x, passes="many", what=what)

    def curvature(self, batches) -> torch.Tensor:
        """diag(H) of the loss on ``batches`` (``hessian_diag`` with the request's estimator and knobs), flat
        float32 [N]; its cost added to ``cost``."""
        from ..curvature.hessian import hessian_diag

        est = hessian_diag(self.model, self.loss, batches, estimator=self.estimator, space=self.space,
                           **self.estimate_kw, **self.hessian_kw)
        if self.estimator in ("hutchinson", "gauss_newton"):
            self.cost["n_hvps"] += int(getattr(est, "n_probes", self.n_probes)) * n_points(batches)
        else:
            self.cost["n_gradients"] += n_points(batches)
        return est.mean.reshape(-1).to(torch.float32)


@dataclass
class SelectRequest:
    """What a strategy's own ``select`` reads: the model, its space, k (from the budget rule), seed and
    last_layer_prefix."""

    model: Any
    space: ParamSpace
    k: int
    seed: Any  # as passed (read only by the strategies that read it)
    last_layer_prefix: Optional[str]


@dataclass(frozen=True)
class Strategy:
    """One selection strategy.

    * ``reads``: the arguments ``parameter_scores`` reads for it (context names from ``CONTEXT`` and knobs;
      "hessian_kw" = hessian_diag's keyword arguments); any other knob passed is a ValueError;
    * ``score(ctx: ScoreContext) -> (scores, group_points)``: the flat float32 [N] scores and the gradients already
      counted over the group (0 unless it sums a gradient itself); None: the strategy ranks no scores;
    * ``largest``: select the k largest scores (False: the k smallest);
    * ``select(req: SelectRequest, get_scores) -> Selection``: a selection of its own (``get_scores()`` computes
      or checks the scores only when called), and ``select_reads``, the extra knobs it reads;
    * ``hessian``: it ranks by a hessian_diag estimate (listed in ``HESSIAN_STRATEGIES``).
    """

    reads: Tuple[str, ...] = ()
    score: Optional[Callable[[ScoreContext], Tuple[torch.Tensor, int]]] = None
    largest: bool = True
    select: Optional[Callable[[SelectRequest, Callable[[], torch.Tensor]], Selection]] = None
    select_reads: Tuple[str, ...] = ()
    hessian: bool = False
    doc: str = field(default="", compare=False)


STRATEGY_REGISTRY = Registry("selection strategy")


def register_strategy(name: str, strategy: Strategy) -> Strategy:
    """Add a strategy (docs/layout.md); ``select_parameters(model, name, ...)`` and ``parameter_scores`` then run
    it. Raises ValueError for a name already registered."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"register_strategy: expected a sapsel_kernels.strategies.Strategy, got "
                        f"{type(strategy).__name__}")
    return STRATEGY_REGISTRY.register(name, strategy)


_DATA = "data (the training data)"


def _training_curvature(ctx: ScoreContext):
    return ctx.curvature(ctx.need(ctx.data, _DATA)), 0


def _affected_curvature(ctx: ScoreContext):
    return ctx.curvature(ctx.need(ctx.affected, "affected")), 0


def _corrected_curvature(ctx: ScoreContext):
    return ctx.curvature(ctx.need(ctx.corrected, "corrected")), 0


def _curvature_ratio(ctx: ScoreContext):
    bz, bd = ctx.need(ctx.affected, "affected"), ctx.need(ctx.data, _DATA)  # both checked before the first estimate
    hz = ctx.curvature(bz)
    hd = ctx.curvature(bd)
    floor = RATIO_FLOOR * float(hd.clamp(min=0).mean()) + torch.finfo(hd.dtype).tiny
    return hz.clamp_(min=0).div_(hd.clamp_(min=floor)), 0


def _flat_curvature(ctx: ScoreContext):
    bd = ctx.need(ctx.data, _DATA)
    touched_by = ctx.need(ctx.affected, "affected")  # both checked before the estimate
    flat = ctx.curvature(bd).abs_()
    g, group_points = _mean_gradient(ctx.model, ctx.space, ctx.loss, touched_by, ctx.group, ctx.strategy)
    below = -(2.0 * float(flat.max()) + 1.0) if flat.numel() else -1.0  # under every touched coordinate
    scores = torch.where(g.to(flat.device) != 0, flat.neg(), torch.full_like(flat, below))
    return scores, group_points


def _saliency(ctx: ScoreContext):
    g, group_points = _mean_gradient(ctx.model, ctx.space, ctx.loss, ctx.need(ctx.affected, "affected"), ctx.group,
                                     ctx.strategy)
    return g.abs_(), group_points


def _fishers(ctx: ScoreContext):
    """ssd's two empirical Fisher diagonals [N]: on Z, and on ``fisher_points`` points of D drawn with ``seed``."""
    from ..curvature.hessian import hessian_diag

    bz = ctx.need(ctx.affected, "affected")
    bd = ctx.need(ctx.data, _DATA)
    bd, nd = _subsample_points(bd, ctx.fisher_points, ctx.seed)
    kw = dict(estimator="fisher", space=ctx.space, group=ctx.group)
    fz = hessian_diag(ctx.model, ctx.loss, bz, **kw).mean.reshape(-1)
    fd = hessian_diag(ctx.model, ctx.loss, bd, **kw).mean.reshape(-1)
    ctx.cost["n_gradients"] = n_points(bz) + nd
    return fz, fd


def _ssd(ctx: ScoreContext):
    fz, fd = _fishers(ctx)
    return (fz / (fd + 1e-12 * float(fd.mean()) + torch.finfo(fd.dtype).tiny)).to(torch.float32), 0


def _ssd_floor(ctx: ScoreContext):
    fz, fd = _fishers(ctx)
    floor = SSD_FLOOR * float(fd.mean()) + torch.finfo(fd.dtype).tiny
    return (fz / fd.clamp(min=floor)).to(torch.float32), 0


def _select_all(req: SelectRequest, get_scores) -> Selection:
    return as_selection(torch.arange(req.space.numel, device=req.space.device), req.space)


def _select_random(req: SelectRequest, get_scores) -> Selection:
    g = torch.Generator().manual_seed(int(req.seed))
    return as_selection(torch.randperm(req.space.numel, generator=g)[:req.k].to(req.space.device), req.space)


def _select_last_layer(req: SelectRequest, get_scores) -> Selection:
    ll = last_layer_indices(req.space, req.last_layer_prefix, model=req.model)
    if req.k >= ll.numel():
        return as_selection(ll, req.space)
    scores = get_scores()
    local = select(scores[ll.to(scores.device)], k=req.k, largest=True).indices  # top-k among the layer's own
    return as_selection(ll[local.to(ll.device)], req.space)


_EST = ("data",) + _ESTIMATE
for _name, _entry in (
        ("hessian", Strategy(_EST, _training_curvature, hessian=True)),
        ("hessian_smallest", Strategy(_EST, _training_curvature, largest=False, hessian=True)),
        ("hessian_affected", Strategy(("affected",) + _ESTIMATE, _affected_curvature, hessian=True)),
        ("hessian_corrected", Strategy(("corrected",) + _ESTIMATE, _corrected_curvature, hessian=True)),
        ("hessian_ratio", Strategy(("affected", "data") + _ESTIMATE, _curvature_ratio, hessian=True)),
        ("all", Strategy(select=_select_all)),
        ("last_layer", Strategy(_EST, _training_curvature, select=_select_last_layer,
                                select_reads=("last_layer_prefix",), hessian=True)),
        ("random", Strategy(select=_select_random, select_reads=("seed",))),
        ("grad_abs", Strategy(("loss_fn", "affected", "group"), _saliency)),
        ("ssd", Strategy(("loss_fn", "affected", "data", "fisher_points", "seed", "group"), _ssd)),
        ("hessian_flat", Strategy(("affected", "data") + _ESTIMATE, _flat_curvature, hessian=True)),
        ("ssd_floor", Strategy(("loss_fn", "affected", "data", "fisher_points", "seed", "group"), _ssd_floor))):
    register_strategy(_name, _entry)
del _name, _entry

# the built-in strategies, in registration order (a strategy registered later is in STRATEGY_REGISTRY)
STRATEGIES = STRATEGY_REGISTRY.names()
# the strategies that rank by a hessian_diag estimate (and accept its keyword arguments)
HESSIAN_STRATEGIES = tuple(n for n in STRATEGIES if STRATEGY_REGISTRY[n].hessian)
