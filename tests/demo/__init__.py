"""Tests of sapsel_kernels/demo/."""
