"""Every shipped config trains (3 steps, on small batches) and evaluates through the engine, evaluators included."""
import importlib
import math
import pathlib

import pytest

from zoo.engine import trainer

SHIPPED = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py")
                 if p.stem not in ("__init__", "base"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_trains_three_steps_and_evaluates(name, tmp_path):
  c = importlib.import_module(f"configs.{name}").get_config()
  c.train.update(steps=3, batch_size=8, grad_accum_steps=1, eval_every_steps=0, eval_batches=1, log_every_steps=1)
  if c.task != "classification":
    c.data.seq_len = min(int(c.data.seq_len), 32)
  c.checkpoint.update(every_steps=0, async_save=False)
  c.sample.max_new_tokens = 2
  trainer.train(c, str(tmp_path), progress=False)
  step, results, _ = trainer.evaluate(c, str(tmp_path))
  assert step == 3 and math.isfinite(results["loss"]), results
