"""Metric sinks: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events under `WORKDIR/tb`."""

import json
import os
import sys

import numpy as np


def to_python(value):
  """numpy/jax scalars -> float/int, arrays -> nested lists (routing metrics such as `expert_load`)."""
  array = np.asarray(value)
  if array.ndim == 0:
    return array.item()
  return array.tolist()


def without_nan(tree):
  """`tree` (dicts, lists, scalars) with every float nan as None, for strict JSON (`allow_nan=False`)."""
  if isinstance(tree, dict):
    return {k: without_nan(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [without_nan(v) for v in tree]
  return None if isinstance(tree, float) and np.isnan(tree) else tree


def format_or_dash(value, spec=".3f"):
  """`format(value, spec)` for a table cell, or '-' for None and nan (a metric that is undefined)."""
  return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without importing torch when torch is not loaded yet: tensorboardX tries
  `import torch` only to accept torch tensors (1.5-2 s of every run's start-up here); the zoo writes Python floats."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Appends to `workdir/metrics.jsonl` and writes scalar TensorBoard summaries; a no-op when `enabled` is False
  (every process but the first in a multi-host run)."""

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._tb = summary_writer_class()(os.path.join(workdir, "tb"))

  def write(self, step, metrics):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, int(step))
    self._tb.flush()

  def truncate_after(self, step):
    """Drop the records of steps after `step` (a resumed run logs them again) and any torn last line, atomically."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
          continue
    partial = self.path + ".partial"
    with open(partial, "w") as f:
      f.writelines(kept)
    os.replace(partial, self.path)

  def write_config(self, config):
    """Writes the run's resolved config to `workdir/config.json` (read back by `read_config`,
    `tools/compare_runs.py`)."""
    if self.enabled:
      with open(os.path.join(os.path.dirname(self.path), "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_config(workdir):
  """The `ml_collections.ConfigDict` a run in `workdir` was trained with (its `config.json`)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {workdir}: train.py writes it when a run starts")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def read_metrics(workdir):
  """The records of `workdir/metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
