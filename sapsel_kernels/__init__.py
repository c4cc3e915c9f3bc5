"""sapsel-kernels: fused kernels for sharpness-aware parameter selection in machine unlearning.

Importing this package needs only torch: it never initialises CUDA, never imports triton and works without the
compiled extension. Heavier parts of the API are imported on first attribute access.
"""

import importlib

from . import ops  # noqa: F401  (registers torch.ops.sapsel.*)
from ._backend import use_backend  # noqa: F401
from ._ext import ext_error, ext_loaded  # noqa: F401
from .data import criterion  # noqa: F401
from .errors import NonFiniteError  # noqa: F401
from .space import ParamSpace  # noqa: F401
from .version import __version__  # noqa: F401

# public name -> module that defines it (imported lazily)
_LAZY = {
    "select": "selection",
    "Selection": "selection",
    "as_selection": "selection",
    "resolve_k": "selection",
    "ShardedSelection": "distributed",
    "hessian_diag": "hessian",
    "DiagEstimate": "hessian",
    "ProbeConfig": "hessian",
    "StopRule": "hessian",
    "Checkpoint": "hessian",
    "CheckpointingError": "hvp",
    "SparseSAM": "optim",
    "SparseSGD": "optim",
    "SparseAdamW": "optim",
    "UnlearnReport": "unlearn",
    "FirstOrder": "rules",
    "SecondOrder": "rules",
    "DiagNewton": "rules",
    "SAMFinetune": "rules",
    "GradientAscent": "rules",
    "Targeted": "rules",
    "forget": "forget",
    "measure_secret": "measure",
    "continuation_logppl": "measure",
    "as_tokenizer": "measure",
    "ForgetReport": "forget",
    "select_parameters": "strategies",
    "parameter_scores": "strategies",
    "strategy_arguments": "strategies",
    "Patch": "patch",
    "apply_patch": "patch",
    "revert_patch": "patch",
    "diff_patch": "patch",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'sapsel_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


# ``unlearn`` and ``forget`` are both submodules and functions. Importing a submodule (``from sapsel_kernels.forget
# import ...``, or ``sk.ForgetReport``, which loads it) binds the package attribute to the MODULE, and the lazy hook
# above is never consulted; importing them here (they need only torch and the light modules: +40 ms measured for
# forget) binds the functions once the submodules are loaded, so the functions win for good.
from .unlearn import unlearn  # noqa: E402,F401
from .forget import forget  # noqa: E402,F401
