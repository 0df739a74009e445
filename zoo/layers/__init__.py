"""Shared layers: attention (GQA and MLA), MLPs, norms, embeddings, rotary positions, KV caches, decoder block,
Mamba-1 selective state-space blocks, accounting."""

from zoo.layers.accounting import count_params, mean_attended_keys, train_flops_per_token
from zoo.layers.attention import Attention, attention_mask, dot_product_attention, segment_mask
from zoo.layers.block import DecoderBlock
from zoo.layers.embeddings import Embed
from zoo.layers.kv_cache import KVCache
from zoo.layers.linear import DenseGeneral
from zoo.layers.mamba import (
  CausalDepthwiseConv1d,
  Mamba,
  MambaBlock,
  MambaStack,
  load_mambapy_state_dict,
  selective_scan,
  sequential_scan,
)
from zoo.layers.mla import MLACache, MultiHeadLatentAttention
from zoo.layers.mlp import ACTIVATIONS, MLP
from zoo.layers.norms import RMSNorm, rms_norm
from zoo.layers.rope import ROPE_TYPES, apply_rope, rope_frequencies, scaled_rope_frequencies

__all__ = [
  "ACTIVATIONS",
  "Attention",
  "CausalDepthwiseConv1d",
  "DecoderBlock",
  "DenseGeneral",
  "Embed",
  "KVCache",
  "MLACache",
  "MLP",
  "Mamba",
  "MambaBlock",
  "MambaStack",
  "MultiHeadLatentAttention",
  "ROPE_TYPES",
  "RMSNorm",
  "apply_rope",
  "attention_mask",
  "count_params",
  "dot_product_attention",
  "load_mambapy_state_dict",
  "mean_attended_keys",
  "rms_norm",
  "rope_frequencies",
  "scaled_rope_frequencies",
  "segment_mask",
  "selective_scan",
  "sequential_scan",
  "train_flops_per_token",
]
