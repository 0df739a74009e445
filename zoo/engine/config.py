"""The experiment config: its schema (`base_config`, every key a run can use) and its start-up validation (every bad
key or value fails at once with one clear message)."""

import math
import re

import ml_collections
from ml_collections import config_dict

from zoo.engine import sharding
from zoo.evaluators.depth_batching import DEFAULTS as DEPTH_BATCHING_DEFAULTS
from zoo.evaluators.router_retriever import DEFAULTS as ROUTER_RETRIEVER_DEFAULTS
from zoo.flow.evaluation import DEFAULTS as FLOW_EVAL_DEFAULTS
from zoo.layers.lora import DEFAULT_TARGETS, spec_from_config
from zoo.models import ConfigError, build_model
from zoo.sparsity import CONFIG_DEFAULTS as SPARSITY_DEFAULTS

SCHEDULES = ("warmup_cosine", "warmup_stable_decay", "constant")
# Keys that were renamed: old full key -> new full key.
RENAMED = {"checkpoint.async": "checkpoint.async_save"}


def base_config(model=None, dataset="pystdlib", task="lm"):
  """The shared defaults of every experiment; an experiment file starts from them and sets its own values.

  Args:
    model: a dict of model keys (`name` plus the model's dataclass fields), or None.
    dataset: the dataset name; `config.data` starts from its defaults in `zoo.data`.
    task: the task (`zoo.tasks`): 'lm', 'classification', 'sequence_classification', ...

  Returns:
    A ConfigDict with every key a run can use, so `--config.KEY=VALUE` overrides of unknown keys fail at start-up and
    `validate_config` rejects unknown keys set inside a config file.
  """
  import zoo.data  # pylint: disable=g-import-not-at-top

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = task
  c.task_options = ml_collections.ConfigDict()  # the task's dataclass fields
  c.model = ml_collections.ConfigDict(dict(model or {"name": ""}))
  c.data = zoo.data.default_data_config(dataset) if dataset else ml_collections.ConfigDict({"name": ""})
  # Mesh axis sizes; -1 = all remaining devices (at most one axis).
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
  c.optimizer = ml_collections.ConfigDict(
    {
      "lr": 1e-3,
      "b1": 0.9,
      "b2": 0.95,
      "eps": 1e-8,
      "weight_decay": 0.1,
      "grad_clip_norm": 1.0,  # 0 = no clipping
      "schedule": "warmup_cosine",  # 'warmup_cosine' | 'warmup_stable_decay' | 'constant'
      "warmup_steps": 100,
      "decay_fraction": 0.2,  # warmup_stable_decay: the final fraction of steps that decays to zero
      "end_lr_fraction": 0.1,  # warmup_cosine: final lr = lr * end_lr_fraction
    }
  )
  c.train = ml_collections.ConfigDict(
    {
      "steps": 1000,
      "batch_size": 32,  # global batch, summed over hosts and devices
      "grad_accum_steps": 1,
      "eval_every_steps": 200,  # 0 = only at the end
      "eval_batches": 10,  # batches of config.data.eval_split; <= 0 = the whole split
      "log_every_steps": 20,
      # How the replicas combine (`zoo.engine.diloco`, papers.md H): 'data_parallel' (one model, gradients
      # all-reduced every step), 'diloco', 'diloco_overlap' (the outer step applies the previous round's average),
      # 'fedavg' (sample-weighted mean of the replicas), 'fedavg_hierarchical' (the same mean as a two-level tree).
      "strategy": "data_parallel",
      "replicas": 1,  # M: model replicas, each on devices / M devices with batch_size / M examples per step
      "inner_steps": 50,  # H: inner optimizer steps per replica between outer steps
      "outer_optimizer": "nesterov",  # 'nesterov' | 'sgd' (heavy-ball momentum; outer_momentum=0 = plain SGD)
      "outer_lr": 0.7,  # DiLoCo's outer learning rate (FedAvg uses 1 without momentum)
      "outer_momentum": 0.9,
      "fedavg_groups": 1,  # fedavg_hierarchical: groups of replicas averaged first (a divisor of replicas)
    }
  )
  c.checkpoint = ml_collections.ConfigDict(
    {
      "every_steps": 200,  # 0 = only at the end (and on SIGTERM)
      "keep": 3,
      "async_save": True,  # write in the background while training goes on
    }
  )
  # Where the initial variables come from: '' (a fresh init), a zoo checkpoint directory (a workdir or its
  # checkpoints/ folder), 'hf:DIR' (a Hugging Face model directory; its config.json then sets config.model),
  # 'timm:FILE.safetensors' (a timm LowFormer state dict, `zoo.checkpoints.timm_weights`, for a 'lowformer' model or
  # sub-tree), or a mapping {sub-tree path: source} overlaid onto a fresh init (e.g. {'small': 'workdirs/a',
  # 'large': 'hf:DIR'}; '' is the whole tree). Sub-tree paths are '/'-joined keys of the params (and of the other
  # collections).
  c.init_from = config_dict.placeholder(object)
  c.init_from = ""
  # Regular expressions over '/'-joined parameter paths (`zoo.engine.partition`): when trainable_params is
  # non-empty only the parameters it matches train; those frozen_params matches never train. Frozen parameters get
  # no gradients and no optimizer state, and are saved once per run.
  c.trainable_params = ()
  c.frozen_params = ()
  # LoRA adapters (`zoo.layers.lora`) on the DenseGeneral layers whose '/'-joined module paths match target_modules
  # (regular expressions); r = 0: none. With adapters only they (and the base parameters lora.trainable_params
  # names) train: the base is frozen. `adapter`: a PEFT LoRA adapter directory that initialises them (its base model
  # is config.init_from='hf:DIR', or the adapter's base_model_name_or_path). `quantize`: '' or 'nf4' (QLoRA: the
  # adapted layers' frozen base kernels stored in 4-bit NormalFloat, dequantised in the matmul). `experts` >= 2: a
  # mixture of LoRA experts per adapted layer, routed by `router` ('topk' | 'lora_mixer' | 'dynmole' | 'glider')
  # with `top_k` (DynMoLE's keep_top_k; GLIDER's 2), computed by `dispatch` ('dense': every expert, masked |
  # 'sparse': grouped matmuls over the selected experts, for GPU/TPU). `expert_adapters`: one zoo run per expert,
  # each with one adapter of rank r on the same layers, that the experts start from; `freeze_experts`: only the
  # routers train (LoRA-Mixer's second regime).
  # `glider_scale`: GLIDER's scale of its global task bias (100 held-in, 3 held-out, 0 none).
  c.lora = ml_collections.ConfigDict(
    {
      "r": 0,
      "alpha": 16.0,
      "dropout": 0.0,
      "target_modules": DEFAULT_TARGETS,
      "trainable_params": (),
      "adapter": "",
      "quantize": "",
      "experts": 0,
      "router": "lora_mixer",
      "top_k": 2,
      "dispatch": "dense",
      "expert_adapters": (),
      "freeze_experts": False,
      "glider_scale": 100.0,
    }
  )
  # Evaluators run by evaluate.py (`zoo.evaluators`); () = the task's and the model's defaults.
  c.evals = ()
  # Options of the 'depth_batching' evaluator (continuous depth-wise batching of MoR decoding).
  c.depth_batching = ml_collections.ConfigDict(DEPTH_BATCHING_DEFAULTS)
  # Options of the 'router_retriever' evaluator (per-domain LoRA experts of an embedding model, routed per input).
  c.router_retriever = ml_collections.ConfigDict(ROUTER_RETRIEVER_DEFAULTS)
  # Options of the 'flow_samples' and 'ddm_ensemble' evaluators (sampling, the classifier run, the expert runs).
  c.flow_eval = ml_collections.ConfigDict(FLOW_EVAL_DEFAULTS)
  # Sparse training (`zoo.sparsity`): method 'static' (magnitude pruning at prune_fraction of the steps), 'set' or
  # 'rigl' (prune and regrow every update_every steps until end_fraction), at `sparsity` per sparsified leaf
  # ('uniform') or overall ('erk'), in blocks of block_shape over the kernels' trailing dims ((1, 16): SparseByteNN).
  c.sparsity = ml_collections.ConfigDict(SPARSITY_DEFAULTS)
  c.sample = ml_collections.ConfigDict(
    {  # the 'sample' evaluator (lm)
      "prompt": "def ",
      "max_new_tokens": 128,
      "temperature": 0.0,  # 0 = greedy
      "top_k": 0,  # 0 = the whole vocabulary
    }
  )
  return c


