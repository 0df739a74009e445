"""Mixtral-style MoE (Jiang et al. 2024, Sec. 2.1): 8 experts, top-2, softmax over the top-2, every layer sparse.

The dense LM's run (`configs/dense_lm.py`: same data, optimizer, steps, attention) with every FFN replaced by 8
experts of half the dense FFN width, so a token's active FFN (2 x mlp_dim / 2) matches the dense LM's and the active
parameters per token differ only by the routers (embed x 8 per layer). Switch load-balance loss 1e-2, router z-loss
1e-3. On CPU 'auto' dispatch is capacity-buffered; capacity factor 2 keeps dropping rare (`dropped_fraction` is
logged) [guess: Mixtral itself is dropless].

  python train.py --config configs/moe_mixtral.py --workdir workdirs/moe_mixtral
"""

from configs.base import SMALL_LM, moe_config


def get_config():
  return moe_config(
    num_experts=8,
    num_experts_per_tok=2,
    expert_mlp_dim=SMALL_LM["mlp_dim"] // 2,
    router="softmax_topk",
    renormalize=True,
    capacity_factor=2.0,
    load_balance_coef=1e-2,
    z_loss_coef=1e-3,
  )
