"""The train loop and the evaluation loop: sharded state, jitted steps, checkpoints, logging, NaN guard, SIGTERM.

`train(config, workdir)` runs (or resumes) an experiment; `evaluate(config, workdir, step=None)` scores a checkpoint.
Both are model-agnostic: the model comes from `zoo.models`, how a batch feeds it and is scored from the task
(`zoo.tasks`), what else evaluation computes from the evaluators (`zoo.evaluators`).
"""

import contextlib
import dataclasses
import json
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from zoo.engine import partition, sharding
from zoo.engine.checkpoint import Checkpointer, CheckpointError, CheckpointNotFound, restore_variables
from zoo.engine.config import dataset_info, init_sources, validate_config
from zoo.engine.memory import check_memory
from zoo.engine.optim import make_optimizer
from zoo.engine.state import abstract_state, create_train_state, init_variables
from zoo.engine.workdir import WorkdirLock, check_workdir, record_config
from zoo.engine.writers import MetricsWriter, read_config, to_python
from zoo.evaluators import EvalContext, select
from zoo.layers import lora, nf4
from zoo.models import ConfigError, build_model
from zoo.tasks import get_task, reduce_sums


class TrainingDivergedError(RuntimeError):
  """The loss or the gradient norm became NaN/inf; the last good checkpoint is kept."""


