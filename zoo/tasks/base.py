"""The task contract and registry.

A task is a frozen dataclass whose fields are its options (`config.task_options`), registered by name:

    @register_task("my_task")
    @dataclasses.dataclass(frozen=True)
    class MyTask(Task):
      formats = ("images",)                  # the data formats it reads (`zoo.data.dataset_info(...)['format']`)
      rng_streams = ("noise",)               # fresh random keys it draws per step (and per micro-batch)
      throughput_key = "examples_per_sec"    # metrics.jsonl name of the throughput
      default_evals = ()                     # evaluators run by evaluate.py when config.evals is empty

      def batch_spec(self, info, data_config, batch_size): ...  # {name: ShapeDtypeStruct}, 'weight' [B] included
      def prepare(self, batch, rngs): ...    # -> (model keyword inputs, targets)
      def stats(self, outputs, targets, batch): ...  # -> weighted sums, 'loss_sum' and 'weight' required
      def finalize(self, sums, info): ...     # -> metrics (floats)
      def items(self, batch): ...             # -> items in a host batch (tokens, examples)
      def check_model(self, model, info, data_config): ...  # ConfigError when the built model cannot read the data

Every task reduces a batch to weighted sums so that evaluation over many batches, some padded with zero-weight rows
(`batch['weight']`), is exact; the engine minimises `loss_sum / weight` plus the model's `aux_loss`.
"""

import dataclasses
from typing import Any, ClassVar

import numpy as np

from zoo.models import ConfigError
from zoo.registry import Registry

TASKS = Registry("task", "zoo.tasks", "config.task")
register_task = TASKS.register
task_names = TASKS.names


def get_task(name, options=None):
  """Build the task `name` with `options` (a mapping of its dataclass fields).

  Raises:
    ConfigError: an unknown task, a task module whose import fails, or an unknown option.
  """
  cls = TASKS.get(name)
  fields = {f.name for f in dataclasses.fields(cls)}
  options = dict(options or {})
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ConfigError(
      f"config.task_options.{unknown[0]} is not an option of task {name!r}; valid keys: {sorted(fields)}"
    )
  return cls(**options)


@dataclasses.dataclass(frozen=True)
class Task:
  """Base class; see the module docstring for the contract."""

  formats: ClassVar[tuple[str, ...]] = ()
  rng_streams: ClassVar[tuple[str, ...]] = ()
  throughput_key: ClassVar[str] = "examples_per_sec"
  default_evals: ClassVar[tuple[str, ...]] = ()

  def batch_spec(self, info, data_config, batch_size) -> dict[str, Any]:
    raise NotImplementedError

  def prepare(self, batch, rngs):
    raise NotImplementedError

  def stats(self, outputs, targets, batch):
    raise NotImplementedError

  def finalize(self, sums, info):
    raise NotImplementedError

  def check_model(self, model, info, data_config) -> None:
    """Raises ConfigError when the built `model` cannot read the dataset (`info`, after `data_config`'s options),
    naming the model key, both values and the option that fixes it; checked at start-up. Default: nothing."""
    del model, info, data_config

  def items(self, batch) -> int:
    """Items in a host batch (before padding): by default its rows."""
    return len(next(iter(batch.values())))


def reduce_sums(sums_list):
  """Sum a list of weighted-sum dicts (host scalars or arrays, e.g. per-class counts)."""
  return {k: sum(np.asarray(s[k], np.float64) for s in sums_list) for k in sums_list[0]}
