"""The engine trains the shipped configs exactly as before tasks became plug-ins: the training losses of their first
steps equal those recorded with the earlier engine (tests/data/loss_regression.json, train.steps=50).

The losses were recorded by a default (optimised) XLA build; the suite compiles unoptimised (conftest.py), which rounds
differently and drifts by ~1e-4 within a few steps, so the measurement runs in a subprocess without the suite's XLA
flags."""

import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

RECORDED = json.load(open(os.path.join(os.path.dirname(__file__), "data", "loss_regression.json")))
STEPS = 4  # of the 50 recorded: warmup, the optimizer's first moments and the data order
# Virtual CPU devices of the measuring subprocess (data-parallel shards of the batch), as the recordings were made.
DEVICES = {"dense_lm": 8, "moe_mixtral": 8, "simplenet_digits": 8}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_losses(name, steps):
  """The training losses of the first `steps` steps of configs/<name>.py with train.steps=50."""
  import jax  # pylint: disable=g-import-not-at-top

  from zoo.engine import sharding  # pylint: disable=g-import-not-at-top
  from zoo.engine.trainer import Experiment  # pylint: disable=g-import-not-at-top

  config = importlib.import_module(f"configs.{name}").get_config()
  config.train.steps = 50
  exp = Experiment(config)
  state, shardings = exp.init_state()
  step = exp.compile_train_step(shardings, exp.abstract_state()[0])
  batches = exp.make_iterator(config.data.train_split, repeat=True)
  losses = []
  with sharding.mesh_context(exp.mesh):
    for _ in range(steps):
      state, metrics = step(state, sharding.global_batch(exp.pad(next(batches)), exp.mesh))
      losses.append(float(exp.host_metrics(jax.device_get(metrics))["loss"]))
  return losses


@pytest.mark.parametrize("name", ["dense_lm", "moe_mixtral", "simplenet_digits"])
def test_first_steps_reproduce_the_recorded_losses(name):
  from conftest import UNOPTIMISED  # pylint: disable=g-import-not-at-top  (here: the subprocess runs this file)

  suite_flags = UNOPTIMISED.split()
  flags = [f for f in os.environ["XLA_FLAGS"].split() if f not in suite_flags]
  flags = [re.sub(r"device_count=\d+", f"device_count={DEVICES[name]}", f) for f in flags]
  env = dict(os.environ, XLA_FLAGS=" ".join(flags))
  result = subprocess.run(
    [sys.executable, __file__, name, str(STEPS)], capture_output=True, text=True, cwd=ROOT, env=env, check=False
  )
  assert result.returncode == 0, result.stderr[-3000:]
  losses = json.loads(result.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(losses, RECORDED[name][:STEPS], rtol=2e-5)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  print(json.dumps(first_losses(sys.argv[1], int(sys.argv[2]))))
