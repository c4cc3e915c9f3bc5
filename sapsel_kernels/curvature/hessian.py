"""Curvature scores: the diagonal of the Hessian by Hutchinson probes, and its sibling estimators.

What is estimated
-----------------
``data`` follows the batch rule of :mod:`sapsel_kernels.data` (a tensor, a tuple ``(x, y)`` or a dict is ONE batch;
a list, a DataLoader or another re-iterable is a sequence of batches), and ``loss_fn`` the loss rule
(``loss_fn(model, batch)`` -> the MEAN loss over the batch, a torch loss module such as ``nn.CrossEntropyLoss()``
for batches ``(*inputs, target)``, or None for a model whose output has ``.loss``). With batches b = 1..B the
objective is the **mean over batches**::

    L(theta) = (1 / B) * sum_b loss_fn(model, batch_b)

(every batch has the same weight, also a smaller last batch). ``hessian_diag`` estimates diag(d^2 L / d theta^2) over
the model's trainable parameters (a :class:`~sapsel_kernels.ParamSpace`: frozen parameters excluded, tied parameters
counted once), flat, in ParamSpace order. The "fisher" estimator is the exception: it weighs POINTS equally.

Model semantics during estimation: every module is put in eval mode (BatchNorm uses its running statistics and does
not update them; dropout is off) and restored afterwards, so H is the Hessian of the eval-mode loss; the math
scaled-dot-product-attention backend is forced (flash/efficient attention have no double backward / forward AD).
Buffers are read, never written. Hugging Face activation checkpointing (non-reentrant) stays ACTIVE in this eval
mode (:func:`estimation_mode`); what cannot run under it (``hvp="fwd_rev"``, ``"exact"``, reentrant checkpointing)
raises :class:`CheckpointingError` before anything runs.

Dtypes: the model runs in its own dtype (bf16 / fp16 included); every estimate is accumulated and returned in
float32 (float64 intermediates where noted), never in a 16-bit dtype.

Hutchinson: for Rademacher z (Philox stream keyed by (seed, probe, flat index), identical on every backend),
x = z (.) Hz has E[x] = diag(H) and Var[x_i] = sum_{j != i} H_ij^2. The fused op ``sapsel::hutchinson_accumulate``
regenerates z and folds x into float32 Welford accumulators (mean, M2) in one pass. The sampling loop (passes,
stopping rules, checkpoints, Ctrl-C) lives in :mod:`sapsel_kernels.probe_loop`, the estimators that read the data
once in :mod:`sapsel_kernels.estimators`, the HVPs in :mod:`sapsel_kernels.hvp`.

Data parallel (``group=``): every rank of a torch.distributed process group passes its own shard of the batches
(the same model, weights and arguments); the ranks' sums are all-reduced, so every rank returns the same estimate,
the one a single process computes over the concatenated batches (rank 0's, then rank 1's, ...) up to the order of
float additions. See :func:`hessian_diag` and docs/hessian.md "Data-parallel estimation".
"""

import hashlib
import math
import os
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..data import as_batches, make_loss
from .estimators import ESTIMATOR_REGISTRY, LOCAL, Comm
from .hvp import MODES, REENTRANT_FIX, CheckpointingError, auto_hvp_order  # noqa: F401  (API of this module)
from .modes import estimation_mode, hf_checkpointing, is_reentrant  # noqa: F401  (API of this module)
from .probe_loop import plan_probes, run_probe_loop
from ..space import ParamSpace

__all__ = ["hessian_diag", "DiagEstimate", "ProbeConfig", "StopRule", "Checkpoint", "estimation_mode",
           "auto_hvp_order", "ESTIMATORS", "CheckpointingError"]

# the built-in estimators, in registration order (estimators.ESTIMATOR_REGISTRY holds any added later)
ESTIMATORS = ESTIMATOR_REGISTRY.names()
HVP_MODES = ("auto",) + MODES


def _probed(estimator: str) -> bool:
    """Run by the probe loop (probes, seeds, stopping rules, checkpoints)."""
    return estimator in ESTIMATOR_REGISTRY and ESTIMATOR_REGISTRY[estimator].probed
# the defaults of hessian_diag; another value for an estimator that does not use it is refused
_DEFAULT_N_PROBES, _DEFAULT_SEED, _DEFAULT_EXACT_MAX = 32, 0, 4096


# ====================================================================================================== configs
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_field(owner: str, name: str, v, lo: int, none_ok: bool = True) -> None:
    """TypeError for a non-int (a bool included), ValueError below ``lo``."""
    if v is None and none_ok:
        return
    if not _is_int(v):
        raise TypeError(f"{owner}.{name} must be an int{' or None' if none_ok else ''}, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{owner}.{name} must be >= {lo}, got {v}")


