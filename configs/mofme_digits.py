"""MoFME (Zhang et al. 2024, papers.md E) on scikit-learn's 8x8 digits: a small ViT-style classifier over 2x2 patches
(16 tokens, width 64, 2 blocks as in the authors' scripts' `--layer 2`, 4 heads) whose MLPs are MoFME layers of 4
feature-modulated experts, top-2, with the uncertainty-aware router (T = 5 Monte-Carlo samples, router-input
dropout 0.1 [guess]); the Adaptor's inner width is 4 x 64 (the scripts' "mlpx4").

The role argument picks the FFN: 'mofme' (default) or 'moe', the paper's baseline: 4 conventional GELU experts of
inner width 256 with the same router, so the two runs compare parameters (`num_params`: 184,010 vs 296,778; one
layer 74,944 vs 131,328, 43% fewer with the authors' dense FME; `--config.model.modulation=diagonal`: 42,176, 68%
fewer) and time (the throughput in metrics.jsonl).

  python train.py --config configs/mofme_digits.py --workdir workdirs/mofme_digits
  python evaluate.py --config configs/mofme_digits.py --workdir workdirs/mofme_digits
  python train.py --config configs/mofme_digits.py:moe --workdir workdirs/mofme_digits_moe
  python evaluate.py --config configs/mofme_digits.py:moe --workdir workdirs/mofme_digits_moe
"""

from configs.base import run_config

FFNS = ("mofme", "moe")


def get_config(ffn="mofme"):
  """ffn: 'mofme' (the MoFME layer) or 'moe' (the conventional MoE baseline of the same expert count)."""
  if ffn not in FFNS:
    raise ValueError(f"configs/mofme_digits.py:{ffn}: allowed roles are {FFNS}")
  return run_config(
    {
      "name": "mofme",
      "num_classes": 10,
      "channels": 1,
      "patch_size": 2,  # 8x8 -> 16 patches
      "embed_dim": 64,
      "depth": 2,
      "num_heads": 4,
      "ffn": ffn,
      "num_experts": 4,
      "top_k": 2,
      "hidden_dim": 256,
      "modulation": "dense",  # the authors' code: A_i, B_i full 64 x 64 maps
      "mc_samples": 5,
      "router_dropout": 0.1,
      "load_balance_coef": 1e-2,
      "z_loss_coef": 1e-3,
    },
    dataset="digits",
    task="classification",
    lr=1e-3,
    warmup_steps=50,
    weight_decay=1e-4,
    steps=600,
    batch_size=64,
    eval_every_steps=200,
    log_every_steps=50,
    eval_batches=0,  # the whole test split
  )
