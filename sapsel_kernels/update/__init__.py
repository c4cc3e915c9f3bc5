"""Update: the sparse step on the selected coordinates.

The unlearning loop (``unlearn``), its update rules (``rules``; the trust-region solver ``solver``), the sparse
optimizers (``optim``), the functional sparse ops (``sparse``) and the saved difference of a step (``patch``). The
third stage of the pipeline: it changes the coordinates that ``selection`` chose.
"""
