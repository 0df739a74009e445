"""DeepSeek-style MoE (DeepSeekMoE, Dai et al. 2024, Sec. 3; DeepSeek-V3 report, Sec. 2.1.2).

Fine-grained experts (16 of a quarter of the dense FFN width, top-3) plus 1 always-on shared expert of the same
width, so the active FFN (3 + 1 quarter-width experts) matches the dense LM's (`configs/dense_lm.py`). Sigmoid scores,
selection by `score + bias` with the aux-loss-free bias update (u = 1e-3, Eq. 13-16), group-limited routing (4 groups,
each token picks from its best 2), weights renormalised over the selected experts, a tiny sequence-wise balance loss
(1e-4, Eq. 17-20), no z-loss, first layer dense (`first_k_dense_replace`). `routed_scaling_factor` stays 1 [guess: V3
uses 2.5 for 256 experts; 16 need none].

  python train.py --config configs/moe_deepseek.py --workdir workdirs/moe_deepseek
"""

from configs.base import SMALL_LM, moe_config


def get_config():
  quarter = SMALL_LM["mlp_dim"] // 4
  return moe_config(
    num_experts=16,
    num_experts_per_tok=3,
    expert_mlp_dim=quarter,
    num_shared_experts=1,
    shared_expert_mlp_dim=quarter,
    shared_expert_gate=False,
    router="sigmoid_topk",
    renormalize=True,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=1.0,
    router_bias=True,
    bias_update_rate=1e-3,
    capacity_factor=2.0,
    first_dense_layers=1,
    load_balance_coef=1e-4,
    per_sequence_balance=True,
    z_loss_coef=0.0,
  )
