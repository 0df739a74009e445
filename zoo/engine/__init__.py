"""Mesh and sharding, train state, train/eval loops, checkpoints, logging, generation."""
