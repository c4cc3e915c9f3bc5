"""Tests of sapsel_kernels/selection/."""
