"""Tests of sapsel_kernels/forgetting/."""
