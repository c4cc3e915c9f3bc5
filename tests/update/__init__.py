"""Tests of sapsel_kernels/update/."""
