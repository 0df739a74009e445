"""Decentralized Diffusion Models (McAllister et al. 2025, papers.md D1) at sampling time: K flow-matching experts,
each trained in its own run on one k-means cluster of the data (`config.data.cluster`), combined at every step by the
evaluated router run (task `flow_router`): top-1 (each sample takes its most likely expert's velocity, the paper's
choice) and the softmax mixture `v = sum_k w_k v_k` (`zoo.flow.ensemble`). Every expert runs on the whole batch at
each step (one vmap over the stacked expert parameters, no per-sample loop).

Keys, for mode in (top1, mixture): `ddm_<mode>` (the grid), `ddm_<mode>_fd`, `ddm_<mode>_sample_accuracy` (with
`config.flow_eval.classifier_run`), `ddm_<mode>_flops_per_sample` (FLOPs a sample costs: top-1 one expert per
velocity evaluation, the mixture all K, plus the router once per step; the batched sampler here computes all K in
both). Options: `config.flow_eval` (`expert_runs` in the order of the clusters).
"""

import jax
import jax.numpy as jnp
import numpy as np

from zoo.evaluators.base import Evaluator, register_evaluator
from zoo.evaluators.flow_samples import evaluations_per_sample, scorer, velocity_fn
from zoo.flow import ensemble, evaluation
from zoo.models import ConfigError
from zoo.tasks.flow_matching import from_model_range

MODES = ("top1", "mixture")


def load_experts(exp, runs, clusters):
  """(the experts' Experiment, stacked variables [K, ...]) of the flow-matching runs `runs`, checked against the
  router's data: one run per cluster, the same model, the router's image shape.

  Raises:
    ConfigError naming the run: a count other than the router's clusters, another task, image shape or model.
  """
  from zoo.engine import trainer, writers  # pylint: disable=g-import-not-at-top

  if len(runs) != clusters:
    raise ConfigError(
      f"config.flow_eval.expert_runs names {len(runs)} runs but the router routes between config.data.clusters="
      f"{clusters} clusters; allowed: one expert run per cluster, in cluster order"
    )
  first, variables = None, []
  for k, run in enumerate(runs):
    try:
      config = writers.read_config(run)
    except FileNotFoundError as e:
      raise ConfigError(f"config.flow_eval.expert_runs: {e}") from None
    if config.get("task") != "flow_matching":
      raise ConfigError(f"config.flow_eval.expert_runs: {run} trains task {config.get('task')!r}, not flow_matching")
    if config.data.get("clusters", 0) and config.data.get("cluster", -1) not in (-1, k):
      raise ConfigError(
        f"config.flow_eval.expert_runs: {run} was trained on cluster {config.data.cluster}, listed as expert {k}"
      )
    partition = {key: config.data.get(key) for key in ("name", "data_dir", "train_split")}
    router_partition = {key: exp.config.data.get(key) for key in ("name", "data_dir", "train_split")}
    if config.data.get("clusters", 0) not in (0, clusters) or partition != router_partition:
      raise ConfigError(
        f"config.flow_eval.expert_runs: {run} was trained on a partition of {partition} into "
        f"{config.data.get('clusters', 0)} clusters; the router's is {router_partition} into {clusters}"
      )
    try:
      expert = trainer.Experiment(config, exp.mesh.devices.reshape(-1).tolist())
    except ConfigError as e:
      raise ConfigError(f"config.flow_eval.expert_runs: {run}: {e}") from None
    if tuple(expert.info["image_shape"]) != tuple(exp.info["image_shape"]):
      raise ConfigError(
        f"config.flow_eval.expert_runs: {run} makes images of shape {tuple(expert.info['image_shape'])}, the router "
        f"sees {tuple(exp.info['image_shape'])}"
      )
    if first is None:
      first = expert
    elif config.model.to_dict() != first.config.model.to_dict() or expert.task != first.task:
      raise ConfigError(
        f"config.flow_eval.expert_runs: {run} differs from {runs[0]} in its model or task options (conditioning); "
        "the experts of one ensemble share one architecture"
      )
    _, state, _ = trainer.restore_run(expert, run)
    variables.append(jax.device_get(state.variables()))
  return first, jax.tree.map(lambda *xs: jnp.stack(xs), *variables)


@register_evaluator("ddm_ensemble")
class DDMEnsemble(Evaluator):
  """See the module docstring."""

  tasks = ("flow_router",)
  by_default = False  # needs the expert runs

  def __call__(self, ctx):
    o = evaluation.options(ctx.config)
    exp = ctx.exp
    clusters = exp.info["clusters"]
    experts, stacked = load_experts(exp, o["expert_runs"], clusters)
    classes = experts.task.num_classes
    labels = jnp.asarray(evaluation.sample_labels(exp, o["samples"], classes))
    router_variables = jax.device_get(ctx.state.variables())

    def experts_fn(x, t):
      return jax.vmap(lambda v: velocity_fn(experts.model, v, labels, classes, o["guidance"])(x, t))(stacked)

    def router_fn(x, t):
      return exp.model.apply(router_variables, images=x, t=t, labels=labels)[0]

    x1 = jax.random.normal(jax.random.key(o["seed"]), (o["samples"], *exp.info["image_shape"]), jnp.float32)
    guided = bool(classes) and o["guidance"] != 1.0
    expert_flops = experts.model.flops_per_sample() * evaluations_per_sample(o, guided)
    router_flops = exp.model.flops_per_sample() * o["steps"] * (2 if o["sampler"] == "heun" else 1)
    score, results = scorer(ctx, o, np.asarray(labels)), {}
    for mode in MODES:
      sample = jax.jit(
        lambda x, mode=mode: ensemble.ensemble_sample(experts_fn, router_fn, x, o["steps"], mode, o["sampler"])
      )
      samples = np.asarray(from_model_range(sample(x1)))
      flops = expert_flops * (1 if mode == "top1" else clusters) + router_flops
      results.update(score(samples, f"ddm_{mode}", flops))
    return results
