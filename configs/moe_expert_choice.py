"""Expert-choice MoE (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", Sec. 3.1, Eq. 1).

8 experts of half the dense FFN width; each expert takes its top `C = tokens * 2 / 8` tokens of the batch by softmax
score (capacity factor c = `num_experts_per_tok` = 2, the paper's EC-CF2, same compute as top-2). Balanced by
construction, so no load-balance loss; router z-loss 1e-3. Caveat: an expert's choice looks at every token of the
batch, future positions included, so training and evaluation with full sequences see a little of the future through
the routing and cached decoding differs from the full forward (papers.md A1 discusses the fix MoR uses).

  python train.py --config configs/moe_expert_choice.py --workdir workdirs/moe_expert_choice
"""

from configs.base import SMALL_LM, moe_config


def get_config():
  return moe_config(
    num_experts=8,
    num_experts_per_tok=2,
    expert_mlp_dim=SMALL_LM["mlp_dim"] // 2,
    router="expert_choice",
    load_balance_coef=0.0,
    z_loss_coef=1e-3,
  )
