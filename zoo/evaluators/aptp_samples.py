"""Samples of a prompt-routed pruned DiT (APTP, `zoo.models.aptp`, task `aptp`): each sample's prompt is the caption
of one evaluation image (its digit and stroke, `zoo.tasks.aptp`), the router picks the prompt's architecture code
(cosine argmax) and the student integrates under that code's hard gates. Options: `config.flow_eval`.

Keys: `aptp_samples` (the PNG grid), `fd` and `sample_accuracy` (with `classifier_run`), `flops_per_sample` (the mean
over samples of the gated FLOPs x velocity evaluations), `samples_flops_ratio` (mean gated / unpruned FLOPs over the
samples' prompts; the task's `flops_ratio` is over the evaluation split), `codes_used` (distinct codes among the
samples' prompts), and `samples_flops_ratio_<stroke>` per stroke word.
"""

import jax
import jax.numpy as jnp
import numpy as np

from zoo.evaluators.base import Evaluator, register_evaluator
from zoo.evaluators.flow_samples import evaluations_per_sample, integrate, scorer
from zoo.flow import evaluation, matching
from zoo.tasks import aptp as aptp_task
from zoo.tasks.flow_matching import from_model_range


@register_evaluator("aptp_samples")
class APTPSamples(Evaluator):
  """See the module docstring."""

  tasks = ("aptp",)

  def __call__(self, ctx):
    o = evaluation.options(ctx.config)
    exp, model = ctx.exp, ctx.exp.model
    images, labels = evaluation.real_images(exp, o["samples"])
    index = np.arange(o["samples"]) % len(images)  # prompts of the evaluation images, in turn
    labels = labels[index].astype(np.int32)
    stroke_ids = np.asarray(aptp_task.strokes(jnp.asarray(images[index]), exp.task.ink_thresholds))
    prompts = aptp_task.prompt_embedding(jnp.asarray(labels), jnp.asarray(stroke_ids))
    variables = jax.device_get(ctx.state.variables())
    classes = exp.task.num_classes

    def model_fn(x, t, y):  # guidance calls it on the batch twice over: the prompts repeat alike
      repeated = jnp.tile(prompts, (x.shape[0] // prompts.shape[0], 1))
      return model.apply(variables, images=x, t=t, labels=y, prompts=repeated)[0]["velocity"]

    guided = bool(classes) and o["guidance"] != 1.0
    y = jnp.asarray(labels)
    velocity = (
      matching.guided_velocity_fn(model_fn, y, classes, o["guidance"]) if guided else (lambda x, t: model_fn(x, t, y))
    )
    x1 = jax.random.normal(jax.random.key(o["seed"]), (o["samples"], *exp.info["image_shape"]), jnp.float32)
    samples = np.asarray(from_model_range(integrate(velocity, x1, o)))
    routed, _ = model.apply(variables, images=x1, t=jnp.ones((o["samples"],)), labels=y, prompts=prompts)
    ratio = np.asarray(routed["flops_ratio"])
    flops = model.flops_per_sample() * evaluations_per_sample(o, guided) * float(np.mean(ratio))
    results = scorer(ctx, o, labels)(samples, "aptp_samples", flops)
    results = {k.replace("aptp_samples_", "") if k != "aptp_samples" else k: v for k, v in results.items()}
    results["samples_flops_ratio"] = float(np.mean(ratio))
    results["codes_used"] = float(len(np.unique(np.asarray(routed["code"]))))
    for s, word in enumerate(aptp_task.STROKES):
      if np.any(stroke_ids == s):
        results[f"samples_flops_ratio_{word}"] = float(np.mean(ratio[stroke_ids == s]))
    return results
