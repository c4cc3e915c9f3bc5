"""The benchmarks and the measurement scripts, a package: a script that imports the tests' helpers runs from the
repository root as ``python -m bench.<script>`` (``bench.memory_lean_table``, ``bench.distributed_equality``,
``bench.nccl_check``); the pytest-benchmark files run with ``python -m pytest bench/<file> --benchmark-only``."""
