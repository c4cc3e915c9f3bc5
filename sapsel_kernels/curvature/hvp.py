"""Hessian-vector products of ``loss_fn(model, batch)`` with respect to a ParamSpace: the package's one HVP engine.

* :class:`HVP`: several probes per call over the whole space, in three modes. For tangents V (one [m, *shape] tensor
  per parameter, row j = probe j) it returns H V in the same layout.

  * ``"fwd_rev"`` (forward-over-reverse): ``torch.func.jvp`` of ``torch.func.grad`` of a ``functional_call`` of the
    model, ``vmap``-ed over the m probes. One forward + one backward pass carrying dual numbers.
  * ``"rev_rev"`` (reverse-over-reverse): ``g = torch.autograd.grad(loss, params, create_graph=True)`` and then
    ``torch.autograd.grad(g, params, grad_outputs=V, is_grads_batched=True)`` (a loop over the probes with
    ``vectorize=False`` or when an op has no batching rule for its double backward). ``backward(create_graph=True)``
    is never used: it leaves a reference cycle between the parameters and their ``.grad`` graphs.

  * ``"fd"`` (central finite difference): ``(∇L(θ + εv) − ∇L(θ − εv)) / 2ε``, two plain gradients per probe and
    no double backward or forward AD, so it runs wherever a gradient does (flash / SDPA attention kernels without
    a double backward, fused ops). One step per probe, ``ε = c · ‖θ‖ / ‖v‖`` with ``c = FD_REL_STEP[dtype]``
    (measured, see there): each coordinate moves by about c × the RMS of the weights. A step per
    tensor would give D⁻¹HDv instead of Hv. The difference is taken in float64. Bias: O(ε²) third derivatives.
    Measured in float32 and float64 only: with 16-bit weights the shifted points θ ± εv are themselves rounded to
    16 bits, so the step taken is not εv and the product can be off by tens of percent.

* :class:`FallbackHVP`: ``HVP`` with the mode chosen by ``"auto"`` (:func:`auto_hvp_order`), falling back to the
  other mode and then to ``"fd"`` when a product raises.
* :class:`RestrictedHVP`: v_S -> (H v)_S for v zero outside a flat index set S, H the Hessian of the SUMMED loss
  (reverse-over-reverse); the product a conjugate-gradient solve on S needs.

The caller is responsible for the model's mode (eval) and the attention backend (math); see ``hessian.py``.
``loss_fn`` is anything :func:`sapsel_kernels.data.make_loss` accepts.

Activation checkpointing: non-reentrant ``torch.utils.checkpoint`` works with ``"rev_rev"`` (the first backward
recomputes the checkpointed regions, with ``create_graph=True``) and with :func:`gradient`; ``"fwd_rev"`` cannot run
under it (torch.func transforms support no saved-tensor hooks). Reentrant checkpointing supports neither
``torch.autograd.grad`` nor double backward: torch's error is re-raised as :class:`CheckpointingError` naming the fix.
``hessian.hessian_diag`` refuses both cases before estimating when it can see them (Hugging Face models).
"""

import logging
import math
from collections.abc import Sequence

import torch

from ..data import LossError, as_batches, batch_size, make_loss
from ..errors import check_finite

log = logging.getLogger("sapsel_kernels.hvp")

MODES = ("fwd_rev", "rev_rev", "fd")
MODE_NAMES = {"fwd_rev": "forward-over-reverse", "rev_rev": "reverse-over-reverse",
              "fd": "finite-difference (two gradients)"}
