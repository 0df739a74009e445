"""Qwen2-MoE-style MoE (Qwen2 technical report, Sec. 2.2.3): fine-grained softmax top-k experts plus one shared expert
whose output is scaled by its own gate `sigmoid(x w_g)`.

16 routed experts of a quarter of the dense FFN width, top-2, not renormalised (`norm_topk_prob=False` in
Qwen1.5/Qwen2-MoE), plus one shared expert of half the dense width, so the active FFN matches the dense LM's
(`configs/dense_lm.py`) [guess: Qwen's shared expert is 4 routed experts wide with top-4; halved here]. Load-balance
loss 1e-3 (Qwen's `router_aux_loss_coef`), no z-loss.

  python train.py --config configs/moe_qwen.py --workdir workdirs/moe_qwen
"""

from configs.base import SMALL_LM, moe_config


def get_config():
  mlp = SMALL_LM["mlp_dim"]
  return moe_config(
    num_experts=16,
    num_experts_per_tok=2,
    expert_mlp_dim=mlp // 4,
    num_shared_experts=1,
    shared_expert_mlp_dim=mlp // 2,
    shared_expert_gate=True,
    router="softmax_topk",
    renormalize=False,
    capacity_factor=2.0,
    load_balance_coef=1e-3,
    z_loss_coef=0.0,
  )