class Experiment:
  """Everything derived from a config: mesh, model, task, evaluators, optimizer, the trainable/frozen split, steps.

  Args:
    config: the experiment config (validated here; `config.model` comes from the Hugging Face directory when
      `config.init_from` is 'hf:DIR', see `use_hf_model_config`).
    devices: the devices of the mesh (default: all).
  """

  def __init__(self, config, devices=None):
    devices = jax.devices() if devices is None else devices
    self.config = config
    use_hf_model_config(config)
    self.info = validate_config(config, num_devices=len(devices))
    self.task = get_task(config.task, config.task_options)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.model = build_model(config.model)
    self.lora = lora.spec_from_config(config.get("lora"))
    if self.lora is not None:  # adapters on the base model; only they (and lora.trainable_params) train
      self.model = lora.with_lora(self.model, self.lora)
    self.evaluators = select(tuple(config.evals), self.model, self.task, config.task)
    self.tx, self.schedule = make_optimizer(config.optimizer, int(config.train.steps), config.get("sparsity"))
    shards = int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp", "expert")]))
    # ShapeDtypeStructs: one row per batch shard (for init) and the global batch (for compiling the train step).
    self.dummy = self.task.batch_spec(self.info, config.data, shards)
    self.batch_spec = self.task.batch_spec(self.info, config.data, int(config.train.batch_size))
    self.local_batch = int(config.train.batch_size) // jax.process_count()
    abstract = jax.eval_shape(lambda r: init_variables(self.model, self.task, self.dummy, r), jax.random.key(0))
    # Unboxed without sharding constraints: an Experiment may be built under a mesh (e.g. by an evaluator).
    params = jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
      abstract["params"],
      is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    if self.lora is not None:
      lora.check_targets(self.lora, params)
    self.mask = partition.trainable_mask(
      params, self.model, tuple(config.trainable_params), tuple(config.frozen_params)
    )

  def batch_shardings(self, batch):
    return {k: sharding.batch_sharding(self.mesh, len(np.shape(v))) for k, v in batch.items()}

  def init_state(self):
    rng = jax.random.key(int(self.config.seed))
    return create_train_state(self.model, self.tx, self.task, self.dummy, self.mesh, self.mask, rng)

  def abstract_state(self):
    return abstract_state(self.model, self.tx, self.task, self.dummy, self.mesh, self.mask)

  def load_init_from(self):
    """The variables of each `config.init_from` source: [(sub-tree path, source, variables)] with the variables in
    the layout of that sub-tree (only the leaves the source has). Call it outside `sharding.mesh_context` (the Hugging
    Face loader unboxes abstract variables, which fails under a mesh).

    Raises:
      CheckpointError / ConversionError / ConfigError: a source that is missing, corrupted, or does not fit its
        sub-tree (a leaf the model lacks or a shape that differs, named).
    """
    loaded = []
    target = nf4.dense_shapes(self.abstract_state()[0].variables())
    for path, source in init_sources(self.config).items():
      sub = _subtree(target, path)
      if not sub.get("params"):
        raise ConfigError(f"config.init_from: the model has no parameters under {path!r}")
      if source.startswith("hf:"):
        from zoo.checkpoints import load_hf_checkpoint  # pylint: disable=g-import-not-at-top

        _, variables = load_hf_checkpoint(source)
        _check_fits(variables, sub, source)
      elif source.startswith("timm:"):
        from zoo.checkpoints.timm_weights import load_timm_checkpoint  # pylint: disable=g-import-not-at-top

        variables = load_timm_checkpoint(source, sub)  # every leaf of the sub-tree, or a ConversionError
      else:
        variables = restore_variables(source, sub, partial=True)
      loaded.append((path, source, variables))
    if self.lora is not None and self.lora.expert_adapters:
      loaded.append(("", "experts:" + ",".join(self.lora.expert_adapters), self.load_expert_adapters()))
    if self.lora is not None and self.config.lora.adapter:
      from zoo.checkpoints import peft_adapters  # pylint: disable=g-import-not-at-top

      adapter = self.config.lora.adapter
      base = init_sources(self.config).get("", "")
      variables = peft_adapters.load_for_model(adapter, self.lora, target["params"], base)
      loaded.append(("", f"peft:{adapter}", variables))
    return loaded

  def load_expert_adapters(self):
    """{'params': the mixture's stacked experts} from the runs `config.lora.expert_adapters` names, each trained with
    one adapter of the mixture's rank on its layers (`lora.single_adapter_spec`); with GLIDER's router also each
    expert's task embedding (`lora.glider_task_embeddings` of its run's training data, on its run's embedding)."""
    single = lora.with_lora(build_model(self.config.model), lora.single_adapter_spec(self.lora))
    abstract = jax.eval_shape(lambda r: init_variables(single, self.task, self.dummy, r), jax.random.key(0))
    target = {"params": nn.unbox(abstract["params"])}
    trees, tasks = [], []
    for source in self.lora.expert_adapters:
      variables = restore_variables(source, target, partial=True, key="config.lora.expert_adapters")
      _, adapters = lora.split_adapters(variables["params"])
      if len(lora.adapted_modules(adapters)) != len(lora.adapted_modules(target["params"])):
        raise ConfigError(
          f"config.lora.expert_adapters: {source} holds adapters on {lora.adapted_modules(adapters)[:4]}..., not on "
          f"the layers config.lora.target_modules adapts ({len(lora.adapted_modules(target['params']))} layers)"
        )
      trees.append(adapters)
      if self.lora.router == "glider":
        tasks.append(self._glider_task_embedding(source, variables["params"]))
    params = lora.stack_experts(trees)
    if tasks:
      params[lora.TASK_EMBEDDINGS] = jnp.stack(tasks)
    return {"params": params}

  def _glider_task_embedding(self, run, params, batches=8):
    """GLIDER's task embedding of the expert trained in `run`: over the first `batches` batches of its training data
    (its config.json's `data`), with the embedding table of its checkpoint (`params`)."""
    from zoo.data import make_iterator  # pylint: disable=g-import-not-at-top

    data = read_config(run).data
    iterator = make_iterator(data, split="train", global_batch_size=int(self.config.train.batch_size), seed=0)
    tokens = [next(iterator)["inputs"] for _ in range(batches)]
    return lora.glider_task_embeddings(lora.embedding_table(params), tokens)

  def with_init_from(self, state, shardings, loaded):
    """`state` with the loaded variables overlaid onto its fresh values (placed in `shardings`)."""
    flat = traverse_util.flatten_dict(state.variables())
    places = traverse_util.flatten_dict(shardings.variables())
    for path, _, variables in loaded:
      prefix = tuple(p for p in path.split("/") if p)
      for key, value in traverse_util.flatten_dict(dict(variables)).items():
        full = (key[0], *prefix, *key[1:])
        if isinstance(flat[full], nf4.NF4Tensor):  # a frozen kernel kept in NF4: quantised by store_frozen below
          flat[full] = jnp.asarray(value, jnp.float32)
        else:
          flat[full] = jax.device_put(jnp.asarray(value, flat[full].dtype), places[full])
    variables = traverse_util.unflatten_dict(flat)
    params, frozen = partition.split(variables.pop("params"), self.mask)
    frozen = jax.device_put(partition.store_frozen(self.model, frozen), shardings.frozen)
    return state.replace(params=params, frozen=frozen, collections={**state.collections, **variables})

  def with_params(self, state, params, shardings):
    """`state` with the whole params tree `params`, split into its trainable and frozen parts, placed in
    `shardings`."""
    trainable, frozen = partition.split(params, self.mask)
    frozen = partition.store_frozen(self.model, frozen)
    return state.replace(
      params=jax.device_put(trainable, shardings.params), frozen=jax.device_put(frozen, shardings.frozen)
    )

  def make_iterator(self, split, repeat, drop_remainder=True, global_batch_size=None):
    """This host's iterator over `split` in global batches of `global_batch_size` (default `train.batch_size`). A
    partial last batch is kept only in single-process runs: hosts could otherwise run different numbers of
    (collective) eval steps."""
    from zoo.data import make_iterator  # pylint: disable=g-import-not-at-top

    drop_remainder = drop_remainder or jax.process_count() > 1
    global_batch_size = int(self.config.train.batch_size) if global_batch_size is None else global_batch_size
    return make_iterator(
      self.config.data,
      split=split,
      global_batch_size=global_batch_size,
      seed=int(self.config.seed),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      repeat=repeat,
      drop_remainder=drop_remainder,
    )

  def task_rngs(self, rng):
    """One key per random stream of the task, derived from `rng`."""
    return {name: jax.random.fold_in(rng, 1 + i) for i, name in enumerate(self.task.rng_streams)}

  def eval_rngs(self):
    """The task's random keys for evaluation: the same at every evaluation, so scores compare."""
    return self.task_rngs(jax.random.key(int(self.config.seed) + 2))

  def _apply(self, variables, inputs, *, train, rng=None):
    """Returns (outputs, ModelOutput, updated non-param collections)."""
    mutable = [k for k in variables if k != "params"] if train else False
    kwargs = {"rngs": {"dropout": rng}} if rng is not None else {}
    out = self.model.apply(variables, **inputs, deterministic=not train, mutable=mutable, **kwargs)
    if train:
      (outputs, model_out), updated = out
      return outputs, model_out, dict(updated)
    outputs, model_out = out
    return outputs, model_out, {k: v for k, v in variables.items() if k != "params"}

  def make_train_step(self, state_shardings, batch_example):
    """A jitted `(state, batch) -> (state, metrics)` with explicit in/out shardings; the state is donated. Only the
    trainable parameters are differentiated (`state.params`); the frozen ones (`state.frozen`) are inputs."""
    accum = int(self.config.train.grad_accum_steps)
    base_rng = jax.random.key(int(self.config.seed) + 1)

    def micro_loss(params, frozen, collections, micro, rng):
      inputs, targets = self.task.prepare(micro, self.task_rngs(rng))
      variables = {"params": partition.merge(params, frozen), **collections}
      outputs, model_out, collections = self._apply(variables, inputs, train=True, rng=rng)
      stats = self.task.stats(outputs, targets, micro)
      loss = stats["loss_sum"] / jnp.maximum(stats["weight"], 1e-9) + model_out.aux_loss
      return loss, (stats, model_out, collections)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state, batch):
      rng = jax.random.fold_in(base_rng, state.step)
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

      def body(carry, inputs):
        grads, collections = carry
        i, mb = inputs
        (_, (stats, model_out, collections)), g = grad_fn(
          state.params, state.frozen, collections, mb, jax.random.fold_in(rng, i)
        )
        grads = jax.tree.map(lambda a, b: a + b / accum, grads, g)
        return (grads, collections), (stats, model_out.aux_loss, model_out.metrics)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, collections), (stats, aux, model_metrics) = jax.lax.scan(
        body, (zeros, state.collections), (jnp.arange(accum), micro)
      )
      updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = {
        "stats": jax.tree.map(lambda x: jnp.sum(x, 0), stats),
        "aux_loss": jnp.mean(aux),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": self.schedule(state.step),
        "model": jax.tree.map(lambda x: jnp.mean(x.astype(jnp.float32), 0), model_metrics),
      }
      new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, collections=collections)
      return new_state, metrics

    return jax.jit(
      step,
      in_shardings=(state_shardings, self.batch_shardings(batch_example)),
      out_shardings=(state_shardings, sharding.replicated(self.mesh)),
      donate_argnums=0,
    )

  def compile_train_step(self, state_shardings, abstract_state):
    """The train step compiled ahead of time for `abstract_state`, refused when XLA's estimate of its memory (state,
    batch and temporaries, per device) exceeds a device's memory; nothing is allocated before this check."""
    shardings = self.batch_shardings(self.batch_spec)
    abstract_batch = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in self.batch_spec.items()
    }
    with sharding.mesh_context(self.mesh):
      compiled = self.make_train_step(state_shardings, self.dummy).lower(abstract_state, abstract_batch).compile()
    check_memory(
      compiled,
      self.mesh.local_devices[0],
      "train.batch_size (or raise train.grad_accum_steps), the input size (data.seq_len) or the model",
    )
    return compiled

  def host_metrics(self, metrics):
    """Train-step metrics on the host: the task's metrics of the batch, aux loss, grad norm, lr, model metrics."""
    if "stats" not in metrics:
      return metrics
    metrics = jax.device_get(metrics)
    return {
      **self.task.finalize(metrics["stats"], self.info),
      "aux_loss": metrics["aux_loss"],
      "grad_norm": metrics["grad_norm"],
      "learning_rate": metrics["learning_rate"],
      **metrics["model"],
    }

  def make_eval_step(self, state_shardings, batch_example):
    """A jitted `(state, batch) -> (weighted sums, model metrics)`."""

    def step(state, batch):
      inputs, targets = self.task.prepare(batch, self.eval_rngs())
      outputs, model_out, _ = self._apply(state.variables(), inputs, train=False)
      return self.task.stats(outputs, targets, batch), model_out.metrics

    return jax.jit(
      step,
      in_shardings=(state_shardings, self.batch_shardings(batch_example)),
      out_shardings=sharding.replicated(self.mesh),
    )

  def run_eval(self, state, eval_step, batches=None, place=None):
    """Score `state` on `config.data.eval_split` (`eval_batches` batches, or all when <= 0: every example exactly
    once, the last short batch padded with zero-weight rows).

    Args:
      batches: the host batches to score (default: this experiment's iterator over the eval split).
      place: host batch -> eval_step's input (default: padded and laid over the mesh as a global batch).

    Returns:
      dict: the task's metrics plus the model's metrics averaged over batches (numpy).
    """
    if batches is None:
      batches = self.make_iterator(self.config.data.eval_split, repeat=False, drop_remainder=False)
    place = place or (lambda batch: sharding.global_batch(self.pad(batch), self.mesh))
    limit = int(self.config.train.eval_batches)
    sums, model_metrics = [], []
    for i, batch in enumerate(batches):
      if 0 < limit <= i:
        break
      stats, metrics = eval_step(state, place(batch))
      sums.append(jax.device_get(stats))
      model_metrics.append(jax.device_get(metrics))
    if not sums:
      raise ValueError(f"config.data.eval_split={self.config.data.eval_split!r} gave no batches")
    result = self.task.finalize(reduce_sums(sums), self.info)
    result.update({k: np.mean([m[k] for m in model_metrics], axis=0) for k in model_metrics[0]})
    return result

  def pad(self, batch, rows=None):
    """Add the per-example `weight` and pad a short last batch with zero-weight rows to `rows` (default: this host's
    share of `train.batch_size`)."""
    rows = self.local_batch if rows is None else rows
    n = len(next(iter(batch.values())))
    batch = {**batch, "weight": np.ones((n,), np.float32)}
    if n == rows:
      return batch
    return {k: np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _subtree(variables, path):
  """{collection: the sub-tree at `path` ('/'-joined keys; '' = all)} of the collections that have it."""
  out = {}
  for collection, tree in variables.items():
    for key in (p for p in path.split("/") if p):
      tree = tree.get(key) if hasattr(tree, "get") else None
    if tree:
      out[collection] = tree
  return out


def _check_fits(variables, target, source):
  """Every leaf of `variables` exists in `target` with the same shape (ConfigError naming the first that does not)."""
  want = traverse_util.flatten_dict(dict(target))
  for key, value in traverse_util.flatten_dict(dict(variables)).items():
    if key not in want:
      raise ConfigError(f"config.init_from: {source} holds {'/'.join(key)}, which the model does not have there")
    if tuple(np.shape(value)) != tuple(want[key].shape):
      raise ConfigError(
        f"config.init_from: {'/'.join(key)} has shape {tuple(np.shape(value))} in {source} but "
        f"{tuple(want[key].shape)} in the model"
      )


def use_hf_model_config(config):
  """For `config.init_from='hf:DIR'` (the whole tree): set `config.model` from DIR's config.json (in place), and
  `config.data.tokenizer` to DIR's tokenizer when it is '' and DIR has a tokenizer.json.

  The Hugging Face config sets every architecture key it knows; the other keys of `config.model` (dtype, remat,
  dropout, dispatch, ...) are kept when `config.model.name` is the converted model's name, else `config.model` is
  replaced. Architecture keys given on the command line are overridden by the Hugging Face config.

  Raises:
    ConfigError: the model's vocabulary is smaller than the tokenizer's.
  """
  source = init_sources(config).get("", "")
  if not source.startswith("hf:"):
    return
  from zoo.checkpoints import hf_model_config  # pylint: disable=g-import-not-at-top
  from zoo.data.tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top

  hf = hf_model_config(source[3:])
  kept = dict(config.model) if config.model.get("name") == hf.name else {}
  config.model = type(config.model)({**kept, **hf})
  if not config.data.get("tokenizer") and HFTokenizer.available(source):
    config.data.tokenizer = source
  info = dataset_info(config.data)
  if "vocab_size" in info and hf.vocab_size < info["vocab_size"]:
    raise ConfigError(
      f"config.init_from={source!r}: the model's vocab_size={hf.vocab_size} is smaller than the "
      f"tokenizer's vocab_size={info['vocab_size']} (data.tokenizer={config.data.tokenizer!r}); "
      "allowed: a model whose vocabulary covers the data's token ids"
    )


class _Sigterm:
  """Remembers a SIGTERM so the loop can save and stop at the end of the current step."""

  def __init__(self):
    self.received = False

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _scalars(metrics):
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def train(config, workdir, *, devices=None, progress=True, step=None):
  """Train (or resume) the experiment `config` in `workdir`.

  Resumes from the latest checkpoint in `workdir/checkpoints` (or from `step`, setting the later steps aside) with
  the train state and every host's data-iterator state, else starts from `config.init_from`'s params and non-param
  collections (a zoo checkpoint or 'hf:DIR') or from scratch. Everything that can be checked is checked before the
  first step: the config, both data splits, the workdir (one training run at a time, `WorkdirLock`), the checkpoint
  and whether a step fits in memory. Saves every `checkpoint.every_steps`, at the end (before the final evaluation)
  and on SIGTERM, where the step is reported only once it is committed; stops with TrainingDivergedError on a NaN/inf
  loss without saving the bad state.

  Returns:
    The final train state.
  """
  if config.train.get("strategy", "data_parallel") != "data_parallel":  # DiLoCo, FedAvg: their own trainer
    from zoo.engine import diloco  # pylint: disable=g-import-not-at-top

    return diloco.train(config, workdir, devices=devices, progress=progress, step=step)
  exp = Experiment(config, devices)
  with open_run(config, workdir, progress) as run:
    primary, stack = run.primary, run.stack
    ckpt = Checkpointer(
      os.path.join(run.workdir, "checkpoints"),
      keep=int(config.checkpoint.keep),
      use_async=bool(config.checkpoint.async_save),
    )
    stack.callback(ckpt.close)
    train_iter = exp.make_iterator(config.data.train_split, repeat=True)
    exp.make_iterator(config.data.eval_split, repeat=False)  # a bad eval split fails now, not after training
    latest = ckpt.latest_step()
    if step is not None:
      if step not in ckpt.all_steps():
        raise CheckpointError(f"--step={step}: no such checkpoint in {ckpt.directory}; steps: {ckpt.all_steps()}")
      moved = ckpt.set_aside_after(step)
      if moved:
        _log(primary, f"resuming from step {step}: later checkpoints set aside (kept) as {moved}")
      latest = step
    target, shardings = exp.abstract_state()
    train_step = exp.compile_train_step(shardings, target)
    loaded = exp.load_init_from() if latest is None else []
    stack.enter_context(sharding.mesh_context(exp.mesh))

    if latest is not None:
      state, data_state = ckpt.restore(latest, target)
      resume_data(train_iter, data_state, ckpt, latest, primary)
    else:
      state, _ = exp.init_state()
      if loaded:
        state = exp.with_init_from(state, shardings, loaded)
        log_init_from(loaded, primary)
    _log(primary, describe_params(state))
    eval_step = exp.make_eval_step(shardings, exp.dummy)

    def advance(step, state, batch):
      del step
      return (*train_step(state, sharding.global_batch(exp.pad(batch), exp.mesh)), {}, False)

    return run_steps(
      state,
      run,
      task=exp.task,
      train_iter=train_iter,
      checkpointers=(ckpt,),
      advance=advance,
      host_metrics=exp.host_metrics,
      params_finite=lambda state: bool(_all_finite(state.params)),
      save=lambda step, state: ckpt.save(step, state, train_iter.get_state()),
      evaluate=lambda state: exp.run_eval(state, eval_step),
    )


def describe_params(state):
  """One line: the trainable and frozen parameters of `state`, their bytes and bits per value (an NF4 frozen base
  counted as stored)."""
  parts = []
  for name, tree in (("trainable", state.params), ("frozen", state.frozen)):
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nf4.NF4Tensor))
    values = sum(int(np.prod(x.shape)) for x in leaves)
    size = nf4.nbytes(tree)
    parts.append(f"{values} {name} ({size} bytes, {8 * size / max(values, 1):.3f} bits per value)")
  return "parameters: " + ", ".join(parts)