def _float_field(owner: str, name: str, v, lo: float, hi: float | None, lo_open: bool, none_ok: bool = True) -> None:
    """TypeError for a non-number (a bool included), ValueError when NaN/Inf or outside (lo, hi] / [lo, hi]."""
    if v is None and none_ok:
        return
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"{owner}.{name} must be a number{' or None' if none_ok else ''}, got {type(v).__name__}")
    inside = (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
    if not math.isfinite(v) or not inside:
        left = "(" if lo_open else "["
        rng = (f"> {lo:g}" if lo_open else f">= {lo:g}") if hi is None else f"in {left}{lo:g}, {hi:g}]"
        raise ValueError(f"{owner}.{name} must be finite and {rng}, got {v}")


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """How the probes of "hutchinson" / "gauss_newton" are batched.

    * ``per_pass``: samples per pass (one vmapped HVP when vectorized); None: 1 without a stopping rule, a
      checkpoint or a group for "gauss_newton" and for "hutchinson" on one batch with un-vectorized HVPs (more
      would buy memory use, not speed), else min(budget, 8 on CPU / 16 on CUDA, memory cap) where the cap allows
      ``memory_cap_bytes`` for ~6 N-element buffers per probe (z, Hz and gradient-sized intermediates). A pass is
      the unit of accumulation, stopping checks and checkpoints; per_pass never changes the estimate's bits.
    * ``vectorize`` ("hutchinson" only): run a pass's probes as one vmapped HVP (True) or one HVP per probe (False).
      None: per probe for rev_rev on CPU (the gradient graph of a batch is shared by the probes either way, and the
      vmapped conv/BatchNorm double backward measured 1.4-2.4x slower per probe), vmapped otherwise. Results agree
      to float rounding either way.
    * ``memory_cap_bytes``: bytes the default ``per_pass`` may spend on per-probe buffers.
    * ``variance`` (every estimator: the one field the data-once estimators "grad_abs", "squared_grad", "fisher"
      and "exact" read; the others raise there): keep the second Welford accumulator M2 (True: ``est.var``,
      ``est.stderr``, the ``rtol`` stopping rule and checkpoints need it) or the running mean alone (False: N float32
      less at the peak, the loop users write keeps no more; ``est.m2`` is None and var / stderr raise). None (the
      default): True, except for a probed estimator ("hutchinson", "gauss_newton") whose budget is ONE sample
      without a stopping rule or a checkpoint, where M2 would stay 0 and var is NaN anyway: there the mean alone
      (``var`` / ``stderr`` stay NaN, as with M2). The mean's bits are the same either way. False refuses a stopping
      rule and a checkpoint.
    """

    per_pass: int | None = None
    vectorize: bool | None = None
    memory_cap_bytes: int = 1 << 30
    variance: bool | None = None

    def __post_init__(self):
        _int_field("ProbeConfig", "per_pass", self.per_pass, 1)
        if not isinstance(self.vectorize, (bool, type(None))):
            raise TypeError(f"ProbeConfig.vectorize must be None, True or False, got {self.vectorize!r}")
        if not isinstance(self.variance, (bool, type(None))):
            raise TypeError(f"ProbeConfig.variance must be None, True or False, got {self.variance!r}")
        _int_field("ProbeConfig", "memory_cap_bytes", self.memory_cap_bytes, 1, none_ok=False)


@dataclass(frozen=True, kw_only=True)
class StopRule:
    """Adaptive stopping for "hutchinson" / "gauss_newton": sample until a criterion holds after a pass.

    * ``rtol``: stop when ||stderr||_2 / ||mean||_2 < rtol;
    * ``stable_k`` or ``stable_fraction`` (k = ``resolve_k(N, fraction=...)``, the package's budget rule), with
      ``turnover_tol``, ``patience``, ``largest``: stop when the top-k set (largest or smallest means) changed by at
      most ``turnover_tol`` (a fraction of k) in ``patience`` consecutive passes;
    * ``max_probes`` (default 8 * n_probes): the cap; ``min_probes`` (default 2 passes): no stop before it.

    At least one criterion (rtol, stable_k, stable_fraction) is required (a fixed budget is ``n_probes=``), and
    turnover_tol / patience / largest other than their defaults need a top-k criterion.
    """

    rtol: float | None = None
    stable_k: int | None = None
    stable_fraction: float | None = None
    turnover_tol: float = 0.01
    patience: int = 2
    largest: bool = True
    max_probes: int | None = None
    min_probes: int | None = None

    def __post_init__(self):
        _float_field("StopRule", "rtol", self.rtol, 0.0, None, lo_open=True)
        _int_field("StopRule", "stable_k", self.stable_k, 1)
        _float_field("StopRule", "stable_fraction", self.stable_fraction, 0.0, 1.0, lo_open=True)
        _float_field("StopRule", "turnover_tol", self.turnover_tol, 0.0, 1.0, lo_open=False, none_ok=False)
        _int_field("StopRule", "patience", self.patience, 1, none_ok=False)
        if not isinstance(self.largest, bool):
            raise TypeError(f"StopRule.largest must be a bool, got {self.largest!r}")
        _int_field("StopRule", "max_probes", self.max_probes, 1)
        _int_field("StopRule", "min_probes", self.min_probes, 1)
        if self.stable_k is not None and self.stable_fraction is not None:
            raise ValueError("StopRule: give stable_k or stable_fraction, not both")
        topk = self.stable_k is not None or self.stable_fraction is not None
        if not topk and self.rtol is None:
            raise ValueError("StopRule needs a criterion: rtol, stable_k or stable_fraction (for a fixed number of "
                             "probes pass n_probes= and no stop rule)")
        if not topk and (self.turnover_tol != 0.01 or self.patience != 2 or self.largest is not True):
            raise ValueError("StopRule.turnover_tol, patience and largest apply to the top-k criterion: give "
                             "stable_k or stable_fraction")
        if self.max_probes is not None and self.min_probes is not None and self.min_probes > self.max_probes:
            raise ValueError(f"StopRule.min_probes ({self.min_probes}) must be <= max_probes ({self.max_probes})")


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """Save the state of "hutchinson" / "gauss_newton" sampling to ``path`` every ``every`` passes and at the end.

    ``resume=True`` continues from ``path`` (or starts afresh when it does not exist). A resumed run equals the
    uninterrupted one bit for bit; a checkpoint whose ParamSpace, weights (``ParamSpace.fingerprint()``), seed,
    estimator, per_pass, vectorize, hvp mode or top-k rule differ is refused with a ValueError, as is an unreadable
    file. The data is not fingerprinted: resume with the same batches.

    Under ``hessian_diag(group=...)`` only rank 0 writes ``path``; on resume every rank reads it (so it must be on a
    file system every rank sees: a file that exists on some ranks only is refused on every rank). The file records
    the world size; resuming with another world size (a single process included) is refused with a ValueError.
    """

    path: str | os.PathLike = field(kw_only=False)
    every: int = 1
    resume: bool = False

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)):
            raise TypeError(f"Checkpoint.path must be a str or os.PathLike, got {type(self.path).__name__}")
        _int_field("Checkpoint", "every", self.every, 1, none_ok=False)
        if not isinstance(self.resume, bool):
            raise TypeError(f"Checkpoint.resume must be a bool, got {self.resume!r}")


