"""SMoE-Dropout (papers.md A7): a frozen random router, k growing linearly from 2 to 8 of 8 experts, on the embedded
Python-stdlib corpus with byte tokens. Sized for a 2-core CPU.

  python train.py --config configs/smoe_dropout.py --workdir workdirs/smoe_dropout
  # self-slimmable evaluation at k = 1, 2, 4, 8:
  python evaluate.py --config configs/smoe_dropout.py --workdir workdirs/smoe_dropout --config.model.eval_k=2
"""
from configs.base import get_base_config


def get_config():
  steps = 600
  config = get_base_config(
      model={
          "name": "smoe_dropout",
          "vocab_size": 259,  # ByteTokenizer: 256 bytes + PAD, BOS, EOS
          "num_layers": 4,
          "embed_dim": 128,
          "num_heads": 4,
          "num_kv_heads": 2,
          "mlp_dim": 384,
          "num_experts": 8,
          "num_experts_per_tok": 8,  # k_max
          "expert_mlp_dim": 64,
          "k_min": 2,
          "k_schedule": "linear",
          "k_schedule_steps": steps,
          "capacity_factor": 0.0,  # no dropping: compare k values without capacity effects
      },
      dataset="pystdlib")
  config.data.seq_len = 128
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 60
  config.train.steps = steps
  config.train.batch_size = 16
  config.train.eval_every_steps = 200
  config.train.eval_batches = 8
  config.train.log_every_steps = 50
  config.checkpoint.every_steps = 200
  return config
