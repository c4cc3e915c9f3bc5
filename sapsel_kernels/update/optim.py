"""Sparse optimizers: SAM / ASAM, SGD and AdamW restricted to a selected subset S of a ParamSpace.

Only the k selected coordinates are ever read or written by an update; optimizer state (momentum, Adam moments, the
saved pre-perturbation weights of SAM) has k entries per kind. Everything outside S - weights, and therefore weight
decay and momentum too - stays bit-for-bit unchanged. The per-parameter work is done by the fused ops of
``ops/sparse.py`` (Triton on CUDA, C++ on CPU, reference everywhere), one call per parameter group, so the Python
cost of a step is O(number of parameter tensors), never O(k).

Conventions (torch.optim): the argument order and validation of ``torch.optim.SGD`` / ``AdamW``, ``param_groups``
(hyper-parameters per group, re-validated at every step), ``state`` keyed by parameter, ``zero_grad``,
``state_dict``/``load_state_dict`` (a resumed run continues the identical trajectory; a state that does not fit is
refused before anything changes), LR schedulers work on ``param_groups[i]["lr"]``.

``params``: a model, a ParamSpace, an iterable of parameters (or of ``(name, parameter)`` pairs, or a dict name ->
parameter) or a list of param-group dicts. ``selection``: anything :func:`sapsel_kernels.selection.as_selection`
accepts - a Selection, an integer index tensor of flat indices in any order (sorted here), or a bool mask (flat, or a
dict name -> mask). A Selection must have been made for these parameters: the same names and shapes, or the very
same tensors, so ``SparseSAM(model.parameters(), sel)`` works with ``sel`` built on ``ParamSpace(model)``.

Non-finite values (:class:`sapsel_kernels.errors.NonFiniteError`): before any write, one fused pass checks every
selected gradient (and yields the SAM norm). A NaN/Inf raises ``NonFiniteError`` naming the parameter and position,
with every parameter and all state exactly as before - except under AMP, where torch.optim's GradScaler contract
applies: the step is skipped (``last_step_skipped``), nothing changes, and the scaler lowers its scale.

AMP / GradScaler: ``_step_supports_amp_scaling = True``: ``scaler.step(opt)`` hands the optimizer its scale and
found-inf flag, which are applied inside the kernels (no separate unscale pass). Typical SAM + AMP loop::

    scaler.scale(loss_fn(model, batch)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)   # unscales inside; inf -> no perturbation
    with frozen_bn_stats(model):                         # optional: BatchNorm statistics updated once per step
        scaler.scale(loss_fn(model, batch)).backward()
    scaler.step(opt)                                     # = opt.second_step() with the scaler's found_inf
    scaler.update()
    opt.zero_grad()

If the first pass overflowed, nothing is perturbed and the second pass evaluates the unperturbed point, which may be
finite: so ``first_step`` records the overflow in the scaler's per-optimizer found-inf record (the one
``scaler.step`` / ``scaler.update`` read, ``_per_optimizer_states[id(opt)]["found_inf_per_device"]``), and the
second step records it again after ``scaler.step`` re-checked the second-pass gradients; the step is skipped and
``scaler.update()`` lowers the scale.

DDP: run the first backward inside ``model.no_sync()`` only if you want SAM's per-replica perturbation (the
original SAM's m-sharpness); by default let both backward passes all-reduce so every replica perturbs identically.

FSDP2 (``fully_shard``; every parameter a DTensor split by rows of dim 0 over a 1-D mesh): pass the sharded model
(or its named parameters) and the GLOBAL selection (flat indices of the unsharded space, the same on every rank, or
each rank's part from ``select(..., group=)``). Each rank updates the selected coordinates of its own shard
(``to_local()``), so the state is O(k / world) per rank (``k_local``: the selected coordinates this rank holds).
The only collectives the optimizer adds are tiny: SAM's norm (one float64 SUM and one MIN of 2 int64 per
first_step) and the NaN verdict of the other steps (one int64 MIN), so a NaN in one rank's shard raises (or, under
AMP, skips) on every rank with nothing modified anywhere. A state_dict is per rank; loading it on another rank or
world size raises ValueError. Other DTensor layouts (tensor parallel, 2-D meshes) raise NotImplementedError.
"""

import contextlib
import copy
import functools
import hashlib
import math
import numbers
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import ops  # noqa: F401  (registers torch.ops.sapsel.*)
from ..errors import NonFiniteError, check_finite
from ..reference.sparse import acc_dtype
from ..selection import as_selection
from ..space import ParamSpace

__all__ = ["SparseSAM", "SparseSGD", "SparseAdamW", "frozen_bn_stats"]


