"""Metric sinks: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events under `WORKDIR/tb`."""
import json
import os

import numpy as np


def to_python(value):
  """numpy/jax scalars -> float/int, arrays -> nested lists (routing metrics such as `expert_load`)."""
  array = np.asarray(value)
  if array.ndim == 0:
    return array.item()
  return array.tolist()


class MetricsWriter:
  """Appends to `workdir/metrics.jsonl` and writes scalar TensorBoard summaries; a no-op when `enabled` is False
  (every process but the first in a multi-host run)."""

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

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

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir):
  """The records of `workdir/metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
