"""Sparse optimizers: SAM / ASAM, SGD and AdamW restricted to a selected subset S of a ParamSpace.

Only the k selected coordinates are ever read or written by an update; optimizer state (momentum, Adam moments, the
saved pre-perturbation weights of SAM) has k entries per kind. Everything outside S - weights, and therefore weight
decay and momentum too - stays bit-for-bit unchanged. The per-parameter work is done by the fused ops of
``ops/sparse.py`` (Triton on CUDA, C++ on CPU, reference everywhere), one call per parameter group, so the Python
cost of a step is O(number of parameter tensors), never O(k).

Conventions (torch.optim): ``param_groups`` (hyper-parameters per group), ``state`` keyed by parameter,
``zero_grad``, ``state_dict``/``load_state_dict`` (a resumed run continues the identical trajectory), LR schedulers
work on ``param_groups[i]["lr"]``.

AMP / GradScaler: before any write, one fused pass checks that every selected gradient is finite (and takes the
SAM norm); an inf/NaN in either SAM pass skips the whole step and leaves every parameter and all state bit-exactly
as before (``last_step_skipped`` tells). ``_step_supports_amp_scaling = True``: ``scaler.step(opt)`` hands the
optimizer its scale and found-inf flag, which are applied inside the kernels (no separate unscale pass). Typical
SAM + AMP loop::

    scaler.scale(loss_fn(model, batch)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)   # unscales inside; inf -> no perturbation
    with frozen_bn_stats(model):                         # optional: BatchNorm statistics updated once per step
        scaler.scale(loss_fn(model, batch)).backward()
    scaler.step(opt)                                     # = opt.second_step() with the scaler's found_inf
    scaler.update()
    opt.zero_grad()

If the first pass overflowed, nothing was perturbed, the second pass evaluates the same point and overflows again,
so the scaler sees the inf and lowers its scale as usual.

DDP: run the first backward inside ``model.no_sync()`` only if you want SAM's per-replica perturbation (the
original SAM's m-sharpness); by default let both backward passes all-reduce so every replica perturbs identically.
"""

import contextlib
import hashlib
import math
from typing import Dict, List, Optional, Tuple

import torch

from . import ops  # noqa: F401  (registers torch.ops.sapsel.*)
from .reference.sparse import acc_dtype
from .space import ParamSpace

__all__ = ["SparseSAM", "SparseSGD", "SparseAdamW", "frozen_bn_stats", "selection_indices"]


