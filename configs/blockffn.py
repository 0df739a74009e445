"""BlockFFN (papers.md A2): ReLU + RMSNorm routed block experts with the activation-locality and chunk-sparsification
losses, on the embedded Python-stdlib corpus with byte tokens. Sized for a 2-core CPU.

  python train.py --config configs/blockffn.py --workdir workdirs/blockffn
  # without the chunk loss (compare TLS / CLS in metrics.jsonl):
  python train.py --config configs/blockffn.py --workdir workdirs/blockffn_nochunk --config.model.chunk_coef=0
"""
from configs.base import get_base_config


def get_config():
  config = get_base_config(
      model={
          "name": "blockffn",
          "vocab_size": 259,  # ByteTokenizer: 256 bytes + PAD, BOS, EOS
          "num_layers": 4,
          "embed_dim": 128,
          "num_heads": 4,
          "num_kv_heads": 2,
          "mlp_dim": 384,
          "num_experts": 16,
          "expert_mlp_dim": 32,
          "chunk_length": 64,
          "chunk_warmup_steps": 200,  # the paper waits 1000 steps of a much longer run
          "chunk_interval": 50,
          "dispatch": "dense",
      },
      dataset="pystdlib")
  config.data.seq_len = 128
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 60
  config.train.steps = 600
  config.train.batch_size = 16
  config.train.eval_every_steps = 200
  config.train.eval_batches = 8
  config.train.log_every_steps = 50
  config.checkpoint.every_steps = 200
  return config
