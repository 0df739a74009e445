"""Shipped configs train (3 steps, on small batches, one device) and evaluate through the engine, evaluators
included: one config of each model that no other engine test trains (the others: test_engine*.py, test_plugins.py,
test_regression.py). Every shipped config validates and builds its model in test_config.py; all of them were
trained and evaluated this way once by hand (the closing notes give the run)."""
import importlib
import math

import jax
import pytest

from zoo.engine import trainer

CONFIGS = ("blockffn", "duo_llm_router", "mor_token_nr2_share", "readme_moe", "rmoe", "smallthinker",
           "smoe_dropout")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_trains_three_steps_and_evaluates(name, tmp_path):
  c = importlib.import_module(f"configs.{name}").get_config()
  c.train.update(steps=3, batch_size=8, grad_accum_steps=1, eval_every_steps=0, eval_batches=1, log_every_steps=1)
  if c.task != "classification":
    c.data.seq_len = min(int(c.data.seq_len), 32)
  c.checkpoint.update(every_steps=0, async_save=False)
  c.sample.max_new_tokens = 2
  c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  one = jax.devices()[:1]  # compiles faster than 8 devices; the mesh is tested elsewhere
  trainer.train(c, str(tmp_path), progress=False, devices=one)
  step, results, _ = trainer.evaluate(c, str(tmp_path), devices=one)
  assert step == 3 and math.isfinite(results["loss"]), results
