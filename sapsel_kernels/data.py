"""Batches and losses: the one definition every entry point uses.

The batch rule
--------------
* A **tensor**, a **tuple** or a **Mapping** (a dict, Hugging Face's ``BatchEncoding``) is ONE batch.
* A **list**, a DataLoader or any other iterable is a SEQUENCE OF BATCHES, whatever each item is (a DataLoader's
  items are lists ``[x, y]``; each one is a batch because it is an item).

So ``(x, y)`` is one batch and ``[(x, y), (x2, y2)]`` two; ``[ids1, ids2]`` is two batches of token ids. A top-level
list of two or more tensors that differ in dtype or trailing shape -- which is what ``[x, y]`` meant as one batch
looks like -- is ambiguous and raises a ValueError that names both fixes.

Functions that read the data several times (every Hutchinson pass, every CG product) refuse one-shot iterators
(generators, ``iter(...)``) with a TypeError; functions that read it once accept them.

The loss rule
-------------
``make_loss(loss)`` turns what the user has into ``loss_fn(model, batch) -> scalar MEAN loss over the batch``:

* a callable ``loss_fn(model, batch)`` is used as it is (the package's native form);
* a torch loss module (``nn.CrossEntropyLoss()``, any ``nn.modules.loss._Loss``) or ``criterion(fn)`` for any
  ``fn(output, target)``: the batch is ``(*inputs, target)`` and the loss is ``criterion(model(*inputs), target)``
  (the PyHessian / curvlinops habit);
* ``None``: the model computes its own loss (Hugging Face): ``model(**batch).loss`` for a Mapping,
  ``model(*batch).loss`` for a tuple, ``model(batch).loss`` for a tensor.

Every call checks that the loss is a scalar tensor that depends on the parameters: a loss computed under
``torch.no_grad()`` (or detached) raises ValueError instead of giving a silent all-zero curvature or update.
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable

import torch

__all__ = ["as_batches", "batch_size", "n_points", "slice_batch", "iter_points", "make_loss", "criterion", "Loss",
           "LossError"]


# ================================================================================================== batches
def is_batch(obj) -> bool:
    """True when ``obj`` is one batch under the batch rule (a tensor, a tuple or a Mapping)."""
    return isinstance(obj, (torch.Tensor, tuple, Mapping))


def _check_list_of_tensors(items: list, what: str) -> None:
    ts = [t for t in items if isinstance(t, torch.Tensor)]
    if len(ts) < 2 or len(ts) != len(items):
        return
    kinds = {(t.dtype, tuple(t.shape[1:])) for t in ts}
    if len(kinds) > 1:
        desc = ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in ts[:4])
        raise ValueError(f"{what} is a list of tensors of different dtypes/shapes ({desc}). A list is a sequence of "
                         f"batches, so this would be {len(ts)} batches; if it is ONE batch [x, y], pass a tuple "
                         "(x, y); for several batches pass [(x1, y1), (x2, y2), ...] or a DataLoader")


def as_batches(data, *, passes: str = "many", what: str = "data") -> Sequence | Iterable:
    """``data`` (one batch, or a sequence / iterable of batches; see the module docstring) -> an iterable of batches
    that can be read ``passes`` times ("many" or "once").

    Returns ``[data]`` for one batch, a list for a list (or for a one-shot iterator read with ``passes="once"``), and
    any other re-iterable (a DataLoader) as it is; ``passes="once"`` holds a one-shot iterator's batches in memory
    (a list of what it yields), nothing else is copied. Raises ValueError for None / no batches / an ambiguous list of
    tensors, TypeError for a one-shot iterator when ``passes="many"`` or an object that is not iterable.
    """
    if passes not in ("many", "once"):
        raise ValueError(f"passes must be 'many' or 'once', got {passes!r}")
    if data is None:
        raise ValueError(f"{what} is None: give one batch or an iterable of batches")
    if is_batch(data):
        return [data]
    if isinstance(data, list):
        if not data:
            raise ValueError(f"{what} is an empty list of batches")
        _check_list_of_tensors(data, what)
        return data
    if isinstance(data, Iterator):
        if passes == "many":
            raise TypeError(f"{what} is a one-shot iterator ({type(data).__name__}), but it is read several times "
                            "here: pass a list of batches or a DataLoader")
        out = list(data)
        if not out:
            raise ValueError(f"{what} yielded no batches")
        return out
    if not isinstance(data, Iterable):
        raise TypeError(f"{what} must be a batch (tensor, tuple, dict) or an iterable of batches, "
                        f"got {type(data).__name__}")
    try:
        empty = len(data) == 0  # type: ignore[arg-type]
    except TypeError:
        empty = False
    if empty:
        raise ValueError(f"{what} has no batches")
    return data


def _first_tensor(batch) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return batch["input_ids"]
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for t in batch:
            if isinstance(t, torch.Tensor):
                return t
    return None


def batch_size(batch) -> int:
    """Points in one batch: the leading dimension of its first tensor (a Mapping: ``input_ids`` when present, else its
    first tensor); a 0-dim tensor counts as one point."""
    t = _first_tensor(batch)
    if t is None:
        raise TypeError(f"cannot count the points of a {type(batch).__name__} batch: it holds no tensor")
    return int(t.shape[0]) if t.dim() else 1


def n_points(batches) -> int:
    """Total points over an iterable of batches."""
    return sum(batch_size(b) for b in batches)


def slice_batch(batch, idx: torch.Tensor):
    """Points ``idx`` of a batch: every tensor whose leading size is the batch size is indexed, the rest kept."""
    n = batch_size(batch)

    def cut(t):
        return t[idx.to(t.device)] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t

    if isinstance(batch, torch.Tensor):
        return cut(batch)
    if isinstance(batch, Mapping):
        out = {k: cut(v) for k, v in batch.items()}
        try:
            return type(batch)(out)
        except Exception:  # noqa: BLE001 - a Mapping type without a dict constructor
            return out
    items = [cut(t) for t in batch]
    return tuple(items) if isinstance(batch, tuple) else items


def iter_points(batches) -> Iterator[Any]:
    """Yield single-point batches (for per-sample gradients), in order."""
    for b in batches:
        for i in range(batch_size(b)):
            yield slice_batch(b, torch.tensor([i]))


# ================================================================================================== losses
class LossError(ValueError):
    """The loss broke the loss rule (not a scalar, not dependent on the parameters, a criterion called as
    ``loss_fn(model, batch)``). A usage error: HVP mode fallbacks re-raise it instead of trying another mode."""


class Loss:
    """``loss(model, batch) -> scalar`` with the parameter-dependence check (see the module docstring)."""

    def __init__(self, fn: Callable, kind: str, source=None):
        self.fn, self.kind, self.source = fn, kind, source

    def __call__(self, model, batch) -> torch.Tensor:
        try:
            out = self.fn(model, batch)
        except TypeError as exc:
            # F.cross_entropy or a criterion module that is not an nn loss class, called as fn(model, batch): torch
            # names the model's class in its complaint ("must be Tensor, not Sequential")
            if self.kind == "loss_fn(model, batch)" and type(model).__name__ in str(exc):
                raise LossError(f"the loss was called as loss_fn(model, batch) and failed ({exc}); if it is a "
                                "criterion(output, target) such as F.cross_entropy, pass sk.criterion(fn)") from exc
            raise
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {tuple(out.shape)}"
            raise LossError(f"the loss must return a scalar tensor (the mean loss over the batch), got {got}")
        if torch.is_grad_enabled() and not out.requires_grad:
            raise LossError("the loss does not depend on the model's parameters (was it computed under "
                             "torch.no_grad(), detached, or are all parameters frozen?); curvature and updates "
                             "would be silently zero")
        return out.reshape(())

    def __repr__(self) -> str:
        return f"Loss({self.kind}: {self.source!r})"


class criterion:  # noqa: N801 - used like a function: sk.criterion(fn)
    """Mark ``fn(output, target)`` as a criterion: the batch is ``(*inputs, target)`` and the loss is
    ``fn(model(*inputs), target)``. Torch loss modules (``nn.CrossEntropyLoss()``) are recognised without it."""

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"criterion(fn): fn must be callable, got {type(fn).__name__}")
        self.fn = fn


def _criterion_loss(crit: Callable) -> Callable:
    def loss(model, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"with a criterion ({type(crit).__name__}) each batch must be a tuple (*inputs, target), "
                             f"got a {type(batch).__name__}")
        *inputs, target = batch
        return crit(model(*inputs), target)

    return loss


def _model_loss(model, batch):
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError("loss_fn=None needs a model whose output has a .loss (a Hugging Face model called with "
                         "labels, e.g. batches {'input_ids': ids, 'labels': ids}); otherwise pass "
                         "loss_fn(model, batch) or a criterion such as nn.CrossEntropyLoss()")
    return loss


def make_loss(loss) -> Loss:
    """The user's loss (callable ``loss_fn(model, batch)``, a torch loss module, ``criterion(fn)`` or None) ->
    :class:`Loss`. Idempotent."""
    if isinstance(loss, Loss):
        return loss
    if loss is None:
        return Loss(_model_loss, "model output .loss")
    if isinstance(loss, criterion):
        return Loss(_criterion_loss(loss.fn), "criterion", loss.fn)
    if isinstance(loss, torch.nn.modules.loss._Loss):
        return Loss(_criterion_loss(loss), "criterion", loss)
    if isinstance(loss, torch.nn.Module) and not callable(getattr(loss, "forward", None)):
        raise TypeError(f"loss {type(loss).__name__} is a module without forward")
    if not callable(loss):
        raise TypeError(f"loss_fn must be loss_fn(model, batch), a torch loss module, sk.criterion(fn) or None; "
                        f"got {type(loss).__name__}")
    return Loss(loss, "loss_fn(model, batch)", loss)
