"""The update rules of ``unlearn``: one frozen config per method, each computing its update on the selection S.

Notation (Warnecke et al., NDSS 2023): Z are the affected training points as trained on, Z̃ their corrected versions;
``G = Σ_{z∈Z̃} ∇ℓ(z, θ*) − Σ_{z∈Z} ∇ℓ(z, θ*)`` is a SUM over points (the loss returns the MEAN over a batch, so each
batch's gradient is multiplied by its number of points). Only G_S, the k selected entries, is ever stored.

* :class:`FirstOrder`:   θ_S ← θ_S − τ·G_S;
* :class:`SecondOrder`:  θ_S ← θ_S − (H_SS + λI)⁻¹ G_S, by conjugate gradient (:func:`~sapsel_kernels.solver.cg_solve`)
  on restricted Hessian-vector products. H is the Hessian of the SUMMED training loss (the scale of G):
  H = (n_train / n_h) · Σ_b |b| ∇²L_mean(b) over the given Hessian batches (n_h points). λ is on that summed scale
  (``damping / n_train`` is the equivalent damping of the mean-loss Hessian); default 0.01·n_train;
* :class:`DiagNewton`:   θ_S ← θ_S − G_S / (n_train · max(d_S, 0) + λ), d = the diagonal of the MEAN training-loss
  Hessian (``hessian_diag`` Hutchinson estimate unless given); negative estimates are clipped to 0;
* :class:`SAMFinetune`:  ``steps`` SparseSAM steps on S over the corrected batches (plus, optionally, retained
  training batches, one of each per step, cycled);
* :class:`GradientAscent`: ``steps`` SparseSGD steps on S minimising L_mean(Z̃) − L_mean(Z).

The first three are *direct* rules: :meth:`delta` returns the update Δ_S [k] and modifies nothing. The last two are
*iterative*: :meth:`run` moves θ_S in place through the sparse optimizers (which never write outside S). ``unlearn``
owns validation, the estimation mode, snapshots and the final write; these classes only compute.

``steps=0`` (iterative rules) and ``tau=0`` are valid no-ops: the model is left as it is and the report says
``n_changed == 0``.
"""

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..data import Loss, as_batches, batch_size
from ..errors import NonFiniteError, check_finite
from ..registry import Registry
from ..selection import Selection
from .solver import steihaug_cg
from ..space import ParamSpace, index_copy_flat

__all__ = ["FirstOrder", "SecondOrder", "DiagNewton", "SAMFinetune", "GradientAscent", "Targeted", "METHODS",
           "TRAIN_METHODS", "RULE_REGISTRY", "register_rule", "as_method", "Coords", "Problem", "summed_gradient",
           "count_batches", "norm_float64"]

METHODS = ("first_order", "second_order", "diag_newton", "sam_finetune", "gradient_ascent", "targeted")
TRAIN_METHODS = ("second_order", "diag_newton")  # the methods that read unlearn's train_data / n_train

# Elements per step of the float64 report reductions (norm_float64): 8 MiB of float64 scratch per temporary. Neither
# alternative works for k = N: torch.linalg.vector_norm(v, dtype=torch.float64) casts its whole input first (a [k]
# float64 buffer, seen with torch.profiler on torch 2.13), and a float32 reduction is imprecise (vector_norm of 2^24
# float32 values in [1, 2) on CPU: relative error 1.5e-4).
_CHUNK = 1 << 20


def norm_float64(v: torch.Tensor, minus: Optional[torch.Tensor] = None) -> float:
    """``‖v − minus‖₂`` (``‖v‖₂`` when ``minus`` is None) of 1-D vectors of equal length, as a Python float.

    The squares are accumulated in float64, chunk by chunk; differences of float32 / bfloat16 / float16 values are
    exact in float64, so the result is correct to float64 rounding. Cost: O(k) work, one host sync; extra memory at
    most 2 × 2^20 float64 values (16 MiB) whatever k is.
    """
    sq = torch.zeros((), dtype=torch.float64, device=v.device)
    for a in range(0, v.numel(), _CHUNK):
        d = v[a:a + _CHUNK].double()
        if minus is not None:
            d = d - minus[a:a + _CHUNK]  # in float64 (type promotion): exact for float32 and narrower
        sq += torch.dot(d, d)
    return math.sqrt(float(sq))


def count_batches(batches) -> Tuple[int, int]:
    """``(points, batches)`` of an iterable of batches, in one pass."""
    n = nb = 0
    for b in batches:
        n += batch_size(b)
        nb += 1
    return n, nb


# ====================================================================================================== S coordinates
@torch.no_grad()
def _scale_selected_grad(coords: "Coords", scale: torch.Tensor) -> None:
    """``.grad`` at S ← ``scale`` ⊙ ``.grad`` at S (scale [k] in S's order); O(k), nothing outside S touched."""
    for _, p, loc, a, b in coords.parts:
        if p.grad is None:
            continue
        flat = p.grad.view(-1) if p.grad.is_contiguous() else None
        if flat is None:
            raise ValueError("Targeted: step_scale needs contiguous gradients")
        flat.index_copy_(0, loc, flat.index_select(0, loc) * scale[a:b].to(flat.dtype))


