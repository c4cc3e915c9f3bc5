"""Curvature scores: the diagonal of the Hessian by Hutchinson probes, and its sibling estimators.

What is estimated
-----------------
``data`` is one batch (a Tensor, a tuple or a dict) or a sequence of batches (a list, a DataLoader or any other
iterable; a one-shot iterator is read once into a list). With batches b = 1..B and ``loss_fn(model, batch)`` the MEAN
loss over a batch, the objective is the **mean over batches**::

    L(theta) = (1 / B) * sum_b loss_fn(model, batch_b)

(every batch has the same weight, also a smaller last batch). ``hessian_diag`` estimates diag(d^2 L / d theta^2) over
the model's trainable parameters (a :class:`~sapsel_kernels.ParamSpace`: frozen parameters excluded, tied parameters
counted once), flat, in ParamSpace order.

Model semantics during estimation: every module is put in eval mode (BatchNorm uses its running statistics and does
not update them; dropout is off) and restored afterwards, so H is the Hessian of the eval-mode loss; the math
scaled-dot-product-attention backend is forced (flash/efficient attention have no double backward / forward AD).
Buffers are read, never written.

Hutchinson: for Rademacher z (Philox stream keyed by (seed, probe, flat index), identical on every backend),
x = z (.) Hz has E[x] = diag(H) and Var[x_i] = sum_{j != i} H_ij^2. The fused op ``sapsel::hutchinson_accumulate``
regenerates z and folds x into float32 Welford accumulators (mean, M2) in one pass.
"""

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops  # noqa: F401  (registers torch.ops.sapsel.*)
from .hvp import HVP, gradient
from .space import ParamSpace

log = logging.getLogger("sapsel_kernels.hessian")

ESTIMATORS = ("hutchinson", "gauss_newton", "fisher", "grad_abs", "exact")
HVP_MODES = ("auto", "fwd_rev", "rev_rev")
_STOCHASTIC = ("hutchinson", "gauss_newton", "fisher")
_MODE_NAMES = {"fwd_rev": "forward-over-reverse", "rev_rev": "reverse-over-reverse"}


def auto_hvp_order(device: torch.device) -> tuple[str, str]:
    """(first, fallback) HVP modes that ``hvp="auto"`` tries on ``device``.

    CPU: reverse-over-reverse first. With the gradient graph reused it was the faster mode on every benchmark model
    (MLP, CNN + BatchNorm, transformer; bench/results/hessian_cpu_full.md), and double backward covers more ops than
    forward AD. Accelerators: forward-over-reverse first (one fused forward + backward with dual numbers, the
    faster mode on GPUs in published comparisons; no GPU measurement of ours exists yet).
    """
    return ("rev_rev", "fwd_rev") if torch.device(device).type == "cpu" else ("fwd_rev", "rev_rev")


