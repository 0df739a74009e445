"""Samples of a flow-matching model (`zoo.tasks.flow_matching`): a PNG grid, the Frechet distance and class accuracy
of the samples on a zoo classifier's features, and the FLOPs per sample (`zoo.flow.evaluation`; options
`config.flow_eval`).

Keys: `flow_samples` (the grid's path), `fd`, `sample_accuracy` and `fd_real` (the distance of real training images
of the samples' classes: the floor of `fd`) with `classifier_run`, and `flops_per_sample` (the model's forward FLOPs x
velocity evaluations per sample: steps, x2 for Heun, x2 with guidance).
"""

import jax
import jax.numpy as jnp
import numpy as np

from zoo.evaluators.base import Evaluator, register_evaluator
from zoo.flow import evaluation, matching
from zoo.tasks.flow_matching import from_model_range


def velocity_fn(model, variables, labels, null_label, guidance):
  """`v(x, t)` of a flow-matching model for conditioning `labels` [B] (guided when `null_label` and guidance != 1)."""

  def model_fn(x, t, y):
    return model.apply(variables, images=x, t=t, labels=y)[0]

  if null_label and guidance != 1.0:
    return matching.guided_velocity_fn(model_fn, labels, null_label, guidance)
  return lambda x, t: model_fn(x, t, labels)


def evaluations_per_sample(o, guided):
  """Velocity evaluations of one sample: steps, x2 for Heun (two per step), x2 with guidance."""
  return o["steps"] * (2 if o["sampler"] == "heun" else 1) * (2 if guided else 1)


def integrate(velocity, x1, o):
  """x0 from noise x1 with `o`'s sampler and steps (jitted)."""
  sampler = matching.heun_sample if o["sampler"] == "heun" else matching.euler_sample
  return jax.jit(lambda x: sampler(velocity, x, o["steps"]))(x1)


def scorer(ctx, o, labels):
  """`score(samples [N, H, W, C] in [0, 1], name, flops) -> results`: the grid, quality and FLOPs of samples drawn
  for `labels` [N], under result keys prefixed by `name`. The classifier run and the real images (reference and
  same-class training images) are loaded once, for every set of samples scored."""
  logits_fn = evaluation.classifier(ctx.exp, o["classifier_run"])[0] if o["classifier_run"] else None
  reference, _ = evaluation.real_images(ctx.exp, len(labels))
  real = evaluation.training_images_like(ctx.exp, labels) if logits_fn else None
  reference_logits = logits_fn(reference) if logits_fn else None
  real_logits = logits_fn(real) if logits_fn else None

  def score(samples, name, flops):
    results = {name: evaluation.save_grid(samples[:100], ctx.path(f"{name}.png"))}
    if logits_fn:
      quality = evaluation.quality(logits_fn(samples), labels, reference_logits, real_logits)
      results.update({f"{name}_{k}": v for k, v in quality.items()})
    results[f"{name}_flops_per_sample"] = float(flops)
    return results

  return score


@register_evaluator("flow_samples")
class FlowSamples(Evaluator):
  """See the module docstring."""

  tasks = ("flow_matching",)

  def __call__(self, ctx):
    o = evaluation.options(ctx.config)
    exp = ctx.exp
    classes = exp.task.num_classes
    labels = evaluation.sample_labels(exp, o["samples"], classes)
    variables = jax.device_get(ctx.state.variables())
    guided = bool(classes) and o["guidance"] != 1.0
    velocity = velocity_fn(exp.model, variables, jnp.asarray(labels), classes, o["guidance"])
    x1 = jax.random.normal(jax.random.key(o["seed"]), (o["samples"], *exp.info["image_shape"]), jnp.float32)
    samples = np.asarray(from_model_range(integrate(velocity, x1, o)))
    flops = exp.model.flops_per_sample() * evaluations_per_sample(o, guided)
    results = scorer(ctx, o, labels)(samples, "flow_samples", flops)
    return {k.replace("flow_samples_", "") if k != "flow_samples" else k: v for k, v in results.items()}
