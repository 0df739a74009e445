"""Mixture-of-experts decoder LM: the dense LM's decoder blocks with routed-expert FFNs (papers.md A9).

The standard MoE baselines, all from one model and the shared routing package (`zoo.routing`):
- Switch Transformer (Fedus et al. 2021): softmax top-1 (`router='softmax_topk'`, `num_experts_per_tok=1`),
  capacity-buffered dispatch (Sec. 2.2), load-balance loss `E * sum_e f_e P_e` (Eq. 4-6, coefficient 1e-2), router
  jitter (Sec. 2.4), and the router z-loss of ST-MoE (Zoph et al. 2022, Eq. 5, coefficient 1e-3).
- Mixtral (Jiang et al. 2024, Sec. 2.1): softmax over the top-2 of 8 logits (= top-2 probabilities renormalised),
  every layer sparse.
- DeepSeekMoE / DeepSeek-V3 (Dai et al. 2024, Sec. 3; DeepSeek-V3 report Sec. 2.1.2): fine-grained experts plus
  always-on shared experts, sigmoid scores, top-k selection by `score + bias` (`router_bias`; HF
  `e_score_correction_bias`) with the bias updated outside the optimizer (aux-loss-free balancing, Eq. 13-16;
  `bias_update_rate` > 0) or kept fixed (a loaded checkpoint, `bias_update_rate` = 0), group-limited selection
  (`n_group`, `topk_group`), `routed_scaling_factor`, a small sequence-wise balance loss (Eq. 17-20,
  `per_sequence_balance`), and dense first layers (`first_dense_layers`; HF `first_k_dense_replace`).
- Qwen2-MoE (Qwen2 report, Sec. 2.2.3): fine-grained softmax top-k experts plus a shared expert whose output is
  scaled by its own `sigmoid(x w_g)` gate (`shared_expert_gate`).
- Expert choice (Zhou et al. 2022, Sec. 3.1, Eq. 1): every expert takes its top-C tokens of the batch with
  `C = tokens * c / E`; here `c = num_experts_per_tok`, so it costs what top-k costs. The choice looks at all tokens
  of the batch (future tokens included), so it is not causal across positions and cached decoding differs from the
  full forward.
- Frozen random router (SMoE-Dropout, Chen et al. 2023, Sec. 3.2; `router='random'`): a fixed random projection,
  softmax over the top-k logits.

Layer i has a routed-expert FFN iff `i >= first_dense_layers and i % moe_every == 0` (the DeepSeek/HF layout rule);
the other layers keep the dense LM's `MLP(mlp_dim)`. Everything else is the dense LM: `zoo.layers.DecoderBlock`
(pre-RMSNorm, GQA attention with RoPE, KV cache), token embedding, final RMSNorm, tied or untied output projection.

Built from the field groups of `zoo.models.decoder_parts` (`ExpertLayers`, `TopKRouting`, `SharedExperts`)
on top of `DenseLM`; other MoE decoders of the zoo compose the groups they need.

Output (`ModelOutput`):
- `aux_loss` = sum over MoE layers of `load_balance_coef * load_balance + z_loss_coef * z_loss`.
- `metrics`: per-MoE-layer values stacked on a leading [moe_layers] axis: `expert_load` [moe_layers, experts]
  (fraction of assignments), `load_imbalance` (max load / mean load), `dropped_fraction`, `router_entropy`,
  `router_z` (mean logsumexp of the router logits), and the unweighted losses `load_balance`, `z_loss`.
- Per-token output (`exposes = ('expert_ids',)`, the `zoo.models` contract): with
  `apply(..., mutable=['intermediates'])` the model sows `intermediates['expert_ids']`, int32 [moe_layers, batch,
  length, k], the experts of every token's slots (-1 = empty slot; for `zoo.routing.consistency`). Nothing is
  computed without it.

State outside the optimizer: the selection bias of a 'sigmoid_topk' router with `router_bias`
(`routing_state/.../router/bias`, [experts] per MoE layer; aux-loss-free balancing moves it when `bias_update_rate` >
0) and the frozen random router kernel live in the `routing_state` collection; the bias moves only in
`apply(..., mutable=['routing_state'])` with `deterministic=False`.

Expert parallelism: applied under `jax.set_mesh(mesh)` (as the engine's steps are) with a mesh whose 'expert' axis is
> 1, every MoE layer whose tokens split evenly over the mesh's 'batch' axes runs the all-to-all expert-parallel
dispatch (`zoo.routing.expert_parallel`) instead of `dispatch`; its buffers hold `ceil(capacity_factor * local tokens
* k / E)` tokens per expert and device (capacity_factor=0: nothing dropped, equal to dropless dispatch).

Cached decoding equals the full forward for token-choice routers with 'dense' or 'dropless' dispatch (each token's
experts depend only on its own hidden state). 'capacity' dispatch drops assignments depending on the other tokens
of the call, and expert choice picks tokens across the batch, so either can make decoding differ.
"""

import flax.linen as nn

from zoo.models.decoder_parts import ExpertLayers, SharedExperts, TopKRouting, routed_ffn_factory
from zoo.models.dense_lm import DenseLM
from zoo.models.registry import register_model


@register_model("moe_lm")
class MoELM(ExpertLayers, TopKRouting, SharedExperts, DenseLM):
  """Mixture-of-experts decoder LM (see the module docstring for the papers and equations).

  Config keys: every field of `DenseLM` (vocab_size, num_layers, embed_dim, num_heads, ..., remat; `mlp_dim` is the
  width of the dense layers' FFN and `mlp_activation` is also the experts'), of `ExpertLayers` (moe_every,
  first_dense_layers, num_experts, expert_mlp_dim, capacity_factor, dispatch), of `TopKRouting` (router,
  num_experts_per_tok, renormalize, n_group, topk_group, routed_scaling_factor, per_sequence_balance, router_jitter,
  router_bias, bias_update_rate, load_balance_coef, z_loss_coef) and of `SharedExperts` (num_shared_experts,
  shared_expert_mlp_dim, shared_expert_gate).
  """

  def moe_ffn_factory(self):
    """Builds the MoE FFN of one layer (`name=` is given by `DecoderBlock`); each call gets its own router."""
    return routed_ffn_factory(self, **self.shared_ffn_kwargs())

  @nn.compact
  def __call__(self, tokens, *, positions=None, cache=None, deterministic=True):
    """Next-token logits, the weighted router losses and the routing metrics.

    Args:
      tokens: [batch, length] int32.
      positions: [batch, length] absolute positions (default: 0.., or continuing from the cache).
      cache: the tuple from `init_cache` (one KVCache per layer), or None.
      deterministic: False in training (dropout, router jitter, bias update when 'routing_state' is mutable).

    Returns:
      (logits [batch, length, vocab_size] float32, ModelOutput(aux_loss, metrics [moe_layers, ...], cache)).
    """
    return self.expert_forward(tokens, positions, cache, deterministic, aux_coefs=self.aux_coefs())

  def moe_ffn_params(self):
    """Parameters of one MoE layer's FFN: router, routed experts, shared experts."""
    return self.router_params() + self.expert_ffn_params() + self.shared_params()
