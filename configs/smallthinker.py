"""SmallThinker (papers.md A5), tiny: pre-attention sigmoid top-4 router over 8 ReGLU experts, layer 0 and 4 NoPE global
attention and the others RoPE with a 32-token sliding window, on the dense LM's run (same data, optimizer, steps).

The paper's 4B-A0.6B (32 layers, d 1536, 32 experts top-4 of width 768, GQA 12/2) is tabled in
`zoo/models/smallthinker.py`. Expert width: a token's active FFN (4 x 96) matches the dense LM's 384.

  python train.py --config configs/smallthinker.py --workdir workdirs/smallthinker
  # the softmax option:
  python train.py --config configs/smallthinker.py --workdir workdirs/smallthinker_softmax \
      --config.model.router=softmax_topk
"""

from configs.base import update_model
from configs.dense_lm import get_config as get_dense_config


def get_config():
  return update_model(
    get_dense_config(),
    name="smallthinker",
    num_layers=5,
    num_experts=8,
    num_experts_per_tok=4,
    expert_mlp_dim=96,
    router="sigmoid_topk",
    mlp_activation="reglu",
    nope_every=4,
    sliding_window=32,
    dispatch="auto",
    capacity_factor=2.0,
    load_balance_coef=1e-2,
    z_loss_coef=1e-3,
  )