# ====================================================================================================== result
_FORMAT = "sapsel.DiagEstimate/2"


@dataclass
class DiagEstimate:
    """A diagonal curvature score over a ParamSpace.

    * ``mean``: flat float32 [N], the estimate (ParamSpace order);
    * ``m2``: flat float32 [N], Welford sum of squared deviations of the ``n_probes`` samples (None for an
      estimate made with ``ProbeConfig(variance=False)``: then var and stderr raise);
    * ``var``: per-coordinate unbiased sample variance of ONE sample (M2 / (n - 1)); for Hutchinson this estimates
      sum_{j != i} H_ij^2, for "fisher" it is the variance over points. NaN with fewer than 2 samples; 0 for
      deterministic estimators (grad_abs, exact);
    * ``stderr``: standard error of ``mean``, sqrt(var / n);
    * ``n_probes``: samples averaged (probes for hutchinson, label samples for gauss_newton, points for fisher,
      batches for squared_grad, 1 for grad_abs and exact);
    * ``info``: seed, hvp mode, stopping reason, history, timings (per estimator).
    """

    mean: torch.Tensor
    m2: torch.Tensor | None
    n_probes: int
    space: ParamSpace | None = None
    estimator: str = "hutchinson"
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    shard: Any = None  # distributed.ShardLayout of an FSDP2 estimate: mean / m2 are this rank's local flat vector

    @property
    def deterministic(self) -> bool:
        return self.estimator in ESTIMATOR_REGISTRY and not ESTIMATOR_REGISTRY[self.estimator].stochastic

    @property
    def var(self) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros_like(self.mean)
        if self.n_probes < 2:  # undefined with one sample, M2 kept or not
            return torch.full_like(self.mean, float("nan"))
        if self.m2 is None:
            raise ValueError("this estimate kept no variance (hessian_diag(..., probes=ProbeConfig(variance=False))): "
                             "var and stderr are not available; estimate with variance=True for them")
        return self.m2 / (self.n_probes - 1)

    @property
    def stderr(self) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return (self.var / max(self.n_probes, 1)).sqrt()

    @property
    def numel(self) -> int:
        """Entries of ``mean``: N, or this rank's share of it for an FSDP2 estimate (``shard`` set)."""
        return self.mean.numel()

    def views(self, what: str = "mean") -> dict[str, torch.Tensor]:
        """{parameter name: tensor shaped like the parameter} of ``mean`` (or ``"var"``, ``"stderr"``)."""
        if self.space is None:
            raise ValueError("this DiagEstimate has no ParamSpace attached; pass space= to DiagEstimate.load")
        if what not in ("mean", "var", "stderr", "m2"):
            raise ValueError(f"what must be 'mean', 'var', 'stderr' or 'm2', got {what!r}")
        if what == "m2" and self.m2 is None:
            raise ValueError("this estimate kept no M2 (ProbeConfig(variance=False))")
        if self.shard is not None:  # this rank's shards, shaped like each parameter's local shard
            flat, out = getattr(self, what), {}
            for name, p, a in zip(self.space.names, self.space.params, self.shard.local_starts):
                shape = p.to_local().shape
                out[name] = flat[a:a + shape.numel()].view(shape)
            return out
        return self.space.views(getattr(self, what))

    def save(self, path) -> None:
        if self.shard is not None:
            raise NotImplementedError("DiagEstimate.save: an FSDP2 estimate holds this rank's shards only; save "
                                      "each rank's est.mean / est.m2 with torch.save, or select on it directly")
        torch.save({"format": _FORMAT, "mean": self.mean.cpu(), "m2": None if self.m2 is None else self.m2.cpu(),
                    "n_probes": self.n_probes, "estimator": self.estimator, "seed": self.seed, "info": self.info,
                    "signature": self.space.signature if self.space is not None else None,
                    "names": list(self.space.names) if self.space is not None else None}, path)

    @classmethod
    def load(cls, path, space=None) -> "DiagEstimate":
        """Load a saved estimate (``weights_only=True``: no pickled code runs); ``space`` (a ParamSpace or a model)
        is attached after checking it matches. Files of format 1 name the "squared_grad" estimator "fisher" and
        are read under the new name. Raises ValueError for an unreadable, foreign or malformed file."""
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickle, zip and unpickler errors all mean "not an estimate"
            raise ValueError(f"{path}: cannot read a saved DiagEstimate: {_unreadable_why(path, exc)}") from exc
        fmt = d.get("format") if isinstance(d, dict) else None
        if fmt not in ("sapsel.DiagEstimate/1", _FORMAT):
            raise ValueError(f"{path}: not a saved DiagEstimate")
        mean, m2 = d.get("mean"), d.get("m2")
        if not (isinstance(mean, torch.Tensor) and (m2 is None or isinstance(m2, torch.Tensor)) and mean.dim() == 1
                and (m2 is None or m2.shape == mean.shape) and _is_int(d.get("n_probes"))
                and d.get("estimator") in ESTIMATOR_REGISTRY):
            raise ValueError(f"{path}: corrupt DiagEstimate file")
        estimator = d["estimator"]
        if fmt == "sapsel.DiagEstimate/1" and estimator == "fisher":
            estimator = "squared_grad"
        if space is not None and not isinstance(space, ParamSpace):
            space = ParamSpace(space)
        if space is not None:
            if d.get("signature") is not None and space.signature != d["signature"]:
                raise ValueError(f"{path}: saved for a ParamSpace with signature {d['signature']}, "
                                 f"got {space.signature} (different parameter names or shapes)")
            if space.numel != mean.numel():
                raise ValueError(f"{path}: {mean.numel()} scores, the ParamSpace has {space.numel} elements")
        return cls(mean=mean, m2=m2, n_probes=d["n_probes"], space=space, estimator=estimator,
                   seed=d.get("seed", 0), info=d.get("info") or {})

    def __repr__(self) -> str:
        n = f"N={self.numel:,}" if self.shard is None else \
            f"this rank's FSDP2 shards: {self.numel:,} of N={self.space.numel:,}"
        return (f"DiagEstimate({self.estimator}, {n}, n_probes={self.n_probes}, "
                f"stopped_by={self.info.get('stopped_by')!r})")


