"""Switch Transformer (Fedus et al. 2021): top-1 softmax routing, capacity-buffered dispatch.

Every other FFN is a Switch layer (Sec. 2 / GShard's layout; here layers 0 and 2 of 4) with 8 experts as wide as
the dense FFN, so a token's active FFN equals the dense LM's. The combine weight is the raw router probability
(`renormalize=False`; renormalising a single expert would give weight 1 and no router gradient), capacity factor
1.25 (Sec. 2.2), router jitter 1e-2 (Sec. 2.4), load-balance loss 1e-2 (Eq. 4), z-loss 1e-3 (ST-MoE).

  python train.py --config configs/moe_switch.py --workdir workdirs/moe_switch
"""

from configs.base import SMALL_LM, moe_config


def get_config():
  return moe_config(
    num_experts=8,
    num_experts_per_tok=1,
    expert_mlp_dim=SMALL_LM["mlp_dim"],
    router="softmax_topk",
    renormalize=False,
    router_jitter=1e-2,
    dispatch="capacity",
    capacity_factor=1.25,
    moe_every=2,
    load_balance_coef=1e-2,
    z_loss_coef=1e-3,
  )
