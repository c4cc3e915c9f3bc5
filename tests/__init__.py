"""The test suite, a package so that its folders (one per source folder: curvature, selection, update, forgetting,
ops, demo) may hold test files of one name and share ``tests.helpers`` by import (``from tests.helpers.dist import
run_world``), here and in bench/. Run from the repository root: ``python -m pytest tests -m "not slow" -q``."""
