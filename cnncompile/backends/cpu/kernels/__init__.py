"""Numba kernels of the CPU backend, one module per family; the emitters import them by name."""
