"""Trained runs loaded back from their workdirs (config.json + latest checkpoint, the engine's restore) for the code
that uses whole models rather than training one: the pool of the routers between models
(`zoo.routing.model_pool`) and R2R's small and large LMs (`zoo.routing.r2r`)."""

import os

from zoo.engine.checkpoint import Checkpointer, CheckpointError, checkpoint_dir, restore_variables
from zoo.engine.trainer import Experiment
from zoo.engine.writers import read_config
from zoo.models import ConfigError
from zoo.routing.model_pool import ModelPool, PoolMember, parse_pool


def load_lm_run(workdir):
  """(model, variables) of the LM run in `workdir` (its config.json and latest checkpoint, by the engine's restore)."""
  from zoo.engine.checkpoint import restore_variables
  from zoo.engine.trainer import Experiment

  exp = Experiment(read_config(workdir))
  return exp.model, restore_variables(workdir, exp.abstract_state()[0].variables())


def _read_member_config(name, workdir):
  if not os.path.isdir(workdir):
    raise ConfigError(f"pool member {name!r}: no such run directory {workdir}")
  try:
    return read_config(workdir)
  except FileNotFoundError as e:
    raise ConfigError(f"pool member {name!r}: {e}") from None


def _tokenizer_of(config):
  return str(config.data.get("tokenizer", "") or "bytes")


def load_pool(spec, *, devices=None) -> ModelPool:
  """Loads the members of `spec` (see `parse_pool`) with their latest checkpoints.

  Args:
    spec: 'NAME=DIR,...' or a list of 'NAME=DIR' / 'DIR'.
    devices: the devices to load onto (default: the first one).

  Raises:
    ConfigError: see the module docstring.
  """
  import jax

  pairs = parse_pool(spec)
  configs = [_read_member_config(n, w) for n, w in pairs]
  shared = {(_tokenizer_of(c), int(c.model.vocab_size)) for c in configs}
  if len(shared) > 1:
    found = ", ".join(
      f"{n}: tokenizer {_tokenizer_of(c)!r} vocab {c.model.vocab_size}" for (n, _), c in zip(pairs, configs)
    )
    raise ConfigError(f"pool members must share one tokenizer and vocabulary; found {found}")
  for (name, _), c in zip(pairs, configs):
    if c.task != "lm":
      raise ConfigError(f"pool member {name!r} was trained for task {c.task!r}; allowed: 'lm' runs")
  members = []
  devices = devices or jax.devices()[:1]
  for (name, workdir), config in zip(pairs, configs):
    directory = checkpoint_dir(workdir)
    step = None
    if os.path.isdir(directory):
      ckpt = Checkpointer(directory, create=False)
      step = ckpt.latest_step()
      ckpt.manager.close()
    if step is None:
      raise ConfigError(f"pool member {name!r}: no checkpoint in {directory}; train it first (train.py --workdir)")
    config.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)  # whatever mesh it trained on: here one device
    exp = Experiment(config, devices=devices)
    try:
      variables = restore_variables(workdir, exp.abstract_state()[0].variables(), key=f"pool member {name!r}")
    except CheckpointError as e:
      raise ConfigError(str(e)) from None
    members.append(PoolMember(name, workdir, int(step), config, exp.model, variables))
  seq_len = int(configs[0].data.seq_len)
  members.sort(key=lambda m: m.forward_flops_per_token(seq_len))
  tokenizer, vocab = shared.pop()
  return ModelPool(tuple(members), tokenizer, vocab)
