"""Pallas kernels for meshserve (TPU Mosaic and GPU Triton), with pure-JAX references."""
