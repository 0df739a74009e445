"""Shipped configs train (3 steps, on small batches, one device) and evaluate through the engine, evaluators
included: three whose models expose per-token outputs the evaluators read (MoR depths, Duo-LLM routes, expert ids
with a step-dependent k). The dense LM, Mixtral-style MoE, SimpleNet and text-encoder configs train in
test_engine*.py, test_plugins.py and test_regression.py; every shipped config validates and builds its model in
test_config.py, and every model passes test_models_contract.py. All shipped configs were trained and evaluated
this way by hand (`python -m pytest tests/test_shipped_configs.py --all-configs` does it: about 20 minutes on 2
cores)."""

import importlib
import math
import os

import jax

from zoo.engine import trainer

CONFIGS = ("duo_llm_router", "mor_token_nr2_share", "smoe_dropout")
ALL_CONFIGS = tuple(
  sorted(
    f[:-3]
    for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))
    if f.endswith(".py") and f not in ("__init__.py", "base.py")
  )
)


def pytest_generate_tests(metafunc):
  if "name" in metafunc.fixturenames:
    metafunc.parametrize("name", ALL_CONFIGS if metafunc.config.getoption("all_configs") else CONFIGS)


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
