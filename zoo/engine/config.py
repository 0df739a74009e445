"""Start-up validation of an experiment config: every bad key or value fails at once with one clear message."""
import math

import ml_collections

from zoo.engine import sharding
from zoo.engine.tasks import TASKS
from zoo.models import ConfigError, build_model

SCHEDULES = ("warmup_cosine", "warmup_stable_decay", "constant")
# Keys that were renamed: old full key -> new full key.
RENAMED = {"checkpoint.async": "checkpoint.async_save"}


def _base_config():
  from configs.base import get_base_config
  return get_base_config(dataset=None)


def _check_keys(section, config, allowed):
  unknown = sorted(set(config.keys()) - set(allowed))
  if unknown:
    where = f"{section}." if section else ""
    key = where + unknown[0]
    if key in RENAMED:
      raise ConfigError(f"config.{key} was renamed config.{RENAMED[key]}; set that instead")
    raise ConfigError(f"unknown key config.{key}; valid keys: {sorted(allowed)}")


def _check_numbers(config, prefix="config"):
  """Every number of the config is finite (a NaN or inf learning rate passes every comparison check but one)."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      _check_numbers(value, f"{prefix}.{key}")
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"{prefix}.{key}={value!r} is invalid; allowed: a finite number")


def _check(cond, key, value, allowed):
  if not cond:
    raise ConfigError(f"config.{key}={value!r} is invalid; allowed: {allowed}")


def dataset_info(data_config):
  """`zoo.data.dataset_info`, with an unknown dataset reported as a ConfigError."""
  from zoo import data
  try:
    return dict(data.dataset_info(data_config))
  except ConfigError:
    raise
  except (ValueError, KeyError) as e:
    raise ConfigError(f"config.data: {e}") from None


def validate_config(config: ml_collections.ConfigDict, num_devices=None):
  """Check every section of `config`; fill `config.task` from the dataset when it is ''.

  Args:
    config: the experiment config (modified in place: `task`).
    num_devices: when given, also check the mesh and that the batch divides over it.

  Returns:
    The dataset info dict (`zoo.data.dataset_info`).

  Raises:
    ConfigError: naming the bad key and the allowed values.
  """
  base = _base_config()
  _check_keys("", config, base.keys())
  for section in ("mesh", "optimizer", "train", "checkpoint", "sample"):
    _check_keys(section, config[section], base[section].keys())
  _check_numbers(config)

  o, t, ck = config.optimizer, config.train, config.checkpoint
  _check(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule, list(SCHEDULES))
  _check(o.lr > 0, "optimizer.lr", o.lr, "> 0")
  _check(0 <= o.b1 < 1, "optimizer.b1", o.b1, "[0, 1)")
  _check(0 <= o.b2 < 1, "optimizer.b2", o.b2, "[0, 1)")
  _check(o.eps > 0, "optimizer.eps", o.eps, "> 0")
  _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, ">= 0")
  _check(o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", o.grad_clip_norm, ">= 0 (0 = off)")
  _check(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, ">= 0")
  _check(0 <= o.decay_fraction <= 1, "optimizer.decay_fraction", o.decay_fraction, "[0, 1]")
  _check(0 <= o.end_lr_fraction <= 1, "optimizer.end_lr_fraction", o.end_lr_fraction, "[0, 1]")
  _check(t.steps > 0, "train.steps", t.steps, "> 0")
  _check(t.batch_size > 0, "train.batch_size", t.batch_size, "> 0")
  _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, ">= 1")
  _check(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps", t.grad_accum_steps,
         f"a divisor of train.batch_size={t.batch_size}")
  _check(t.eval_every_steps >= 0, "train.eval_every_steps", t.eval_every_steps, ">= 0 (0 = only at the end)")
  _check(t.log_every_steps > 0, "train.log_every_steps", t.log_every_steps, "> 0")
  _check(ck.every_steps >= 0, "checkpoint.every_steps", ck.every_steps, ">= 0 (0 = only at the end)")
  _check(ck.keep >= 1, "checkpoint.keep", ck.keep, ">= 1")
  _check(config.sample.max_new_tokens >= 0, "sample.max_new_tokens", config.sample.max_new_tokens, ">= 0")
  _check(config.sample.temperature >= 0, "sample.temperature", config.sample.temperature, ">= 0 (0 = greedy)")
  _check(config.sample.top_k >= 0, "sample.top_k", config.sample.top_k, ">= 0 (0 = all)")

  info = dataset_info(config.data)
  task = info.get("task")
  if config.task == "":
    config.task = task
  _check(config.task in TASKS, "task", config.task, sorted(TASKS))
  _check(config.task == task, "task", config.task, f"{task!r}, the task of dataset {config.data.get('name')!r}")
  build_model(config.model)  # unknown model names and keys raise ConfigError
  for key in ("vocab_size", "num_classes"):
    if key in info and key in config.model:
      _check(config.model[key] >= info[key], f"model.{key}", config.model[key],
             f">= {info[key]}, the {key} of dataset {config.data.name!r}")

  if num_devices is not None:
    try:
      shape = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(config.mesh, num_devices)))
    except ValueError as e:
      raise ConfigError(str(e)) from None
    shards = shape["data"] * shape["fsdp"] * shape["expert"]
    micro = t.batch_size // t.grad_accum_steps
    _check(micro % shards == 0, "train.batch_size", t.batch_size,
           f"a multiple of grad_accum_steps x data x fsdp x expert = {t.grad_accum_steps} x {shards}")
  return info
