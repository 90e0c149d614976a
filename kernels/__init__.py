"""Triton kernels of cbd_fast (installed as ``cbd_fast.kernels``)."""