def log_init_from(loaded, primary):
  """Reports what `Experiment.load_init_from` loaded: [(path, source, variables)]."""
  for path, source, variables in loaded:
    _log(primary, f"initialised {partition.count(variables)} values of {path or 'the model'} from {source}")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run from start to stop (`open_run`).

  Attributes:
    workdir: the run's checked directory (locked by the primary host: one training run at a time).
    config: the experiment config.
    primary: whether this is the host that writes records and logs.
    progress: show a progress bar (primary host only).
    stack: the ExitStack that closes what the run opens, in reverse order.
    sigterm: the SIGTERM flag (`received` after a SIGTERM).
  """

  workdir: str
  config: Any
  primary: bool
  progress: bool
  stack: contextlib.ExitStack
  sigterm: Any


@contextlib.contextmanager
def open_run(config, workdir, progress):
  """The `Run` of a training run in `workdir` (created if missing, locked by the primary host), with SIGTERM
  caught for its duration."""
  primary = jax.process_index() == 0
  workdir = check_workdir(workdir, create=True)
  with contextlib.ExitStack() as stack:
    if primary:
      stack.enter_context(WorkdirLock(workdir))
    sigterm = stack.enter_context(_Sigterm())
    yield Run(workdir, config, primary, progress, stack, sigterm)


def run_steps(
  state,
  run,
  *,
  task,
  train_iter,
  checkpointers,
  advance,
  host_metrics,
  params_finite,
  save,
  evaluate,
  log_extras=None,
):
  """The step loop `train` and `zoo.engine.diloco.train` share, from the state's step + 1 to `config.train.steps`.

  Opens the run's records (`open_run_records`); stops before the first step if a SIGTERM came already. Evaluates
  at step 0 of a new run, every `train.eval_every_steps` and at the end; logs every `train.log_every_steps`, at the
  end and when `advance` asks; saves every `checkpoint.every_steps`, at the end and on
  SIGTERM (after the NaN guard: a non-finite loss, gradient norm or parameter stops the run with
  TrainingDivergedError before anything is saved), then waits for the save before the final evaluation.

  Args:
    state: the state to continue from (its `step`: 0 for a new run)
    run: the `Run` (its workdir gets metrics.jsonl and config.json).
    task: the task (`items(batch)` counts the throughput).
    train_iter: the training batches (a checkpointable iterator).
    checkpointers: every Checkpointer the loop saves to (polled each step, waited for at the end); errors name the
      first.
    advance: `(step, state, batch) -> (state, device metrics, record, log_now)`: one step; `record` holds extra host
      values for this step's record; `log_now` forces a log record.
    host_metrics: device metrics -> {name: host value}.
    params_finite: state -> whether every parameter is finite.
    save: `(step, state)` starts this step's checkpoint saves.
    evaluate: state -> {name: value} (written as 'eval_<name>').
    log_extras: `(step, state, log_now) -> dict`, added to every log record (None = nothing).

  Returns:
    The last state.
  """
  config, primary, stack, sigterm = run.config, run.primary, run.stack, run.sigterm
  t = config.train
  steps, eval_every, every = int(t.steps), int(t.eval_every_steps), int(config.checkpoint.every_steps)
  ckpt = checkpointers[0]
  start = int(jax.device_get(state.step))
  writer = open_run_records(stack, run.workdir, config, start, primary)
  if sigterm.received:
    _log(primary, f"SIGTERM before the first step: nothing new to save (the run is at step {start}); stopping")
    return state
  if start == 0 and eval_every:
    writer.write(0, {f"eval_{k}": v for k, v in evaluate(state).items()})
  bar = _progress(primary and run.progress, start, steps)
  stack.callback(bar.close)
  items, tic = 0, time.perf_counter()
  for step in range(start + 1, steps + 1):
    batch = next(train_iter)
    items += task.items(batch) * jax.process_count()
    state, metrics, record, log_now = advance(step, state, batch)
    bar.update(1)
    for checkpointer in checkpointers:
      checkpointer.poll()
    host = None
    if step % int(t.log_every_steps) == 0 or step == steps or log_now:
      host = host_metrics(metrics)
      _check_finite(step, ckpt, host)
      elapsed = time.perf_counter() - tic
      record.update(host)
      record[task.throughput_key] = items / max(elapsed, 1e-9)
      items, tic = 0, time.perf_counter()
      if log_extras is not None:
        record.update(log_extras(step, state, log_now))
      bar.set_postfix(loss=f"{float(host['loss']):.4f}")
    # Decided after this step's blocking work (the metrics fetch above): a SIGTERM that arrives later is seen at the
    # end of the next step.
    stop = sigterm.received
    if (every and step % every == 0) or step == steps or stop:
      _check_finite(step, ckpt, host if host is not None else host_metrics(metrics), params_finite(state))
      save(step, state)
    if step == steps or stop:
      for checkpointer in checkpointers:
        checkpointer.wait()  # committed (and checksummed) before anything else can fail
    if (eval_every and step % eval_every == 0) or step == steps:
      record.update({f"eval_{k}": v for k, v in evaluate(state).items()})
    if record:
      writer.write(step, record)
      if primary and run.progress:
        bar.write(_format(step, record))
    if stop:
      report_sigterm_save(step, ckpt, primary)
      break
  for checkpointer in checkpointers:
    checkpointer.wait()
  return state


def resume_data(train_iter, data_state, ckpt, step, primary):
  """Set this host's data position from checkpoint `step` of `ckpt` (a position of other data is refused)."""
  try:
    train_iter.set_state(data_state)
  except ValueError as e:
    raise CheckpointError(f"checkpoint step {step} in {ckpt.directory}: {e}") from None
  _log(primary, f"resumed from checkpoint step {step} in {ckpt.directory}")