# ====================================================================================================== helpers
def _check_checkpointing(model: torch.nn.Module, estimator: str, hvp: str) -> int:
    """Refuse, before anything runs, what the model's Hugging Face activation checkpointing cannot do; returns the
    number of layers that will be checkpointed during the estimate (0: none)."""
    layers, others = hf_checkpointing(model)
    if not layers and not others:
        return 0
    reentrant = [m for m in layers + others if is_reentrant(m._gradient_checkpointing_func)]
    if reentrant:
        raise CheckpointingError(
            f"hessian_diag(estimator={estimator!r}): the model uses reentrant activation checkpointing "
            f"(use_reentrant=True, also torch's default when use_reentrant is not given; e.g. "
            f"{type(reentrant[0]).__name__}), which supports neither torch.autograd.grad nor double backward; "
            f"{REENTRANT_FIX}. Nothing was computed")
    if not layers:
        raise CheckpointingError(
            f"hessian_diag: the model has activation checkpointing enabled ({type(others[0]).__name__}."
            "gradient_checkpointing=True) in a form that checkpoints only in train mode (no "
            "transformers.GradientCheckpointingLayer: an older transformers or remote model code), and the estimate "
            "runs in eval mode, so checkpointing would silently be off; upgrade transformers, or call "
            "model.gradient_checkpointing_disable() for the estimate. Nothing was computed")
    if estimator == "exact" or (estimator == "hutchinson" and hvp == "fwd_rev"):
        what = "estimator='exact' (torch.func.hessian)" if estimator == "exact" else \
            "hvp='fwd_rev' (forward-over-reverse through torch.func)"
        fix = "use hvp='rev_rev' (reverse-over-reverse works with non-reentrant checkpointing; hvp='auto' picks " \
            "it), or " if estimator == "hutchinson" else ""
        raise CheckpointingError(
            f"hessian_diag: {what} cannot run under activation checkpointing (torch.func transforms support no "
            "saved-tensor hooks, and Hugging Face's enable_input_require_grads hook calls requires_grad_ inside the "
            f"transform); {fix}call model.gradient_checkpointing_disable() for the estimate. Nothing was computed")
    return len(layers)


def _check_arguments(estimator, n_probes, seed, hvp, probes, stop, checkpoint, progress, output_fn,
                     exact_max_numel) -> None:
    """Types and ranges, then the applicability rules (an argument the estimator would ignore is an error)."""
    if estimator not in ESTIMATOR_REGISTRY:
        hint = " (n_probes is keyword-only: hessian_diag(model, loss_fn, data, n_probes=...))" \
            if _is_int(estimator) else ""
        raise ValueError(f"estimator must be one of {ESTIMATOR_REGISTRY.names()}, got {estimator!r}{hint}")
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
    if not _is_int(n_probes) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive int, got {n_probes!r}")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    if not _is_int(exact_max_numel) or exact_max_numel < 1:
        raise ValueError(f"exact_max_numel must be a positive int, got {exact_max_numel!r}")
    for name, v, cls in (("probes", probes, ProbeConfig), ("stop", stop, StopRule),
                         ("checkpoint", checkpoint, Checkpoint)):
        if v is not None and not isinstance(v, cls):
            raise TypeError(f"{name} must be a sapsel_kernels.{cls.__name__} or None, got {type(v).__name__}")
    if not isinstance(progress, (bool, type(None))):
        raise TypeError(f"progress must be None, True or False, got {progress!r}")
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be callable output_fn(model, batch) -> logits, got {type(output_fn).__name__}")

    def refuse(what: str, applies_to: str):
        raise ValueError(f"{what} does not apply to estimator={estimator!r} (only to {applies_to})")

    probed = _probed(estimator)
    if not probed:
        for name, v in (("stop", stop), ("checkpoint", checkpoint)):
            if v is not None:
                refuse(f"{name}=", "'hutchinson' and 'gauss_newton'")
        if probes is not None and probes != ProbeConfig(variance=probes.variance):
            # the data-once estimators read ProbeConfig.variance only (one switch for every estimator)
            refuse("ProbeConfig fields other than variance", "'hutchinson' and 'gauss_newton'")
        if n_probes != _DEFAULT_N_PROBES:
            refuse("n_probes", "'hutchinson' and 'gauss_newton'")
        if seed != _DEFAULT_SEED:
            refuse("seed", "'hutchinson' and 'gauss_newton'")
    if hvp != "auto" and estimator != "hutchinson":
        refuse(f"hvp={hvp!r}", "'hutchinson'")
    if estimator == "gauss_newton":
        if output_fn is None:
            raise ValueError("estimator='gauss_newton' needs output_fn(model, batch) -> logits [..., C] "
                             "(softmax cross-entropy likelihood; labels are sampled from the model)")
        if probes is not None and probes.vectorize is not None:
            refuse("ProbeConfig.vectorize", "'hutchinson' (gauss_newton computes no HVP)")
    elif output_fn is not None:
        refuse("output_fn", "'gauss_newton'")
    if progress and not ESTIMATOR_REGISTRY[estimator].progress:
        refuse("progress=True", "'hutchinson', 'gauss_newton' and 'fisher'")
    if exact_max_numel != _DEFAULT_EXACT_MAX and estimator != "exact":
        refuse("exact_max_numel", "'exact'")
    if probes is not None and probes.variance is False:
        for name, v in (("a stopping rule (stop=)", stop), ("checkpoint=", checkpoint)):
            if v is not None:
                raise ValueError(f"ProbeConfig(variance=False) keeps no M2, which {name} needs; drop one of them")


