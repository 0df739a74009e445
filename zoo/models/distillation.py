"""Knowledge distillation of a teacher classifier into a student (Hinton et al. 2015, "Distilling the Knowledge in a
Neural Network"), as LSF-IDM (papers.md F) distils a BERT teacher over windows of CAN IDs into a BiLSTM student.

The model holds two sub-models, each built from its own model config by the registry (`build_model`), as the
parameter sub-trees 'teacher' and 'student': a run loads a trained teacher with
`config.init_from = {'teacher': 'workdirs/can_teacher'}`. Both read the same tokens and mask; the teacher always runs
deterministically (no dropout) and its logits pass through `jax.lax.stop_gradient`, so no gradient reaches it, and
the `trainable_params` hook freezes its parameters (no optimizer state, and no weight decay drifting them), as
`config.frozen_params = ('teacher/.*',)` would; the student's parameters all train (a hook of the student's own is
not consulted). The loss (`zoo.tasks.distillation`) compares the two logits.
"""

from collections.abc import Mapping
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict

from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, build_model, register_model

ROLES = ("teacher", "student")


def _frozen(value):
  """A hashable copy of a config value: mappings (ConfigDicts included) -> FrozenDict, lists -> tuples."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return FrozenDict({k: _frozen(v) for k, v in value.items()})
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  return value


def _build(model, role):
  """The sub-model of `role` ('teacher' | 'student') built from its config by the registry; its config errors are
  reported under `config.model.<role>.`."""
  config = getattr(model, role)
  if not isinstance(config, Mapping) or "name" not in config:
    raise ConfigError(
      f"config.model.{role}={config!r} must be a model config with a 'name' (e.g. {{'name': 'text_encoder', ...}})"
    )
  try:
    return build_model(config)
  except ConfigError as e:
    raise ConfigError(str(e).replace("config.model.", f"config.model.{role}.")) from e


@register_model("distillation")
class Distillation(nn.Module):
  """A teacher and a student classifier over the same tokens [batch, length] -> {'student', 'teacher'} logits
  [batch, num_classes] (see the module docstring). Config keys are the fields below.

  Attributes:
    teacher: the teacher's model config, e.g. `{'name': 'text_encoder', 'num_classes': 5, ...}` (LSF-IDM: BERT).
    student: the student's model config, e.g. `{'name': 'bilstm', 'num_classes': 5, ...}` (LSF-IDM: a BiLSTM).
      Both must be classifiers (`num_classes` >= 1) with the same number of classes and the sequence-classifier call
      `model(tokens, *, mask, deterministic) -> (logits [batch, num_classes], ModelOutput)`.

  `exposes` (the `zoo.models` contract): none.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  teacher: Mapping = FrozenDict(name="text_encoder", num_classes=5)
  student: Mapping = FrozenDict(name="bilstm", num_classes=5)

  def __post_init__(self):
    for role in ROLES:  # hashable, like every other module field (ConfigDicts and dicts become FrozenDicts)
      object.__setattr__(self, role, _frozen(getattr(self, role)))
    classes = {}
    for role in ROLES:
      classes[role] = getattr(_build(self, role), "num_classes", None)
      if isinstance(classes[role], bool) or not isinstance(classes[role], int) or classes[role] < 1:
        raise ConfigError(
          f"config.model.{role}.name={getattr(self, role)['name']!r} with num_classes={classes[role]!r} is "
          "not a classifier; the teacher and the student must both have num_classes >= 1"
        )
    if classes["teacher"] != classes["student"]:
      raise ConfigError(
        f"config.model.student.num_classes={classes['student']} must equal "
        f"config.model.teacher.num_classes={classes['teacher']} (the student learns the teacher's classes)"
      )
    super().__post_init__()

  def setup(self):
    # Built here (deferred, unnamed), then attached under the parameter sub-trees 'teacher' and 'student'.
    self.teacher_model = _build(self, "teacher").clone(parent=self, name="teacher")
    self.student_model = _build(self, "student").clone(parent=self, name="student")

  def __call__(self, tokens, *, mask=None, deterministic=True):
    """Both classifiers' logits.

    Args:
      tokens: [batch, length] int32.
      mask: [batch, length] (1 = real token; default all), given to both.
      deterministic: the student's dropout switch; the teacher always runs deterministically.

    Returns:
      ({'student': logits [batch, num_classes] float32, 'teacher': the same, without gradient}, ModelOutput): the
      student's aux_loss; metrics: the student's, the teacher's prefixed 'teacher_', and `agreement`, the fraction
      of examples where the student's top class is the teacher's.
    """
    teacher_logits, teacher_out = self.teacher_model(tokens, mask=mask, deterministic=True)
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    student_logits, student_out = self.student_model(tokens, mask=mask, deterministic=deterministic)
    student_logits = student_logits.astype(jnp.float32)
    agreement = jnp.mean((jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32))
    metrics = {
      **student_out.metrics,
      **{f"teacher_{k}": jax.lax.stop_gradient(v) for k, v in teacher_out.metrics.items()},
      "agreement": agreement,
    }
    outputs = {"student": student_logits, "teacher": teacher_logits}
    return outputs, ModelOutput(aux_loss=student_out.aux_loss, metrics=metrics)

  def trainable_params(self, params):
    """The `zoo.models` hook of the parameters that train: the teacher's are frozen, the student's all train."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[0] != "teacher" for path in flat})
