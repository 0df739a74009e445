"""Shared layers: attention, MLPs, norms, embeddings, rotary positions, KV cache."""
