"""The evaluator contract and registry.

An evaluator is a class registered by name that `evaluate()` calls with an `EvalContext` after the task's metrics
are computed; it returns a flat dict of results (floats, lists, strings, paths of files it wrote in the workdir):

    @register_evaluator("my_plot")
    class MyPlot(Evaluator):
      needs = ("expert_ids",)  # the per-token outputs the model must expose (its `exposes`, sown in 'intermediates')
      tasks = ("lm",)          # the tasks it applies to (empty: any)

      def __call__(self, ctx):
        ids = ctx.intermediates("expert_ids", ctx.first_batch())
        return {"my_plot": ctx.path("my_plot.png")}

A model declares the per-token outputs it can give with the class attribute `exposes` (e.g. ('expert_ids',)) and
sows them into the 'intermediates' collection under those names; the engine names no model field.
`config.evals` empty: the task's `default_evals` plus every evaluator whose `needs` the model exposes and whose
`tasks` include the config's; a list: exactly those (an evaluator the model or task cannot serve is a ConfigError).
"""

import os
from typing import ClassVar

import jax
import numpy as np

from zoo.models import ConfigError
from zoo.registry import Registry

EVALUATORS = Registry("evaluator", "zoo.evaluators", "config.evals")
register_evaluator = EVALUATORS.register
evaluator_names = EVALUATORS.names
get_evaluator = EVALUATORS.get


class Evaluator:
  """Base class; see the module docstring."""

  needs: ClassVar[tuple[str, ...]] = ()
  tasks: ClassVar[tuple[str, ...]] = ()
  by_default: ClassVar[bool] = True  # run when config.evals is empty and the model and task can serve it

  @classmethod
  def unmet(cls, model, task_name):
    """Why this evaluator cannot run on `model` / `task_name`, or None."""
    if cls.tasks and task_name not in cls.tasks:
      return f"it serves tasks {list(cls.tasks)}, not {task_name!r}"
    missing = [n for n in cls.needs if n not in getattr(model, "exposes", ())]
    if missing:
      return (
        f"model {type(model).__name__} does not expose {missing} (its exposes: {list(getattr(model, 'exposes', ()))})"
      )
    return None

  def __call__(self, ctx):
    raise NotImplementedError


def select(names, model, task, task_name):
  """The evaluators to run: `names` (config.evals), or the defaults when empty (see the module docstring).

  Raises:
    ConfigError: an unknown evaluator, or one the model or task cannot serve.
  """
  if names:
    chosen = []
    for name in names:
      cls = get_evaluator(name)
      why = cls.unmet(model, task_name)
      if why:
        raise ConfigError(f"config.evals: {name!r} cannot run here: {why}")
      chosen.append(cls())
    return chosen
  chosen = [get_evaluator(name)() for name in task.default_evals]
  for name in evaluator_names():
    cls = get_evaluator(name)
    if cls.by_default and name not in task.default_evals and cls.unmet(model, task_name) is None:
      chosen.append(cls())
  return chosen


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (evaluators run without a display)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def save_figure(fig, path, **savefig_kwargs):
  """Write `fig` to `path` and close it; returns path."""
  fig.savefig(path, **savefig_kwargs)
  pyplot().close(fig)
  return path


class EvalContext:
  """What an evaluator may use: the experiment (`exp.model`, `exp.config`, `exp.task`, `exp.mesh`), the state, the
  task's metrics so far (`results`), and helpers to read validation batches and the model's intermediates."""

  def __init__(self, exp, state, workdir, step, results):
    self.exp, self.state, self.workdir, self.step, self.results = exp, state, workdir, step, results
    self._forwards = {}

  @property
  def config(self):
    return self.exp.config

  def path(self, filename):
    """`workdir/<stem>_<step><ext>` for a file the evaluator writes."""
    stem, ext = os.path.splitext(filename)
    return os.path.join(self.workdir, f"{stem}_{self.step}{ext}")

  def batches(self, limit):
    """Up to `limit` validation batches (host numpy, padded to the global batch with zero-weight rows)."""
    for i, batch in enumerate(self.exp.make_iterator(self.config.data.eval_split, repeat=False, drop_remainder=False)):
      if i == limit:
        break
      yield self.exp.pad(batch)

  def first_batch(self):
    return next(self.batches(1))

  def intermediates(self, name, batch):
    """The model's sown per-token output `name` for `batch` (host numpy; padding rows included: see
    batch['weight'])."""
    from zoo.engine import sharding  # pylint: disable=g-import-not-at-top

    if name not in self._forwards:
      exp = self.exp

      def forward(variables, batch):
        inputs, _ = exp.task.prepare(batch, exp.eval_rngs())
        _, updated = exp.model.apply(variables, **inputs, mutable=["intermediates"])
        return updated["intermediates"][name]

      self._forwards[name] = jax.jit(forward, out_shardings=sharding.replicated(exp.mesh))
    global_batch = sharding.global_batch(batch, self.exp.mesh)
    return np.asarray(jax.device_get(self._forwards[name](self.state.variables(), global_batch)))

  def tokenizer(self):
    from zoo.data.tokenizer import make_tokenizer  # pylint: disable=g-import-not-at-top

    return make_tokenizer(self.config.data.tokenizer)
