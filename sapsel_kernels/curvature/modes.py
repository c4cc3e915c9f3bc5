"""The estimation mode: eval mode for every module, the math SDPA backend, and Hugging Face activation checkpointing
kept active (:func:`estimation_mode`, shared by ``hessian_diag``, ``unlearn``, ``forget`` and the measurements), with
the inspection of a model's checkpointing it rests on (:func:`hf_checkpointing`, :func:`is_reentrant`).
"""

import contextlib
import functools
import sys

import torch

__all__ = ["estimation_mode", "hf_checkpointing", "is_reentrant"]


def _checkpoint_target_is_torch(fn) -> bool:
    mod, name = getattr(fn, "__module__", "") or "", getattr(fn, "__name__", "")
    return (fn is torch.utils.checkpoint.checkpoint
            or (name in ("checkpoint", "checkpoint_func") and mod.split(".")[0] in ("torch", "transformers")))


def is_reentrant(func) -> bool | None:
    """Whether a Hugging Face ``_gradient_checkpointing_func`` runs reentrant ``torch.utils.checkpoint``: True /
    False for the ``functools.partial(checkpoint, use_reentrant=...)`` that ``gradient_checkpointing_enable``
    installs (no ``use_reentrant`` is reentrant: torch's default), None for a function it cannot inspect."""
    if not isinstance(func, functools.partial) or not _checkpoint_target_is_torch(func.func):
        return None
    return func.keywords.get("use_reentrant") is not False


def hf_checkpointing(model: torch.nn.Module) -> tuple[list, list]:
    """(layers, others): the modules of ``model`` with Hugging Face activation checkpointing switched on
    (``gradient_checkpointing`` True and a callable ``_gradient_checkpointing_func``, what
    ``gradient_checkpointing_enable`` sets). ``layers`` are ``transformers.GradientCheckpointingLayer`` instances,
    whose ``forward`` checkpoints itself when ``self.gradient_checkpointing and self.training`` (transformers >=
    4.53); ``others`` the remaining flagged modules of transformers classes (the model-level modules, which only
    read the flag, or the layer loop of older transformers / remote code that checkpoints its layers itself).
    Modules of other libraries are left alone (their checkpointing does not depend on this mode)."""
    gcl = getattr(sys.modules.get("transformers.modeling_layers"), "GradientCheckpointingLayer", None)
    layers, others = [], []
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is not True or \
                not callable(getattr(m, "_gradient_checkpointing_func", None)):
            continue
        if gcl is not None and isinstance(m, gcl):
            layers.append(m)
        elif type(m).__module__.startswith("transformers"):  # transformers.* and remote code (transformers_modules)
            others.append(m)
    return layers, others


def _eval_inside(module: torch.nn.Module, func):
    """``func`` (a layer's checkpoint function) with the checkpointed body run with ``module.training`` False: the
    layer looks like train mode to Hugging Face's "checkpoint when training" test, its own forward (dropout through
    ``self.training``, layer drop) runs in eval mode, in the first forward and in the recomputation alike."""
    def checkpoint(fn, *args, **kwargs):
        def body(*a, **k):
            prev = module.training
            module.training = False
            try:
                return fn(*a, **k)
            finally:
                module.training = prev

        return func(body, *args, **kwargs)

    return checkpoint


@contextlib.contextmanager
def _keep_checkpointing(model: torch.nn.Module):
    """Keep the model's non-reentrant Hugging Face activation checkpointing active in eval mode (see
    :func:`estimation_mode`); everything it changes is restored on exit."""
    layers = [m for m in hf_checkpointing(model)[0] if is_reentrant(m._gradient_checkpointing_func) is not True]
    if not layers:
        yield
        return
    saved = [(m, m.training, m._gradient_checkpointing_func, "_gradient_checkpointing_func" in m.__dict__)
             for m in layers]
    configs = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if getattr(cfg, "use_cache", None) is True:
            configs[id(cfg)] = cfg
    try:
        for m, _, func, _ in saved:
            m._gradient_checkpointing_func = _eval_inside(m, func)
            m.training = True
        for cfg in configs.values():  # a KV cache written in the forward would be written again by the recompute
            cfg.use_cache = False
        yield
    finally:
        for cfg in configs.values():
            cfg.use_cache = True
        for m, training, func, own in saved:
            m.training = training
            if own:
                m._gradient_checkpointing_func = func
            else:  # it was the class's: drop the instance attribute again
                m.__dict__.pop("_gradient_checkpointing_func", None)


@contextlib.contextmanager
def estimation_mode(model: torch.nn.Module):
    """Eval mode for every module (restored per module afterwards) and the math SDPA backend.

    Activation checkpointing that a Hugging Face model runs only in train mode (``gradient_checkpointing_enable``
    with ``use_reentrant=False``; layers of ``transformers.GradientCheckpointingLayer``) stays ACTIVE: each such
    layer gets ``training=True`` so that it checkpoints, with its checkpointed forward run in eval mode, and the
    configs' ``use_cache`` is False meanwhile (a KV cache would be updated again by the recomputation); all of it is
    restored afterwards. Dropout is off everywhere, so the loss (and its derivatives) equal the un-checkpointed
    eval-mode ones. Reentrant checkpointing is left inactive here (it supports no ``torch.autograd.grad``;
    ``hessian_diag`` refuses it before estimating).
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel(SDPBackend.MATH)
        except ImportError:  # pragma: no cover - very old torch
            ctx = contextlib.nullcontext()
        with ctx, _keep_checkpointing(model):
            yield
    finally:
        for m, t in flags:
            m.training = t
