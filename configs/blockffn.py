"""BlockFFN (papers.md A2): ReLU + RMSNorm routed block experts with the activation-locality and chunk-sparsification
losses, on the embedded Python-stdlib corpus with byte tokens. Sized for a 2-core CPU.

  python train.py --config configs/blockffn.py --workdir workdirs/blockffn
  # without the chunk loss (compare TLS and CLS(8/16/64) per layer: 'tls', 'cls_8', ... in metrics.jsonl):
  python train.py --config configs/blockffn.py --workdir workdirs/blockffn_nochunk --config.model.chunk_coef=0
"""

from configs.base import small_lm, small_lm_config


def get_config():
  model = small_lm(
    "blockffn",
    num_experts=16,
    expert_mlp_dim=32,
    chunk_length=64,
    cls_lengths=(8, 16, 64),  # CLS(L) per layer for these window lengths ('cls_8', ...; the paper's headline: L = 8)
    chunk_warmup_steps=200,  # the paper waits 1000 steps of a much longer run
    chunk_interval=50,
    dispatch="dense",
  )
  return small_lm_config(model, steps=600, batch_size=16, warmup_steps=60, eval_batches=8)
