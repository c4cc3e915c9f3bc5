"""Curvature: the diagonal of the loss Hessian (or a Fisher / Gauss-Newton stand-in) of the parameters.

``hessian`` (``hessian_diag``, ``DiagEstimate``, ``ProbeConfig``), the estimators it dispatches to (``estimators``;
sharded: ``fsdp``), the probe loop (``probe_loop``), the Hessian-vector products (``hvp``) and the estimation mode
(``modes``). The first stage of the pipeline: its estimate is what ``selection`` ranks.
"""
