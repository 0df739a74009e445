"""The pool of candidate models that the routers between models choose from (`../shared/papers.md` C1-C5): dense
decoder LMs of increasing size trained alike on the embedded Python-stdlib corpus with byte tokens. One role per
pool member: 'small', 'medium' (the default run's shape, `configs/dense_lm.py`) or 'large'.

  python train.py --config configs/pool_lm.py:small --workdir workdirs/pool_small
  python train.py --config configs/pool_lm.py:medium --workdir workdirs/pool_medium
  python train.py --config configs/pool_lm.py:large --workdir workdirs/pool_large

Every member shares the tokenizer (vocabulary 259), the data, the schedule and the number of steps, so that they
differ only in size and therefore in quality and cost. Sizes [guess: chosen to span ~10x in FLOPs per token on a
2-core CPU]: small 2 layers x 64, medium 4 x 128, large 6 x 256.
"""

from configs.base import SMALL_LM, small_lm, small_lm_config

POOL = {
  "small": dict(num_layers=2, embed_dim=64, num_heads=2, num_kv_heads=1, mlp_dim=192),
  "medium": {k: SMALL_LM[k] for k in ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "mlp_dim")},
  "large": dict(num_layers=6, embed_dim=256, num_heads=8, num_kv_heads=4, mlp_dim=768),
}


def get_config(member="medium"):
  """member: the pool member, 'small', 'medium' or 'large'."""
  if member not in POOL:
    raise ValueError(f"configs/pool_lm.py:{member}: allowed roles are {', '.join(POOL)}")
  return small_lm_config(
    small_lm("dense_lm", **POOL[member]), steps=600, batch_size=32, warmup_steps=50, eval_batches=16
  )
