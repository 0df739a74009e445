"""Flow matching on images (Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et al. 2023, rectified
flow), the objective of each expert of Decentralized Diffusion Models (papers.md D1).

Convention (`zoo.flow.matching`): data x0 at t = 0, noise eps ~ N(0, I) at t = 1, `x_t = (1 - t) x0 + t eps`, the
model predicts the velocity `dx_t / dt = eps - x0`; sampling integrates from t = 1 down to t = 0. t ~ U(0, 1) [guess:
papers.md D1 does not give the time distribution]. Class conditioning with classifier-free guidance (Ho & Salimans
2022): with `num_classes` > 0 the label is replaced by the null class (`num_classes`) with probability
`class_dropout` while training (0.1, DiT's value).

Data format 'images' (pixels in [0, 1], mapped to [-1, 1] here). Model:
`model(images=x_t [B, H, W, C], t=t [B], labels=labels [B]) -> (velocity [B, H, W, C], ModelOutput)`.
Reports the loss (mean squared velocity error per pixel).
"""

import dataclasses

import jax
import jax.numpy as jnp

from zoo.flow import matching
from zoo.models import ConfigError
from zoo.tasks.base import Task, register_task


def to_model_range(images):
  """Pixels in [0, 1] -> [-1, 1], the range the flow is trained in."""
  return 2.0 * images - 1.0


def from_model_range(x):
  """[-1, 1] -> pixels in [0, 1] (clipped)."""
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def noised(batch, rngs):
  """(x0, eps, t, x_t) of an image batch: t ~ U(0, 1) [B] from rngs['time'], eps from rngs['noise']."""
  x0 = to_model_range(batch["image"])
  eps = jax.random.normal(rngs["noise"], x0.shape, x0.dtype)
  t = jax.random.uniform(rngs["time"], x0.shape[:1], x0.dtype)
  return x0, eps, t, matching.interpolate(x0, eps, t)


def image_spec(info, batch_size):
  """The batch entries of an image task: image, label, weight, and `cluster` when the data is partitioned."""
  spec = {
    "image": jax.ShapeDtypeStruct((batch_size, *info["image_shape"]), jnp.float32),
    "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
  }
  if info.get("clusters"):
    spec["cluster"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  return spec


@register_task("flow_matching")
@dataclasses.dataclass(frozen=True)
class FlowMatching(Task):
  """Options: num_classes (0 = unconditional; else the dataset's classes, the null class being `num_classes`),
  class_dropout (the probability of training on the null class)."""

  num_classes: int = 0
  class_dropout: float = 0.1

  formats = ("images",)
  rng_streams = ("noise", "time", "guidance")
  default_evals = ("flow_samples",)

  def batch_spec(self, info, data_config, batch_size):
    if self.num_classes and self.num_classes != info["num_classes"]:
      raise ConfigError(
        f"config.task_options.num_classes={self.num_classes} but the dataset has {info['num_classes']} classes; "
        f"allowed: {info['num_classes']} or 0 (unconditional)"
      )
    if not 0 <= self.class_dropout < 1:
      raise ConfigError(f"config.task_options.class_dropout={self.class_dropout!r}; allowed: [0, 1)")
    return image_spec(info, batch_size)

  def labels(self, batch, rngs):
    """The labels the model sees: the class, or the null class (`num_classes`) with probability class_dropout."""
    if not self.num_classes:
      return jnp.zeros_like(batch["label"])
    drop = jax.random.bernoulli(rngs["guidance"], self.class_dropout, batch["label"].shape)
    return jnp.where(drop, self.num_classes, batch["label"]).astype(jnp.int32)

  def prepare(self, batch, rngs):
    x0, eps, t, x_t = noised(batch, rngs)
    inputs = {"images": x_t, "t": t, "labels": self.labels(batch, rngs)}
    return inputs, {"velocity": matching.velocity_target(x0, eps)}

  def stats(self, outputs, targets, batch):
    error = matching.flow_matching_loss(outputs, targets["velocity"])
    return {"loss_sum": jnp.sum(error * batch["weight"]), "weight": jnp.sum(batch["weight"])}

  def finalize(self, sums, info):
    return {"loss": float(sums["loss_sum"]) / max(float(sums["weight"]), 1e-9)}
