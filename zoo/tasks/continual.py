"""Task-incremental continual learning on a labelled image set (the protocol of CLR, Ge et al. 2023, section 4).

The classes are split into a sequence of tasks (`task_classes`); a run learns task `current_task` after the runs of
the tasks before it (chained with `config.init_from`, each run training only its own parameters). In a run:
- training: only the current task's examples count (the others get weight 0), their labels mapped to positions in
  the task's own head (`task_classes[t].index(label)`);
- evaluation: every task learned so far (0..current_task) is scored with its own head, so the metrics hold the
  accuracy on each earlier task after learning the current one: `accuracy_task{t}`, `loss_task{t}`; `accuracy` is
  their mean (the average accuracy of continual learning), `loss` the current task's loss.
Examples of classes of later tasks (or of no task) are ignored (weight 0, task -1).

Data format 'images'. Model: `model(images=[B, H, W, C], task=int32 [B], adapt=bool [B]) -> (tuple over tasks of
logits [B, len(task_classes[t])], ModelOutput)`, `task` each row's task (-1: none), `adapt` the rows of the task
being learned (their BatchNorms use batch statistics in training; the earlier tasks' stay frozen), e.g. `clr`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.models import ConfigError
from zoo.tasks.base import Task, register_task

DEFAULT_TASKS = ((0, 1, 2, 3, 4), (5, 6), (7, 8, 9))  # [guess] half the classes first (the pre-training stand-in)


@register_task("continual")
@dataclasses.dataclass(frozen=True)
class ContinualClassification(Task):
  """Options: `task_classes` (a tuple of disjoint tuples of class ids, one per task) and `current_task` (the task this
  run learns, in [0, len(task_classes)))."""

  task_classes: tuple = DEFAULT_TASKS
  current_task: int = 0
  formats = ("images",)

  def __post_init__(self):
    tasks = self.task_classes
    ok = isinstance(tasks, (tuple, list)) and len(tasks) > 0
    ok = ok and all(isinstance(c, (tuple, list)) and len(c) > 0 for c in tasks)
    ok = ok and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for c in tasks for k in c)
    if not ok:
      raise ConfigError(
        f"config.task_options.task_classes={tasks!r} is invalid; allowed: a non-empty tuple of non-empty tuples of "
        "class ids >= 0, e.g. ((0, 1, 2, 3, 4), (5, 6), (7, 8, 9))"
      )
    seen = {}
    for t, classes in enumerate(tasks):
      for k in classes:
        if k in seen:
          raise ConfigError(
            f"config.task_options.task_classes: class {k} is in task {seen[k]} and task {t}; allowed: disjoint tasks"
          )
        seen[k] = t
    current = self.current_task
    if not isinstance(current, int) or isinstance(current, bool) or not 0 <= current < len(tasks):
      raise ConfigError(
        f"config.task_options.current_task={current!r} is out of range; allowed: 0..{len(tasks) - 1} "
        f"(one per tuple of task_classes)"
      )
    # tuples, so that the frozen dataclass stays hashable when the options come as lists
    object.__setattr__(self, "task_classes", tuple(tuple(int(k) for k in c) for c in tasks))

  @property
  def num_learned(self):
    return self.current_task + 1

  def tables(self):
    """(task of each class id, position of each class id in its task's head), int32 [max class + 1]; -1 / 0 for a
    class of no task."""
    size = max(k for c in self.task_classes for k in c) + 1
    task_of, position = np.full(size, -1, np.int32), np.zeros(size, np.int32)
    for t, classes in enumerate(self.task_classes):
      for i, k in enumerate(classes):
        task_of[k], position[k] = t, i
    return task_of, position

  def batch_spec(self, info, data_config, batch_size):
    classes = info.get("num_classes")
    bad = sorted(k for c in self.task_classes for k in c if classes is not None and k >= classes)
    if bad:
      raise ConfigError(
        f"config.task_options.task_classes names class {bad[0]}, which dataset {data_config.get('name')!r} lacks; "
        f"allowed: class ids 0..{classes - 1}"
      )
    return {
      "image": jax.ShapeDtypeStruct((batch_size, *info["image_shape"]), jnp.float32),
      "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32),
    }

  def check_model(self, model, info, data_config):
    """A model with `head_classes` (e.g. `clr`) needs one head per task, of its task's size."""
    del info, data_config
    sizes = tuple(len(c) for c in self.task_classes)
    heads = getattr(model, "head_classes", None)
    if heads is not None and tuple(heads) != sizes:
      raise ConfigError(
        f"config.model.head_classes={tuple(heads)} must be the sizes of config.task_options.task_classes: {sizes}"
      )

  def prepare(self, batch, rngs):
    """-> ({'images', 'task' [B], 'adapt' [B]}, {'task' [B], 'label' [B] (the position in the row's head)})."""
    task_of, position = self.tables()
    label = batch["label"]
    known = (label >= 0) & (label < len(task_of))
    index = jnp.clip(label, 0, len(task_of) - 1)
    task = jnp.where(known, jnp.asarray(task_of)[index], -1)
    task = jnp.where(task <= self.current_task, task, -1)  # later tasks are not learned yet
    local = jnp.where(task >= 0, jnp.asarray(position)[index], 0)
    inputs = {"images": batch["image"], "task": task, "adapt": task == self.current_task}
    return inputs, {"task": task, "label": local}

  def stats(self, outputs, targets, batch):
    """Cross-entropy of the current task (the objective) and, per learned task, its summed loss, correct
    predictions and examples ([current_task + 1] arrays)."""
    sizes = tuple(len(c) for c in self.task_classes)
    got = tuple(int(o.shape[-1]) for o in outputs) if isinstance(outputs, (tuple, list)) else None
    if got != sizes:
      raise ConfigError(
        f"task 'continual' needs one head per task of task_classes, of sizes {sizes}; the model gives {got} "
        "(e.g. set config.model.head_classes to the sizes of config.task_options.task_classes)"
      )
    losses, corrects, weights = [], [], []
    for t in range(self.num_learned):
      logits = outputs[t].astype(jnp.float32)
      labels = jnp.clip(targets["label"], 0, sizes[t] - 1)
      weight = batch["weight"] * (targets["task"] == t)
      losses.append(jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weight))
      corrects.append(jnp.sum((jnp.argmax(logits, -1) == labels) * weight))
      weights.append(jnp.sum(weight))
    return {
      "loss_sum": losses[-1],
      "weight": weights[-1],
      "task_loss_sum": jnp.stack(losses),
      "task_correct": jnp.stack(corrects),
      "task_weight": jnp.stack(weights),
    }

  def finalize(self, sums, info):
    weights = np.maximum(np.asarray(sums["task_weight"], np.float64), 1e-9)
    accuracy = np.asarray(sums["task_correct"], np.float64) / weights
    loss = np.asarray(sums["task_loss_sum"], np.float64) / weights
    metrics = {"loss": float(sums["loss_sum"]) / max(float(sums["weight"]), 1e-9), "accuracy": float(accuracy.mean())}
    for t in range(self.num_learned):
      metrics[f"accuracy_task{t}"] = float(accuracy[t])
      metrics[f"loss_task{t}"] = float(loss[t])
    return metrics
