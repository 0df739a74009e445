"""Pallas kernels for sparse dispatch, each next to its pure-jnp reference."""
from kernels.gmm import gmm, tgmm

__all__ = ["gmm", "tgmm"]