def _base_config():
  return base_config(dataset=None)


def init_sources(config):
  """`config.init_from` as {sub-tree path: source} ('' = the whole tree); {} for a fresh init.

  Raises:
    ConfigError: not a string or a mapping of strings.
  """
  value = config.get("init_from") or ""
  if isinstance(value, str):
    return {"": value} if value else {}
  if hasattr(value, "items") and all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()):
    return {k.strip("/"): v for k, v in value.items()}
  raise ConfigError(
    f"config.init_from={value!r} is invalid; allowed: '', a checkpoint directory, 'hf:DIR', 'timm:FILE', or a "
    "mapping {sub-tree path: source}"
  )


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
  # sections that configs written before them lack
  for section in ("lora", "depth_batching", "router_retriever", "flow_eval", "sparsity"):
    if section in config:
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
  _check(
    t.batch_size % t.grad_accum_steps == 0,
    "train.grad_accum_steps",
    t.grad_accum_steps,
    f"a divisor of train.batch_size={t.batch_size}",
  )
  _check(t.eval_every_steps >= 0, "train.eval_every_steps", t.eval_every_steps, ">= 0 (0 = only at the end)")
  _check(t.log_every_steps > 0, "train.log_every_steps", t.log_every_steps, "> 0")
  strategies = ("data_parallel", "diloco", "diloco_overlap", "fedavg", "fedavg_hierarchical")
  _check(t.strategy in strategies, "train.strategy", t.strategy, list(strategies))
  _check(t.replicas >= 1, "train.replicas", t.replicas, ">= 1")
  _check(t.inner_steps >= 1, "train.inner_steps", t.inner_steps, ">= 1 (inner steps per round)")
  _check(t.outer_optimizer in ("nesterov", "sgd"), "train.outer_optimizer", t.outer_optimizer, ["nesterov", "sgd"])
  _check(t.outer_lr > 0, "train.outer_lr", t.outer_lr, "> 0")
  _check(0 <= t.outer_momentum < 1, "train.outer_momentum", t.outer_momentum, "[0, 1)")
  _check(
    t.fedavg_groups >= 1 and t.replicas % t.fedavg_groups == 0,
    "train.fedavg_groups",
    t.fedavg_groups,
    f"a divisor of train.replicas={t.replicas}",
  )
  replicas = 1 if t.strategy == "data_parallel" else int(t.replicas)
  _check(t.batch_size % replicas == 0, "train.replicas", t.replicas, f"a divisor of train.batch_size={t.batch_size}")
  _check(
    replicas == 1 or (t.batch_size // replicas) % t.grad_accum_steps == 0,
    "train.grad_accum_steps",
    t.grad_accum_steps,
    f"a divisor of the replica batch train.batch_size / train.replicas = {t.batch_size // replicas}",
  )
  _check(ck.every_steps >= 0, "checkpoint.every_steps", ck.every_steps, ">= 0 (0 = only at the end)")
  _check(ck.keep >= 1, "checkpoint.keep", ck.keep, ">= 1")
  _check(config.sample.max_new_tokens >= 0, "sample.max_new_tokens", config.sample.max_new_tokens, ">= 0")
  _check(config.sample.temperature >= 0, "sample.temperature", config.sample.temperature, ">= 0 (0 = greedy)")
  _check(config.sample.top_k >= 0, "sample.top_k", config.sample.top_k, ">= 0 (0 = all)")

  init_sources(config)
  spec_from_config(config.get("lora"))
  for key in ("trainable_params", "frozen_params", "evals"):
    value = config[key]
    _check(
      isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value), key, value, "a tuple of strings"
    )
  for pattern in tuple(config.trainable_params) + tuple(config.frozen_params):
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"config: pattern {pattern!r} is not a regular expression ({e})") from None

  info = dataset_info(config.data)
  from zoo.tasks import get_task  # pylint: disable=g-import-not-at-top

  task = get_task(config.task, config.task_options)  # unknown tasks and options raise ConfigError
  _check(
    info["format"] in task.formats,
    "task",
    config.task,
    f"a task that reads format {info['format']!r} (dataset {config.data.get('name')!r}); task {config.task!r} "
    f"reads {list(task.formats)}",
  )
  model = build_model(config.model)  # unknown model names and keys raise ConfigError
  task.check_model(model, info, config.data)  # e.g. image channels and size against the model's (the task's keys)
  for key in ("vocab_size", "num_classes"):
    unconditional = key == "num_classes" and config.model[key] == 0 if key in config.model else False
    if unconditional and config.task in ("flow_matching", "aptp") and not config.task_options.get("num_classes"):
      continue  # an unconditional generative model of a labelled dataset
    if key in info and key in config.model:
      _check(
        config.model[key] >= info[key],
        f"model.{key}",
        config.model[key],
        f">= {info[key]}, the {key} of dataset {config.data.name!r}",
      )

  if "num_experts" in config.model and "clusters" in info and config.task == "flow_router":
    _check(
      config.model.num_experts == info["clusters"],
      "model.num_experts",
      config.model.num_experts,
      f"config.data.clusters={info['clusters']} (the router predicts one of the data clusters)",
    )

  if num_devices is not None:
    _check(
      num_devices % replicas == 0 or replicas % num_devices == 0,
      "train.replicas",
      t.replicas,
      f"a divisor of the {num_devices} devices (each replica on devices / replicas of them) or a multiple of "
      f"them (replicas / devices replicas on each device)",
    )
    per_replica = max(num_devices // replicas, 1)
    try:
      shape = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(config.mesh, per_replica)))
    except ValueError as e:
      where = f" (the mesh of one replica: {per_replica} of the {num_devices} devices)" if replicas > 1 else ""
      raise ConfigError(f"{e}{where}") from None
    shards = shape["data"] * shape["fsdp"] * shape["expert"]
    micro = t.batch_size // t.grad_accum_steps
    if replicas == 1:
      _check(
        micro % shards == 0,
        "train.batch_size",
        t.batch_size,
        f"a multiple of grad_accum_steps x data x fsdp x expert = {t.grad_accum_steps} x {shards}",
      )
    else:
      _check(
        micro % (replicas * shards) == 0,
        "train.batch_size",
        t.batch_size,
        f"a multiple of grad_accum_steps x replicas x (data x fsdp x expert of one replica) = "
        f"{t.grad_accum_steps} x {replicas} x {shards}",
      )
  return info
