"""Triton kernels. The only sub-package that imports triton; every module here is imported lazily on first use.

Under ``TRITON_INTERPRET=1`` (set before the first import of a module here) the kernels run on CPU tensors through
Triton's interpreter, which is how CPU-only CI tests them.
"""