def resolve_variance(probes: ProbeConfig, estimator: str, n_probes: int, stop, checkpoint) -> ProbeConfig:
    """``probes`` with ``variance`` decided (see :class:`ProbeConfig`): None -> False for a probed estimator with a
    one-sample budget and neither a stopping rule nor a checkpoint, else True."""
    if probes.variance is not None:
        return probes
    lean = _probed(estimator) and n_probes == 1 and stop is None and checkpoint is None
    return dataclasses.replace(probes, variance=not lean)


def comm_for(group) -> Comm:
    """``group`` -> the Comm of this call (raises TypeError / ValueError locally: no collective has run yet)."""
    if group is None:
        return LOCAL
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group= needs an initialised torch.distributed process group: call "
                         "torch.distributed.init_process_group(...) first (or pass group=None for one process)")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("this process is not a member of the group passed as group= (new_group(ranks) returns "
                         "NON_GROUP_MEMBER on the other ranks): call hessian_diag only on the group's ranks")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD) or "
                        f"None, got {type(group).__name__}")
    return Comm(group)


def _unreadable_why(path, exc: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, in words: a truncated archive (torch.save writes a zip whose
    directory sits at the end, so a cut-off copy starts with the zip magic but has no directory), an empty file, or
    the loader's own message."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return f"{type(exc).__name__}: {exc}"
    if not head:
        return "the file is empty"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return "the file is truncated (a torch.save archive whose end is missing: an interrupted copy or write?)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"not a torch.save file of an estimate ({type(exc).__name__}: {first[:200]})"


def unwrap_model(model: torch.nn.Module, space, what: str = "hessian_diag") -> tuple[torch.nn.Module, ParamSpace]:
    """(the module the estimators call, the ParamSpace over it).

    A DistributedDataParallel model is replaced by ``model.module``: DDP supports neither double backward nor
    ``torch.autograd.grad``, and its forward may broadcast buffers (a collective per call); the estimators run on
    the plain module and do their own reduction. A ``space`` built on the DDP wrapper (names ``module.*``) is
    re-keyed to the module's names (same tensors). Sharded parameters (FSDP, DTensor) are refused.
    """
    inner = model
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        inner = model.module
    elif type(model).__name__ == "FullyShardedDataParallel":
        raise ValueError(f"{what} does not support FSDP-wrapped models (sharded flat parameters): run it on a "
                         "replicated copy of the model with group=")
    if space is None:
        space = ParamSpace(inner)
    elif not isinstance(space, ParamSpace):
        raise TypeError(f"space must be a ParamSpace or None, got {type(space).__name__}")
    elif inner is not model and all(n.startswith("module.") for n in space.names):
        space = ParamSpace(dict(zip([n[len("module."):] for n in space.names], space.params)))
    if space is not None:
        space.check_belongs_to(inner, what)
    if any(p.is_meta for p in space.params):
        raise ValueError(f"{what}: the model's parameters are on the meta device (not materialised); load its "
                         "weights first (e.g. model.to_empty(device='cpu') and load_state_dict)")
    if any(type(p).__name__ == "DTensor" for p in space.params):
        raise ValueError(f"{what} does not support sharded parameters (DTensor: FSDP2 fully_shard, tensor "
                         "parallel): run it on a replicated copy of the model with group=")
    return inner, space


def _buffers_digest(model: torch.nn.Module) -> str:
    """A hash of the model's buffers (BatchNorm running statistics enter the eval-mode loss): per buffer its name,
    shape, dtype and sum (float buffers also the 2-norm)."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, b in model.named_buffers():
            h.update(f"{name}:{tuple(b.shape)}:{b.dtype};".encode())
            if b.numel() == 0:
                continue
            if b.is_floating_point():
                stats = torch.stack([b.sum(), torch.linalg.vector_norm(b)]).double()
            else:
                stats = b.sum().double().reshape(1)
            h.update(stats.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _descriptor(estimator, n_probes, seed, hvp, probes, stop, checkpoint, output_fn, exact_max_numel, space,
                inner, batches) -> dict:
    """What must agree across the ranks (everything but the data), plus this rank's batch count (``batches``)."""
    desc = {
        "number of trainable parameters": space.numel,
        "parameter names and shapes (ParamSpace.signature)": space.signature,
        "parameter dtypes": [str(d) for d in space.dtypes],
        "weights (ParamSpace.fingerprint)": space.fingerprint(),
        "buffers (running statistics, ...)": _buffers_digest(inner),
        "estimator": estimator, "n_probes": n_probes, "seed": seed, "hvp": hvp,
        "probes": repr(probes), "stop": repr(stop),
        "checkpoint (every, resume)": None if checkpoint is None else (checkpoint.every, checkpoint.resume),
        "output_fn given": output_fn is not None, "exact_max_numel": exact_max_numel,
    }
    if _probed(estimator):
        desc["resolved (max_probes, per_pass, min_probes, stable_k)"] = plan_probes(
            space, n_probes, probes if probes is not None else ProbeConfig(), stop, estimator, False, checkpoint)
    nb = None
    if estimator == "gauss_newton":  # label samples are keyed by the GLOBAL batch index: the ranks' offsets
        try:
            nb = len(batches)
        except TypeError:
            nb = sum(1 for _ in batches)
    return {"agree": desc, "batches": nb}


def check_agreement(descs: list[dict], what: str = "hessian_diag") -> None:
    """The same ValueError on every rank (built from the gathered descriptors) when the ranks disagree."""
    diffs, keys = [], list(descs[0]["agree"])
    keys += [k for d in descs for k in d["agree"] if k not in keys]
    for key in keys:
        vals = [d["agree"].get(key) for d in descs]
        if any(v != vals[0] for v in vals):
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(vals[:8]))
            diffs.append(f"{key} ({shown}{', ...' if len(vals) > 8 else ''})")
    if diffs:
        raise ValueError(f"{what}(group=...): the ranks disagree on " + "; ".join(diffs) + ". Every rank must "
                         "pass the same arguments and hold the same parameters and buffers (DDP broadcasts them "
                         "from rank 0 when it wraps the model; else torch.distributed.broadcast each one from rank "
                         "0); only the data differs across ranks")