# --------------------------------------------------------------------------------------------------- helpers
def _resolve_space(space_or_model) -> Tuple[ParamSpace, Optional[List[dict]]]:
    """ParamSpace, plus the user's param groups when a list of dicts was given."""
    if isinstance(space_or_model, ParamSpace):
        return space_or_model, None
    if isinstance(space_or_model, torch.nn.Module):
        return ParamSpace(space_or_model), None
    if isinstance(space_or_model, torch.Tensor):
        raise TypeError("expected a model, a ParamSpace, an iterable of parameters or a list of param-group dicts; "
                        "got a single tensor (wrap it in a list)")
    items = list(space_or_model)
    if items and all(isinstance(g, dict) and "params" in g for g in items):
        groups, flat = [], []
        for g in items:
            ps = g["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            groups.append({**g, "params": ps})
            flat.extend(ps)
        space = ParamSpace(flat)
        if len(space.params) != len(flat):
            raise ValueError("param groups must hold distinct parameters that require grad")
        return space, groups
    return ParamSpace(items), None


def selection_indices(selection, space: ParamSpace) -> torch.Tensor:
    """Validated int64 ascending unique flat indices of ``selection`` (a Selection or an index tensor) in ``space``."""
    if isinstance(selection, torch.Tensor):
        idx, sig, numel = selection, None, None
    elif hasattr(selection, "indices"):
        idx = selection.indices
        sig = getattr(selection, "space_signature", None)
        numel = getattr(selection, "numel", None)
        numel = numel() if callable(numel) else numel
    else:
        raise TypeError(f"selection must be a Selection or an int64 index tensor, got {type(selection).__name__}")
    if sig is not None and sig != space.signature:
        hint = ""
        if all(n == f"param{i}" for i, n in enumerate(space.names)):
            hint = (" (the optimizer got bare parameters, which it names param0, param1, ...: pass the model or the "
                    "ParamSpace the selection was built on, or selection.indices if the parameter order is the same)")
        raise ValueError(f"the selection was built for another model/ParamSpace (signature {sig}, this space has "
                         f"{space.signature}); build it from this model's parameters{hint}")
    if numel is not None and int(numel) != space.numel:
        raise ValueError(f"the selection covers {int(numel)} coordinates but the ParamSpace has {space.numel}; it was "
                         "built for another model")
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError("selection indices must be a 1-D int64 tensor of flat ParamSpace indices")
    if idx.device != space.device:
        raise ValueError(f"the selection is on {idx.device} but the parameters are on {space.device}; "
                         f"move it with selection.to({str(space.device)!r})")
    if idx.numel():
        if int(idx[0]) < 0 or int(idx[-1]) >= space.numel:
            raise ValueError(f"selection indices out of range [0, {space.numel})")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("selection indices must be strictly ascending (sorted, no duplicates)")
    return idx


def _hash_indices(idx: torch.Tensor) -> str:
    """Fingerprint of a selection's indices (stored in state_dict to refuse resuming with another selection)."""
    return hashlib.sha1(idx.detach().cpu().numpy().tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def frozen_bn_stats(model: torch.nn.Module):
    """Within the block, BatchNorm layers in train mode normalise with batch statistics as usual but do not update
    their running statistics (momentum 0, no counter bump): use it for SAM's second forward so the statistics are
    updated once per SAM step, not twice."""
    saved = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None
                          else None))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom, nbt in saved:
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


