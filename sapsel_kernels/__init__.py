"""sapsel-kernels: fused kernels for sharpness-aware parameter selection in machine unlearning.

Importing this package needs only torch: it never initialises CUDA, never imports triton and works without the
compiled extension. Heavier parts of the API are imported on first attribute access.

The pipeline is in the folders (docs/layout.md): ``curvature`` (the Hessian-diagonal estimate), ``selection`` (which
coordinates), ``update`` (the sparse step on them) and ``forgetting`` (the forget pipeline on language models). The
modules' earlier flat paths (``sapsel_kernels.hessian``, ``sapsel_kernels.forget``, ...) stay importable: each is an
alias of the moved module, the same module object (see ``MOVED`` below).
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

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
    "ShardedSelection": "selection.distributed",
    "hessian_diag": "curvature.hessian",
    "DiagEstimate": "curvature.hessian",
    "ProbeConfig": "curvature.hessian",
    "StopRule": "curvature.hessian",
    "Checkpoint": "curvature.hessian",
    "CheckpointingError": "curvature.hvp",
    "SparseSAM": "update.optim",
    "SparseSGD": "update.optim",
    "SparseAdamW": "update.optim",
    "UnlearnReport": "update.unlearn",
    "FirstOrder": "update.rules",
    "SecondOrder": "update.rules",
    "DiagNewton": "update.rules",
    "SAMFinetune": "update.rules",
    "GradientAscent": "update.rules",
    "Targeted": "update.rules",
    "forget": "forgetting.forget",
    "measure_secret": "forgetting.measure",
    "continuation_logppl": "forgetting.measure",
    "as_tokenizer": "forgetting.measure",
    "ForgetReport": "forgetting.forget",
    "SelectConfig": "forgetting.config",
    "UpdateConfig": "forgetting.config",
    "TargetConfig": "forgetting.config",
    "MeasureConfig": "forgetting.config",
    "Evidence": "forgetting.config",
    "RemoveConfig": "forgetting.config",
    "SecretSpec": "forgetting.secret_spec",
    "select_parameters": "selection.strategies",
    "parameter_scores": "selection.strategies",
    "strategy_arguments": "selection.strategies",
    "Patch": "update.patch",
    "apply_patch": "update.patch",
    "revert_patch": "update.patch",
    "diff_patch": "update.patch",
}


# the flat module paths of earlier versions -> the module's place now. ``import sapsel_kernels.hessian``,
# ``from sapsel_kernels.hessian import X`` and ``sapsel_kernels.hessian.X`` give the module
# ``sapsel_kernels.curvature.hessian`` itself (one module object under two names in sys.modules: a monkeypatch through
# either name reaches the code, and a pickle that recorded an old path still finds its class).
# ``sapsel_kernels.selection`` needs no alias: it is the selection package, whose __init__ is the old selection.py.
MOVED = {
    **{m: f"curvature.{m}" for m in ("hessian", "hvp", "estimators", "probe_loop", "fsdp", "modes")},
    **{m: f"selection.{m}" for m in ("selection_core", "distributed", "strategies")},
    **{m: f"update.{m}" for m in ("optim", "rules", "solver", "unlearn", "sparse", "patch")},
    **{m: f"forgetting.{m}" for m in ("forget", "measure", "exposure", "audit", "secret_spec", "decoys", "report",
                                      "forget_example")},
}


class _AliasLoader(importlib.abc.Loader):
    """Loads ``sapsel_kernels.<old>`` as the module at its new path (imported then, if it was not yet)."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.spec = module.__spec__  # the import system sets __spec__ to the alias's spec; exec_module puts it back
        return module

    def exec_module(self, module):
        module.__spec__ = self.spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old flat module paths (``MOVED``) on sys.meta_path; every other name is left to the usual finders."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.rpartition(".")
        if prefix != __name__ or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"{__name__}.{MOVED[old]}"))


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())  # ahead of the path finders (and an editable install's finder)


def __getattr__(name):
    if name in MOVED:  # ``sapsel_kernels.hessian`` without an import first, as when the flat module was loaded
        return importlib.import_module(f"{__name__}.{name}")
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'sapsel_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(MOVED))


# ``unlearn`` and ``forget`` are both submodules and functions. Importing a submodule (``from sapsel_kernels.forget
# import ...``, or ``sk.ForgetReport``, which loads it) binds the package attribute to the MODULE, and the lazy hook
# above is never consulted; importing them here (they need only torch and the light modules: +40 ms measured for
# forget) binds the functions once the submodules are loaded, so the functions win for good.
from .update.unlearn import unlearn  # noqa: E402,F401
from .forgetting.forget import forget  # noqa: E402,F401

# The alias of a module already loaded is registered now (the others on their first import, by the finder above). For
# ``forget`` and ``unlearn`` this is what keeps the functions: ``import sapsel_kernels.forget`` then finds the module in
# sys.modules and leaves the package attribute alone, instead of loading it and binding the attribute to the module.
for _old, _new in MOVED.items():
    if f"{__name__}.{_new}" in sys.modules:
        sys.modules.setdefault(f"{__name__}.{_old}", sys.modules[f"{__name__}.{_new}"])
del _old, _new
