"""Helpers shared by the tests and the benchmarks: ``dist`` (a world of gloo processes on CPU: ``run_world``),
``backends`` (the CPU paths of the ops available here), ``models`` (the tiny MLP of the selection and unlearning
tests) and ``hessian_models`` (the loops and the peak-memory measure that the memory contracts and the diag(H)
benchmarks compare against)."""
