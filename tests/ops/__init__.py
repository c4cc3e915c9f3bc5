"""Tests of sapsel_kernels/ops/."""