def _hessian_diag_fsdp(model, loss_fn, data, estimator, n_probes, seed, hvp, probes, stop, checkpoint, space,
                       progress, output_fn, exact_max_numel, group) -> "DiagEstimate":
    """``hessian_diag`` on an FSDP2 model (see :mod:`sapsel_kernels.fsdp`): collective over the mesh's group."""
    from ..selection.distributed import ShardLayout
    from .fsdp import FSDP_ESTIMATORS, fsdp_estimate

    t0 = time.perf_counter()
    _check_arguments(estimator, n_probes, seed, hvp, probes, stop, checkpoint, progress, output_fn, exact_max_numel)
    if estimator not in FSDP_ESTIMATORS:
        why = ("it needs per-point gradients, which FSDP2's reduce-scatter sums over the ranks before they can be "
               "squared" if estimator == "fisher" else
               "it needs Hessian-vector products, i.e. double backward through parameters FSDP2 has resharded "
               "(and torch.autograd.grad with respect to DTensor shards fails)")
        raise ValueError(f"hessian_diag(estimator={estimator!r}) cannot run on an FSDP2 (fully_shard) model: {why}. "
                         f"Supported under FSDP2: {FSDP_ESTIMATORS}; or estimate on a replicated (DDP) copy with "
                         "group=")
    for name, value in (("stop", stop), ("checkpoint", checkpoint), ("probes", probes)):
        if value is not None:
            raise NotImplementedError(f"hessian_diag on an FSDP2 model: {name}= is not supported")
    if progress:
        raise NotImplementedError("hessian_diag on an FSDP2 model: progress=True is not supported (no progress bar)")
    if space is None:
        space = ParamSpace(model)
    elif not isinstance(space, ParamSpace):
        raise TypeError(f"space must be a ParamSpace or None, got {type(space).__name__}")
    layout = ShardLayout(space, "hessian_diag")
    comm = comm_for(group if group is not None else layout.group)
    if comm.world != dist.get_world_size(layout.group):
        raise ValueError(f"hessian_diag: group= has {comm.world} ranks, the model's FSDP2 mesh "
                         f"{dist.get_world_size(layout.group)}")
    comm.device = space.device
    loss = make_loss(loss_fn)

    def prepare():
        batches = as_batches(data, passes="many" if estimator == "gauss_newton" else "once")
        if estimator != "gauss_newton":
            batches = list(batches)  # counted for the agreement: one global batch = every rank's b-th batch
        try:
            nb = len(batches)
        except TypeError:
            nb = sum(1 for _ in batches)
        desc = {"number of trainable parameters": space.numel, "parameter names and shapes": space.signature,
                "parameter dtypes": [str(d) for d in space.dtypes], "estimator": estimator, "n_probes": n_probes,
                "seed": seed, "output_fn given": output_fn is not None,
                "number of batches (FSDP2: one global batch = every rank's b-th batch)": nb}
        if nb == 0:
            raise ValueError("hessian_diag: the data yielded no batches")
        return batches, {"agree": desc}

    batches, descs = comm.exchange(prepare, "hessian_diag")
    check_agreement(descs)
    with estimation_mode(model):
        est = fsdp_estimate(model, loss, batches, space, layout, estimator, comm, n_probes=n_probes, seed=seed,
                            output_fn=output_fn)
    est.info.update(world_size=comm.world, seconds=time.perf_counter() - t0)
    return DiagEstimate(est.mean, est.m2, est.count, space, estimator, seed if estimator == "gauss_newton" else 0,
                        est.info, shard=layout)


