"""Numba kernels by op family, forward and backward side by side."""
