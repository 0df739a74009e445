"""Knowledge distillation of a classifier (Hinton et al. 2015) with LSF-IDM's loss (papers.md F): per example

    alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)),

the hard-label cross-entropy mixed with the KL divergence of the temperature-softened student from the softened
teacher; T^2 keeps the soft term's gradient scale independent of T (Hinton et al., sec. 2).

Data: as 'feature_classification' (format 'arrays', e.g. the CAN bus windows: `ids` int32 [B, W], `label` int32 [B],
`weight` float32 [B]); the model is 'distillation' (`zoo.models.distillation`), called like a sequence classifier,
`model(tokens=batch[as_tokens] [B, T], mask=ones [B, T]) -> ({'student': [B, C], 'teacher': [B, C]}, ModelOutput)`.
Reports the combined loss, its two terms, and the student's and the teacher's accuracy and macro F1.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from zoo.models import ConfigError
from zoo.tasks.base import register_task
from zoo.tasks.feature_classification import FeatureClassification

# The sums of the teacher's predictions, stored under TEACHER + the student's key.
TEACHER = "teacher_"
TEACHER_SUMS = ("correct", "class_true_positive", "class_predicted", "class_actual")


def distillation_terms(student_logits, teacher_logits, labels, temperature):
  """(ce [B], kd [B]) float32: the student's cross-entropy with the labels, and `T^2 KL(p_T || q_T)` with
  p_T = softmax(teacher / T), q_T = softmax(student / T) (the teacher is a target: no gradient reaches it).

  Args:
    student_logits, teacher_logits: [B, C].
    labels: [B] int.
    temperature: T > 0.
  """
  student = student_logits.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  ce = optax.softmax_cross_entropy_with_integer_labels(student, labels)
  log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return ce, temperature**2 * kl


def distillation_loss(student_logits, teacher_logits, labels, alpha, temperature):
  """LSF-IDM's per-example loss [B]: `alpha CE(student, y) + (1 - alpha) T^2 KL(softmax(teacher/T) ||
  softmax(student/T))` (`distillation_terms`); student_logits, teacher_logits [B, C], labels [B]."""
  ce, kd = distillation_terms(student_logits, teacher_logits, labels, temperature)
  return alpha * ce + (1.0 - alpha) * kd


@register_task("distillation")
@dataclasses.dataclass(frozen=True)
class Distillation(FeatureClassification):
  """Distillation of the 'distillation' model's teacher into its student on an 'arrays' dataset.

  Attributes:
    alpha: weight of the hard-label cross-entropy, in [0, 1]; 1 - alpha weighs the soft term [guess 0.5: LSF-IDM's
      value is not known to us].
    temperature: T > 0 of the softened distributions [guess 2.0].
    as_tokens: the integer feature passed as the models' `tokens` (`feature_classification`); default 'ids' (the CAN
      bus windows) [guess], since the distillation model reads tokens.
  """

  alpha: float = 0.5
  temperature: float = 2.0
  as_tokens: str = "ids"

  def __post_init__(self):
    for key, ok, allowed in (
      ("alpha", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
      ("temperature", lambda v: v > 0.0, "> 0"),
    ):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ConfigError(f"config.task_options.{key}={value!r} is invalid; allowed: a number {allowed}")

  def stats(self, outputs, targets, batch):
    """outputs: {'student': [B, C], 'teacher': [B, C]} -> weighted sums: 'loss_sum' (the distillation loss),
    'weight', 'ce_sum', 'kd_sum' (the T^2-scaled KL), the student's 'correct' and per-class sums (macro F1), and
    the teacher's under the prefix 'teacher_'."""
    if not isinstance(outputs, dict) or set(outputs) != {"student", "teacher"}:
      raise ValueError(
        "task 'distillation' needs the 'distillation' model (config.model.name='distillation', whose outputs are "
        f"{{'student': logits, 'teacher': logits}}); got outputs of type {type(outputs).__name__}"
      )
    student, teacher = outputs["student"], outputs["teacher"]
    w = batch["weight"]
    ce, kd = distillation_terms(student, teacher, batch["label"], self.temperature)
    sums = super().stats(student, targets, batch)
    teacher_sums = super().stats(teacher, targets, batch)
    return {
      **sums,
      "loss_sum": jnp.sum(distillation_loss(student, teacher, batch["label"], self.alpha, self.temperature) * w),
      "ce_sum": jnp.sum(ce * w),
      "kd_sum": jnp.sum(kd * w),
      **{TEACHER + k: teacher_sums[k] for k in TEACHER_SUMS},
    }

  def finalize(self, sums, info):
    """-> loss, ce, kd (per example), the student's accuracy and f1_macro, teacher_accuracy, teacher_f1_macro."""
    metrics = super().finalize(sums, info)
    n = max(float(sums["weight"]), 1e-9)
    teacher = super().finalize({**sums, **{k: sums[TEACHER + k] for k in TEACHER_SUMS}}, info)
    return {
      **metrics,
      "ce": float(sums["ce_sum"]) / n,
      "kd": float(sums["kd_sum"]) / n,
      "teacher_accuracy": teacher["accuracy"],
      "teacher_f1_macro": teacher["f1_macro"],
    }
