"""The shared base of every experiment config: the engine's schema (`zoo.engine.config.base_config`) and the plumbing
the experiment files share.

An experiment file calls `get_base_config(model=..., dataset=..., task=...)` and sets its own values, or starts from
one of the helpers below and states only what differs:

- `run_config(model, ...)`: the base config with a run's length, batch, learning rate and cadence set.
- `small_lm(name, **keys)` / `small_lm_config(model, ...)`: a decoder LM at the dense LM's shape (`SMALL_LM`) and its
  run on the embedded Python-stdlib corpus with byte tokens.
- `update_model(config, **keys)`: a config whose model is another config's with keys changed, added or dropped.
- `moe_config(**moe)`: the dense LM's run (`configs/dense_lm.py`) with its FFNs replaced by a `moe_lm`'s experts.
- `diloco_config(config)`: a run trained with DiLoCo at the paper's settings (4 replicas, H = 50, outer Nesterov).
"""

import ml_collections

from zoo.engine.config import base_config as get_base_config

__all__ = [
  "MOE_LAYOUT",
  "SMALL_LM",
  "diloco_config",
  "get_base_config",
  "moe_config",
  "run_config",
  "small_lm",
  "small_lm_config",
  "update_model",
]

# The small decoder LM of `configs/dense_lm.py`, sized for a 2-core CPU; the models built on its run keep its shape.
SMALL_LM = {
  "vocab_size": 259,  # ByteTokenizer: 256 bytes + PAD, BOS, EOS
  "num_layers": 4,
  "embed_dim": 128,
  "num_heads": 4,
  "num_kv_heads": 2,
  "mlp_dim": 384,
}

# The `moe_lm` layer layout `moe_config` starts from: every FFN an MoE layer, 'auto' dispatch (capacity-buffered on
# CPU), no router jitter. A config overrides what its paper prescribes otherwise.
MOE_LAYOUT = {"dispatch": "auto", "moe_every": 1, "first_dense_layers": 0, "router_jitter": 0.0}


def run_config(
  model,
  *,
  dataset="pystdlib",
  task="lm",
  seq_len=None,
  lr,
  warmup_steps,
  steps,
  batch_size,
  eval_every_steps,
  eval_batches,
  log_every_steps,
  **optimizer,
):
  """`get_base_config(model=model, dataset=dataset, task=task)` with the run's schedule set.

  Args:
    model: the model dict (`name` plus the model's keys).
    dataset: the dataset name.
    task: the task name.
    seq_len: `config.data.seq_len`; None keeps the dataset's default.
    lr: the peak learning rate.
    warmup_steps: the learning-rate warmup.
    steps: the training steps.
    batch_size: the global batch.
    eval_every_steps: the evaluation interval; a checkpoint is written at every evaluation.
    eval_batches: the batches of each evaluation (<= 0: the whole split).
    log_every_steps: the logging interval.
    **optimizer: other `config.optimizer` keys (e.g. `weight_decay`).

  Returns:
    The ConfigDict.
  """
  config = get_base_config(model=model, dataset=dataset, task=task)
  if seq_len is not None:
    config.data.seq_len = seq_len
  config.optimizer.update(lr=lr, warmup_steps=warmup_steps, **optimizer)
  config.train.update(
    steps=steps,
    batch_size=batch_size,
    eval_every_steps=eval_every_steps,
    eval_batches=eval_batches,
    log_every_steps=log_every_steps,
  )
  config.checkpoint.every_steps = eval_every_steps
  return config


def small_lm(name, **keys):
  """The model dict of a decoder LM at the dense LM's shape: `name`, the `SMALL_LM` keys, then `keys`."""
  return {"name": name, **SMALL_LM, **keys}


def small_lm_config(model, *, steps, batch_size, warmup_steps, eval_batches):
  """`run_config` of the small LMs on the embedded Python-stdlib corpus with byte tokens: 128-token windows, lr 3e-3
  with the base warmup-cosine schedule, an evaluation and a checkpoint every 200 steps, a log line every 50."""
  return run_config(
    model,
    seq_len=128,
    lr=3e-3,
    warmup_steps=warmup_steps,
    steps=steps,
    batch_size=batch_size,
    eval_every_steps=200,
    eval_batches=eval_batches,
    log_every_steps=50,
  )


def update_model(config, *, drop=(), **keys):
  """`config` (changed in place and returned) with `config.model` rebuilt from its keys less `drop`, updated by `keys`
  (a changed key keeps its place, a new one comes last). Rebuilt, so a key may change type (e.g. a float for an int)."""
  model = {k: v for k, v in config.model.to_dict().items() if k not in drop}
  config.model = ml_collections.ConfigDict({**model, **keys})
  return config


def moe_config(**moe):
  """The dense LM's config (`configs/dense_lm.py`: model shape, data, optimizer, steps, sampling) with `config.model`
  a `moe_lm`: the dense model's keys, the `MOE_LAYOUT` keys, then `moe` (the experts, router and losses; a `moe` key
  overrides a `MOE_LAYOUT` one)."""
  from configs.dense_lm import get_config as get_dense_config  # configs.dense_lm imports this module

  return update_model(get_dense_config(), name="moe_lm", **{**MOE_LAYOUT, **moe})


def diloco_config(config):
  """`config` (changed in place and returned) trained with DiLoCo (Douillard et al. 2023, Algorithm 1) at the paper's
  settings: 4 replicas, 50 inner steps between outer steps, outer SGD with Nesterov momentum 0.9 and lr 0.7; 2 groups
  for `--config.train.strategy=fedavg_hierarchical`."""
  config.train.update(
    strategy="diloco",
    replicas=4,
    inner_steps=50,
    outer_optimizer="nesterov",
    outer_lr=0.7,
    outer_momentum=0.9,
    fedavg_groups=2,
  )
  return config