# ====================================================================================================== result
@dataclass
class DiagEstimate:
    """A diagonal curvature score over a ParamSpace.

    * ``mean``: flat float32 [N], the estimate (ParamSpace order);
    * ``m2``: flat float32 [N], Welford sum of squared deviations of the ``n_probes`` samples;
    * ``var``: per-coordinate unbiased sample variance of ONE sample (M2 / (n - 1)); for Hutchinson this estimates
      sum_{j != i} H_ij^2. NaN with fewer than 2 samples; 0 for deterministic estimators (grad_abs, exact);
    * ``stderr``: standard error of ``mean``, sqrt(var / n);
    * ``n_probes``: samples averaged (probes for hutchinson, label samples for gauss_newton, batches for fisher);
    * ``info``: estimator, seed, hvp mode, stopping reason, history, timings.
    """

    mean: torch.Tensor
    m2: torch.Tensor
    n_probes: int
    space: ParamSpace | None = None
    estimator: str = "hutchinson"
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def deterministic(self) -> bool:
        return self.estimator not in _STOCHASTIC

    @property
    def var(self) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros_like(self.mean)
        if self.n_probes < 2:
            return torch.full_like(self.mean, float("nan"))
        return self.m2 / (self.n_probes - 1)

    @property
    def stderr(self) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return (self.var / max(self.n_probes, 1)).sqrt()

    @property
    def numel(self) -> int:
        return self.mean.numel()

    def views(self, what: str = "mean") -> dict[str, torch.Tensor]:
        """{parameter name: tensor shaped like the parameter} of ``mean`` (or ``"var"``, ``"stderr"``)."""
        if self.space is None:
            raise ValueError("this DiagEstimate has no ParamSpace attached; pass space= to DiagEstimate.load")
        return self.space.views(getattr(self, what))

    def save(self, path) -> None:
        torch.save({"format": "sapsel.DiagEstimate/1", "mean": self.mean.cpu(), "m2": self.m2.cpu(),
                    "n_probes": self.n_probes, "estimator": self.estimator, "seed": self.seed, "info": self.info,
                    "signature": self.space.signature if self.space is not None else None,
                    "names": list(self.space.names) if self.space is not None else None}, path)

    @classmethod
    def load(cls, path, space=None) -> "DiagEstimate":
        """Load a saved estimate; ``space`` (a ParamSpace or a model) is attached after checking it matches."""
        d = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code from a file
        if not isinstance(d, dict) or d.get("format") != "sapsel.DiagEstimate/1":
            raise ValueError(f"{path}: not a saved DiagEstimate")
        if space is not None and not isinstance(space, ParamSpace):
            space = ParamSpace(space)
        if space is not None:
            if d["signature"] is not None and space.signature != d["signature"]:
                raise ValueError(f"{path}: saved for a ParamSpace with signature {d['signature']}, "
                                 f"got {space.signature} (different parameter names or shapes)")
            if space.numel != d["mean"].numel():
                raise ValueError(f"{path}: {d['mean'].numel()} scores, the ParamSpace has {space.numel} elements")
        return cls(mean=d["mean"], m2=d["m2"], n_probes=d["n_probes"], space=space, estimator=d["estimator"],
                   seed=d["seed"], info=d["info"])

    def __repr__(self) -> str:
        return (f"DiagEstimate({self.estimator}, N={self.numel:,}, n_probes={self.n_probes}, "
                f"stopped_by={self.info.get('stopped_by')!r})")


# ====================================================================================================== helpers
def _as_batches(data):
    """One batch (Tensor / tuple / dict) -> [data]; a list or re-iterable -> itself; a one-shot iterator -> list."""
    if isinstance(data, (torch.Tensor, tuple, dict)):
        return [data]
    if isinstance(data, list):
        if not data:
            raise ValueError("data is an empty list of batches")
        return data
    if isinstance(data, Iterator):  # generator / iterator: it can be read only once, and we need several passes
        return list(data)
    return data


@contextlib.contextmanager
def estimation_mode(model: torch.nn.Module):
    """Eval mode for every module (restored per module afterwards) and the math SDPA backend."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel(SDPBackend.MATH)
        except ImportError:  # pragma: no cover - very old torch
            ctx = contextlib.nullcontext()
        with ctx:
            yield
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def _defer_sigint():
    """Hold Ctrl-C while the accumulators are being updated so that they never hold half a pass."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    hit = []
    prev = signal.signal(signal.SIGINT, lambda s, f: hit.append(s))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, prev)
    if hit:
        raise KeyboardInterrupt