class Coords:
    """The selected coordinates S of a ParamSpace (a Selection from ``as_selection``: int64 ascending indices on the
    space's device), split per parameter: read, write, gather and check on S only.

    ``parts``: one ``(parameter position, parameter, local int64 indices, start, stop)`` per parameter with selected
    entries; ``start:stop`` is its slice of every [k] vector (S is ascending, so each parameter's entries are
    contiguous in it). ``dtype``: the working dtype of [k] vectors (the promotion of the selected parameters'
    dtypes, at least float32). Cost: O(k) (one split of the indices) and one host sync.
    """

    def __init__(self, space: ParamSpace, selection: Selection):
        self.space, self.selection = space, selection
        self.indices = indices = selection.indices
        self.k = int(indices.numel())
        local = space.split_indices(indices)
        self.parts = []
        start = 0
        for i, (name, p) in enumerate(zip(space.names, space.params)):
            loc = local.get(name)
            if loc is None:
                continue
            self.parts.append((i, p, loc, start, start + loc.numel()))
            start += loc.numel()
        self.touched = [p for _, p, *_ in self.parts]  # the parameter tensors S touches, in space order
        dt = torch.float32
        for _, p, *_ in self.parts:
            dt = torch.promote_types(dt, p.dtype) if p.is_floating_point() else dt
        self.dtype = dt

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1) if t.is_contiguous() else t.reshape(-1)

    def read(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """θ_S [k] in ``dtype`` (default ``self.dtype``)."""
        dtype = dtype or self.dtype
        if not self.parts:
            return torch.zeros(0, dtype=dtype, device=self.space.device)
        return torch.cat([self._flat(p.detach()).index_select(0, loc).to(dtype) for _, p, loc, _, _ in self.parts])

    def snapshot(self) -> List[torch.Tensor]:
        """The selected values in each parameter's own dtype (k entries in all): :meth:`restore` is bit-exact."""
        return [self._flat(p.detach()).index_select(0, loc) for _, p, loc, _, _ in self.parts]

    @torch.no_grad()
    def restore(self, saved: List[torch.Tensor]) -> None:
        for (_, p, loc, _, _), v in zip(self.parts, saved):
            self._index_copy(p, loc, v)

    @torch.no_grad()
    def write(self, values: torch.Tensor) -> None:
        """θ_S ← ``values`` [k] (cast to each parameter's dtype); nothing outside S is touched."""
        for _, p, loc, a, b in self.parts:
            self._index_copy(p, loc, values[a:b].to(p.dtype))

    _index_copy = staticmethod(index_copy_flat)

    def gather(self, tensors: Sequence[Optional[torch.Tensor]], dtype: Optional[torch.dtype] = None, *,
               touched: bool = False) -> torch.Tensor:
        """[k] entries at S of per-parameter tensors shaped like the parameters (None = zeros): one per parameter of
        the space (ParamSpace order), or with ``touched=True`` one per tensor of ``self.touched``."""
        dtype = dtype or self.dtype
        out = []
        for j, (i, p, loc, a, b) in enumerate(self.parts):
            t = tensors[j if touched else i]
            out.append(torch.zeros(b - a, dtype=dtype, device=p.device) if t is None
                       else self._flat(t).index_select(0, loc).to(dtype))
        return torch.cat(out) if out else torch.zeros(0, dtype=dtype, device=self.space.device)

    def check_finite(self, v: torch.Tensor, what: str, suffix: str = "the model was left untouched") -> None:
        """:func:`~sapsel_kernels.errors.check_finite` for a [k] vector on S, naming the first bad coordinate by its
        parameter and position."""
        check_finite(v, what, suffix=suffix, where=lambda j: self.space.describe_position(int(self.indices[j])))


# ====================================================================================================== the problem
@dataclass(eq=False)
class Problem:
    """Everything a rule needs, prepared and validated by ``unlearn``: the model at θ*, the loss (a
    :class:`~sapsel_kernels.data.Loss`), the space, S (:class:`Coords`), Z / Z̃ / the Hessian batches (re-iterable
    sequences of batches), ``n_train`` (None when no rule needs it), ``train_points`` / ``train_batches`` (the points
    and batches of ``train``, counted once by ``unlearn`` so that no rule re-reads the data to count it) and the cost
    counters the report is built from (per-point gradients, per-point HVPs, backward passes). ``retain``:
    SAMFinetune's retained batches, set by its :meth:`~SAMFinetune.prepare`."""

    model: torch.nn.Module
    loss: Loss
    space: ParamSpace
    coords: Coords
    affected: Sequence
    corrected: Sequence
    train: Optional[Sequence] = None
    n_train: Optional[int] = None
    train_points: Optional[int] = None
    train_batches: Optional[int] = None
    retain: Optional[Sequence] = None
    counts: Dict[str, int] = field(default_factory=lambda: {"grad": 0, "hvp": 0, "passes": 0})
    info: Dict[str, Any] = field(default_factory=dict)
    comm: Any = None  # estimators.Comm of ``unlearn(group=...)``; None = one process
    train_points_total: Optional[int] = None  # train points over every rank (= train_points for one process)

    def __post_init__(self):
        if self.comm is None:
            from ..curvature.estimators import LOCAL

            self.comm = LOCAL
        if self.train_points_total is None:
            self.train_points_total = self.train_points

    # ------------------------------------------------------------------ data parallelism (no-ops for one process)
    def all_sum_s(self, fn: Callable[[], torch.Tensor], what: str) -> torch.Tensor:
        """``fn()`` -> this rank's [k] vector; returns its sum over the group's ranks. An exception on any rank
        raises on every rank (that rank its own, the others a ValueError naming it) before the sum: ONE flag
        all_reduce (2 int64) and one all_reduce of k values."""
        v, _ = self.comm.run(lambda: (fn(), ()), what, n_counts=0)
        self.comm.sum_([v])
        return v

    def synced(self, closure: Callable[[], Any], what: str) -> Callable[[], Any]:
        """``closure`` (forward + backward into ``.grad``) followed, under a group, by the average over the ranks
        of the gradient at S only (k values: ``.grad`` outside S stays this rank's, and the sparse optimizers never
        read it); an exception on any rank raises on every rank before the average."""
        if not self.comm.active:
            return closure

        def run():
            loss, _ = self.comm.run(lambda: (closure(), ()), what, n_counts=0)
            c = self.coords
            buf = c.gather([p.grad for p in c.touched], touched=True)
            self.comm.sum_([buf])
            buf.div_(self.comm.world)
            with torch.no_grad():
                for _, p, loc, a, b in c.parts:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    c._index_copy(p.grad, loc, buf[a:b].to(p.grad.dtype))
            return loss

        return run

    def agreed(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` on every rank (errors agreed as in :meth:`all_sum_s`); under a group every rank returns group
        rank 0's value (one ``broadcast_object_list``), so that a decision taken on it is the same everywhere."""
        value, _ = self.comm.run(lambda: (fn(), ()), what, n_counts=0)
        if not self.comm.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.comm.group, 0), group=self.comm.group)
        return box[0]

    def summed_gradient_s(self, batches) -> torch.Tensor:
        """Σ_b |b|·∇loss(b) at S: [k] in ``coords.dtype`` (each backward's full gradient is transient)."""
        g, n, nb = summed_gradient(self.space, self.model, self.loss, batches, coords=self.coords)
        self.counts["grad"] += n
        self.counts["passes"] += nb
        return g

    def gradient_difference_s(self) -> torch.Tensor:
        """G_S = Σ∇ℓ(Z̃)_S − Σ∇ℓ(Z)_S (under a group: over every rank's points), checked finite."""
        def local():
            g_new = self.summed_gradient_s(self.corrected)
            return g_new - self.summed_gradient_s(self.affected)

        g = self.all_sum_s(local, "unlearn: G = Σ∇ℓ(Z̃) − Σ∇ℓ(Z)")
        self.coords.check_finite(g, "unlearn: G = Σ∇ℓ(Z̃) − Σ∇ℓ(Z)")
        return g


def summed_gradient(space: ParamSpace, model, loss_fn, batches, dtype=None, coords: Optional[Coords] = None):
    """Σ over points of ∇ℓ: Σ_b |b|·∇loss_fn(model, b) (``loss_fn`` returns a batch's MEAN loss).

    Returns ``(gradient, n_points, n_batches)``: the gradient is flat [N] in ``dtype`` (default the first parameter's
    dtype) or, with ``coords``, its [k] entries at S in ``coords.dtype``, differentiating only the parameter tensors
    S touches. Peak extra memory: the accumulator (N or k) plus one backward's gradient tensors (N, or the size of
    the touched tensors, transient).
    """
    if coords is not None:
        dtype = coords.dtype
        total = torch.zeros(coords.k, dtype=dtype, device=space.device)
    else:
        dtype = dtype or space.dtypes[0]
        total = torch.zeros(space.numel, dtype=dtype, device=space.device)
    n = nb = 0
    for b in batches:
        m = batch_size(b)
        with torch.enable_grad():
            loss = loss_fn(model, b)
            g = torch.autograd.grad(loss, coords.touched if coords is not None else space.params, allow_unused=True)
        if coords is not None:
            total += m * coords.gather(g, dtype, touched=True)
        else:
            total += m * space.gather(list(g), dtype=dtype)
        del g, loss  # else this batch's gradients live on through the next batch's backward (2N at the peak)
        n += m
        nb += 1
    return total, n, nb


# ====================================================================================================== validation
def _real(cls: str, name: str, v, *, lo: float = 0.0, none_ok: bool = False) -> None:
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{cls}: {name} must be a real number, got {type(v).__name__}")
    if not math.isfinite(float(v)) or float(v) < lo:
        raise ValueError(f"{cls}: {name} must be finite and >= {lo:g}, got {v}")


def _int(cls: str, name: str, v, *, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{cls}: {name} must be an int, got {type(v).__name__}")
    if int(v) < lo or (hi is not None and int(v) >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{cls}: {name} must be an int {rng}, got {v}")


# ====================================================================================================== rules
class _Rule:
    """Base of the method configs. ``name``: the method's name in ``METHODS``; ``iterative``: True when the rule
    moves θ_S itself (:meth:`run`) rather than returning an update (:meth:`delta`); :meth:`train_use`: what
    ``unlearn``'s ``train_data`` / ``n_train`` are to the rule."""

    name: ClassVar[str] = ""
    iterative: ClassVar[bool] = False

    def train_use(self) -> Optional[str]:
        """None: the rule reads neither ``train_data`` nor ``n_train`` (passing one is an error); ``"hessian"``: it
        reads ``train_data`` (required) for a Hessian and ``n_train`` (default: its points) for the scale;
        ``"n_train"``: it needs only ``n_train``, which ``train_data`` may supply by its number of points."""
        return None

    def prepare(self, prob: Problem) -> None:
        """Validate what depends on the model/data; called by ``unlearn`` before anything is computed."""

    def delta(self, prob: Problem) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def run(self, prob: Problem) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def _damping(rule, prob: Problem) -> float:
    lam = float(rule.damping) if rule.damping is not None else 0.01 * prob.n_train
    prob.info.update(damping=lam, n_train=prob.n_train)
    return lam


@dataclass(frozen=True, kw_only=True)
class FirstOrder(_Rule):
    """θ_S ← θ_S − τ·G_S. ``tau``: finite, >= 0, on the SUMMED-gradient scale (τ = η/|Z| is one step of size η on the
    mean gradient difference). Peak extra memory: O(k) plus one backward's gradients (N, transient)."""

    name: ClassVar[str] = "first_order"
    tau: float = 1e-3

    def __post_init__(self):
        _real("FirstOrder", "tau", self.tau)

    def delta(self, prob: Problem) -> torch.Tensor:
        g_s = prob.gradient_difference_s()
        prob.info["g_norm"] = norm_float64(g_s)
        prob.info["tau"] = self.tau
        return -self.tau * g_s


@dataclass(frozen=True, kw_only=True)
class SecondOrder(_Rule):
    """θ_S ← θ_S − (H_SS + λI)⁻¹ G_S, solved inside a trust region and checked against the true loss.

    The Newton step minimises the quadratic model q(Δ) = G_SᵀΔ + ½Δᵀ(H_SS + λI)Δ (see the module docstring for the
    scale of H and λ). On a non-convex model H_SS is indefinite and plain CG can return a step many times the size of
    the weights (a CNN with BatchNorm at a 1% selection: 5-280× ‖θ_S‖, test accuracy to chance). Two safeguards,
    each reported in ``info``:

    1. **Trust region** (Steihaug-Toint CG, :func:`~sapsel_kernels.solver.steihaug_cg`): ‖Δ‖ ≤ ``trust_radius`` ×
       ‖θ_S‖; at negative curvature the step follows the CG direction to that boundary instead of stopping or
       growing without bound.
    2. **Ratio test** on the function q models: f(Δ) = T(θ+Δ) − T(θ) − g_TᵀΔ + Σℓ(Z̃; θ+Δ) − Σℓ(Z; θ+Δ) − [same at
       θ] + ½λ‖Δ‖², T the summed training loss estimated on ``train_data`` (its linear term g_T removed, as in q).
       The step is kept when ρ = f(αΔ) / q(αΔ) ≥ ``min_ratio``, or when |f − q| is within the rounding of the
       losses (16 · eps · Σ|b|·|L_b|, ``info["ratio_noise"]``: with float32 losses summed over many points a small
       step's f is rounding); otherwise α is divided by 4, at most ``backtracks`` times; when no α passes, nothing
       changes (``info["accepted"] = False``).

    ``damping``: λ >= 0 on the summed-loss scale, None = 0.01·n_train; ``cg_iters`` >= 1; ``cg_tol`` >= 0 (relative
    residual); ``cache_graph``: keep each Hessian batch's first-order graph across the CG products (one double
    backward per product and batch; memory: one graph per batch) or rebuild it per product. ``trust_radius``: > 0,
    relative to ‖θ_S‖ (when θ_S = 0: to √k × the RMS of the tensors S touches), None = no bound; ``min_ratio``: the
    ratio test's threshold, None = no test (both None: the plain truncated-CG Newton step); ``backtracks`` >= 0.
    Needs ``train_data``.

    ``info``: cg_iters, cg_residual, negative_curvature, boundary, trust_radius (absolute), and with the ratio test
    ratio (ρ), step_scale (α), trials, accepted, predicted and actual (q and f), ratio_noise: of the kept step, or
    of the last trial when none was kept. G_S = 0 gives a zero step and no ratio test.
    Cost of the ratio test: one gradient pass over ``train_data`` (g_T) and one forward pass over ``train_data``, Z
    and Z̃ per trial plus one at θ*.

    Peak extra memory: 5k (CG vectors and G_S) + 3k (g_T, θ_S snapshot, trial) plus, per product, a tangent and an
    HVP of size N (transient) and the cached graphs.
    """

    name: ClassVar[str] = "second_order"
    damping: Optional[float] = None
    cg_iters: int = 50
    cg_tol: float = 1e-6
    cache_graph: bool = True
    trust_radius: Optional[float] = 1.0
    min_ratio: Optional[float] = 0.1
    backtracks: int = 5

    def __post_init__(self):
        _real("SecondOrder", "damping", self.damping, none_ok=True)
        _int("SecondOrder", "cg_iters", self.cg_iters, lo=1)
        _real("SecondOrder", "cg_tol", self.cg_tol)
        if not isinstance(self.cache_graph, bool):
            raise TypeError(f"SecondOrder: cache_graph must be a bool, got {type(self.cache_graph).__name__}")
        _real("SecondOrder", "trust_radius", self.trust_radius, none_ok=True)
        if self.trust_radius is not None and float(self.trust_radius) <= 0:
            raise ValueError(f"SecondOrder: trust_radius must be > 0 or None, got {self.trust_radius}")
        _real("SecondOrder", "min_ratio", self.min_ratio, lo=-math.inf, none_ok=True)
        _int("SecondOrder", "backtracks", self.backtracks, lo=0)

    def train_use(self) -> Optional[str]:
        return "hessian"

    def _radius(self, prob: Problem) -> float:
        if self.trust_radius is None:
            return math.inf
        c = prob.coords
        ref = norm_float64(c.read())
        if ref == 0.0:  # θ_S = 0 (e.g. zero-initialised biases): the scale of the tensors S touches
            sq = n = 0
            for p in c.touched:
                sq += norm_float64(p.detach().reshape(-1)) ** 2
                n += p.numel()
            ref = math.sqrt(c.k * sq / max(n, 1))
        return float(self.trust_radius) * ref if ref > 0 else math.inf

    def delta(self, prob: Problem) -> torch.Tensor:
        g_s = prob.gradient_difference_s()
        prob.info["g_norm"] = norm_float64(g_s)
        lam = _damping(self, prob)
        hb, n_h, n_batches = prob.train, prob.train_points_total, prob.train_batches
        prob.info["n_hessian_points"] = n_h
        from ..curvature.hvp import RestrictedHVP

        hess = RestrictedHVP(prob.model, prob.loss, prob.space, hb, prob.coords.indices, scale=prob.n_train / n_h,
                             cache_graph=self.cache_graph)

        def product(v):  # under a group: this rank's points' products summed over the ranks (k values)
            return prob.all_sum_s(lambda: hess(v), "unlearn: second_order's Hessian-vector product") + lam * v

        radius = self._radius(prob)
        try:
            x, cg = steihaug_cg(product, g_s, radius, max_iter=int(self.cg_iters), tol=float(self.cg_tol))
        finally:
            prob.counts["hvp"] += hess.n_point_products
            prob.counts["passes"] += hess.n_products * n_batches + (n_batches if self.cache_graph else 0)
        hess = None  # frees its cached graphs before the ratio test
        prob.info.update(cg_iters=cg["iters"], cg_residual=cg["residual"], negative_curvature=cg["negative_curvature"],
                         boundary=cg["boundary"], trust_radius=radius)
        step = -x
        if self.min_ratio is None or cg["bx"] == 0.0:
            return step
        return step * self._ratio_test(prob, step, cg, lam)

    def _ratio_test(self, prob: Problem, step: torch.Tensor, cg: Dict[str, Any], lam: float) -> float:
        """The accepted scale α of ``step`` (0.0: none passed); see the class docstring."""
        c = prob.coords
        scale = prob.n_train / prob.train_points_total
        g_t = prob.all_sum_s(lambda: prob.summed_gradient_s(prob.train), "unlearn: second_order's ratio test")
        g_t_step = float(torch.dot(g_t.to(step.dtype), step)) * scale
        del g_t

        eps = [0.0]  # the machine epsilon of the losses (their dtype is seen at the first evaluation)

        def summed(batches) -> Tuple[float, float]:  # (Σ|b|·L_b, Σ|b|·|L_b|) over the group's points
            def local():
                tot = torch.zeros(2, dtype=torch.float64, device=prob.space.device)
                with torch.no_grad():
                    for b in batches:
                        loss = prob.loss(prob.model, b)
                        eps[0] = max(eps[0], torch.finfo(loss.dtype).eps)
                        v = batch_size(b) * loss.double()
                        tot[0] += v
                        tot[1] += v.abs()
                        prob.counts["passes"] += 1
                return tot

            t = prob.all_sum_s(local, "unlearn: second_order's ratio test")
            return float(t[0]), float(t[1])

        def f() -> Tuple[float, float]:  # T + Σℓ(Z̃) − Σℓ(Z) at the model's current θ, and its magnitude
            (t, ta), (c1, ca), (a1, aa) = summed(prob.train), summed(prob.corrected), summed(prob.affected)
            return scale * t + c1 - a1, scale * ta + ca + aa

        f0, mag = f()
        # f − f0 is a difference of sums of losses rounded in their own dtype: below this it is rounding, not a
        # measurement (float32 least squares, n_train = 20,000: a correct Newton step measured ρ = 206 to 26,606
        # over 12 draws without it, and 4 of them were cut, to as little as 1/64)
        noise = 16.0 * eps[0] * mag
        old = c.snapshot()
        theta = c.read()
        step_sq = norm_float64(step) ** 2
        alpha, trials, rho, pred, act = 1.0, 0, float("nan"), 0.0, 0.0
        try:
            for trials in range(1, int(self.backtracks) + 2):
                c.write(theta + (alpha * step).to(theta.dtype))
                pred = 0.5 * alpha * alpha * cg["xAx"] - alpha * cg["bx"]  # q(αΔ), with x = −Δ
                act = f()[0] - f0 - alpha * g_t_step + 0.5 * lam * alpha * alpha * step_sq
                rho = act / pred if pred < 0 else float("nan")
                # kept when the true change is at least min_ratio of the predicted one, or when the two differ by
                # no more than the rounding of the losses (the model cannot be faulted below that)
                if math.isfinite(act) and pred < 0 and (rho >= float(self.min_ratio) or abs(act - pred) <= noise):
                    break
                alpha /= 4.0
            else:
                alpha = 0.0
        finally:
            c.restore(old)
        prob.info.update(ratio=rho, step_scale=alpha, trials=trials, accepted=alpha > 0, predicted=pred, actual=act,
                         ratio_noise=noise)
        return alpha


@dataclass(frozen=True, kw_only=True)
class DiagNewton(_Rule):
    """θ_S ← θ_S − G_S / (n_train · max(d_S, 0) + λ).

    ``diag``: the diagonal of the MEAN training-loss Hessian, a ``DiagEstimate`` or a flat tensor of N entries; None
    estimates it with ``hessian_diag(model, loss_fn, train_data, n_probes=n_probes, seed=seed)`` (a Ctrl-C inside
    that estimate raises KeyboardInterrupt: a partial estimate is never used). ``damping``: λ >= 0 on the summed
    scale, None = 0.01·n_train. Without ``diag``, ``unlearn`` needs ``train_data`` (the estimate's data; ``n_train``
    defaults to its points). With ``diag``, the rule needs only ``n_train``: give it, or give ``train_data`` alone
    and its number of points is ``n_train`` (giving both is a ValueError: train_data would not be read).
    Peak extra memory: O(k) plus hessian_diag's own (about 2N float32 accumulators plus probe buffers) when it
    estimates ``diag``.
    """

    name: ClassVar[str] = "diag_newton"
    damping: Optional[float] = None
    diag: Any = field(default=None, compare=False, repr=False)
    n_probes: int = 32
    seed: int = 0

    def __post_init__(self):
        _real("DiagNewton", "damping", self.damping, none_ok=True)
        _int("DiagNewton", "n_probes", self.n_probes, lo=1)
        _int("DiagNewton", "seed", self.seed, lo=0, hi=2**63)
        d = self.diag
        if d is not None and not isinstance(d, torch.Tensor) and not isinstance(getattr(d, "mean", None),
                                                                                torch.Tensor):
            raise TypeError(f"DiagNewton: diag must be None, a DiagEstimate or a flat tensor, got {type(d).__name__}")

    def train_use(self) -> Optional[str]:
        return "hessian" if self.diag is None else "n_train"

    def _diag_tensor(self) -> Optional[torch.Tensor]:
        d = self.diag
        return None if d is None else (d if isinstance(d, torch.Tensor) else d.mean)

    def prepare(self, prob: Problem) -> None:
        d = self._diag_tensor()
        if d is not None and d.numel() != prob.space.numel:
            raise ValueError(f"DiagNewton: diag has {d.numel()} entries, the model has {prob.space.numel} parameters")

    def delta(self, prob: Problem) -> torch.Tensor:
        g_s = prob.gradient_difference_s()
        prob.info["g_norm"] = norm_float64(g_s)
        lam = _damping(self, prob)
        d = self._diag_tensor()
        if d is None:
            from ..curvature import hessian

            prob.info["n_hessian_points"] = prob.train_points_total
            est = hessian.hessian_diag(prob.model, prob.loss, prob.train, n_probes=int(self.n_probes),
                                       seed=int(self.seed), space=prob.space,
                                       group=prob.comm.group if prob.comm.active else None)
            if est.info.get("stopped_by") == "interrupted":
                raise KeyboardInterrupt  # hessian_diag keeps a partial estimate on Ctrl-C; an update must not use it
            n_probes = int(getattr(est, "n_probes", self.n_probes))
            prob.counts["hvp"] += n_probes * prob.train_points
            prob.counts["passes"] += n_probes * prob.train_batches
            d = est.mean
        d_s = d.reshape(-1).index_select(0, prob.coords.indices.to(d.device)).to(device=g_s.device, dtype=g_s.dtype)
        prob.coords.check_finite(d_s, "unlearn: the Hessian diagonal diag")
        denom = prob.n_train * d_s.clamp_min(0) + lam
        if not bool((denom > 0).all()):
            raise ValueError("diag_newton: zero denominator (diagonal estimate 0 and damping 0); give damping > 0")
        prob.info["n_clipped_negative"] = int((d_s < 0).sum())
        return -g_s / denom


def _cycle(batches) -> Iterator:
    """Batches in order, again and again (a list cycles like ``batches[s % len(batches)]``)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("no batches to cycle through")


def _sam_step(opt, model, closure) -> None:
    """One SparseSAM step: the gradient at w (``closure`` runs the backward), perturb S, the gradient at w + e with
    BatchNorm statistics frozen (on an exception there, the perturbation is undone exactly), then the base step from
    the saved weights."""
    from .optim import frozen_bn_stats

    opt.zero_grad()
    closure()
    opt.first_step()
    opt.zero_grad()
    try:
        with frozen_bn_stats(model):
            closure()
    except BaseException:
        opt.restore()
        raise
    opt.second_step()


@dataclass(frozen=True, kw_only=True)
class SAMFinetune(_Rule):
    """``steps`` SparseSAM steps on S: each step sees one corrected batch and, with ``retain``, one retained batch
    (both cycled); the loss is the mean over their points. ``steps`` >= 0 (0 = no-op), ``lr`` and ``rho`` finite and
    >= 0, ``base`` "sgd" or "adamw"; ``retain``: None or batches of unaffected training points (re-iterable).
    SAM's second forward runs with BatchNorm statistics frozen (one update per step, relevant only with
    ``estimation_mode=False`` on a model in train mode). Peak extra memory: SparseSAM's state (k saved weights, plus
    k or 2k base-optimizer moments) plus the gradients (N, in the parameters' ``.grad``, freed afterwards).
    """

    name: ClassVar[str] = "sam_finetune"
    iterative: ClassVar[bool] = True
    steps: int = 20
    lr: float = 1e-2
    rho: float = 0.05
    base: str = "sgd"
    retain: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        _int("SAMFinetune", "steps", self.steps, lo=0)
        _real("SAMFinetune", "lr", self.lr)
        _real("SAMFinetune", "rho", self.rho)
        if self.base not in ("sgd", "adamw"):
            raise ValueError(f"SAMFinetune: base must be 'sgd' or 'adamw', got {self.base!r}")

    def prepare(self, prob: Problem) -> None:
        if self.retain is not None:
            prob.retain = as_batches(self.retain, passes="many", what="retain")

    def run(self, prob: Problem) -> None:
        from .optim import SparseSAM

        retain = prob.retain
        prob.info.update(steps=self.steps, lr=self.lr, rho=self.rho)
        if self.steps == 0:
            return
        model, loss_fn = prob.model, prob.loss
        opt = SparseSAM(prob.space, prob.coords.selection, base=self.base, lr=self.lr, rho=self.rho)
        zt = _cycle(prob.corrected)
        rt = _cycle(retain) if retain is not None else None
        for step in range(self.steps):
            b = [next(zt)] + ([next(rt)] if rt is not None else [])
            npts = sum(batch_size(bi) for bi in b)

            def closure(b=b, step=step):
                loss = sum(loss_fn(model, bi) * batch_size(bi) for bi in b) / npts
                check_finite(loss.detach(), "unlearn: the sam_finetune loss", suffix="the model was restored",
                             where=lambda _: f"step {step + 1} of {self.steps}")
                loss.backward()
                return loss

            _sam_step(opt, model, prob.synced(closure, "unlearn: a sam_finetune step"))
            opt.zero_grad()
            if opt.last_step_skipped:
                raise NonFiniteError("unlearn: sam_finetune hit a NaN/Inf gradient on the selection; the model was "
                                     "restored")
            prob.counts["grad"] += 2 * npts
            prob.counts["passes"] += 2 * len(b)


@dataclass(frozen=True, kw_only=True)
class GradientAscent(_Rule):
    """``steps`` SparseSGD steps on S minimising L_mean(Z̃) − L_mean(Z) (ascent on Z, descent on Z̃), one batch of
    each per step (cycled; one backward per term, accumulated in ``.grad``, so only one term's activations are
    alive at a time). ``steps`` >= 0 (0 = no-op), ``lr`` finite and >= 0. Peak extra memory: the gradients (N, in
    the parameters' ``.grad``, freed afterwards) plus the second backward's gradient of one tensor at a time as it
    is accumulated; SparseSGD without momentum keeps no state."""

    name: ClassVar[str] = "gradient_ascent"
    iterative: ClassVar[bool] = True
    steps: int = 20
    lr: float = 1e-2

    def __post_init__(self):
        _int("GradientAscent", "steps", self.steps, lo=0)
        _real("GradientAscent", "lr", self.lr)

    def run(self, prob: Problem) -> None:
        from .optim import SparseSGD

        prob.info.update(steps=self.steps, lr=self.lr)
        if self.steps == 0:
            return
        model, loss_fn = prob.model, prob.loss
        opt = SparseSGD(prob.space, prob.coords.selection, lr=self.lr)
        z, zt = _cycle(prob.affected), _cycle(prob.corrected)
        for step in range(self.steps):
            bz, bzt = next(z), next(zt)
            opt.zero_grad()

            def closure(bz=bz, bzt=bzt, step=step):
                # Two backward passes into .grad rather than one through L(Z̃) − L(Z): the same work and the same
                # gradient peak (either way one term's gradient, N, plus the other's of one tensor at a time: 1.71 N
                # on the memory-contract MLP before and after), but Z̃'s graph and activations are freed before Z's
                # forward.
                for sign, b, what in ((1.0, bzt, "L(Z̃)"), (-1.0, bz, "L(Z)")):
                    loss = loss_fn(model, b)
                    check_finite(loss.detach(), f"unlearn: the gradient_ascent loss term {what}",
                                 suffix="the model was restored", where=lambda _: f"step {step + 1} of {self.steps}")
                    (loss if sign > 0 else -loss).backward()

            prob.synced(closure, "unlearn: a gradient_ascent step")()
            opt.step()
            opt.zero_grad()
            if opt.last_step_skipped:
                raise NonFiniteError("unlearn: gradient_ascent hit a NaN/Inf gradient on the selection; the model "
                                     "was restored")
            prob.counts["grad"] += batch_size(bz) + batch_size(bzt)
            prob.counts["passes"] += 1


@dataclass(frozen=True, kw_only=True)
class Targeted(_Rule):
    """Iterative targeted forgetting on S (SparseSGD or SparseAdamW, ``base``; SparseSAM over it with ``rho > 0``):
    each step minimises

        L = w_c · L(Z̃_b) + w_f · (2/β) · softplus(β · (L*(Z_b) − L(Z_b))) + w_r · L(R_b)

    over one batch of each (cycled): descent on the corrected points Z̃, the NPO term of Zhang et al. (2024,
    "Negative Preference Optimization") on the affected points Z (L* = the loss of Z at θ*, evaluated once; its
    gradient is −2σ(β(L* − L))·∇L: gradient ascent at θ* that fades as Z's loss rises, so it cannot diverge like plain
    ascent) and a retain term on unaffected training batches R (``retain``; optional). L is the loss rule's batch MEAN
    (for language models: nats per target token, so β is on that scale). For a secret, give Z with targets only at
    the secret's tokens (``forget`` does): the ascent then acts on the secret, not on the text around it.
    ``forget_loss(model, batch) -> scalar`` replaces the NPO term on the batch mean
    (``forget`` passes a per-token NPO by default, ``UpdateConfig(per_token=None)``: each secret token keeps its own
    fading weight);
    ``retain_loss(model, batch)`` replaces the loss rule on the retain batches (``UpdateConfig(retain_loss="kl")``
    passes the KL divergence to θ*'s predictions).

    Without ``monitor`` the rule runs ``steps`` steps at ``lr``. With ``monitor`` (a callable ``monitor(step) ->
    {"within_budget": bool, "done": bool, "score": float, "cost": float (optional, for polish_steps)}`` that
    measures the model as it stands, e.g. a secret's exposure and a held-out perplexity: ``forget`` builds one) the
    step size and length are searched: every ``check_every`` steps the monitor is consulted; a step block that leaves
    the budget is undone (θ_S and the optimizer state restored from the last accepted check, O(k)) and lr is divided
    by 4; an accepted block that
    improves ``score`` by less than 10% doubles lr (at most ``lr_max``); the run stops at ``done`` ("target"), when lr
    falls below ``lr_min`` ("budget"), or after ``steps`` steps in all, undone ones included ("steps").
    ``repair_steps`` > 0 (with ``monitor``): a block that leaves the budget is first repaired, by up to this many
    steps of descent on Z̃ and the retain batches only (no forget term; the monitor is consulted every
    ``check_every`` of them), and kept if the monitor is back within the budget with a score below the last
    accepted one; otherwise it is undone as above. An accepted repair leaves lr as it is.
    ``polish_steps`` > 0 (with ``monitor``): once the target is met ("target"), up to this many further steps of the
    same descent on Z̃ and the retained text (no forget term; within ``steps``), in blocks of ``check_every``, each
    kept only if the monitor still says ``done``, within the budget, with a lower ``cost`` (a number the monitor may
    return, lower is better: ``forget`` returns the validation perplexity's rise; without it there is no polish);
    the first block that fails is undone and ends the polish (no smaller lr is tried). Meeting the target in one
    large block can spend most of the perplexity budget at once (a Llama fixture: +2.8% validation after 5 steps);
    polishing gives back what the secrets do not need.
    ``prob.info``: ``history`` (one entry per check, with its ``phase``: start, forget, repair or polish),
    ``stopped_by``, ``steps_run`` (repair and polish steps included), ``lr_final``.
    ``project`` (rho 0): the gradient at S of the forget term, g_f, and of the Z̃ and retain terms,
    g_r, are taken by two backward passes (each forward freed before the next); where they conflict (g_f·g_r < 0)
    a forget step drops from g_f its component along g_r (g_f − (g_f·g_r/|g_r|²)·g_r + g_r: to first order its
    forget part leaves the Z̃ and retain terms unchanged, and the step still descends on them), and a repair or
    polish step drops from g_r its component along g_f (on the next Z batch: one more gradient per step; to first
    order the repair does not undo the forgetting). These first-order statements are for SGD without
    ``step_scale``; with AdamW or a ``step_scale`` the projected gradient is rescaled per coordinate. Meant for a
    search held at the perplexity budget, where every plain forget block leaves it and every repair brings the
    secrets back (docs/forget.md). Under a group both gradients are averaged over the ranks before the projection
    (one all_reduce of 2k + 2 values per step, in place of the plain step's k). Peak extra memory: 5k values (the
    two gradients, their float64 copies and the step; 2k + 2 more under a group).
    ``on_keep`` (with ``monitor``): called with the monitor's result (under a group the value every rank agreed
    on) at the start and whenever the search keeps a checked state, never for a check it undoes.

    Fields: ``steps`` >= 0; ``lr`` > 0; ``lr_min`` / ``lr_max`` bounds of the search; ``beta`` > 0; the weights
    ``correct_weight``, ``forget_weight``, ``retain_weight`` >= 0; ``rho`` >= 0 (SAM radius; 0 = no SAM);
    ``weight_decay`` >= 0 (on S only); ``check_every`` >= 1; ``repair_steps``, ``polish_steps`` >= 0; ``base`` "sgd"
    (default) or "adamw"; ``step_scale``: None or a [k] tensor of per-coordinate multipliers of the selected
    gradient before every step, in S's order (a diagonal preconditioner; base "sgd" and rho 0 only; ``forget`` builds
    one from ``UpdateConfig(precondition="fisher")``, and by default, "auto", with SGD, rho 0 and
    focus). SGD is the default because on the tests' memorised character
    LSTM it forgot more within the same perplexity budget: Adam's first steps move every selected coordinate by about
    ±lr whatever its gradient, which costs perplexity before the secret's loss moves (exposure 33 vs 47 bits at +5%
    with the hessian 5% selection).
    Peak extra memory: the gradients (N, in ``.grad``, freed afterwards), the optimizer state (SGD none, AdamW 2k
    float32), with ``rho`` SAM's k saved weights, and with ``monitor`` one accepted snapshot (θ_S and the state).
    """

    name: ClassVar[str] = "targeted"
    iterative: ClassVar[bool] = True
    steps: int = 100
    lr: float = 0.1
    lr_min: float = 1e-5
    lr_max: float = 100.0
    beta: float = 1.0
    correct_weight: float = 1.0
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    rho: float = 0.0
    weight_decay: float = 0.0
    check_every: int = 5
    base: str = "sgd"
    repair_steps: int = 0
    polish_steps: int = 0
    retain: Any = field(default=None, compare=False, repr=False)
    monitor: Any = field(default=None, compare=False, repr=False)
    forget_loss: Any = field(default=None, compare=False, repr=False)
    retain_loss: Any = field(default=None, compare=False, repr=False)
    step_scale: Any = field(default=None, compare=False, repr=False)
    project: bool = False
    on_keep: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.project, bool):
            raise TypeError(f"Targeted: project must be a bool, got {type(self.project).__name__}")
        if self.on_keep is not None and not callable(self.on_keep):
            raise TypeError(f"Targeted: on_keep must be callable on_keep(monitor_result) or None, got "
                            f"{type(self.on_keep).__name__}")
        if self.step_scale is not None:
            if not isinstance(self.step_scale, torch.Tensor) or self.step_scale.dim() != 1 \
                    or not self.step_scale.is_floating_point():
                raise TypeError("Targeted: step_scale must be a 1-D floating tensor [k] (S's order) or None")
            if not bool(torch.isfinite(self.step_scale).all()) or bool((self.step_scale < 0).any()):
                raise ValueError("Targeted: step_scale must be finite and >= 0")
            if self.base != "sgd" or self.rho > 0:
                raise ValueError("Targeted: step_scale (a diagonal preconditioner of the SGD step) needs base='sgd' "
                                 "and rho=0 (AdamW rescales every coordinate itself; SAM's ascent would be scaled too)")
        for name in ("forget_loss", "retain_loss"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"Targeted: {name} must be callable {name}(model, batch) -> scalar")
        _int("Targeted", "steps", self.steps, lo=0)
        _int("Targeted", "check_every", self.check_every, lo=1)
        _int("Targeted", "repair_steps", self.repair_steps, lo=0)
        _int("Targeted", "polish_steps", self.polish_steps, lo=0)
        for name in ("lr", "lr_min", "lr_max", "beta", "correct_weight", "forget_weight", "retain_weight", "rho",
                     "weight_decay"):
            _real("Targeted", name, getattr(self, name))
        for name in ("lr", "beta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Targeted: {name} must be > 0, got {getattr(self, name)}")
        if self.project and self.rho > 0:
            raise ValueError("Targeted: project needs rho=0 (SAM's ascent step is taken on the summed loss)")
        if not self.lr_min <= self.lr <= self.lr_max:
            raise ValueError(f"Targeted: need lr_min <= lr <= lr_max, got {self.lr_min} <= {self.lr} <= {self.lr_max}")
        if self.base not in ("sgd", "adamw"):
            raise ValueError(f"Targeted: base must be 'sgd' or 'adamw', got {self.base!r}")
        if self.monitor is not None and not callable(self.monitor):
            raise TypeError(f"Targeted: monitor must be callable monitor(step) -> dict, got "
                            f"{type(self.monitor).__name__}")

    def prepare(self, prob: Problem) -> None:
        if self.retain is not None:
            prob.retain = as_batches(self.retain, passes="many", what="retain")

    def _optimizer(self, prob: Problem, lr: float):
        from .optim import SparseAdamW, SparseSAM, SparseSGD

        if self.rho > 0:
            return SparseSAM(prob.space, prob.coords.selection, base=self.base, lr=lr, rho=self.rho,
                             weight_decay=self.weight_decay)
        if self.base == "sgd":
            return SparseSGD(prob.space, prob.coords.selection, lr=lr, weight_decay=self.weight_decay)
        return SparseAdamW(prob.space, prob.coords.selection, lr=lr, weight_decay=self.weight_decay)

    def run(self, prob: Problem) -> None:
        import copy

        model, loss_fn = prob.model, prob.loss
        history: List[Dict[str, Any]] = []
        prob.info.update(history=history, lr=self.lr, beta=self.beta, rho=self.rho, steps_run=0, lr_final=self.lr,
                         stopped_by="steps")
        if self.steps == 0:
            return
        # L*(Z_b) at θ*: one forward per affected batch (no gradient), only for the built-in NPO term
        if self.forget_weight > 0 and self.forget_loss is None:
            def reference():  # this rank's batches; a NaN on any rank raises on every rank
                with torch.no_grad():
                    values = [float(loss_fn(model, b)) for b in prob.affected]
                check_finite(torch.tensor(values, dtype=torch.float64),
                             "unlearn: the targeted rule's reference loss L*(Z)", suffix="the model was left untouched")
                return values, ()

            ref, _ = prob.comm.run(reference, "unlearn: the targeted rule's reference loss", n_counts=0)
            prob.info["forward_passes"] = len(ref)
        else:
            ref = [0.0 for _ in prob.affected]
        z = _cycle(list(zip(prob.affected, ref)))
        zt = _cycle(prob.corrected)
        rt = _cycle(prob.retain) if (prob.retain is not None and self.retain_weight > 0) else None
        if self.repair_steps and self.monitor is not None and self.correct_weight == 0 and rt is None:
            raise ValueError("Targeted: repair_steps needs a repair loss: correct_weight > 0 or retain batches with "
                             "retain_weight > 0")
        lr = float(self.lr)
        opt = self._optimizer(prob, lr)
        sam = self.rho > 0
        scale = None
        if self.step_scale is not None:
            if self.step_scale.numel() != prob.coords.k:
                raise ValueError(f"Targeted: step_scale has {self.step_scale.numel()} entries for a selection of "
                                 f"k={prob.coords.k}")
            scale = self.step_scale.to(device=prob.space.device, dtype=prob.coords.dtype)
        accepted = None
        prev_score = None
        if self.monitor is not None:
            accepted = (prob.coords.snapshot(), copy.deepcopy(opt.state_dict()), 0)
            m0 = prob.agreed(lambda: self.monitor(0), "unlearn: the targeted rule's monitor")
            prev_score = float(m0.get("score", float("nan")))
            if self.on_keep is not None:
                self.on_keep(m0)
            history.append({"step": 0, "lr": lr, **m0, "phase": "start", "accepted": True})
            if m0.get("done"):
                prob.info["stopped_by"] = "target"
                return
        done_steps = 0  # every step taken, undone blocks included (the budget is on work)
        position = 0  # steps in the current, accepted trajectory

        def forget_term(bz, zref):
            if self.forget_weight > 0 and self.forget_loss is not None:
                return self.forget_weight * self.forget_loss(model, bz)
            if self.forget_weight > 0:
                lz = loss_fn(model, bz)
                return self.forget_weight * (2.0 / self.beta) * torch.nn.functional.softplus(self.beta * (zref - lz))
            return None

        def rest_term(bzt, br):  # the Z̃ and retain terms (all a repair or polish step descends on)
            parts = []
            if self.correct_weight > 0:
                parts.append(self.correct_weight * loss_fn(model, bzt))
            if br is not None:
                parts.append(self.retain_weight * (self.retain_loss or loss_fn)(model, br))
            return sum(parts) if parts else None

        def objective(bz, zref, bzt, br):  # bz None: a repair step, no forget term
            parts = [t for t in ((forget_term(bz, zref) if bz is not None else None), rest_term(bzt, br))
                     if t is not None]
            return sum(parts) if parts else None

        coords = prob.coords

        def grad_s():  # .grad at S, then cleared
            g = coords.gather([p.grad for p in coords.touched], touched=True)
            for p in coords.touched:
                p.grad = None
            return g

        def projected(bz, zref, bzt, br, forget, finite):
            """``project``: the forget term's and the other terms' gradients at S by two backward passes (under a
            group each averaged over the ranks: one process's, as the summed loss's would be), the conflicting
            component removed, and .grad at S set to the step's gradient. Returns the step's (detached) loss, None
            when no term is active. Collective under a group (every rank calls it at the same step)."""
            def one(term):  # forward, check, backward, gather: each graph freed before the next is built
                if term is None:
                    return None, None
                finite(term)
                term.backward()
                return term.detach(), grad_s()

            def local():
                lf, gf = one(forget_term(bz, zref) if bz is not None else None)
                lr_, gr = one(rest_term(bzt, br))
                if not forget:  # a repair or polish step descends on the other terms only
                    return lr_, gf, gr
                return (None if lf is None and lr_ is None else sum(t for t in (lf, lr_) if t is not None),
                        gf, gr)

            (loss, gf, gr), _ = prob.comm.run(lambda: (local(), ()), "unlearn: a targeted step", n_counts=0)
            if prob.comm.active:  # a fixed layout on every rank: [g_f | g_r | has g_f | has g_r]
                k = coords.k
                zero = torch.zeros(k, dtype=coords.dtype, device=prob.space.device)
                flags = torch.tensor([gf is not None, gr is not None], dtype=coords.dtype, device=zero.device)
                buf = torch.cat([zero if gf is None else gf, zero if gr is None else gr, flags])
                prob.comm.sum_([buf])
                n_f, n_r = int(round(float(buf[-2]))), int(round(float(buf[-1])))
                if n_f not in (0, prob.comm.world) or n_r not in (0, prob.comm.world):
                    raise ValueError("Targeted(project=True): the ranks have different loss terms (a forget, Z̃ or "
                                     "retain term on some ranks only); every rank needs the same terms")
                buf.div_(prob.comm.world)
                gf = buf[:k] if n_f else None
                gr = buf[k:2 * k] if n_r else None
            if loss is None:
                return None
            if forget and gf is not None and gr is not None:
                a, b = gf.double(), gr.double()
                dot = torch.dot(a, b)
                g = (a - (dot / torch.dot(b, b)) * b if dot < 0 else a) + b
            elif not forget and gf is not None:
                a, b = gr.double(), gf.double()
                dot = torch.dot(a, b)
                g = a - (dot / torch.dot(b, b)) * b if dot < 0 else a
            else:
                g = gr if (gf is None or not forget) else gf
            with torch.no_grad():
                for _, p, loc, a, b in coords.parts:
                    p.grad = torch.zeros_like(p)
                    coords._index_copy(p.grad, loc, g[a:b].to(p.grad.dtype))
            return loss

        def take(block, forget=True):
            nonlocal done_steps, position
            for _ in range(block):
                (bz, zref), bzt = next(z), next(zt)
                br = next(rt) if rt is not None else None
                bz_dir = bz if (self.project and self.forget_weight > 0) else None  # a repair's direction to keep
                if not forget:  # a repair step: Z̃ and the retained text only
                    bz = None
                step_no = done_steps + 1

                def closure(bz=bz, zref=zref, bzt=bzt, br=br, step_no=step_no, bz_dir=bz_dir, forget=forget):
                    def finite(loss):
                        check_finite(loss.detach(), "unlearn: the targeted loss", suffix="the model was restored",
                                     where=lambda _: f"step {step_no}")

                    if self.project:  # both backward passes inside, .grad at S set
                        return projected(bz_dir, zref, bzt, br, forget, finite)
                    loss = objective(bz, zref, bzt, br)
                    if loss is None:
                        return None
                    finite(loss)
                    loss.backward()
                    return loss

                if not self.project:  # the projected step averages its two gradients over the group itself
                    closure = prob.synced(closure, "unlearn: a targeted step")
                opt.zero_grad()
                if sam:
                    _sam_step(opt, model, closure)
                else:
                    if closure() is None:
                        raise ValueError("Targeted: no loss term is active (every weight is 0, or only retain_weight "
                                         "without retain batches)")
                    if scale is not None:
                        _scale_selected_grad(prob.coords, scale)
                    opt.step()
                opt.zero_grad()
                if opt.last_step_skipped:
                    raise NonFiniteError("unlearn: the targeted rule hit a NaN/Inf gradient on the selection; the "
                                         "model was restored")
                used = [b for b in ((bz_dir if self.project else bz), bzt, br) if b is not None]
                npts = sum(batch_size(b) for b in used)
                prob.counts["grad"] += npts * (2 if sam else 1)
                prob.counts["passes"] += len(used) * (2 if sam else 1)
                done_steps += 1
                position += 1
            prob.info["steps_run"] = done_steps

        def check(phase):
            m = prob.agreed(lambda: self.monitor(position), "unlearn: the targeted rule's monitor")
            history.append({"step": position, "lr": lr, **m, "phase": phase,
                            "accepted": bool(m.get("within_budget", True))})
            return m

        def keep(m):  # the accepted state: θ_S, the optimizer state and the trajectory's length (O(k))
            nonlocal accepted
            accepted = (prob.coords.snapshot(), copy.deepcopy(opt.state_dict()), position)
            if self.on_keep is not None:
                self.on_keep(m)

        def undo():
            nonlocal position
            prob.coords.restore(accepted[0])
            opt.load_state_dict(accepted[1])
            position = accepted[2]

        def polish(m):
            """After the target: repair blocks kept while the target holds, within the budget, at a lower cost."""
            if not self.polish_steps or (self.correct_weight == 0 and rt is None):
                return
            cost, polished = m.get("cost"), 0
            while cost is not None and polished < self.polish_steps and done_steps < self.steps:
                n = min(self.check_every, self.polish_steps - polished, self.steps - done_steps)
                take(n, forget=False)
                polished += n
                m = check("polish")
                new = m.get("cost")
                ok = bool(m.get("done")) and bool(m.get("within_budget", True)) and new is not None and new < cost
                history[-1]["accepted"] = ok
                if not ok:
                    undo()
                    break
                keep(m)
                cost = new

        while done_steps < self.steps:
            take(min(self.check_every if self.monitor is not None else self.steps, self.steps - done_steps))
            if self.monitor is None:
                continue
            m = check("forget")
            ok = bool(m.get("within_budget", True))
            # over the budget: repair first (descent on Z̃ and the retained text, no forget term), and keep the
            # block if that brings the perplexity back while the score stays better than the last accepted one
            repaired = 0
            while not ok and repaired < self.repair_steps and done_steps < self.steps:
                n = min(self.check_every, self.repair_steps - repaired, self.steps - done_steps)
                take(n, forget=False)
                repaired += n
                m = check("repair")
                score = float(m.get("score", float("nan")))
                ok = bool(m.get("within_budget", True)) and (
                    prev_score is None or not math.isfinite(prev_score) or score < prev_score)
                history[-1]["accepted"] = ok
                if bool(m.get("within_budget", True)) and not ok:
                    break  # back within the budget, but the secret came back with it: undo
            if not ok:
                undo()
                lr /= 4.0
                if lr < self.lr_min:
                    prob.info["stopped_by"] = "budget"
                    break
                for g in opt.param_groups:
                    g["lr"] = lr
                continue
            keep(m)
            if m.get("done"):
                prob.info["stopped_by"] = "target"
                polish(m)
                break
            score = float(m.get("score", float("nan")))
            if not repaired and prev_score is not None and math.isfinite(score) and math.isfinite(prev_score) \
                    and score > prev_score - 0.1 * abs(prev_score):
                lr = min(2.0 * lr, self.lr_max)
                for g in opt.param_groups:
                    g["lr"] = lr
            prev_score = score
        prob.info["lr_final"] = lr
        prob.info["steps_accepted"] = position


RULE_REGISTRY = Registry("unlearning method")


def register_rule(cls: type) -> type:
    """Add a method config class (a frozen dataclass subclassing the rules' base, with a ``name`` and a ``delta`` or
    ``run``; docs/layout.md): ``unlearn(..., method=cls.name)`` and ``as_method(cls.name)`` then build it. Usable as a
    class decorator. ValueError for a name already taken."""
    if not (isinstance(cls, type) and issubclass(cls, _Rule) and cls.name):
        raise TypeError(f"register_rule: expected a method config class with a name, got {cls!r}")
    RULE_REGISTRY.register(cls.name, cls)
    return cls


for _cls in (FirstOrder, SecondOrder, DiagNewton, SAMFinetune, GradientAscent, Targeted):
    register_rule(_cls)
del _cls
assert RULE_REGISTRY.names() == METHODS


def as_method(method, **overrides) -> _Rule:
    """A method config from a config (returned as is, or a copy with ``overrides`` validated again) or a method name
    (its config with defaults, or with ``overrides``). Unknown names raise ValueError, other types TypeError, a field
    the method does not have TypeError."""
    if isinstance(method, str):
        if method not in RULE_REGISTRY:
            raise ValueError(f"unknown unlearning method {method!r}; choose one of {RULE_REGISTRY.names()}")
        cls = RULE_REGISTRY[method]
        return cls(**overrides)
    if isinstance(method, _Rule):
        if not overrides:
            return method
        cls = type(method)
        kw = {f.name: getattr(method, f.name) for f in fields(cls)}
        return cls(**{**kw, **overrides})
    if isinstance(method, type) and issubclass(method, _Rule):
        raise TypeError(f"method must be a config instance such as {method.__name__}() or a name, got the class")
    raise TypeError(f"method must be a method config (FirstOrder(...), ...) or one of {RULE_REGISTRY.names()}, "
                    f"got {type(method).__name__}")
