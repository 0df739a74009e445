"""Classification of fixed-shape feature arrays: one label per example (flows of network packets, windows of CAN IDs).

Data format 'arrays' (`zoo.data`): every feature of the dataset as its own batch entry (`info['features']`: name ->
(shape, dtype)), `label` int32 [B] (a ClassLabel) and `weight` float32 [B].
Model: by default `model(**{every feature but label and domain}) -> (logits [B, classes], ModelOutput)`, e.g.
NetMamba's `model(packets=[B, P, L])`; with `as_tokens='ids'` the model gets the sequence-classifier contract
`model(tokens=batch['ids'] [B, T], mask=ones [B, T])` (e.g. `text_encoder` over windows of CAN IDs).
Reports loss, accuracy and macro F1 over the classes the evaluated split holds (as 'sequence_classification').
"""

import dataclasses

import jax
import jax.numpy as jnp

from zoo.models import ConfigError
from zoo.tasks.base import register_task
from zoo.tasks.sequence_classification import SequenceClassification

# Entries of an 'arrays' batch that are never model inputs.
NOT_INPUTS = ("label", "weight", "domain")


@register_task("feature_classification")
@dataclasses.dataclass(frozen=True)
class FeatureClassification(SequenceClassification):
  """Cross-entropy of one label per example of an 'arrays' dataset; reports accuracy and macro F1.

  Attributes:
    as_tokens: '' passes every feature (but label and domain) to the model under its own name; the name of an
      integer feature passes it as `tokens` with an all-ones `mask` instead.
  """

  formats = ("arrays",)
  as_tokens: str = ""

  def input_spec(self, info, data_config, batch_size):
    features = {k: v for k, v in info["features"].items() if k not in ("label", "weight")}
    if self.as_tokens and (self.as_tokens not in features or self.as_tokens in NOT_INPUTS):
      raise ConfigError(
        f"config.task_options.as_tokens={self.as_tokens!r} is not a feature of the dataset; allowed: '' or one "
        f"of {sorted(features)}"
      )
    return {k: jax.ShapeDtypeStruct((batch_size, *shape), jnp.dtype(dtype)) for k, (shape, dtype) in features.items()}

  def prepare(self, batch, rngs):
    if self.as_tokens:
      tokens = batch[self.as_tokens]
      return {"tokens": tokens, "mask": jnp.ones(tokens.shape, jnp.float32)}, {}
    return {k: v for k, v in batch.items() if k not in NOT_INPUTS}, {}
