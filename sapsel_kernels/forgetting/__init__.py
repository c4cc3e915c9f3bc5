"""Forgetting: the forget pipeline on language models, built on curvature, selection and update.

``forget`` (the entry point), the secrets it removes (``secret_spec``), the measurements before and after
(``measure``, ``exposure``, ``audit`` with its ``decoys``), the written report (``report``) and the runnable example
(``forget_example``).
"""
