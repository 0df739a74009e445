"""Masked pre-training (MAE, He et al. 2022, Section 3; NetMamba's pre-training, Section 3.4): the model hides part of
its input, as chosen by noise this task draws, and reconstructs it; the loss is the mean squared error on the hidden
part only.

Data format 'arrays' (`zoo.data`), e.g. 'loopback_traffic' (`packets` [B, 5, 320]); the label is not used.
Model: `model(**{input_key: x}, mask_noise=uniform noise shaped like x) -> ({'reconstruction': [B, S, k],
'target': [B, S, k], 'masked': [B, S] (1 = hidden)}, ModelOutput)` (e.g. `netmamba`, which turns the noise into its
`mask_ratio` of hidden strides). The loss of an example is the mean over its hidden units (S axis) of the mean over
k of the squared error; the evaluation draws the same noise every time (`Trainer.eval_rngs`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from zoo.models import ConfigError
from zoo.tasks.base import register_task
from zoo.tasks.feature_classification import FeatureClassification


@register_task("masked_pretraining")
@dataclasses.dataclass(frozen=True)
class MaskedPretraining(FeatureClassification):
  """Reconstruction of the masked part of the feature `input_key`; reports the loss (MSE on the masked part).

  Attributes:
    input_key: the feature the model reconstructs (passed under its own name, with `mask_noise`).
  """

  rng_streams = ("mask",)
  input_key: str = "packets"

  def input_spec(self, info, data_config, batch_size):
    spec = super().input_spec(info, data_config, batch_size)
    if self.input_key not in spec:
      raise ConfigError(
        f"config.task_options.input_key={self.input_key!r} is not a feature of the dataset; allowed: {sorted(spec)}"
      )
    return spec

  def prepare(self, batch, rngs):
    x = batch[self.input_key]
    return {self.input_key: x, "mask_noise": jax.random.uniform(rngs["mask"], x.shape)}, {}

  def stats(self, outputs, targets, batch):
    if not isinstance(outputs, dict) or "reconstruction" not in outputs:
      raise ValueError(
        "task 'masked_pretraining' needs a model that returns {'reconstruction', 'target', 'masked'} when given "
        "mask_noise (e.g. netmamba)"
      )
    error = jnp.mean(jnp.square(outputs["reconstruction"] - outputs["target"]), -1)  # [B, S]
    masked = outputs["masked"]
    per_example = jnp.sum(error * masked, -1) / jnp.maximum(jnp.sum(masked, -1), 1.0)
    w = batch["weight"]
    return {"loss_sum": jnp.sum(per_example * w), "weight": jnp.sum(w)}

  def finalize(self, sums, info):
    return {"loss": float(sums["loss_sum"]) / max(float(sums["weight"]), 1e-9)}