def _seed_for(seed: int, *parts) -> int:
    h = hashlib.blake2b(":".join(str(int(p)) for p in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _welford_plain_(mean: torch.Tensor, m2: torch.Tensor, x: torch.Tensor, count: int):
    """Welford step on float32 flat tensors for samples that are not probe products (sibling estimators)."""
    x = x.to(torch.float32)
    delta = x - mean
    mean.add_(delta / (count + 1))
    m2.add_(delta * (x - mean))


def _check_finite(ts, what):
    # One fused reduction per tensor; a finite sum proves every element finite. A non-finite sum is confirmed
    # element-wise (a sum of huge finite values may overflow).
    for t in ts:
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise FloatingPointError(f"hessian_diag: {what} contains NaN/Inf (loss not finite at these parameters?); "
                                     "the accumulators were not updated")


# ====================================================================================================== main entry
def hessian_diag(model: torch.nn.Module, loss_fn, data, n_probes: int = 32, estimator: str = "hutchinson",
                 seed: int = 0, hvp: str = "auto", *, space: ParamSpace | None = None,
                 probes_per_pass: int | None = None, vectorize: bool | None = None,
                 memory_cap_bytes: int = 1 << 30, max_probes: int | None = None, min_probes: int | None = None,
                 rtol: float | None = None,
                 stable_k: int | None = None, stable_fraction: float | None = None,
                 turnover_tol: float = 0.01, patience: int = 2, largest: bool = True,
                 checkpoint=None, checkpoint_every: int = 1, resume: bool = False, progress: bool | None = None,
                 output_fn=None, exact_max_numel: int = 4096) -> DiagEstimate:
    """Estimate diag(H) of L = mean over batches of ``loss_fn(model, batch)`` (see the module docstring).

    Args:
        model, loss_fn, data: ``loss_fn(model, batch) -> scalar`` mean loss; data one batch or an iterable of them.
        n_probes: samples to average when no stopping rule is given (Hutchinson probes / GNB label samples).
        estimator: ``"hutchinson"`` (unbiased diag(H), default); ``"gauss_newton"`` (diagonal of the generalized
            Gauss-Newton matrix for a softmax cross-entropy, Gauss-Newton-Bartlett estimator: labels sampled from the
            model, sample = B * g(.)g; needs ``output_fn(model, batch) -> logits [..., C]``); ``"fisher"`` (empirical
            Fisher: mean over batches of the squared batch gradient); ``"grad_abs"`` (|dL/dtheta|); ``"exact"``
            (``torch.func.hessian``; N <= ``exact_max_numel``).
        seed: probes are a function of (seed, probe index, flat index) only.
        hvp: ``"fwd_rev"`` (jvp of grad), ``"rev_rev"`` (grad of grad), ``"auto"`` (tries one mode and falls back to
            the other with a logged reason, kept in ``info["hvp_fallback_reason"]``, if the first HVP raises; CPU
            tries rev_rev first, accelerators fwd_rev, see :func:`auto_hvp_order`). ``info["hvp"]`` is the mode used.
        probes_per_pass: probes per pass (one vmapped HVP when vectorized); default min(n, 8 on CPU / 16 on CUDA,
            memory cap) where the cap allows ``memory_cap_bytes`` for the O(m N) probe and product buffers
            (per-probe activation tangents are extra). A pass is the unit of accumulation, stopping checks and
            checkpoints.
        vectorize: run a pass's probes as one vmapped HVP (True) or one HVP per probe (False). None (default):
            per probe for rev_rev on CPU (the gradient graph of a batch is shared by the probes either way, and the
            vmapped conv/BatchNorm double backward measured 1.4-2.4x slower per probe), vmapped otherwise. Results
            agree to float rounding either way.
        max_probes, min_probes: with a stopping rule, probes run until it fires, capped at ``max_probes``
            (default 8 * n_probes) and never fewer than ``min_probes`` (default 2 passes).
        rtol: stop when ||stderr||_2 / ||mean||_2 < rtol.
        stable_k / stable_fraction, turnover_tol, patience, largest: stop when the top-k set (largest or smallest
            means) changed by at most ``turnover_tol`` (fraction of k) in ``patience`` consecutive passes.
        checkpoint, checkpoint_every, resume: save (mean, M2, count, seed, next probe, stopping state) to
            ``checkpoint`` every ``checkpoint_every`` passes; ``resume=True`` continues from it (or starts afresh
            when the file does not exist). A resumed run equals the uninterrupted one bit for bit (same
            probes_per_pass and vectorize, same data).
        progress: tqdm bar with probes, ETA and the current relative standard error / top-k turnover
            (None: only on a terminal). ``info["history"]`` keeps the same numbers per pass.
    Ctrl-C returns the estimate over the probes finished so far (``info["stopped_by"] == "interrupted"``).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if hvp not in HVP_MODES:
        raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
    if vectorize not in (None, True, False):
        raise ValueError(f"vectorize must be None, True or False, got {vectorize!r}")
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive int, got {n_probes!r}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    if stable_k is not None and stable_fraction is not None:
        raise ValueError("give stable_k or stable_fraction, not both")
    if stable_fraction is not None and not 0 < stable_fraction <= 1:
        raise ValueError(f"stable_fraction must be in (0, 1], got {stable_fraction}")
    if rtol is not None and rtol <= 0:
        raise ValueError(f"rtol must be > 0, got {rtol}")
    space = space if space is not None else ParamSpace(model)
    if stable_k is not None and not 1 <= stable_k <= space.numel:
        raise ValueError(f"stable_k must be in [1, {space.numel}], got {stable_k}")
    batches = _as_batches(data)
    if checkpoint is None and resume:
        raise ValueError("resume=True needs checkpoint=<path>")

    t0 = time.perf_counter()
    with estimation_mode(model):
        if estimator == "grad_abs":
            est = _grad_abs(model, loss_fn, batches, space)
        elif estimator == "exact":
            est = _exact(model, loss_fn, batches, space, exact_max_numel)
        elif estimator == "fisher":
            est = _fisher(model, loss_fn, batches, space)
        else:
            est = _ProbeLoop(model, loss_fn, batches, space, estimator, n_probes, int(seed), hvp, probes_per_pass,
                             vectorize, memory_cap_bytes, max_probes, min_probes, rtol, stable_k, stable_fraction,
                             turnover_tol, patience, largest, checkpoint, checkpoint_every, resume, progress,
                             output_fn).run()
    est.info["seconds"] = time.perf_counter() - t0
    return est


# ====================================================================================================== siblings
def _mean_gradient(model, loss_fn, batches, space):
    acc, nb = None, 0
    for b in batches:
        g = gradient(model, loss_fn, space, b)
        _check_finite(g, "a gradient")
        acc = g if acc is None else [a + x for a, x in zip(acc, g)]
        nb += 1
    if nb == 0:
        raise ValueError("data has no batches")
    return [a / nb for a in acc], nb


def _grad_abs(model, loss_fn, batches, space):
    g, nb = _mean_gradient(model, loss_fn, batches, space)
    mean = space.gather([x.abs() for x in g])
    return DiagEstimate(mean, torch.zeros_like(mean), 1, space, "grad_abs", 0, {"batches": nb})


def _fisher(model, loss_fn, batches, space):
    mean = torch.zeros(space.numel, dtype=torch.float32, device=space.device)
    m2 = torch.zeros_like(mean)
    nb = 0
    for b in batches:
        g = gradient(model, loss_fn, space, b)
        _check_finite(g, "a gradient")
        _welford_plain_(mean, m2, space.gather([x * x for x in g], dtype=torch.float64), nb)
        nb += 1
    if nb == 0:
        raise ValueError("data has no batches")
    return DiagEstimate(mean, m2, nb, space, "fisher", 0, {"batches": nb})


def _exact(model, loss_fn, batches, space, limit):
    n = space.numel
    if n > limit:
        raise ValueError(f"estimator='exact' builds the full N x N Hessian: N = {n:,} parameters exceeds "
                         f"exact_max_numel = {limit:,} ({n * n * 8 / 2**30:.1f} GiB in float64). Use "
                         "estimator='hutchinson', or raise exact_max_numel if you have the memory.")
    dtype = space.dtypes[0]
    if any(d != dtype for d in space.dtypes):
        raise TypeError("estimator='exact' needs all parameters in one dtype")
    from .hvp import _LossModule

    wrapper = _LossModule(model, loss_fn)
    keys = ["model." + nm for nm in space.names]
    flat0 = space.gather(dtype=dtype)
    diag, nb = torch.zeros(n, dtype=torch.float64, device=space.device), 0
    for b in batches:
        def f(flat, b=b):
            ps = {k: flat[o:o + c].view(s) for k, o, c, s in zip(keys, space.offsets, space.numels, space.shapes)}
            return torch.func.functional_call(wrapper, ps, (b,), strict=False)

        h = torch.func.hessian(f)(flat0)
        diag += torch.diagonal(h).to(torch.float64)
        nb += 1
        del h
    mean = (diag / nb).to(torch.float32)
    return DiagEstimate(mean, torch.zeros_like(mean), 1, space, "exact", 0, {"batches": nb})


# ====================================================================================================== probe loop
class _ProbeLoop:
    """Hutchinson / Gauss-Newton-Bartlett sampling with batched passes, stopping rules, progress and checkpoints."""

    def __init__(self, model, loss_fn, batches, space, estimator, n_probes, seed, hvp, probes_per_pass, vectorize,
                 memory_cap_bytes, max_probes, min_probes, rtol, stable_k, stable_fraction, turnover_tol, patience,
                 largest, checkpoint, checkpoint_every, resume, progress, output_fn):
        self.model, self.loss_fn, self.batches, self.space = model, loss_fn, batches, space
        self.estimator, self.seed = estimator, seed
        if estimator == "gauss_newton" and output_fn is None:
            raise ValueError("estimator='gauss_newton' needs output_fn(model, batch) -> logits [..., C] "
                             "(softmax cross-entropy likelihood; labels are sampled from the model)")
        self.output_fn = output_fn
        n = space.numel
        self.k = stable_k if stable_k is not None else (
            max(1, round(stable_fraction * n)) if stable_fraction is not None else None)
        self.rtol, self.turnover_tol, self.patience, self.largest = rtol, turnover_tol, patience, largest
        adaptive = self.k is not None or rtol is not None
        self.max_probes = max_probes if max_probes is not None else (8 * n_probes if adaptive else n_probes)
        if self.max_probes < 1:
            raise ValueError(f"max_probes must be >= 1, got {self.max_probes}")
        self.adaptive = adaptive
        elem = max(torch.finfo(d).bits // 8 for d in space.dtypes)
        if probes_per_pass is None:
            # Memory grows linearly with the probes per pass (z, Hz, and with vmapped HVPs per-probe activation
            # tangents) while the time per probe stops improving early: on CPUs 8 probes per vmapped pass measured
            # as fast per probe as 32 with ~1/4 of the peak memory (bench/test_bench_hessian.py); GPUs get 16.
            cap = max(1, memory_cap_bytes // max(1, 6 * n * elem))  # z, Hz, and ~4 gradient-sized intermediates
            default = 16 if space.device.type == "cuda" else 8
            probes_per_pass = int(min(self.max_probes, default, cap))
        if probes_per_pass < 1:
            raise ValueError(f"probes_per_pass must be >= 1, got {probes_per_pass}")
        self.ppp = probes_per_pass
        self.min_probes = min_probes if min_probes is not None else min(self.max_probes, 2 * self.ppp)
        self.hvp_mode = hvp
        self.vectorize = vectorize
        self.checkpoint, self.checkpoint_every, self.progress = checkpoint, max(1, checkpoint_every), progress
        self.mean = torch.zeros(n, dtype=torch.float32, device=space.device)
        self.m2 = torch.zeros_like(self.mean)
        self.count = 0
        self.prev_top: torch.Tensor | None = None
        self.stable_passes = 0
        self.history = []
        self._hvp = None
        self._zbuf = None
        self._single_batch = isinstance(batches, list) and len(batches) == 1
        if resume and os.path.exists(checkpoint):
            self._load(checkpoint)

    # ------------------------------------------------------------------ checkpoint
    def _state(self):
        return {"format": "sapsel.hessian_checkpoint/1", "mean": self.mean.cpu(), "m2": self.m2.cpu(),
                "count": self.count, "seed": self.seed, "next_probe": self.count, "estimator": self.estimator,
                "signature": self.space.signature, "probes_per_pass": self.ppp, "vectorize": self.vectorize,
                "prev_top": None if self.prev_top is None else self.prev_top.cpu(),
                "stable_passes": self.stable_passes, "history": self.history, "hvp": self.hvp_mode}

    def _save(self, path):
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(self._state(), tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint

    def _load(self, path):
        d = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code from a file
        if not isinstance(d, dict) or d.get("format") != "sapsel.hessian_checkpoint/1":
            raise ValueError(f"{path}: not a hessian_diag checkpoint")
        for key, mine in (("signature", self.space.signature), ("seed", self.seed), ("estimator", self.estimator),
                          ("probes_per_pass", self.ppp), ("vectorize", self.vectorize)):
            if d.get(key) != mine:
                raise ValueError(f"checkpoint {path} has {key}={d[key]!r}, this run has {mine!r}; "
                                 "resuming would not reproduce the uninterrupted run")
        self.mean.copy_(d["mean"])
        self.m2.copy_(d["m2"])
        self.count = d["count"]
        self.prev_top = None if d["prev_top"] is None else d["prev_top"].to(self.mean.device)
        self.stable_passes, self.history = d["stable_passes"], list(d["history"])
        if self.hvp_mode == "auto" and d["hvp"] != "auto":
            self.hvp_mode = d["hvp"]  # the mode the interrupted run settled on
        log.info("resumed from %s at probe %d", path, self.count)

    # ------------------------------------------------------------------ one pass
    def _hutchinson_pass(self, p0: int, m: int):
        space = self.space
        dt = space.dtypes[0] if all(d == space.dtypes[0] for d in space.dtypes) else torch.float32
        # One probe buffer [ppp, N], refilled in place every pass (a fresh tensor per pass costs page faults
        # comparable to the fill itself); the last, shorter pass uses its leading rows.
        if self._zbuf is None:
            self._zbuf = torch.empty(self.ppp, space.numel, dtype=dt, device=space.device)
        z = self._zbuf[:m]
        torch.ops.sapsel.rademacher_fill(z, 0, p0, self.seed, True)
        tangents = [v if v.dtype == d else v.to(d) for v, d in zip(space.views(z).values(), space.dtypes)]
        total, nb = None, 0
        for b in self.batches:
            hz = self._hvp_call(tangents, b)
            total = hz if total is None else [t + h for t, h in zip(total, hz)]
            nb += 1
        if total is None:
            raise ValueError("data has no batches")
        del z, tangents
        if nb > 1:
            total = [t / nb for t in total]
        _check_finite(total, "a Hessian-vector product")
        with _defer_sigint():
            for h, off, n in zip(total, space.offsets, space.numels):
                torch.ops.sapsel.hutchinson_accumulate_batched(self.mean[off:off + n], self.m2[off:off + n],
                                                               h.reshape(m, n), off, p0, self.seed, self.count)
            self.count += m

    def _make_hvp(self, mode):
        # CPU, reverse-over-reverse: each batch's gradient graph is built once per pass (once per run with a single
        # batch) and every probe of the pass reuses it, so vmapping the double backward saves no forward/backward.
        # Per probe measured 1.4-2.4x faster on conv + BatchNorm (the batched convolution double backward is slow on
        # CPU), as fast on an MLP, and 0-15% slower on a small transformer; see bench/results/hessian_cpu*.
        vectorize = self.vectorize
        if vectorize is None:
            vectorize = not (self.space.device.type == "cpu" and mode == "rev_rev")
        return HVP(self.model, self.loss_fn, self.space, mode, vectorize=vectorize,
                   reuse_graph=self._single_batch)

    def _hvp_call(self, tangents, batch):
        if self._hvp is None:
            if self.hvp_mode != "auto":
                self._hvp = self._make_hvp(self.hvp_mode)
            else:
                first, second = auto_hvp_order(self.space.device)
                self._hvp = self._make_hvp(first)
                try:
                    out = self._hvp(tangents, batch)
                    self.hvp_mode = first
                    return out
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure of forward AD / double backward: fall back
                    log.warning("%s HVP failed (%s: %s); falling back to %s", _MODE_NAMES[first],
                                type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", _MODE_NAMES[second])
                    self._fallback_reason = f"{first}: {type(exc).__name__}: {exc}"
                    self._hvp = self._make_hvp(second)
                    self.hvp_mode = second
        return self._hvp(tangents, batch)

    def _gnb_pass(self, p0: int, m: int):
        """Gauss-Newton-Bartlett: per sample s and batch b, labels y ~ softmax(logits); x_s = mean_b B_b g_b(.)g_b."""
        space = self.space
        samples = []
        for s in range(p0, p0 + m):
            acc, nb = None, 0
            for bi, b in enumerate(self.batches):
                with torch.enable_grad():
                    logits = self.output_fn(self.model, b)
                    logits = logits.reshape(-1, logits.shape[-1])
                    with torch.no_grad():
                        probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
                        gen = torch.Generator(device=probs.device).manual_seed(_seed_for(self.seed, s, bi))
                        y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                    loss = torch.nn.functional.cross_entropy(logits, y)
                    gs = torch.autograd.grad(loss, space.params, allow_unused=True)
                g = space.gather([torch.zeros_like(p) if x is None else x for x, p in zip(gs, space.params)],
                                 dtype=torch.float64)
                x = logits.shape[0] * g * g
                acc = x if acc is None else acc + x
                nb += 1
            samples.append(acc / nb)
        _check_finite(samples, "a Gauss-Newton sample")
        with _defer_sigint():
            for j, x in enumerate(samples):
                _welford_plain_(self.mean, self.m2, x, self.count + j)
            self.count += m

    # ------------------------------------------------------------------ stopping rules
    def _check_stop(self):
        rec = {"probes": self.count}
        stop = None
        if self.k is not None:
            top = torch.topk(self.mean, self.k, largest=self.largest, sorted=False).indices
            if self.prev_top is not None:
                mask = torch.zeros(self.mean.numel(), dtype=torch.bool, device=self.mean.device)
                mask[self.prev_top] = True
                turnover = 1.0 - int(mask[top].sum()) / self.k
                rec["turnover"] = turnover
                self.stable_passes = self.stable_passes + 1 if turnover <= self.turnover_tol else 0
                if self.stable_passes >= self.patience and self.count >= self.min_probes:
                    stop = "topk_stable"
            self.prev_top = top
        if self.count >= 2:  # always recorded: the progress bar's "current stability" and info["history"]
            se = (self.m2 / (self.count - 1) / self.count).sqrt()
            rse = float(se.norm() / self.mean.norm().clamp_min(1e-30))
            rec["rel_stderr"] = rse
            if self.rtol is not None and rse < self.rtol and self.count >= self.min_probes and stop is None:
                stop = "rtol"
        self.history.append(rec)
        return stop, rec

    # ------------------------------------------------------------------ driver
    def run(self) -> DiagEstimate:
        stopped_by = None
        bar = None
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_probes, initial=self.count, unit="probe", desc=f"hessian_diag[{self.estimator}]",
                       disable=(None if self.progress is None else not self.progress), leave=False)
        except ImportError:  # pragma: no cover
            pass
        passes = 0
        try:
            while self.count < self.max_probes:
                m = min(self.ppp, self.max_probes - self.count)
                if self.estimator == "hutchinson":
                    self._hutchinson_pass(self.count, m)
                else:
                    self._gnb_pass(self.count, m)
                passes += 1
                stop, rec = self._check_stop()
                if bar is not None:
                    bar.update(m)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k != "probes"}, refresh=False)
                if self.checkpoint is not None and passes % self.checkpoint_every == 0:
                    self._save(self.checkpoint)
                if stop is not None:
                    stopped_by = stop
                    break
            else:
                stopped_by = "max_probes" if self.adaptive else "n_probes"
        except KeyboardInterrupt:
            if self.count == 0:
                raise
            log.warning("hessian_diag interrupted: keeping the estimate over the %d probes done", self.count)
            stopped_by = "interrupted"
        finally:
            if bar is not None:
                bar.close()
        if self.checkpoint is not None:
            self._save(self.checkpoint)
        info = {"stopped_by": stopped_by, "hvp": self.hvp_mode if self.estimator == "hutchinson" else None,
                "probes_per_pass": self.ppp, "history": self.history}
        if self._hvp is not None:
            info["vectorize"] = self._hvp.vectorize  # False after a failed batched double backward, too
        if getattr(self, "_fallback_reason", None):
            info["hvp_fallback_reason"] = self._fallback_reason
        return DiagEstimate(self.mean, self.m2, self.count, self.space, self.estimator, self.seed, info)