# --------------------------------------------------------------------------------------------------- helpers
def _resolve_space(params) -> Tuple[ParamSpace, Optional[List[dict]]]:
    """ParamSpace, plus the user's param groups when a list of dicts was given."""
    if isinstance(params, ParamSpace):
        return params, None
    if isinstance(params, torch.nn.Module):
        return ParamSpace(params), None
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be a model, a ParamSpace, an iterable of parameters or a list of param-group "
                        "dicts; got a single tensor (wrap it in a list)")
    if isinstance(params, Mapping):
        return ParamSpace(dict(params)), None
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if all(isinstance(g, Mapping) and "params" in g for g in items):
        groups, named = [], []
        for g in items:
            ps = g["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            for q in ps:
                named.append(q if isinstance(q, tuple) else (f"param{len(named)}", q))
            groups.append({**g, "params": [q[1] if isinstance(q, tuple) else q for q in ps]})
        space = ParamSpace(named)
        if len(space.params) != len(named):
            raise ValueError("param groups must hold distinct parameters that require grad")
        return space, groups
    return ParamSpace(items), None


def _flag_device(group, like: torch.device) -> torch.device:
    """Where a small collective buffer goes: the current CUDA device for NCCL, else the CPU."""
    from ..selection.distributed import comm_device

    return comm_device(group, like)


def _first_rank(flags, group, like: torch.device):
    """For each boolean of ``flags`` (this rank's), the lowest rank of ``group`` where it is True, or None: ONE MIN
    all_reduce of len(flags) int64 (any world size)."""
    import torch.distributed as dist

    single = isinstance(flags, bool)
    fl = [flags] if single else list(flags)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    t = torch.tensor([rank if f else world for f in fl], dtype=torch.int64, device=_flag_device(group, like))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    out = [None if int(v) >= world else int(v) for v in t.tolist()]
    return out[0] if single else out


def _hash_indices(idx: torch.Tensor) -> str:
    """Fingerprint of a selection's indices (stored in state_dict to refuse resuming with another selection)."""
    return hashlib.sha1(idx.detach().cpu().numpy().tobytes()).hexdigest()[:16]


def _real(name: str, value, *, tensor_ok: bool) -> float:
    """A hyper-parameter as a Python float (a 1-element Tensor where ``tensor_ok``); TypeError for other types."""
    if isinstance(value, torch.Tensor):
        if not tensor_ok:
            raise TypeError(f"{name} must be a number, got a Tensor")
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"Tensor {name} must be floating point, got {value.dtype}")
        if value.requires_grad:
            raise ValueError(f"Tensor {name} must not require grad (differentiable optimizers are not supported)")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_hparams(**hp) -> dict:
    """THE validation of the optimizers' hyper-parameters, at construction, for every param group at every step (a
    scheduler or a user may have changed them) and on ``load_state_dict``; returns them as Python floats/bools.

    ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``eps``, ``rho``, ``eta``, ``norm_eps``: finite and >= 0
    (NaN rejected); ``lr`` and each beta may be a 1-element floating Tensor that does not require grad (torch.optim's
    tensor lr; the kernels take its value, one ``float()`` per step - a host sync on CUDA); ``betas``: a pair, each in
    [0, 1); ``nesterov``, ``adaptive``: bools; Nesterov needs momentum > 0 and dampening == 0 (torch.optim.SGD).
    Raises ValueError("Invalid <name> value: <value> ...") or TypeError for a wrong type.
    """
    out = {}
    for name, v in hp.items():
        if name in ("nesterov", "adaptive"):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
            out[name] = v
        elif name == "betas":
            if isinstance(v, torch.Tensor) or not isinstance(v, (tuple, list)) or len(v) != 2:
                raise ValueError(f"Invalid betas value: {v!r} (a pair (beta1, beta2) is expected)")
            bs = tuple(_real(f"betas[{i}]", b, tensor_ok=True) for i, b in enumerate(v))
            for i, b in enumerate(bs):
                if not 0.0 <= b < 1.0:  # NaN fails too
                    raise ValueError(f"Invalid beta parameter at index {i}: {b} (must be in [0, 1))")
            out[name] = bs
        else:
            x = _real(name, v, tensor_ok=name == "lr")
            if not (math.isfinite(x) and x >= 0.0):
                raise ValueError(f"Invalid {name} value: {x} (must be finite and >= 0)")
            out[name] = x
    if out.get("nesterov") and (out.get("momentum", 0.0) <= 0.0 or out.get("dampening", 0.0) != 0.0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
    return out


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


_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
_SAM_KEYS = ("rho", "adaptive", "eta")


# --------------------------------------------------------------------------------------------------- base class
class _SparseOptimizer(torch.optim.Optimizer):
    """Shared plumbing: space/selection resolution, per-parameter index views + offsets, hyper-parameter checks,
    the fused finiteness check, AMP flags, state_dict."""

    _step_supports_amp_scaling = True
    _hp_keys: Tuple[str, ...] = ()
    _state_base = "sgd"  # the state layout: "sgd" (optional momentum_buffer) or "adamw" (step, exp_avg, exp_avg_sq)

    def __init__(self, params, selection, defaults: dict):
        _check_hparams(**{k: defaults[k] for k in self._hp_keys})
        space, groups = _resolve_space(params)
        sel = as_selection(selection, space)
        space = sel.resolve_space(space)  # the selection's names when `params` were bare tensors of its space
        for name, p in zip(space.names, space.params):
            if not p.is_floating_point():
                raise ValueError(f"parameter {name!r} has dtype {p.dtype}; expected a floating dtype")
            if not p.is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous; sparse optimizers index its flat storage")
        idx = sel.indices  # int64, 1-D, contiguous, strictly ascending, on space.device (as_selection's contract)
        self.space = space
        self.selection = sel
        self.model = params if isinstance(params, torch.nn.Module) else None
        self.k = int(idx.numel())
        self._initializing = True
        super().__init__(groups if groups is not None else [{"params": list(space.params)}], defaults)
        self._initializing = False
        for group in self.param_groups:  # per-group overrides are validated like the defaults
            self._hparams(group)
        # Per parameter: a view of the selection's global indices (no copy) and the parameter's flat offset; the
        # kernels address element idx - offset of the parameter. One searchsorted + one host sync, O(P) Python.
        # FSDP2 (fully_shard: DTensor parameters): the kernels address each parameter's LOCAL shard, the global
        # flat range [lo, hi) of its rows on this rank; only the selected indices inside it are kept (O(k / world)
        # state), and the few scalars that must be global (the SAM norm, the NaN verdict) are all-reduced.
        from ..selection.distributed import ShardLayout

        layout = ShardLayout.of(space, type(self).__name__)
        self._shard_group = layout.group if layout is not None else None
        bounds = layout.bounds if layout is not None else [(o, o + n) for o, n in zip(space.offsets, space.numels)]
        edges = torch.tensor([e for b in bounds for e in b], dtype=torch.int64, device=idx.device)
        cuts = torch.searchsorted(idx, edges).tolist()
        self._idx: Dict[torch.Tensor, torch.Tensor] = {}
        self._off: Dict[torch.Tensor, int] = {}  # flat index of the first element the kernels address, per tensor
        self._pos: Dict[torch.Tensor, int] = {}
        for i, p in enumerate(space.params):
            self._pos[p] = i
            self._off[p] = bounds[i][0]
            if cuts[2 * i + 1] > cuts[2 * i]:
                self._idx[p] = idx[cuts[2 * i]:cuts[2 * i + 1]]
        self.k_local = sum(v.numel() for v in self._idx.values())  # = k without FSDP2
        self._selection_hash = _hash_indices(idx)
        self.last_step_skipped = False

    def add_param_group(self, param_group):
        if not getattr(self, "_initializing", False):
            raise RuntimeError(f"{type(self).__name__}: the selection fixes the parameter set; add_param_group is not "
                               "supported after construction (build a new optimizer)")
        super().add_param_group(param_group)

    def _hparams(self, group) -> dict:
        missing = [k for k in self._hp_keys if k not in group]
        if missing:
            raise ValueError(f"{type(self).__name__}: param group lacks {missing}")
        return _check_hparams(**{k: group[k] for k in self._hp_keys})

    # ------------------------------------------------------------------ per-step plumbing
    def _t(self, p) -> torch.Tensor:
        """The tensor the kernels address for parameter ``p``: ``p`` itself, or its local shard under FSDP2."""
        return p.to_local() if self._shard_group is not None else p

    def _ts(self, ps) -> List[torch.Tensor]:
        return [self._t(p) for p in ps] if self._shard_group is not None else ps

    def _agree(self, bad: Optional[str], what: str) -> Optional[str]:
        """Under FSDP2 the NaN verdict of every shard: this rank's ``bad``, or where on another rank (one MIN
        all_reduce of one int64: the first bad rank), so every rank skips or raises together. Without FSDP2 ``bad``
        itself."""
        if self._shard_group is None:
            return bad
        first = _first_rank(bad is not None, self._shard_group, self.space.device)
        if bad is None and first is not None:
            return f"in the shard of rank {first} ({what})"
        return bad

    def _dense_grad(self, p) -> torch.Tensor:
        g = p.grad
        if self._shard_group is not None:
            g = g.to_local()
        if g.is_sparse:
            raise RuntimeError(f"{self.space.names[self._pos[p]]}: sparse (torch.sparse) gradients are not supported")
        return g if g.is_contiguous() else g.contiguous()

    def _active(self, group, only=None):
        """(params, grads, global-index views) of the group's parameters with selected coordinates and a gradient."""
        ps, gs, ixs = [], [], []
        for p in group["params"]:
            if p not in self._idx or p.grad is None:
                continue
            if only is not None and p not in only:
                continue
            ps.append(p)
            gs.append(self._dense_grad(p))
            ixs.append(self._idx[p])
        return ps, gs, ixs

    def _offs(self, ps):
        return [self._off[p] for p in ps]

    def _amp(self) -> Tuple[float, bool, bool]:
        """(inverse grad scale, found_inf, under AMP) handed over by ``GradScaler.step`` ((1.0, False, False)
        without a scaler). ``scaler.step`` always sets ``found_inf``; ``grad_scale`` is None after ``unscale_``."""
        gs = getattr(self, "grad_scale", None)
        fi = getattr(self, "found_inf", None)
        inv = 1.0 if gs is None else 1.0 / float(gs)
        return inv, (fi is not None and float(fi) != 0.0), fi is not None

    def _first_bad(self, p, g, ix, full: bool) -> Optional[str]:
        """Where the first NaN/Inf of ``g`` among the coordinates the step reads is, or None (slow path only: it
        gathers the parameter's selected gradient, <= k values, or scans the whole gradient when ``full``)."""
        off = self._off[p]
        vals = g.reshape(-1) if full else g.reshape(-1).index_select(0, ix - off)
        bad = (~torch.isfinite(vals)).nonzero()
        if not bad.numel():
            return None
        j = int(bad[0, 0])
        return f"{vals[j].item()} at {self.space.describe_position(off + j if full else int(ix[j]))}"

    def _check_grads(self, lists) -> Optional[str]:
        """One fused pass over all selected gradients (one host sync): None when every one is finite, else where the
        first NaN/Inf is. A partial sum can overflow with finite entries; such a tensor is checked element-wise."""
        return self._agree(self._check_grads_local(lists), "the selected gradient")

    def _check_grads_local(self, lists) -> Optional[str]:
        parts, owners = [], []
        for ps, gs, ixs in lists:
            if ps:
                parts.append(torch.ops.sapsel.sam_grad_sqnorm(gs, self._ts(ps), ixs, self._offs(ps), 0.0, False,
                                                              False))
                owners.extend(zip(ps, gs, ixs))
        if not parts:
            return None
        part = parts[0] if len(parts) == 1 else torch.cat(parts)  # cat promotes float32 + float64 partials
        if bool(torch.isfinite(part).all()):
            return None
        for j in (~torch.isfinite(part)).nonzero().reshape(-1).tolist():
            where = self._first_bad(*owners[j], full=False)
            if where is not None:
                return where
        return None

    def _nonfinite(self, what: str, where: str, suffix: str) -> NonFiniteError:
        return NonFiniteError(f"{type(self).__name__}.{what}: the gradient holds NaN/Inf ({where}); {suffix}. "
                              "(Under a torch.amp.GradScaler such a step is skipped and the scale lowered instead.)")

    @staticmethod
    def _run(calls: List[Callable], commit: Dict[torch.Tensor, dict], state) -> None:
        """Run the planned kernel calls, then commit the state they created (new buffers, step counts): a kernel that
        raises leaves the state dict as it was."""
        for c in calls:
            c()
        for p, d in commit.items():
            state[p].update(d)

    def _plain_step(self, closure, plan):
        """One non-SAM step: closure, hyper-parameter checks, AMP flags, one finiteness pass over every selected
        gradient (NaN/Inf: NonFiniteError, or a skipped step under AMP; nothing written either way), then the
        planned kernel calls of every group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hps = [self._hparams(g) for g in self.param_groups]
        inv, found, amp = self._amp()
        lists = [self._active(g) for g in self.param_groups]
        bad = None if found else self._check_grads(lists)
        if bad is not None and not amp:
            raise self._nonfinite("step", bad, "nothing was modified")
        self.last_step_skipped = found or bad is not None
        if not self.last_step_skipped:
            calls, commit = [], {}
            for hp, (ps, gs, ixs) in zip(hps, lists):
                if ps:
                    calls += plan(hp, ps, gs, ixs, None, inv, commit)
            self._run(calls, commit, self.state)
        return loss

    def _plan_sgd(self, hp, ps, gs, ixs, saved, inv_scale, commit) -> List[Callable]:
        """Kernel calls of one SGD update of one group; the momentum buffers it creates go to ``commit``."""
        mom = hp["momentum"]
        buckets: Dict[bool, list] = {True: [], False: []}
        for j, p in enumerate(ps):
            first = mom != 0 and "momentum_buffer" not in self.state.get(p, {})
            if first:
                commit.setdefault(p, {})["momentum_buffer"] = torch.zeros(
                    ixs[j].numel(), dtype=acc_dtype(p.dtype), device=p.device)
            buckets[first].append(j)
        calls = []
        for first, js in buckets.items():
            if not js:
                continue
            pl = [ps[j] for j in js]
            bufs = [(commit[p] if first else self.state[p])["momentum_buffer"] for p in pl] if mom != 0 else []
            calls.append(functools.partial(
                torch.ops.sapsel.sparse_sgd_step, self._ts(pl), [gs[j] for j in js], [ixs[j] for j in js],
                self._offs(pl), bufs, [saved[j] for j in js] if saved else [], hp["lr"], mom, hp["dampening"],
                hp["weight_decay"], hp["nesterov"], first, inv_scale))
        return calls

    def _plan_adamw(self, hp, ps, gs, ixs, saved, inv_scale, commit) -> List[Callable]:
        """Kernel calls of one AdamW update of one group; new moments and the step counts go to ``commit``."""
        beta1, beta2 = hp["betas"]
        buckets: Dict[int, list] = {}
        for j, p in enumerate(ps):
            st = self.state.get(p, {})
            if "step" not in st:
                n, a = ixs[j].numel(), acc_dtype(p.dtype)
                commit[p] = {"exp_avg": torch.zeros(n, dtype=a, device=p.device),
                             "exp_avg_sq": torch.zeros(n, dtype=a, device=p.device)}
            step = st.get("step", 0) + 1
            commit.setdefault(p, {})["step"] = step
            buckets.setdefault(step, []).append(j)
        calls = []
        for step, js in buckets.items():
            pl = [ps[j] for j in js]
            src = [commit[p] if "exp_avg" in commit[p] else self.state[p] for p in pl]
            calls.append(functools.partial(
                torch.ops.sapsel.sparse_adamw_step, self._ts(pl), [gs[j] for j in js], [ixs[j] for j in js],
                self._offs(pl), [s["exp_avg"] for s in src], [s["exp_avg_sq"] for s in src],
                [saved[j] for j in js] if saved else [], hp["lr"], beta1, beta2, hp["eps"], hp["weight_decay"], step,
                inv_scale))
        return calls

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
    def _meta(self) -> dict:
        meta = {"space_signature": self.space.signature, "k": self.k, "type": type(self).__name__,
                "selection_hash": self._selection_hash, "dtypes": [str(dt) for dt in self.space.dtypes],
                "base": self._state_base}
        if self._shard_group is not None:  # FSDP2: the state holds this rank's shard of S only
            import torch.distributed as dist

            meta["shard"] = [dist.get_rank(self._shard_group), dist.get_world_size(self._shard_group)]
        return meta

    def state_dict(self):
        """torch.optim's state_dict plus a ``"sapsel"`` entry: the space signature (names, shapes), the parameter
        dtypes (the state dtypes follow them; the device does not matter), k, a hash of the selection, the class."""
        if getattr(self, "_perturbed", False):
            raise RuntimeError("state_dict() between first_step() and second_step() is not supported: the weights are "
                               "perturbed; save after second_step()")
        sd = super().state_dict()
        sd["sapsel"] = self._meta()
        return sd

    def _check_state(self, p, st) -> None:
        """Raise unless ``st`` is exactly what this optimizer would allocate for ``p``: keys, dtype (float64 for
        float64 parameters, else float32), k_p entries, finite values (NonFiniteError), exp_avg_sq >= 0."""
        name = self.space.names[self._pos[p]]
        if not isinstance(st, Mapping):
            raise ValueError(f"state_dict state for {name!r} is a {type(st).__name__}, not a dict")
        if not st:
            return
        if p not in self._idx:
            raise ValueError(f"state_dict has state {sorted(st)} for {name!r}, which has no selected coordinates")
        keys = set(st)
        expected = {"step", "exp_avg", "exp_avg_sq"} if self._state_base == "adamw" else {"momentum_buffer"}
        if (self._state_base == "adamw" and keys != expected) or not keys <= expected:
            raise ValueError(f"state_dict state for {name!r} has keys {sorted(keys)}; {type(self).__name__} "
                             f"(base {self._state_base}) keeps {sorted(expected)}")
        n, a = self._idx[p].numel(), acc_dtype(p.dtype)
        for key, v in st.items():
            if key == "step":
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"state_dict state[{name!r}]['step'] must be an int >= 0, got {v!r}")
                continue
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"state_dict state[{name!r}][{key!r}] is a {type(v).__name__}, not a tensor")
            if v.dtype != a or tuple(v.shape) != (n,):
                raise ValueError(f"state_dict state[{name!r}][{key!r}] is {v.dtype} of shape {tuple(v.shape)}; this "
                                 f"optimizer keeps {a} of shape ({n},) for this {p.dtype} parameter (was the "
                                 "checkpoint saved from parameters of another dtype?)")
            check_finite(v, f"state_dict state[{name!r}][{key!r}]", suffix="the optimizer was not changed")
            if key == "exp_avg_sq" and n and bool((v < 0).any()):
                raise ValueError(f"state_dict state[{name!r}]['exp_avg_sq'] has negative entries")

    def load_state_dict(self, state_dict):
        """Load a state_dict saved by the same optimizer class over the same parameters (names, shapes, dtypes; any
        device) and selection. Everything is checked before anything changes: the metadata, the param-group layout
        and hyper-parameters (as at construction), and every state tensor against what this optimizer would
        allocate (dtype: float64 for float64 parameters, else float32; k entries per parameter). Raises ValueError
        naming the parameter and key (the optimizer is unchanged), NonFiniteError for NaN/Inf state values.
        Peak extra memory: one copy of the loaded state (the old state is released after the swap)."""
        if getattr(self, "_perturbed", False):
            raise RuntimeError("load_state_dict() between first_step() and second_step() is not supported")
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        meta = state_dict.get("sapsel")
        if not isinstance(meta, Mapping):
            raise ValueError("not a sapsel sparse-optimizer state_dict (no 'sapsel' entry)")
        mine = self._meta()
        if meta.get("type") != mine["type"]:
            raise ValueError(f"state_dict is from {meta.get('type')}, not {mine['type']}")
        if meta.get("base", self._state_base) != self._state_base:
            raise ValueError(f"state_dict is from a {meta['type']} with base {meta['base']!r}, this one has base "
                             f"{self._state_base!r}")
        if meta.get("space_signature") != mine["space_signature"]:
            raise ValueError(f"state_dict was saved for another model/ParamSpace (signature "
                             f"{meta.get('space_signature')}, here {mine['space_signature']})")
        dts = meta.get("dtypes")
        if dts is not None:
            if not isinstance(dts, (list, tuple)) or len(dts) != len(self.space):
                raise ValueError(f"state_dict 'sapsel' dtypes must list {len(self.space)} dtypes, got {dts!r}")
            for name, saved, here in zip(self.space.names, dts, mine["dtypes"]):
                if saved != here:
                    raise ValueError(f"state_dict was saved for {name!r} in {saved}, the parameter is {here} here; "
                                     "optimizer state follows the parameter dtype: cast the model back, or start "
                                     "a fresh optimizer")
        if meta.get("shard") != mine.get("shard"):
            def where(sh):
                return "one process (unsharded)" if sh is None else f"rank {sh[0]} of an FSDP2 world of {sh[1]}"

            raise ValueError(f"state_dict was saved by {where(meta.get('shard'))}, this optimizer is "
                             f"{where(mine.get('shard'))}: FSDP2 optimizer state is per shard; resume on the same "
                             "world size, each rank loading its own state_dict")
        if meta.get("k") != self.k or meta.get("selection_hash") != self._selection_hash:
            raise ValueError(f"state_dict was saved with a different selection (k={meta.get('k')}, here k={self.k}); "
                             "resume with the same Selection")
        groups = state_dict.get("param_groups")
        state = state_dict.get("state")
        if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
            raise ValueError("state_dict must hold 'param_groups' (a list) and 'state' (a dict)")
        if len(groups) != len(self.param_groups) or any(
                not isinstance(a, Mapping) or len(a.get("params", ())) != len(b["params"])
                for a, b in zip(groups, self.param_groups)):
            raise ValueError("state_dict has a different param-group layout")
        for i, a in enumerate(groups):
            try:
                self._hparams(a)
            except (TypeError, ValueError) as e:
                raise type(e)(f"state_dict param group {i}: {e}") from None
        id_map = {}
        for a, b in zip(groups, self.param_groups):
            id_map.update(zip(a["params"], b["params"]))
        for pid, st in state.items():
            if pid not in id_map:
                raise ValueError(f"state_dict has state for parameter id {pid!r}, which is in no param group")
            self._check_state(id_map[pid], st)
        # every check passed: build the new state (copies, contiguous, on the parameters' device), then swap
        new_state = {}
        for pid, st in state.items():
            if st:
                p = id_map[pid]
                new_state[p] = {k: (torch.empty(v.shape, dtype=v.dtype, device=p.device).copy_(v)
                                    if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        new_groups = [{k: copy.deepcopy(v) for k, v in a.items() if k not in ("params", "param_names")}
                      for a in groups]
        for b, new in zip(self.param_groups, new_groups):
            b.update(new)
        self.state.clear()
        self.state.update(new_state)
        self.last_step_skipped = False
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


# --------------------------------------------------------------------------------------------------- SGD / AdamW
class SparseSGD(_SparseOptimizer):
    """torch.optim.SGD (momentum, dampening, Nesterov, L2 weight decay) on the selected coordinates only.

    Args (the order of ``torch.optim.SGD``):
        params: a model, a ParamSpace, an iterable of parameters or of param-group dicts (see the module doc).
        selection: a Selection, an integer index tensor of flat indices (any order; sorted here) or a bool mask,
            made for these parameters (see the module doc).
        lr: learning rate (default 1e-3); a float or a 1-element Tensor.
        momentum: momentum factor (default 0).
        dampening: dampening for momentum (default 0).
        weight_decay: L2 penalty (default 0), applied to the selected coordinates only.
        nesterov: Nesterov momentum (default False; needs momentum > 0 and dampening == 0).

    All finite and >= 0 (ValueError naming the argument otherwise), checked again for every group at every step.

    State: ``momentum_buffer`` (k values, float32; float64 for float64 parameters) when ``momentum > 0``.
    Peak extra memory of ``step()``: the momentum buffer on the first step (k float32) plus O(P) partial sums
    (P = parameter tensors); a NaN/Inf gradient: one parameter's selected gradient (<= k values) to locate it.
    Raises NonFiniteError (nothing modified) for a NaN/Inf selected gradient outside a GradScaler, which skips it.
    """

    _hp_keys = _SGD_KEYS

    def __init__(self, params, selection, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, selection, dict(lr=lr, momentum=momentum, dampening=dampening,
                                                 weight_decay=weight_decay, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step on the selected coordinates; ``closure`` (optional) re-evaluates the loss and returns it."""
        return self._plain_step(closure, self._plan_sgd)


class SparseAdamW(_SparseOptimizer):
    """torch.optim.AdamW (amsgrad=False: bias correction, decoupled weight decay) on the selected coordinates only.

    Args (the order of ``torch.optim.AdamW``):
        params, selection: as for :class:`SparseSGD`.
        lr: learning rate (default 1e-3); a float or a 1-element Tensor.
        betas: coefficients of the running averages of the gradient and its square (default (0.9, 0.999)), each in
            [0, 1).
        eps: term added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay coefficient (default 1e-2), applied to the selected coordinates only.

    lr, eps, weight_decay: finite and >= 0 (ValueError naming the argument otherwise), checked at every step.

    State: ``step`` (int) and ``exp_avg``, ``exp_avg_sq`` (k values each, float32; float64 for float64 parameters).
    Peak extra memory of ``step()``: the two moments on the first step (2k float32) plus O(P) partial sums.
    Raises NonFiniteError (nothing modified) for a NaN/Inf selected gradient outside a GradScaler, which skips it.
    """

    _hp_keys = _ADAMW_KEYS
    _state_base = "adamw"

    def __init__(self, params, selection, lr: float | torch.Tensor = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, selection, dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                                                 eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on the selected coordinates; ``closure`` (optional) re-evaluates the loss and returns it."""
        return self._plain_step(closure, self._plan_adamw)


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

    Args:
        params, selection: as for :class:`SparseSGD`.
        base: "sgd" or "adamw", the base optimizer.
        lr: learning rate; None means the base optimizer's default, 1e-3.
        rho: neighbourhood size (default 0.05).
        adaptive: ASAM (default False).
        eta: ASAM's T = |w| + eta offset (default 0.01).
        normalize: "selected" (norm over S) or "full" (norm over the whole gradient, SSAM).
        norm_eps: added to the norm (default 1e-12); with 0 and a zero gradient the perturbation is 0.
        bn_once: when ``params`` is a model, ``step(closure)`` runs the second closure under
            :func:`frozen_bn_stats` (BatchNorm statistics updated once per SAM step).
        **base_kwargs: SGD ``momentum, dampening, weight_decay, nesterov``; AdamW ``betas, eps, weight_decay``
            (the base optimizers' defaults).

    lr, rho, eta, norm_eps and the base hyper-parameters: finite and >= 0, betas in [0, 1) (ValueError naming the
    argument). ``rho``, ``adaptive``, ``eta`` and the base hyper-parameters are per param group; the norm is global
    over all groups.

    State: the base state (``momentum_buffer``: k float32, or ``step``, ``exp_avg``, ``exp_avg_sq``: 2k float32;
    float64 for float64 parameters) plus the saved weights (k values in the parameter dtype, a reused scratch buffer
    not in the state_dict). Peak extra memory: first_step() - the saved weights (allocated on the first call) and
    O(P) partial sums; when the float32 sum of squares overflows with finite entries, one parameter's selected
    gradient in float64 (<= k values; with ``normalize="full"`` the whole parameter) to recompute it.
    second_step() - the base state on the first step (k, or 2k values), nothing else.

    Non-finite gradients: outside AMP, ``first_step`` raises NonFiniteError before perturbing and ``second_step``
    restores the weights exactly, then raises NonFiniteError. Under a GradScaler the step is skipped instead (see
    the module doc).
    """

    def __init__(self, params, selection, base: str = "sgd", lr: Optional[float | torch.Tensor] = None,
                 rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, normalize: str = "selected",
                 norm_eps: float = 1e-12, bn_once: bool = True, **base_kwargs):
        if base not in ("sgd", "adamw"):
            raise ValueError(f"base must be 'sgd' or 'adamw', got {base!r}")
        if normalize not in ("selected", "full"):
            raise ValueError(f"normalize must be 'selected' or 'full', got {normalize!r}")
        if not isinstance(bn_once, bool):
            raise TypeError(f"bn_once must be a bool, got {type(bn_once).__name__}")
        if base == "sgd":
            defaults = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
        else:
            defaults = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        unknown = set(base_kwargs) - set(defaults)
        if unknown:
            raise TypeError(f"unknown arguments for base={base!r}: {sorted(unknown)} (allowed: {sorted(defaults)})")
        defaults.update(base_kwargs)
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        defaults.update(lr=1e-3 if lr is None else lr, rho=rho, adaptive=adaptive, eta=eta)
        self.norm_eps = _check_hparams(norm_eps=norm_eps)["norm_eps"]
        self._hp_keys = (_SGD_KEYS if base == "sgd" else _ADAMW_KEYS) + _SAM_KEYS
        self._state_base = base
        self.base = base
        self.normalize = normalize
        self.bn_once = bn_once
        self._perturbed = False
        self._pass1_skipped = False
        self._scaler = None  # the enabled GradScaler given to the pending first_step
        self._pert: List[torch.Tensor] = []  # parameters perturbed by the pending first_step
        self._saved: Dict[torch.Tensor, torch.Tensor] = {}  # k pre-perturbation weights (scratch, not in state_dict)
        super().__init__(params, selection, defaults)

    # ------------------------------------------------------------------ the SAM norm
    def _norm_inputs(self, group):
        """(params, grads, idx, offsets) that the ``normalize="full"`` norm reads in one group: every parameter with
        a gradient (the kernel ignores idx then)."""
        ps = [p for p in group["params"] if p.grad is not None]
        empty = torch.empty(0, dtype=torch.int64, device=self.space.device)
        return (ps, [self._dense_grad(p) for p in ps], [self._idx.get(p, empty) for p in ps],
                [self._off[p] for p in ps])

    def _sq_f64(self, p, g, ix, hp) -> float:
        """Slow path: one tensor's (ASAM-weighted) sum of squares in float64 (its float32 sum overflowed), chunk by
        chunk (at most 2 x 8 MiB of float64 scratch)."""
        off = self._off[p]
        gf, wf = g.reshape(-1), self._t(p).detach().reshape(-1)
        if self.normalize != "full":
            gf, wf = gf.index_select(0, ix - off), wf.index_select(0, ix - off)
        total = 0.0
        for a in range(0, gf.numel(), 1 << 20):  # float64 in chunks of 2^20 (8 MiB), never a whole-tensor copy
            gc = gf[a:a + (1 << 20)].double()
            if hp["adaptive"]:
                gc = gc * (wf[a:a + (1 << 20)].double().abs() + hp["eta"])
            total += float(torch.dot(gc, gc))
        return total

    def _grad_norm(self, hps, lists, inv_scale: float) -> Tuple[float, Optional[str]]:
        """(||g|| as the class doc defines it, unscaled; None) or (nan, where the first NaN/Inf gradient is).
        One fused pass and one host sync; the slow path (a non-finite partial) locates the bad entry or, when every
        entry is finite and the float32 sum overflowed, recomputes that tensor's sum in float64. Under FSDP2 the
        shards' sums of squares are combined by one float64 SUM all_reduce, the verdicts by one MIN of 2 int64."""
        total, where, err = 0.0, None, None
        try:
            total, where = self._grad_sq_local(hps, lists)
        except Exception as e:  # noqa: BLE001 - under FSDP2 every rank must learn of it (below)
            if self._shard_group is None:
                raise
            err = e
        if self._shard_group is not None:
            import torch.distributed as dist

            # the shards' sums of squares (one SUM all_reduce of a float64), then who failed (one MIN of 2 int64)
            buf = torch.tensor([total if where is None and err is None else 0.0], dtype=torch.float64,
                               device=_flag_device(self._shard_group, self.space.device))
            dist.all_reduce(buf, group=self._shard_group)
            total = float(buf[0])
            bad_rank, err_rank = _first_rank([where is not None, err is not None], self._shard_group,
                                             self.space.device)
            if err is not None:
                raise err
            if err_rank is not None:
                raise NonFiniteError(f"SparseSAM.first_step: computing the gradient norm failed on rank {err_rank}'s "
                                     "shard; nothing was modified")
            if where is None and bad_rank is not None:
                where = f"in the shard of rank {bad_rank}"
            if where is not None:
                return float("nan"), where
        if where is not None:
            return float("nan"), where
        return math.sqrt(total) * inv_scale, None

    def _grad_sq_local(self, hps, lists) -> Tuple[float, Optional[str]]:
        """(this rank's sum of squares, None) or (nan, where); see :meth:`_grad_norm`."""
        full = self.normalize == "full"
        parts, owners = [], []
        for group, hp, (ps, gs, ixs) in zip(self.param_groups, hps, lists):
            ps, gs, ixs, offs = self._norm_inputs(group) if full else (ps, gs, ixs, self._offs(ps))
            if ps:
                sq = torch.ops.sapsel.sam_grad_sqnorm(gs, self._ts(ps), ixs, offs, hp["eta"], hp["adaptive"], full)
                parts.append(sq.double())
                owners.extend((p, g, ix, hp) for p, g, ix in zip(ps, gs, ixs))
        if not parts:
            return 0.0, None
        part = parts[0] if len(parts) == 1 else torch.cat(parts)
        total = float(part.sum())
        if not math.isfinite(total):
            fin = torch.isfinite(part)
            for j in (~fin).nonzero().reshape(-1).tolist():
                p, g, ix, _ = owners[j]
                where = self._first_bad(p, g, ix, full)
                if where is not None:
                    return float("nan"), where + (", read by the normalize='full' norm" if full else "")
            total = float(part[fin].sum()) + sum(self._sq_f64(*owners[j]) for j in (~fin).nonzero().reshape(-1)
                                                 .tolist())
            if not math.isfinite(total):
                raise NonFiniteError("SparseSAM.first_step: the gradient norm is not finite although every gradient "
                                     "entry is (with adaptive=True: a selected parameter is NaN/Inf; or the norm "
                                     "overflows float64); nothing was modified")
        return total, None

    # ------------------------------------------------------------------ GradScaler
    @staticmethod
    def _check_scaler(grad_scaler):
        if grad_scaler is None:
            return None
        if not callable(getattr(grad_scaler, "is_enabled", None)) or not callable(getattr(grad_scaler, "get_scale",
                                                                                           None)):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        if not grad_scaler.is_enabled():
            return None
        if not isinstance(getattr(grad_scaler, "_per_optimizer_states", None), Mapping):
            raise TypeError(f"grad_scaler {type(grad_scaler).__name__} has no per-optimizer found-inf record "
                            "(_per_optimizer_states); use torch.amp.GradScaler or a subclass")
        return grad_scaler

    def _tell_scaler(self, scaler) -> None:
        """Record an overflow in ``scaler``'s found-inf record of this optimizer, which ``scaler.update()`` reads
        (``_per_optimizer_states[id(opt)]["found_inf_per_device"]``, torch.amp.GradScaler 2.x): the scale is lowered.
        ``scaler.step(opt)`` replaces the record with its own check of the second-pass gradients before calling
        ``step()``, so ``second_step`` records it again."""
        record = scaler._per_optimizer_states[id(self)]["found_inf_per_device"]
        scale = getattr(scaler, "_scale", None)
        devices = list(record) or [scale.device if isinstance(scale, torch.Tensor) else self.space.device]
        for d in devices:
            record[d] = torch.ones((), dtype=torch.float32, device=d)

    # ------------------------------------------------------------------ the two steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> bool:
        """Perturb w_S by e_S (see the class doc); returns True.

        ``grad_scaler``: the torch.amp.GradScaler whose scale multiplies the gradients (they are unscaled inside the
        kernels); finish the step with ``scaler.step(opt)``. A NaN/Inf gradient (among those the norm reads): with
        an enabled scaler, nothing is perturbed, the overflow is recorded for ``scaler.update()`` (the scale is
        lowered even if the second pass is finite), the following second step skips, and False is returned;
        without one, NonFiniteError (nothing modified). Peak extra memory: see the class doc (k saved weights).
        """
        if self._perturbed:
            raise RuntimeError("first_step() called twice without second_step()")
        scaler = self._check_scaler(grad_scaler)
        hps = [self._hparams(g) for g in self.param_groups]
        inv = 1.0 if scaler is None else 1.0 / float(scaler.get_scale())
        lists = [self._active(g) for g in self.param_groups]
        norm, bad = self._grad_norm(hps, lists, inv)
        self._pass1_skipped = False
        self._scaler = scaler
        if bad is not None:
            if scaler is None:
                raise self._nonfinite("first_step", bad, "nothing was modified")
            self._pass1_skipped = True
            self._tell_scaler(scaler)
            if zero_grad:
                self.zero_grad()
            return False
        for ps, _, ixs in lists:
            for p, ix in zip(ps, ixs):
                if p not in self._saved:
                    self._saved[p] = torch.empty(ix.numel(), dtype=p.dtype, device=p.device)
        denom = norm + self.norm_eps
        try:
            for hp, (ps, gs, ixs) in zip(hps, lists):
                if not ps:
                    continue
                # a zero norm means a zero gradient on what the norm reads: e = 0 (no 0/0 with norm_eps = 0)
                scale = hp["rho"] / denom * inv if denom > 0 else 0.0
                torch.ops.sapsel.sam_perturb(self._ts(ps), gs, ixs, self._offs(ps), [self._saved[p] for p in ps], scale,
                                             hp["eta"], hp["adaptive"])
                self._pert.extend(ps)
        except BaseException:
            self.restore()
            raise
        self._perturbed = True
        if zero_grad:
            self.zero_grad()
        return True

    def _restore(self, params):
        for p in params:
            self._t(p).view(-1).index_copy_(0, self._idx[p] - self._off[p], self._saved[p])

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a pending first_step() exactly (bit-for-bit, no update): for a second pass that failed or was
        abandoned (e.g. an exception in the loss). A no-op when nothing is perturbed."""
        self._restore(list(self._pert))
        self._pert = []
        self._perturbed = False
        self._pass1_skipped = False
        self._scaler = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> bool:
        """Restore w_S and apply the base step with the gradient at the perturbed point, fused. Returns True, or
        False when the step was skipped under a GradScaler (inf/NaN in either pass): then every parameter and all
        state are exactly as before first_step(). Outside AMP a NaN/Inf selected gradient restores the weights and
        raises NonFiniteError. Peak extra memory: the base state on the first step (k or 2k values)."""
        if not self._perturbed:
            if self._pass1_skipped:
                scaler, self._scaler, self._pass1_skipped = self._scaler, None, False
                if scaler is not None:
                    self._tell_scaler(scaler)  # scaler.step re-checked only the second pass
                self.last_step_skipped = True
                if zero_grad:
                    self.zero_grad()
                return False
            raise RuntimeError("second_step() called without first_step()")
        pert = set(self._pert)
        try:
            hps = [self._hparams(g) for g in self.param_groups]
            inv, found, amp = self._amp()
            if self._scaler is not None and not amp:
                stage = self._scaler._per_optimizer_states[id(self)].get("stage")
                if getattr(stage, "name", None) == "READY":
                    raise RuntimeError("first_step(grad_scaler=scaler) was used but second_step() was called "
                                       "directly with still-scaled gradients: finish the step with scaler.step(opt)")
            lists = [self._active(g, only=pert) for g in self.param_groups]
            bad = None if found else self._check_grads(lists)
        except BaseException:
            self.restore()
            raise
        if bad is not None and not amp:
            self.restore()
            raise self._nonfinite("second_step", bad, "the perturbation was undone, nothing else was modified")
        ok = not found and bad is None
        if ok:
            calls, commit, done = [], {}, set()
            for hp, (ps, gs, ixs) in zip(hps, lists):
                if ps:
                    plan = self._plan_sgd if self.base == "sgd" else self._plan_adamw
                    calls += plan(hp, ps, gs, ixs, [self._saved[p] for p in ps], inv, commit)
                    done.update(ps)
            try:
                self._run(calls, commit, self.state)
            except BaseException:
                self.restore()  # the saved weights are untouched by the kernels: back to before first_step
                raise
            self._restore([p for p in self._pert if p not in done])  # perturbed but no gradient now: plain restore
        else:
            self._restore(list(pert))
        self._perturbed = False
        self._pert = []
        self._scaler = None
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
