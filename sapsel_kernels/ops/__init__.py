"""torch.library ops in the ``sapsel`` namespace: one module per op family, each calling ``_lib.define_op``.

Importing this package registers every op (it imports each non-underscore module here); no triton, no CUDA init.
"""

import importlib
import pkgutil

from ._lib import REGISTRY, backend_table, define_op  # noqa: F401

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
