"""Mixture-of-Recursions isoFLOP study (papers.md A1): the vanilla baseline and the shared recipe of its configs.

All models have width 128 and an effective depth of 8 layers on the embedded Python-stdlib corpus with byte tokens;
the vanilla dense LM trains `VANILLA_STEPS` steps and every other config gets the steps that spend the same training
FLOPs (`train_flops_per_token` of each model, which counts that MoR tokens leave early), so MoR sees more tokens.
Sized for a 2-core CPU (each run takes minutes). The step count is fixed when the config is built: overriding
`config.data.seq_len` or `config.train.batch_size` on the command line does not recompute it.

  python train.py --config configs/mor_vanilla.py --workdir workdirs/mor_vanilla
  python train.py --config configs/mor_expert_nr3.py --workdir workdirs/mor_expert_nr3
  python train.py --config configs/recursive_nr3.py --workdir workdirs/recursive_nr3
"""

from configs.base import get_base_config

VANILLA_STEPS = 400
SEQ_LEN = 128
SHAPE = {
  "vocab_size": 259,  # ByteTokenizer: 256 bytes + PAD, BOS, EOS
  "num_layers": 8,  # effective depth: middle_cycle keeps layers 1 and 8 unshared, 6 = N_r * base_depth
  "embed_dim": 128,
  "num_heads": 4,
  "num_kv_heads": 2,
  "head_dim": 32,
  "mlp_dim": 384,
}


def _flops_per_token(model):
  from zoo.models import build_model

  return build_model(model).train_flops_per_token(SEQ_LEN)


def isoflop_config(model):
  """The training recipe for `model` (a dict with `name`), with the steps of VANILLA_STEPS vanilla training FLOPs."""
  vanilla = {"name": "dense_lm", **SHAPE}
  steps = round(VANILLA_STEPS * _flops_per_token(vanilla) / _flops_per_token(model))
  config = get_base_config(model=model, dataset="pystdlib")
  config.data.seq_len = SEQ_LEN
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 40
  config.train.steps = steps
  config.train.batch_size = 16
  config.train.eval_every_steps = 0
  config.train.eval_batches = 16
  config.train.log_every_steps = 50
  config.checkpoint.every_steps = 0
  return config


def mor_model(num_recursions, router, kv_mode="recursion"):
  """A `mor` model at the study's shape: middle-cycle sharing, N_r recursions."""
  return {
    "name": "mor",
    **SHAPE,
    "num_recursions": num_recursions,
    "sharing": "middle_cycle",
    "router": router,
    "kv_mode": kv_mode,
  }


def get_config():
  return isoflop_config({"name": "dense_lm", **SHAPE})
