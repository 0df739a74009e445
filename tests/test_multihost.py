"""train.py as 2 processes x 4 CPU devices (gloo collectives) trains, checkpoints and resumes with the losses of one
uninterrupted process with 8 devices fed the same global batches.

Each host's pipeline reads its own disjoint share of the examples (`zoo.data.make_iterator`), so the one-process
reference concatenates the two hosts' iterators into its global batch.
"""

import os
import re
import socket
import subprocess
import sys

import numpy as np

from configs.dense_lm import get_config
from zoo.engine import trainer
from zoo.engine.writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
  "model.num_layers": 1,
  "model.embed_dim": 32,
  "model.num_heads": 2,
  "model.num_kv_heads": 1,
  "model.mlp_dim": 64,
  "data.seq_len": 16,
  "train.batch_size": 16,
  "train.eval_batches": 2,
  "train.eval_every_steps": 0,
  "train.log_every_steps": 1,
  "checkpoint.every_steps": 2,
  "optimizer.warmup_steps": 1,
  "optimizer.lr": 0.01,
  "optimizer.schedule": "constant",
}
# 'constant' (after warmup): the learning rate does not depend on train.steps, so the run of 2 steps resumed to 4
# matches one run of 4, and both launches compile the same programs (the second reads them from the cache).


def config(steps):
  c = get_config()
  for key, value in {**OVERRIDES, "train.steps": steps}.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


class TwoHostIterator:
  """The global batches of a 2-host run, built in one process: host 0's rows, then host 1's."""

  def __init__(self, make, **kwargs):
    self.hosts = [make(**kwargs, process_index=i, process_count=2) for i in range(2)]

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(h) for h in self.hosts]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return [h.get_state() for h in self.hosts]

  def set_state(self, state):
    for h, s in zip(self.hosts, state):
      h.set_state(s)


def two_host_iterators(self, split, repeat, **kwargs):
  from zoo.data import make_iterator

  return TwoHostIterator(
    make_iterator,
    data_config=self.config.data,
    split=split,
    global_batch_size=int(self.config.train.batch_size),
    seed=int(self.config.seed),
    repeat=repeat,
    **kwargs,
  )


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_two_processes(workdir, overrides, devices_per_process):
  """train.py on configs/dense_lm.py with `overrides` as 2 jax.distributed processes on 127.0.0.1, each with
  `devices_per_process` CPU devices; returns their (stdout, stderr), both checked for exit status 0."""
  port = free_port()
  xla_flags = re.sub(r"device_count=\d+", f"device_count={devices_per_process}", os.environ["XLA_FLAGS"])
  env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "train.py",
        "--config=configs/dense_lm.py",
        f"--workdir={workdir}",
        *flags,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs


def run_two_processes(workdir, steps):
  return launch_two_processes(workdir, {**OVERRIDES, "train.steps": steps}, 4)


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_two_processes_match_one_process_and_resume(tmp_path, monkeypatch):
  ref = tmp_path / "ref"
  monkeypatch.setattr(trainer.Experiment, "make_iterator", two_host_iterators)
  trainer.train(config(4), str(ref), progress=False)
  run = tmp_path / "run"
  run_two_processes(run, 2)
  outputs = run_two_processes(run, 4)
  assert "resumed from checkpoint step 2" in outputs[0][0]
  for i in range(2):  # every process saved and restored its own share of the input pipeline
    assert (run / "checkpoints" / "4" / "data" / f"process_{i}-of-2.json").exists()
  a, b = losses(ref), losses(run)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)
