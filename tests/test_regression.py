"""The engine trains the shipped configs exactly as before tasks became plug-ins: the training losses of their first
steps equal those recorded with the earlier engine (tests/data/loss_regression.json, train.steps=50)."""
import importlib
import json
import os

import jax
import numpy as np
import pytest

from zoo.engine import sharding
from zoo.engine.trainer import Experiment

RECORDED = json.load(open(os.path.join(os.path.dirname(__file__), "data", "loss_regression.json")))
STEPS = 8  # of the 50 recorded: enough to cover warmup, the optimizer and the data order


@pytest.mark.parametrize("name", ["dense_lm", "moe_mixtral", "simplenet_digits"])
def test_first_steps_reproduce_the_recorded_losses(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.train.steps = 50
  exp = Experiment(config)
  state, shardings = exp.init_state()
  step = exp.compile_train_step(shardings, exp.abstract_state()[0])
  batches = exp.make_iterator(config.data.train_split, repeat=True)
  losses = []
  with sharding.mesh_context(exp.mesh):
    for _ in range(STEPS):
      state, metrics = step(state, sharding.global_batch(exp.pad(next(batches)), exp.mesh))
      losses.append(float(exp.host_metrics(jax.device_get(metrics))["loss"]))
  np.testing.assert_allclose(losses, RECORDED[name][:STEPS], rtol=2e-5)