# The central difference's step relative to the weights (ε = c·‖θ‖/‖v‖), per dtype (the lowest precision among the
# parameters): c balances truncation O(ε²) against rounding O(eps/ε). The textbook c = eps^(1/3) (float32 4.9e-3,
# float64 6e-6) was measured worse on a 2-layer GPT-2 (bench/hvp_fd_bias.py): relative error of H v vs a float64
# rev_rev, float32: 2e-4 (c = 1e-4), 6e-5 (3e-4 and 1e-3), 6e-4 (3e-3), 6e-3 (1e-2); float64: 1e-4 (3e-5),
# 2e-5 (1e-4), 1e-5 (3e-4), 5e-5 (1e-3). The backward's own rounding is far above the machine epsilon.
FD_REL_STEP = {torch.float64: 1e-4, torch.float32: 5e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

REENTRANT_FIX = ("enable non-reentrant checkpointing instead: model.gradient_checkpointing_enable("
                 "gradient_checkpointing_kwargs={'use_reentrant': False}) for a Hugging Face model, "
                 "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) in your own code (or disable "
                 "checkpointing for the estimate)")


class CheckpointingError(ValueError, RuntimeError):
    """The model's activation checkpointing cannot run the requested computation (reentrant checkpointing with
    ``torch.autograd.grad`` / double backward, or a torch.func mode under checkpointing). A ValueError (a
    configuration problem) and a RuntimeError (what torch itself raises for it); the message names the fix."""


def _reentrant_error(exc: BaseException, what: str) -> CheckpointingError | None:
    """torch's "use_reentrant=True ... incompatible with .grad()" RuntimeError as a CheckpointingError, else None."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and "use_reentrant=True" in text and "checkpoint" in text:
        return CheckpointingError(f"{what}: the model runs reentrant activation checkpointing (use_reentrant=True, "
                                  f"also torch's default when use_reentrant is not given), which supports neither "
                                  f"torch.autograd.grad nor double backward; {REENTRANT_FIX}")
    return None


def auto_hvp_order(device: torch.device) -> tuple[str, str]:
    """(first, fallback) HVP modes that ``hvp="auto"`` tries on ``device``.

    CPU: reverse-over-reverse first. With the gradient graph reused it was the faster mode on every benchmark model
    (MLP, CNN + BatchNorm, transformer; bench/results/hessian_cpu_full.md), and double backward covers more ops than
    forward AD. Accelerators: forward-over-reverse first (one fused forward + backward with dual numbers, the
    faster mode on GPUs in published comparisons; no GPU measurement of ours exists yet).
    """
    return ("rev_rev", "fwd_rev") if torch.device(device).type == "cpu" else ("fwd_rev", "rev_rev")


def default_vectorize(device: torch.device, mode: str) -> bool:
    """Whether a pass's probes go through one vmapped HVP by default: not for rev_rev on CPU.

    There each batch's gradient graph is built once per pass (once per run with a single batch) and every probe
    reuses it, so vmapping the double backward saves no forward/backward; per probe it measured 1.4-2.4x faster on
    conv + BatchNorm (the batched convolution double backward is slow on CPU), as fast on an MLP and 0-15% slower
    on a small transformer (bench/results/hessian_cpu*).
    """
    return not (torch.device(device).type == "cpu" and mode == "rev_rev")


class LossModule(torch.nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so that ``functional_call`` can swap the model's parameters
    (keys ``"model.<name>"``) while ``loss_fn`` keeps calling the model as usual."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_loss_fn", loss_fn)  # not registered even if it is a Module

    def forward(self, batch):
        return self._loss_fn(self.model, batch)


def _zeros_like_batched(p: torch.Tensor, m: int) -> torch.Tensor:
    return torch.zeros((m, *p.shape), dtype=p.dtype, device=p.device)


class HVP:
    """H V for the Hessian of ``loss_fn(model, batch)`` w.r.t. ``space.params`` (one batch per call).

    ``__call__(tangents, batch)``: tangents is a list (ParamSpace order) of [m, *shape] tensors in each parameter's
    dtype; returns a list of fresh [m, *shape] tensors in the parameters' dtype (the caller may modify them).
    ``vectorize``: the m probes go through one vmapped HVP (True) or one HVP each (False); a batched double
    backward that raises sets it to False and loops. ``reuse_graph`` (rev_rev): keep the create_graph gradient
    graph of the last batch across calls, so a call with the same batch object costs one (batched) double backward
    instead of forward + backward + double backward; the graph is freed with this object.
    """

    def __init__(self, model: torch.nn.Module, loss_fn, space, mode: str = "fwd_rev", vectorize: bool = True,
                 reuse_graph: bool = False):
        if mode not in MODES:
            raise ValueError(f"HVP mode must be one of {MODES}, got {mode!r}")
        self.model, self.loss_fn, self.space, self.mode = model, make_loss(loss_fn), space, mode
        self.vectorize = vectorize
        self.reuse_graph = reuse_graph
        self._graph = None
        self._wrapper = LossModule(model, self.loss_fn)
        self._keys = ["model." + n for n in space.names]

    def _fwd_rev(self, tangents: Sequence[torch.Tensor], batch) -> list[torch.Tensor]:
        primals = tuple(p.detach() for p in self.space.params)
        keys, wrapper = self._keys, self._wrapper

        def loss_of(ps):
            return torch.func.functional_call(wrapper, dict(zip(keys, ps)), (batch,), strict=False)

        grad_f = torch.func.grad(loss_of)

        def hvp_one(ts):
            return torch.func.jvp(grad_f, (primals,), (ts,))[1]

        m = tangents[0].shape[0]
        if m == 1 or not self.vectorize:
            rows = [hvp_one(tuple(t[j] for t in tangents)) for j in range(m)]
            return [torch.stack([r[k] for r in rows]) for k in range(len(primals))]
        return list(torch.func.vmap(hvp_one)(tuple(tangents)))

    def _rev_rev(self, tangents: Sequence[torch.Tensor], batch) -> list[torch.Tensor]:
        params = self.space.params
        m = tangents[0].shape[0]
        if self._graph is not None and self._graph[0] is batch:
            grads, live = self._graph[1], self._graph[2]
        else:
            with torch.enable_grad():
                loss = self.loss_fn(self.model, batch)
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            # A gradient that does not depend on the parameters (None, or outside the graph) contributes H_i. = 0.
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if self.reuse_graph:
                self._graph = (batch, grads, live)
        keep = self.reuse_graph
        if not live:
            return [_zeros_like_batched(p, m) for p in params]
        outs = [grads[i] for i in live]
        res = None
        if m > 1 and self.vectorize:
            try:
                res = torch.autograd.grad(outs, params, grad_outputs=[tangents[i] for i in live],
                                          is_grads_batched=True, allow_unused=True, retain_graph=True)
            except RuntimeError as exc:  # an op without a batching rule for its double backward
                log.warning("batched reverse-over-reverse HVP failed (%s); looping over the %d probes instead",
                            str(exc).splitlines()[0], m)
                self.vectorize = False
        if res is None:
            rows = []
            for j in range(m):
                rows.append(torch.autograd.grad(outs, params, grad_outputs=[tangents[i][j] for i in live],
                                                allow_unused=True, retain_graph=keep or j < m - 1))
            if m == 1:  # a view, not a copy (one probe per call is the CPU default), unless it aliases its tangent
                res = [None if h is None else
                       (h.clone() if h.untyped_storage().data_ptr() == tangents[k].untyped_storage().data_ptr()
                        else h).unsqueeze(0) for k, h in enumerate(rows[0])]
            else:
                res = [None if rows[0][k] is None else torch.stack([r[k] for r in rows]) for k in range(len(params))]
            del rows
        return [_zeros_like_batched(p, m) if h is None else h.detach() for h, p in zip(res, params)]

    def _fd(self, tangents: Sequence[torch.Tensor], batch) -> list[torch.Tensor]:
        params = self.space.params
        m = tangents[0].shape[0]
        dtypes = [p.dtype for p in params]
        c = max(FD_REL_STEP.get(dt, FD_REL_STEP[torch.float32]) for dt in dtypes)
        with torch.no_grad():
            theta = math.sqrt(sum(float(torch.linalg.vector_norm(p.detach().double()) ** 2) for p in params))
        out = [_zeros_like_batched(p, m) for p in params]
        keys, wrapper = self._keys, self._wrapper

        def grad_at(shifted):
            with torch.enable_grad():
                loss = torch.func.functional_call(wrapper, dict(zip(keys, shifted)), (batch,), strict=False)
                g = grad_params(loss, shifted, "the finite-difference HVP's gradient")
            return [torch.zeros_like(s) if gi is None else gi.detach() for gi, s in zip(g, shifted)]

        for j in range(m):
            v = [t[j] for t in tangents]
            vn = math.sqrt(sum(float(torch.linalg.vector_norm(x.double()) ** 2) for x in v))
            if vn == 0.0:
                continue
            eps = c * (theta if theta > 0 else math.sqrt(self.space.numel)) / vn
            plus = grad_at([(p.detach() + eps * x).requires_grad_(True) for p, x in zip(params, v)])
            minus = grad_at([(p.detach() - eps * x).requires_grad_(True) for p, x in zip(params, v)])
            for k in range(len(params)):
                out[k][j] = ((plus[k].double() - minus[k].double()) / (2.0 * eps)).to(out[k].dtype)
            del plus, minus
        return out

    def __call__(self, tangents: Sequence[torch.Tensor], batch) -> list[torch.Tensor]:
        try:
            if self.mode == "fwd_rev":
                return self._fwd_rev(tangents, batch)
            if self.mode == "fd":
                return self._fd(tangents, batch)
            return self._rev_rev(tangents, batch)
        except RuntimeError as exc:
            err = _reentrant_error(exc, f"the {MODE_NAMES[self.mode]} HVP (hvp={self.mode!r})")
            if err is not None:
                raise err from exc
            raise


class FallbackHVP:
    """:class:`HVP` whose mode is ``"fwd_rev"``, ``"rev_rev"``, ``"fd"`` or ``"auto"``.

    ``"auto"`` builds the first mode of :func:`auto_hvp_order` and, if the FIRST product raises (an op without
    forward AD or without a double backward), logs the reason, keeps it in ``fallback_reason`` and tries the other
    mode, then ``"fd"`` (two gradients, no second-order autograd); the first that works is used from then on.
    ``mode`` is the mode in use (``"auto"`` until the first call, and again after a call where every mode failed).
    ``vectorize=None`` means :func:`default_vectorize` for the mode.
    """

    def __init__(self, model, loss_fn, space, mode: str = "auto", vectorize: bool | None = None,
                 reuse_graph: bool = False):
        if mode not in ("auto",) + MODES:
            raise ValueError(f"hvp must be one of {('auto',) + MODES}, got {mode!r}")
        self.model, self.loss_fn, self.space = model, make_loss(loss_fn), space
        self.mode, self._vectorize, self._reuse = mode, vectorize, reuse_graph
        self.fallback_reason: str | None = None
        self.engine: HVP | None = None if mode == "auto" else self._build(mode)

    @property
    def vectorize(self) -> bool | None:
        """Whether the engine vmaps the probes (False after a failed batched double backward); None before use."""
        return None if self.engine is None else self.engine.vectorize

    def _build(self, mode: str) -> HVP:
        vec = self._vectorize if self._vectorize is not None else default_vectorize(self.space.device, mode)
        return HVP(self.model, self.loss_fn, self.space, mode, vectorize=vec, reuse_graph=self._reuse)

    def __call__(self, tangents: Sequence[torch.Tensor], batch) -> list[torch.Tensor]:
        if self.engine is not None:
            return self.engine(tangents, batch)
        order = (*auto_hvp_order(self.space.device), "fd")  # fd needs only gradients: the last resort
        reasons = []
        for i, mode in enumerate(order):
            self.engine = self._build(mode)
            try:
                out = self.engine(tangents, batch)
            except (KeyboardInterrupt, LossError, CheckpointingError):  # fails the same way in every mode
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of forward AD / double backward: fall back
                if i == len(order) - 1:
                    self.engine = None  # nothing settled: a later call tries the whole chain again
                    raise
                msg = str(exc).splitlines()[0] if str(exc) else ""
                log.warning("%s HVP failed (%s: %s); falling back to %s", MODE_NAMES[mode], type(exc).__name__, msg,
                            MODE_NAMES[order[i + 1]])
                reasons.append(f"{mode}: {type(exc).__name__}: {exc}")
                continue
            self.mode = mode
            self.fallback_reason = "; ".join(reasons) or None
            return out
        raise AssertionError("unreachable")  # pragma: no cover


def grad_params(loss: torch.Tensor, params, what: str = "a gradient (torch.autograd.grad)"):
    """``torch.autograd.grad(loss, params, allow_unused=True)``, with torch's reentrant-checkpoint RuntimeError
    re-raised as a :class:`CheckpointingError` that names the fix."""
    try:
        return torch.autograd.grad(loss, params, allow_unused=True)
    except RuntimeError as exc:
        err = _reentrant_error(exc, what)
        if err is not None:
            raise err from exc
        raise


def gradient(model, loss_fn, space, batch) -> list[torch.Tensor]:
    """Plain gradient of loss_fn(model, batch) w.r.t. space.params (zeros for unused parameters), detached."""
    loss_fn = make_loss(loss_fn)
    with torch.enable_grad():
        gs = grad_params(loss_fn(model, batch), space.params)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(gs, space.params)]


class RestrictedHVP:
    """``v_s [k] -> scale * sum_b batch_size(b) * (H_b v)_S`` for v zero outside the flat indices ``idx`` = S.

    H_b is the Hessian of batch b's MEAN loss ``loss_fn(model, b)``, so the sum is the Hessian of the SUMMED loss
    over the points of ``batches`` (``scale = n_train / n_points`` turns a subsample into the full training sum).
    Reverse-over-reverse: per batch, ``g = grad(batch_size(b) * loss, create_graph=True)``, then one double backward
    of ``<g, v>`` with respect to the parameters that S touches.

    * ``idx``: 1-D integer tensor of distinct flat indices in ``[0, space.numel)``, any order; ``v_s[j]`` and the
      result's ``[j]`` belong to ``idx[j]``.
    * ``cache_graph=True``: each batch's first-order graph is built once and reused by every product (one double
      backward per product and batch); it keeps one graph per batch alive. ``False``: every product redoes
      forward + backward per batch (for big models).
    * ``n_products`` counts calls, ``n_point_products`` calls x points.
    * Result: dtype of ``v_s`` (products are summed over batches in that dtype), on ``space.device``.
      Raises :class:`~sapsel_kernels.NonFiniteError` when a product is not finite.

    Memory: one O(N) scratch, allocated once and reused by every product: the zero-padded v over the parameter
    tensors that S touches (at most N elements in the parameter dtype); plus autograd's double-backward outputs for
    those tensors (at most N) and k-length vectors. No N-length vector is built per product.

    The caller is responsible for the model's mode; the products run with grad enabled.
    """

    def __init__(self, model: torch.nn.Module, loss_fn, space, batches, idx: torch.Tensor, scale: float = 1.0,
                 cache_graph: bool = True):
        self.model, self.loss_fn, self.space = model, make_loss(loss_fn), space
        self.batches = as_batches(batches, passes="many", what="batches")
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"idx must be an integer tensor of flat indices, got {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"idx must be 1-D, got shape {tuple(idx.shape)}")
        idx = idx.to(device=space.device, dtype=torch.int64)
        if idx.numel() != torch.unique(idx).numel():
            raise ValueError("idx holds duplicate flat indices")
        self.idx, self.scale, self.cache_graph = idx, float(scale), bool(cache_graph)
        owner = space.param_index(idx)  # IndexError when out of range
        # Per touched parameter tensor i: the positions j in idx that fall into it and their local linear indices.
        self._parts = []
        for i in torch.unique(owner).tolist():
            pos = (owner == i).nonzero().reshape(-1)
            self._parts.append((i, pos, idx[pos] - space.offsets[i]))
        self._touched = [space.params[i] for i, _, _ in self._parts]
        self._v = [torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for p in self._touched]
        self._n_points = sum(batch_size(b) for b in self.batches)
        self._graphs = None
        self.n_products = 0
        self.n_point_products = 0

    def _grads(self):
        if self._graphs is not None:
            return self._graphs
        out = []
        for b in self.batches:
            loss = self.loss_fn(self.model, b) * batch_size(b)
            gs = torch.autograd.grad(loss, self._touched, create_graph=True, allow_unused=True)
            out.append(gs)
        if self.cache_graph:
            self._graphs = out
        return out

    def __call__(self, v_s: torch.Tensor) -> torch.Tensor:
        if v_s.shape != self.idx.shape:
            raise ValueError(f"v_s must have shape {tuple(self.idx.shape)}, got {tuple(v_s.shape)}")
        for buf, (_, pos, local) in zip(self._v, self._parts):
            buf.view(-1)[local] = v_s[pos].to(buf.dtype)
        acc = torch.zeros(self.idx.numel(), dtype=v_s.dtype, device=v_s.device)
        with torch.enable_grad():
            for gs in self._grads():
                terms = [(g * v).sum() for g, v in zip(gs, self._v) if g is not None and g.requires_grad]
                if not terms:
                    continue
                hv = torch.autograd.grad(sum(terms), self._touched, retain_graph=self.cache_graph,
                                         allow_unused=True)
                for h, (_, pos, local) in zip(hv, self._parts):
                    if h is not None:
                        acc[pos] += h.reshape(-1)[local].to(acc.dtype)
        out = self.scale * acc
        check_finite(out, "a restricted Hessian-vector product", suffix="is the loss finite at these parameters?")
        self.n_products += 1
        self.n_point_products += self._n_points
        return out
