"""Tests of sapsel_kernels/curvature/."""