# --------------------------------------------------------------------------------------------------- base class
class _SparseOptimizer(torch.optim.Optimizer):
    """Shared plumbing: space/selection resolution, per-parameter index views + offsets, AMP flags, state_dict."""

    _step_supports_amp_scaling = True

    def __init__(self, space_or_model, selection, defaults: dict):
        space, groups = _resolve_space(space_or_model)
        for name, p in zip(space.names, space.params):
            if not p.is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous; sparse optimizers index its flat storage")
            if not p.is_floating_point():
                raise ValueError(f"parameter {name!r} has dtype {p.dtype}; expected a floating dtype")
        idx = selection_indices(selection, space).contiguous()
        self.space = space
        self.model = space_or_model if isinstance(space_or_model, torch.nn.Module) else None
        self.k = int(idx.numel())
        self._initializing = True
        super().__init__(groups if groups is not None else [{"params": list(space.params)}], defaults)
        self._initializing = False
        # Per parameter: a view of the selection's global indices (no copy) and the parameter's flat offset; the
        # kernels address element idx - offset of the parameter. One searchsorted + one host sync, O(P) Python.
        cuts = torch.searchsorted(idx, space._bounds.to(idx.device)).tolist()
        self._idx: Dict[torch.Tensor, torch.Tensor] = {}
        self._off: Dict[torch.Tensor, int] = {}
        self._pos: Dict[torch.Tensor, int] = {}
        for i, p in enumerate(space.params):
            self._pos[p] = i
            if cuts[i + 1] > cuts[i]:
                self._idx[p] = idx[cuts[i]:cuts[i + 1]]
                self._off[p] = space.offsets[i]
        self._selection_hash = _hash_indices(idx)
        self.last_step_skipped = False

    def add_param_group(self, param_group):
        if not getattr(self, "_initializing", False):
            raise RuntimeError(f"{type(self).__name__}: the selection fixes the parameter set; add_param_group is not "
                               "supported after construction (build a new optimizer)")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ per-step plumbing
    def _active(self, group, only=None):
        """(params, grads, global-index views) of the group's parameters with selected coordinates and a gradient."""
        ps, gs, ixs = [], [], []
        for p in group["params"]:
            if p not in self._idx or p.grad is None:
                continue
            if only is not None and p not in only:
                continue
            g = p.grad
            if g.is_sparse:
                raise RuntimeError("sparse (torch.sparse) gradients are not supported")
            ps.append(p)
            gs.append(g if g.is_contiguous() else g.contiguous())
            ixs.append(self._idx[p])
        return ps, gs, ixs

    def _offs(self, ps):
        return [self._off[p] for p in ps]

    def _amp(self) -> Tuple[float, bool]:
        """(inverse grad scale, found_inf) handed over by ``GradScaler.step`` (1.0, False without a scaler)."""
        gs = getattr(self, "grad_scale", None)
        fi = getattr(self, "found_inf", None)
        inv = 1.0 if gs is None else 1.0 / float(gs)
        return inv, (fi is not None and float(fi) != 0.0)

    def _finite(self, lists) -> bool:
        """One fused pass over all selected gradients: True when every one is finite."""
        for ps, gs, ixs in lists:
            if ps and not bool(torch.isfinite(torch.ops.sapsel.sam_grad_sqnorm(gs, ps, ixs, self._offs(ps), 0.0, False,
                                                                               False)).all()):
                return False
        return True

    def _plain_step(self, closure, update):
        """One non-SAM step: closure, AMP flags, one finiteness pass over every selected gradient (a non-finite one
        skips the whole step, nothing written), then ``update`` per param group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inv, found = self._amp()
        lists = [self._active(g) for g in self.param_groups]
        self.last_step_skipped = found or not self._finite(lists)
        if not self.last_step_skipped:
            for group, (ps, gs, ixs) in zip(self.param_groups, lists):
                if ps:
                    update(group, ps, gs, ixs, None, inv)
        return loss

    def _sgd_update(self, group, ps, gs, ixs, saved, inv_scale):
        mom = group["momentum"]
        buckets: Dict[bool, list] = {True: [], False: []}
        for j, p in enumerate(ps):
            st = self.state[p]
            first = mom != 0 and "momentum_buffer" not in st
            if first:
                st["momentum_buffer"] = torch.zeros(ixs[j].numel(), dtype=acc_dtype(p.dtype), device=p.device)
            buckets[first].append(j)
        for first, js in buckets.items():
            if not js:
                continue
            bufs = [self.state[ps[j]]["momentum_buffer"] for j in js] if mom != 0 else []
            pl = [ps[j] for j in js]
            torch.ops.sapsel.sparse_sgd_step(pl, [gs[j] for j in js], [ixs[j] for j in js], self._offs(pl), bufs,
                                             [saved[j] for j in js] if saved else [], float(group["lr"]), float(mom),
                                             float(group["dampening"]), float(group["weight_decay"]),
                                             bool(group["nesterov"]), first, inv_scale)

    def _adamw_update(self, group, ps, gs, ixs, saved, inv_scale):
        beta1, beta2 = group["betas"]
        buckets: Dict[int, list] = {}
        for j, p in enumerate(ps):
            st = self.state[p]
            if "step" not in st:
                n, a = ixs[j].numel(), acc_dtype(p.dtype)
                st["step"] = 0
                st["exp_avg"] = torch.zeros(n, dtype=a, device=p.device)
                st["exp_avg_sq"] = torch.zeros(n, dtype=a, device=p.device)
            st["step"] += 1
            buckets.setdefault(st["step"], []).append(j)
        for step, js in buckets.items():
            pl = [ps[j] for j in js]
            torch.ops.sapsel.sparse_adamw_step(pl, [gs[j] for j in js], [ixs[j] for j in js], self._offs(pl),
                                               [self.state[p]["exp_avg"] for p in pl],
                                               [self.state[p]["exp_avg_sq"] for p in pl],
                                               [saved[j] for j in js] if saved else [], float(group["lr"]),
                                               float(beta1), float(beta2), float(group["eps"]),
                                               float(group["weight_decay"]), int(step), inv_scale)

    # ------------------------------------------------------------------ introspection
    def state_bytes(self, include_indices: bool = False) -> int:
        """Bytes of optimizer state held on the device: moments / momentum and SAM's saved weights. The indices are
        views of the Selection's own tensor (8 bytes per selected coordinate, held by the Selection whether or not an
        optimizer exists); ``include_indices=True`` counts them too."""
        total = sum(v.numel() * v.element_size() for v in getattr(self, "_saved", {}).values())
        if include_indices:
            total += 8 * self.k
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total

    # ------------------------------------------------------------------ state dict
    def state_dict(self):
        if getattr(self, "_perturbed", False):
            raise RuntimeError("state_dict() between first_step() and second_step() is not supported: the weights are "
                               "perturbed; save after second_step()")
        sd = super().state_dict()
        sd["sapsel"] = {"space_signature": self.space.signature, "k": self.k, "type": type(self).__name__,
                        "selection_hash": self._selection_hash}
        return sd

    def load_state_dict(self, state_dict):
        """Load a state_dict saved by the same optimizer class over the same space and selection. Tensors keep their
        saved dtypes (float32 moments for bf16 parameters, int64 indices) - unlike torch.optim's default cast."""
        meta = state_dict.get("sapsel")
        if meta is None:
            raise ValueError("not a sapsel sparse-optimizer state_dict (no 'sapsel' entry)")
        if meta["type"] != type(self).__name__:
            raise ValueError(f"state_dict is from {meta['type']}, not {type(self).__name__}")
        if meta["space_signature"] != self.space.signature:
            raise ValueError(f"state_dict was saved for another model/ParamSpace (signature {meta['space_signature']}, "
                             f"here {self.space.signature})")
        if meta["k"] != self.k or meta["selection_hash"] != self._selection_hash:
            raise ValueError(f"state_dict was saved with a different selection (k={meta['k']}, here k={self.k}); "
                             "resume with the same Selection")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("state_dict has a different param-group layout")
        id_map = {}
        for a, b in zip(groups, self.param_groups):
            id_map.update(zip(a["params"], b["params"]))
        new_state = {}
        for pid, st in state_dict["state"].items():
            p = id_map[pid]
            n = self._idx[p].numel() if p in self._idx else 0
            for key, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() != n:
                    raise ValueError(f"state_dict entry {key!r} has {v.numel()} values, the selection has {n} in "
                                     "this parameter")
            new_state[p] = {k: (v.to(p.device).clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        for a, b in zip(groups, self.param_groups):
            for key, v in a.items():
                if key != "params":
                    b[key] = v
        self.state.clear()
        self.state.update(new_state)
        self.last_step_skipped = False


def _check_hparams(lr, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False, betas=None, eps=None):
    if lr is None or not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if momentum < 0:
        raise ValueError(f"momentum must be >= 0, got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0")
    if betas is not None and not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
    if eps is not None and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


# --------------------------------------------------------------------------------------------------- SGD / AdamW
class SparseSGD(_SparseOptimizer):
    """torch.optim.SGD (momentum, dampening, Nesterov, L2 weight decay) on the selected coordinates only.

    Args: ``space_or_model`` (nn.Module, ParamSpace, iterable of parameters or list of param-group dicts),
    ``selection`` (Selection or int64 ascending flat indices into that space). State: a float32 momentum buffer of k
    entries (float64 for float64 parameters) when ``momentum > 0``.
    """

    def __init__(self, space_or_model, selection, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0):
        _check_hparams(lr, momentum, weight_decay, dampening, nesterov)
        super().__init__(space_or_model, selection, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                                         weight_decay=weight_decay, dampening=dampening))

    @torch.no_grad()
    def step(self, closure=None):
        return self._plain_step(closure, self._sgd_update)


class SparseAdamW(_SparseOptimizer):
    """torch.optim.AdamW (amsgrad=False: bias correction, decoupled weight decay) on the selected coordinates only.

    State: step count and two moment buffers of k entries (float32; float64 for float64 parameters).
    """

    def __init__(self, space_or_model, selection, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        _check_hparams(lr, weight_decay=weight_decay, betas=betas, eps=eps)
        super().__init__(space_or_model, selection, dict(lr=lr, betas=tuple(betas), eps=eps,
                                                         weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        return self._plain_step(closure, self._adamw_update)


# --------------------------------------------------------------------------------------------------- SAM
class SparseSAM(_SparseOptimizer):
    """Sharpness-aware minimisation (SAM; ASAM with ``adaptive=True``) on the selected coordinates, with an SGD or
    AdamW base step; davda54/sam semantics restricted to S.

    first_step:  g = grad at w;  n = ||g_S|| (``normalize="selected"``) or ||g|| over every coordinate
                 (``"full"``, SSAM); ASAM: n = ||T g|| with T = |w| + eta;
                 e_S = rho * g_S / (n + norm_eps)  (ASAM: rho * T_S^2 g_S / (n + norm_eps));  w_S += e_S.
                 The k pre-perturbation weights are saved (in the parameter dtype), so restoring is bit-exact.
    second_step: g' = grad at w + e;  w_S <- w_S(saved) - lr * update(g'_S)  in one fused write (SGD: momentum,
                 dampening, Nesterov, L2 weight decay; AdamW: bias correction, decoupled weight decay).

    ``rho``, ``adaptive``, ``eta`` and the base hyper-parameters are per param group; the norm is global over all
    groups. ``bn_once`` (model given): ``step(closure)`` runs the second closure under :func:`frozen_bn_stats`.
    State: saved weights (k, parameter dtype) + base state (k momentum, or 2k Adam moments).
    """

    def __init__(self, space_or_model, selection, base: str = "sgd", lr: Optional[float] = None, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.01, normalize: str = "selected", norm_eps: float = 1e-12,
                 bn_once: bool = True, **base_kwargs):
        if base not in ("sgd", "adamw"):
            raise ValueError(f"base must be 'sgd' or 'adamw', got {base!r}")
        if normalize not in ("selected", "full"):
            raise ValueError(f"normalize must be 'selected' or 'full', got {normalize!r}")
        if not (rho >= 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be a finite number >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if base == "sgd":
            allowed = {"momentum", "nesterov", "weight_decay", "dampening"}
            defaults = dict(momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0)
        else:
            allowed = {"betas", "eps", "weight_decay"}
            defaults = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
            lr = 1e-3 if lr is None else lr
        unknown = set(base_kwargs) - allowed
        if unknown:
            raise TypeError(f"unknown arguments for base={base!r}: {sorted(unknown)} (allowed: {sorted(allowed)})")
        defaults.update(base_kwargs)
        if base == "sgd":
            _check_hparams(lr, defaults["momentum"], defaults["weight_decay"], defaults["dampening"],
                           defaults["nesterov"])
        else:
            defaults["betas"] = tuple(defaults["betas"])
            _check_hparams(lr, weight_decay=defaults["weight_decay"], betas=defaults["betas"], eps=defaults["eps"])
        defaults.update(lr=lr, rho=rho, adaptive=adaptive, eta=eta)
        self.base = base
        self.normalize = normalize
        self.norm_eps = norm_eps
        self.bn_once = bn_once
        self._perturbed = False
        self._pass1_skipped = False
        self._pert: List[torch.Tensor] = []  # parameters perturbed by the pending first_step
        self._saved: Dict[torch.Tensor, torch.Tensor] = {}  # k pre-perturbation weights (scratch, not in state_dict)
        super().__init__(space_or_model, selection, defaults)

    def _grad_norm(self, inv_scale: float) -> float:
        total = 0.0
        full = self.normalize == "full"
        for group in self.param_groups:
            if full:
                ps = [p for p in group["params"] if p.grad is not None]
                gs = [p.grad.contiguous() for p in ps]
                ixs = [self._idx[p] if p in self._idx else torch.empty(0, dtype=torch.int64, device=p.device)
                       for p in ps]
                offs = [self.space.offsets[self._pos[p]] for p in ps]
            else:
                ps, gs, ixs = self._active(group)
                offs = self._offs(ps)
            if ps:
                sq = torch.ops.sapsel.sam_grad_sqnorm(gs, ps, ixs, offs, float(group["eta"]), bool(group["adaptive"]),
                                                      full)
                total += float(sq.double().sum())
        return math.sqrt(total) * inv_scale if math.isfinite(total) else float("nan")

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> bool:
        """Perturb w_S by e_S (see the class doc). ``grad_scaler``: a GradScaler whose scale multiplies the grads
        (they are unscaled inside the kernels). Returns False (and perturbs nothing) when a selected gradient is
        inf/NaN; the following second_step then skips the whole step."""
        if self._perturbed:
            raise RuntimeError("first_step() called twice without second_step()")
        inv = 1.0
        if grad_scaler is not None and grad_scaler.is_enabled():
            inv = 1.0 / float(grad_scaler.get_scale())
        norm = self._grad_norm(inv)
        ok = math.isfinite(norm)
        if ok:
            for group in self.param_groups:
                ps, gs, ixs = self._active(group)
                if not ps:
                    continue
                saved = []
                for p, ix in zip(ps, ixs):
                    if p not in self._saved:
                        self._saved[p] = torch.empty(ix.numel(), dtype=p.dtype, device=p.device)
                    saved.append(self._saved[p])
                scale = float(group["rho"]) / (norm + self.norm_eps) * inv
                torch.ops.sapsel.sam_perturb(ps, gs, ixs, self._offs(ps), saved, scale, float(group["eta"]),
                                             bool(group["adaptive"]))
                self._pert.extend(ps)
            self._perturbed = True
        else:
            self._pass1_skipped = True
        if zero_grad:
            self.zero_grad()
        return ok

    def _restore(self, params):
        for p in params:
            p.view(-1).index_copy_(0, self._idx[p] - self._off[p], self._saved[p])

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a pending first_step() exactly (bit-for-bit, no update): for a second pass that failed or was
        abandoned (e.g. an exception in the loss). A no-op when nothing is perturbed."""
        self._restore(list(self._pert))
        self._pert = []
        self._perturbed = False
        self._pass1_skipped = False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> bool:
        """Restore w_S and apply the base step with the gradient at the perturbed point, fused. Returns False when the
        step was skipped (inf/NaN in either pass): then every parameter is exactly as before first_step()."""
        if not self._perturbed:
            if self._pass1_skipped:
                self._pass1_skipped = False
                self.last_step_skipped = True
                if zero_grad:
                    self.zero_grad()
                return False
            raise RuntimeError("second_step() called without first_step()")
        inv, found = self._amp()
        pert = set(self._pert)
        lists = [self._active(g, only=pert) for g in self.param_groups]
        ok = not found and self._finite(lists)
        if ok:
            done = set()
            for group, (ps, gs, ixs) in zip(self.param_groups, lists):
                if not ps:
                    continue
                saved = [self._saved[p] for p in ps]
                if self.base == "sgd":
                    self._sgd_update(group, ps, gs, ixs, saved, inv)
                else:
                    self._adamw_update(group, ps, gs, ixs, saved, inv)
                done.update(ps)
            self._restore([p for p in pert if p not in done])  # perturbed but no gradient now: plain restore
        else:
            self._restore(list(pert))
        self._perturbed = False
        self._pert = []
        self.last_step_skipped = not ok
        if zero_grad:
            self.zero_grad()
        return ok

    def step(self, closure=None):
        """With ``closure`` (re-evaluates the loss with backward and returns it; gradients are zeroed before each
        call): a whole SAM step, closure called twice; returns the first loss (if the second call raises, the
        perturbation is undone before the exception propagates). Without: the second step (this is what
        ``GradScaler.step(opt)`` calls after ``first_step``)."""
        if closure is None:
            if self._perturbed or self._pass1_skipped:
                return self.second_step()
            raise RuntimeError("SparseSAM.step() without a closure performs the second SAM step: call first_step() "
                               "first, or pass a closure that computes the loss and calls backward()")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        self.first_step(zero_grad=True)
        ctx = frozen_bn_stats(self.model) if (self.bn_once and self.model is not None) else contextlib.nullcontext()
        try:
            with ctx:
                closure()
        except BaseException:
            self.restore()  # the second pass raised: leave the weights exactly as before the step
            raise
        self.second_step()
        return loss
