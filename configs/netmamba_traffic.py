"""NetMamba (Wang et al. 2024, papers.md F) on the embedded 'loopback_traffic' flows (`zoo/data/traffic.py`: real
protocol clients and servers on loopback, labelled by application): MAE-style pre-training with 90% of the strides
masked, then fine-tuning of the classifier; and the same classifier trained from scratch for comparison.

  python train.py --config configs/netmamba_traffic.py:pretrain --workdir workdirs/netmamba_pretrain
  python train.py --config configs/netmamba_traffic.py --workdir workdirs/netmamba_finetune
  python train.py --config configs/netmamba_traffic.py:scratch --workdir workdirs/netmamba_scratch

Sized for a 2-core CPU: the paper's 4 Mamba blocks at width 64 (paper 256), and of each of the 5 packets the first 40
header bytes (IPv4 + TCP without options) and 40 payload bytes (paper 80 + 240), so 100 strides instead of 400.
Optimiser [guess, scaled from the paper's AdamW]: lr 1e-3 pre-training, 2e-3 fine-tuning, weight decay 0.05.
"""

from configs.base import run_config
from zoo.data.traffic import APPLICATIONS

MODEL = {
  "name": "netmamba",
  "num_classes": len(APPLICATIONS),
  "packets": 5,
  "header_bytes": 40,
  "payload_bytes": 40,
  "embed_dim": 64,
  "depth": 4,
  "decoder_dim": 32,
  "decoder_depth": 1,
  "mask_ratio": 0.9,
}
PRETRAIN_WORKDIR = "workdirs/netmamba_pretrain"


def get_config(role="finetune"):
  """role: 'pretrain' (masked reconstruction), 'finetune' (the classifier from the pre-training run) or 'scratch'
  (the classifier from a random init)."""
  if role not in ("pretrain", "finetune", "scratch"):
    raise ValueError(f"configs/netmamba_traffic.py:{role}: allowed roles are 'pretrain', 'finetune' and 'scratch'")
  pretrain = role == "pretrain"
  config = run_config(
    dict(MODEL),
    dataset="loopback_traffic",
    task="masked_pretraining" if pretrain else "feature_classification",
    lr=1e-3 if pretrain else 2e-3,
    warmup_steps=30,
    weight_decay=0.05,
    steps=600 if pretrain else 300,
    batch_size=64,
    eval_every_steps=300 if pretrain else 150,
    log_every_steps=50,
    eval_batches=0,
  )
  if role != "pretrain":
    config.frozen_params = ("^decoder", "^mask_token")  # the pre-training decoder is not used by the classifier
  if role == "finetune":
    config.init_from = PRETRAIN_WORKDIR
  return config