def open_run_records(stack, workdir, config, start, primary):
  """The run's MetricsWriter (closed by `stack`) with the records after `start` dropped; config.json recorded, a
  resume with a changed config reported (the differing config kept as config.step<start>.json)."""
  writer = MetricsWriter(workdir, enabled=primary)
  stack.callback(writer.close)
  writer.truncate_after(start)
  if primary:
    changes = record_config(workdir, config, start)
    if changes:
      _log(
        primary,
        f"warning: resuming step {start} with a config that differs from the run's config.json (kept as "
        f"config.step{start}.json): " + "; ".join(changes),
      )
  return writer


def report_sigterm_save(step, ckpt, primary):
  """After a SIGTERM save: report the step only once it is committed in `ckpt`."""
  if step not in ckpt.all_steps():
    raise CheckpointError(f"SIGTERM: checkpoint step {step} is not in {ckpt.directory} after its save")
  _log(primary, f"SIGTERM: saved checkpoint step {step} in {ckpt.directory}; stopping")


def _check_finite(step, ckpt, metrics, params_finite=True):
  """Raise TrainingDivergedError on a NaN/inf loss or gradient norm, or non-finite params, before any save."""
  loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
  if np.isfinite(loss) and np.isfinite(grad_norm) and params_finite:
    return
  ckpt.wait()
  good = ckpt.good_steps()
  last = (
    f"The last good checkpoint is step {good[-1]} in {ckpt.directory}"
    if good
    else f"No checkpoint was saved in {ckpt.directory} before it"
  )
  raise TrainingDivergedError(
    f"loss={loss} grad_norm={grad_norm} params_finite={bool(params_finite)} at step {step}: training diverged; "
    f"stopped without saving. {last}"
  )


