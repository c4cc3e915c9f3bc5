"""Guarded loading of the optional compiled extension ``sapsel_kernels._C``.

Importing sapsel_kernels never requires it: a missing or broken build leaves ``ext()`` returning None, and the op
layer serves CPU tensors with the pure-PyTorch reference instead. The load happens at most once, on first use.
"""

import warnings

_STATE = {"loaded": False, "module": None, "error": None}


def ext():
    """The compiled module, or None when it is not built or fails to load (warns once, with the reason)."""
    if not _STATE["loaded"]:
        _STATE["loaded"] = True
        try:
            from . import _C  # noqa: F401  (built by setup.py)

            _STATE["module"] = _C
        except Exception as exc:  # ImportError, or an ABI mismatch against another torch
            _STATE["error"] = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ModuleNotFoundError):
                warnings.warn(
                    "sapsel_kernels: the C++ extension failed to load "
                    f"({_STATE['error']}); CPU ops fall back to the pure-PyTorch reference. Rebuild it against the "
                    "installed torch with `pip install --no-build-isolation -e .`.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _STATE["module"]


def ext_error():
    """Why the extension is unavailable (None when it loaded)."""
    ext()
    return _STATE["error"]


def ext_loaded() -> bool:
    return ext() is not None
