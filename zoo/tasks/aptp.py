"""APTP (Ganjdanesh et al. 2024; papers.md D2): flow matching of a prompt-routed pruned DiT (`zoo.models.aptp`)
distilled from the unpruned one, on images with templated captions.

Prompts [guess: the paper uses real captions encoded by CLIP's text encoder; no text encoder or captioned images are
available offline]: each image gets the caption "a {stroke} handwritten {digit}", `stroke` being 'thin', 'regular' or
'bold' by the image's mean ink (thresholds `ink_thresholds`, the terciles of the 1797 scikit-learn digits); the prompt
embedding is the caption's L2-normalised bag of words over `VOCABULARY`. Two prompts are as similar as their shared
words, which the contrastive loss carries over to their architecture embeddings.

Loss: the flow-matching loss of `zoo.tasks.flow_matching` on the student's velocity plus `distill_weight` times the
mean squared distance between the student's and the frozen teacher's velocities (the paper distils outputs and
features; here outputs only [guess]); the model adds the resource, contrastive and assignment losses.
Reports loss, flow_loss, distill_loss and the mean FLOPs ratio of the student.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from zoo.flow import matching
from zoo.models import ConfigError
from zoo.tasks.base import register_task
from zoo.tasks.flow_matching import FlowMatching, noised

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STROKES = ("thin", "regular", "bold")
VOCABULARY = ("a", "handwritten", *DIGITS, *STROKES)


def strokes(images, thresholds):
  """The stroke word index of each image [B, H, W, C] in [0, 1]: 0 thin, 1 regular, 2 bold by its mean ink."""
  ink = jnp.mean(images.reshape(images.shape[0], -1), axis=1)
  return jnp.sum(ink[:, None] > jnp.asarray(thresholds)[None, :], axis=1).astype(jnp.int32)


def caption(label, stroke):
  """The caption of one image, e.g. 'a bold handwritten seven'."""
  return f"a {STROKES[int(stroke)]} handwritten {DIGITS[int(label)]}"


def prompt_embedding(labels, stroke_ids):
  """L2-normalised bag of words of the captions over VOCABULARY: labels, stroke_ids [B] -> [B, len(VOCABULARY)]."""
  counts = jnp.zeros((labels.shape[0], len(VOCABULARY)), jnp.float32).at[:, :2].set(1.0)
  counts = counts.at[jnp.arange(labels.shape[0]), 2 + labels].add(1.0)
  counts = counts.at[jnp.arange(labels.shape[0]), 2 + len(DIGITS) + stroke_ids].add(1.0)
  return counts / jnp.linalg.norm(counts, axis=1, keepdims=True)


def bag_of_words(text):
  """The same embedding from a caption's text (checks `prompt_embedding`; unknown words are an error)."""
  counts = np.zeros(len(VOCABULARY), np.float32)
  for word in text.split():
    if word not in VOCABULARY:
      raise ValueError(f"prompt word {word!r} is not in the vocabulary {VOCABULARY}")
    counts[VOCABULARY.index(word)] += 1
  return counts / np.linalg.norm(counts)


@register_task("aptp")
@dataclasses.dataclass(frozen=True)
class APTPTask(FlowMatching):
  """Options: those of flow_matching, plus distill_weight (the distillation loss's weight; APTP: 0.2) and
  ink_thresholds (the mean-ink boundaries of thin / regular / bold)."""

  distill_weight: float = 0.2
  ink_thresholds: tuple = (0.288, 0.321)

  default_evals = ("aptp_samples",)

  def batch_spec(self, info, data_config, batch_size):
    if self.distill_weight < 0:
      raise ConfigError(f"config.task_options.distill_weight={self.distill_weight!r}; allowed: >= 0")
    thresholds = tuple(self.ink_thresholds)
    if len(thresholds) != len(STROKES) - 1 or list(thresholds) != sorted(set(thresholds)):
      raise ConfigError(
        f"config.task_options.ink_thresholds={self.ink_thresholds!r}; allowed: {len(STROKES) - 1} increasing numbers"
      )
    if info["num_classes"] != len(DIGITS):
      raise ConfigError(f"task 'aptp' captions the 10 digits; the dataset has {info['num_classes']} classes")
    return super().batch_spec(info, data_config, batch_size)

  def prompts(self, batch):
    """The prompt embeddings [B, len(VOCABULARY)] of a batch's images."""
    return prompt_embedding(batch["label"], strokes(batch["image"], self.ink_thresholds))

  def prepare(self, batch, rngs):
    x0, eps, t, x_t = noised(batch, rngs)
    inputs = {
      "images": x_t,
      "t": t,
      "labels": self.labels(batch, rngs),
      "prompts": self.prompts(batch),
      "distill": True,
    }
    return inputs, {"velocity": matching.velocity_target(x0, eps)}

  def stats(self, outputs, targets, batch):
    w = batch["weight"]
    flow = matching.flow_matching_loss(outputs["velocity"], targets["velocity"])
    distill = matching.flow_matching_loss(outputs["velocity"], outputs["teacher"])
    return {
      "loss_sum": jnp.sum((flow + self.distill_weight * distill) * w),
      "flow_sum": jnp.sum(flow * w),
      "distill_sum": jnp.sum(distill * w),
      "flops_sum": jnp.sum(outputs["flops_ratio"] * w),
      "weight": jnp.sum(w),
    }

  def finalize(self, sums, info):
    weight = max(float(sums["weight"]), 1e-9)
    return {
      "loss": float(sums["loss_sum"]) / weight,
      "flow_loss": float(sums["flow_sum"]) / weight,
      "distill_loss": float(sums["distill_sum"]) / weight,
      "flops_ratio": float(sums["flops_sum"]) / weight,
    }
