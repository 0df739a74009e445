"""The learned-router baseline of SMoE-Dropout (papers.md A7): the same 8 experts of width 64 as
`configs/smoe_dropout.py`, routed by a trained softmax top-2 router (renormalised, Switch load balance 1e-2, z-loss
1e-3), same data, optimizer and steps. Evaluating it at other k (`--config.model.num_experts_per_tok=K`) shows
whether a learned router is "self-slimmable" like the frozen random router with the k schedule.

  python train.py --config configs/smoe_dropout_baseline.py --workdir workdirs/smoe_dropout_baseline
  python evaluate.py --config configs/smoe_dropout_baseline.py --workdir workdirs/smoe_dropout_baseline \
      --config.model.num_experts_per_tok=4
"""

from configs.base import update_model
from configs.smoe_dropout import get_config as get_smoe_config


def get_config():
  return update_model(
    get_smoe_config(),
    drop=("k_min", "k_schedule", "k_schedule_steps", "grad_accum_steps"),
    name="moe_lm",
    num_experts_per_tok=2,
    router="softmax_topk",
    renormalize=True,
    load_balance_coef=1e-2,
    z_loss_coef=1e-3,
  )
