"""Config loading, overrides and the start-up errors (each names the key and what is allowed)."""

import importlib
import pathlib

import pytest
from ml_collections import config_flags  # noqa: F401  (the override syntax the CLIs use)

from configs import dense_lm, simplenet_digits
from zoo.engine.config import validate_config
from zoo.models import ConfigError, build_model

SHIPPED = sorted(
  p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py") if p.stem not in ("__init__", "base")
)


@pytest.mark.parametrize(
  "module, task, data_format", [(dense_lm, "lm", "text"), (simplenet_digits, "classification", "images")]
)
def test_shipped_configs_state_their_task_and_the_data_its_format(module, task, data_format):
  c = module.get_config()
  info = validate_config(c, num_devices=8)
  assert c.task == task and info["format"] == data_format


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_validates_and_builds_its_model(name):
  c = importlib.import_module(f"configs.{name}").get_config()
  validate_config(c, num_devices=8)
  model = build_model(c.model)
  if hasattr(model, "num_active_params"):
    assert 0 < model.num_active_params() <= model.num_params()


def test_overrides_of_unknown_keys_are_rejected():
  c = dense_lm.get_config()
  c.lock()
  c.train.steps = 7
  assert c.train.steps == 7
  with pytest.raises(AttributeError, match="stepz"):
    c.train.stepz = 7


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda c: c.train.__setitem__("stepz", 1), r"unknown key config.train.stepz; valid keys: \[.*'steps'"),
    (lambda c: c.__setitem__("learning_rate", 1), r"unknown key config.learning_rate"),
    (lambda c: c.model.__setitem__("name", "nope"), r"config.model.name='nope' is not a known model; choose one of"),
    (lambda c: c.model.__setitem__("num_expertz", 4), r"config.model.num_expertz is not a field of model 'dense_lm'"),
    (lambda c: c.data.__setitem__("name", "nope_dataset"), r"config.data: .*nope_dataset"),
    (
      lambda c: c.optimizer.__setitem__("schedule", "linear"),
      r"config.optimizer.schedule='linear' is invalid; allowed: \['warmup_cosine', 'warmup_stable_decay', 'constant'\]",
    ),
    (lambda c: c.train.__setitem__("steps", -5), r"config.train.steps=-5 is invalid; allowed: > 0"),
    (lambda c: c.train.__setitem__("grad_accum_steps", 3), r"config.train.grad_accum_steps=3 .*divisor"),
    (
      lambda c: c.__setitem__("task", "classification"),
      r"config.task='classification' is invalid; allowed: a task that reads format 'text'",
    ),
    (lambda c: c.__setitem__("task", "no_task"), r"config.task='no_task' is not a known task; choose one of \['"),
    (lambda c: c.model.__setitem__("vocab_size", 100), r"config.model.vocab_size=100 is invalid; allowed: >= 259"),
    (lambda c: c.mesh.__setitem__("fsdp", 3), r"config.mesh: 8 devices cannot be split with fixed axes"),
    (lambda c: c.mesh.update(data=2, fsdp=2), r"config.mesh .* uses 4 devices but 8 exist"),
    (lambda c: c.mesh.update(data=-1, fsdp=-1), r"at most one axis may be -1"),
    (lambda c: c.mesh.__setitem__("tensor", 0), r"config.mesh.tensor=0 is invalid"),
    (lambda c: c.train.__setitem__("batch_size", 4), r"config.train.batch_size=4 .*multiple of"),
  ],
)
def test_bad_configs_fail_with_a_clear_message(edit, message):
  c = dense_lm.get_config()
  edit(c)
  with pytest.raises(ConfigError, match=message):
    validate_config(c, num_devices=8)