def _format(step, record):
  parts = [f"{k}={v:.4g}" for k, v in _scalars(record).items()]
  return f"step {step}: " + " ".join(parts)


def _log(primary, text):
  if primary:
    print(text, flush=True)


def _progress(enabled, start, total):
  from tqdm import tqdm

  return tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True, desc="train")


def evaluate(config, workdir, *, step=None, devices=None):
  """Score the checkpoint `step` (default: the latest) of `workdir` on `config.data.eval_split`, then run the
  evaluators (`config.evals`, `zoo.evaluators`: text sample, routing consistency, plots, ...).

  Without a checkpoint in `workdir` and without `step`, scores the variables of `config.init_from` (zoo checkpoints
  or 'hf:DIR') as step 0. Writes `workdir/eval_<step>.json`; evaluators write their files as
  `workdir/<name>_<step>.<ext>`.

  Returns:
    (step, results: the task's and the model's metrics plus every evaluator's results, the 'sample' text or None).
  """
  exp = Experiment(config, devices)
  from_init = step is None and bool(init_sources(config)) and _latest_step(workdir) is None
  workdir = check_workdir(workdir, create=from_init)  # results are written there: refuse a read-only one now
  if from_init:
    step = 0
    loaded = exp.load_init_from()
    with sharding.mesh_context(exp.mesh):
      state, shardings = exp.init_state()
      state = exp.with_init_from(state, shardings, loaded)
  else:
    step, state, shardings = restore_run(exp, workdir, step)
  with sharding.mesh_context(exp.mesh):
    results = exp.run_eval(state, exp.make_eval_step(shardings, exp.dummy))
    context = EvalContext(exp, state, workdir, step, results)
    for evaluator in exp.evaluators:
      results.update(evaluator(context))
  results = {k: to_python(v) for k, v in results.items()}
  if jax.process_index() == 0:
    path = os.path.join(workdir, f"eval_{step}.json")
    with open(path + ".partial", "w") as f:
      json.dump({"step": step, **results}, f)
    os.replace(path + ".partial", path)
  return step, results, results.get("sample")


def restore_run(exp, workdir, step=None):
  """(step, state, shardings): checkpoint `step` (default: the latest) of the run in `workdir`, restored onto
  `exp`'s mesh.

  Raises:
    CheckpointNotFound / CheckpointError: no checkpoint, or one that is corrupted or does not fit `exp`.
  """
  directory = os.path.join(workdir, "checkpoints")
  if _latest_step(workdir) is None:
    raise CheckpointNotFound(
      f"no checkpoint in {directory}; train first with train.py --workdir {workdir}, or set config.init_from"
    )
  ckpt = Checkpointer(directory, use_async=False, create=False)
  try:
    step = ckpt.latest_step() if step is None else int(step)
    target, shardings = exp.abstract_state()
    with sharding.mesh_context(exp.mesh):
      state, _ = ckpt.restore(step, target)
  finally:
    ckpt.close()
  return step, state, shardings


def _latest_step(workdir):
  """The latest checkpoint step in `workdir/checkpoints`, or None; creates nothing."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    return None
  ckpt = Checkpointer(directory, use_async=False, create=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()
