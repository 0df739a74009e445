"""Pallas kernels for sparse dispatch, each next to its pure-jnp reference (`kernels/reference.py`)."""

from zoo.kernels.gmm import (
  IMPLEMENTATIONS,
  choose_implementation,
  default_implementation,
  gmm,
  gmm_gather,
  scatter_combine,
  tgmm,
)

__all__ = [
  "IMPLEMENTATIONS",
  "choose_implementation",
  "default_implementation",
  "gmm",
  "gmm_gather",
  "scatter_combine",
  "tgmm",
]