# ====================================================================================================== main entry
def hessian_diag(model: torch.nn.Module, loss_fn, data, estimator: str = "hutchinson", *,
                 n_probes: int = _DEFAULT_N_PROBES, seed: int = _DEFAULT_SEED, hvp: str = "auto",
                 probes: ProbeConfig | None = None, stop: StopRule | None = None, checkpoint: Checkpoint | None = None,
                 space: ParamSpace | None = None, progress: bool | None = None, output_fn=None,
                 exact_max_numel: int = _DEFAULT_EXACT_MAX, group=None) -> DiagEstimate:
    """Estimate a diagonal curvature of L = mean over batches of ``loss_fn(model, batch)`` (module docstring).

    Args:
        model, loss_fn, data: the batch and loss rules of :mod:`sapsel_kernels.data`. "hutchinson" and
            "gauss_newton" read the data once per pass (a one-shot iterator raises TypeError); the other estimators
            read it once (an iterator is accepted). A loss that does not depend on the parameters raises ValueError.
        estimator:
            * ``"hutchinson"`` (default): unbiased diag(H), Rademacher probes;
            * ``"gauss_newton"``: diagonal of the generalized Gauss-Newton matrix for a softmax cross-entropy,
              Gauss-Newton-Bartlett estimator (labels sampled from the model, sample = B * g (.) g); needs
              ``output_fn(model, batch) -> logits [..., C]``; ``loss_fn`` is not called (the likelihood is fixed);
            * ``"squared_grad"``: mean over batches of the squared batch-mean gradient (one backward per batch);
            * ``"fisher"``: diagonal EMPIRICAL Fisher, mean over all points of the squared per-point gradient (each
              point a batch of one), per-point gradients by ``vmap(grad)`` with a one-backward-per-point fallback;
              ``var`` is the variance over points;
            * ``"grad_abs"``: |dL/dtheta|;
            * ``"exact"``: diag of ``torch.func.hessian`` per batch (N <= ``exact_max_numel``).
        n_probes: samples when no stop rule is given; the budget base (max_probes = 8 * n_probes) with one.
        seed: probes (label samples) are a function of (seed, probe index, flat index) only.
        hvp: ``"fwd_rev"`` (jvp of grad), ``"rev_rev"`` (grad of grad), ``"fd"`` (a central finite difference of
            two gradients: no double backward or forward AD needed, bias O(ε²), see :mod:`sapsel_kernels.hvp`),
            ``"auto"`` (tries one mode, then the other, then fd, with a logged reason kept in
            ``info["hvp_fallback_reason"]``, when an HVP raises; CPU tries rev_rev first, accelerators fwd_rev, see
            :func:`auto_hvp_order`). ``info["hvp"]`` is the mode used.
        probes: :class:`ProbeConfig` (probes per pass, vectorize, memory cap).
        stop: :class:`StopRule` (rtol / top-k stability, max_probes, min_probes).
        checkpoint: :class:`Checkpoint` (path, every, resume).
        space: the ParamSpace (default ``ParamSpace(model)``).
        progress: tqdm bar with samples, ETA and the current relative standard error / top-k turnover (None: only
            on a terminal). ``info["history"]`` keeps the same numbers per pass.
        output_fn: "gauss_newton" only. exact_max_numel: "exact" only.
        group: None (one process) or a ``torch.distributed`` ProcessGroup (``torch.distributed.group.WORLD``):
            data-parallel estimation, a collective call that every rank of the group makes with ITS OWN shard of
            the data and the same model, weights, buffers and arguments (checked at the start: a mismatch raises the
            same ValueError on every rank). Every rank returns the same estimate: the single-process estimate over
            the concatenated batches, rank 0's first (float-rounding level differences: the sums across ranks are
            added in another order). Per pass of "hutchinson" / "gauss_newton" one all_reduce of the [per_pass, N]
            sums of the rank's batches; "squared_grad" and "fisher" merge the ranks' Welford states (parallel
            variance formula); "grad_abs" and "exact" all_reduce their sums. An error on one rank raises on every
            rank (that rank: its own exception; the others: ValueError naming it) instead of a hang; Ctrl-C on any
            rank stops every rank after the same pass. A DistributedDataParallel model is estimated through
            ``model.module`` (DDP has no double backward; ``loss_fn`` gets the plain module). Checkpoints: rank 0
            writes, every rank reads, another world size is refused. A rank that dies or stops calling makes the
            others wait for the process group's timeout (``init_process_group(timeout=...)``).
            An FSDP2 (``fully_shard``) model runs "squared_grad", "grad_abs" and "gauss_newton" sharded, collectively
            over its mesh (``group`` optional): see :mod:`sapsel_kernels.fsdp`; the estimate holds this rank's
            shards only (``DiagEstimate.shard``). Other estimators raise ValueError there.

    Applicability: an argument the estimator would ignore raises ValueError: ``probes``, ``stop``, ``checkpoint``
    and non-default ``n_probes`` / ``seed`` only for "hutchinson" and "gauss_newton"; ``hvp`` other than "auto"
    and ``ProbeConfig.vectorize`` only for "hutchinson"; ``output_fn`` only (and always) for "gauss_newton";
    ``progress=True`` only for "hutchinson", "gauss_newton" and "fisher"; a non-default ``exact_max_numel`` only
    for "exact".

    Half precision: a bf16 / fp16 model runs its forward, gradients and HVPs in its dtype; the estimate is float32
    (the Welford accumulators are float32, "hutchinson" sums the batches' products in float32 when a parameter is
    16-bit, "gauss_newton" in float32), so it differs from the float32 model's by 16-bit arithmetic rounding only.

    Activation checkpointing: a Hugging Face model with ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=
    {"use_reentrant": False})`` stays checkpointed during the estimate although it runs in eval mode (see
    :func:`estimation_mode`; ``info["checkpointed_layers"]``), for "rev_rev" HVPs and every gradient-based estimator;
    ``hvp="auto"`` then uses "rev_rev". ``hvp="fwd_rev"`` and "exact" (torch.func) cannot run under it, and reentrant
    checkpointing supports no ``torch.autograd.grad``: both raise :class:`CheckpointingError` (a ValueError and a
    RuntimeError) naming the fix, before anything runs (reentrant checkpointing inside the user's own forward: at the
    first gradient). It lowers the peak of the gradient-based estimators, not of the HVPs (the create-graph backward
    keeps the recomputed activations for the second backward).

    Returns a :class:`DiagEstimate` (float32 [N] mean and M2 in ParamSpace order, also for 16-bit models).

    Raises: ValueError (bad or inapplicable arguments, a loss without parameter dependence, a refused checkpoint,
    ranks that disagree or a rank that failed under ``group``; :class:`CheckpointingError` for activation
    checkpointing that cannot run the estimator or HVP mode),
    TypeError (a one-shot iterator for a multi-pass estimator, a wrong config type, a ``group`` that is not a
    ProcessGroup),
    :class:`~sapsel_kernels.NonFiniteError` (a non-finite HVP, gradient or sample; nothing is accumulated).

    Ctrl-C ("hutchinson", "gauss_newton") returns the estimate over the passes finished so far, with
    ``info["stopped_by"] == "interrupted"`` (and a final checkpoint when one is configured); callers that must not
    act on a partial estimate check it. The other estimators propagate KeyboardInterrupt.

    Peak extra memory (N trainable parameters, ``elem`` bytes per parameter element; "the fold" = the Welford
    update, 4 float32 chunks of at most 2^22 elements, 64 MiB, whatever N is):
        * "hutchinson": two float32 accumulators (mean, M2: 8 N bytes) + a per_pass x N probe buffer in the
          parameter dtype (float32 when dtypes are mixed) + one batch's per_pass x N products + the HVP's own
          buffers (vmapped: per-probe activation tangents; rev_rev: the gradient graph, kept across passes for a
          single batch); with several batches or a group, + a per_pass x N buffer of the products summed over
          batches (parameter dtype, float32 when a parameter is 16-bit). Default per_pass: 1 without a stopping
          rule, checkpoint or group for one batch and un-vectorized HVPs (the CPU default: then 8 N bytes + one
          probe + one product + the graph; measured on CPU: within the create_graph loop's peak + 3 N float32,
          tests/curvature/test_memory_contracts.py), else the largest value <= 8 (16 on CUDA) with
          6 x per_pass x N x elem
          <= ``ProbeConfig.memory_cap_bytes``;
        * "gauss_newton": 8 N bytes of accumulators + a per_pass x N float32 sum (float64 only for float64
          parameters; per_pass = 1 by default without a stopping rule, checkpoint or group) + one backward's
          gradients + one tensor's
          squared gradient + the fold;
        * "fisher": 8 N bytes of accumulators + C x N per-point gradients and their squares (float64 when a
          parameter is float64, else float32) with C = min(64, 2^28 / (3 N elem)) points per vmapped call, plus
          vmap's per-point activations and the fold;
        * "squared_grad": 8 N bytes + one backward's gradients + the fold (squares formed per chunk in float32);
          "grad_abs": a float32 sum (N) + the result (N float32) + one backward's gradients;
        * "exact": an N x N Hessian in the parameter dtype per batch (N <= ``exact_max_numel``).
        * under ``group``: nothing more for "hutchinson" / "gauss_newton" / "grad_abs" / "exact" (the sums are
          all-reduced in place); "squared_grad" / "fisher" merge chunk by chunk (2 x 32 MiB of float64).
        * FSDP2: per rank, 8 bytes per local shard element ("squared_grad", "gauss_newton": mean and M2 in float32;
          "gauss_newton" also one sample sum, 4 or 8 bytes; "grad_abs": one sum and the result) plus FSDP2's own
          unsharded parameters and gradients of one backward.
    """
    from ..selection.distributed import is_dtensor

    if any(is_dtensor(p) for p in model.parameters()):
        return _hessian_diag_fsdp(model, loss_fn, data, estimator, n_probes, seed, hvp, probes, stop, checkpoint,
                                  space, progress, output_fn, exact_max_numel, group)
    comm = comm_for(group)

    def prepare():
        _check_arguments(estimator, n_probes, seed, hvp, probes, stop, checkpoint, progress, output_fn,
                         exact_max_numel)
        inner, sp = unwrap_model(model, space)
        n_ckpt = _check_checkpointing(inner, estimator, hvp)
        loss = make_loss(loss_fn)
        batches = as_batches(data, passes="many" if _probed(estimator) else "once")
        desc = _descriptor(estimator, n_probes, seed, hvp, probes, stop, checkpoint, output_fn, exact_max_numel, sp,
                           inner, batches) if comm.active else None
        return (inner, sp, loss, batches, n_ckpt), desc

    t0 = time.perf_counter()
    (inner, space, loss, batches, n_ckpt), descs = comm.exchange(prepare, "hessian_diag")
    hvp_run = "rev_rev" if n_ckpt and hvp == "auto" else hvp  # fwd_rev cannot run under checkpointing
    batch0 = 0
    if comm.active:
        check_agreement(descs)
        comm.device = space.device
        if estimator == "gauss_newton":
            batch0 = sum(d["batches"] for d in descs[:comm.rank])
        if comm.rank != 0:
            progress = False  # one progress bar per group
    probes = resolve_variance(probes if probes is not None else ProbeConfig(), estimator, n_probes, stop, checkpoint)
    variance = probes.variance
    with estimation_mode(model):
        spec = ESTIMATOR_REGISTRY[estimator]
        if spec.probed:
            est = run_probe_loop(inner, loss, batches, space, estimator, n_probes=n_probes, seed=seed, hvp=hvp_run,
                                 probes=probes, stop=stop,
                                 checkpoint=checkpoint, progress=progress, output_fn=output_fn, comm=comm,
                                 batch0=batch0)
        else:
            est = spec.run(inner, loss, batches, space, comm, variance=variance, progress=progress,
                           exact_max_numel=exact_max_numel)
    if comm.active:
        est.info["world_size"] = comm.world
    if n_ckpt:
        est.info["checkpointed_layers"] = n_ckpt
    est.info["seconds"] = time.perf_counter() - t0
    return DiagEstimate(est.mean, est.m2, est.count, space, estimator, seed if _probed(estimator) else 0, est.info)
